"""Every refusal of the library CLI exits 2 with one line naming the cause and the fix, and writes nothing.

`fd2 distill` checks spec, data, ipc against the smallest class, teacher weights, device and the work folder
before its first write, so a refused command leaves `--out` as it was and the corrected command can use the
same `--out`; `fd2 data fgsynth` checks its options and `--out` before generating anything.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_helpers import TINY_SPEC
from safetensors.torch import save_file

from fd2_core.cli import main
from fd2_core.rollback import OutputRollback

ROOT = Path(__file__).resolve().parents[2]
# The fastest settings of tests/support/pipeline_helpers.py as CLI options (preset, ipc and device have their own).
FAST = [arg for key, value in TINY_SPEC.items() if key not in ("preset", "ipc", "device")
        for arg in ("--set", f"{key}={value}")]


def _images(folder: Path, count: int, seed: int, prefix: str = "") -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        pixels = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{prefix}{index:04d}.png")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small generated inputs, one per kind of refusal."""
    base = tmp_path_factory.mktemp("inputs")
    tree = base / "tree"  # flat classes; 'b' keeps 2 training images once its seeded test image is carved
    _images(tree / "a", 6, seed=1)
    _images(tree / "b", 3, seed=2)
    phone = base / "phone"  # a phone export: every image at the root, none in a class folder
    _images(phone, 5, seed=3, prefix="IMG_")
    broken = base / "broken"
    for name in ("a", "b"):
        (broken / name).mkdir(parents=True)
        for index in range(3):
            (broken / name / f"{index}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    one = base / "one"
    _images(one / "only", 4, seed=4)
    (base / "empty").mkdir()
    not_weights = base / "teacher.pt"
    not_weights.write_bytes(b"these bytes are not weights")
    other_backbone = base / "other.safetensors"
    save_file({"backbone.not_a_layer.weight": torch.zeros(3)}, str(other_backbone))
    a_file = base / "a_file"
    a_file.write_text("not a folder")
    return {"tree": tree, "phone": phone, "broken": broken, "one": one, "empty": base / "empty",
            "missing": base / "missing", "not_weights": not_weights, "other_backbone": other_backbone,
            "a_file": a_file}


# name: (arguments, words of the cause, words of the fix)
REFUSALS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "ipc_larger_than_smallest_class": (["--data", "{tree}", "--ipc", "3"], ["ipc=3", "'b'", "2 train images"],
                                       ["lower ipc to at most 2"]),
    "unknown_spec_field": (["--data", "{tree}", "--set", "ipcc=1"], ["'ipcc'", "unknown field"],
                           ["did you mean 'ipc'"]),
    "bad_spec_value": (["--data", "{tree}", "--set", "image_size=big"], ["'image_size'", "integer"],
                       ["--set image_size="]),
    "contradicting_spec": (["--data", "{tree}", "--method", "sre2l++", "--set", "fc=true"], ["sre2l++"],
                           ["drop fc"]),
    "bad_set_syntax": (["--data", "{tree}", "--set", "ipc"], ["--set expects FIELD=VALUE"], ["image_size=64"]),
    "missing_data": (["--data", "{missing}"], ["not found"], ["check the path"]),
    "empty_data": (["--data", "{empty}"], ["no usable images"], ["one folder per class"]),
    "unreadable_data": (["--data", "{broken}"], ["no usable images", "skipped 6 files", "(e.g. 'a/0.png')"],
                        ["readable images"]),
    "images_outside_class_folders": (["--data", "{phone}"],
                                     ["5 not inside a class folder", "(e.g. 'IMG_0000.png')"],
                                     ["one folder per class: <class>/<image>"]),
    "one_class": (["--data", "{one}"], ["only one class ('only')"], ["at least two classes"]),
    "bad_builtin_data": (["--data", "fgsynth:classes=1"], ["num_classes"], ["[2, "]),
    "missing_teacher_weights": (["--data", "{tree}", "--teacher-weights", "{missing}"], ["not found"],
                                ["leave the teacher weights out"]),
    "teacher_weights_not_weights": (["--data", "{tree}", "--teacher-weights", "{not_weights}"],
                                    ["neither a safetensors file nor a torch state dict"], ["teacher.safetensors"]),
    "weights_mode_without_weights": (["--data", "{tree}", "--teacher-weights-mode", "backbone"],
                                     ["--teacher-weights-mode backbone", "none was given"],
                                     ["add --teacher-weights FILE"]),
    "teacher_weights_of_another_backbone": (["--data", "{tree}", "--teacher-weights", "{other_backbone}"],
                                            ["do not fit the backbone"], ["made for the same backbone"]),
}


