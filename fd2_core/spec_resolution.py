"""Spec resolution: a user's partial spec merged over its preset, completed and validated.

The CLI, the API and the worker resolve a spec only here, so every entry sees the same job.
Under a paper preset it fills in the published M and r per backbone, also for each member.
It switches FD²'s parts off for the methods that are recipes of their own.
Torch-free on purpose: the API resolves specs at submit time without loading torch.
"""

from __future__ import annotations

from typing import Any

from .presets import PRESETS, paper_cal_settings
from .spec import JobSpec

_CAL_FIELDS = ("num_attention_maps", "cal_ratio")
_FD2_PARTS = ("cal", "fc", "sc")


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
    return JobSpec.model_validate(merged)


__all__ = ["resolve_spec"]
