"""What a job will cost, estimated from its spec and dataset size alone (torch-free).

The API refuses a job whose estimate is above the operator's limit before it reaches a worker, and the worker
checks again with the files it actually found. The unit is the *32-px image pass*: one image through the
network once at 32 px; a training step (forward + backward) counts as three passes, and larger images cost
in proportion to their pixel count. It is a coarse bound meant to stop runaway specs (100 ipc x 100 000
iterations x thousands of classes), not a price. It is the one cost model: admission (`fd2_core.admission`)
checks its total against the operator's limit, and the pipeline weights its progress bar by its stages.
"""

from __future__ import annotations

from dataclasses import dataclass

from fd2_core.fadrm import input_side, phase_schedule
from fd2_core.label_formats import LabelEncoding, kept_epoch_count
from fd2_core.spec import PUBLISHED_PATCH_FILES, JobSpec

REFERENCE_SIDE = 32
TRAIN_STEP_PASSES = 3.0  # forward + backward ≈ three forward passes
CAL_PASSES = 3.0  # the CAL head adds a counterfactual and an attention-augmented pass per image
# Packaging a synthetic image: a teacher pass for the preview's attention map, and about as much again to
# encode it into the archive and the preview.
PACKAGE_PASSES = 2.0
RGB_CHANNELS = 3


@dataclass(frozen=True)
class DatasetSize:
    """The counts a cost estimate needs: classes and images per split as the job will see them."""

    num_classes: int
    train_images: int
    test_images: int

    @property
    def total_images(self) -> int:
        return self.train_images + self.test_images


@dataclass(frozen=True)
class CostEstimate:
    """Image passes per stage at the spec's image size, and their total in 32-px image passes."""

    stage_passes: dict[str, float]
    pixel_factor: float

    @property
    def image_passes(self) -> float:
        return sum(self.stage_passes.values())

    @property
    def cost(self) -> float:
        return self.image_passes * self.pixel_factor


def stage_image_passes(spec: JobSpec, size: DatasetSize) -> dict[str, float]:
    """Image passes of each stage, in run order: pretrain, distill, relabel, evaluate, package (the pipeline's
    progress weights are these numbers).

    distill = ipc·distill_iterations·K training steps for the optimising methods on sre2l++, ipc·K·Σ_p
    steps_p·(size_p/S)² for those on fadrm+ (`fadrm_steps_at_full_size`), plus the teacher's scoring of the patch
    pool (`patch_scoring_passes`) for rded and the patch initialisation. A committee of T teachers pretrains T
    times, relabels through T models, and distils through T models per step unless it takes one per step
    (round robin). A spec that trains a patch scorer (`JobSpec.trains_scorer`: the published patch rule under
    FD²) pretrains once more, a plain teacher: pretrain_epochs·n_train training steps without the CAL passes.

    relabel = the teacher passes of the recorded epochs (`label_epoch_fraction` of them; none for online
    labels, docs/SOFT_LABELS.md). evaluate = per student on the set (distilled; random subset; distilled
    with hard labels when eval_hlr): relabel_epochs·n_syn training steps + one test pass; the random
    subset's relabel; for online labels the teacher's pass at every step of each soft-label student; and with
    eval_hlr the full-data student (fd2_core.stages.full_data): pretrain_epochs·n_train training steps + one
    test pass.
    package = PACKAGE_PASSES per synthetic image.
    """
    k, n_train = size.num_classes, size.train_images
    n_syn = spec.ipc * k
    teachers = len(spec.members)
    per_teacher = spec.pretrain_epochs * n_train * TRAIN_STEP_PASSES
    pretrain = per_teacher * (teachers * (CAL_PASSES if spec.uses_cal else 1.0) + int(spec.trains_scorer))
    distill = patch_scoring_passes(spec, size)
    if spec.optimises_images:
        steps = fadrm_steps_at_full_size(spec) if spec.recipe == "fadrm+" else spec.distill_iterations
        distill += spec.ipc * steps * k * TRAIN_STEP_PASSES * (1 if spec.round_robin else teachers)
    encoding = LabelEncoding.from_spec(spec)
    # teacher passes of one relabel walk: the recorded epochs only; none for online labels
    recorded = 0 if encoding.online else kept_epoch_count(spec.relabel_epochs, encoding.epoch_fraction)
    relabel = float(recorded * n_syn * teachers)
    evaluate = 0.0
    if spec.evaluate:
        students = 1 + int(spec.eval_random_baseline) + int(spec.eval_hlr)
        # online labels: each soft-label student (the set's, the random subset's) forwards the teacher
        online_students = (1 + int(spec.eval_random_baseline)) if encoding.online else 0
        walk = spec.relabel_epochs * n_syn
        evaluate = (walk * TRAIN_STEP_PASSES * students + recorded * n_syn * teachers
                    + walk * teachers * online_students + size.test_images * students)
        if spec.eval_hlr:
            evaluate += spec.pretrain_epochs * n_train * TRAIN_STEP_PASSES + size.test_images
    package = n_syn * PACKAGE_PASSES
    return {"pretrain": pretrain, "distill": distill, "relabel": relabel, "evaluate": evaluate, "package": package}


def fadrm_steps_at_full_size(spec: JobSpec) -> float:
    """FADRM+ steps of one image in steps at the spec's side S: Σ_p steps_p·(side_p/S)², side_p the crop side
    the teacher sees in phase p (the phase's side; S for a backbone fixed to it, `fd2_core.fadrm.input_side`)."""
    side, backbone = spec.image_size, spec.members[0].backbone
    return sum(p.steps * (input_side(backbone, side, p.size) / side) ** 2 for p in phase_schedule(spec))


def patch_scoring_passes(spec: JobSpec, size: DatasetSize) -> float:
    """Forward passes that score the patch views (fd2_core.stages.patches), each view padded to the full image
    side; once per run. `ranked`: `patch_candidates` views of up to `patch_pool` images per class, whatever the
    ipc; min(K·patch_pool, train images) bounds the pool Σ_c min(patch_pool, n_c) without the per-class counts.
    `published`: per class at most min(ipc, PUBLISHED_PATCH_FILES) patch files (those some index picks), each
    `patch_candidates` views of the first n = min(smallest class, patch_pool) images; the smallest class holds at
    most the mean, train images // K."""
    if not spec.scores_patches:
        return 0.0
    if spec.patch_rule == "published":
        pool = min(spec.patch_pool, size.train_images // max(size.num_classes, 1))
        return float(size.num_classes * min(spec.ipc, PUBLISHED_PATCH_FILES) * pool * spec.patch_candidates)
    pool = min(spec.patch_pool * size.num_classes, size.train_images)
    return float(pool * spec.patch_candidates)


def estimate_cost(spec: JobSpec, size: DatasetSize) -> CostEstimate:
    """The cost of running `spec` on a dataset of `size`."""
    pixel_factor = (spec.image_size / REFERENCE_SIDE) ** 2
    return CostEstimate(stage_image_passes(spec, size), pixel_factor)


def decoded_dataset_bytes(spec: JobSpec, size: DatasetSize) -> int:
    """Memory the decoded dataset takes: every image as uint8 RGB at the spec's side."""
    return size.total_images * spec.image_size * spec.image_size * RGB_CHANNELS


__all__ = [
    "CostEstimate",
    "DatasetSize",
    "decoded_dataset_bytes",
    "estimate_cost",
    "fadrm_steps_at_full_size",
    "patch_scoring_passes",
    "stage_image_passes",
]