def _argv(template: list[str], inputs: dict[str, Path]) -> list[str]:
    return [arg.format(**{k: str(v) for k, v in inputs.items()}) for arg in template]


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """The one stderr line of a command that must exit 2."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fd2: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _contents(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_refused_distill_names_cause_and_fix_and_writes_nothing(case, inputs, tmp_path, capsys):
    template, cause, fix = REFUSALS[case]
    out = tmp_path / "runs" / "x"  # a parent folder this command would have to create, too
    line = _refused(capsys, ["distill", *_argv(template, inputs), "--out", str(out), "--device", "cpu", "--quiet"])
    for words in (*cause, *fix):
        assert words in line, line
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_one_is_refused_before_writing(inputs, tmp_path, capsys):
    line = _refused(capsys, ["distill", "--data", str(inputs["tree"]), "--device", "cuda", "--out",
                             str(tmp_path / "run")])
    assert "no CUDA device" in line and "set device to cpu or auto" in line
    assert not (tmp_path / "run").exists()


def test_an_out_that_is_a_file_is_refused_and_left_alone(inputs, capsys):
    before = inputs["a_file"].read_bytes()
    line = _refused(capsys, ["distill", "--data", str(inputs["tree"]), "--out", str(inputs["a_file"])])
    assert "is a file" in line and "choose a work folder" in line
    assert inputs["a_file"].read_bytes() == before


def test_the_corrected_command_reuses_the_refused_out_and_an_earlier_run_is_never_touched(inputs, tmp_path, capsys):
    out = tmp_path / "run"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "fd2_core", "distill", "--data", str(inputs["tree"]), "--device", "cpu",
                   "--out", str(out), *FAST, *args]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)

    refused = cli("--ipc", "3")  # the smallest class keeps 2 training images
    assert refused.returncode == 2 and "lower ipc to at most 2" in refused.stderr
    assert not out.exists()
    corrected = cli("--ipc", "2")
    assert corrected.returncode == 0, corrected.stderr
    earlier = _contents(out)
    assert "artifacts/report.json" in earlier

    base = ["distill", "--data", str(inputs["tree"]), "--device", "cpu", "--out", str(out), "--quiet", *FAST]
    line = _refused(capsys, [*base, "--ipc", "3"])
    assert "holds a run with a different spec (ipc: 2 there, 3 now)" in line and "choose another work folder" in line
    for extra in (["--teacher-weights", str(inputs["not_weights"])], ["--set", "seed=x"]):
        _refused(capsys, [*base, "--ipc", "2", *extra])
    missing = ["distill", "--data", str(inputs["missing"]), "--out", str(out), "--ipc", "2", *FAST]
    assert "not found" in _refused(capsys, [*missing, "--device", "cpu"])
    assert _contents(out) == earlier

    assert main([*base, "--ipc", "2"]) == 0  # the earlier run, resumed: every stage is reused
    assert json.loads((out / "artifacts" / "report.json").read_text())["resumed"] is True


def test_a_refusal_found_after_writing_began_removes_what_the_run_wrote(inputs, tmp_path, capsys, monkeypatch):
    import fd2_core.pipeline

    def refuse(ctx, teacher):
        raise ValueError("a stage refused its input; change it")

    monkeypatch.setattr(fd2_core.pipeline, "distill", refuse)  # fails after pretraining wrote the teacher
    out = tmp_path / "new" / "run"
    line = _refused(capsys, ["distill", "--data", str(inputs["tree"]), "--device", "cpu", "--out", str(out),
                             "--quiet", *FAST])
    assert "a stage refused its input" in line
    assert not (tmp_path / "new").exists()


def test_rollback_removes_only_what_appeared_after_the_snapshot(tmp_path):
    out = tmp_path / "run"
    (out / "stages").mkdir(parents=True)
    (out / "spec.json").write_text("{}")
    (out / "stages" / "teacher.safetensors").write_bytes(b"earlier")
    rollback = OutputRollback(out)
    (out / "stages" / "distill").mkdir()
    (out / "stages" / "distill" / "ipc_000.safetensors").write_bytes(b"new")
    (out / "stages" / "relabel.safetensors").write_bytes(b"new")
    (out / "artifacts").mkdir()
    rollback.undo()
    assert _contents(out) == {"spec.json": hashlib.sha256(b"{}").hexdigest(), "stages": "dir",
                              "stages/teacher.safetensors": hashlib.sha256(b"earlier").hexdigest()}

    fresh = tmp_path / "a" / "b" / "run"
    rollback = OutputRollback(fresh)
    fresh.mkdir(parents=True)
    (fresh / "spec.json").write_text("{}")
    rollback.undo()
    assert not (tmp_path / "a").exists() and out.is_dir()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--classes", "1"], ["--classes must be in [2,", "change that option"]),
        (["--variant", "owls"], ["'owls'", "choose one of"]),
        (["--train", "0"], ["--train must be >= 1"]),
    ],
)
def test_fgsynth_options_are_refused_before_anything_is_written(args, words, tmp_path, capsys):
    out = tmp_path / "data" / "birds"
    line = _refused(capsys, ["data", "fgsynth", "--out", str(out), *args])
    assert all(w in line for w in words), line
    assert not (tmp_path / "data").exists()


def test_fgsynth_refuses_an_out_it_would_overwrite_or_cannot_create(tmp_path, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    line = _refused(capsys, ["data", "fgsynth", "--out", str(used), "--classes", "2", "--train", "1", "--test", "0"])
    assert "is not an empty folder" in line and "choose a new --out" in line
    line = _refused(capsys, ["data", "fgsynth", "--zip", "--out", str(used)])
    assert "is a folder" in line and "fgsynth.zip" in line
    assert _contents(used) == {"keep.txt": hashlib.sha256(b"mine").hexdigest()}
    line = _refused(capsys, ["data", "fgsynth", "--out", str(used / "keep.txt" / "birds")])
    assert "which is a file" in line and "choose another --out" in line

    done = main(["data", "fgsynth", "--out", str(tmp_path / "fresh"), "--classes", "2", "--train", "1", "--test", "0"])
    assert done == 0 and len(list((tmp_path / "fresh").rglob("*.png"))) == 2


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["keys", "create", "   "], ["tenant name must not be empty", "fd2 keys create acme"]),
        (["keys", "revoke", "not-a-key"], ["neither a key nor a key prefix", "fd2 keys list"]),
    ],
)
def test_service_commands_refuse_bad_arguments_before_creating_the_home(argv, words, tmp_path, capsys, monkeypatch):
    from fd2_cli.main import main as fd2_main

    monkeypatch.delenv("FD2_HOME", raising=False)
    home = tmp_path / "home"
    assert fd2_main([*argv, "--home", str(home)]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not home.exists()


def test_service_commands_refuse_a_home_that_is_a_file_and_a_port_out_of_range(tmp_path, capsys, monkeypatch):
    from fd2_cli.main import build_parser
    from fd2_cli.main import main as fd2_main

    monkeypatch.delenv("FD2_HOME", raising=False)
    home = tmp_path / "home"
    home.write_text("a file")
    assert fd2_main(["migrate", "--home", str(home)]) == 2
    assert "is a file" in capsys.readouterr().err and home.read_text() == "a file"
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--port", "70000"])
    assert exited.value.code == 2 and "from 1 to 65535" in capsys.readouterr().err
