"""Smoke test of bench/quality.py's code path on a tiny grid (seconds on a CPU)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

from fd2_core.data.dataset import load_dataset
from fd2_core.spec import resolve_spec
from fd2_core.stages.distill import distill
from tests.pipeline_helpers import TINY_DATA, TINY_SPEC

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("fd2_quality_bench", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


TINY_CFG = {
    "spec": {k: v for k, v in TINY_SPEC.items() if k not in ("preset", "ipc", "device")} | {"distill_iterations": 2},
    "ipcs": (1, 2),
    "seeds": (0,),
    "settings": ("tiny",),
    "sources": {"tiny": TINY_DATA},
    "classes": None,
    "upper_bound_epochs": 1,
}


def test_grid_runs_every_method_and_writes_json_table_and_plot(tmp_path):
    bench = _bench()
    results = bench.run_grid(TINY_CFG, tmp_path / "work", "quick", "bench/quality.py --tiny")
    (run,) = results["runs"]
    assert set(run["methods"]) == {v.name for v in bench.VARIANTS}
    for name, record in run["methods"].items():
        for ipc in (1, 2):
            assert 0.0 <= record[f"ipc{ipc}"]["soft"] <= 1.0 and 0.0 <= record[f"ipc{ipc}"]["hard"] <= 1.0, name
    assert run["methods"]["fd2"]["teacher"] == "cal" and run["methods"]["random"]["teacher"] == "ce"
    assert run["methods"]["fd2 − CAL"]["same_as"] == "sre2l++"
    assert set(run["teachers"]) == {"cal", "ce"} and 0.0 <= run["upper_bound"]["accuracy"] <= 1.0

    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nearlier text\n")
    bench.write_outputs(results, tmp_path / "q.json", tmp_path / "q.png", doc)
    bench.write_outputs(results, tmp_path / "q.json", tmp_path / "q.png", doc)  # replaces, never duplicates
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nearlier text") and text.count("<!-- quality:quick:begin -->") == 1
    assert "| fd2 (cal) |" in text and "full real train set" in text and "bench/quality.py --tiny" in text
    assert (tmp_path / "q.png").stat().st_size > 0
    saved = json.loads((tmp_path / "q.json").read_text())
    assert saved["summary"]["tiny"]["methods"]["fd2"]["ipc2_soft"]["values"] == [run["methods"]["fd2"]["ipc2"]["soft"]]


def test_fd2_without_cal_is_the_base_recipe(tmp_path):
    """What the bench relies on to reuse sre2l++ for fd2 − CAL: both run the same code with the same seeds."""
    bench = _bench()
    cfg = TINY_CFG | {"ipcs": (1,)}
    variants = tuple(v for v in bench.VARIANTS if v.name in ("sre2l++", "fd2 − CAL"))
    out = bench.run_setting_seed("tiny", TINY_DATA, 0, cfg, tmp_path, variants=variants, reuse=False)
    assert out["methods"]["fd2 − CAL"]["ipc1"] == out["methods"]["sre2l++"]["ipc1"]


def test_a_smaller_ipc_is_the_prefix_of_a_larger_one(tmp_path):
    """The bench distills once at the largest IPC and takes prefixes: a run at ipc=1 gives the first index."""
    bench = _bench()
    data = load_dataset(TINY_DATA, 32)
    teacher = None
    sets = {}
    for ipc in (1, 2):
        spec = resolve_spec({**TINY_SPEC, "ipc": ipc, "distill_iterations": 2})
        ctx = bench.make_ctx(spec, data, tmp_path / f"ipc{ipc}")
        if teacher is None:
            from fd2_core.stages.pretrain import pretrain

            teacher = pretrain(bench.make_ctx(spec, data, tmp_path / "teacher")).model
        sets[ipc] = distill(ctx, teacher)
    assert torch.equal(sets[2][:1], sets[1])
