"""Stored specs against today's schema: which differences still mean the same run.

A spec is stored with what it made: a resumed job's spec.json, a benchmark's result key.
Fields added to `JobSpec` since then must not make an old spec look different.
Nor must fields that never change results.
`spec_changes` lists the fields that really differ.
`data_path_changed` says whether a stored spec predates the published data path.
No spec can reproduce a run on the earlier path.
Torch-free, like the schema it compares against.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Spec fields added after specs were first stored, with the values that state what a spec without
# the field meant.
# A stored spec that predates such a field still matches when the new value is one of these.
# Before `teacher_weights_mode`, the weights file's kind implied the mode.
# Before `base`, `fd2` meant FD² on SRe²L++ and the other methods had no base.
# The FADRM+ fields change nothing for the other recipes.
# So a spec before them meant any preset's values (lists are compared as tuples).
# Before committees, a spec meant one teacher; before `max_workers`, one worker ran a job.
IMPLIED_BEFORE_ADDED: dict[str, frozenset[Any]] = {
    "teacher_weights_mode": frozenset({"backbone", "full"}),
    "base": frozenset({"sre2l++", None}),
    "fadrm_phase_steps": frozenset({(60, 60, 60, 80), (1500, 1500, 1500, 2000)}),
    "fadrm_phase_sizes": frozenset({None}),
    "fadrm_alpha": frozenset({0.5}),
    "committee": frozenset({None}),
    "committee_mode": frozenset({"auto"}),
    "amp_dtype": frozenset({"bfloat16"}),
    "max_workers": frozenset({1}),
    # Added with the published data path; a spec before them meant these.
    # What else changed with them (the crop sampler and resampling) refuses a work folder of an
    # earlier run:
    # see DATA_PATH_MARKER.
    "distill_crop": frozenset({"image"}),
    "patch_rule": frozenset({"ranked"}),
    "synthetic_format": frozenset({"png"}),
    "pretrain_lr_decay_mode": frozenset({"stepped"}),
    # Added with compressed soft labels; before them every epoch's logits were stored in fp16.
    "soft_label_values": frozenset({"fp16"}),
    "label_epoch_fraction": frozenset({1.0}),
    # Before the label budget, the encoding fields alone chose the soft labels' format.
    "label_budget_bytes": frozenset({None}),
}

# The field that came with the published data path.
# That path brought torchvision's crop boxes and antialiased resampling in every stage, and CAL's
# published crop/drop.
# A stored spec without the field was run on the earlier data path, which no spec can reproduce.
# So a work folder holding such a run cannot be resumed (`data_path_changed`).
DATA_PATH_MARKER = "distill_crop"


def data_path_changed(earlier: Mapping[str, Any]) -> bool:
    """Whether a stored spec predates the published data path (its run saw other crops)."""
    return DATA_PATH_MARKER not in earlier


# Fields that never change what a run computes (how many workers share a job).
# A work folder, a stored result or a benchmark written under another value still matches.
RESULT_NEUTRAL_FIELDS: frozenset[str] = frozenset({"max_workers"})


def spec_changes(earlier: dict[str, Any], resolved: dict[str, Any]) -> list[str]:
    """Fields in which `resolved` differs from an `earlier` stored spec.

    A field the earlier spec predates is ignored when its new value only states what was implied
    before (`IMPLIED_BEFORE_ADDED`).
    The fields that never change results (`RESULT_NEUTRAL_FIELDS`) are ignored too.
    """
    changed = []
    for key in sorted((set(earlier) | set(resolved)) - RESULT_NEUTRAL_FIELDS):
        value = resolved.get(key)
        value = tuple(value) if isinstance(value, list) else value
        if key not in earlier and key in IMPLIED_BEFORE_ADDED and value in IMPLIED_BEFORE_ADDED[key]:
            continue
        if earlier.get(key) != resolved.get(key):
            changed.append(key)
    return changed


__all__ = ["DATA_PATH_MARKER", "IMPLIED_BEFORE_ADDED", "RESULT_NEUTRAL_FIELDS", "data_path_changed", "spec_changes"]
