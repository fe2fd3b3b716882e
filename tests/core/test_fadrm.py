"""FADRM+ (alone and as the base of FD²): the phase schedule and the data residual against plain
references, spec rules, cost model, and tiny end-to-end runs through the pipeline, the CLI and the
API, with a resume after an interruption between phases."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from api_helpers import client, new_tenant, ready_dataset, settings, submit  # noqa: F401  (fixtures)
from fastapi.testclient import TestClient
from pipeline_helpers import TINY_DATA, tiny_spec

import fd2_core.stages.fadrm_phases as fadrm_phases
from fd2_core.atomic import load_tensors
from fd2_core.cost import DatasetSize, patch_scoring_passes, stage_image_passes
from fd2_core.data.dataset import load_dataset
from fd2_core.fadrm import cosine_lr, phase_schedule, phase_sizes, total_steps
from fd2_core.pipeline import run
from fd2_core.spec import ValidationError
from fd2_core.spec_compat import IMPLIED_BEFORE_ADDED, spec_changes
from fd2_core.spec_errors import describe_spec_error
from fd2_core.spec_resolution import resolve_spec
from fd2_core.stages.fadrm_phases import residual_blend, resize_images
from fd2_core.stages.synthesis import StepModel, step_model

ROOT = Path(__file__).resolve().parents[2]
CUB_LIKE = DatasetSize(num_classes=200, train_images=5994, test_images=5794)
PHASES = [2, 2, 3]  # three short phases: at 32 px their sides are 32, 29, 32 (ending at image_size)


@pytest.fixture(scope="module")
def tiny_data():
    return load_dataset(TINY_DATA, 32, seed=0)  # 4 classes × 16 train images


def _ipc_file(workdir: Path, j: int) -> dict[str, torch.Tensor]:
    return load_tensors(workdir / "stages" / "distill" / f"ipc_{j:03d}.safetensors")


# --- the phase schedule and the residual blend against plain references ---------------------------


@pytest.mark.parametrize(("raw", "sizes"), [
    ({"method": "fadrm+", "preset": "paper-cub"}, [200, 224, 200, 224]),
    ({"method": "fd2", "base": "fadrm+", "preset": "paper-cars"}, [200, 224, 200, 224]),
    ({"method": "fadrm+"}, [29, 32, 29, 32]),
    ({"method": "fadrm+", "fadrm_phase_steps": [5, 6, 7]}, [32, 29, 32]),
    ({"method": "fadrm+", "image_size": 64, "fadrm_phase_steps": [5, 6]}, [57, 64]),
    ({"method": "fadrm+", "fadrm_phase_steps": [1, 2], "fadrm_phase_sizes": [24, 32]}, [24, 32]),
])
def test_phase_schedule_equals_a_hand_written_loop(raw: dict, sizes: list[int]) -> None:
    spec = resolve_spec(raw)
    assert phase_sizes(spec) == sizes
    # the plain reference: sizes as given, each phase starting where the last ended
    expected, first = [], 0
    for size, steps in zip(sizes, spec.fadrm_phase_steps, strict=True):
        expected.append((size, steps, first))
        first += steps
    assert [tuple(p) for p in phase_schedule(spec)] == expected
    assert total_steps(spec) == first


def test_published_phases_and_one_cosine_over_all_of_them() -> None:
    spec = resolve_spec({"method": "fd2", "base": "fadrm+", "preset": "paper-aircraft"})
    assert [(p.size, p.steps) for p in phase_schedule(spec)] == [(200, 1500), (224, 1500), (200, 1500), (224, 2000)]
    small = resolve_spec({"method": "fadrm+", "fadrm_phase_steps": [3, 4, 5], "distill_lr": 0.1})
    lrs, t, total = [], 0, 12  # reference: one cosine over the global step count, phases ignored
    for steps in (3, 4, 5):
        for _ in range(steps):
            lrs.append(0.05 * (1.0 + math.cos(math.pi * t / total)))
            t += 1
    got = [cosine_lr(small.distill_lr, p.first_step + i, total_steps(small))
           for p in phase_schedule(small) for i in range(p.steps)]
    assert got == pytest.approx(lrs, rel=1e-12)
    # no warm restart at a phase start
    assert all(a > b for a, b in zip(got, got[1:], strict=False))


def _bilinear_reference(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize by hand (half-pixel centres, edges clamped), one output pixel at a time."""
    n, c, h, w = x.shape
    out = torch.zeros(n, c, size, size, dtype=torch.float64)

    def taps(i: int, src_len: int) -> tuple[int, int, float]:
        s = max((i + 0.5) * src_len / size - 0.5, 0.0)
        lo = min(int(math.floor(s)), src_len - 1)
        return lo, min(lo + 1, src_len - 1), s - lo

    for i in range(size):
        y0, y1, wy = taps(i, h)
        for j in range(size):
            x0, x1, wx = taps(j, w)
            top = (1 - wx) * x[:, :, y0, x0].double() + wx * x[:, :, y0, x1].double()
            bottom = (1 - wx) * x[:, :, y1, x0].double() + wx * x[:, :, y1, x1].double()
            out[:, :, i, j] = (1 - wy) * top + wy * bottom
    return out


