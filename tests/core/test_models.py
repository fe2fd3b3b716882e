"""Backbones, the CAL head and weight files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from fd2_core.models import (
    BACKBONES,
    CALHead,
    FD2Model,
    bilinear_attention_pool,
    build_model,
    save_model_weights,
)
from fd2_core.spec import BACKBONES as SPEC_BACKBONES

EXPECTED_CHANNELS = {"convnet": 128, "resnet18": 512, "resnet50": 2048, "mobilenetv2": 1280, "densenet121": 1024}


@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_build_model_output_shapes(backbone, image_size):
    torch.manual_seed(0)
    num_classes, maps = 5, 4
    model = build_model(backbone, num_classes, image_size, cal=True, num_attention_maps=maps).eval()
    plain = build_model(backbone, num_classes, image_size, cal=False).eval()
    x = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        out = model(x, counterfactual=True)
        plain_out = plain(x)
    channels = EXPECTED_CHANNELS[backbone]
    assert isinstance(model, FD2Model) and model.feature_channels == channels
    assert out.logits.shape == plain_out.logits.shape == (2, num_classes)
    b, c, h, w = out.feature_map.shape
    assert (b, c) == (2, channels) and h >= 4 and w >= 4
    assert out.cal.attention.shape == (2, maps, h, w)
    assert out.cal.embedding.shape == (2, maps * channels)
    assert out.cal.logits.shape == out.cal.effect_logits.shape == (2, num_classes)
    assert plain_out.cal is None
    with pytest.raises(ValueError):
        plain(x, counterfactual=True)


def test_low_resolution_feature_maps():
    sizes = {
        name: build_model(name, 3, 32, cal=False).eval()(torch.randn(1, 3, 32, 32)).feature_map.shape[-1]
        for name in ("convnet", "resnet18")
    }
    assert sizes == {"convnet": 8, "resnet18": 4}


def test_width_sets_convnet_channels_and_torchvision_backbones_ignore_it():
    narrow = build_model("convnet", 3, 32, cal=True, num_attention_maps=2, width=16)
    out = narrow.eval()(torch.randn(2, 3, 32, 32))
    assert narrow.feature_channels == 16 and out.feature_map.shape[1] == 16
    assert out.cal.embedding.shape == (2, 2 * 16)
    assert build_model("resnet18", 3, 32, cal=False, width=16).feature_channels == 512


def test_the_registry_builds_exactly_the_backbones_the_spec_accepts():
    """The spec's names are the one list: a backbone added on one side only would be refused or unreachable."""
    assert sorted(BACKBONES) == sorted(SPEC_BACKBONES)


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError) as error:
        build_model("vgg11", 3, 32, cal=False)
    for name in BACKBONES:
        assert name in str(error.value)


def test_bn_layers_in_forward_order_with_cal_bn_last():
    model = build_model("resnet18", 3, 32, cal=True)
    layers = model.bn_layers()
    assert all(isinstance(layer, _BatchNorm) for layer in layers)
    assert layers[0] is model.backbone.bn1
    assert layers[-1] is model.cal_head.bn
    assert len(layers) == sum(isinstance(m, _BatchNorm) for m in model.modules())
    called: list[_BatchNorm] = []
    handles = [layer.register_forward_hook(lambda m, i, o: called.append(m)) for layer in layers]
    model.eval()(torch.randn(1, 3, 32, 32))
    for handle in handles:
        handle.remove()
    assert [id(m) for m in called] == [id(m) for m in layers]


def test_bilinear_attention_pool_matches_reference():
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(2, 3, 2, 3, generator=gen, dtype=torch.float64)
    attention = torch.rand(2, 4, 2, 3, generator=gen, dtype=torch.float64)
    z = bilinear_attention_pool(features, attention)
    for b in range(2):
        values = []
        for m in range(4):
            for c in range(3):
                v = (
                    sum(
                        attention[b, m, i, j].item() * features[b, c, i, j].item()
                        for i in range(2)
                        for j in range(3)
                    )
                    / 6
                )
                values.append((1 if v > 0 else -1 if v < 0 else 0) * (abs(v) + 1e-6) ** 0.5)
        norm = sum(v * v for v in values) ** 0.5
        assert torch.allclose(z[b], torch.tensor([v / norm for v in values], dtype=z.dtype), atol=1e-6)


