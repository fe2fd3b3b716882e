"""Teacher weights files and the dataset's classes: `full` mode checks the stored class names (same
order, another order mapped, another set refused, no names warned about), `backbone` mode starts the
feature extractor only for any class list; bad files are refused before a run writes anything."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pipeline_helpers import TINY_DATA, tiny_spec
from safetensors.torch import load_file, save_file

from fd2_core.cli import ProgressPrinter
from fd2_core.data.errors import DataError
from fd2_core.models import build_model, save_model_weights
from fd2_core.models.weights import (
    UNNAMED_CLASSES,
    ClassListMismatch,
    classifier_name,
    load_model_weights,
    read_class_names,
    read_metadata,
)
from fd2_core.pipeline import run
from fd2_core.progress import PipelineEvent
from fd2_core.spec import JobSpec, ValidationError
from fd2_core.spec_resolution import resolve_spec
from fd2_core.stages.teacher import check_teacher_weights
from worker.progress import ProgressReporter

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["wren", "finch", "robin", "tit"]
TINY = {"cal": True, "num_attention_maps": 2, "width": 16}
# fast runs that start from a file: the teacher barely moves, so its rows
# can be compared with the file's
FROZEN = {"pretrain_lr": 1e-9, "pretrain_weight_decay": 0.0, "distill_iterations": 1, "relabel_epochs": 1,
          "evaluate": False}


def _teacher(backbone: str = "convnet", k: int = 4, seed: int = 0):
    """A teacher whose every tensor is distinct per class: random
    prototypes and BatchNorm statistics too."""
    torch.manual_seed(seed)
    model = build_model(backbone, k, 32, **TINY)
    with torch.no_grad():
        model.cal_head.prototypes.normal_()
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
    return model.eval()


def _rows(model) -> dict[str, torch.Tensor]:
    """The per-class tensors: backbone classifier, CAL classifier, prototypes."""
    head = classifier_name(model.backbone)
    rows = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items() if k.split(".")[0] == head}
    rows["cal_head.classifier.weight"] = model.cal_head.classifier.weight
    rows["cal_head.prototypes"] = model.cal_head.prototypes
    return rows


# ---------------------------------------------------------------- full mode: the class names decide


def test_same_order_loads_every_tensor_as_saved(tmp_path):
    source = _teacher()
    path = tmp_path / "teacher.safetensors"
    save_model_weights(source, path, {"classes": NAMES})
    assert read_class_names(path) == NAMES
    loaded = build_model("convnet", 4, 32, **TINY)
    outcome = load_model_weights(loaded, path, classes=NAMES)
    assert (outcome.mode, outcome.classes, outcome.warnings) == ("full", "same_order", ())
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("backbone", ["convnet", "resnet18", "mobilenetv2"])
def test_another_order_is_mapped_and_gives_the_same_logits_per_class(tmp_path, backbone):
    source = _teacher(backbone)
    path = tmp_path / "teacher.safetensors"
    save_model_weights(source, path, {"classes": NAMES})
    order = [2, 0, 3, 1]  # the dataset lists robin, wren, tit, finch
    wanted = [NAMES[i] for i in order]
    loaded = build_model(backbone, 4, 32, **TINY).eval()
    assert load_model_weights(loaded, path, classes=wanted).classes == "reordered"

    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before, after = source(x), loaded(x)
    torch.testing.assert_close(after.logits, before.logits[:, order], rtol=0, atol=1e-5)
    torch.testing.assert_close(after.cal.logits, before.cal.logits[:, order], rtol=0, atol=1e-5)
    torch.testing.assert_close(after.feature_map, before.feature_map, rtol=0, atol=0)
    for key, value in _rows(source).items():
        assert torch.equal(_rows(loaded)[key], value[order]), key
    assert not torch.equal(after.logits, before.logits)  # the permutation is not the identity


@pytest.mark.parametrize(
    ("wanted", "missing", "extra"),
    [
        (["wren", "finch", "robin", "jay"], ["jay"], ["tit"]),  # same count, another set
        (NAMES + ["jay"], ["jay"], []),
        (NAMES[:3], [], ["tit"]),
    ],
)
def test_another_set_of_classes_is_refused_naming_the_difference(tmp_path, wanted, missing, extra):
    path = tmp_path / "teacher.safetensors"
    save_model_weights(_teacher(), path, {"classes": NAMES})
    with pytest.raises(ClassListMismatch) as err:
        load_model_weights(build_model("convnet", len(wanted), 32, **TINY), path, classes=wanted)
    assert (err.value.missing, err.value.extra) == (missing, extra)
    for name in missing + extra:
        assert repr(name) in str(err.value)
    assert "teacher_weights_mode=backbone" in str(err.value)


def test_a_plain_state_dict_without_names_loads_with_a_warning(tmp_path):
    source = _teacher()
    path = tmp_path / "teacher.pt"
    torch.save(source.state_dict(), path)
    loaded = build_model("convnet", 4, 32, **TINY)
    outcome = load_model_weights(loaded, path, classes=NAMES)
    assert outcome.classes == "unnamed"
    assert [w["code"] for w in outcome.warnings] == [UNNAMED_CLASSES]
    assert "name no classes" in outcome.warnings[0]["message"]
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_bad_class_metadata_and_inconsistent_files_are_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_model_weights(_teacher(), bad, {"classes": "wren, finch"})
    with pytest.raises(ValueError, match="not a JSON list"):
        read_class_names(bad)
    short = tmp_path / "short.safetensors"  # names 3 classes, has 4 rows
    save_model_weights(_teacher(), short, {"classes": NAMES[:3]})
    with pytest.raises(ValueError, match="name 3 classes but have class rows of \\[4\\]"):
        load_model_weights(build_model("convnet", 3, 32, **TINY), short, classes=NAMES[:3])


# ---------------------------------------------------------------- backbone mode: any class list


def test_backbone_mode_takes_the_features_of_a_teacher_for_another_class_count(tmp_path):
    source = _teacher()
    path = tmp_path / "teacher.safetensors"
    save_model_weights(source, path, {"classes": NAMES})
    six = [f"class{i}" for i in range(6)]
    torch.manual_seed(5)
    fresh = build_model("convnet", 6, 32, **TINY)
    torch.manual_seed(5)
    loaded = build_model("convnet", 6, 32, **TINY)
    assert load_model_weights(loaded, path, mode="backbone", classes=six).classes == "dropped"
    own = source.backbone.state_dict()
    for key, value in loaded.backbone.state_dict().items():
        expected = fresh.backbone.state_dict()[key] if key.startswith("classifier") else own[key]
        assert torch.equal(value, expected), key
    for key, value in loaded.cal_head.state_dict().items():
        assert torch.equal(value, fresh.cal_head.state_dict()[key]), key
    with pytest.raises(ClassListMismatch):  # the same file in full mode
        load_model_weights(build_model("convnet", 6, 32, **TINY), path, classes=six)
    with pytest.raises(ValueError, match="unknown weights mode"):
        load_model_weights(loaded, path, mode="resume")


def test_the_mode_is_a_spec_field_with_two_values():
    assert JobSpec.model_json_schema()["properties"]["teacher_weights_mode"]["enum"] == ["full", "backbone"]
    assert resolve_spec({}).teacher_weights_mode == "full"
    with pytest.raises(ValidationError) as err:
        resolve_spec({"teacher_weights_mode": "resume"})
    assert err.value.errors()[0]["loc"] == ("teacher_weights_mode",)


def test_check_before_a_run_turns_problems_into_data_errors(tmp_path):
    path = tmp_path / "teacher.safetensors"
    save_model_weights(_teacher(), path, {"classes": NAMES})
    spec = resolve_spec(tiny_spec(model_width=16, num_attention_maps=2))
    with pytest.raises(DataError) as err:
        check_teacher_weights(spec, ["wren", "finch", "robin", "jay"], path)
    assert err.value.code == "teacher_classes_mismatch" and "'jay'" in err.value.message
    with pytest.raises(DataError) as err:
        check_teacher_weights(resolve_spec(tiny_spec(model_width=32, num_attention_maps=2)), NAMES, path)
    assert err.value.code == "bad_teacher_weights" and "wrong shape" in err.value.message
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a weights file")
    with pytest.raises(DataError) as err:
        check_teacher_weights(spec, NAMES, garbage)
    assert err.value.code == "bad_teacher_weights"
    backbone = resolve_spec(tiny_spec(model_width=16, num_attention_maps=2, teacher_weights_mode="backbone"))
    assert check_teacher_weights(backbone, [f"c{i}" for i in range(6)], path).classes == "dropped"


# ---------------------------------------------------------------- the
# pipeline, the CLI and the worker


class _ListSink:
    def __init__(self) -> None:
        self.events: list = []

    def write(self, update, events) -> None:
        self.events.extend(events)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One tiny run: its teacher.safetensors is the file the other runs start from."""
    return run(resolve_spec(tiny_spec()), TINY_DATA, tmp_path_factory.mktemp("first") / "run")


