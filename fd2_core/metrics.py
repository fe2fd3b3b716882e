"""DD-Ranking's metrics for one distilled set, their uncertainty, and a verdict against random.

Definitions follow "DD-Ranking: Rethinking the Evaluation of Dataset Distillation" (Li et al., 2025); every
accuracy is a top-1 fraction on the real test split, every student trained under the job's own protocol:

- IOR, improvement over random: `IOR = acc(student | distilled set, soft labels)
  − acc(student | random real subset of the same size, soft labels)`. Soft labels lift any subset, so a
  distilled set is only worth its cost when IOR > 0.
- HLR, hard-label recovery: `HLR = acc(student | full real train set, hard labels)
  − acc(student | distilled set, hard labels)`: what the images alone, without the teacher's labels, still
  miss of the full data (lower is better).

The `ddranking` package (0.2.0) that ships these metrics is not used: its evaluators load the real data by
dataset name (CIFAR-10/100 with `download=True`, TinyImageNet and ImageNet folders; any other name fails),
load teachers from `<teacher_dir>/<dataset>/<model>/ckpt_best.pt` and build students from their own model zoo,
so they cannot take our in-memory tensors, teacher or student; they train with their own loop (a learning-rate
search over five values and the best test accuracy every 20 epochs, both selected on the test split, which
the published evaluation rules out), draw the random subset with a time-based seed, assume class-major label
order, write CSV files under `./results`, pin `numpy<2` (we run numpy 2) and pull in kornia, timm, pandas and
scipy; and in 0.2.0 the random-subset path of `LabelRobustScoreSoft` calls `get_random_data_tensors` with one
argument missing and a `self.teacher_model` attribute that does not exist. The two definitions above are one
subtraction each; what matters is that both sides share one protocol, which the pipeline guarantees.

Uncertainty: every student is tested on the same test images in the same order, so the two accuracies of a
difference are paired. `bootstrap_interval` resamples test images (not students: a student's training noise
is not covered) and gives a percentile interval for the difference (Efron & Tibshirani, "An Introduction to
the Bootstrap", 1993, ch. 13).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95

VerdictStatus = Literal["beats_random", "not_distinguishable", "loses_to_random"]


@dataclass(frozen=True)
class StudentResult:
    """Test result of a student: `correct` bool [N_test] in test-split order, `accuracy` its mean."""

    accuracy: float
    correct: torch.Tensor

    @classmethod
    def from_correct(cls, correct: torch.Tensor) -> StudentResult:
        """accuracy = correct.double().mean() (NaN for an empty test split)."""
        return cls(float(correct.double().mean()), correct)


def ior(distilled_accuracy: float, random_accuracy: float) -> float:
    """Improvement over random: `acc(distilled) − acc(random subset of the same size)`, same protocol."""
    return distilled_accuracy - random_accuracy


def hlr(full_data_accuracy: float, distilled_hard_accuracy: float) -> float:
    """Hard-label recovery: `acc(full real train set, hard labels) − acc(distilled set, hard labels)`."""
    return full_data_accuracy - distilled_hard_accuracy


def bootstrap_interval(
    correct_a: torch.Tensor,
    correct_b: torch.Tensor,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float]:
    """Paired percentile bootstrap interval of `mean(correct_a) − mean(correct_b)` over the test images.

    `correct_a`, `correct_b`: bool [N], per test image, same order. A resample draws N images with replacement
    and takes the mean of d_i = a_i − b_i ∈ {−1, 0, +1}; that mean only depends on how many drawn images have
    d = +1 and d = −1, which are multinomial(N; p₊, p₋, p₀) with p the observed shares. So each resample is
    drawn exactly as N₊ ~ Bin(N, p₊), N₋ | N₊ ~ Bin(N − N₊, p₋ / (1 − p₊)) and its mean is (N₊ − N₋) / N:
    the same distribution as resampling indices, in O(resamples) memory for any N. Seeded: the same inputs
    give the same interval.
    """
    a, b = correct_a.detach().reshape(-1).cpu().bool(), correct_b.detach().reshape(-1).cpu().bool()
    if a.shape != b.shape:
        raise ValueError(f"paired results need the same test images: {tuple(a.shape)} vs {tuple(b.shape)}")
    n = a.numel()
    if n == 0:
        raise ValueError("no test images to resample")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    p_plus = float((a & ~b).sum()) / n
    p_minus = float((~a & b).sum()) / n
    g = torch.Generator().manual_seed(seed)
    count = torch.full((resamples,), float(n), dtype=torch.float64)
    n_plus = torch.binomial(count, torch.full_like(count, p_plus), generator=g)
    rest = count - n_plus
    p_minus_given_rest = min(p_minus / (1.0 - p_plus), 1.0) if p_plus < 1.0 else 0.0
    n_minus = torch.binomial(rest, torch.full_like(rest, p_minus_given_rest), generator=g)
    means = (n_plus - n_minus) / n
    tail = (1.0 - level) / 2.0
    lo, hi = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return lo, hi


@dataclass(frozen=True)
class Verdict:
    """How a distilled set compares with a random real subset of the same size, in one plain sentence."""

    status: VerdictStatus
    distilled_accuracy: float
    random_accuracy: float
    ior: float
    ior_ci95: tuple[float, float]
    message: str

    @property
    def beats_random(self) -> bool:
        return self.status == "beats_random"

    def as_dict(self) -> dict[str, object]:
        return {
            "status": self.status,
            "beats_random": self.beats_random,
            "distilled_accuracy": self.distilled_accuracy,
            "random_accuracy": self.random_accuracy,
            "ior": self.ior,
            "ior_ci95": list(self.ior_ci95),
            "message": self.message,
        }


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def verdict(distilled_accuracy: float, random_accuracy: float, ior_ci95: tuple[float, float]) -> Verdict:
    """Beats random only when IOR > 0 and its whole interval lies above 0; otherwise say so with the numbers.

    beats_random: IOR > 0 and lo > 0; loses_to_random: hi < 0; not_distinguishable: the interval includes 0.
    """
    gain = ior(distilled_accuracy, random_accuracy)
    lo, hi = ior_ci95
    numbers = f"(IOR {_points(gain)} points, 95 % CI [{_points(lo)}, {_points(hi)}])"
    if gain > 0 and lo > 0:
        status: VerdictStatus = "beats_random"
        message = (
            f"this set scores {_pct(distilled_accuracy)} vs {_pct(random_accuracy)} for a random real subset of "
            f"the same size {numbers}: it beats random"
        )
    elif hi < 0:
        status = "loses_to_random"
        message = (
            f"WARNING: a random real subset of the same size scores {_pct(random_accuracy)} vs "
            f"{_pct(distilled_accuracy)} for this set {numbers}: this set loses to random; a random subset "
            "trains a better student"
        )
    else:
        status = "not_distinguishable"
        if gain > 0:
            lead = (
                f"WARNING: this set scores {_pct(distilled_accuracy)} vs {_pct(random_accuracy)} for a random "
                "real subset of the same size"
            )
        else:
            lead = (
                f"WARNING: a random real subset of the same size scores {_pct(random_accuracy)} vs "
                f"{_pct(distilled_accuracy)} for this set"
            )
        message = f"{lead} {numbers}: not distinguishable from random"
    return Verdict(status, distilled_accuracy, random_accuracy, gain, (lo, hi), message)


__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "CONFIDENCE",
    "StudentResult",
    "Verdict",
    "VerdictStatus",
    "bootstrap_interval",
    "hlr",
    "ior",
    "verdict",
]
