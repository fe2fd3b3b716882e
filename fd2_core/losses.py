"""Every FD² loss as batched tensor code (no Python loop over samples or classes).

Distances and statistics are computed in fp32 even under autocast: they are small next to the backbone and
their differences of near-equal quantities would lose too much in bf16.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from .models.cal_head import CALOutput

DISTANCE_EPS = 1e-6
_SQRT_EPS = 1e-12  # keeps the gradient of sqrt finite where two vectors coincide


@contextmanager
def _fp32(reference: Tensor) -> Iterator[None]:
    with torch.autocast(device_type=reference.device.type, enabled=False):
        yield


def normalized_l2_distance(a: Tensor, b: Tensor) -> Tensor:
    """d(a, b) = ||a − b||₂ / (||a||₂ + ||b||₂ + 1e-6) along the last dim (broadcasting), in [0, 1]."""
    with _fp32(a):
        a, b = a.float(), b.float()
        norm = partial(torch.linalg.vector_norm, dim=-1)
        return norm(a - b) / (norm(a) + norm(b) + DISTANCE_EPS)


def pairwise_normalized_l2_distance(a: Tensor, b: Tensor) -> Tensor:
    """d(a_i, b_k) for all pairs, [N, D] × [K, D] → [N, K], by one matmul: ||a−b||² = ||a||²+||b||²−2a·b.

    Precise where the two vectors differ; for a pair that (nearly) coincides prefer `normalized_l2_distance`.
    """
    with _fp32(a):
        a, b = a.float(), b.float()
        a_sq, b_sq = a.pow(2).sum(-1), b.pow(2).sum(-1)
        dist_sq = (a_sq.unsqueeze(1) + b_sq.unsqueeze(0) - 2.0 * (a @ b.T)).clamp_min(0.0)
        denominator = a_sq.sqrt().unsqueeze(1) + b_sq.sqrt().unsqueeze(0) + DISTANCE_EPS
        return (dist_sq + _SQRT_EPS).sqrt() / denominator


class FCTerms(NamedTuple):
    total: Tensor
    intra: Tensor
    inter: Tensor


def fc_loss(
    embedding: Tensor, labels: Tensor, prototypes: Tensor, rho: float, normalize_prototypes: bool = False
) -> FCTerms:
    """Fine-grained characteristic constraint.

    intra = mean_i d(z_i, P_{y_i});  inter = 1 − mean_i mean_{k≠y_i} d(z_i, P_k);
    L_FC = ρ·intra + (1 − ρ)·inter.  With a single class there is nothing to push away: inter = 0.
    `normalize_prototypes` uses P_k/||P_k|| instead of P_k: the prototype update keeps ||P_k|| near β while
    ||z|| = 1, and then d(z, P) ≈ 1/(1 + ||P||) for every class, so the raw distances barely tell classes apart.
    """
    num_classes = prototypes.shape[0]
    labels = labels.to(embedding.device, torch.long)
    prototypes = prototypes.to(embedding.device)
    if normalize_prototypes:
        prototypes = F.normalize(prototypes.float(), dim=-1)
    intra = normalized_l2_distance(embedding, prototypes[labels]).mean()
    if num_classes > 1:
        distances = pairwise_normalized_l2_distance(embedding, prototypes)
        own_class = F.one_hot(labels, num_classes).bool()
        mean_other = distances.masked_fill(own_class, 0.0).sum(1) / (num_classes - 1)
        inter = 1.0 - mean_other.mean()
    else:
        inter = intra.new_zeros(())
    return FCTerms(rho * intra + (1.0 - rho) * inter, intra, inter)


def sc_loss(current_attention: Tensor, previous_attention: Tensor) -> Tensor:
    """Similarity constraint: mean_c L_SC,c with L_SC,c = 1 − mean_{t<j} d(flat(A_t), flat(A_j)).

    `current_attention` [B, M, H, W] holds one image per class of the batch, `previous_attention`
    [J, B, M, H, W] the J already distilled images of the same classes (J = 0 gives 0). τ and λ_SC are the
    caller's.
    """
    if previous_attention.shape[1:] != current_attention.shape:
        expected = ", ".join(str(n) for n in current_attention.shape)
        raise ValueError(f"previous attention {tuple(previous_attention.shape)} must be [J, {expected}]")
    if previous_attention.shape[0] == 0:
        return current_attention.new_zeros((), dtype=torch.float32)
    current = current_attention.flatten(1).unsqueeze(0)
    previous = previous_attention.flatten(2).to(current.device)
    per_class = 1.0 - normalized_l2_distance(previous, current).mean(0)
    return per_class.mean()


def center_loss(embedding: Tensor, labels: Tensor, prototypes: Tensor) -> Tensor:
    """center = Σ_i ||z_i − normalize(P_{y_i})||² / B."""
    with _fp32(embedding):
        targets = F.normalize(prototypes.to(embedding.device).float(), dim=-1)[labels.to(embedding.device)]
        return (embedding.float() - targets).pow(2).sum() / embedding.shape[0]


class CALLossTerms(NamedTuple):
    total: Tensor
    backbone_ce: Tensor
    cal_ce: Tensor
    effect_ce: Tensor
    augmented_ce: Tensor
    center: Tensor


def cal_pretrain_loss(
    backbone_logits: Tensor,
    original: CALOutput,
    crop: CALOutput,
    drop: CALOutput,
    labels: Tensor,
    prototypes: Tensor,
    ratio: float,
) -> CALLossTerms:
    """Stage-1 loss with r = `ratio`:

    L = (1−r)·CE(f(x), y) + r·[CE(p, y)/3 + CE(p_eff over original+crop+drop, y)
                               + (2/3)·CE(p over crop+drop, y) + center].
    The three CAL outputs must carry effect logits (forward with `counterfactual=True`).
    """
    outputs = (original, crop, drop)
    if any(out.effect_logits is None for out in outputs):
        raise ValueError("cal_pretrain_loss needs effect logits: run the model with counterfactual=True")
    backbone_ce = F.cross_entropy(backbone_logits.float(), labels)
    cal_ce = F.cross_entropy(original.logits.float(), labels)
    effect_ce = F.cross_entropy(torch.cat([out.effect_logits for out in outputs]).float(), labels.repeat(3))
    augmented_ce = F.cross_entropy(torch.cat([crop.logits, drop.logits]).float(), labels.repeat(2))
    center = center_loss(original.embedding, labels, prototypes)
    cal_terms = cal_ce / 3.0 + effect_ce + (2.0 / 3.0) * augmented_ce + center
    total = (1.0 - ratio) * backbone_ce + ratio * cal_terms
    return CALLossTerms(total, backbone_ce, cal_ce, effect_ce, augmented_ce, center)


def _channel_sums(x: Tensor) -> tuple[Tensor, Tensor]:
    """Σx and Σx² per channel over every dim but 1, in fp32, without a full-size temporary when possible."""
    if x.is_contiguous() and x.dtype == torch.float32:
        rows = x.view(x.shape[0], x.shape[1], -1)  # reductions along the contiguous last dim are the fast ones
        return rows.sum(2).sum(0), torch.linalg.vector_norm(rows, dim=2).square().sum(0)
    dims = [0, *range(2, x.dim())]
    values = x.float()
    return values.sum(dims), (values * values).sum(dims)


class _ChannelMoments(torch.autograd.Function):
    """Per-channel mean and biased variance with a one-pass fused backward.

    Forward uses sums of x and x² (var = E[x²] − E[x]², in fp32): on CPU `torch.var_mean` over (N, H, W)
    is an order of magnitude slower than two row reductions, and BatchNorm inputs are centred enough for the
    cancellation to stay around 1e-5 relative. Backward is one `addcmul` over x:
    ∂L/∂x = x·(2 g_var/n) + (g_mean − 2 g_var·μ)/n.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        count = x.numel() // x.shape[1]
        total, total_sq = _channel_sums(x)
        mean = total / count
        var = (total_sq / count - mean * mean).clamp_min(0.0)
        ctx.save_for_backward(x, mean)
        ctx.count = count
        return mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mean: Tensor | None, grad_var: Tensor | None) -> Tensor:  # type: ignore[override]
        x, mean = ctx.saved_tensors
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        grad_var = torch.zeros_like(mean) if grad_var is None else grad_var
        shape = [1, -1] + [1] * (x.dim() - 2)
        scale = 2.0 * grad_var / ctx.count
        shift = grad_mean / ctx.count - scale * mean
        return torch.addcmul(shift.view(shape).to(x.dtype), x, scale.view(shape).to(x.dtype))