def test_bilinear_attention_pool_accepts_channels_last():
    gen = torch.Generator().manual_seed(2)
    features, attention = torch.randn(2, 6, 4, 4, generator=gen), torch.rand(2, 3, 4, 4, generator=gen)
    expected = bilinear_attention_pool(features, attention)
    got = bilinear_attention_pool(
        features.to(memory_format=torch.channels_last), attention.to(memory_format=torch.channels_last)
    )
    assert torch.allclose(got, expected, atol=1e-6)


def test_update_prototypes_uses_per_class_mean():
    gen = torch.Generator().manual_seed(3)
    head = CALHead(in_channels=2, num_classes=4, num_maps=2)
    assert head.prototypes.shape == (4, 4) and not head.prototypes.any()
    assert "prototypes" in head.state_dict()
    beta = 0.05
    reference = [[0.0] * 4 for _ in range(4)]
    for labels in (torch.tensor([1, 1, 3, 1]), torch.tensor([0, 3, 3, 1, 1])):
        embedding = torch.randn(len(labels), 4, generator=gen)
        head.update_prototypes(embedding, labels, beta)
        for k in range(4):
            members = [embedding[i].tolist() for i in range(len(labels)) if labels[i] == k]
            if not members:
                continue
            mean = [sum(col) / len(members) for col in zip(*members, strict=True)]
            norm = sum(v * v for v in reference[k]) ** 0.5
            unit = [v / norm if norm > 0 else 0.0 for v in reference[k]]
            reference[k] = [p + beta * (m - u) for p, m, u in zip(reference[k], mean, unit, strict=True)]
        assert torch.allclose(head.prototypes, torch.tensor(reference), atol=1e-6)
    assert not head.prototypes[2].any()


def test_counterfactual_uses_ones_in_eval_and_random_attention_in_train():
    torch.manual_seed(0)
    head = CALHead(in_channels=6, num_classes=3, num_maps=2)
    features = torch.randn(4, 6, 3, 3)
    head.eval()
    first, second = head(features, counterfactual=True), head(features, counterfactual=True)
    assert head(features).effect_logits is None
    assert torch.equal(first.effect_logits, second.effect_logits)
    ones = bilinear_attention_pool(features, torch.ones_like(first.attention))
    expected = first.logits - F.linear(100.0 * ones, head.classifier.weight)
    assert torch.allclose(first.effect_logits, expected, atol=1e-4)
    head.train()
    first, second = head(features, counterfactual=True), head(features, counterfactual=True)
    assert torch.equal(first.logits, second.logits)
    assert not torch.allclose(first.effect_logits, second.effect_logits)


def test_weights_round_trip_through_safetensors(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 32, cal=True, num_attention_maps=2)
    model.cal_head.update_prototypes(
        torch.randn(4, model.cal_head.embedding_dim), torch.tensor([0, 1, 1, 2]), 0.5
    )
    model.backbone.bn1.running_mean.uniform_()
    path = tmp_path / "teacher.safetensors"
    save_model_weights(model, path)
    loaded = build_model("resnet18", 3, 32, cal=True, num_attention_maps=2, weights_path=path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x).cal.logits, loaded.eval()(x).cal.logits)
    backbone_only = tmp_path / "backbone.pt"
    torch.save(model.backbone.state_dict(), backbone_only)
    plain = build_model("resnet18", 3, 32, cal=False, weights_path=backbone_only)
    assert torch.equal(plain.backbone.bn1.running_mean, model.backbone.bn1.running_mean)


def test_mismatched_weights_raise_a_clear_error(tmp_path):
    path = tmp_path / "convnet.safetensors"
    save_model_weights(build_model("convnet", 3, 32, cal=False), path)
    with pytest.raises(ValueError, match="wrong shape"):
        build_model("convnet", 5, 32, cal=False, weights_path=path)
    save_file({"backbone.extra": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        build_model("convnet", 3, 32, cal=False, weights_path=tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError):
        build_model("convnet", 3, 32, cal=False, weights_path=tmp_path / "absent.safetensors")


def test_bf16_autocast_and_channels_last():
    torch.manual_seed(0)
    model = build_model("convnet", 3, 32, cal=True).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, counterfactual=True)
    assert out.logits.dtype == torch.bfloat16
    assert out.cal.embedding.dtype == out.cal.logits.dtype == torch.float32
    assert torch.isfinite(out.cal.effect_logits).all()
    assert torch.allclose(out.cal.embedding.norm(dim=-1), torch.ones(2), atol=1e-5)
