"""FD² losses against slow, obvious Python-loop references."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fd2_core.losses import (
    BNStatMatcher,
    batch_statistics,
    cal_pretrain_loss,
    center_loss,
    distillation_loss,
    fc_loss,
    normalized_l2_distance,
    pairwise_normalized_l2_distance,
    sc_loss,
)
from fd2_core.models import CALOutput, build_model


def ref_distance(a: list[float], b: list[float]) -> float:
    diff = math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))
    norm_a = math.sqrt(sum(x * x for x in a))
    norm_b = math.sqrt(sum(y * y for y in b))
    return diff / (norm_a + norm_b + 1e-6)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_normalized_l2_distance_matches_reference_and_broadcasts(gen):
    a = torch.randn(4, 1, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    d = normalized_l2_distance(a, b)
    assert d.shape == (4, 3)
    for i in range(4):
        for k in range(3):
            assert d[i, k].item() == pytest.approx(ref_distance(a[i, 0].tolist(), b[k].tolist()), rel=1e-5)
    assert normalized_l2_distance(b, b).abs().max().item() == 0.0
    assert ((d >= 0) & (d <= 1)).all()


def test_pairwise_distance_matches_broadcast_version(gen):
    a = torch.randn(7, 32, generator=gen)
    b = 3.0 * torch.randn(5, 32, generator=gen)
    expected = [[ref_distance(a[i].tolist(), b[k].tolist()) for k in range(5)] for i in range(7)]
    assert torch.allclose(pairwise_normalized_l2_distance(a, b), torch.tensor(expected), atol=1e-5)


def test_fc_loss_intra_and_inter_match_reference(gen):
    num_classes, rho = 5, 0.3
    embedding = F.normalize(torch.randn(9, 16, generator=gen), dim=-1)
    prototypes = 2.0 * torch.randn(num_classes, 16, generator=gen)
    labels = torch.tensor([0, 1, 1, 4, 2, 2, 2, 3, 0])
    intra_terms, inter_terms = [], []
    for i, y in enumerate(labels.tolist()):
        z = embedding[i].tolist()
        intra_terms.append(ref_distance(z, prototypes[y].tolist()))
        others = [ref_distance(z, prototypes[k].tolist()) for k in range(num_classes) if k != y]
        inter_terms.append(sum(others) / len(others))
    intra = sum(intra_terms) / len(intra_terms)
    inter = 1.0 - sum(inter_terms) / len(inter_terms)
    terms = fc_loss(embedding, labels, prototypes, rho)
    assert terms.intra.item() == pytest.approx(intra, abs=1e-5)
    assert terms.inter.item() == pytest.approx(inter, abs=1e-5)
    assert terms.total.item() == pytest.approx(rho * intra + (1 - rho) * inter, abs=1e-5)


def test_fc_loss_is_finite_when_embedding_equals_its_prototype(gen):
    prototypes = F.normalize(torch.randn(3, 8, generator=gen), dim=-1)
    embedding = prototypes[[0, 2]].clone().requires_grad_(True)
    terms = fc_loss(embedding, torch.tensor([0, 2]), prototypes, 0.5)
    terms.total.backward()
    assert terms.intra.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(embedding.grad).all()


def test_fc_loss_with_normalized_prototypes_equals_raw_loss_on_unit_prototypes(gen):
    embedding = F.normalize(torch.randn(6, 16, generator=gen), dim=-1)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    prototypes = torch.randn(4, 16, generator=gen)
    small = 0.05 * F.normalize(prototypes, dim=-1)  # the norm the prototype update leaves them at
    normalized = fc_loss(embedding, labels, small, 0.5, normalize_prototypes=True)
    reference = fc_loss(embedding, labels, F.normalize(prototypes, dim=-1), 0.5)
    assert normalized.total.item() == pytest.approx(reference.total.item(), abs=1e-6)
    # raw distances to short prototypes hardly depend on the class: own and other distances nearly coincide
    raw = fc_loss(embedding, labels, small, 0.5)
    assert abs((1 - raw.inter.item()) - raw.intra.item()) < abs((1 - normalized.inter.item()) - normalized.intra.item())


def test_sc_loss_matches_reference(gen):
    previous = torch.rand(3, 4, 2, 3, 3, generator=gen)
    current = torch.rand(4, 2, 3, 3, generator=gen)
    per_class = []
    for c in range(4):
        a_j = current[c].flatten().tolist()
        mean_d = sum(ref_distance(previous[t, c].flatten().tolist(), a_j) for t in range(3)) / 3
        per_class.append(1.0 - mean_d)
    assert sc_loss(current, previous).item() == pytest.approx(sum(per_class) / 4, abs=1e-6)


def test_sc_loss_without_previous_images_is_zero_and_rejects_bad_shapes(gen):
    current = torch.rand(4, 2, 3, 3, generator=gen)
    assert sc_loss(current, torch.empty(0, 4, 2, 3, 3)).item() == 0.0
    with pytest.raises(ValueError):
        sc_loss(current, torch.rand(2, 3, 2, 3, 3))


def test_center_loss_matches_reference(gen):
    embedding = torch.randn(6, 5, generator=gen)
    prototypes = torch.randn(3, 5, generator=gen)
    prototypes[1] = 0.0  # a class never updated: its normalised prototype is zero
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    total = 0.0
    for i, y in enumerate(labels.tolist()):
        p = prototypes[y].tolist()
        norm = math.sqrt(sum(v * v for v in p))
        target = [v / norm if norm > 0 else 0.0 for v in p]
        total += sum((z - t) ** 2 for z, t in zip(embedding[i].tolist(), target, strict=True))
    assert center_loss(embedding, labels, prototypes).item() == pytest.approx(total / 6, rel=1e-5)


def _small_bn_net(gen: torch.Generator) -> nn.Sequential:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5)
    )
    for bn in (net[1], net[4]):
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
    return net.eval()


def ref_bn_term(x: torch.Tensor, bn: nn.BatchNorm2d) -> float:
    mean_sq, var_sq = 0.0, 0.0
    for c in range(x.shape[1]):
        values = x[:, c].flatten().tolist()
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / len(values)
        mean_sq += (mean - bn.running_mean[c].item()) ** 2
        var_sq += (var - bn.running_var[c].item()) ** 2
    return math.sqrt(mean_sq) + math.sqrt(var_sq)


def test_bn_matching_loss_matches_reference(gen):
    net = _small_bn_net(gen)
    x = torch.randn(3, 3, 6, 6, generator=gen)
    with torch.no_grad():
        first_input = net[0](x)
        second_input = net[3](net[2](net[1](first_input)))
    expected = 7.0 * ref_bn_term(first_input, net[1]) + ref_bn_term(second_input, net[4])
    with BNStatMatcher([net[1], net[4]], first_multiplier=7.0) as matcher:
        net(x)
        assert matcher.loss().item() == pytest.approx(expected, rel=1e-4)
        with matcher.paused():
            net(torch.zeros_like(x))  # must not overwrite the recorded statistics
        assert matcher.loss().item() == pytest.approx(expected, rel=1e-4)
        matcher.reset()
        with pytest.raises(RuntimeError):
            matcher.loss()


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_statistics_values_and_gradient_match_var_mean(gen, channels_last):
    x = 1.5 * torch.randn(4, 3, 5, 5, generator=gen) + 0.7
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    weights = torch.randn(2, 3, generator=gen)
    mean, var = batch_statistics(x)
    ((weights[0] * mean).sum() + (weights[1] * var).sum()).backward()
    reference = x.detach().clone().requires_grad_(True)
    ref_var, ref_mean = torch.var_mean(reference, dim=(0, 2, 3), correction=0)
    ((weights[0] * ref_mean).sum() + (weights[1] * ref_var).sum()).backward()
    assert torch.allclose(mean, ref_mean, atol=1e-5) and torch.allclose(var, ref_var, atol=1e-4)
    assert torch.allclose(x.grad, reference.grad, atol=1e-5)


def _hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_bn_matcher_removes_every_hook_on_exit_and_on_exception(gen):
    model = build_model("convnet", 3, 16, cal=True).eval()
    baseline = _hook_count(model)
    with BNStatMatcher(model.bn_layers()) as matcher:
        assert _hook_count(model) == baseline + len(model.bn_layers())
        model(torch.randn(2, 3, 16, 16, generator=gen))
        assert matcher.loss().item() > 0
    assert _hook_count(model) == baseline
    with pytest.raises(KeyError), BNStatMatcher(model.bn_layers()):
        model(torch.randn(2, 3, 16, 16, generator=gen))
        raise KeyError("boom")
    assert _hook_count(model) == baseline


@pytest.fixture
def distill_setup(gen):
    torch.manual_seed(0)
    model = build_model("convnet", 4, 16, cal=True).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.cal_head.prototypes.copy_(torch.randn(4, model.cal_head.embedding_dim, generator=gen))
    for bn in model.bn_layers():
        bn.running_mean.uniform_(-0.5, 0.5)
    images = torch.randn(4, 3, 16, 16, generator=gen, requires_grad=True)
    return model, images, torch.arange(4)


@pytest.mark.parametrize("loss_name", ["fc", "sc", "bn", "cal_ce", "backbone_ce"])
def test_each_distill_loss_sends_gradient_to_the_images(distill_setup, loss_name):
    model, images, labels = distill_setup
    with BNStatMatcher(model.bn_layers()) as matcher:
        out = model(images)
        losses = {
            "fc": lambda: fc_loss(out.cal.embedding, labels, model.cal_head.prototypes, 0.5).total,
            "sc": lambda: sc_loss(out.cal.attention, torch.rand(2, *out.cal.attention.shape)),
            "bn": matcher.loss,
            "cal_ce": lambda: F.cross_entropy(out.cal.logits, labels),
            "backbone_ce": lambda: F.cross_entropy(out.logits, labels),
        }
        losses[loss_name]().backward()
    assert torch.isfinite(images.grad).all()
    assert images.grad.abs().sum().item() > 0


DISTILL_WEIGHTS = {"cal_ratio": 0.3, "r_bn": 0.01, "lambda_fc": 2.0, "fc_rho": 0.4, "lambda_sc": 0.5, "sc_tau": 0.0}


def test_distillation_loss_is_the_weighted_sum_of_its_terms(distill_setup, gen):
    model, images, labels = distill_setup
    prototypes = model.cal_head.prototypes
    with BNStatMatcher(model.bn_layers()) as bn:
        out = model(images)
        previous = torch.rand(2, *out.cal.attention.shape, generator=gen)
        terms = distillation_loss(out.logits, out.cal, labels, bn, **DISTILL_WEIGHTS, prototypes=prototypes,
                                  previous_attention=previous)
        ce = 0.3 * F.cross_entropy(out.cal.logits, labels) + 0.7 * F.cross_entropy(out.logits, labels)
        fc = fc_loss(out.cal.embedding, labels, prototypes, 0.4).total
        sc = sc_loss(out.cal.attention, previous)
        expected = ce + 0.01 * bn.loss() + 2.0 * fc + 0.5 * sc
    assert terms.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert (terms.ce.item(), terms.fc.item(), terms.sc.item()) == pytest.approx((ce.item(), fc.item(), sc.item()))
    parts = terms.parts()
    assert list(parts) == ["ce", "bn", "fc", "sc"] and not any(p.requires_grad for p in parts.values())
    terms.total.backward()
    assert images.grad.abs().sum().item() > 0


def test_distillation_loss_leaves_out_switched_off_terms_and_sc_below_tau(distill_setup, gen):
    model, images, labels = distill_setup
    with BNStatMatcher(model.bn_layers()) as bn:
        out = model(images)
        previous = torch.rand(2, *out.cal.attention.shape, generator=gen)
        plain = distillation_loss(out.logits, None, labels, bn, **DISTILL_WEIGHTS)
        above_tau = distillation_loss(out.logits, out.cal, labels, bn, **{**DISTILL_WEIGHTS, "sc_tau": 1.0},
                                      previous_attention=previous)
        without_sc = distillation_loss(out.logits, out.cal, labels, bn, **DISTILL_WEIGHTS)
        backbone_only = F.cross_entropy(out.logits, labels) + 0.01 * bn.loss()
    assert plain.fc is None and plain.sc is None and list(plain.parts()) == ["ce", "bn"]
    assert plain.total.item() == pytest.approx(backbone_only.item(), rel=1e-6)
    assert above_tau.sc is not None and above_tau.sc.item() < 1.0  # L_SC is below τ = 1: measured, not added
    assert above_tau.total.item() == pytest.approx(without_sc.total.item(), rel=1e-6)


def test_cal_pretrain_loss_combines_terms_as_specified(gen):
    def cal_output(batch: int) -> CALOutput:
        logits = torch.randn(batch, 3, generator=gen)
        return CALOutput(
            torch.rand(batch, 2, 2, 2),
            F.normalize(torch.randn(batch, 4, generator=gen), dim=-1),
            logits,
            torch.randn(batch, 3, generator=gen),
        )

    def ce(rows: torch.Tensor, ys: list[int]) -> float:
        return sum(
            -math.log(math.exp(r[y]) / sum(math.exp(v) for v in r))
            for r, y in zip(rows.tolist(), ys, strict=True)
        ) / len(ys)

    original, crop, drop = cal_output(2), cal_output(2), cal_output(2)
    backbone_logits, labels = torch.randn(2, 3, generator=gen), torch.tensor([2, 0])
    prototypes = torch.randn(3, 4, generator=gen)
    ys = labels.tolist()
    effect = torch.cat([original.effect_logits, crop.effect_logits, drop.effect_logits])
    center = center_loss(original.embedding, labels, prototypes).item()
    r = 0.3
    expected = (1 - r) * ce(backbone_logits, ys) + r * (
        ce(original.logits, ys) / 3
        + ce(effect, ys * 3)
        + 2 / 3 * ce(torch.cat([crop.logits, drop.logits]), ys * 2)
        + center
    )
    terms = cal_pretrain_loss(backbone_logits, original, crop, drop, labels, prototypes, r)
    assert terms.total.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError):
        cal_pretrain_loss(
            backbone_logits, original._replace(effect_logits=None), crop, drop, labels, prototypes, r
        )
