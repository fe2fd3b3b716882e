"""Presets against the published settings (the FD² paper's CAL table and its
distill and relabel settings): (M, r) per dataset and backbone, iterations
and relabel batch per dataset, and the user's own values winning."""

from __future__ import annotations

import pytest

from fd2_core.presets import PRESET_DESCRIPTIONS, PRESETS
from fd2_core.spec import BACKBONES, JobSpec, ValidationError
from fd2_core.spec_resolution import resolve_spec

# The published (M, r) table written out; the convnet (no column in the paper) takes the ResNet-18
# column under a paper preset; cpu-small keeps the field defaults for every backbone.
EXPECTED_M_R: dict[str, dict[str, tuple[int, float]]] = {
    "cpu-small": {
        "convnet": (8, 0.5), "resnet18": (8, 0.5), "mobilenetv2": (8, 0.5), "resnet50": (8, 0.5),
        "densenet121": (8, 0.5),
    },
    "paper-cub": {
        "convnet": (8, 0.5), "resnet18": (8, 0.5), "mobilenetv2": (16, 0.5), "resnet50": (8, 0.3),
        "densenet121": (16, 0.4),
    },
    "paper-aircraft": {
        "convnet": (32, 0.3), "resnet18": (32, 0.3), "mobilenetv2": (16, 0.2), "resnet50": (32, 0.4),
        "densenet121": (16, 0.4),
    },
    "paper-cars": {
        "convnet": (8, 0.3), "resnet18": (8, 0.3), "mobilenetv2": (16, 0.4), "resnet50": (32, 0.4),
        "densenet121": (32, 0.4),
    },
}
# The FADRM+ presets read the same table as their dataset's preset; the CPU
# one keeps the field defaults.
EXPECTED_M_R.update({f"{name}-fadrm": EXPECTED_M_R[name] for name in ("cpu-small", "paper-cub", "paper-aircraft",
                                                                      "paper-cars")})
EXPECTED_SCHEDULE = {  # (distill_iterations, relabel_batch_size)
    "cpu-small": (300, 20),
    "paper-cub": (10_000, 20),
    "paper-aircraft": (4_000, 20),
    "paper-cars": (4_000, 14),
}
PAPER_PRESETS = ("paper-cub", "paper-aircraft", "paper-cars")
OUR_BACKBONES = ("convnet", "resnet18", "resnet50", "mobilenetv2", "densenet121")
CASES = [(preset, backbone) for preset in EXPECTED_M_R for backbone in OUR_BACKBONES]


def _resolve(preset: str, backbone: str, **user: object) -> JobSpec:
    return resolve_spec({"preset": preset, "backbone": backbone, **user})


def test_the_table_covers_every_preset_and_backbone() -> None:
    assert set(EXPECTED_M_R) == set(PRESETS) == set(PRESET_DESCRIPTIONS)
    assert set(BACKBONES) == set(OUR_BACKBONES)


@pytest.mark.parametrize(("preset", "backbone"), CASES)
def test_m_and_r_follow_the_published_table(preset: str, backbone: str) -> None:
    spec = _resolve(preset, backbone)
    assert (spec.num_attention_maps, spec.cal_ratio) == EXPECTED_M_R[preset][backbone]
    assert spec.backbone == backbone


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_the_preset_alone_resolves_to_resnet18_and_its_column(preset: str) -> None:
    spec = resolve_spec({"preset": preset})
    assert spec.backbone == "resnet18" and spec.torchvision_weights
    assert (spec.num_attention_maps, spec.cal_ratio) == EXPECTED_M_R[preset]["resnet18"]
    assert (PRESETS[preset]["num_attention_maps"], PRESETS[preset]["cal_ratio"]) == EXPECTED_M_R[preset]["resnet18"]


@pytest.mark.parametrize(("preset", "backbone"), CASES)
def test_a_value_the_user_sets_wins(preset: str, backbone: str) -> None:
    both = _resolve(preset, backbone, num_attention_maps=5, cal_ratio=0.77)
    assert (both.num_attention_maps, both.cal_ratio) == (5, 0.77)
    published_m, published_r = EXPECTED_M_R[preset][backbone]
    only_m = _resolve(preset, backbone, num_attention_maps=5)
    assert (only_m.num_attention_maps, only_m.cal_ratio) == (5, published_r)
    only_r = _resolve(preset, backbone, cal_ratio=0.77)
    assert (only_r.num_attention_maps, only_r.cal_ratio) == (published_m, 0.77)


def test_a_user_value_equal_to_the_preset_is_kept_when_the_backbone_changes() -> None:
    # M = 8 is the ResNet-18 value on Cars; set explicitly, it must not move to ResNet-50's 32.
    spec = resolve_spec({"preset": "paper-cars", "backbone": "resnet50", "num_attention_maps": 8})
    assert (spec.num_attention_maps, spec.cal_ratio) == (8, 0.4)


@pytest.mark.parametrize("preset", sorted(EXPECTED_SCHEDULE))
def test_iterations_and_relabel_batch_per_dataset(preset: str) -> None:
    spec = resolve_spec({"preset": preset})
    assert (spec.distill_iterations, spec.relabel_batch_size) == EXPECTED_SCHEDULE[preset]
    assert spec.distill_lr == 1e-3
    user = resolve_spec({"preset": preset, "distill_iterations": 7, "relabel_batch_size": 3})
    assert (user.distill_iterations, user.relabel_batch_size) == (7, 3)


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_presets_share_the_published_pretraining_and_distillation(preset: str) -> None:
    spec = resolve_spec({"preset": preset})
    assert spec.pretrain_augment == "published"
    assert (spec.image_size, spec.jitter, spec.r_bn, spec.distill_batch_classes) == (224, 32, 1e-3, 100)
    assert (spec.pretrain_optimizer, spec.pretrain_lr, spec.pretrain_batch_size, spec.pretrain_epochs) == (
        "sgd", 1e-3, 4, 50,
    )
    assert (spec.pretrain_weight_decay, spec.pretrain_lr_decay, spec.relabel_epochs) == (1e-5, 0.9, 400)
    assert resolve_spec({"preset": preset, "pretrain_augment": "resized-crop"}).pretrain_augment == "resized-crop"


