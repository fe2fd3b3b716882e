"""DD-Ranking metrics, the paired bootstrap interval and the verdict, against hand computations."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fd2_core.metrics import bootstrap_interval, hlr, ior, verdict


def _pairs(plus: int, minus: int, both: int, neither: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image correctness of two students: `plus` only a right, `minus`
    only b right, then both, neither."""
    a = torch.tensor([True] * plus + [False] * minus + [True] * both + [False] * neither)
    b = torch.tensor([False] * plus + [True] * minus + [True] * both + [False] * neither)
    return a, b


def test_ior_and_hlr_are_the_published_differences():
    # IOR = acc(distilled, soft) − acc(random subset, soft); HLR = acc(full
    # data, hard) − acc(distilled, hard)
    assert ior(0.452, 0.310) == pytest.approx(0.142)
    assert ior(0.298, 0.312) == pytest.approx(-0.014)
    assert hlr(0.81, 0.27) == pytest.approx(0.54)


def test_two_images_one_difference_gives_the_hand_computed_interval():
    # d = [1, 0]: a resample's mean is 0, 1/2 or 1 with probability 1/4,
    # 1/2, 1/4, so the 2.5 % and 97.5 % percentiles of 2000 resamples are 0
    # and 1 (each end holds ~500 resamples, far more than 50).
    a, b = torch.tensor([True, False]), torch.tensor([False, False])
    assert bootstrap_interval(a, b) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("counts", "expected"),
    [((0, 0, 7, 3), (0.0, 0.0)), ((5, 0, 0, 0), (1.0, 1.0)), ((0, 5, 0, 0), (-1.0, -1.0))],
)
def test_degenerate_differences_have_a_point_interval(counts, expected):
    assert bootstrap_interval(*_pairs(*counts)) == expected


def test_interval_matches_the_normal_approximation_and_index_resampling():
    # N = 400, 60 images only a gets right, 20 only b: mean d = 0.1, var(d) = 0.2 − 0.1² = 0.19,
    # se = sqrt(0.19 / 400) ≈ 0.0218, so the 95 % interval is ≈ 0.1 ± 1.96·0.0218 = [0.057, 0.143].
    a, b = _pairs(60, 20, 200, 120)
    lo, hi = bootstrap_interval(a, b)
    se = math.sqrt(0.19 / 400)
    assert lo == pytest.approx(0.1 - 1.96 * se, abs=0.01)
    assert hi == pytest.approx(0.1 + 1.96 * se, abs=0.01)
    # the textbook way: resample image indices with replacement
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 400, (4000, 400), generator=g)
    means = (a.float() - b.float())[idx].mean(1)
    ref_lo, ref_hi = torch.quantile(means, torch.tensor([0.025, 0.975])).tolist()
    assert (lo, hi) == pytest.approx((ref_lo, ref_hi), abs=0.01)


def test_interval_is_seeded_paired_and_order_free():
    a, b = _pairs(30, 25, 100, 45)
    first = bootstrap_interval(a, b, seed=3)
    assert bootstrap_interval(a, b, seed=3) == first
    perm = torch.randperm(a.numel(), generator=torch.Generator().manual_seed(0))
    # only the pairs matter, not their order
    assert bootstrap_interval(a[perm], b[perm], seed=3) == first
    lo, hi = first
    assert lo < 0.025 < hi  # the observed difference 5/200 lies inside
    wider = bootstrap_interval(a, b, seed=3, level=0.99)
    assert wider[0] <= lo and wider[1] >= hi


def test_unpaired_or_empty_inputs_are_refused():
    with pytest.raises(ValueError, match="same test images"):
        bootstrap_interval(torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="no test images"):
        bootstrap_interval(torch.ones(0, dtype=torch.bool), torch.ones(0, dtype=torch.bool))


def test_verdict_beats_random_only_when_the_whole_interval_is_above_zero():
    v = verdict(0.452, 0.310, (0.11, 0.17))
    assert v.status == "beats_random" and v.beats_random
    assert v.ior == pytest.approx(0.142)
    assert "45.2 %" in v.message and "31.0 %" in v.message and "WARNING" not in v.message
    assert v.as_dict()["ior_ci95"] == [0.11, 0.17]


def test_verdict_says_plainly_when_random_does_as_well_or_better():
    v = verdict(0.298, 0.312, (-0.039, 0.011))
    assert v.status == "not_distinguishable" and not v.beats_random
    assert v.message.startswith("WARNING: a random real subset of the same size scores 31.2 % vs 29.8 %")
    assert "IOR -1.4 points, 95 % CI [-3.9, +1.1]" in v.message and "not distinguishable" in v.message
    assert "\n" not in v.message

    worse = verdict(0.20, 0.40, (-0.25, -0.15))
    assert worse.status == "loses_to_random" and not worse.beats_random
    assert worse.message.startswith("WARNING") and "loses to random" in worse.message

    # a positive IOR whose interval reaches 0 is no win either
    edge = verdict(0.33, 0.31, (0.0, 0.04))
    assert edge.status == "not_distinguishable" and not edge.beats_random
    assert edge.message.startswith("WARNING: this set scores 33.0 % vs 31.0 %")
    tie = verdict(0.31, 0.31, (0.0, 0.0))
    assert tie.status == "not_distinguishable"


# --- the metrics in the pipeline, its cost and the CLI --------------------------------------------

