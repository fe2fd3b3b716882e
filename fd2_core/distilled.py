"""Public loader: turn downloaded artifacts back into a torch Dataset that replays the soft labels.

    from fd2_core.distilled import SoftLabelReplay
    data = SoftLabelReplay("distilled.tar.gz", "soft_labels.safetensors")
    for item in torch.utils.data.DataLoader(data, batch_size=None, shuffle=False):
        parts = data.split(item)                      # the parts the teacher forwarded
        for images, teacher_logits in parts:
            (kl(student(images) / T, teacher_logits / T) / len(parts)).backward()
        optimizer.step(); optimizer.zero_grad()

Each item is one recorded batch (CutMix mixes inside a batch, so the batch is the unit of replay).
Online soft labels (`soft_label_values: online`) store no logits: pass the downloaded teacher,
`SoftLabelReplay(..., teacher="teacher.safetensors")`, and each item's logits are computed by it as
the relabel stage would have recorded them.
The teacher forwarded each batch in `forward_splits` consecutive parts, with
train-mode BatchNorm by default; the published validation script replays
those parts as micro-batches and steps the optimizer once per batch.
Only tarfile, PIL, json and safetensors are used to read the files: no pickles.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from .artifacts import ipc_index_of
from .augment import apply_crop_flip, apply_cutmix
from .softlabels import SoftLabels, TeacherLogits, forward_parts


@dataclass
class DistilledSet:
    """A downloaded distilled set read back from its artifact, in the order of labels.csv."""

    images: torch.Tensor  # uint8 [N, 3, S, S], in the order of labels.csv
    labels: torch.Tensor  # int64 [N]
    classes: list[str]
    files: list[str]
    manifest: dict


def read_distilled(path: str | Path) -> DistilledSet:
    """Read `distilled.tar.gz` (or an extracted folder) into tensors, in labels.csv order."""
    path = Path(path)
    blobs: dict[str, bytes] = {}
    if path.is_dir():
        for p in path.rglob("*"):
            if p.is_file():
                blobs[p.relative_to(path).as_posix()] = p.read_bytes()
    else:
        with tarfile.open(path, "r:*") as tar:
            for member in tar.getmembers():
                if member.isfile():
                    blobs[member.name] = tar.extractfile(member).read()
    manifest = json.loads(blobs["manifest.json"])
    rows = list(csv.DictReader(io.StringIO(blobs["labels.csv"].decode("utf-8"))))
    images = [np.asarray(Image.open(io.BytesIO(blobs[r["file"]])).convert("RGB")) for r in rows]
    tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([int(r["class_index"]) for r in rows], dtype=torch.long)
    return DistilledSet(tensor, labels, list(manifest["dataset"]["classes"]), [r["file"] for r in rows], manifest)


class SoftLabelReplay(torch.utils.data.Dataset):
    """Item i = (normalised augmented images [b,3,S,S], teacher logits [b,K]) of recorded batch i.

    How the logits were made, from the file's metadata (v1 files: their
    recorded source, eval mode, 1 part):
    `soft_label_source` (backbone | cal | mixed), `bn_mode` (train | eval)
    and `forward_splits`, the number of consecutive parts each batch was
    forwarded in; `split(item)` cuts an item into those parts.
    """

    def __init__(self, distilled: str | Path | DistilledSet, soft_labels: str | Path | SoftLabels,
                 teacher: str | Path | TeacherLogits | None = None):
        self.set = distilled if isinstance(distilled, DistilledSet) else read_distilled(distilled)
        self.soft = soft_labels if isinstance(soft_labels, SoftLabels) else SoftLabels.load(soft_labels)
        if isinstance(teacher, (str, Path)):
            teacher = relabel_teacher(teacher, self.soft)
        self.teacher = teacher
        meta = self.soft.metadata
        order = json.loads(meta["labels"])
        if len(order) != self.set.images.shape[0]:
            raise ValueError("soft labels and distilled set describe a different number of images")
        # soft labels index images in distillation order (ipc-major);
        # labels.csv is sorted by file name
        by_file = {name: i for i, name in enumerate(self.set.files)}
        sorted_idx = _distillation_order(self.set, by_file, order)
        mean = torch.tensor(json.loads(meta["mean"])).view(1, 3, 1, 1)
        std = torch.tensor(json.loads(meta["std"])).view(1, 3, 1, 1)
        self.images = (self.set.images[sorted_idx].float() / 255.0 - mean) / std
        self.labels = torch.tensor(order, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.soft)

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raises ValueError for online soft labels without a teacher, AugmentationMismatch when the
        batch's epoch does not regenerate as recorded."""
        idx, crop, cutmix, logits = self.soft.batch(step)
        images = apply_cutmix(apply_crop_flip(self.images[idx], crop), cutmix)
        if logits is None:
            if self.teacher is None:
                raise ValueError("these soft labels are online (no stored logits): pass the job's teacher, "
                                 "SoftLabelReplay(..., teacher='teacher.safetensors')")
            with torch.no_grad():
                logits = torch.cat([self.teacher(images[part]).float() for part in self.soft.parts(step)])
        return images, logits

    @property
    def soft_label_source(self) -> str:
        return self.soft.soft_label_source

    @property
    def bn_mode(self) -> str:
        return self.soft.bn_mode

    @property
    def forward_splits(self) -> int:
        return self.soft.forward_splits

    def split(self, item: tuple[torch.Tensor, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(images [b_p,3,S,S], logits [b_p,K]) per part the teacher
        forwarded (published relabel: 20 → 10 + 10)."""
        images, logits = item
        return [(images[part], logits[part]) for part in forward_parts(images.shape[0], self.forward_splits)]


def relabel_teacher(path: str | Path, soft: SoftLabels) -> TeacherLogits:
    """The downloaded `teacher.safetensors` as the relabel ran it for `soft`: logits of the file's
    source (backbone | cal | mixed, the teacher's cal_ratio), BatchNorm in the file's mode with the
    running statistics untouched, gradients off. Raises ValueError for a committee's file (its
    members are not shipped one by one)."""
    from .models import build_model
    from .stages.teacher import relabel_mode, source_logits

    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
        state = {key: fh.get_tensor(key) for key in fh.keys()}
    if meta.get("format") != "fd2.teacher.v1" or "members" in meta:
        raise ValueError(f"{path}: not a single teacher's file (format {meta.get('format')!r}); online soft "
                         "labels replay with the one teacher of their job")
    model = build_model(meta["backbone"], soft.num_classes, int(meta["image_size"]), cal=json.loads(meta["cal"]),
                        num_attention_maps=int(meta["num_attention_maps"]), width=int(meta["model_width"]))
    model.load_state_dict(state)
    model.eval()
    cal_ratio = float(meta["cal_ratio"])

    def logits_of(images: torch.Tensor) -> torch.Tensor:
        with relabel_mode(model, soft.bn_mode):
            return source_logits(model(images), soft.soft_label_source, cal_ratio)

    return logits_of


def _distillation_order(ds: DistilledSet, by_file: dict[str, int], labels: list[int]) -> torch.Tensor:
    """Position k·ipc-major: image j of class c sits at j·K + c; c comes from labels.csv, j from the
    file name's `_<j>` ending (`artifacts.ipc_index_of`, the parse of the name the writer built)."""
    k = len(ds.classes)
    index = torch.empty(len(labels), dtype=torch.long)
    for name, i in by_file.items():
        index[ipc_index_of(name) * k + int(ds.labels[i])] = i
    return index
