"""Starting teachers from a backbone pretrained on other classes: disjoint FGSynth classes, feature
extractor files (classifier left fresh, everything else strict) and the shipped base backbone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fd2_core.data.dataset import load_dataset, parse_fgsynth_source
from fd2_core.data.errors import DataError
from fd2_core.data.fgsynth import MAX_CLASSES, class_recipes, generate
from fd2_core.models import build_model, save_model_weights
from fd2_core.models.base_backbone import BASE_BACKBONE_SPEC, base_backbone_path
from fd2_core.models.weights import (
    FEATURE_EXTRACTOR_FORMAT,
    classifier_name,
    is_feature_extractor,
    read_metadata,
    save_feature_extractor,
)
from fd2_core.progress import ProgressTracker
from fd2_core.spec_resolution import resolve_spec
from fd2_core.stages.context import RunContext
from fd2_core.stages.pretrain import pretrain

# ---------------------------------------------------------------- fgsynth: classes past the first K


@pytest.mark.parametrize("variant", ["birds", "cars"])
def test_first_class_draws_the_later_recipes_of_the_same_numbering(variant):
    shifted = class_recipes(20, variant, first_class=20)
    assert shifted == class_recipes(40, variant)[20:]
    assert not {r.key for r in shifted} & {r.key for r in class_recipes(20, variant)}
    assert class_recipes(20, variant, first_class=0) == class_recipes(20, variant)
    last = class_recipes(5, variant, first_class=MAX_CLASSES - 5)
    assert last[-1].name.startswith(f"{MAX_CLASSES - 1}_")
    for bad in (-1, MAX_CLASSES - 4):
        with pytest.raises(ValueError, match="first_class"):
            class_recipes(5, variant, first_class=bad)


def test_first_class_changes_the_parts_only():
    kwargs = {"num_classes": 3, "train_per_class": 4, "test_per_class": 2, "seed": 3, "with_masks": True}
    base, shifted = generate(**kwargs), generate(first_class=20, **kwargs)
    assert shifted.classes == [r.name for r in class_recipes(23)[20:]] == sorted(shifted.classes)
    assert np.array_equal(shifted.train_labels, base.train_labels)
    assert shifted.params["first_class"] == 20 and base.params["first_class"] == 0
    outside = (base.train.part_masks == 0) & (shifted.train.part_masks == 0)
    assert np.array_equal(base.train_images[outside], shifted.train_images[outside])
    assert not np.array_equal(base.train_images, shifted.train_images)
    again = generate(**kwargs)
    assert np.array_equal(base.train_images, again.train_images) and np.array_equal(base.test_images,
                                                                                    again.test_images)


def test_fgsynth_source_takes_first_and_describes_it_only_when_set():
    assert parse_fgsynth_source("fgsynth:first=20,classes=3", 32)["first_class"] == 20
    shifted = load_dataset("fgsynth:classes=3,first=20,train=2,test=1", 16)
    assert "first=20" in shifted.source and shifted.classes[0].startswith("20_")
    plain = load_dataset("fgsynth:classes=3,train=2,test=1", 16)
    assert "first" not in plain.source and plain.classes[0].startswith("0_")
    for bad in ("fgsynth:first=x", f"fgsynth:classes=3,first={MAX_CLASSES - 2}", "fgsynth:first=-1"):
        with pytest.raises(DataError) as info:
            load_dataset(bad, 16)
        assert info.value.code == "bad_source"


# ---------------------------------------------------------------- feature extractor files


@pytest.mark.parametrize("backbone", ["convnet", "resnet18", "mobilenetv2"])
def test_feature_extractor_loads_into_any_number_of_classes_with_fresh_classifier_and_cal_head(tmp_path, backbone):
    torch.manual_seed(0)
    source = build_model(backbone, 7, 32, cal=False, width=16)
    for module in source.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_()
    path = save_feature_extractor(source, tmp_path / "fe.safetensors", {"classes": ["a", "b"]})
    assert is_feature_extractor(path) and read_metadata(path)["format"] == FEATURE_EXTRACTOR_FORMAT
    assert json.loads(read_metadata(path)["classes"]) == ["a", "b"]
    head = classifier_name(source.backbone)
    assert head == ("fc" if backbone == "resnet18" else "classifier")

    torch.manual_seed(1)
    fresh = build_model(backbone, 20, 32, cal=True, num_attention_maps=2, width=16)
    torch.manual_seed(1)
    loaded = build_model(backbone, 20, 32, cal=True, num_attention_maps=2, width=16, weights_path=path,
                         weights_mode="backbone")
    with pytest.raises(ValueError, match="feature extractor .*teacher_weights_mode=backbone"):
        # full mode needs a classifier
        build_model(backbone, 7, 32, cal=False, width=16, weights_path=path)
    own = source.backbone.state_dict()
    for key, value in loaded.backbone.state_dict().items():
        if key.split(".")[0] == head:
            # fresh, as without the file
            assert torch.equal(value, fresh.backbone.state_dict()[key]), key
        else:
            assert torch.equal(value, own[key]), key
    for key, value in loaded.cal_head.state_dict().items():
        assert torch.equal(value, fresh.cal_head.state_dict()[key]), key


def test_feature_extractor_keys_stay_strict(tmp_path):
    path = save_feature_extractor(build_model("convnet", 5, 32, cal=False, width=16), tmp_path / "fe.safetensors",
                                  {"backbone": "convnet", "model_width": 16, "image_size": 32})
    with pytest.raises(ValueError, match=r"feature extractor .*model_width 16.*wrong shape"):
        build_model("convnet", 5, 32, cal=False, width=32, weights_path=path, weights_mode="backbone")
    with pytest.raises(ValueError, match="missing: features.6"):  # 64 px adds a block
        build_model("convnet", 5, 64, cal=False, width=16, weights_path=path, weights_mode="backbone")
    state = build_model("convnet", 5, 32, cal=True, width=16).state_dict()
    marked = {"format": FEATURE_EXTRACTOR_FORMAT}
    save_file({k: v.contiguous() for k, v in state.items() if k.startswith("backbone.")},
              str(tmp_path / "with_classifier.safetensors"), metadata=marked)
    with pytest.raises(ValueError, match="not backbone features: backbone.classifier"):
        build_model("convnet", 5, 32, cal=False, width=16, weights_path=tmp_path / "with_classifier.safetensors",
                    weights_mode="backbone")
    save_file({k: v.contiguous() for k, v in state.items() if "classifier" not in k},
              str(tmp_path / "with_cal.safetensors"), metadata=marked)
    with pytest.raises(ValueError, match="not backbone features: cal_head"):
        build_model("convnet", 5, 32, cal=True, width=16, weights_path=tmp_path / "with_cal.safetensors",
                    weights_mode="backbone")


def test_full_files_without_the_mark_still_need_the_same_classes(tmp_path):
    path = tmp_path / "teacher.safetensors"
    save_model_weights(build_model("convnet", 5, 32, cal=False, width=16), path)
    assert not is_feature_extractor(path) and not is_feature_extractor(tmp_path / "absent.pt")
    with pytest.raises(ValueError, match=r"do not fit the backbone .*num_classes.*wrong shape: classifier"):
        build_model("convnet", 7, 32, cal=False, width=16, weights_path=path)


# ---------------------------------------------------------------- the shipped base backbone


def test_shipped_base_backbone_is_small_disjoint_and_fits_the_cpu_small_teacher():
    path = base_backbone_path()
    assert path.stat().st_size < 200 * 1024
    meta = read_metadata(path)
    assert meta["format"] == FEATURE_EXTRACTOR_FORMAT
    for key in ("classes", "recipe", "seed", "data_seed", "date", "torch", "command", "tensors_sha256"):
        assert key in meta, key
    assert int(meta["data_seed"]) not in (0, 7)
    for variant in ("birds", "cars"):
        trained = {name.split("/", 1)[1] for name in json.loads(meta["classes"]) if name.startswith(variant + "/")}
        assert trained and not trained & {r.name for r in class_recipes(20, variant)}
        assert all(int(name.split("_")[0]) >= 20 for name in trained)
    spec = resolve_spec({"preset": "cpu-small"})
    assert {k: getattr(spec, k) for k in BASE_BACKBONE_SPEC} == BASE_BACKBONE_SPEC
    model = build_model("convnet", 20, 32, cal=True, width=spec.model_width, weights_path=path,
                        weights_mode="backbone")
    assert model.backbone.classifier.out_features == 20


@pytest.mark.parametrize("method", ["sre2l++", "fd2"])
def test_pretrain_stage_starts_from_the_base_backbone(tmp_path, method):
    torch.set_num_threads(1)
    data = load_dataset("fgsynth:classes=3,train=8,test=2,seed=5", 32)
    spec = resolve_spec({"preset": "cpu-small", "device": "cpu", "method": method, "pretrain_epochs": 1,
                         "val_fraction": 0.25, "num_attention_maps": 2, "teacher_weights_mode": "backbone"})
    ctx = RunContext(spec=spec, data=data, workdir=tmp_path, device=torch.device("cpu"),
                     tracker=ProgressTracker({}, None, None), teacher_weights=base_backbone_path())
    result = pretrain(ctx)
    assert 0.0 <= result.info["backbone_test_accuracy"] <= 1.0
    assert result.model.backbone.classifier.out_features == 3