def test_hlr_is_counted_by_the_cost_model_and_the_progress_weights():
    from types import SimpleNamespace

    from fd2_core.cost import DatasetSize, stage_image_passes
    from fd2_core.pipeline import stage_weights
    from fd2_core.spec_resolution import resolve_spec

    raw = {"preset": "cpu-small", "ipc": 2, "relabel_epochs": 10, "pretrain_epochs": 4}
    plain, with_hlr = resolve_spec(raw), resolve_spec({**raw, "eval_hlr": True})
    size = DatasetSize(num_classes=5, train_images=1000, test_images=200)
    n_syn = 2 * 5
    # hard-label student: 10 epochs · 10 images · 3 passes + 200 test images;
    # full-data student: 4 epochs · 1000 images · 3 passes + 200 test images
    extra = (10 * n_syn * 3 + 200) + (4 * 1000 * 3 + 200)
    before, after = stage_image_passes(plain, size), stage_image_passes(with_hlr, size)
    assert after["evaluate"] - before["evaluate"] == pytest.approx(extra)
    assert {k: v for k, v in after.items() if k != "evaluate"} == {k: v for k, v in before.items() if k != "evaluate"}
    no_eval = resolve_spec({**raw, "eval_hlr": True, "evaluate": False})
    assert stage_image_passes(no_eval, size)["evaluate"] == 0

    data = SimpleNamespace(classes=list("abcde"), train_images=torch.zeros(1000, 3, 1, 1, dtype=torch.uint8),
                           test_images=torch.zeros(0, 3, 1, 1, dtype=torch.uint8))
    weights_before, weights_after = stage_weights(plain, data), stage_weights(with_hlr, data)
    assert weights_after["evaluate"] - weights_before["evaluate"] == pytest.approx(10 * n_syn * 3 + 4 * 1000 * 3)


def test_pipeline_reports_ior_with_interval_verdict_and_hlr(tmp_path):
    from pipeline_helpers import TINY_DATA, tiny_spec

    from fd2_core.data.dataset import load_dataset
    from fd2_core.pipeline import run
    from fd2_core.spec_resolution import resolve_spec

    data = load_dataset(TINY_DATA, 32, seed=0)
    events = []
    result = run(resolve_spec(tiny_spec(eval_hlr=True)), data, tmp_path / "run", on_event=events.append)
    m = result.metrics
    assert m["ior"] == pytest.approx(m["student_accuracy"] - m["random_baseline_accuracy"])
    lo, hi = m["ior_ci95"]
    assert -1.0 <= lo <= m["ior"] <= hi <= 1.0
    assert m["beats_random"] is (m["verdict"] == "beats_random")
    assert m["hlr"] == pytest.approx(m["full_data_accuracy"] - m["hard_label_accuracy"])
    assert len(m["hlr_ci95"]) == 2 and "gain_over_random" not in m
    report = json.loads(result.artifacts["report.json"].read_text())
    comparison = report["comparison"]
    assert comparison["ior"] == m["ior"] and comparison["hlr"] == m["hlr"]
    assert comparison["verdict"]["status"] == m["verdict"]
    assert comparison["verdict"]["ior_ci95"] == m["ior_ci95"]
    assert comparison["verdict"]["message"] in [e.message for e in events if e.stage == "evaluate"]
    progress = [e.progress for e in events]
    assert progress == sorted(progress) and progress[-1] == pytest.approx(1.0)
    # a rerun reuses the evaluation and reports the same
    again = run(resolve_spec(tiny_spec(eval_hlr=True)), data, tmp_path / "run")
    assert again.metrics == m


def test_cli_summary_ends_with_the_verdict(capsys):
    from pathlib import Path

    from fd2_core.cli import print_summary
    from fd2_core.pipeline import PipelineResult
    from fd2_core.spec_resolution import resolve_spec
    from fd2_core.stages.evaluate import comparison

    metrics = {
        "teacher_accuracy": 0.6, "student_accuracy": 0.298, "random_baseline_accuracy": 0.312, "ior": -0.014,
        "ior_ci95": [-0.039, 0.011], "beats_random": False, "verdict": "not_distinguishable",
    }
    report = {"timings_s": {"total": 3.0}, "device": {"type": "cpu"}, "comparison": comparison(metrics)}
    result = PipelineResult(artifacts={"report.json": Path("out/report.json")}, metrics=metrics, report=report)
    print_summary(resolve_spec({"preset": "cpu-small"}), result)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("WARNING: a random real subset of the same size scores 31.2 % vs 29.8 %")
    assert "IOR -1.4 points, 95 % CI [-3.9, +1.1]" in lines[-1]
    assert any(line.startswith("IOR (over random)") for line in lines)


def test_cli_summary_says_what_the_download_weighs(capsys):
    from pathlib import Path

    from fd2_core.cli import print_summary
    from fd2_core.pipeline import PipelineResult
    from fd2_core.spec_resolution import resolve_spec

    storage = {"distilled_images_bytes": 41_200, "soft_labels_bytes": 267_100, "soft_labels_kind": "stored",
               "compressed_bytes": 308_300, "real_data_bytes": 3_100_000, "real_data_kind": "encoded files",
               "compression_ratio": 3_100_000 / 308_300, "teacher_bytes": 1_200_000}
    report = {"timings_s": {"total": 3.0}, "device": {"type": "cpu"}, "storage": storage}
    result = PipelineResult(artifacts={"report.json": Path("out/report.json")}, metrics={}, report=report)
    print_summary(resolve_spec({"preset": "cpu-small"}), result)
    lines = capsys.readouterr().out.splitlines()
    assert ("storage: images 41.2 KB + soft labels 267.1 KB = 308.3 KB; real data 3.1 MB (encoded files); "
            "ratio ×10.1 (real / (images + labels)); teacher 1.2 MB") in lines
    # a report written before storage was measured prints no such line
    print_summary(resolve_spec({"preset": "cpu-small"}), PipelineResult({}, {}, {**report, "storage": None}))
    assert not any(line.startswith("storage:") for line in capsys.readouterr().out.splitlines())
