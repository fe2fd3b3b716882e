"""End-to-end pipeline runs on tiny data: every method, artifacts, switches, hooks, determinism."""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile

import pytest
import torch
from PIL import Image
from pipeline_helpers import TINY_DATA, tiny_spec
from safetensors import safe_open

from fd2_core.data.dataset import load_dataset
from fd2_core.data.errors import DataError
from fd2_core.pipeline import ARTIFACT_NAMES, run
from fd2_core.spec_resolution import resolve_spec


@pytest.fixture(scope="module")
def tiny_data():
    return load_dataset(TINY_DATA, 32, seed=0)


def _check_artifacts(result, spec_raw, num_classes):
    paths = result.artifacts
    assert set(paths) == set(ARTIFACT_NAMES)
    ipc = spec_raw["ipc"]
    with tarfile.open(paths["distilled.tar.gz"], "r:gz") as tar:
        names = tar.getnames()
        pngs = [n for n in names if n.endswith(".png")]
        assert len(pngs) == ipc * num_classes
        assert all(n.startswith("images/") for n in pngs)
        rows = list(csv.DictReader(io.StringIO(tar.extractfile("labels.csv").read().decode())))
        manifest = json.loads(tar.extractfile("manifest.json").read())
        assert sorted(r["file"] for r in rows) == sorted(pngs)
        assert set(manifest["files"]) == set(pngs)
        pngs_bytes = sum(len(tar.extractfile(name).read()) for name in pngs)
        first = Image.open(io.BytesIO(tar.extractfile(pngs[0]).read()))
        assert first.size == (32, 32) and first.mode == "RGB"
    with safe_open(str(paths["soft_labels.safetensors"]), "pt") as fh:
        meta = fh.metadata()
        assert meta["format"] == "fd2.soft_labels.v5"
        protocol = (meta["soft_label_source"], meta["relabel_bn_mode"], meta["forward_splits"])
        assert protocol == ("backbone", "train", "2")
        logits = fh.get_tensor("logits")
        assert logits.dtype == torch.float16
        assert logits.shape == (spec_raw["relabel_epochs"], ipc * num_classes, num_classes)
    with safe_open(str(paths["teacher.safetensors"]), "pt") as fh:
        assert json.loads(fh.metadata()["classes"]) == manifest["dataset"]["classes"]
    report = json.loads(paths["report.json"].read_text())
    assert report["method"] == spec_raw.get("method", "fd2")
    for stage in ("pretrain", "distill", "relabel", "evaluate", "package"):
        assert stage in report["timings_s"]
    assert 0.0 <= report["metrics"]["student_accuracy"] <= 1.0
    assert 0.0 <= report["metrics"]["random_baseline_accuracy"] <= 1.0
    assert report["versions"]["torch"] == torch.__version__
    Image.open(paths["preview.png"]).verify()
    _check_storage(result, report, pngs_bytes)


def _check_storage(result, report, pngs_bytes):
    """report.json → storage: the download (images + soft labels) against the real data, and
    the same figures in the job's metrics."""
    storage = report["storage"]
    paths = result.artifacts
    assert storage["distilled_images_bytes"] == pngs_bytes
    assert storage["distilled_archive_bytes"] == os.path.getsize(paths["distilled.tar.gz"])
    assert storage["soft_labels_kind"] == "stored"
    assert storage["soft_labels_bytes"] == os.path.getsize(paths["soft_labels.safetensors"])
    assert storage["teacher_bytes"] == os.path.getsize(paths["teacher.safetensors"])
    assert storage["compressed_bytes"] == storage["distilled_images_bytes"] + storage["soft_labels_bytes"]
    assert storage["compression_ratio"] == storage["real_data_bytes"] / storage["compressed_bytes"]
    assert storage["compression_ratio_formula"] == "real_data_bytes / (distilled_images_bytes + soft_labels_bytes)"
    flat = {k: v for k, v in storage.items() if k not in ("compression_ratio_formula", "distilled_archive_bytes")}
    assert report["metrics"].items() >= flat.items() and result.metrics == report["metrics"]


@pytest.mark.parametrize("method", ["fd2", "sre2l++", "rded", "random"])
def test_every_method_runs_end_to_end(tmp_path, tiny_data, method):
    raw = tiny_spec(method=method)
    events = []
    result = run(resolve_spec(raw), tiny_data, tmp_path / "run", on_event=events.append)
    _check_artifacts(result, raw, len(tiny_data.classes))
    # built-in data has no files: its real size is the decoded pixels S²·3·N
    storage = result.report["storage"]
    assert storage["real_data_kind"] == "decoded pixels (built-in data: S²·3·N)"
    assert storage["real_data_bytes"] == 32 * 32 * 3 * len(tiny_data.train_labels)
    stages = [e.stage for e in events if e.kind == "stage_start"]
    assert stages == ["pretrain", "distill", "relabel", "evaluate", "package"]
    progress = [e.progress for e in events]
    assert progress == sorted(progress) and progress[-1] == pytest.approx(1.0)


def test_fd2_teacher_has_cal_head_and_prototypes_base_recipe_does_not(tmp_path, tiny_data):
    fd2 = run(resolve_spec(tiny_spec()), tiny_data, tmp_path / "fd2")
    base = run(resolve_spec(tiny_spec(method="sre2l++")), tiny_data, tmp_path / "base")
    with safe_open(str(fd2.artifacts["teacher.safetensors"]), "pt") as fh:
        keys = set(fh.keys())
        assert "cal_head.prototypes" in keys
        assert fh.get_tensor("cal_head.prototypes").abs().sum() > 0
    with safe_open(str(base.artifacts["teacher.safetensors"]), "pt") as fh:
        assert not any(k.startswith("cal_head") for k in fh.keys())


