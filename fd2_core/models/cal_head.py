"""Counterfactual attention learning (CAL) head and its bilinear attention pooling (FD² stage 1).

The pooled features and the CAL classifier run in fp32 even under autocast: the signed square root and the
L2 normalisation are sensitive to bf16 rounding, and both are tiny next to the backbone.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

SIGNED_SQRT_EPS = 1e-6
LOGIT_SCALE = 100.0


class CALOutput(NamedTuple):
    attention: Tensor  # A [B, M, H, W]
    embedding: Tensor  # z [B, M*C], unit L2 norm
    logits: Tensor  # p = W(100 z) [B, K]
    effect_logits: Tensor | None  # p - W(100 ẑ) [B, K], only when asked for the counterfactual


def _flatten_spatial_last(x: Tensor) -> Tensor:
    """[B, C, H, W] → [B, H*W, C]; a view for channels_last tensors."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


def bilinear_attention_pool(feature_map: Tensor, attention: Tensor) -> Tensor:
    """z = normalize(signed_sqrt(V)), V[b,m,c] = (1/HW) Σ_hw A[b,m,h,w]·F[b,c,h,w], flattened to [B, M*C].

    signed_sqrt(v) = sign(v)·sqrt(|v| + 1e-6). One batched matmul, computed in fp32.
    """
    with torch.autocast(device_type=feature_map.device.type, enabled=False):
        features = _flatten_spatial_last(feature_map.float())
        maps = _flatten_spatial_last(attention.float())
        pooled = torch.bmm(maps.transpose(1, 2), features) / features.shape[1]
        pooled = pooled.flatten(1)
        pooled = torch.sign(pooled) * torch.sqrt(pooled.abs() + SIGNED_SQRT_EPS)
        return F.normalize(pooled, dim=-1)


class CALHead(nn.Module):
    """Attention maps, bilinear pooling, a bias-free classifier and the class prototypes.

    `prototypes` is a buffer (saved with the weights, never trained by gradient) updated by
    `update_prototypes` after each pretraining batch.
    """

    prototypes: Tensor

    def __init__(self, in_channels: int, num_classes: int, num_maps: int = 8) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.num_maps = num_maps
        self.conv = nn.Conv2d(in_channels, num_maps, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(num_maps, eps=1e-3)
        self.classifier = nn.Linear(num_maps * in_channels, num_classes, bias=False)
        self.register_buffer("prototypes", torch.zeros(num_classes, num_maps * in_channels))

    @property
    def embedding_dim(self) -> int:
        return self.num_maps * self.in_channels

    def attention(self, feature_map: Tensor) -> Tensor:
        """A = ReLU(BN(Conv1x1(F)))."""
        return F.relu(self.bn(self.conv(feature_map)))

    def _classify(self, embedding: Tensor) -> Tensor:
        with torch.autocast(device_type=embedding.device.type, enabled=False):
            return F.linear(LOGIT_SCALE * embedding, self.classifier.weight.float())

    def forward(self, feature_map: Tensor, *, counterfactual: bool = False) -> CALOutput:
        """Attention, embedding and logits; with `counterfactual`, also the effect logits p − W(100 ẑ).

        ẑ pools `F` with a fake attention: uniform in [0, 2] while training, all ones in eval.
        """
        attention = self.attention(feature_map)
        embedding = bilinear_attention_pool(feature_map, attention)
        logits = self._classify(embedding)
        effect_logits = None
        if counterfactual:
            if self.training:
                fake = torch.rand_like(attention, dtype=torch.float32) * 2.0
            else:
                fake = torch.ones_like(attention, dtype=torch.float32)
            effect_logits = logits - self._classify(bilinear_attention_pool(feature_map, fake))
        return CALOutput(attention, embedding, logits, effect_logits)

    @torch.no_grad()
    def update_prototypes(self, embedding: Tensor, labels: Tensor, beta: float) -> None:
        """P_k ← P_k + β·(mean_{i: y_i = k} z_i − normalize(P_k)) for every class k present in the batch."""
        labels = labels.to(self.prototypes.device, torch.long)
        embedding = embedding.detach().to(self.prototypes.device, torch.float32)
        sums = torch.zeros_like(self.prototypes).index_add_(0, labels, embedding)
        counts = torch.bincount(labels, minlength=self.num_classes).to(sums.dtype)
        means = sums / counts.clamp(min=1.0).unsqueeze(1)
        present = (counts > 0).to(sums.dtype).unsqueeze(1)
        self.prototypes.add_(beta * present * (means - F.normalize(self.prototypes, dim=-1)))
