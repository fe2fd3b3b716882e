"""Quality benchmark: paired comparison of distillation methods on the built-in fine-grained data.

What it measures: top-1 on the real test split of a student trained only on a method's distilled
set, for `random`, `sre2l++`, `fd2` and the ablations fd2 − FC, fd2 − SC and CAL only (CAL teacher,
FC and SC off), at IPC 1, 3 and 5, on two settings of the built-in data (FGSynth birds and FGSynth
cars, 32 px), over several seeds.

Design (docs/BENCHMARKS.md, "Quality"):
- **Paired seeds.** Seed s fixes the teacher initialisation, the validation split, the distillation
  draws and the evaluation stream (the recorded crops, flips, CutMix and the student's
  initialisation). Every method sees the same seed's split and stream, so per-seed differences
  cancel what the methods share; the table reports for each (method, IPC) the mean paired difference
  to sre2l++ and to random with a 95 % t-interval over seeds.
- **Two protocols.** *end to end*: each method with its own teacher's soft labels (what a user gets:
  fd2 and its ablations relabel with the CAL teacher, sre2l++ and random with the plain-CE teacher).
  *images only*: every image set relabelled by one common teacher (the plain-CE one), so only the
  images differ.
- **Stable teachers.** Every teacher starts from one backbone pretrained on built-in classes
  disjoint from the evaluated ones (`fd2_core.models.base_backbone`), as the paper's teachers start
  from ImageNet weights.
- **DD-Ranking metrics.** IOR (improvement over random: the method's student minus the random
  subset's, same protocol) and HLR (hard-label recovery: the full-real-data student minus the
  method's hard-label student).
- **Resumable.** The result file is written after every (setting, seed, method); a re-run with the
  same configuration skips what it holds (and stage outputs under `--work` are reused), so the grid
  can span sessions. `--commit` commits the result file as results come in.

    .venv/bin/python bench/quality.py                       # full grid: 5 seeds x 2 settings
                                                            # (hours on 2 cores)
    .venv/bin/python bench/quality.py --quick               # smoke run, under 10 minutes
    .venv/bin/python bench/quality.py --table               # rded, fadrm+, fd2 on fadrm+ beside
                                                            # sre2l++ and random
    .venv/bin/python bench/quality.py --validate            # cpu-small's data-path choices on
                                                            # validation data
    .venv/bin/python bench/quality.py --long                # 4 000 distill iterations at IPC 3:
                                                            # fd2, sre2l++, CAL only
    .venv/bin/python bench/quality.py --render bench/results/quality_v3_full.json
                                                            # table + plot only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fd2_core.artifacts import png_bytes, sha256_of  # noqa: E402
from fd2_core.data.dataset import ImageDataset, load_dataset  # noqa: E402
from fd2_core.progress import ProgressTracker  # noqa: E402
from fd2_core.softlabels import FORMAT_V2 as SOFT_LABEL_FORMAT_V2  # noqa: E402
from fd2_core.softlabels import FORMAT_V4  # noqa: E402
from fd2_core.spec import JobSpec  # noqa: E402
from fd2_core.spec_compat import spec_changes  # noqa: E402
from fd2_core.spec_resolution import resolve_spec  # noqa: E402
from fd2_core.stages.committee import Committee, as_committee  # noqa: E402
from fd2_core.stages.context import RunContext, stage_folder  # noqa: E402
from fd2_core.stages.distill import distill  # noqa: E402
from fd2_core.stages.evaluate import train_student  # noqa: E402
from fd2_core.stages.pretrain import TEACHER_FILE, pretrain_teacher  # noqa: E402
from fd2_core.stages.relabel import relabel_all_epochs  # noqa: E402
from fd2_core.storage_report import human_bytes, is_online, safetensors_metadata  # noqa: E402

FORMAT = "fd2.quality.v3"
# v3: the published data path (docs/DATA_PATH.md); result files, work folders, plots and the
# benchmarks page's blocks carry this tag, so v2 teachers and results (the earlier data path) are
# kept beside and never reused.
TAG = "v3"


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any]
    teacher: str  # "cal" or "ce": whose teacher distils and (end to end) relabels
    # another variant whose images and soft labels this one reuses (student-only change)
    shares: str | None = None


VARIANTS: tuple[Variant, ...] = (
    Variant("random", {"method": "random"}, "ce"),
    Variant("sre2l++", {"method": "sre2l++"}, "ce"),
    Variant("fd2", {"method": "fd2"}, "cal"),
    Variant("fd2 − FC", {"method": "fd2", "fc": False}, "cal"),
    Variant("fd2 − SC", {"method": "fd2", "sc": False}, "cal"),
    Variant("CAL only", {"method": "fd2", "fc": False, "sc": False}, "cal"),
)
# The paper's other rows (`--table`): RDED, FADRM+ and FD² on FADRM+ with the same teachers and
# students as the grid above, and the FADRM+ rows again with the published student lr 1e-2, labelled
# apart so that the method's effect is not mixed with the student's learning rate.
TABLE_VARIANTS: tuple[Variant, ...] = (
    VARIANTS[0],
    VARIANTS[1],
    Variant("rded", {"method": "rded"}, "ce"),
    Variant("fadrm+", {"method": "fadrm+"}, "ce"),
    Variant("fd2 (fadrm+)", {"method": "fd2", "base": "fadrm+"}, "cal"),
    Variant("fadrm+ · student lr 1e-2", {"method": "fadrm+", "eval_lr": 1e-2}, "ce", shares="fadrm+"),
    Variant("fd2 (fadrm+) · student lr 1e-2", {"method": "fd2", "base": "fadrm+", "eval_lr": 1e-2}, "cal",
            shares="fd2 (fadrm+)"),
)
PROTOCOLS: tuple[str, ...] = ("end-to-end", "images-only")
COMMON_TEACHER = "ce"  # images only: every set relabelled by the plain-CE teacher
# name → (minuend, subtrahend): the paired differences the table reports
COMPARISONS: dict[str, tuple[str, str]] = {
    "fd2 − sre2l++": ("fd2", "sre2l++"),
    "fd2 − random": ("fd2", "random"),
    "CAL (CAL only − sre2l++)": ("CAL only", "sre2l++"),
    "FC (fd2 − [fd2 − FC])": ("fd2", "fd2 − FC"),
    "SC (fd2 − [fd2 − SC])": ("fd2", "fd2 − SC"),
}

TABLE_COMPARISONS: dict[str, tuple[str, str]] = {
    "fd2 (fadrm+) − fadrm+": ("fd2 (fadrm+)", "fadrm+"),
    "fadrm+ − sre2l++": ("fadrm+", "sre2l++"),
    "rded − sre2l++": ("rded", "sre2l++"),
    "fd2 (fadrm+) − sre2l++": ("fd2 (fadrm+)", "sre2l++"),
    "student lr 1e-2 on fadrm+": ("fadrm+ · student lr 1e-2", "fadrm+"),
    "student lr 1e-2 on fd2 (fadrm+)": ("fd2 (fadrm+) · student lr 1e-2", "fd2 (fadrm+)"),
}

# name → (dataset source, short description)
SETTINGS: dict[str, tuple[str, str]] = {
    "birds-32": ("fgsynth", "FGSynth birds, 20 classes, 150 train / 50 test per class, 32 px (the default set)"),
    "cars-32": ("fgsynth:variant=cars", "FGSynth cars, 20 classes, 150 train / 50 test per class, 32 px"),
}

# The paper runs 10 000 distill iterations and 400 relabel epochs at 224 px on a GPU; here the
# teacher keeps the cpu-small schedule and the other stages are scaled down to fit 2 CPU cores
# (docs/BENCHMARKS.md).
FULL: dict[str, Any] = {
    "spec": {"distill_iterations": 200, "relabel_epochs": 300},
    "ipcs": (1, 3, 5),
    "seeds": (0, 1, 2, 3, 4),
    "settings": ("birds-32", "cars-32"),
    "classes": None,
    "hard_label_methods": ("random", "sre2l++", "fd2"),
    "teacher_init": "base",
}
# The paper's other rows on the full grid's seeds, settings, teachers and students (their work
# folders are shared, so the teachers are trained once); random and sre2l++ are taken from the full
# grid's result file when it holds them for the same seed and the same resolved spec (the runs are
# deterministic).
TABLE: dict[str, Any] = {
    **FULL,
    "variants": TABLE_VARIANTS,
    "comparisons": TABLE_COMPARISONS,
    "hard_label_methods": (),
    "upper_bound": False,
    "reuse_from": f"quality_{TAG}_full.json",
    "work_mode": "full",
}
# Validation data for choices (never the reported test sets): FGSynth drawn with seed 7, whose test
# split plays validation, as in bench/quality_probe.py and bench/teacher_stability.py.
VALIDATION_SETTINGS: dict[str, tuple[str, str]] = {
    "birds-val": ("fgsynth:seed=7", "FGSynth birds drawn with seed 7 (validation data), 20 classes, 32 px"),
    "cars-val": ("fgsynth:seed=7,variant=cars", "FGSynth cars drawn with seed 7 (validation data), 20 classes, 32 px"),
}
# The data-path fields cpu-small chooses on validation data (docs/DATA_PATH.md):
# (published value, alternative).
DATA_PATH_CHOICES: dict[str, tuple[str, str]] = {
    "distill_crop": ("batch", "image"),
    "patch_rule": ("published", "ranked"),
    "synthetic_format": ("jpeg", "png"),
}
REFERENCE_ARM = "published"


def choice_arms(choices: dict[str, tuple[str, str]]) -> dict[str, dict[str, str]]:
    """One arm with every field at its published value, then one arm per field with that field alone
    switched."""
    published = {field: values[0] for field, values in choices.items()}
    arms = {REFERENCE_ARM: published}
    for field, (_, alternative) in choices.items():
        arms[f"{field}={alternative}"] = {**published, field: alternative}
    return arms


# `--validate`: each arm of the grid's schedule on the validation data, random/sre2l++/fd2 only.
# `random` reads real images and never meets these fields (no distill step, no patches, real images
# are never re-encoded), so it runs once per pair, in the reference arm.
VALIDATE: dict[str, Any] = {
    **FULL,
    "seeds": (0, 1, 2),
    "settings": tuple(VALIDATION_SETTINGS),
    "variants": VARIANTS[:3],
    "comparisons": {"fd2 − sre2l++": ("fd2", "sre2l++"), "fd2 − random": ("fd2", "random")},
    "hard_label_methods": (),
    "upper_bound": False,
    "arms": choice_arms(DATA_PATH_CHOICES),
    "arm_free": ("random",),
}
# `--long`: the published 4 000 distill iterations (FD²'s CUB-200 runs use 4 000–10 000) at IPC 3 on
# birds-32, so the images may leave their patch initialisation and FC and SC have room to act;
# teachers are the full grid's.
LONG: dict[str, Any] = {
    **FULL,
    "spec": {**FULL["spec"], "distill_iterations": 4000},
    "ipcs": (3,),
    "settings": ("birds-32",),
    "variants": (VARIANTS[1], VARIANTS[2], VARIANTS[5]),
    "comparisons": {"fd2 − sre2l++": ("fd2", "sre2l++"), "CAL (CAL only − sre2l++)": ("CAL only", "sre2l++"),
                    "FC + SC (fd2 − CAL only)": ("fd2", "CAL only")},
    "hard_label_methods": (),
    "upper_bound": False,
    "teacher_mode": "full",
}
QUICK: dict[str, Any] = {
    "spec": {"distill_iterations": 60, "relabel_epochs": 100},
    "ipcs": (1, 3),
    "seeds": (0, 1),
    "settings": ("birds-32",),
    "classes": 10,
    "hard_label_methods": ("random", "fd2"),
    "teacher_init": "base",
}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9+]+", "-", text.lower()).strip("-")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def make_ctx(spec: JobSpec, data: ImageDataset, workdir: Path, teacher_weights: Path | None = None,
             notes: dict[str, object] | None = None) -> RunContext:
    tracker = ProgressTracker({}, None, None)
    return RunContext(
        spec=spec, data=data, workdir=workdir, device=torch.device("cpu"), tracker=tracker,
        teacher_weights=teacher_weights, notes={} if notes is None else notes,
    )


# The run notes `fd2_core.stages.patches` caches its scored patch pools in
# (per scorer and class chunk).
PATCH_CACHES = ("patch_files", "patch_ranking")


def quantize(ctx: RunContext, synthetic: torch.Tensor) -> torch.Tensor:
    """Normalised [ipc, K, 3, S, S] → uint8 [ipc·K, 3, S, S] (index-major),
    as the pipeline stores them."""
    flat = synthetic.reshape(-1, *synthetic.shape[2:])
    return (ctx.denormalize(flat) * 255.0).round().to(torch.uint8).cpu()


def accuracy_of(result: Any) -> float:
    """A student's top-1 (train_student returns a result object with `.accuracy`)."""
    return float(getattr(result, "accuracy", result))


