"""Soft labels replay exactly: the recorded augmentations reproduce the stored teacher logits."""

from __future__ import annotations

import json

import pytest
import torch
from pipeline_helpers import TINY_DATA, tiny_spec
from safetensors import safe_open

from fd2_core.distilled import SoftLabelReplay, read_distilled
from fd2_core.label_formats import LabelEncoding
from fd2_core.models import build_model
from fd2_core.pipeline import run
from fd2_core.relabel_choices import AugmentationStream
from fd2_core.softlabels import SoftLabels, record_soft_labels, replay, save_soft_labels
from fd2_core.spec_resolution import resolve_spec


def _teacher():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    return net.eval()


def v5_metadata(stream: AugmentationStream, encoding: LabelEncoding, epochs: int, num_classes: int,
                kept: list[int] | None = None) -> dict[str, object]:
    """The metadata `relabel` writes, for a walk of `stream` (eval-mode teacher in one part)."""
    return {"batch_size": stream.batch_size, "num_classes": num_classes, "epochs": epochs,
            "soft_label_source": "backbone", "relabel_bn_mode": "eval", "forward_splits": 1,
            "augmentations": stream.as_metadata(), "label_encoding": encoding.as_metadata(),
            "epochs_kept": list(range(epochs)) if kept is None else kept}


@pytest.mark.parametrize("topk", [0, 2])
def test_replay_reproduces_recorded_logits(tmp_path, topk):
    teacher = _teacher()
    images = torch.randn(7, 3, 16, 16)
    stream = AugmentationStream(3, "relabel", 7, 16, 3, 1.0, 0.08)
    encoding = LabelEncoding("fp16", topk)
    tensors = record_soft_labels(teacher, images, epochs=3, stream=stream, encoding=encoding)
    assert set(tensors) == ({"augment_digests", "topk_values", "topk_indices"} if topk
                            else {"augment_digests", "logits"})  # no stored order, boxes, flips or CutMix
    path = save_soft_labels(tmp_path / "s.safetensors", tensors, v5_metadata(stream, encoding, 3, 4))
    soft = SoftLabels.load(path)
    assert len(soft) == 3 * 3  # 3 epochs × ceil(7 / 3) batches
    seen = torch.zeros(7, dtype=torch.long)
    for step, (x, stored) in enumerate(replay(images, soft)):
        with torch.no_grad():
            fresh = teacher(x)
        if topk:
            idx = stored.topk(topk, dim=1).indices
            assert torch.allclose(fresh.gather(1, idx), stored.gather(1, idx), atol=2e-2)
            assert (stored <= -1e3).sum(1).eq(4 - topk).all()
        else:
            assert torch.allclose(fresh, stored, atol=2e-2)
        seen += torch.bincount(soft.batch(step)[0], minlength=7)
    assert seen.eq(3).all()  # every image once per epoch


def test_soft_labels_refuse_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError):
        SoftLabels.load(tmp_path / "other.safetensors")


def test_public_loader_replays_downloaded_artifacts_against_the_teacher(tmp_path):
    raw = tiny_spec(ipc=2, method="sre2l++")
    result = run(resolve_spec(raw), TINY_DATA, tmp_path / "run")
    data = SoftLabelReplay(result.artifacts["distilled.tar.gz"], result.artifacts["soft_labels.safetensors"])
    distilled = read_distilled(result.artifacts["distilled.tar.gz"])
    assert distilled.images.dtype == torch.uint8 and distilled.images.shape[0] == 2 * 4
    assert len(data) == raw["relabel_epochs"] * 2  # 8 images, batches of 4

    with safe_open(str(result.artifacts["teacher.safetensors"]), "pt") as fh:
        meta = fh.metadata()
        state = {k: fh.get_tensor(k) for k in fh.keys()}
    teacher = build_model(
        meta["backbone"], 4, int(meta["image_size"]), cal=json.loads(meta["cal"]), width=int(meta["model_width"])
    )
    teacher.load_state_dict(state)
    assert (data.soft_label_source, data.bn_mode, data.forward_splits) == ("backbone", "train", 2)
    # published relabel: BatchNorm normalises with the statistics of each forwarded part
    teacher.train()
    images, stored = data[0]
    with torch.no_grad():
        fresh = torch.cat([teacher(part).logits for part, _ in data.split((images, stored))])
    assert torch.allclose(fresh, stored, atol=5e-2, rtol=1e-2)
