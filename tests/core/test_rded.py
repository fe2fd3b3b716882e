"""The `rded` method (patch selection without optimisation) and the `base` of FD²: spec rules,
pipeline, CLI, API and cost model, on tiny generated data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from api_helpers import client, new_tenant, ready_dataset, settings, submit  # noqa: F401  (fixtures)
from fastapi.testclient import TestClient
from pipeline_helpers import TINY_DATA, tiny_spec

import fd2_core.stages.distill as distill_stage
import fd2_core.stages.synthesis as synthesis
from fd2_core.atomic import load_tensors
from fd2_core.cli import main
from fd2_core.cost import DatasetSize, patch_scoring_passes, stage_image_passes
from fd2_core.data.dataset import load_dataset
from fd2_core.pipeline import run, stage_weights
from fd2_core.spec import BASES, METHODS, JobSpec, ValidationError
from fd2_core.spec_errors import describe_spec_error
from fd2_core.spec_resolution import resolve_spec

ROOT = Path(__file__).resolve().parents[2]
CUB_LIKE = DatasetSize(num_classes=200, train_images=5994, test_images=5794)


@pytest.fixture(scope="module")
def tiny_data():
    return load_dataset(TINY_DATA, 32, seed=0)  # 4 classes × 16 train images


def _refusal(raw: dict) -> str:
    with pytest.raises(ValidationError) as err:
        resolve_spec(raw)
    return describe_spec_error(err.value.errors()[0])


# --- spec -----------------------------------------------------------------------------------------


def test_fd2_keeps_meaning_fd2_on_sre2l_and_the_other_methods_have_no_base() -> None:
    assert "rded" in METHODS and BASES == ("sre2l++", "fadrm+")
    assert resolve_spec({}).base == "sre2l++" and JobSpec().base == "sre2l++"
    assert resolve_spec({"method": "fd2", "base": "sre2l++"}) == resolve_spec({})
    for method in ("sre2l++", "rded", "random"):
        spec = resolve_spec({"method": method})
        assert spec.base is None and not (spec.cal or spec.fc or spec.sc), method
    rded = resolve_spec({"method": "rded", "base": None})
    assert rded.init == "patches" and not rded.optimises_images and rded.scores_patches


@pytest.mark.parametrize(("raw", "words"), [
    ({"method": "rded", "cal": True}, ["'rded'", "plain teacher", "drop cal"]),
    ({"method": "rded", "fc": True, "sc": True}, ["optimises nothing", "drop fc, sc"]),
    ({"method": "rded", "init": "gaussian"}, ["init must be 'patches'", "drop init"]),
    ({"method": "rded", "soft_label_source": "mixed"}, ["CAL head", "method fd2"]),
    ({"method": "rded", "base": "sre2l++"}, ["method 'rded' is a recipe of its own", "drop base"]),
    ({"method": "random", "base": "sre2l++"}, ["method 'random'", "drop base"]),
    ({"base": None}, ["method fd2 needs a base", "'sre2l++'"]),
    ({"base": "dm"}, ["'sre2l++'", "'fadrm+'"]),
])
def test_contradictions_are_refused_with_cause_and_fix(raw: dict, words: list[str]) -> None:
    message = _refusal(raw)
    for word in words:
        assert word in message, message


# --- pipeline -------------------------------------------------------------------------------------


def test_rded_selects_the_sre2l_initial_images_without_a_single_optimisation_step(tmp_path, tiny_data,
                                                                                   monkeypatch) -> None:
    """The plain reference: with the same seed, rded's set is the patch
    initialisation sre2l++ starts from."""

    def no_optimisation(*args, **kwargs):
        raise AssertionError("rded must not optimise the images")

    monkeypatch.setattr(distill_stage, "optimise_chunk", no_optimisation)
    monkeypatch.setattr(synthesis, "distill_step", no_optimisation)
    # png: rded's stored set is its selection itself (under jpeg it is the selection's JPEG)
    rded = run(tiny_spec(method="rded", ipc=2, evaluate=False, synthetic_format="png"), tiny_data, tmp_path / "rded")
    monkeypatch.undo()
    run(tiny_spec(method="sre2l++", ipc=2, distill_iterations=1, evaluate=False, synthetic_format="png"), tiny_data,
        tmp_path / "sre2l")
    for j in range(2):
        selected = load_tensors(tmp_path / "rded" / "stages" / "distill" / f"ipc_{j:03d}.safetensors")
        optimised = load_tensors(tmp_path / "sre2l" / "stages" / "distill" / f"ipc_{j:03d}.safetensors")
        assert "init" not in selected  # its own initialisation: nothing to keep twice
        assert torch.equal(selected["images"], optimised["init"]), j
        # sre2l++ did move its images
        assert not torch.equal(selected["images"], optimised["images"])
    drift = rded.report["distill"]
    assert drift["init"] == "patches" and drift["init_psnr_db"] is None
    assert drift["init_mean_abs_change"] == 0.0 and drift["init_mean_abs_change_per_index"] == [0.0, 0.0]
    assert rded.report["method"] == "rded" and rded.report["spec"]["base"] is None


def test_rded_resumes_at_the_first_missing_ipc_index_with_the_same_selection(tmp_path, tiny_data) -> None:
    raw = tiny_spec(method="rded", ipc=2, evaluate=False)
    first = run(raw, tiny_data, tmp_path / "run")
    second_index = tmp_path / "run" / "stages" / "distill" / "ipc_001.safetensors"
    before = load_tensors(second_index)["images"]
    second_index.unlink()
    events = []
    again = run(raw, tiny_data, tmp_path / "run", on_event=events.append)
    messages = [e.message for e in events]
    assert "ipc index 0 already distilled; reusing it" in messages
    assert "ipc index 2/2 distilled" in messages  # the missing index was selected again
    # the ranking of a reloaded teacher
    assert torch.equal(load_tensors(second_index)["images"], before)
    assert again.report["resumed"] is True
    tar = "distilled.tar.gz"
    assert again.artifacts[tar].read_bytes() == first.artifacts[tar].read_bytes()


# --- cost model -----------------------------------------------------------------------------------


def test_rded_costs_its_patch_scoring_only_once_whatever_the_ipc_or_iterations() -> None:
    """RDED's own rule ranks the pool once (the published rule's per-file scoring is in test_patch_rule)."""
    rded = resolve_spec({"method": "rded", "ipc": 2, "patch_rule": "ranked"})
    passes = stage_image_passes(rded, CUB_LIKE)
    assert passes["distill"] == min(300 * 200, 5994) * 5 == patch_scoring_passes(rded, CUB_LIKE)
    many = resolve_spec({"method": "rded", "ipc": 10, "distill_iterations": 50_000, "patch_rule": "ranked"})
    assert stage_image_passes(many, CUB_LIKE)["distill"] == passes["distill"]
    small_pool = resolve_spec({"method": "rded", "patch_pool": 4, "patch_candidates": 3, "patch_rule": "ranked"})
    assert stage_image_passes(small_pool, CUB_LIKE)["distill"] == 200 * 4 * 3
    sre2l = resolve_spec({"method": "sre2l++", "ipc": 2, "patch_rule": "ranked"})
    steps = 2 * sre2l.distill_iterations * 200 * 3
    assert stage_image_passes(sre2l, CUB_LIKE)["distill"] == steps + passes["distill"]
    noise = resolve_spec({"method": "sre2l++", "ipc": 2, "init": "gaussian"})
    assert stage_image_passes(noise, CUB_LIKE)["distill"] == steps
    assert stage_image_passes(resolve_spec({"method": "random"}), CUB_LIKE)["distill"] == 0
    # everything but distill is the same work as the base recipe's (same
    # plain teacher, relabel, students)
    same = {k: v for k, v in stage_image_passes(sre2l, CUB_LIKE).items() if k != "distill"}
    assert {k: v for k, v in passes.items() if k != "distill"} == same


def test_rded_progress_weights_are_its_cost() -> None:
    spec = resolve_spec({"method": "rded", "ipc": 3})
    data = SimpleNamespace(classes=[str(i) for i in range(CUB_LIKE.num_classes)],
                           train_images=SimpleNamespace(shape=(CUB_LIKE.train_images, 3, 32, 32)),
                           test_images=SimpleNamespace(shape=(CUB_LIKE.test_images, 3, 32, 32)))
    assert stage_weights(spec, data) == stage_image_passes(spec, CUB_LIKE)


# --- CLI ------------------------------------------------------------------------------------------


def _set_args(spec: dict) -> list[str]:
    return [arg for key, value in spec.items() if key not in ("preset", "ipc", "method", "device")
            for arg in ("--set", f"{key}={value}")]


def test_cli_runs_rded_end_to_end(tmp_path) -> None:
    out = tmp_path / "o"
    res = subprocess.run(
        [sys.executable, "-m", "fd2_core", "distill", "--data", TINY_DATA, "--method", "rded", "--device", "cpu",
         "--out", str(out), *_set_args(tiny_spec())],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("method rded, ipc 1") and "student (distilled set)" in res.stdout
    report = json.loads((out / "artifacts" / "report.json").read_text())
    assert report["method"] == "rded" and report["spec"]["base"] is None
    assert report["distill"]["init_mean_abs_change"] == 0.0
    assert 0.0 <= report["metrics"]["student_accuracy"] <= 1.0


@pytest.mark.parametrize(("extra", "words"), [
    (["--set", "method=rded", "--set", "fc=true"], ["method 'rded' runs without FD² parts", "drop fc"]),
    (["--method", "rded", "--set", "base=sre2l++"], ["drop base"]),
    (["--set", "base=dm"], ["invalid spec field 'base'", "'sre2l++'", "--set base=VALUE"]),
])
def test_cli_refuses_contradictions_with_exit_2_before_writing(tmp_path, capsys, extra, words) -> None:
    out = tmp_path / "runs" / "x"
    code = main(["distill", "--data", TINY_DATA, "--device", "cpu", "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fd2: error: "), err
    for word in words:
        assert word in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()


# --- API ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tenant(settings):  # noqa: F811
    return new_tenant(settings)


@pytest.fixture(scope="module")
def dataset(client: TestClient, tenant):  # noqa: F811
    return ready_dataset(client, tenant, {"wren": 6, "finch": 7})


def test_api_accepts_rded_and_documents_method_and_base(client: TestClient, tenant, dataset) -> None:  # noqa: F811
    response = submit(client, tenant, dataset["id"], {"method": "rded", "ipc": 1, "device": "cpu"})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["spec"] == resolve_spec({"method": "rded", "ipc": 1, "device": "cpu"}).model_dump(mode="json")
    assert job["spec"]["base"] is None and job["spec"]["cal"] is False
    fd2 = submit(client, tenant, dataset["id"], {"ipc": 1, "device": "cpu"}).json()
    assert fd2["spec"]["method"] == "fd2" and fd2["spec"]["base"] == "sre2l++"
    fields = client.get("/openapi.json").json()["components"]["schemas"]["JobSpec"]["properties"]
    assert "rded" in fields["method"]["enum"]
    options = fields["base"]["anyOf"]  # a one-value literal is a `const`, a longer one an `enum`
    assert [v for o in options for v in o.get("enum", [o.get("const")]) if v is not None] == ["sre2l++", "fadrm+"]
    assert {"type": "null"} in options
    assert fields["base"]["default"] == "sre2l++" and "fd2 only" in fields["base"]["description"]


@pytest.mark.parametrize(("spec", "field", "words"), [
    ({"method": "rded", "cal": True}, "spec", ["plain teacher", "drop cal"]),
    ({"method": "rded", "init": "gaussian"}, "spec", ["init must be 'patches'"]),
    ({"base": "dm"}, "spec.base", ["'sre2l++'", "'fadrm+'"]),
])
def test_api_refuses_contradictions_with_422(client: TestClient, tenant, dataset, spec, field,  # noqa: F811
                                             words) -> None:
    response = submit(client, tenant, dataset["id"], {"ipc": 1, **spec})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_spec" and error["message"].startswith(f"{field}:")
    for word in words:
        assert word in error["message"], error["message"]
