"""Duplicate images and train/test leakage, found by the digest of decoded pixels (torch-free).

A test image that also occurs in train inflates every accuracy measured on the test split, and copies inside a
split weigh some pictures more than others. Images are compared by `images.pixel_digest` (the same pixels at
the file's own resolution, whatever the bytes), within the split each image is actually used in; a test split
carved from train counts copies that the carve put on both sides.

Dropping keeps, of each group of equal images in a split, the one whose name (path relative to the dataset
root) sorts first in code-point order, and drops every test image whose pixels occur in train. When the split
is not fixed yet (`pooled`: data without a test folder, whose test share each job carves with its own seed),
the first of each group over the whole data is kept, so that no carve can put a copy on both sides.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

SPLITS: tuple[str, str] = ("train", "test")
MAX_EXAMPLES = 10
MAX_NAME_CHARS = 300  # member names may be 64 KiB long; examples and reasons stay small


@dataclass(frozen=True)
class Fingerprint:
    """One decoded image: its name as shown to users, the split it is used in, its pixel digest."""

    name: str
    split: str
    digest: str


@dataclass
class DuplicateReport:
    """What `find_duplicates` found, and the images a drop removes (`dropped`: input index -> reason)."""

    counts: dict[str, dict[str, int]]
    test_in_train: int
    leak_examples: list[list[str]] = field(default_factory=list)
    copy_examples: list[list[str]] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)

    @property
    def duplicate_images(self) -> int:
        """Images that repeat an earlier one of their split, over both splits."""
        return sum(c["duplicate_images"] for c in self.counts.values())

    def as_dict(self, max_examples: int = MAX_EXAMPLES) -> dict[str, Any]:
        """JSON-ready, the shape of the dataset resource's `duplicates` and of report.json's
        `dataset.duplicates`: per split `duplicate_images` (images beyond the first of each group) and
        `groups`, `test_in_train` (test images whose pixels occur in train), `examples` ([kept or train
        image, its copy] pairs, leaks first) and `dropped` (images removed)."""
        return {
            **{split: dict(self.counts[split]) for split in SPLITS},
            "test_in_train": self.test_in_train,
            "examples": [list(pair) for pair in [*self.leak_examples, *self.copy_examples][:max_examples]],
            "dropped": len(self.dropped),
        }


def _short(name: str, limit: int = MAX_NAME_CHARS) -> str:
    if len(name) <= limit:
        return name
    half = (limit - 1) // 2
    return f"{name[:half]}…{name[-half:]}"


def find_duplicates(prints: Sequence[Fingerprint], *, drop: bool = False, pooled: bool = False,
                    max_examples: int = MAX_EXAMPLES) -> DuplicateReport:
    """Count equal images per split and test images that occur in train; with `drop`, choose what to remove
    by the rule in this module's docstring (`pooled`: the split is not fixed yet). Raises ValueError for a
    split other than train or test."""
    order = sorted(range(len(prints)), key=lambda i: prints[i].name)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index in order:
        if prints[index].split not in SPLITS:
            raise ValueError(f"unknown split {prints[index].split!r}")
        groups[(prints[index].split, prints[index].digest)].append(index)
    counts = {split: {"duplicate_images": 0, "groups": 0} for split in SPLITS}
    copies: list[list[str]] = []
    for (split, _), members in groups.items():
        if len(members) > 1:
            counts[split]["groups"] += 1
            counts[split]["duplicate_images"] += len(members) - 1
            if len(copies) < max_examples:
                copies.extend([_short(prints[members[0]].name), _short(prints[i].name)] for i in members[1:])
    in_train = {digest: members[0] for (split, digest), members in groups.items() if split == "train"}
    leaks = [i for i in order if prints[i].split == "test" and prints[i].digest in in_train]
    report = DuplicateReport(
        counts=counts,
        test_in_train=len(leaks),
        leak_examples=[[_short(prints[in_train[prints[i].digest]].name), _short(prints[i].name)]
                       for i in leaks[:max_examples]],
        copy_examples=copies[:max_examples],
    )
    if drop:
        report.dropped = _pooled_drops(prints, order) if pooled else _split_drops(prints, groups, in_train)
    return report


def _pooled_drops(prints: Sequence[Fingerprint], order: Sequence[int]) -> dict[int, str]:
    kept: dict[str, int] = {}
    dropped = {}
    for index in order:
        first = kept.setdefault(prints[index].digest, index)
        if first != index:
            dropped[index] = f"same pixels as {_short(prints[first].name, 200)}; dropped as a duplicate"
    return dropped


def _split_drops(prints: Sequence[Fingerprint], groups: dict[tuple[str, str], list[int]],
                 in_train: dict[str, int]) -> dict[int, str]:
    dropped = {}
    for (split, digest), members in groups.items():
        if split == "test" and digest in in_train:
            first = _short(prints[in_train[digest]].name, 200)
            dropped.update((i, f"same pixels as {first} in train; dropped from test") for i in members)
        else:
            first = _short(prints[members[0]].name, 200)
            dropped.update((i, f"same pixels as {first}; dropped as a duplicate") for i in members[1:])
    return dropped


def _images(count: int, noun: str = "image") -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def duplicate_warnings(report: DuplicateReport, fix: str) -> list[dict[str, Any]]:
    """`{code, message, details}` entries for what a dataset still holds (none when `report` dropped them);
    `fix` ends each message, e.g. how to upload again without them."""
    if report.dropped:
        return []
    warnings = []
    if report.test_in_train:
        verb = "occurs" if report.test_in_train == 1 else "occur"
        warnings.append({
            "code": "test_in_train",
            "message": f"{_images(report.test_in_train, 'test image')} also {verb} in train (same decoded "
                       f"pixels), which inflates every test accuracy; {fix}",
            "details": {"test_in_train": report.test_in_train, "examples": report.leak_examples},
        })
    if report.duplicate_images:
        train, test = (report.counts[s]["duplicate_images"] for s in SPLITS)
        verb = "repeats" if report.duplicate_images == 1 else "repeat"
        warnings.append({
            "code": "duplicates",
            "message": f"{_images(report.duplicate_images)} {verb} another image of the same split (same decoded "
                       f"pixels): {train} in train, {test} in test; {fix}",
            "details": {**{s: dict(report.counts[s]) for s in SPLITS}, "examples": report.copy_examples},
        })
    return warnings


__all__ = ["DuplicateReport", "Fingerprint", "duplicate_warnings", "find_duplicates"]