def _safetensors_content(path):
    with safe_open(str(path), "pt") as fh:
        return fh.metadata(), {k: fh.get_tensor(k).numpy().tobytes() for k in fh.keys()}


def test_same_seed_gives_identical_distilled_images_on_cpu(tmp_path, tiny_data):
    raw = tiny_spec(ipc=2)
    a = run(resolve_spec(raw), tiny_data, tmp_path / "a")
    b = run(resolve_spec(raw), tiny_data, tmp_path / "b")
    assert a.artifacts["distilled.tar.gz"].read_bytes() == b.artifacts["distilled.tar.gz"].read_bytes()
    for name in ("soft_labels.safetensors", "teacher.safetensors"):
        # safetensors writes its metadata map in no fixed order: compare contents, not bytes
        assert _safetensors_content(a.artifacts[name]) == _safetensors_content(b.artifacts[name]), name
    c = run(resolve_spec({**raw, "seed": 1}), tiny_data, tmp_path / "c")
    assert a.artifacts["distilled.tar.gz"].read_bytes() != c.artifacts["distilled.tar.gz"].read_bytes()


def test_rerun_in_the_same_workdir_reuses_every_stage(tmp_path, tiny_data):
    raw = tiny_spec()
    first = run(resolve_spec(raw), tiny_data, tmp_path / "run")
    events = []
    second = run(resolve_spec(raw), tiny_data, tmp_path / "run", on_event=events.append)
    assert second.report["resumed"] is True
    reuse_messages = [e.message for e in events if "reus" in e.message]
    assert len(reuse_messages) >= 4  # teacher, ipc index, soft labels, evaluation
    assert first.artifacts["distilled.tar.gz"].read_bytes() == second.artifacts["distilled.tar.gz"].read_bytes()


def test_a_different_spec_in_a_used_workdir_is_refused(tmp_path, tiny_data):
    run(resolve_spec(tiny_spec()), tiny_data, tmp_path / "run")
    with pytest.raises(DataError) as err:
        run(resolve_spec(tiny_spec(seed=5)), tiny_data, tmp_path / "run")
    assert err.value.code == "workdir_conflict"


def test_ipc_larger_than_smallest_class_is_rejected_before_any_stage(tmp_path, tiny_data):
    events = []
    with pytest.raises(DataError) as err:
        run(resolve_spec(tiny_spec(ipc=50)), tiny_data, tmp_path / "run", on_event=events.append)
    assert err.value.code == "ipc_too_large"
    assert events == []


def test_stop_request_raises_and_keeps_finished_stages(tmp_path, tiny_data):
    from fd2_core.progress import StopRequested

    seen = []

    def should_stop():
        return any(e.stage == "distill" for e in seen)

    with pytest.raises(StopRequested):
        run(resolve_spec(tiny_spec(distill_iterations=200)), tiny_data, tmp_path / "run", seen.append, should_stop)
    assert (tmp_path / "run" / "stages" / "teacher.safetensors").exists()
    assert not (tmp_path / "run" / "artifacts" / "report.json").exists()


def test_the_teacher_can_start_from_a_local_weights_file(tmp_path, tiny_data):
    import hashlib

    first = run(resolve_spec(tiny_spec()), tiny_data, tmp_path / "a")
    weights = first.artifacts["teacher.safetensors"]
    # a vanishing learning rate: the second teacher must keep the loaded weights
    raw = tiny_spec(pretrain_lr=1e-9, pretrain_weight_decay=0.0)
    second = run(resolve_spec(raw), tiny_data, tmp_path / "b", teacher_weights=weights)
    a = _safetensors_content(weights)[1]
    b = _safetensors_content(second.artifacts["teacher.safetensors"])[1]
    conv = [k for k in a if k.endswith("weight") and "bn" not in k and "classifier" not in k]
    assert conv
    for key in conv:
        assert torch.allclose(
            torch.frombuffer(bytearray(a[key]), dtype=torch.float32),
            torch.frombuffer(bytearray(b[key]), dtype=torch.float32),
            atol=1e-6,
        ), key
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert second.report["teacher"]["initial_weights"] == sha

    with pytest.raises(DataError) as err:  # a resumed run must name the same file
        run(resolve_spec(raw), tiny_data, tmp_path / "b")
    assert err.value.code == "workdir_conflict"
    with pytest.raises(DataError):
        run(resolve_spec(raw), tiny_data, tmp_path / "c", teacher_weights=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="backbone"):
        run(resolve_spec(tiny_spec(backbone="resnet18")), tiny_data, tmp_path / "d", teacher_weights=weights)


def test_loading_a_folder_reports_progress_and_honours_a_stop(tmp_path):
    from fd2_core.data.fgsynth import write_fgsynth
    from fd2_core.progress import StopRequested

    folder = write_fgsynth(tmp_path / "data", "folder", num_classes=3, train_per_class=8, test_per_class=2)
    events = []
    with pytest.raises(StopRequested):
        run(resolve_spec(tiny_spec()), folder, tmp_path / "stopped", events.append, should_stop=lambda: True)
    assert not (tmp_path / "stopped" / "stages").exists()

    result = run(resolve_spec(tiny_spec()), folder, tmp_path / "run", events.append)
    loading = [e for e in events if e.message.startswith("loading data")]
    assert loading and loading[-1].message == "loading data: 30/30 images"
    assert all(e.stage == "pretrain" and e.progress == 0.0 for e in loading)
    # files on disk: the real data is the train files as stored
    storage = result.report["storage"]
    assert storage["real_data_kind"] == "encoded files"
    assert storage["real_data_bytes"] == sum(p.stat().st_size for p in (folder / "train").rglob("*.png"))
    assert storage["compression_ratio"] == storage["real_data_bytes"] / storage["compressed_bytes"]
