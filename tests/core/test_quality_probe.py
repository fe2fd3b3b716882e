"""The validation probe measures what the pipeline does: its label sources
replay the production relabel stage."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from pipeline_helpers import TINY_DATA, TINY_SPEC

from fd2_core.data.dataset import load_dataset
from fd2_core.spec_resolution import resolve_spec
from fd2_core.stages.relabel import relabel_all_epochs
from fd2_core.stages.teacher import new_teacher

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"fd2_bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data():
    return load_dataset(TINY_DATA, 32, seed=0)


@pytest.mark.parametrize(
    ("method", "name", "bn_mode"),
    [("fd2", "cal-backbone", "train"), ("fd2", "cal-combined", "eval"), ("fd2", "cal-head", "train"),
     ("sre2l++", "ce", "train")],
)  # fmt: skip
def test_probe_label_source_equals_the_relabel_stage(tmp_path, data, method, name, bn_mode):
    probe = _load("quality_probe")
    kind, source = probe.LABEL_SOURCES[name]
    raw = {"method": method, "relabel_epochs": 2, "soft_label_source": source, "relabel_bn_mode": bn_mode}
    spec = resolve_spec({**TINY_SPEC, **raw})
    ctx = probe.make_ctx(spec, data, tmp_path)
    torch.manual_seed(0)
    teacher = new_teacher(ctx)
    images = data.train_images[:8]
    labels = data.train_labels[:8]
    production = relabel_all_epochs(ctx, teacher, images, labels, tmp_path / "stage.safetensors")
    assert kind == ("cal" if spec.uses_cal else "ce")
    replayed = probe.soft_labels(ctx, teacher, source, images, tmp_path / "probe.st")
    assert set(replayed.tensors) == set(production.tensors)
    for key, tensor in production.tensors.items():
        assert torch.equal(replayed.tensors[key], tensor), key
    assert len(replayed) == len(production)


def test_probe_runs_every_combination_and_writes_json(tmp_path):
    probe = _load("quality_probe")
    out = tmp_path / "probe.json"
    argv = [
        "--data", "fgsynth:classes=3,train=12,test=6",
        "--seeds", "0", "--ipcs", "1", "2", "--temperatures", "20", "4",
        "--sources", "ce", "cal-combined",
        "--set", "distill_iterations=2", "--set", "relabel_epochs=2", "--set", "pretrain_epochs=1",
        "--work", str(tmp_path / "work"), "--json", str(out),
    ]  # fmt: skip
    assert probe.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    combos = {(r["images"], r["ipc"], r["labels"], r["T"]) for r in rows}
    assert len(rows) == len(combos) == 3 * 2 * 2 * 2
    assert {r["images"] for r in rows} == {"random", "sre2l++", "fd2"}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)


def test_fd2_terms_reports_geometry_and_gradients(tmp_path, data):
    terms = _load("fd2_terms")
    spec = resolve_spec({**TINY_SPEC, "method": "fd2", "pretrain_epochs": 1})
    ctx = terms.make_ctx(spec, data, tmp_path)
    from fd2_core.stages.pretrain import pretrain

    teacher = pretrain(ctx).model
    geometry = terms.prototype_geometry(teacher, ctx)
    grads = terms.term_gradients(teacher, ctx, draws=2)
    assert geometry["embedding_norm"] == pytest.approx(1.0, abs=1e-4)
    # the published update leaves prototypes short (about β), so the raw
    # distances to every class nearly coincide
    assert geometry["prototype_norm"] < 0.5
    assert abs(geometry["d_own_raw"] - geometry["d_other_raw"]) < abs(geometry["d_own_unit"] - geometry["d_other_unit"])
    for name in ("ce", "bn", "fc_raw", "fc_unit", "sc"):
        assert math.isfinite(grads[name]) and grads[name] > 0.0, name
    assert grads["fc_unit"] > grads["fc_raw"]