def test_the_saved_teacher_names_its_classes_in_order(first_run):
    meta = read_metadata(first_run.artifacts["teacher.safetensors"])
    assert json.loads(meta["classes"]) == first_run.report["dataset"]["classes"]
    assert (meta["backbone"], meta["image_size"], meta["model_width"]) == ("convnet", "32", "16")


def test_a_run_maps_a_teacher_saved_in_another_class_order(tmp_path, first_run):
    saved = first_run.artifacts["teacher.safetensors"]
    classes = json.loads(read_metadata(saved)["classes"])
    order = [3, 1, 0, 2]  # row j of the new file is row order[j] of the saved teacher
    state = load_file(str(saved))
    for key in ("backbone.classifier.weight", "backbone.classifier.bias", "cal_head.classifier.weight",
                "cal_head.prototypes"):
        state[key] = state[key][order]
    shuffled = tmp_path / "shuffled.safetensors"
    save_file(state, str(shuffled), metadata={"classes": json.dumps([classes[i] for i in order])})

    result = run(resolve_spec(tiny_spec(**FROZEN)), TINY_DATA, tmp_path / "run", teacher_weights=shuffled)
    assert result.report["teacher"]["initial_weights_load"] == {"mode": "full", "classes": "reordered"}
    assert result.report["warnings"] == []
    original, again = load_file(str(saved)), load_file(str(result.artifacts["teacher.safetensors"]))
    for key in ("backbone.classifier.weight", "backbone.classifier.bias", "cal_head.classifier.weight"):
        # back in the dataset's order
        torch.testing.assert_close(again[key], original[key], rtol=0, atol=1e-6)