def teacher_weights_path(cfg: dict[str, Any]) -> Path | None:
    """The file every teacher starts from: the shipped base backbone,
    or None to train from scratch."""
    if cfg.get("teacher_init", "scratch") == "scratch":
        return None
    from fd2_core.models.base_backbone import base_backbone_path

    return Path(base_backbone_path())


def init_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """Spec fields of the teachers' start: the base backbone seeds the feature extractor only."""
    return {"teacher_weights_mode": "backbone"} if teacher_weights_path(cfg) is not None else {}


def variants_of(cfg: dict[str, Any]) -> tuple[Variant, ...]:
    return cfg.get("variants", VARIANTS)


def arms_of(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The spec overrides each arm adds (`--validate`); one unnamed arm without overrides
    elsewhere."""
    return cfg.get("arms", {"": {}})


def tag_of(results: dict[str, Any]) -> str:
    """The version tag of a result file ("v2", "v3"): its blocks and plots are named after it."""
    return str(results.get("format", FORMAT)).rsplit(".", 1)[-1]


# The relabel walk the results were measured on, named by the format that first recorded it: v5 files
# regenerate that very walk and hold the same fp16 logits, so the grid's results carry over.
SOFT_LABEL_FORMAT = FORMAT_V4
# The grid measures images: every method's labels stay full fp16 logits of every epoch, whatever
# cpu-small's default storage becomes (docs/SOFT_LABELS.md).
FULL_LABELS = {"soft_label_values": "fp16", "topk": 0, "label_epoch_fraction": 1.0}


def config_key(cfg: dict[str, Any]) -> dict[str, Any]:
    """What must match for stored results to be reused (seeds and settings may grow between runs).

    Besides the bench's own settings it holds every variant's resolved spec (seed aside) and the
    digest of the teachers' starting weights, so a changed default or a new base backbone never
    mixes into old results.
    """
    weights = teacher_weights_path(cfg)
    base = {"preset": "cpu-small", "device": "cpu", "ipc": max(cfg["ipcs"]), **FULL_LABELS, **init_fields(cfg),
            **cfg["spec"]}
    resolved = {
        f"{arm} / {v.name}" if arm else v.name: {
            k: val for k, val in resolve_spec({**base, **overrides, **v.overrides}).model_dump(mode="json").items()
            if k != "seed"}
        for arm, overrides in arms_of(cfg).items()
        for v in variants_of(cfg)
    }
    extra = {"comparisons": {k: list(v) for k, v in cfg["comparisons"].items()}} if "comparisons" in cfg else {}
    if "arms" in cfg:
        extra["arms"] = {arm: dict(overrides) for arm, overrides in cfg["arms"].items()}
    return {
        **extra,
        "format": FORMAT,
        "resolved_specs": resolved,
        "teacher_weights_sha256": sha256_of(weights) if weights is not None else None,
        "spec": dict(cfg["spec"]),
        "ipcs": list(cfg["ipcs"]),
        "classes": cfg["classes"],
        "hard_label_methods": list(cfg["hard_label_methods"]),
        "teacher_init": cfg["teacher_init"],
        "methods": [v.name for v in variants_of(cfg)],
        # the relabel walk (and so the evaluation stream) is part of the result:
        # v3 draws one stream per epoch
        "soft_label_format": SOFT_LABEL_FORMAT,
        "protocols": list(PROTOCOLS),
    }


# ---------------------------------------------------------------- one (setting, seed) pair


class PairRunner:
    """Runs every method of one (setting, seed) pair, storing each finished method in `record` via
    `save`."""

    def __init__(self, setting: str, source: str, seed: int, cfg: dict[str, Any], work: Path, record: dict, save,
                 teacher_work: Path | None = None, shared: dict[str, dict] | None = None):
        self.setting, self.seed, self.cfg, self.record, self.save = setting, seed, cfg, record, save
        self.ipcs = tuple(sorted(cfg["ipcs"]))
        self.base = {"preset": "cpu-small", "device": "cpu", "seed": seed, "ipc": self.ipcs[-1], **FULL_LABELS,
                     **init_fields(cfg), **cfg["spec"]}
        if cfg["classes"]:
            source = f"{source}{',' if ':' in source else ':'}classes={cfg['classes']}"
        probe = resolve_spec(self.base)
        self.data = load_dataset(source, probe.image_size, seed=0, test_fraction=probe.test_fraction)
        self.root = work / setting / f"seed{seed}"
        # teachers depend on neither the distillation fields nor the student:
        # runs that vary only those share them
        self.teacher_root = (teacher_work or work) / setting / f"seed{seed}"
        self.weights = teacher_weights_path(cfg)
        record.setdefault("setting", setting)
        record.setdefault("seed", seed)
        record.setdefault("source", source)
        record["num_classes"] = len(self.data.classes)
        record.setdefault("teachers", {})
        record.setdefault("methods", {})
        # loaded teachers and scored patch pools; `shared` hands them to the next runner of the same
        # pair (the arms of `--validate`)
        shared = {} if shared is None else shared
        self.teachers: dict[str, Any] = shared.setdefault("teachers", {})
        self.patch_notes: dict[tuple, dict[str, object]] = shared.setdefault("patch_notes", {})

    def spec(self, variant: Variant | None = None, **extra: Any) -> JobSpec:
        overrides = variant.overrides if variant is not None else {"method": "sre2l++"}
        return resolve_spec({**self.base, **overrides, **extra})

    def teacher(self, kind: str):
        if kind not in self.teachers:
            spec = resolve_spec({**self.base, "method": "fd2" if kind == "cal" else "sre2l++"})
            t = time.monotonic()
            # the teacher alone: under `patch_rule: published` `pretrain` would also train FD²'s
            # plain scorer, which the grid takes from its own plain-CE teacher instead
            # (`distilling_teachers`)
            result = pretrain_teacher(make_ctx(spec, self.data, self.teacher_root / f"teacher-{kind}", self.weights))
            self.teachers[kind] = result.model
            self.teachers[f"{kind}-info"] = {
                "test_accuracy": result.info["test_accuracy"],
                "backbone_test_accuracy": result.info["backbone_test_accuracy"],
                "val_accuracy": result.info["val_accuracy"],
                "time_s": round(time.monotonic() - t, 1),
            }
            info = self.teachers[f"{kind}-info"]
            log(f"{self.setting} seed {self.seed}: {kind} teacher backbone test {info['backbone_test_accuracy']:.3f}")
        if kind not in self.record["teachers"]:
            self.record["teachers"][kind] = dict(self.teachers[f"{kind}-info"])
            self.save()
        return self.teachers[kind]

    def student(self, spec: JobSpec, wd: Path, teacher, images: torch.Tensor, labels: torch.Tensor, name: str,
                hard: bool = False) -> tuple[float, float]:
        """(top-1, seconds) of the student on `images` relabelled by `teacher`
        (file `name` under `wd`)."""
        ctx = make_ctx(spec, self.data, wd)
        t = time.monotonic()
        soft = relabel_all_epochs(ctx, teacher, images, labels, wd / f"{name}.safetensors")
        result = train_student(ctx, images, labels, soft, stream="student", hard_labels=hard)
        return accuracy_of(result), round(time.monotonic() - t, 1)

    def shared_notes(self, spec: JobSpec) -> dict[str, object]:
        """Run notes whose patch caches the pair's variants share: the scored pools depend only on
        the scorer (the cache's own key, with the class chunk), the seed, the data and the fields
        below, and draw from streams of their own, so a variant finding them scored gets the very
        files it would score itself. Under the published rule every variant is scored by the pair's
        plain-CE teacher: it is scored once a pair."""
        from fd2_core.stages.patches import patch_factor

        key = (spec.seed, spec.patch_rule, spec.image_size, spec.patch_candidates, spec.patch_pool,
               patch_factor(spec), spec.recipe, spec.method == "rded")
        caches = self.patch_notes.setdefault(key, {})
        return {name: caches.setdefault(name, weakref.WeakKeyDictionary()) for name in PATCH_CACHES}

    def distilling_teachers(self, ctx: RunContext, spec: JobSpec, own) -> Committee | None:
        """What `distill` gets: nothing for random, else the variant's teacher; under
        `patch_rule: published` with FD² the grid's plain-CE teacher scores the patches, the scorer
        the pipeline would train (same backbone, data and start), so the pair trains no third
        teacher."""
        if spec.method == "random":
            return None
        committee = as_committee(ctx, own)
        if spec.trains_scorer:
            committee = dataclasses.replace(committee, scorer_model=self.teacher("ce"))
        return committee

    def method(self, variant: Variant) -> dict[str, Any]:
        spec = self.spec(variant)
        own = self.teacher(variant.teacher)
        common = self.teacher(COMMON_TEACHER)
        wd = self.root / slug(variant.shares or variant.name)
        ctx = make_ctx(spec, self.data, wd, notes=self.shared_notes(spec))
        t = time.monotonic()
        synthetic = distill(ctx, self.distilling_teachers(ctx, spec, own))
        out: dict[str, Any] = {"teacher": variant.teacher, "distill_s": round(time.monotonic() - t, 1)}
        images = quantize(ctx, synthetic)
        out["init_psnr_db"] = _init_psnr(ctx, images) if spec.method != "random" else None
        k = len(self.data.classes)
        for protocol in PROTOCOLS:
            out[protocol] = {}
        for ipc in self.ipcs:
            spec_k = self.spec(variant, ipc=ipc)
            imgs, labels = images[: ipc * k], torch.arange(k).repeat(ipc)
            acc, secs = self.student(spec_k, wd, own, imgs, labels, f"soft_labels_ipc{ipc}")
            sizes = self.set_bytes(imgs, wd / f"soft_labels_ipc{ipc}.safetensors", variant.teacher)
            out["end-to-end"][f"ipc{ipc}"] = {"soft": acc, "time_s": secs, **sizes}
            if variant.teacher == COMMON_TEACHER:
                out["images-only"][f"ipc{ipc}"] = {"soft": acc, "time_s": 0.0, "same_as": "end-to-end", **sizes}
            else:
                acc2, secs2 = self.student(spec_k, wd, common, imgs, labels, f"common_soft_labels_ipc{ipc}")
                out["images-only"][f"ipc{ipc}"] = {
                    "soft": acc2, "time_s": secs2,
                    **self.set_bytes(imgs, wd / f"common_soft_labels_ipc{ipc}.safetensors", COMMON_TEACHER)}
            line = f"{self.setting} seed {self.seed}: {variant.name} ipc {ipc}: " + ", ".join(
                f"{p} {out[p][f'ipc{ipc}']['soft']:.3f}" for p in PROTOCOLS
            )
            if variant.name in self.cfg["hard_label_methods"]:
                hard, secs3 = self.student(spec_k, wd, own, imgs, labels, f"soft_labels_ipc{ipc}", hard=True)
                out[f"hard_ipc{ipc}"] = {"accuracy": hard, "time_s": secs3}
                line += f", hard {hard:.3f}"
            log(line)
        return out

    def set_bytes(self, images: torch.Tensor, soft_labels: Path, teacher: str) -> dict[str, int]:
        """What a user would download of this set (`fd2_core.storage_report`): `images_bytes`, its
        images as the artifact's PNGs, and `soft_labels_bytes`, the labels file (the teacher's
        file when the labels are online)."""
        labels = soft_labels
        if is_online(safetensors_metadata(soft_labels)):
            labels = stage_folder(self.teacher_root / f"teacher-{teacher}") / TEACHER_FILE
        return {"images_bytes": sum(len(png_bytes(image)) for image in images),
                "soft_labels_bytes": labels.stat().st_size}

    def upper_bound(self) -> dict[str, Any]:
        from fd2_core.stages.full_data import train_full_data_student

        spec = self.spec()
        t = time.monotonic()
        result = train_full_data_student(make_ctx(spec, self.data, self.root / "full-real"))
        secs = round(time.monotonic() - t, 1)
        return {"accuracy": accuracy_of(result), "epochs": spec.pretrain_epochs, "time_s": secs}

    def reuse(self) -> None:
        """Copy methods (and their teachers' figures) from the `reuse_from` result file when it
        holds them for this (setting, seed) under the same resolved spec: the runs are
        deterministic, so they are the same runs."""
        name = self.cfg.get("reuse_from")
        path = ROOT / "bench" / "results" / name if name else None
        if path is None or not path.exists():
            return
        other = json.loads(path.read_text())
        run = other.get("runs", {}).get(f"{self.setting}/{self.seed}", {})
        ours, theirs = config_key(self.cfg)["resolved_specs"], other.get("config", {}).get("resolved_specs", {})
        if other.get("config", {}).get("soft_label_format", SOFT_LABEL_FORMAT_V2) != SOFT_LABEL_FORMAT:
            log(f"{name} was evaluated with another relabel stream; nothing is taken from it")
            return
        for variant in variants_of(self.cfg):
            done = run.get("methods", {}).get(variant.name)
            if variant.name in self.record["methods"] or done is None or variant.name not in theirs:
                continue
            if spec_changes(theirs[variant.name], ours[variant.name]):
                continue
            self.record["methods"][variant.name] = {**done, "reused_from": name}
            teacher = run.get("teachers", {}).get(variant.teacher)
            if teacher is not None:
                self.record["teachers"].setdefault(variant.teacher, teacher)
            log(f"{self.setting} seed {self.seed}: {variant.name} taken from {name}")
        self.save()

    def run(self) -> dict[str, Any]:
        variants = variants_of(self.cfg)
        wants_bound = self.cfg.get("upper_bound", True)
        self.reuse()
        if ("upper_bound" in self.record or not wants_bound) and all(
                v.name in self.record["methods"] for v in variants):
            log(f"{self.setting} seed {self.seed}: complete in the result file")
            return self.record
        for kind in ("ce", "cal"):
            self.teacher(kind)
        for variant in variants:
            if variant.name in self.record["methods"]:
                log(f"{self.setting} seed {self.seed}: {variant.name} already in the result file")
                continue
            self.record["methods"][variant.name] = self.method(variant)
            self.save()
        if wants_bound and "upper_bound" not in self.record:
            self.record["upper_bound"] = self.upper_bound()
            log(f"{self.setting} seed {self.seed}: full real train set {self.record['upper_bound']['accuracy']:.3f}")
            self.save()
        return self.record


def _init_psnr(ctx: RunContext, images_u8: torch.Tensor) -> float | None:
    """Mean PSNR (dB) of the distilled images against their initialisation,
    when the stage reports it."""
    try:
        from fd2_core.stages.drift import init_drift
    except ImportError:
        return None
    drift = init_drift(ctx)
    value = drift.get("init_psnr_db") if isinstance(drift, dict) else None
    return None if value is None or not math.isfinite(value) else float(value)


# ---------------------------------------------------------------- statistics


T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t_quantile(df: int) -> float:
    """Two-sided 95 % Student-t quantile (scipy when present, else the table above,
    normal beyond df 30)."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:
        return T95.get(df, 1.96 if df > 30 else 2.2)


def paired_interval(a: list[float], b: list[float]) -> dict[str, Any]:
    """Mean of the per-seed differences a − b (points) with a 95 % t-interval over seeds;
    None below 2 seeds."""
    diffs = [100.0 * (x - y) for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean = statistics.fmean(diffs) if diffs else float("nan")
    if n < 2:
        return {"n": n, "mean": mean, "lo": None, "hi": None, "diffs": diffs}
    half = t_quantile(n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half, "diffs": diffs}


def mean_std(values: list[float]) -> dict[str, Any]:
    pts = [100.0 * v for v in values]
    return {
        "values": values,
        "mean": statistics.fmean(pts) if pts else float("nan"),
        "std": statistics.stdev(pts) if len(pts) > 1 else 0.0,
    }


def _complete(run: dict[str, Any], names: list[str]) -> bool:
    return all(name in run.get("methods", {}) for name in names)


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Per setting: accuracies, paired differences, IOR and HLR over the seeds that finished every
    method used."""
    summary: dict[str, Any] = {}
    ipcs = results["config"]["ipcs"]
    names = results["config"]["methods"]
    for setting in results["settings"]:
        runs = [r for r in results["runs"].values() if r["setting"] == setting and _complete(r, names)]
        if not runs:
            continue
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "protocols": {}, "teachers": {}}
        for kind in ("ce", "cal"):
            for key in ("backbone_test_accuracy", "test_accuracy"):
                entry["teachers"][f"{kind}_{key}"] = mean_std([r["teachers"][kind][key] for r in runs])
            entry["teachers"][f"{kind}_time_s"] = statistics.fmean(r["teachers"][kind]["time_s"] for r in runs)
        for protocol in results["config"]["protocols"]:
            block: dict[str, Any] = {"accuracy": {}, "comparisons": {}, "ior": {}, "set_bytes": {}}
            for name in names:
                block["accuracy"][name] = {
                    f"ipc{i}": mean_std([r["methods"][name][protocol][f"ipc{i}"]["soft"] for r in runs]) for i in ipcs
                }
                block["set_bytes"][name] = {
                    f"ipc{i}": set_bytes_mean([r["methods"][name][protocol][f"ipc{i}"] for r in runs]) for i in ipcs
                }
            for label, (a, b) in results["config"].get("comparisons", COMPARISONS).items():
                block["comparisons"][label] = {f"ipc{i}": paired_interval(
                    [r["methods"][a][protocol][f"ipc{i}"]["soft"] for r in runs],
                    [r["methods"][b][protocol][f"ipc{i}"]["soft"] for r in runs],
                ) for i in ipcs}
            for name in names:
                if name == "random" or "random" not in names:
                    continue
                block["ior"][name] = {f"ipc{i}": paired_interval(
                    [r["methods"][name][protocol][f"ipc{i}"]["soft"] for r in runs],
                    [r["methods"]["random"][protocol][f"ipc{i}"]["soft"] for r in runs],
                ) for i in ipcs}
            entry["protocols"][protocol] = block
        with_ub = [r for r in runs if "upper_bound" in r]
        if with_ub:
            entry["upper_bound"] = mean_std([r["upper_bound"]["accuracy"] for r in with_ub])
            entry["upper_bound"]["time_s"] = statistics.fmean(r["upper_bound"]["time_s"] for r in with_ub)
            entry["hlr"] = {}
            for name in results["config"]["hard_label_methods"]:
                entry["hlr"][name] = {f"ipc{i}": {
                    **paired_interval(
                        [r["upper_bound"]["accuracy"] for r in with_ub],
                        [r["methods"][name][f"hard_ipc{i}"]["accuracy"] for r in with_ub],
                    ),
                    "hard": mean_std([r["methods"][name][f"hard_ipc{i}"]["accuracy"] for r in with_ub]),
                } for i in ipcs}
        entry["time_s"] = {
            name: statistics.fmean(
                r["methods"][name]["distill_s"]
                + sum(r["methods"][name][p][f"ipc{i}"]["time_s"] for p in PROTOCOLS for i in ipcs)
                + sum(r["methods"][name].get(f"hard_ipc{i}", {}).get("time_s", 0.0) for i in ipcs)
                for r in runs
            )
            for name in names
        }
        entry["psnr_db"] = {
            name: _mean_or_none([r["methods"][name].get("init_psnr_db") for r in runs]) for name in names
        }
        summary[setting] = entry
    return summary


def set_bytes_mean(cells: list[dict[str, Any]]) -> float | None:
    """Mean distilled images + soft labels bytes over seeds; None when a record predates their
    recording (PNG sizes differ a little between seeds)."""
    if not all("images_bytes" in c and "soft_labels_bytes" in c for c in cells):
        return None
    return statistics.fmean(c["images_bytes"] + c["soft_labels_bytes"] for c in cells)


def _pair_mean(record: dict[str, Any], names: list[str], ipcs: list[int], protocols: list[str]) -> float:
    """Mean student top-1 (0–1) of one arm of one (setting, seed) over
    `names` × `ipcs` × `protocols`."""
    return statistics.fmean(record["methods"][n][p][f"ipc{i}"]["soft"] for n in names for i in ipcs for p in protocols)


def summarise_choices(results: dict[str, Any]) -> dict[str, Any]:
    """`--validate`: per field, the paired difference (alternative arm − published arm, points) of
    the mean accuracy over random, sre2l++ and fd2 at every IPC, per protocol and over both, with a
    95 % t-interval over the (setting, seed) pairs where both arms finished; and the choice by the
    rule of docs/BENCHMARKS.md: the alternative only where the interval over both protocols lies
    above 0, else the published value."""
    cfg = results["config"]
    ipcs, protocols = cfg["ipcs"], cfg["protocols"]
    names = [n for n in cfg["methods"]]
    arms = cfg.get("arms", {})
    done: dict[str, dict[str, dict]] = {}  # arm → "setting/seed" → record
    for record in results["runs"].values():
        if _complete(record, names):
            done.setdefault(record["arm"], {})[f"{record['setting']}/{record['seed']}"] = record
    reference = done.get(REFERENCE_ARM, {})
    summary: dict[str, Any] = {"arms": {}, "choices": {}}
    for arm in arms:
        runs = done.get(arm, {})
        summary["arms"][arm] = {
            "pairs": sorted(runs),
            "accuracy": {p: {n: {f"ipc{i}": mean_std([r["methods"][n][p][f"ipc{i}"]["soft"] for r in runs.values()])
                                 for i in ipcs} for n in names} for p in protocols},
            "psnr_db": {n: _mean_or_none([r["methods"][n].get("init_psnr_db") for r in runs.values()])
                        for n in names},
        }
    for arm, overrides in arms.items():
        if arm == REFERENCE_ARM:
            continue
        field = arm.split("=", 1)[0]
        pairs = sorted(set(done.get(arm, {})) & set(reference))
        entry: dict[str, Any] = {"arm": arm, "published": arms[REFERENCE_ARM].get(field),
                                 "alternative": overrides[field], "pairs": pairs}
        for label, prots in {**{p: [p] for p in protocols}, "both": list(protocols)}.items():
            entry[label] = paired_interval([_pair_mean(done[arm][k], names, ipcs, prots) for k in pairs],
                                           [_pair_mean(reference[k], names, ipcs, prots) for k in pairs])
            entry[f"{label}_by_method"] = {n: paired_interval(
                [_pair_mean(done[arm][k], [n], ipcs, prots) for k in pairs],
                [_pair_mean(reference[k], [n], ipcs, prots) for k in pairs]) for n in names}
        both = entry["both"]
        entry["choice"] = overrides[field] if both["lo"] is not None and both["lo"] > 0 else entry["published"]
        summary["choices"][field] = entry
    return summary


def summarise_any(results: dict[str, Any]) -> dict[str, Any]:
    return summarise_choices(results) if results.get("mode") == "validate" else summarise(results)


def _mean_or_none(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


# ---------------------------------------------------------------- table and plot


def fmt_acc(cell: dict[str, Any]) -> str:
    return f"{cell['mean']:.1f} ± {cell['std']:.1f}"


def fmt_bytes(size: float | None) -> str:
    """A set's size in decimal units, "–" where the records hold none."""
    return "–" if size is None else human_bytes(size)


def fmt_diff(cell: dict[str, Any]) -> str:
    if cell["lo"] is None:
        return f"{cell['mean']:+.1f} (n={cell['n']})"
    mark = "**" if cell["lo"] > 0 else ""
    return f"{mark}{cell['mean']:+.1f} [{cell['lo']:+.1f}, {cell['hi']:+.1f}]{mark}"


def markdown(results: dict[str, Any], plot_rel: str | None) -> str:
    cfg = results["config"]
    ipcs = cfg["ipcs"]
    head = " | ".join(f"IPC {i}" for i in ipcs)
    rule = "|---|" + "---|" * len(ipcs)
    env = results["environment"]
    lines = [
        f"Command ({results['date']}, {env['cpu']}, {env['threads']} torch threads, torch {env['torch']}; "
        f"{results['total_s'] / 60:.1f} min of compute in this result file):",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        "Spec: `cpu-small` with " + ", ".join(f"{k}={v}" for k, v in cfg["spec"].items())
        + (f"; {cfg['classes']} classes per setting" if cfg["classes"] else "")
        + f"; teachers start from {'the shipped base backbone' if cfg['teacher_init'] == 'base' else 'scratch'}. "
        "Accuracy: mean ± std top-1 (%) over seeds on the real test split. Differences: mean paired difference "
        "in points over seeds with its 95 % t-interval; **bold** when the interval lies above 0.",
        "",
    ]
    for setting, entry in results["summary"].items():
        t = entry["teachers"]
        lines += [
            f"#### {setting} — seeds {', '.join(map(str, entry['seeds']))}",
            "",
            f"{results['setting_descriptions'].get(setting, setting)}. Teacher backbone test accuracy: plain CE "
            f"{fmt_acc(t['ce_backbone_test_accuracy'])} ({t['ce_time_s']:.0f} s), CAL "
            f"{fmt_acc(t['cal_backbone_test_accuracy'])} ({t['cal_time_s']:.0f} s); CAL teacher with its CAL head "
            f"{fmt_acc(t['cal_test_accuracy'])}."
            + (f" Full real train set, hard labels: {fmt_acc(entry['upper_bound'])} "
               f"({entry['upper_bound']['time_s']:.0f} s)." if "upper_bound" in entry else ""),
            "",
        ]
        for protocol, block in entry["protocols"].items():
            sizes = block.get("set_bytes", {})
            lines += [f"*{protocol}* — accuracy; size = distilled images (PNG) + soft labels, bytes per IPC", "",
                      f"| method | {head} | size ({' / '.join(f'IPC {i}' for i in ipcs)}) |", rule + "---|"]
            for name, cells in block["accuracy"].items():
                size = " / ".join(fmt_bytes(sizes.get(name, {}).get(f"ipc{i}")) for i in ipcs)
                lines.append(f"| {name} | " + " | ".join(fmt_acc(cells[f"ipc{i}"]) for i in ipcs) + f" | {size} |")
            lines += ["", f"*{protocol}* — paired differences (points)", "", f"| comparison | {head} |", rule]
            for label, cells in block["comparisons"].items():
                lines.append(f"| {label} | " + " | ".join(fmt_diff(cells[f"ipc{i}"]) for i in ipcs) + " |")
            for name, cells in block["ior"].items():
                lines.append(f"| IOR {name} | " + " | ".join(fmt_diff(cells[f"ipc{i}"]) for i in ipcs) + " |")
            lines.append("")
        if entry.get("hlr"):
            lines += ["HLR (full real data − the set, both hard labels; lower is better) and the hard-label accuracy",
                      "", f"| method | {head} |", rule]
            for name, cells in entry["hlr"].items():
                lines.append(f"| {name} | " + " | ".join(
                    f"{fmt_diff(cells[f'ipc{i}'])} (hard {fmt_acc(cells[f'ipc{i}']['hard'])})" for i in ipcs
                ) + " |")
            lines.append("")
        times = ", ".join(f"{name} {secs:.0f} s" for name, secs in entry["time_s"].items())
        psnr = ", ".join(f"{n} {v:.1f} dB" for n, v in entry["psnr_db"].items() if v is not None)
        lines += [f"Wall time per seed (distill + relabel + students, all IPCs): {times}.",
                  f"Images vs their initialisation (PSNR): {psnr or 'not reported'}.", ""]
    if plot_rel:
        lines += [f"![paired differences]({plot_rel})", ""]
    return "\n".join(lines)


def validation_markdown(results: dict[str, Any]) -> str:
    """`--validate`: the choice table (one row per field) and each arm's accuracies."""
    cfg, summary, env = results["config"], results["summary"], results["environment"]
    protocols = cfg["protocols"]
    lines = [
        f"Command ({results['date']}, {env['cpu']}, {env['threads']} torch threads, torch {env['torch']}; "
        f"{results['total_s'] / 60:.1f} min of compute in this result file):",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        "Data: " + "; ".join(results["setting_descriptions"][s] for s in results["settings"]) + ". Spec: `cpu-small` "
        "with " + ", ".join(f"{k}={v}" for k, v in cfg["spec"].items()) + ". Each row switches one field from its "
        "published value, the others staying published. Difference: alternative − published, in points, of the "
        "mean student top-1 over " + ", ".join(cfg["methods"]) + " at IPC " + "/".join(map(str, cfg["ipcs"]))
        + ", paired over (setting, seed) with its 95 % t-interval; the alternative is chosen only where the "
        "interval over both protocols lies above 0.",
        "",
        "| field: published → alternative | pairs | " + " | ".join(protocols) + " | both protocols | choice |",
        "|---|---|" + "---|" * len(protocols) + "---|---|",
    ]
    for field, entry in summary["choices"].items():
        cells = " | ".join(fmt_diff(entry[p]) for p in (*protocols, "both"))
        lines.append(f"| {field}: {entry['published']} → {entry['alternative']} | {len(entry['pairs'])} | {cells} | "
                     f"**{entry['choice']}** |")
    lines += ["", "By method (both protocols, same difference):", "",
              "| field | " + " | ".join(cfg["methods"]) + " |", "|---|" + "---|" * len(cfg["methods"])]
    for field, entry in summary["choices"].items():
        lines.append(f"| {field} | " + " | ".join(fmt_diff(entry["both_by_method"][n]) for n in cfg["methods"]) + " |")
    ipcs = cfg["ipcs"]
    lines += ["", "Accuracy per arm (mean ± std over pairs, %; " + " / ".join(protocols) + "):", "",
              "| arm | method | " + " | ".join(f"IPC {i}" for i in ipcs) + " | PSNR vs init |",
              "|---|---|" + "---|" * len(ipcs) + "---|"]
    for arm, entry in summary["arms"].items():
        for name in cfg["methods"]:
            cells = " | ".join(" / ".join(fmt_acc(entry["accuracy"][p][name][f"ipc{i}"]) for p in protocols)
                               for i in ipcs)
            psnr = entry["psnr_db"].get(name)
            lines.append(f"| {arm} | {name} | {cells} | {'' if psnr is None else f'{psnr:.1f} dB'} |")
    lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy vs IPC per protocol and setting (mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, ipcs = results["summary"], results["config"]["ipcs"]
    if not summary:
        return
    cols = [(s, p) for s in summary for p in summary[s]["protocols"]]
    fig, axes = plt.subplots(1, len(cols), figsize=(5.0 * len(cols), 4.2), squeeze=False)
    for ax, (setting, protocol) in zip(axes[0], cols, strict=True):
        entry = summary[setting]
        for name, cells in entry["protocols"][protocol]["accuracy"].items():
            means = [cells[f"ipc{i}"]["mean"] for i in ipcs]
            stds = [cells[f"ipc{i}"]["std"] for i in ipcs]
            ax.errorbar(ipcs, means, yerr=stds, marker="o", capsize=3, label=name)
        if "upper_bound" in entry:
            ax.axhline(entry["upper_bound"]["mean"], color="black", linestyle="--", linewidth=1, label="full real")
        ax.set_title(f"{setting}, {protocol}")
        ax.set_xlabel("images per class (IPC)")
        ax.set_ylabel("student top-1 on real test (%)")
        ax.set_xticks(ipcs)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def update_docs(doc: Path, mode: str, body: str) -> None:
    """Replace the block between this mode's markers in the benchmarks page
    (appended when missing)."""
    begin, end = f"<!-- quality:{mode}:begin -->", f"<!-- quality:{mode}:end -->"
    text = doc.read_text() if doc.exists() else ""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


# ---------------------------------------------------------------- the grid


def _environment() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False))
    tmp.replace(path)


def same_config(stored: dict[str, Any] | None, key: dict[str, Any]) -> bool:
    """Whether stored results may be extended under `key`: equal, except for spec fields the stored
    key predates whose new value only states what was implied before
    (`fd2_core.spec_compat.IMPLIED_BEFORE_ADDED`)."""
    if stored is None:
        return False
    # keys from before the soft-label format was recorded meant v2 streams
    stored = {"soft_label_format": SOFT_LABEL_FORMAT_V2, **stored}
    key = {"soft_label_format": SOFT_LABEL_FORMAT_V2, **key}
    if stored == key:
        return True
    old_specs, new_specs = stored.get("resolved_specs", {}), key.get("resolved_specs", {})
    if {k: v for k, v in stored.items() if k != "resolved_specs"} != {
            k: v for k, v in key.items() if k != "resolved_specs"} or old_specs.keys() != new_specs.keys():
        return False
    return all(not spec_changes(old_specs[name], new) for name, new in new_specs.items())


def merge_results(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result file from several of one configuration (the same key and mode),
    e.g. one process per setting.

    Raises SystemExit when the configurations differ, or when two files hold the same record with
    different figures (a record finished in both must be the same deterministic run; an unfinished
    one gives way)."""
    first = docs[0]
    for doc in docs[1:]:
        if doc.get("mode") != first.get("mode") or not same_config(first.get("config"), doc["config"]):
            raise SystemExit("the result files hold different configurations; they are never mixed")
    merged = {**first, "runs": {}, "total_s": round(sum(d.get("total_s", 0.0) for d in docs), 1)}
    for doc in docs:
        for key, record in doc["runs"].items():
            held = merged["runs"].get(key)
            if held is None or len(record.get("methods", {})) > len(held.get("methods", {})):
                if held is not None and any(record["methods"].get(m) != v for m, v in held["methods"].items()
                                            if "same_as" not in v and "reused_from" not in v):
                    raise SystemExit(f"{key} differs between the result files")
                merged["runs"][key] = record
        merged["settings"] = list(dict.fromkeys([*merged.get("settings", []), *doc.get("settings", [])]))
        merged["seeds"] = sorted({*merged.get("seeds", []), *doc.get("seeds", [])})
        merged["setting_descriptions"] = {**doc.get("setting_descriptions", {}),
                                          **merged.get("setting_descriptions", {})}
    merged["command"] = " && ".join(dict.fromkeys(d["command"] for d in docs))
    return merged


def load_results(path: Path, cfg: dict[str, Any], mode: str, command: str) -> dict[str, Any]:
    """The result file to extend: the stored one when its configuration matches,
    else a new document.

    Raises SystemExit when the file holds results of another configuration (they are never mixed).
    """
    key = config_key(cfg)
    if path.exists():
        stored = json.loads(path.read_text())
        if not same_config(stored.get("config"), key):
            raise SystemExit(
                f"{path} holds results of another configuration; pass --json with a new file or --fresh to replace"
            )
        stored["command"] = command
        return stored
    return {"format": FORMAT, "mode": mode, "command": command, "config": key, "runs": {}, "total_s": 0.0}


class GitCommitter:
    """Commits the result file when asked, at most once per `every_s` seconds
    (and always at the end)."""

    def __init__(self, path: Path, enabled: bool, every_s: float = 300.0):
        self.path, self.enabled, self.every_s, self.last = path, enabled, every_s, time.monotonic()

    def __call__(self, message: str, force: bool = False) -> None:
        if not self.enabled or (not force and time.monotonic() - self.last < self.every_s):
            return
        rel = os.path.relpath(self.path, ROOT)
        subprocess.run(["git", "add", rel], cwd=ROOT, check=False)
        subprocess.run(["git", "commit", "-q", "-m", message, "--", rel], cwd=ROOT, check=False)
        self.last = time.monotonic()


def _sources(cfg: dict[str, Any]) -> dict[str, str]:
    known = {**SETTINGS, **VALIDATION_SETTINGS}
    return {**{name: src for name, (src, _) in known.items()}, **cfg.get("sources", {})}


def _describe(results: dict[str, Any], cfg: dict[str, Any]) -> None:
    results["settings"] = list(dict.fromkeys([*results.get("settings", []), *cfg["settings"]]))
    results["seeds"] = sorted({*results.get("seeds", []), *cfg["seeds"]})
    descriptions = results.setdefault("setting_descriptions", {})
    known = {**SETTINGS, **VALIDATION_SETTINGS}
    for s in cfg["settings"]:
        text = known[s][1] if s in known else _sources(cfg)[s]
        if cfg["classes"]:
            text = text.replace("20 classes", f"{cfg['classes']} classes").replace(" (the default set)", "")
        descriptions[s] = text
    results["environment"] = _environment()
    results["date"] = time.strftime("%Y-%m-%d")


def _checkpointer(results: dict[str, Any], save, summariser):
    """`checkpoint(message)`: add the compute time since the last call, summarise, and
    `save(results, message)`."""
    clock = [time.monotonic()]

    def checkpoint(message: str) -> None:
        now = time.monotonic()
        results["total_s"] = round(results.get("total_s", 0.0) + now - clock[0], 1)
        clock[0] = now
        results["summary"] = summariser(results)
        if save is not None:
            save(results, message)

    return checkpoint


def run_validation(cfg: dict[str, Any], work: Path, results: dict[str, Any], save=None) -> dict[str, Any]:
    """`--validate`: every arm of `cfg["arms"]` on every (seed, setting), seeds outermost so that a
    stopped run leaves whole seeds; all arms of a pair share its teachers (`work/teachers`), each
    arm has its own distillation folder (`distill` reuses saved indices). Methods in `arm_free` run
    in the reference arm only and are copied into the others. Records are
    `runs["<setting>/<seed>/<arm>"]`; `save(results, message)` after each step."""
    sources = _sources(cfg)
    _describe(results, cfg)
    checkpoint = _checkpointer(results, save, summarise_choices)

    for seed in cfg["seeds"]:
        for setting in cfg["settings"]:
            shared: dict[str, dict] = {}  # the pair's teachers and scored patches, for all its arms
            for arm, overrides in arms_of(cfg).items():
                key = f"{setting}/{seed}/{arm}"
                record = results["runs"].setdefault(key, {})
                record["arm"] = arm
                reference = results["runs"].get(f"{setting}/{seed}/{REFERENCE_ARM}", {}).get("methods", {})
                methods = record.setdefault("methods", {})
                for name in cfg.get("arm_free", ()):
                    if arm != REFERENCE_ARM and name in reference and name not in methods:
                        methods[name] = {**reference[name], "same_as": REFERENCE_ARM}
                runner = PairRunner(
                    setting, sources[setting], seed, {**cfg, "spec": {**cfg["spec"], **overrides}}, work / slug(arm),
                    record, lambda k=key: checkpoint(f"Quality validation: {k} progress"), work / "teachers",
                    shared,
                )
                runner.run()
                checkpoint(f"Quality validation: {key} done")
    results["summary"] = summarise_choices(results)
    return results


def run_grid(cfg: dict[str, Any], work: Path, results: dict[str, Any], save=None) -> dict[str, Any]:
    """Every (setting, seed) of `cfg`, skipping what `results` already holds;
    `save(results)` after each step."""
    sources = _sources(cfg)
    _describe(results, cfg)
    checkpoint = _checkpointer(results, save, summarise)

    for setting in cfg["settings"]:
        for seed in cfg["seeds"]:
            key = f"{setting}/{seed}"
            record = results["runs"].setdefault(key, {})
            teacher_work = work.parent / cfg["teacher_mode"] if "teacher_mode" in cfg else None
            runner = PairRunner(
                setting, sources[setting], seed, cfg, work, record,
                lambda k=key: checkpoint(f"Quality grid: {k} progress"), teacher_work,
            )
            runner.run()
            checkpoint(f"Quality grid: {key} done")
    results["summary"] = summarise(results)
    return results


def write_outputs(results: dict[str, Any], json_path: Path, plot_path: Path, docs: Path | None) -> None:
    _write_json(json_path, results)
    if results["mode"] == "validate":  # a table of choices, no accuracy-vs-IPC plot
        log(f"wrote {json_path}")
    else:
        plot(results, plot_path)
        log(f"wrote {json_path} and {plot_path}")
    if docs is not None:
        rel = os.path.relpath(plot_path, docs.parent)
        body = validation_markdown(results) if results["mode"] == "validate" else markdown(results, rel)
        update_docs(docs, f"{tag_of(results)}-{results['mode']}", body)
        log(f"updated {docs}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 10 classes, short schedules")
    parser.add_argument("--table", action="store_true",
                        help="the paper's other rows (rded, fadrm+, fd2 on fadrm+) on the full grid's seeds")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds of the mode")
    parser.add_argument("--settings", nargs="+", choices=sorted({**SETTINGS, **VALIDATION_SETTINGS}),
                        help="override the settings of the mode")
    parser.add_argument("--teacher-init", choices=("base", "scratch"), help="override where teachers start")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--validate", action="store_true",
                        help="choose cpu-small's data-path fields on the validation data (random, sre2l++, fd2)")
    parser.add_argument("--long", action="store_true",
                        help="the published 4 000 distill iterations at IPC 3 on birds-32: fd2, sre2l++, CAL only")
    parser.add_argument("--work", type=Path, default=ROOT / ".fd2" / f"quality_{TAG}",
                        help="stage outputs (resumable)")
    parser.add_argument("--json", type=Path, help=f"result file (default bench/results/quality_{TAG}_<mode>.json)")
    parser.add_argument("--plot", type=Path, help=f"plot file (default docs/quality_{TAG}_<mode>.png)")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "BENCHMARKS.md", help="page to update")
    parser.add_argument("--no-docs", action="store_true", help="do not touch the benchmarks page")
    parser.add_argument("--fresh", action="store_true", help="start a new result file instead of extending it")
    parser.add_argument("--commit", action="store_true", help="git-commit the result file as results come in")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only redo the plot and table of a result file")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="join result files of one configuration (e.g. one process per setting) into --json")
    args = parser.parse_args(argv)
    if args.merge:
        if args.json is None:
            parser.error("--merge needs --json, the file to write")
        if args.json.exists() and args.json not in args.merge:
            parser.error(f"{args.json} exists and is not one of the merged files; it is never overwritten")
        _write_json(args.json, merge_results([json.loads(path.read_text()) for path in args.merge]))
        args.render = args.json
    if args.render:
        results = json.loads(args.render.read_text())
        results["summary"] = summarise_any(results)
        plot_path = args.plot or ROOT / "docs" / f"quality_{tag_of(results)}_{results['mode']}.png"
        write_outputs(results, args.render, plot_path, None if args.no_docs else args.docs)
        print(validation_markdown(results) if results["mode"] == "validate" else markdown(results, None))
        return 0

    modes = {"quick": args.quick, "table": args.table, "validate": args.validate, "long": args.long}
    if sum(modes.values()) > 1:
        parser.error("--quick, --table, --validate and --long are separate modes; pass one")
    mode = next((name for name, on in modes.items() if on), "full")
    cfg = dict({"quick": QUICK, "table": TABLE, "full": FULL, "validate": VALIDATE, "long": LONG}[mode])
    if args.seeds:
        cfg["seeds"] = tuple(args.seeds)
    if args.settings:
        cfg["settings"] = tuple(args.settings)
    if args.teacher_init:
        cfg["teacher_init"] = args.teacher_init
    torch.set_num_threads(args.threads)
    json_path = args.json or ROOT / "bench" / "results" / f"quality_{TAG}_{mode}.json"
    plot_path = args.plot or ROOT / "docs" / f"quality_{TAG}_{mode}.png"
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/quality.py", *(argv or sys.argv[1:])])
    if args.fresh and json_path.exists():
        json_path.unlink()
    results = load_results(json_path, cfg, mode, command)
    committer = GitCommitter(json_path, args.commit)

    def save(doc: dict[str, Any], message: str) -> None:
        _write_json(json_path, doc)
        committer(message, force=message.endswith("done"))

    grid = run_validation if mode == "validate" else run_grid
    results = grid(cfg, args.work / cfg.get("work_mode", mode), results, save)
    write_outputs(results, json_path, plot_path, None if args.no_docs else args.docs)
    committer("Quality grid: results", force=True)
    print(validation_markdown(results) if mode == "validate" else markdown(results, None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