@pytest.mark.parametrize(("side", "size"), [(7, 5), (5, 7), (6, 6)])
def test_resize_and_residual_blend_equal_a_per_pixel_loop(side: int, size: int) -> None:
    g = torch.Generator().manual_seed(3)
    patch = torch.randn(2, 3, side, side, generator=g)
    x = torch.randn(2, 3, size, size, generator=g)
    resized = _bilinear_reference(patch, size)
    assert torch.allclose(resize_images(patch, size).double(), resized, atol=1e-5)
    for alpha in (0.0, 0.5, 0.8, 1.0):
        blended = residual_blend(x, patch, alpha)
        expected = torch.zeros_like(resized)
        for index in range(x.numel()):  # x ← α·x + (1−α)·patch, element by element
            n, rest = divmod(index, 3 * size * size)
            ch, rest = divmod(rest, size * size)
            i, j = divmod(rest, size)
            expected[n, ch, i, j] = alpha * float(x[n, ch, i, j]) + (1 - alpha) * float(resized[n, ch, i, j])
        assert blended.shape == x.shape and torch.allclose(blended.double(), expected, atol=1e-5), alpha
    assert torch.equal(residual_blend(x, patch, 1.0), x)


def test_the_model_of_a_step_is_an_argument_taken_round_robin() -> None:
    models = [StepModel(name, None, None, 32) for name in ("a", "b", "c")]  # type: ignore[arg-type]
    assert [step_model(models, t).teacher for t in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]
    assert {step_model(models[:1], t).teacher for t in range(5)} == {"a"}


# --- spec and cost --------------------------------------------------------------------------------


def test_fadrm_names_and_existing_specs_keep_their_meaning() -> None:
    plain = resolve_spec({"method": "fadrm+"})
    assert plain.base is None and plain.recipe == "fadrm+" and plain.optimises_images
    assert not (plain.cal or plain.fc or plain.sc)
    fd2 = resolve_spec({"base": "fadrm+"})
    assert fd2.method == "fd2" and fd2.recipe == "fadrm+" and fd2.uses_fc and fd2.uses_sc
    assert resolve_spec({}).recipe == "sre2l++" and resolve_spec({"method": "sre2l++"}).recipe == "sre2l++"
    assert resolve_spec({"method": "rded"}).recipe is None and not resolve_spec({"method": "random"}).optimises_images
    assert plain.fadrm_phase_steps == [60, 60, 60, 80] and plain.fadrm_alpha == 0.5
    # a stored spec that predates the FADRM+ fields still matches under every preset (the data-path
    # fields came later and changed the paper presets: tests/core/test_data_path_spec.py)
    data_path = {"distill_crop", "patch_rule", "synthetic_format", "pretrain_lr_decay_mode"}
    for preset in ("cpu-small", "paper-cub"):
        resolved = resolve_spec({"preset": preset}).model_dump(mode="json")
        earlier = {k: v for k, v in resolved.items() if k not in set(IMPLIED_BEFORE_ADDED) - data_path}
        assert spec_changes(earlier, resolved) == [], preset
    changed = resolve_spec({"fadrm_phase_steps": [1, 2]}).model_dump(mode="json")
    assert spec_changes({k: v for k, v in changed.items() if not k.startswith("fadrm")}, changed) == [
        "fadrm_phase_steps"]


