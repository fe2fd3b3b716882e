"""The one job-spec schema shared by the CLI, the API and the worker.

This module is the schema alone: the fields, their validators and the lists of allowed names.
Every field carries its default, range and a one-line description.
The presets are partial dictionaries of the same fields (`fd2_core.presets`).
`fd2_core.spec_resolution.resolve_spec` applies them before the user's own values.
Torch-free on purpose: the API validates specs at submit time without loading torch.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Method = Literal["fd2", "sre2l++", "fadrm+", "rded", "random"]
Base = Literal["sre2l++", "fadrm+"]
Backbone = Literal["convnet", "resnet18", "resnet50", "mobilenetv2", "densenet121"]
PresetName = Literal[
    "cpu-small", "paper-cub", "paper-cars", "paper-aircraft",
    "cpu-small-fadrm", "paper-cub-fadrm", "paper-cars-fadrm", "paper-aircraft-fadrm",
]
CommitteeMode = Literal["auto", "round-robin", "weighted-sum"]

# the one list of backbone names; the model registry follows it
BACKBONES: tuple[str, ...] = get_args(Backbone)
METHODS: tuple[str, ...] = get_args(Method)
BASES: tuple[str, ...] = get_args(Base)  # the recipes FD² can run on (`base`)
COMMITTEE_MODES: tuple[str, ...] = get_args(CommitteeMode)
MAX_COMMITTEE = 8
MAX_WORKERS = 64
PUBLISHED_PATCH_FILES = 5  # patch files per class of the published patch rule (`patch_rule`)


class CommitteeMember(BaseModel):
    """One teacher of a committee.

    Fields left null are filled by `resolve_spec`.
    M and r come from the published table under a paper preset, else from the spec's own values.
    The width comes from the spec.
    So a resolved spec states every member completely.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: Backbone = Field(description="The member's architecture.")
    model_width: int | None = Field(
        None, ge=8, le=1024, description="Channels of a convnet member; null = the spec's model_width."
    )
    num_attention_maps: int | None = Field(
        None, ge=1, le=64, description="M of the member's CAL head; null = published for its backbone, else the spec's."
    )
    cal_ratio: float | None = Field(
        None, ge=0.0, le=1.0, description="r of the member; null = published for its backbone, else the spec's."
    )
    weight: float = Field(
        1.0, gt=0.0, le=1000.0,
        description="Share of the member in a weighted-sum step and in the relabel ensemble (normalised to sum 1).",
    )