def batch_statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance (fp32) of a BatchNorm input [N, C, ...], differentiable."""
    with _fp32(x):
        return _ChannelMoments.apply(x)


class BNStatMatcher:
    """Context manager matching the batch statistics of BatchNorm inputs to the layers' running statistics.

    loss = Σ_l α_l (||μ_l(x) − μ_l^run||₂ + ||σ²_l(x) − σ²_l^run||₂) over the hooked layers for their most
    recent forward; α of the first layer is `first_multiplier`, the others 1. Hooks exist only inside the
    `with` block and are all removed on exit, also when an exception escapes. Forwards that must not
    overwrite the recorded statistics run inside `paused()`.
    """

    def __init__(self, bn_layers: Sequence[_BatchNorm], first_multiplier: float = 10.0) -> None:
        self.bn_layers = list(bn_layers)
        self.alphas = [first_multiplier if i == 0 else 1.0 for i in range(len(self.bn_layers))]
        self._handles: list[RemovableHandle] = []
        self._terms: dict[int, Tensor] = {}
        self._paused = False

    def _hook(self, index: int, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if self._paused:
            return
        with _fp32(inputs[0]):
            mean, var = batch_statistics(inputs[0])
            norm = torch.linalg.vector_norm
            self._terms[index] = norm(mean - module.running_mean) + norm(var - module.running_var)

    def __enter__(self) -> BNStatMatcher:
        if self._handles:
            raise RuntimeError("BNStatMatcher is already active")
        for index, layer in enumerate(self.bn_layers):
            if layer.running_mean is None or layer.running_var is None:
                raise ValueError(f"BatchNorm layer {index} tracks no running statistics to match")
        try:
            for index, layer in enumerate(self.bn_layers):
                self._handles.append(layer.register_forward_hook(partial(self._hook, index)))
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._remove_hooks()
        self.reset()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Run forwards that should not record statistics (e.g. computing reference attention maps)."""
        previous, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = previous

    def loss(self) -> Tensor:
        """Weighted matching loss of the most recent forward through the hooked layers."""
        if not self._terms:
            raise RuntimeError("no BatchNorm statistics recorded: run a forward pass inside the with-block")
        return torch.stack([self.alphas[i] * term for i, term in sorted(self._terms.items())]).sum()

    def reset(self) -> None:
        """Forget the recorded statistics (and the graph they hold)."""
        self._terms.clear()