@pytest.mark.parametrize(("raw", "words"), [
    ({"method": "fadrm+", "cal": True}, ["'fadrm+' runs without FD² parts", "drop cal"]),
    ({"method": "fadrm+", "base": "fadrm+"}, ["recipe of its own", "drop base", "method fd2"]),
    ({"base": "fadrm+", "fadrm_phase_sizes": [29, 32]}, ["2 phases", "has 4", "one size per phase"]),
    ({"method": "fadrm+", "fadrm_phase_steps": [2, 2], "fadrm_phase_sizes": [32, 29]}, ["end at it", "null"]),
    ({"method": "fadrm+", "fadrm_phase_steps": [2, 2], "fadrm_phase_sizes": [48, 32]}, ["at most image_size"]),
    ({"method": "fadrm+", "fadrm_phase_steps": [0, 2]}, ["greater than or equal to 1"]),
    ({"method": "fadrm+", "fadrm_phase_steps": []}, ["at least 1"]),
    ({"method": "fadrm+", "fadrm_alpha": 1.5}, ["less than or equal to 1"]),
])
def test_contradictions_are_refused_with_cause_and_fix(raw: dict, words: list[str]) -> None:
    with pytest.raises(ValidationError) as err:
        resolve_spec(raw)
    message = describe_spec_error(err.value.errors()[0])
    for word in words:
        assert word in message, message


def test_cost_counts_every_phase_at_its_pixels() -> None:
    paper = resolve_spec({"method": "fadrm+", "preset": "paper-cub", "ipc": 3})
    steps = 1500 * (200 / 224) ** 2 + 1500 + 1500 * (200 / 224) ** 2 + 2000
    expected = 3 * 200 * steps * 3 + patch_scoring_passes(paper, CUB_LIKE)
    assert stage_image_passes(paper, CUB_LIKE)["distill"] == pytest.approx(expected, rel=1e-12)
    fd2 = resolve_spec({"base": "fadrm+", "preset": "paper-cub", "ipc": 3})
    assert stage_image_passes(fd2, CUB_LIKE)["distill"] == pytest.approx(expected, rel=1e-12)
    # the convnet's classifier takes image_size only: every phase is seen through an image_size crop
    small = resolve_spec({"method": "fadrm+", "ipc": 2, "init": "gaussian"})
    assert stage_image_passes(small, CUB_LIKE)["distill"] == 2 * 200 * 260 * 3
    more = resolve_spec({"method": "fadrm+", "ipc": 2, "init": "gaussian", "fadrm_phase_steps": [100, 200]})
    assert stage_image_passes(more, CUB_LIKE)["distill"] == 2 * 200 * 300 * 3


# --- pipeline -------------------------------------------------------------------------------------


def _spy_phases(monkeypatch) -> list[tuple[int, int, int]]:
    """Record (image side, first step, steps) of every phase that runs, then run it as usual."""
    seen: list[tuple[int, int, int]] = []
    original = fadrm_phases.run_phase

    def spy(ctx, models, x, y, phase, g, total, on_step):
        seen.append((x.shape[-1], phase.first_step, phase.steps))
        assert all(m.input_side == 32 for m in models)  # the convnet sees image_size crops
        return original(ctx, models, x, y, phase, g, total, on_step)

    monkeypatch.setattr(fadrm_phases, "run_phase", spy)
    return seen


@pytest.mark.parametrize("raw", [
    {"method": "fadrm+"},
    {"method": "fd2", "base": "fadrm+", "sc": True},
])
def test_fadrm_runs_end_to_end_in_phases(tmp_path, tiny_data, monkeypatch, raw) -> None:
    seen = _spy_phases(monkeypatch)
    result = run(tiny_spec(ipc=2, fadrm_phase_steps=PHASES, **raw), tiny_data, tmp_path / "run")
    # both ipc indices, every phase at its side
    assert seen == [(32, 0, 2), (29, 2, 2), (32, 4, 3)] * 2
    for j in range(2):
        saved = _ipc_file(tmp_path / "run", j)
        assert saved["images"].shape == saved["init"].shape == (4, 3, 32, 32)
        assert not torch.equal(saved["images"], saved["init"])
    # superseded
    assert not list((tmp_path / "run" / "stages" / "distill").glob("*_phase.safetensors"))
    report = result.report
    assert report["method"] == raw["method"] and report["spec"]["base"] == raw.get("base")
    assert report["spec"]["fadrm_phase_steps"] == PHASES
    assert 0.0 <= report["metrics"]["student_accuracy"] <= 1.0


