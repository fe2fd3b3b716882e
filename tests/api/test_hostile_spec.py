"""The other side of the spec cases in the hostile corpus: values on a bound are accepted, and the
cost estimate behaves as documented (it follows the pipeline's own stage weights)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hostile_corpus import numeric_bounds

from api.errors import ApiError
from api.spec_checks import resolve_job_spec
from fd2_config.settings import Settings
from fd2_core.cost import DatasetSize, decoded_dataset_bytes, estimate_cost, patch_scoring_passes
from fd2_core.presets import PRESETS
from fd2_core.spec_resolution import resolve_spec

BOUNDS = list(numeric_bounds())
CUB_LIKE = DatasetSize(num_classes=200, train_images=5994, test_images=5794)
DEFAULT_MAX_COST = Settings.model_fields["max_job_cost"].default
DEFAULT_MAX_MEMORY = Settings.model_fields["max_dataset_memory_bytes"].default


def _inside(kind: type, attr: str, bound: float) -> float:
    if attr in ("ge", "le"):
        return bound
    step = 1 if kind is int else max(abs(bound), 1.0) * 1e-3
    return bound + step if attr == "gt" else bound - step


@pytest.mark.parametrize(("name", "kind", "attr", "bound"), BOUNDS, ids=[f"{b[0]}-{b[2]}" for b in BOUNDS])
def test_values_on_or_just_inside_a_bound_are_accepted(name: str, kind: type, attr: str, bound: float) -> None:
    value = _inside(kind, attr, bound)
    assert getattr(resolve_job_spec({name: value}), name) == value


def test_integral_floats_count_as_integers_and_fractions_do_not() -> None:
    assert resolve_job_spec({"ipc": 3.0}).ipc == 3
    with pytest.raises(ApiError) as refused:
        resolve_job_spec({"ipc": 3.5})
    assert refused.value.code == "invalid_spec" and refused.value.details[0]["field"] == "ipc"


def test_cost_grows_with_ipc_and_the_square_of_the_image_side() -> None:
    base = estimate_cost(resolve_spec({"ipc": 2}), CUB_LIKE)
    double_ipc = estimate_cost(resolve_spec({"ipc": 4}), CUB_LIKE)
    # the published patch rule (the default) scores one patch file per class and index up to 5 files, so
    # below 5 the scoring grows with the ipc like the optimisation does
    assert double_ipc.stage_passes["distill"] == 2 * base.stage_passes["distill"]
    assert double_ipc.stage_passes["pretrain"] == base.stage_passes["pretrain"]
    # the ranked rule ranks the pool once per run, whatever the ipc
    ranked, ranked_double = ({"ipc": ipc, "patch_rule": "ranked"} for ipc in (2, 4))
    scoring = patch_scoring_passes(resolve_spec(ranked), CUB_LIKE)
    assert scoring == patch_scoring_passes(resolve_spec(ranked_double), CUB_LIKE) > 0
    assert estimate_cost(resolve_spec(ranked_double), CUB_LIKE).stage_passes["distill"] - scoring == 2 * (
        estimate_cost(resolve_spec(ranked), CUB_LIKE).stage_passes["distill"] - scoring)
    wide = estimate_cost(resolve_spec({"ipc": 2, "image_size": 64}), CUB_LIKE)
    assert wide.cost == pytest.approx(4 * base.cost)
    assert estimate_cost(resolve_spec({"method": "random"}), CUB_LIKE).stage_passes["distill"] == 0


def test_cost_follows_the_pipeline_stage_weights() -> None:
    from fd2_core.pipeline import stage_weights

    spec = resolve_spec({"ipc": 3, "method": "fd2"})
    data = SimpleNamespace(classes=[str(i) for i in range(CUB_LIKE.num_classes)],
                           train_images=SimpleNamespace(shape=(CUB_LIKE.train_images, 3, 32, 32)),
                           test_images=SimpleNamespace(shape=(CUB_LIKE.test_images, 3, 32, 32)))
    weights = stage_weights(spec, data)
    passes = estimate_cost(spec, CUB_LIKE).stage_passes
    for stage in ("pretrain", "distill", "relabel"):
        assert passes[stage] == weights[stage]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_default_limits_admit_every_preset_on_a_large_fine_grained_dataset(preset: str) -> None:
    spec = resolve_spec({"preset": preset, "ipc": 50})
    assert estimate_cost(spec, CUB_LIKE).cost < DEFAULT_MAX_COST
    assert decoded_dataset_bytes(spec, CUB_LIKE) < DEFAULT_MAX_MEMORY


def test_a_runaway_spec_is_over_the_default_limit() -> None:
    spec = resolve_spec({"preset": "paper-cub", "ipc": 100, "distill_iterations": 100_000, "image_size": 512})
    huge = DatasetSize(num_classes=5000, train_images=400_000, test_images=100_000)
    assert estimate_cost(spec, huge).cost > DEFAULT_MAX_COST