def test_cpu_small_keeps_its_own_settings() -> None:
    spec = resolve_spec({"preset": "cpu-small"})
    assert PRESETS["cpu-small"] == {"model_width": 32, "eval_lr": 3e-3, "eval_temperature": 4.0,
                                    "distill_crop": "batch", "patch_rule": "published", "synthetic_format": "jpeg"}
    assert (spec.backbone, spec.image_size, spec.pretrain_augment) == ("convnet", 32, "auto")


def test_cpu_small_runs_the_data_path_its_validation_chose() -> None:
    """The validation run kept every published data-path value (docs/BENCHMARKS.md): cpu-small and its FADRM+
    version resolve to the paper presets' choices, so an FD² job trains the plain patch scorer too."""
    paper = resolve_spec({"preset": "paper-cub"})
    for preset in ("cpu-small", "cpu-small-fadrm"):
        spec = resolve_spec({"preset": preset, "method": "fd2"})
        assert (spec.distill_crop, spec.patch_rule, spec.synthetic_format) == (
            paper.distill_crop, paper.patch_rule, paper.synthetic_format) == ("batch", "published", "jpeg")
        assert spec.trains_scorer
    assert not resolve_spec({"preset": "cpu-small", "method": "sre2l++"}).trains_scorer


def test_other_resolution_rules_are_unchanged() -> None:
    base = resolve_spec({"preset": "paper-cub", "backbone": "mobilenetv2", "method": "sre2l++"})
    assert (base.cal, base.fc, base.sc) == (False, False, False)
    assert (base.num_attention_maps, base.cal_ratio) == (16, 0.5)
    assert resolve_spec({"preset": "paper-cars", "evaluate": False}).eval_random_baseline is False


@pytest.mark.parametrize("raw", [{"preset": []}, {"preset": "paper-cub", "backbone": ["resnet50"]},
                                 {"preset": "paper-nowhere"}, {"preset": "paper-cub", "backbone": "vgg19"}])
def test_malformed_preset_or_backbone_is_a_validation_error(raw: dict[str, object]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        resolve_spec(raw)


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_a_convnet_under_a_paper_preset_starts_from_scratch_unless_told(preset: str) -> None:
    assert _resolve(preset, "convnet").torchvision_weights is False
    assert _resolve(preset, "resnet18").torchvision_weights is True
    with pytest.raises(ValidationError):
        _resolve(preset, "convnet", torchvision_weights=True)


@pytest.mark.parametrize("method", ["sre2l++", "random"])
def test_cal_soft_labels_need_the_cal_head(method: str) -> None:
    for source in ("cal", "mixed"):
        with pytest.raises(ValidationError, match="soft_label_source"):
            resolve_spec({"method": method, "soft_label_source": source})
    assert resolve_spec({"method": "fd2", "soft_label_source": "cal"}).soft_label_source == "cal"


def test_teacher_checkpoint_is_selected_on_the_soft_label_logits() -> None:
    from fd2_core.stages.pretrain import selection_ratio

    # backbone logits are the soft labels
    assert selection_ratio(resolve_spec({"method": "fd2"})) is None
    assert selection_ratio(resolve_spec({"method": "sre2l++"})) is None
    mixed = resolve_spec({"method": "fd2", "soft_label_source": "mixed", "cal_ratio": 0.3})
    assert selection_ratio(mixed) == 0.3


# The published data path (docs/DATA_PATH.md), written out per preset:
# distill_crop, patch_rule, synthetic_format, amp, amp_dtype. cpu-small's three
# data-path fields were chosen on validation data and stayed published.
EXPECTED_DATA_PATH = {
    "cpu-small": ("batch", "published", "jpeg", True, "bfloat16"),
    "cpu-small-fadrm": ("batch", "published", "jpeg", True, "bfloat16"),
    **{name: ("batch", "published", "jpeg", False, "bfloat16") for name in PAPER_PRESETS},
    **{f"{name}-fadrm": ("batch", "published", "jpeg", True, "float16") for name in PAPER_PRESETS},
}


@pytest.mark.parametrize("preset", sorted(EXPECTED_DATA_PATH))
def test_paper_presets_run_the_published_data_path(preset: str) -> None:
    assert set(EXPECTED_DATA_PATH) == set(PRESETS)
    spec = resolve_spec({"preset": preset})
    got = (spec.distill_crop, spec.patch_rule, spec.synthetic_format, spec.amp, spec.amp_dtype)
    assert got == EXPECTED_DATA_PATH[preset]
    assert (spec.cal_crop_drop, spec.pretrain_lr_decay_mode) == ("published", "continuous")


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_a_user_value_wins_over_the_data_path_of_a_preset(preset: str) -> None:
    user = {"distill_crop": "image", "patch_rule": "ranked", "synthetic_format": "png", "amp": True}
    spec = resolve_spec({"preset": preset, **user})
    assert {k: getattr(spec, k) for k in user} == user