class JobSpec(BaseModel):
    """A complete, resolved distillation configuration (defaults are the `cpu-small` preset)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: PresetName = Field("cpu-small", description="Named base configuration the other fields override.")
    method: Method = Field(
        "fd2",
        description="fd2 = FD² on the `base` recipe; sre2l++ = SRe²L++ alone; fadrm+ = FADRM+ alone (phases of "
        "their own size with a data residual to the patches, see fadrm_phase_steps); rded = RDED, real patches "
        "selected by the teacher and stitched, no optimisation; random = a random real subset.",
    )
    base: Base | None = Field(
        "sre2l++",
        description="Recipe FD² runs on, for method fd2 only (sre2l++ or fadrm+); null for the other methods, "
        "which are recipes of their own.",
    )
    ipc: int = Field(1, ge=1, le=100, description="Synthetic images per class.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for every random choice of the run.")

    # data and model
    image_size: int = Field(32, ge=16, le=512, description="Side in pixels that images are resized to.")
    backbone: Backbone = Field("convnet", description="Teacher architecture (also the default student).")
    model_width: int = Field(
        128, ge=8, le=1024, description="Channels of the convnet backbone (torchvision backbones ignore it)."
    )
    student_backbone: Backbone | None = Field(None, description="Student for evaluation; null = same as teacher.")
    committee: list[CommitteeMember] | None = Field(
        None,
        min_length=1,
        max_length=MAX_COMMITTEE,
        description="Several teachers instead of one: each item a backbone name or {backbone, model_width, "
        "num_attention_maps, cal_ratio, weight}. Each member is pretrained on its own (CAL + prototypes with its "
        "own M and r when FD² is on), distillation uses them as committee_mode says, and the relabel stores the "
        "weighted mean of their logits. The patch initialisation and rded rank with the first member (or, under "
        "patch_rule published with FD², a plain cross-entropy teacher of its backbone); backbone "
        "then names only the default student. null = one teacher, the backbone.",
    )
    committee_mode: CommitteeMode = Field(
        "auto",
        description="How a committee distils: round-robin = one member per step in turn (published FADRM+), "
        "weighted-sum = every member every step, losses weighted (published SRe²L++ committee); auto = "
        "round-robin on fadrm+, weighted-sum on sre2l++. Needs a committee.",
    )
    torchvision_weights: bool = Field(
        False, description="Start the teacher from torchvision's ImageNet weights (downloads them once)."
    )
    teacher_weights_mode: Literal["full", "backbone"] = Field(
        "full",
        description="How a teacher weights file (CLI --teacher-weights) starts the teacher: full = the whole "
        "teacher of the same classes (classifier, CAL head, prototypes; the stored class names are compared, "
        "another order is mapped, another set is refused); backbone = the feature extractor only, for any "
        "class list (classifier, CAL head and prototypes start fresh). Ignored without a weights file.",
    )
    test_fraction: float = Field(
        0.2, ge=0.05, le=0.5, description="Held-out test share carved per class when the data has no test split."
    )
    val_fraction: float = Field(
        0.1, ge=0.0, le=0.5, description="Share of train held out to select the teacher checkpoint (never test)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to compute; auto = cuda if present.")
    amp: bool = Field(
        True, description="Mixed precision (amp_dtype autocast) and channels_last on CUDA (ignored on CPU)."
    )
    amp_dtype: Literal["bfloat16", "float16"] = Field(
        "bfloat16",
        description="Autocast type with amp on CUDA: bfloat16 (no gradient scaler needed) or float16 with a "
        "gradient scaler on every optimisation (the published FADRM+ runs).",
    )
    max_workers: int = Field(
        1,
        ge=1,
        le=MAX_WORKERS,
        description="Workers one job may occupy at once: its committee members, class blocks, relabel epoch ranges "
        "and evaluation students run as separate units (fd2_core.shards). Never changes the results.",
    )

    # FD² switches (ablations)
    cal: bool = Field(True, description="Counterfactual attention learning + prototypes at pretraining (FD²).")
    fc: bool = Field(True, description="Fine-grained characteristic (prototype) constraint at distillation.")
    sc: bool = Field(True, description="Attention-diversity similarity constraint at distillation.")
    init: Literal["patches", "gaussian"] = Field("patches", description="Synthetic image initialisation.")

    # FD² weights
    cal_ratio: float = Field(0.5, ge=0.0, le=1.0, description="r: weight of the CAL terms vs plain CE.")
    num_attention_maps: int = Field(8, ge=1, le=64, description="M: attention maps of the CAL head.")
    prototype_momentum: float = Field(0.05, gt=0.0, le=1.0, description="β: prototype update rate.")
    lambda_fc: float = Field(0.9, ge=0.0, le=100.0, description="λ_FC: weight of the FC loss.")
    fc_rho: float = Field(0.5, ge=0.0, le=1.0, description="ρ: intra vs inter balance inside FC.")
    fc_prototypes: Literal["raw", "normalized"] = Field(
        "raw",
        description="FC distances to the prototype buffer as stored (published) or to its unit-norm direction, "
        "the target the CAL center loss uses (the buffer's norm stays near β, which flattens d(z, P)).",
    )
    lambda_sc: float = Field(0.1, ge=0.0, le=100.0, description="λ_SC: weight of the SC loss.")
    sc_tau: float = Field(0.0, ge=0.0, le=1.0, description="τ: SC is added only when it is at least τ.")

    # stage 1 — pretrain
    pretrain_epochs: int = Field(20, ge=1, le=1000, description="Teacher training epochs.")
    pretrain_batch_size: int = Field(16, ge=2, le=4096, description="Teacher training batch size.")
    pretrain_optimizer: Literal["sgd", "adamw"] = Field("adamw", description="Teacher optimiser.")
    pretrain_lr: float = Field(2e-3, gt=0.0, le=10.0, description="Teacher learning rate.")
    pretrain_weight_decay: float = Field(5e-4, ge=0.0, le=1.0, description="Teacher weight decay.")
    pretrain_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (sgd only).")
    pretrain_lr_decay: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Decay γ of the teacher's lr every 2 epochs when > 0 (published: 0.9), set once per epoch as "
        "pretrain_lr_decay_mode says; 0 = cosine over all steps.",
    )
    pretrain_lr_decay_mode: Literal["continuous", "stepped"] = Field(
        "continuous",
        description="How pretrain_lr_decay γ applies: continuous = lr·γ^(epoch/2) with a real exponent (the published "
        "FD² script); stepped = lr·γ^⌊epoch/2⌋ (the CAL code's StepLR every 2 epochs).",
    )
    cal_crop_drop: Literal["published", "cal-code"] = Field(
        "published",
        description="CAL attention crop/drop at pretraining: published = the FD² code's (maps upsampled with "
        "align_corners=False; crop box int(min − 0.1·S) to int(max + 0.1·S), end exclusive; the crop and drop maps "
        "drawn with replacement ∝ sqrt(map sum); the crop resized back with aligned corners); cal-code = the same "
        "with the CAL code's align_corners=True upsampling of the maps.",
    )
    pretrain_augment: Literal["auto", "published", "shift-flip", "resized-crop"] = Field(
        "auto",
        description="Teacher training augmentation: published = flip + ColorJitter(0.2, 0.2, 0.2, 0.1) + "
        "rotation ±15°; shift-flip = shift ≤ S/16 + flip; resized-crop = RandomResizedCrop(0.35–1) + flip; "
        "auto = shift-flip at ≤ 64 px, resized-crop above.",
    )

    # stage 2 — distill
    distill_iterations: int = Field(
        300, ge=1, le=100_000, description="Optimisation steps per ipc index (sre2l++; fadrm+ has fadrm_phase_steps)."
    )
    distill_lr: float = Field(
        1e-3,
        gt=0.0,
        le=10.0,
        description="Adam lr for the synthetic images (cosine); published 1e-3 with patch initialisation, which "
        "refines the real patches instead of rewriting them.",
    )
    fadrm_phase_steps: list[Annotated[int, Field(ge=1, le=100_000)]] = Field(
        [60, 60, 60, 80],
        min_length=1,
        max_length=16,
        description="FADRM+ only (instead of distill_iterations): optimisation steps of each phase, one cosine lr "
        "schedule over their sum (published 1500/1500/1500/2000; cpu-small 60/60/60/80, the same 3:3:3:4).",
    )
    fadrm_phase_sizes: list[Annotated[int, Field(ge=16, le=512)]] | None = Field(
        None,
        max_length=16,
        description="FADRM+ only: image side of each phase in pixels, the last one image_size; null = "
        "round(image_size·200/224) and image_size alternating, ending at image_size (the published "
        "200/224/200/224 at 224 px, 29/32/29/32 at 32 px).",
    )
    fadrm_alpha: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="FADRM+ data residual α: at each phase boundary x ← α·x + (1−α)·patch (published 0.5).",
    )
    distill_batch_classes: int = Field(
        0, ge=0, le=10_000, description="Classes optimised together per step; 0 = all (batch by memory)."
    )
    r_bn: float = Field(0.01, ge=0.0, le=100.0, description="Weight of BatchNorm statistics matching.")
    first_bn_multiplier: float = Field(10.0, ge=0.0, le=1000.0, description="α of the first BatchNorm layer.")
    jitter: int = Field(
        4, ge=0, le=64,
        description="J of the random roll after the crop: randint(0, J) pixels per axis, J included, one roll per "
        "step (published: 32 at 224 px; 4 at ≤ 64 px).",
    )
    distill_crop: Literal["batch", "image"] = Field(
        "image",
        description="Distill step's RandomResizedCrop + flip: batch = one box and one flip for all images of a step "
        "(published: one torchvision transform on the 4-D batch, so BN matching sees the batch at one scale and "
        "position); image = a box and a flip per image. SC's earlier-index maps always crop per image, no roll.",
    )
    patch_rule: Literal["published", "ranked"] = Field(
        "ranked",
        description="Patch initialisation (init patches, and rded): published = FD²'s patch script: per class the "
        "first n = min(smallest class's train count, patch_pool) train images in the loader's order (file-name "
        "order for folders and archives, row order for manifests); 5 patch files per class, each from "
        "patch_candidates fresh square views per image (each image's lowest-CE view kept, the factor² best "
        "stitched); each ipc index starts from one of its class's files drawn uniformly with repetition, so two "
        "indices may share a start; scored by a plain cross-entropy teacher (under FD² one more pretraining with CAL "
        "off, shard pretrain:scorer; otherwise the run's own teacher). ranked = RDED's rule: up to patch_pool "
        "shuffled images ranked once by their best view, index j stitching the j-th group; scored by the run's "
        "first teacher, under FD² the CAL teacher's backbone (a deviation from the published plain scorer).",
    )
    synthetic_format: Literal["png", "jpeg"] = Field(
        "png",
        description="How each distilled ipc index is stored before later stages read it: jpeg = truncated to "
        "uint8, then JPEG quality 75 (Pillow), and SC's references, relabel and the students read the decoded "
        "JPEG pixels (published); png = rounded to uint8, lossless. The artifact's PNGs hold exactly the pixels "
        "the service's own student saw either way.",
    )
    patch_candidates: int = Field(
        5, ge=1, le=64, description="Square RandomResizedCrop views scored per real image for patch initialisation."
    )
    patch_pool: int = Field(
        300, ge=1, le=100_000, description="Real images per class drawn (shuffled) as the patch candidate pool."
    )
    patch_factor: int = Field(
        0,
        ge=0,
        le=4,
        description="Views stitched factor×factor per synthetic image; 0 = auto (1 at ≤ 64 px, 2 above, as RDED).",
    )

    # stage 3 — relabel
    relabel_epochs: int = Field(300, ge=1, le=2000, description="Epochs of recorded augmentations + soft labels.")
    relabel_batch_size: int = Field(
        20, ge=1, le=4096, description="Batch size of the relabel walk; the student replays the same batches."
    )
    cutmix_alpha: float = Field(1.0, ge=0.0, le=10.0, description="CutMix Beta(α, α); 0 disables CutMix.")
    min_crop_scale: float = Field(0.08, gt=0.0, le=1.0, description="RandomResizedCrop minimum area scale.")
    topk: int = Field(0, ge=0, le=10_000, description="Keep only the top-k teacher logits per sample; 0 = all.")
    soft_label_values: Literal["fp16", "int8", "online"] = Field(
        "fp16",
        description="How the kept logits are stored: fp16 (published), int8 (one byte each + one fp16 scale per "
        "row, relative to the row's maximum), or online (none stored: the student forwards the shipped teacher "
        "in the relabel mode).",
    )
    label_epoch_fraction: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Share of the relabel epochs whose logits are recorded (a seeded subset, at least one); the "
        "student trains every epoch, cycling through the recorded ones. 1 = all (published).",
    )
    label_budget_bytes: int | None = Field(
        None,
        ge=1,
        le=2**53,
        description="Largest soft-label file wanted, in bytes: at submit the first encoding of "
        "fd2_core.label_sizes.BUDGET_ORDER (from full fp16 to online) whose file fits for ipc·K images is chosen "
        "and stored as soft_label_values, topk and label_epoch_fraction, so set either this or those. null = "
        "the encoding those fields name.",
    )
    soft_label_source: Literal["backbone", "cal", "mixed"] = Field(
        "backbone",
        description="Teacher logits stored as soft labels: the backbone's own classifier (published), the CAL "
        "head's, or (1−r)·backbone + r·CAL.",
    )
    relabel_bn_mode: Literal["train", "eval"] = Field(
        "train",
        description="BatchNorm at relabel: train = statistics of each forwarded part (published; the stored "
        "running statistics stay unchanged), eval = running statistics.",
    )
    relabel_forward_splits: int = Field(
        2,
        ge=1,
        le=64,
        description="Parts each relabel batch is forwarded in (published: 2 halves); the student accumulates "
        "gradients over the same parts.",
    )

    # stage 4 — evaluate
    evaluate: bool = Field(True, description="Train a student on the distilled set and test it on real data.")
    eval_random_baseline: bool = Field(
        True, description="Also evaluate a random real subset of the same size with the same protocol."
    )
    eval_temperature: float = Field(20.0, gt=0.0, le=100.0, description="T of the KL distillation loss.")
    eval_lr: float = Field(1e-3, gt=0.0, le=10.0, description="Student AdamW learning rate.")
    eval_weight_decay: float = Field(1e-5, ge=0.0, le=1.0, description="Student AdamW weight decay.")
    eval_schedule: Literal["half-cosine", "cosine"] = Field(
        "half-cosine",
        description="Student lr per epoch: half-cosine = lr·0.5·(1 + cos(π·e/(2E))), the published schedule that "
        "ends at half the lr; cosine = down to 0.",
    )
    eval_hlr: bool = Field(
        False,
        description="Also train a student on the full real train set with hard labels, for the hard-label "
        "recovery (HLR) metric; costs about one teacher training more.",
    )

    @field_validator("committee", mode="before")
    @classmethod
    def _member_shorthand(cls, value: Any) -> Any:
        """A bare backbone name stands for a member with every other field left to the defaults."""
        if isinstance(value, list):
            return [{"backbone": item} if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> JobSpec:
        if self.committee is None and "committee_mode" in self.model_fields_set and self.committee_mode != "auto":
            raise ValueError("committee_mode needs a committee; add committee, or drop committee_mode")
        if self.method != "fd2":
            enabled = [name for name in ("cal", "fc", "sc") if getattr(self, name)]
            if enabled and self.model_fields_set & set(enabled):
                why = " (it ranks real patches with a plain teacher, as published, and optimises nothing)"
                why = why if self.method == "rded" else ""
                raise ValueError(f"method {self.method!r} runs without FD² parts{why}; drop {', '.join(enabled)}")
            if self.base is not None and "base" in self.model_fields_set:
                raise ValueError(
                    f"base names the recipe FD² runs on (method fd2); method {self.method!r} is a recipe of its own: "
                    "drop base, or use method fd2"
                )
        elif self.base is None:
            raise ValueError(f"method fd2 needs a base recipe; set base to {' or '.join(map(repr, BASES))}")
        elif (self.fc or self.sc) and not self.cal:
            raise ValueError("fc and sc need the CAL head (cal=true); disable them or enable cal")
        if self.recipe == "fadrm+":
            self._check_fadrm_phases()
        if self.method == "rded" and self.init != "patches":
            raise ValueError(
                "method 'rded' is the patch initialisation itself, so init must be 'patches'; drop init, or use "
                "method sre2l++ or fd2 to start from gaussian noise"
            )
        if self.eval_random_baseline and not self.evaluate and "eval_random_baseline" in self.model_fields_set:
            raise ValueError("eval_random_baseline needs evaluate=true")
        if self.soft_label_source != "backbone" and not self.uses_cal:
            raise ValueError(
                f"soft_label_source {self.soft_label_source!r} reads the CAL head; it needs method fd2 with cal=true"
            )
        if self.soft_label_values == "online" and self.committee is not None:
            raise ValueError(
                "soft_label_values 'online' ships one teacher whose logits the student computes; a committee's "
                "labels are the mean of its members, which are not shipped one by one: store the labels (fp16 "
                "or int8), or drop committee"
            )
        if self.soft_label_values == "online" and (self.topk or self.label_epoch_fraction != 1.0):
            raise ValueError(
                "soft_label_values 'online' stores no logits, so topk and label_epoch_fraction do not apply; "
                "drop them, or store the labels (fp16 or int8)"
            )
        if self.torchvision_weights and self.backbone == "convnet" and self.committee is None:
            torchvision = ", ".join(name for name in BACKBONES if name != "convnet")
            raise ValueError(f"torchvision_weights needs a torchvision backbone ({torchvision})")
        return self

    def _check_fadrm_phases(self) -> None:
        steps, sizes = self.fadrm_phase_steps, self.fadrm_phase_sizes
        if sizes is None:
            return
        if len(sizes) != len(steps):
            raise ValueError(
                f"fadrm_phase_sizes has {len(sizes)} phases but fadrm_phase_steps has {len(steps)}; give one size "
                "per phase, or null for the default schedule"
            )
        if max(sizes) > self.image_size or sizes[-1] != self.image_size:
            raise ValueError(
                f"fadrm_phase_sizes must each be at most image_size ({self.image_size}) and end at it "
                "(the distilled images are stored at it); fix the sizes, or null for the default schedule"
            )

    @property
    def recipe(self) -> str | None:
        """The optimising recipe (sre2l++ or fadrm+, FD² or not); None for rded and random."""
        if self.method == "fd2":
            return self.base
        return self.method if self.method in ("sre2l++", "fadrm+") else None

    @property
    def uses_cal(self) -> bool:
        return self.method == "fd2" and self.cal

    @property
    def optimises_images(self) -> bool:
        """Whether distillation runs optimisation steps (rded and random select real pixels)."""
        return self.recipe is not None

    @property
    def scores_patches(self) -> bool:
        """Whether distillation ranks real patches with the teacher (rded, patch initialisation)."""
        return self.method != "random" and self.init == "patches"

    @property
    def trains_scorer(self) -> bool:
        """Whether pretraining trains one more teacher, with plain cross-entropy, to score patches.

        The published patch rule scores with a plain teacher.
        Under FD² the run's own teachers carry the CAL head, so one more is needed.
        Elsewhere the first teacher is plain and scores.
        """
        return self.scores_patches and self.patch_rule == "published" and self.uses_cal

    @property
    def uses_fc(self) -> bool:
        return self.uses_cal and self.fc

    @property
    def uses_sc(self) -> bool:
        return self.uses_cal and self.sc

    @property
    def student(self) -> str:
        return self.student_backbone or self.backbone

    @property
    def members(self) -> list[CommitteeMember]:
        """The teachers, each stated completely: the committee, or the spec's one teacher."""
        if self.committee is None:
            return [CommitteeMember(backbone=self.backbone, model_width=self.model_width,
                                    num_attention_maps=self.num_attention_maps, cal_ratio=self.cal_ratio)]
        return [
            m.model_copy(update={
                "model_width": m.model_width or self.model_width,
                "num_attention_maps": m.num_attention_maps or self.num_attention_maps,
                "cal_ratio": self.cal_ratio if m.cal_ratio is None else m.cal_ratio,
            })
            for m in self.committee
        ]

    @property
    def round_robin(self) -> bool:
        """Whether distillation uses one committee member per step (else every member, weighted)."""
        if self.committee_mode == "auto":
            return self.recipe == "fadrm+"
        return self.committee_mode == "round-robin"

    def member_spec(self, index: int) -> JobSpec:
        """The spec as member `index` sees it: its backbone, width, M and r, and no committee.

        The member's pretraining, losses and relabel logits read these fields.
        """
        member = self.members[index]
        return self.model_copy(update={
            "backbone": member.backbone, "model_width": member.model_width,
            "num_attention_maps": member.num_attention_maps, "cal_ratio": member.cal_ratio,
            "committee": None, "committee_mode": "auto",
            "torchvision_weights": self.torchvision_weights and member.backbone != "convnet",
        })


def spec_json_schema() -> dict[str, Any]:
    """JSON schema of the spec for docs and OpenAPI (fields, defaults, ranges, descriptions)."""
    return JobSpec.model_json_schema()


__all__ = [
    "BACKBONES",
    "BASES",
    "COMMITTEE_MODES",
    "METHODS",
    "CommitteeMember",
    "JobSpec",
    "ValidationError",
    "spec_json_schema",
]