def test_a_run_from_a_plain_state_dict_warns_in_its_events_and_report(tmp_path, first_run):
    plain = tmp_path / "teacher.pt"
    torch.save(load_file(str(first_run.artifacts["teacher.safetensors"])), plain)
    events: list[PipelineEvent] = []
    result = run(resolve_spec(tiny_spec(**FROZEN)), TINY_DATA, tmp_path / "run", events.append, teacher_weights=plain)
    warnings = [e for e in events if e.kind == "warning"]
    assert len(warnings) == 1 and "name no classes" in warnings[0].message
    assert [w["code"] for w in result.report["warnings"]] == [UNNAMED_CLASSES]
    assert result.report["teacher"]["initial_weights_load"]["classes"] == "unnamed"

    sink = _ListSink()  # the worker stores it at once as a job event of kind `warning`
    reporter = ProgressReporter(sink)
    for event in events:
        reporter(event)
    assert [(r.kind, r.message) for r in sink.events if r.kind == "warning"] == [("warning", warnings[0].message)]
    printer_out = io.StringIO()  # and a quiet CLI still prints it
    printer = ProgressPrinter(printer_out, quiet=True)
    for event in events:
        printer(event)
    assert printer_out.getvalue() == f"fd2: warning: {warnings[0].message}\n"


def test_a_run_with_another_class_list_fails_before_writing_anything(tmp_path):
    path = tmp_path / "teacher.safetensors"
    save_model_weights(build_model("convnet", 4, 32, cal=True, num_attention_maps=4, width=16), path,
                       {"classes": NAMES})
    with pytest.raises(DataError) as err:
        run(resolve_spec(tiny_spec()), TINY_DATA, tmp_path / "run", teacher_weights=path)
    assert err.value.code == "teacher_classes_mismatch" and "'wren'" in err.value.message
    assert not (tmp_path / "run").exists()

    out = tmp_path / "cli-out"
    res = subprocess.run(
        [sys.executable, "-m", "fd2_core", "distill", "--data", TINY_DATA, "--device", "cpu", "--out", str(out),
         "--teacher-weights", str(path), "--set", "model_width=16", "--set", "num_attention_maps=4"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fd2: error:"), res.stderr
    assert "another class list" in lines[0] and "'tit'" in lines[0] and "teacher_weights_mode=backbone" in lines[0]
    assert not out.exists()
