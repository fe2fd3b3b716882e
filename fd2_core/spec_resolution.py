"""Spec resolution: a user's partial spec merged over its preset, completed and validated.

The CLI, the API and the worker resolve a spec only here, so every entry sees the same job.
Under a paper preset it fills in the published M and r per backbone, also for each member.
It switches FD²'s parts off for the methods that are recipes of their own.
Once the data's classes are known, `fit_label_budget` turns a `label_budget_bytes` into the encoding
fields (the API at submit, the pipeline for a CLI run), so the stored spec names the labels' format.
Torch-free on purpose: the API resolves specs at submit time without loading torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from .label_formats import FULL, LabelEncoding
from .label_sizes import LabelBudgetError, budget_candidates, estimated_label_file_bytes
from .presets import PRESETS, paper_cal_settings
from .spec import JobSpec

_CAL_FIELDS = ("num_attention_maps", "cal_ratio")
_FD2_PARTS = ("cal", "fc", "sc")
# what a label budget chooses
ENCODING_FIELDS = ("soft_label_values", "topk", "label_epoch_fraction")


def _resolved_committee(preset: str, committee: Any) -> Any:
    """Members with the published (M, r) of their backbone filled in under a paper preset.

    Each value a member sets is kept.
    Anything that is not a list of members is left for the schema to reject.
    """
    if not isinstance(committee, list):
        return committee
    members = []
    for item in committee:
        member = {"backbone": item} if isinstance(item, str) else item
        if isinstance(member, dict) and isinstance(member.get("backbone"), str):
            published = paper_cal_settings(preset, member["backbone"])
            member = dict(member)
            for name, value in zip(_CAL_FIELDS, published or (), strict=False):
                if member.get(name) is None:
                    member[name] = value
        members.append(member)
    return members


def resolve_spec(raw: dict[str, Any] | None = None) -> JobSpec:
    """Merge a user's partial spec over its preset and validate it.

    Under a paper preset, M (`num_attention_maps`) and r (`cal_ratio`) follow the published table.
    The table's entry is the resolved backbone's, and a value the user set is kept.
    Every method but fd2 (sre2l++, rded, random) switches the FD² parts off and has no `base`.
    A user who names them gets the validator's error, which names the fields.
    Raises pydantic.ValidationError with the offending field in `loc`.
    """
    raw = dict(raw or {})
    preset = raw.get("preset", "cpu-small")
    if not isinstance(preset, str) or preset not in PRESETS:
        # let pydantic produce the uniform error for an unknown literal
        JobSpec.model_validate({"preset": preset})
    merged: dict[str, Any] = {**PRESETS[preset], **raw}
    backbone = merged.get("backbone")
    published = paper_cal_settings(preset, backbone) if isinstance(backbone, str) else None
    if published is not None:
        for name, value in zip(_CAL_FIELDS, published, strict=True):
            if name not in raw:
                merged[name] = value
    merged["committee"] = _resolved_committee(preset, merged.get("committee"))
    if merged.get("backbone") == "convnet" and "torchvision_weights" not in raw:
        # a paper preset's ImageNet start has no convnet counterpart
        merged["torchvision_weights"] = False
    if merged.get("method", "fd2") != "fd2":
        user_set = {k for k in _FD2_PARTS if raw.get(k)}
        for part in _FD2_PARTS:
            if part not in user_set:
                merged[part] = False
        if "base" not in raw:
            # only FD² runs on a base; the other methods are recipes of their own
            merged["base"] = None
    if merged.get("evaluate") is False and "eval_random_baseline" not in raw:
        merged["eval_random_baseline"] = False
    spec = JobSpec.model_validate(merged)
    _check_budget_alone(raw)
    return spec


def _check_budget_alone(raw: Mapping[str, Any]) -> None:
    """A label budget chooses the encoding fields itself: naming some of them too is refused (a
    pydantic error on `label_budget_bytes`). A spec naming all three is a resolved spec sent again
    (the worker's, or one copied from a job), whose encoding `fit_label_budget` keeps if it fits."""
    named = [name for name in ENCODING_FIELDS if name in raw]
    if raw.get("label_budget_bytes") is None or not named or len(named) == len(ENCODING_FIELDS):
        return
    message = (f"label_budget_bytes chooses {', '.join(ENCODING_FIELDS)} itself, and {' and '.join(named)} "
               f"{'is' if len(named) == 1 else 'are'} set too; set either label_budget_bytes or "
               f"{' and '.join(named)}, not both")
    error = InitErrorDetails(type=PydanticCustomError("value_error", message), loc=("label_budget_bytes",),
                             input=raw["label_budget_bytes"])
    raise ValidationError.from_exception_data(JobSpec.__name__, [error])


def fit_label_budget(spec: JobSpec, num_classes: int, *, class_names: Sequence[str] | None = None) -> JobSpec:
    """The spec with the first encoding of `label_sizes.BUDGET_ORDER` whose soft-label file for
    ipc·K images fits `label_budget_bytes` (`estimated_label_file_bytes`; `class_names` when known,
    else an assumed length); the spec itself without a budget, or when it already names an encoding
    that fits (a resolved spec run by the worker or sent again).

    Raises LabelBudgetError when nothing fits (saying the smallest size) or the named encoding does
    not. One function for the API's submit check and the pipeline's run of a CLI spec.
    """
    budget = spec.label_budget_bytes
    if budget is None:
        return spec
    images, epochs = spec.ipc * num_classes, spec.relabel_epochs

    def size(encoding: LabelEncoding) -> int:
        return estimated_label_file_bytes(encoding, epochs, images, num_classes, class_names=class_names,
                                          committee_size=len(spec.members))

    stated = LabelEncoding.from_spec(spec)
    if stated != FULL:
        need = size(stated)
        if need <= budget:
            return spec
        raise LabelBudgetError(
            "label_budget_exceeded",
            f"the spec's soft-label encoding {stated.name} needs about {need} bytes for {images} images of "
            f"{num_classes} classes, above label_budget_bytes={budget}; leave {', '.join(ENCODING_FIELDS)} out so "
            "that the budget chooses, or raise label_budget_bytes",
            {"label_budget_bytes": budget, "needed_bytes": need, "encoding": stated.name})
    sizes = []
    for encoding in budget_candidates(num_classes):
        need = size(encoding)
        if need <= budget:
            fields = {"soft_label_values": encoding.values, "topk": encoding.topk,
                      "label_epoch_fraction": encoding.epoch_fraction}
            return JobSpec.model_validate({**spec.model_dump(), **fields})
        sizes.append((need, encoding.name))
    smallest, name = min(sizes)
    raise LabelBudgetError(
        "label_budget_too_small",
        f"label_budget_bytes={budget} is below the smallest soft-label file this job can have: {smallest} bytes "
        f"({name}, {epochs} relabel epochs of {images} images of {num_classes} classes); raise label_budget_bytes "
        "to at least that, or lower ipc or relabel_epochs",
        {"label_budget_bytes": budget, "smallest_bytes": smallest, "smallest_encoding": name})


__all__ = ["ENCODING_FIELDS", "LabelBudgetError", "fit_label_budget", "resolve_spec"]