class DistillLossTerms(NamedTuple):
    """One teacher's distillation loss and its terms; a switched-off term is None."""

    total: Tensor
    ce: Tensor  # r·CE_cal + (1 − r)·CE_bb, or CE_bb alone without the CAL head
    bn: Tensor  # the BatchNorm matching loss, before r_bn
    fc: Tensor | None  # L_FC, before λ_FC
    sc: Tensor | None  # L_SC, before λ_SC and the τ threshold

    def parts(self) -> dict[str, Tensor]:
        """The terms by name, detached, for progress events (switched-off terms left out)."""
        named = zip(self._fields[1:], self[1:], strict=True)
        return {name: term.detach() for name, term in named if term is not None}


def distillation_loss(
    logits: Tensor,
    cal: CALOutput | None,
    labels: Tensor,
    bn: BNStatMatcher,
    *,
    cal_ratio: float,
    r_bn: float,
    lambda_fc: float,
    fc_rho: float,
    lambda_sc: float,
    sc_tau: float,
    prototypes: Tensor | None = None,
    normalize_prototypes: bool = False,
    previous_attention: Tensor | None = None,
) -> DistillLossTerms:
    """Stage-2 loss per teacher (FD² paper) on an augmented synthetic batch, with r = `cal_ratio`:

    L = r·CE(p, y) + (1−r)·CE(f(x), y) + r_bn·BN + λ_FC·L_FC + λ_SC·L_SC·[L_SC ≥ τ].
    `logits` [B, K] are the backbone's f(x) and `cal` the CAL head's output (None: L = CE(f(x), y) + r_bn·BN);
    `bn` holds the statistics of this forward. FC is on when `prototypes` [K, D] are given and SC when
    `previous_attention` [J, B, M, H, W] is, both only with a CAL output (see `fc_loss`, `sc_loss`). The τ test
    is a tensor mask, not an `if`, so that the GPU does not wait for a sync every step.
    """
    ce_bb = F.cross_entropy(logits.float(), labels)
    if cal is not None:
        ce_cal = F.cross_entropy(cal.logits.float(), labels)
        loss = cal_ratio * ce_cal + (1.0 - cal_ratio) * ce_bb
    else:
        loss = ce_bb
    ce = loss
    bn_loss = bn.loss()
    loss = loss + r_bn * bn_loss
    fc = sc = None
    if prototypes is not None and cal is not None:
        fc = fc_loss(cal.embedding.float(), labels, prototypes, fc_rho, normalize_prototypes=normalize_prototypes).total
        loss = loss + lambda_fc * fc
    if previous_attention is not None and cal is not None:
        sc = sc_loss(cal.attention.float(), previous_attention)
        loss = loss + lambda_sc * sc * (sc.detach() >= sc_tau)
    return DistillLossTerms(loss, ce, bn_loss, fc, sc)