def test_a_run_interrupted_between_phases_resumes_to_the_same_images(tmp_path, tiny_data, monkeypatch) -> None:
    raw = tiny_spec(method="fd2", base="fadrm+", ipc=2, fadrm_phase_steps=PHASES, evaluate=False)
    run(raw, tiny_data, tmp_path / "whole")
    calls = []
    original = fadrm_phases.run_phase

    def killed_in_third_phase_of_index_1(ctx, models, x, y, phase, g, total, on_step):
        calls.append(phase.first_step)
        if len(calls) == 6:
            raise KeyboardInterrupt("killed")
        return original(ctx, models, x, y, phase, g, total, on_step)

    monkeypatch.setattr(fadrm_phases, "run_phase", killed_in_third_phase_of_index_1)
    with pytest.raises(KeyboardInterrupt):
        run(raw, tiny_data, tmp_path / "cut")
    monkeypatch.undo()
    stage = tmp_path / "cut" / "stages" / "distill"
    # index 0 of the one class block is saved; index 1 stopped in its third phase
    assert (stage / "ipc_000_c00000.safetensors").exists() and not (stage / "ipc_001_c00000.safetensors").exists()
    checkpoint = load_tensors(stage / "ipc_001_c00000_phase.safetensors")
    assert int(checkpoint["phase"]) == 1 and checkpoint["images"].shape[-1] == 29
    seen = _spy_phases(monkeypatch)
    events = []
    again = run(raw, tiny_data, tmp_path / "cut", on_event=events.append)
    assert seen == [(32, 4, 3)]  # only the unfinished phase ran
    assert any("phases 1-2 already done; resuming" in e.message for e in events)
    for j in range(2):
        whole, cut = _ipc_file(tmp_path / "whole", j), _ipc_file(tmp_path / "cut", j)
        assert torch.equal(whole["images"], cut["images"]) and torch.equal(whole["init"], cut["init"]), j
    assert again.report["resumed"] is True


# --- CLI and API ----------------------------------------------------------------------------------


def test_cli_runs_fd2_on_fadrm_end_to_end(tmp_path) -> None:
    out = tmp_path / "o"
    sets = [arg for key, value in tiny_spec(fadrm_phase_steps=PHASES, eval_random_baseline=False).items()
            if key not in ("preset", "ipc", "method", "device")
            for arg in ("--set", f"{key}={json.dumps(value)}")]
    res = subprocess.run(
        [sys.executable, "-m", "fd2_core", "distill", "--data", TINY_DATA, "--device", "cpu", "--out", str(out),
         "--set", "base=fadrm+", *sets],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "artifacts" / "report.json").read_text())
    assert report["method"] == "fd2" and report["spec"]["base"] == "fadrm+" and report["spec"]["cal"] is True
    assert report["spec"]["fadrm_phase_steps"] == PHASES
    assert 0.0 <= report["metrics"]["student_accuracy"] <= 1.0


@pytest.fixture(scope="module")
def tenant(settings):  # noqa: F811
    return new_tenant(settings)


@pytest.fixture(scope="module")
def dataset(client: TestClient, tenant):  # noqa: F811
    return ready_dataset(client, tenant, {"wren": 6, "finch": 7})


def test_api_accepts_both_fadrm_methods(client: TestClient, tenant, dataset) -> None:  # noqa: F811
    for raw in ({"method": "fadrm+"}, {"base": "fadrm+", "fadrm_phase_steps": [3, 4]}):
        body = {"ipc": 1, "device": "cpu", **raw}
        response = submit(client, tenant, dataset["id"], body)
        assert response.status_code == 202, response.text
        assert response.json()["spec"] == resolve_spec(body).model_dump(mode="json")
    fields = client.get("/openapi.json").json()["components"]["schemas"]["JobSpec"]["properties"]
    assert "fadrm+" in fields["method"]["enum"] and "fadrm_phase_sizes" in fields
    bad = submit(client, tenant, dataset["id"], {"ipc": 1, "method": "fadrm+", "fadrm_phase_sizes": [29, 32]})
    assert bad.status_code == 422, bad.text
    assert bad.json()["error"]["message"].startswith("spec:") and "one size per phase" in bad.json()["error"]["message"]
