"""A run killed mid-distill resumes from its last finished ipc index;
the CLI answers bad input cleanly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pipeline_helpers import TINY_DATA, tiny_spec
from safetensors import safe_open
from safetensors.torch import load_file

from fd2_core.pipeline import run

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fd2_core", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def _set_args(spec: dict) -> list[str]:
    out = []
    for key, value in spec.items():
        if key in ("preset", "ipc", "method", "seed", "device"):
            continue
        out += ["--set", f"{key}={value}"]
    return out


def test_killed_run_resumes_from_the_last_finished_ipc_index(tmp_path):
    spec = tiny_spec(ipc=3, distill_iterations=60)

    def command(workdir: Path) -> list[str]:
        return [sys.executable, "-m", "fd2_core", "distill", "--data", TINY_DATA, "--ipc", "3", "--device", "cpu",
                "--out", str(workdir), *_set_args(spec)]

    workdir = tmp_path / "killed"
    proc = subprocess.Popen(command(workdir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # index 0 of the one class block: the distill stage's first unit saves it before the merge
    first = workdir / "stages" / "distill" / "ipc_000_c00000.safetensors"
    deadline = time.monotonic() + 240
    while not first.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the run never finished its first ipc index"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (workdir / "artifacts" / "report.json").exists()
    saved = load_file(first)

    # resume and a fresh uninterrupted run both in their own process,
    # so both use the same thread count
    resumed = subprocess.run(command(workdir), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "ipc index 0 already distilled" in resumed.stderr
    assert "pretrain already finished" in resumed.stderr
    merged = load_file(workdir / "stages" / "distill" / "ipc_000.safetensors")
    assert torch.equal(merged["images"], saved["images"]) and torch.equal(merged["init"], saved["init"])
    report = json.loads((workdir / "artifacts" / "report.json").read_text())
    assert report["resumed"] is True

    fresh = subprocess.run(command(tmp_path / "fresh"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    tar = "artifacts/distilled.tar.gz"
    assert (workdir / tar).read_bytes() == (tmp_path / "fresh" / tar).read_bytes()


def safetensors_content(path: Path) -> tuple[dict, dict]:
    """A safetensors file's metadata and tensors; the header's key order varies from one write to
    the next."""
    with safe_open(path, "pt") as handle:
        return handle.metadata(), {key: handle.get_tensor(key).tolist() for key in sorted(handle.keys())}


def test_a_folder_of_an_earlier_version_resumes_without_recomputing(tmp_path):
    """An earlier version saved each finished ipc index of every class as one merged file,
    with no block files.

    Such a folder, killed after index 0, resumes from that file (sliced into the class block) and
    ends with the files of an uninterrupted run.
    """
    spec = tiny_spec(ipc=2)
    finished = tmp_path / "finished"
    run(spec, TINY_DATA, finished)
    earlier = tmp_path / "earlier"
    shutil.copytree(finished, earlier)
    stages = earlier / "stages"
    (stages / "distill" / "ipc_001.safetensors").unlink()
    assert not list((stages / "distill").glob("ipc_*_c*.safetensors"))
    for later in [stages / "soft_labels.safetensors", *stages.glob("evaluate*"), *stages.glob("baseline_*")]:
        later.unlink()
    shutil.rmtree(earlier / "artifacts")
    index0 = stages / "distill" / "ipc_000.safetensors"
    before = (index0.read_bytes(), index0.stat().st_mtime_ns)

    events: list = []
    run(spec, TINY_DATA, earlier, on_event=events.append)
    messages = [e.message for e in events]
    assert "ipc index 0 already distilled; reusing it" in messages
    assert (index0.read_bytes(), index0.stat().st_mtime_ns) == before
    for name in ("distilled.tar.gz",):  # its labels.csv and images included
        assert (earlier / "artifacts" / name).read_bytes() == (finished / "artifacts" / name).read_bytes(), name
    for name in ("soft_labels.safetensors", "teacher.safetensors"):
        assert safetensors_content(earlier / "artifacts" / name) == safetensors_content(finished / "artifacts" / name)
    assert [e.stage for e in events if e.kind == "stage_start"] == [e.stage for e in events if e.kind == "stage_end"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--data", "/nonexistent/folder"], "not"),
        (["--data", TINY_DATA, "--ipc", "500"], "ipc"),
        (["--data", TINY_DATA, "--set", "backbone=vgg11"], "backbone"),
        (["--data", TINY_DATA, "--set", "no_such_field=1"], "no_such_field"),
        (["--data", TINY_DATA, "--method", "sre2l++", "--set", "fc=true"], "fc"),
        (["--data", TINY_DATA, "--teacher-weights", "/nonexistent/teacher.safetensors"], "not found"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, args, needle):
    res = _cli("distill", *args, "--out", str(tmp_path / "out"), "--device", "cpu")
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("fd2: error:") and needle in lines[0]
    assert "Traceback" not in res.stderr


def test_cli_one_class_folder_is_rejected(tmp_path):
    from PIL import Image

    for i in range(3):
        folder = tmp_path / "data" / "only_class"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
    res = _cli("distill", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"))
    assert res.returncode == 2
    assert "class" in res.stderr and "Traceback" not in res.stderr


def test_cli_distill_prints_a_summary_and_writes_artifacts(tmp_path):
    spec = tiny_spec()
    res = _cli("distill", "--data", TINY_DATA, "--device", "cpu", "--out", str(tmp_path / "o"), *_set_args(spec))
    assert res.returncode == 0, res.stderr
    assert "student (distilled set)" in res.stdout and "teacher accuracy" in res.stdout
    for stage in ("pretrain", "distill", "relabel", "evaluate"):
        assert stage in res.stderr
    assert (tmp_path / "o" / "artifacts" / "report.json").exists()


def test_cli_writes_the_builtin_dataset_as_zip(tmp_path):
    res = _cli("data", "fgsynth", "--out", str(tmp_path / "fg.zip"), "--zip", "--classes", "3", "--train", "4",
               "--test", "2")
    assert res.returncode == 0, res.stderr
    import zipfile

    with zipfile.ZipFile(res.stdout.strip()) as zf:
        pngs = [n for n in zf.namelist() if n.endswith(".png")]
    assert len(pngs) == 3 * (4 + 2)
