"""Can this job run on this data within this budget? One answer for the API, the worker and the pipeline.

`admission_problems(spec, counts, budget)` returns every reason a job cannot run, as data (`Problem`), and each
caller translates them: the API into a 422, the worker into a failed job, the pipeline into a `DataError`. So
a rule is written once and the three places cannot drift apart. The rules: at least two classes, every class
holds `ipc` training images (ipc real images initialise the synthetic ones), evaluation has test images, and
the estimated cost and decoded size (`fd2_core.cost`) stay within the operator's limits.

The counts are the ones the job's loader will see: a dataset stored without a split of its own is carved at the
job's `test_fraction` by the loader's one rule (`fd2_core.data.layout.carved_test_count`).
Torch-free: the API imports it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from fd2_core.cost import DatasetSize, decoded_dataset_bytes, estimate_cost
from fd2_core.data.errors import DEFAULT_FIXES
from fd2_core.data.layout import carved_test_count
from fd2_core.spec import JobSpec


@dataclass(frozen=True)
class Problem:
    """One reason a job cannot run.

    `field` is the spec field to change (bare, e.g. `ipc`; None when several could), `code` a stable snake_case
    reason, `message` one line that says the cause and then the fix, `details` JSON-ready context.
    """

    field: str | None
    code: str
    message: str
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


class Budget(Protocol):
    """The operator's limits admission checks (the service's settings have both)."""

    @property
    def max_job_cost(self) -> float: ...  # 32-px image passes (fd2_core.cost)

    @property
    def max_dataset_memory_bytes(self) -> int: ...


@dataclass(frozen=True)
class JobCounts:
    """The images a job will see: training images per class (class name → count, in class order) and test
    images over all classes."""

    train_per_class: dict[str, int]
    test_images: int

    @classmethod
    def of_splits(cls, per_class: Mapping[str, Mapping[str, int]]) -> JobCounts:
        """Counts already split as the job will see them (`{class: {"train": n, "test": m}}`), e.g. a layout
        scanned at the job's own fraction."""
        return cls({name: int(split.get("train", 0)) for name, split in per_class.items()},
                   sum(int(split.get("test", 0)) for split in per_class.values()))

    @property
    def size(self) -> DatasetSize:
        return DatasetSize(len(self.train_per_class), sum(self.train_per_class.values()), self.test_images)


def job_counts(per_class: Mapping[str, Mapping[str, int]], *, splits_given: bool, test_fraction: float) -> JobCounts:
    """What a job at `test_fraction` sees of a dataset stored as `{class: {"train": n, "test": m}}`.

    Splits the source gave are used as they are; otherwise train + test is the class's whole and the job's own
    fraction carves it again, with the loader's rule.
    """
    if splits_given:
        return JobCounts.of_splits(per_class)
    train: dict[str, int] = {}
    test = 0
    for name, split in per_class.items():
        total = int(split.get("train", 0)) + int(split.get("test", 0))
        carved = carved_test_count(total, test_fraction)
        train[name] = total - carved
        test += carved
    return JobCounts(train, test)


def class_problem(counts: JobCounts) -> Problem | None:
    """Distillation tells classes apart: one class (or none) gives nothing to learn."""
    classes = list(counts.train_per_class)
    if len(classes) >= 2:
        return None
    return Problem(None, "one_class", f"the dataset has {len(classes)} class(es); at least two are needed; "
                   f"{DEFAULT_FIXES['one_class']}", {"classes": classes})


def ipc_problem(spec: JobSpec, train_per_class: Mapping[str, int]) -> Problem | None:
    """Each class needs at least `ipc` training images (ipc real images initialise the synthetic ones)."""
    if not train_per_class:
        return None
    smallest = min(train_per_class, key=lambda name: train_per_class[name])
    have = train_per_class[smallest]
    if spec.ipc <= have:
        return None
    return Problem(
        "ipc", "ipc_too_large",
        f"ipc={spec.ipc} is larger than the smallest class ({smallest!r}: {have} train images); lower ipc to at "
        f"most {have}, or add training images to {smallest!r}",
        {"ipc": spec.ipc, "smallest_class": smallest, "smallest_class_train_images": have},
    )


def evaluation_problem(spec: JobSpec, counts: JobCounts) -> Problem | None:
    """Evaluation trains students and scores them on the real test images: none, nothing to score."""
    if not spec.evaluate or counts.test_images > 0:
        return None
    return Problem("evaluate", "no_test_split",
                   "evaluation needs test images; set evaluate=false or add a test split (a test/ folder)")


def budget_problems(spec: JobSpec, size: DatasetSize, budget: Budget) -> list[Problem]:
    """The estimated cost and the decoded size against the operator's limits."""
    found: list[Problem] = []
    estimate = estimate_cost(spec, size)
    if estimate.cost > budget.max_job_cost:
        found.append(Problem(
            None, "cost_too_high",
            f"the job's estimated cost of {estimate.cost:.3g} image passes is above the limit of "
            f"{budget.max_job_cost:.3g}; lower ipc, iterations, epochs or image_size",
            {"estimated_cost": estimate.cost, "max_job_cost": budget.max_job_cost,
             "stage_image_passes": estimate.stage_passes, "pixel_factor": estimate.pixel_factor},
        ))
    memory = decoded_dataset_bytes(spec, size)
    if memory > budget.max_dataset_memory_bytes:
        found.append(Problem(
            None, "dataset_too_large",
            f"the dataset decodes to {memory} bytes at {spec.image_size} px, above the limit of "
            f"{budget.max_dataset_memory_bytes}; lower image_size or use fewer images",
            {"decoded_bytes": memory, "max_dataset_memory_bytes": budget.max_dataset_memory_bytes},
        ))
    return found


def admission_problems(spec: JobSpec, counts: JobCounts, budget: Budget | None = None) -> list[Problem]:
    """Every reason `spec` cannot run on data with `counts` (empty: it can), in the order to fix them: classes,
    ipc, test split, then cost and size against `budget` (None: no operator limits, as for the library)."""
    found = [p for p in (class_problem(counts), ipc_problem(spec, counts.train_per_class),
                         evaluation_problem(spec, counts)) if p is not None]
    if budget is not None:
        found += budget_problems(spec, counts.size, budget)
    return found


__all__ = [
    "Budget",
    "JobCounts",
    "Problem",
    "admission_problems",
    "budget_problems",
    "class_problem",
    "evaluation_problem",
    "ipc_problem",
    "job_counts",
]
