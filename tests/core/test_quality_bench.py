"""bench/quality.py: the paired grid's code path on a tiny grid, its
statistics, and resuming from the result file."""

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
from fd2_core.stages.distill import distill

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("fd2_quality_bench", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


TINY_CFG = {
    "spec": {k: v for k, v in TINY_SPEC.items() if k not in ("preset", "ipc", "device")} | {"distill_iterations": 2},
    "ipcs": (1, 2),
    "seeds": (0, 1),
    "settings": ("tiny",),
    "sources": {"tiny": TINY_DATA},
    "classes": None,
    "hard_label_methods": ("random", "fd2"),
    "teacher_init": "scratch",
}


def test_grid_runs_every_method_in_both_protocols_and_resumes(tmp_path):
    bench = _bench()
    saves: list[str] = []
    results = bench.load_results(tmp_path / "q.json", TINY_CFG, "quick", "bench/quality.py --tiny")
    results = bench.run_grid(TINY_CFG, tmp_path / "work", results, lambda doc, msg: saves.append(msg))
    assert set(results["runs"]) == {"tiny/0", "tiny/1"}
    run = results["runs"]["tiny/0"]
    assert set(run["methods"]) == {v.name for v in bench.VARIANTS}
    for name, record in run["methods"].items():
        for protocol in bench.PROTOCOLS:
            for ipc in (1, 2):
                assert 0.0 <= record[protocol][f"ipc{ipc}"]["soft"] <= 1.0, (name, protocol)
    # the plain-CE teacher relabels random and sre2l++ in both protocols:
    # the numbers are one and the same
    for name in ("random", "sre2l++"):
        assert run["methods"][name]["images-only"]["ipc1"]["same_as"] == "end-to-end"
    assert run["methods"]["fd2"]["teacher"] == "cal" and "hard_ipc2" in run["methods"]["fd2"]
    assert "hard_ipc1" not in run["methods"]["sre2l++"]
    assert 0.0 <= run["upper_bound"]["accuracy"] <= 1.0
    assert saves and saves[-1] == "Quality grid: tiny/1 done"

    summary = results["summary"]["tiny"]
    assert summary["seeds"] == [0, 1]
    diff = summary["protocols"]["end-to-end"]["comparisons"]["fd2 − sre2l++"]["ipc2"]
    expected = [100 * (r["methods"]["fd2"]["end-to-end"]["ipc2"]["soft"]
                       - r["methods"]["sre2l++"]["end-to-end"]["ipc2"]["soft"]) for r in results["runs"].values()]
    assert diff["diffs"] == pytest.approx(expected) and diff["mean"] == pytest.approx(sum(expected) / 2)
    hlr = summary["hlr"]["fd2"]["ipc1"]
    assert hlr["mean"] == pytest.approx(statistics_mean(
        [100 * (r["upper_bound"]["accuracy"] - r["methods"]["fd2"]["hard_ipc1"]["accuracy"])
         for r in results["runs"].values()]))

    # a re-run with the same configuration trains nothing new: every method
    # is taken from the result file
    bench._write_json(tmp_path / "q.json", results)
    again = bench.load_results(tmp_path / "q.json", TINY_CFG, "quick", "again")
    calls: list[str] = []
    original = bench.PairRunner.method
    bench.PairRunner.method = lambda self, variant: calls.append(variant.name) or original(self, variant)
    try:
        bench.run_grid(TINY_CFG, tmp_path / "work", again, None)
    finally:
        bench.PairRunner.method = original
    assert calls == []

    # another configuration never mixes into the file
    with pytest.raises(SystemExit):
        bench.load_results(tmp_path / "q.json", TINY_CFG | {"ipcs": (1,)}, "quick", "other")

    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nearlier text\n")
    bench.write_outputs(results, tmp_path / "q.json", tmp_path / "q.png", doc)
    # replaces, never duplicates
    bench.write_outputs(results, tmp_path / "q.json", tmp_path / "q.png", doc)
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nearlier text") and text.count("<!-- quality:v3-quick:begin -->") == 1
    assert "| fd2 − sre2l++ |" in text and "IOR fd2" in text and "bench/quality.py --tiny" in text
    assert (tmp_path / "q.png").stat().st_size > 0
    saved = json.loads((tmp_path / "q.json").read_text())
    assert saved["runs"]["tiny/1"]["methods"]["fd2"] == results["runs"]["tiny/1"]["methods"]["fd2"]


def statistics_mean(values):
    return sum(values) / len(values)


def test_paired_interval_against_a_hand_computation():
    bench = _bench()
    # differences 2, 4, 6 points: mean 4, sd 2, t(0.975, 2) = 4.303 → half width 4.303·2/√3
    out = bench.paired_interval([0.52, 0.54, 0.56], [0.50, 0.50, 0.50])
    half = 4.302652729911275 * 2 / math.sqrt(3)
    assert out["mean"] == pytest.approx(4.0)
    assert out["lo"] == pytest.approx(4.0 - half, rel=1e-4) and out["hi"] == pytest.approx(4.0 + half, rel=1e-4)
    single = bench.paired_interval([0.6], [0.5])
    assert single["lo"] is None and single["mean"] == pytest.approx(10.0)


def test_a_smaller_ipc_is_the_prefix_of_a_larger_one(tmp_path):
    """The bench distills once at the largest IPC and takes prefixes: a run
    at ipc=1 gives the first index."""
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


def test_result_files_started_before_a_spec_field_existed_stay_resumable() -> None:
    quality = _bench()
    key = {"format": "x", "ipcs": [1], "resolved_specs": {"fd2": {"ipc": 1, "teacher_weights_mode": "backbone"}}}
    predates = {"format": "x", "ipcs": [1], "resolved_specs": {"fd2": {"ipc": 1}}}
    assert quality.same_config(key, key)
    assert quality.same_config(predates, key)
    # A field the stored key predates that is not known to state old
    # behaviour, or any changed value, is new work.
    assert not quality.same_config(predates, {**key, "resolved_specs": {"fd2": {"ipc": 1, "new_knob": 2}}})
    # the relabel stream is part of the result: a v2 file (no format
    # recorded) never extends under v3
    v3 = {**key, "soft_label_format": "fd2.soft_labels.v3"}
    assert quality.same_config(key, {**key, "soft_label_format": "fd2.soft_labels.v2"})
    assert not quality.same_config(key, v3) and quality.same_config(v3, v3)
    # `base`: fd2 ran on sre2l++ before it could be named, the other methods have none
    for base in ("sre2l++", None):
        assert quality.same_config(predates, {**key, "resolved_specs": {"fd2": {"ipc": 1, "base": base}}})
    assert not quality.same_config(predates, {**key, "resolved_specs": {"fd2": {"ipc": 1, "base": "fadrm+"}}})
    assert not quality.same_config(predates, {**key, "resolved_specs": {"fd2": {"ipc": 3,
                                                                                "teacher_weights_mode": "full"}}})
    assert not quality.same_config({**predates, "ipcs": [1, 3]}, key)
    assert not quality.same_config(None, key)


def test_table_mode_reuses_the_full_grid_and_shares_images_across_student_rows(tmp_path, monkeypatch):
    """`--table`: random and sre2l++ are copied from the full grid's result
    file (same seed, same resolved spec);
    the student-lr rows reuse their method's images and soft labels and
    only train another student."""
    bench = _bench()
    full_cfg = TINY_CFG | {"seeds": (0,), "hard_label_methods": ()}
    calls: list[str] = []
    original = bench.PairRunner.method
    monkeypatch.setattr(bench.PairRunner, "method",
                        lambda self, variant: calls.append(variant.name) or original(self, variant))
    # random and sre2l++ alone stand for the full grid
    only_refs = full_cfg | {"variants": bench.VARIANTS[:2], "comparisons": {}}
    full = bench.run_grid(only_refs, tmp_path / "work", bench.load_results(tmp_path / "f.json", only_refs,
                                                                            "full", "full"), None)
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    bench._write_json(results_dir / "full.json", full)
    monkeypatch.setattr(bench, "ROOT", tmp_path / "root")
    (tmp_path / "root" / "bench").mkdir(parents=True)
    (tmp_path / "root" / "bench" / "results").symlink_to(results_dir)
    table_cfg = full_cfg | {"variants": bench.TABLE_VARIANTS, "comparisons": bench.TABLE_COMPARISONS,
                            "upper_bound": False, "reuse_from": "full.json"}
    calls.clear()
    table = bench.run_grid(table_cfg, tmp_path / "work", bench.load_results(tmp_path / "t.json", table_cfg,
                                                                             "table", "table"), None)
    run = table["runs"]["tiny/0"]
    # random and sre2l++ were not run again
    assert calls == [v.name for v in bench.TABLE_VARIANTS[2:]]
    for name in ("random", "sre2l++"):
        assert run["methods"][name]["reused_from"] == "full.json"
        assert run["methods"][name]["end-to-end"] == full["runs"]["tiny/0"]["methods"][name]["end-to-end"]
    assert "upper_bound" not in run
    shared = tmp_path / "work" / "tiny" / "seed0" / bench.slug("fadrm+")
    assert not (tmp_path / "work" / "tiny" / "seed0" / bench.slug("fadrm+ · student lr 1e-2")).exists()
    assert (shared / "stages" / "distill" / "ipc_000.safetensors").exists()
    summary = table["summary"]["tiny"]["protocols"]["end-to-end"]
    assert set(summary["comparisons"]) == set(bench.TABLE_COMPARISONS)
    assert set(summary["ior"]) == {v.name for v in bench.TABLE_VARIANTS} - {"random"}


def test_the_published_patch_rule_is_scored_by_the_grids_plain_teacher(tmp_path):
    """Under `patch_rule: published` FD² selects its patches with a plain cross-entropy teacher: the
    bench hands `distill` its own CE teacher as that scorer, so no third teacher is trained and fd2
    starts from the patches sre2l++ starts from."""
    bench = _bench()
    cfg = TINY_CFG | {"spec": TINY_CFG["spec"] | {"patch_rule": "published"}, "seeds": (0,), "ipcs": (1,)}
    runner = bench.PairRunner("tiny", TINY_DATA, 0, cfg, tmp_path / "work", {}, lambda: None)
    fd2_variant = next(v for v in bench.VARIANTS if v.name == "fd2")
    spec = runner.spec(fd2_variant)
    ctx = bench.make_ctx(spec, runner.data, tmp_path / "fd2")
    committee = runner.distilling_teachers(ctx, spec, runner.teacher("cal"))
    assert spec.trains_scorer and committee.scorer is runner.teacher("ce") and committee.model is runner.teacher("cal")
    assert committee.scorer.cal_head is None
    assert not (tmp_path / "fd2" / "teachers").exists()  # no scorer of its own trained
    plain = runner.spec(next(v for v in bench.VARIANTS if v.name == "sre2l++"))
    assert runner.distilling_teachers(ctx, plain, runner.teacher("ce")).scorer is runner.teacher("ce")
    assert runner.distilling_teachers(ctx, runner.spec(bench.VARIANTS[0]), None) is None  # random


def test_validation_runs_each_arm_once_shares_teachers_and_runs_random_once(tmp_path, monkeypatch):
    """`--validate`: every arm runs sre2l++ and fd2 in its own distillation
    folder on the pair's one pair of teachers; random, which no data-path
    field touches, runs in the reference arm only and is copied."""
    bench = _bench()
    calls: list[tuple[str, str]] = []
    original = bench.PairRunner.method
    monkeypatch.setattr(bench.PairRunner, "method", lambda self, variant: calls.append(
        (self.root.parents[1].name, variant.name)) or original(self, variant))
    arms = bench.choice_arms({"synthetic_format": ("jpeg", "png")})
    cfg = TINY_CFG | {"seeds": (0,), "ipcs": (1,), "variants": bench.VARIANTS[:3], "hard_label_methods": (),
                      "upper_bound": False, "arms": arms, "arm_free": ("random",), "comparisons": {}}
    results = bench.load_results(tmp_path / "v.json", cfg, "validate", "validate")
    results = bench.run_validation(cfg, tmp_path / "work", results, None)
    assert calls == [("published", "random"), ("published", "sre2l++"), ("published", "fd2"),
                     ("synthetic-format-png", "sre2l++"), ("synthetic-format-png", "fd2")]
    png = results["runs"]["tiny/0/synthetic_format=png"]["methods"]
    assert png["random"]["same_as"] == "published"
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["published", "synthetic-format-png", "teachers"]
    assert not list((tmp_path / "work" / "published").glob("*/*/teacher-*"))
    choice = results["summary"]["choices"]["synthetic_format"]
    # one pair: no interval, keep published
    assert choice["pairs"] == ["tiny/0"] and choice["choice"] == "jpeg"
    # a second run finds everything in the result file and trains nothing
    calls.clear()
    bench.run_validation(cfg, tmp_path / "work", results, None)
    assert calls == []
    assert "| synthetic_format: jpeg → png | 1 |" in bench.validation_markdown(results)


def test_the_validation_rule_takes_the_alternative_only_when_its_interval_is_above_zero():
    bench = _bench()
    arms = bench.choice_arms({"distill_crop": ("batch", "image"), "synthetic_format": ("jpeg", "png")})
    cfg = {"ipcs": [1], "protocols": list(bench.PROTOCOLS), "methods": ["random", "fd2"], "arms": arms}

    def record(arm: str, setting: str, seed: int, acc: float) -> dict:
        cell = {p: {"ipc1": {"soft": acc}} for p in bench.PROTOCOLS}
        return {"arm": arm, "setting": setting, "seed": seed, "methods": {"random": cell, "fd2": cell}}

    runs = {}
    for seed, (ref, crop, fmt) in enumerate([(0.50, 0.55, 0.48), (0.40, 0.46, 0.47), (0.60, 0.64, 0.55)]):
        for arm, acc in (("published", ref), ("distill_crop=image", crop), ("synthetic_format=png", fmt)):
            runs[f"s/{seed}/{arm}"] = record(arm, "s", seed, acc)
    summary = bench.summarise_choices({"config": cfg, "runs": runs})
    crop, fmt = summary["choices"]["distill_crop"], summary["choices"]["synthetic_format"]
    assert crop["both"]["lo"] > 0 and crop["choice"] == "image"  # +5 points every pair
    assert crop["both"]["mean"] == pytest.approx(5.0)
    # −2, +7, −5: keep published
    assert fmt["both"]["lo"] < 0 < fmt["both"]["hi"] and fmt["choice"] == "jpeg"
    assert crop["both_by_method"]["fd2"]["mean"] == pytest.approx(5.0)


def test_a_pair_scores_its_published_patches_once_and_every_variant_gets_the_same_start(tmp_path, monkeypatch):
    """The variants of a pair share the scored patch files (same scorer, seed, data, fields): the files are built
    once per pair, and a variant run alone distills exactly the images it distills after another one."""
    bench = _bench()
    import fd2_core.stages.patches as patches

    built: list[int] = []
    original = patches.published_patch_files
    monkeypatch.setattr(patches, "published_patch_files",
                        lambda *a, **k: built.append(1) or original(*a, **k))
    cfg = TINY_CFG | {"spec": TINY_CFG["spec"] | {"patch_rule": "published"}, "seeds": (0,), "ipcs": (1,)}
    sre2l, fd2 = (next(v for v in bench.VARIANTS if v.name == n) for n in ("sre2l++", "fd2"))

    def distilled(runner, variant, folder):
        spec = runner.spec(variant)
        ctx = bench.make_ctx(spec, runner.data, tmp_path / folder, notes=runner.shared_notes(spec))
        return distill(ctx, runner.distilling_teachers(ctx, spec, runner.teacher(variant.teacher)))

    shared = bench.PairRunner("tiny", TINY_DATA, 0, cfg, tmp_path / "work", {}, lambda: None)
    distilled(shared, sre2l, "a-sre2l")
    after_other = distilled(shared, fd2, "a-fd2")
    assert len(built) == 1
    alone = bench.PairRunner("tiny", TINY_DATA, 0, cfg, tmp_path / "work", {}, lambda: None)
    assert torch.equal(distilled(alone, fd2, "b-fd2"), after_other)
    assert len(built) == 2  # a new pair scores again


def test_result_files_of_one_configuration_merge_and_others_refuse(tmp_path):
    """`--merge`: one process per setting writes its own file; the files join into one, never across
    configurations, and a record finished in two files with different figures is refused."""
    bench = _bench()
    key = bench.config_key(TINY_CFG)
    cell = {"end-to-end": {"ipc1": {"soft": 0.5}}}

    def doc(setting: str, soft: float = 0.5, config=key) -> dict:
        record = {"setting": setting, "seed": 0, "methods": {"fd2": {"end-to-end": {"ipc1": {"soft": soft}}}}}
        return {"format": bench.FORMAT, "mode": "full", "command": f"run {setting}", "config": config,
                "runs": {f"{setting}/0": record}, "total_s": 10.0, "settings": [setting], "seeds": [0]}

    merged = bench.merge_results([doc("a"), doc("b")])
    assert set(merged["runs"]) == {"a/0", "b/0"} and merged["settings"] == ["a", "b"]
    assert merged["total_s"] == 20.0 and merged["command"] == "run a && run b"
    assert merged["runs"]["b/0"]["methods"]["fd2"] == cell
    other = bench.config_key(TINY_CFG | {"ipcs": (1,)})
    with pytest.raises(SystemExit):
        bench.merge_results([doc("a"), doc("b", config=other)])
    longer = doc("a", 0.7)
    longer["runs"]["a/0"]["methods"]["random"] = cell
    with pytest.raises(SystemExit):
        bench.merge_results([doc("a"), longer])


def test_the_accuracy_table_gives_each_set_s_size_and_a_dash_for_records_without_one():
    """The size column: distilled images (PNG) + soft labels per (method, IPC), the mean over seeds;
    records stored before the sizes were recorded render "–"."""
    bench = _bench()

    def cell(soft: float, sizes: tuple[int, int] | None) -> dict:
        return {"soft": soft, "time_s": 1.0,
                **({"images_bytes": sizes[0], "soft_labels_bytes": sizes[1]} if sizes else {})}

    def record(seed: int) -> dict:
        fd2 = {p: {"ipc1": cell(0.5, (1000 + seed * 200, 3000)), "ipc2": cell(0.6, (2000, 6000))}
               for p in bench.PROTOCOLS}
        old = {p: {"ipc1": cell(0.4, None), "ipc2": cell(0.45, None)} for p in bench.PROTOCOLS}
        teacher = {"backbone_test_accuracy": 0.5, "test_accuracy": 0.5, "time_s": 1.0}
        return {"setting": "tiny", "seed": seed, "teachers": {"ce": teacher, "cal": teacher},
                "methods": {"fd2": {"distill_s": 1.0, **fd2}, "random": {"distill_s": 1.0, **old}}}

    results = {"config": {"ipcs": [1, 2], "methods": ["random", "fd2"], "protocols": list(bench.PROTOCOLS),
                          "comparisons": {"fd2 − random": ["fd2", "random"]}, "hard_label_methods": [],
                          "spec": {}, "classes": None, "teacher_init": "scratch"},
               "settings": ["tiny"], "runs": {"tiny/0": record(0), "tiny/1": record(1)},
               "environment": {"cpu": "cpu", "threads": 2, "torch": "x"}, "date": "today", "total_s": 60.0,
               "command": "bench/quality.py", "setting_descriptions": {}}
    results["summary"] = bench.summarise(results)
    assert results["summary"]["tiny"]["protocols"]["end-to-end"]["set_bytes"] == {
        "random": {"ipc1": None, "ipc2": None}, "fd2": {"ipc1": 4100.0, "ipc2": 8000.0}}
    lines = bench.markdown(results, None).splitlines()
    assert "| method | IPC 1 | IPC 2 | size (IPC 1 / IPC 2) |" in lines
    assert "| fd2 | 50.0 ± 0.0 | 60.0 ± 0.0 | 4.1 KB / 8.0 KB |" in lines
    assert "| random | 40.0 ± 0.0 | 45.0 ± 0.0 | – / – |" in lines
