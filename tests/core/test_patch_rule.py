"""The published patch rule (`patch_rule: published`) against a plain loop
reference, its pool, its picks, its independence from class blocks, its
plain cross-entropy scorer and what the scorer costs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pipeline_helpers import TINY_DATA, tiny_spec
from safetensors import safe_open
from torchvision.transforms.functional import resized_crop as tv_resized_crop

import fd2_core.stages.patches as patches
import fd2_core.stages.pretrain as pretrain_stage
from fd2_core.atomic import load_tensors
from fd2_core.augment import sample_crop_flip
from fd2_core.cost import DatasetSize, patch_scoring_passes, stage_image_passes
from fd2_core.data.dataset import load_dataset
from fd2_core.pipeline import run
from fd2_core.progress import ProgressTracker
from fd2_core.runtime import generator
from fd2_core.shards import plan_shards, shard_done
from fd2_core.spec import PUBLISHED_PATCH_FILES
from fd2_core.spec_resolution import resolve_spec
from fd2_core.stages.committee import scorer_spec
from fd2_core.stages.context import RunContext
from fd2_core.stages.distill import distill
from fd2_core.stages.distill_files import ipc_path
from fd2_core.stages.patches import (
    build_patch_files,
    patch_factor,
    patch_init,
    patch_wrap_note,
    published_picks,
    published_pool,
    published_pool_size,
)
from fd2_core.stages.pretrain import load_scorer
from fd2_core.stages.teacher import new_teacher

PUBLISHED = {"method": "sre2l++", "patch_rule": "published"}
SCORER = Path("teachers") / "scorer-convnet" / "stages" / "teacher.safetensors"


@pytest.fixture(scope="module")
def data():
    return load_dataset(TINY_DATA, 32, seed=0)  # 4 classes × 16 train images, 32 px


def _ctx(path, data, events=None, **overrides):
    spec = resolve_spec(tiny_spec(**{**PUBLISHED, **overrides}))
    tracker = ProgressTracker({}, events.append if events is not None else None, None)
    return RunContext(spec, data, path, torch.device("cpu"), tracker)


def _scorer(ctx):
    torch.manual_seed(0)
    return new_teacher(ctx).eval()


def _reference_views(ctx, scorer, cls: int, pool: list[int], file: int) -> torch.Tensor:
    """One patch file of the published rule, one view at a time: [3,S,S]."""
    spec = ctx.spec
    size, views, factor = spec.image_size, spec.patch_candidates, patch_factor(spec)
    side, n = size // factor, len(pool)
    lo = (size - side) // 2
    g = generator(spec.seed, "patch-file", cls, file)
    boxes = sample_crop_flip(n * views, size, g, scale=(0.08, 1.0), ratio=(1.0, 1.0)).boxes.view(n, views, 4)
    kept = []  # (ce, view) per pool image: its lowest-CE view
    for i, index in enumerate(pool):
        image = ctx.normalize(ctx.data.train_images[index][None])
        best = None
        for v in range(views):
            x1, y1, x2, y2 = (int(c) for c in boxes[i, v])  # torchvision: the reference crop
            view = tv_resized_crop(image, y1, x1, y2 - y1, x2 - x1, [side, side], antialias=True)
            canvas = torch.zeros(1, 3, size, size)
            canvas[:, :, lo : lo + side, lo : lo + side] = view
            with torch.no_grad():
                ce = F.cross_entropy(scorer(canvas).logits.float(), torch.tensor([cls])).item()
            if best is None or ce < best[0]:
                best = (ce, view[0])
        kept.append(best)
    ranked = sorted(kept, key=lambda item: item[0])
    out = torch.zeros(3, size, size)
    for cell in range(factor * factor):
        row, col = divmod(cell, factor)
        out[:, row * side : (row + 1) * side, col * side : (col + 1) * side] = ranked[cell % n][1]
    return out


def _reference_init(ctx, scorer, classes: list[int]) -> list[torch.Tensor]:
    """The published rule as plain loops over classes, files and images: [k,3,S,S] per ipc index."""
    spec = ctx.spec
    labels = ctx.data.train_labels.tolist()
    n = min(min(labels.count(c) for c in range(ctx.num_classes)), spec.patch_pool)
    per_class = []
    for c in classes:
        pool = [i for i, y in enumerate(labels) if y == c][:n]  # the first n in the loader's order
        picks = torch.randint(5, (spec.ipc,), generator=generator(spec.seed, "patch-picks", c)).tolist()
        files = {f: _reference_views(ctx, scorer, c, pool, f) for f in sorted(set(picks))}
        per_class.append([files[f] for f in picks])
    return [torch.stack([views[j] for views in per_class]) for j in range(spec.ipc)]


@pytest.mark.parametrize(("factor", "pool"), [(1, 5), (2, 5), (2, 3)])
def test_published_init_matches_the_loop_reference(tmp_path, data, factor, pool):
    # pool 3 < factor² = 4: the reference also checks the wrap-around inside a file
    ctx = _ctx(tmp_path, data, ipc=4, patch_pool=pool, patch_candidates=3, patch_factor=factor)
    scorer = _scorer(ctx)
    classes = [0, 2, 3]
    expected = _reference_init(ctx, scorer, classes)
    for index in range(4):
        x = patch_init(ctx, scorer, torch.tensor(classes), index)
        assert x.shape == (3, 3, 32, 32)
        assert torch.allclose(x, expected[index], atol=1e-6), index


def test_the_pool_is_the_first_n_images_of_each_class_in_file_order(data):
    kept = torch.ones(len(data.train_labels), dtype=torch.bool)
    kept[(data.train_labels == 2).nonzero().squeeze(1)[:5]] = False  # class 2 keeps 11 images
    short = dataclasses.replace(data, train_images=data.train_images[kept], train_labels=data.train_labels[kept])
    for patch_pool, n in ((300, 11), (7, 7)):
        ctx = _ctx(Path("unused"), short, patch_pool=patch_pool)
        assert published_pool_size(ctx) == n
        pool = published_pool(ctx, torch.tensor([3, 0, 2]))
        labels = short.train_labels.tolist()
        for row, c in zip(pool.tolist(), (3, 0, 2), strict=True):
            assert row == [i for i, y in enumerate(labels) if y == c][:n]


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), value, dtype=np.uint8)).save(path)


def test_an_uploaded_folder_pools_its_files_in_name_order(tmp_path):
    root = tmp_path / "upload"
    names = {"a": ["2.png", "10.png", "sub/0.png", "1.png"], "b": ["c.png", "b.png", "a.png"]}
    for cls, files in names.items():
        for i, name in enumerate(files):  # written out of name order, a colour per file
            _png(root / "train" / cls / name, 40 * i + (0 if cls == "a" else 20))
        _png(root / "test" / cls / "t.png", 250)
    folder = load_dataset(root, 16)
    ctx = _ctx(tmp_path, folder, image_size=16)
    pool = published_pool(ctx, torch.arange(2))
    colours = folder.train_images[pool][..., 0, 0, 0].tolist()
    # code-point name order, a folder's own files before its sub-folders; n = 3, class b's count
    assert colours == [[120, 40, 0], [100, 60, 20]]


def test_the_views_depend_on_the_class_and_file_alone(tmp_path, data):
    ctx = _ctx(tmp_path, data, ipc=5, patch_factor=2, patch_candidates=3)
    scorer = _scorer(ctx)
    whole = [patch_init(ctx, scorer, torch.arange(4), j) for j in range(5)]
    for c in range(4):  # one class per block, as distill_batch_classes 1 cuts them
        for j in range(5):
            assert torch.equal(patch_init(ctx, scorer, torch.tensor([c]), j), whole[j][c : c + 1]), (c, j)
    # [20, 2] (class, file)
    every = torch.cartesian_prod(torch.arange(4), torch.arange(PUBLISHED_PATCH_FILES))
    all_files = build_patch_files(ctx, scorer, torch.arange(4), every)
    some = torch.tensor([1, 7, 18])  # files built alone equal the same files built among all
    alone = build_patch_files(ctx, scorer, torch.arange(4), every[some])
    assert torch.equal(all_files[0][some], alone[0]) and torch.equal(all_files[1][some], alone[1])


def test_class_blocks_distil_from_the_same_initialisation(tmp_path, data):
    inits = []
    for block in (0, 1):
        ctx = _ctx(tmp_path / f"block{block}", data, ipc=3, distill_iterations=1, distill_batch_classes=block)
        distill(ctx, _scorer(ctx))
        inits.append(torch.stack([load_tensors(ipc_path(ctx, j))["init"] for j in range(3)]))
    assert torch.equal(inits[0], inits[1])


def test_only_the_picked_files_are_built(tmp_path, data, monkeypatch):
    ctx = _ctx(tmp_path, data, ipc=3)
    built = []
    original = patches.published_views

    def spy(ctx, cls, file, count):
        built.append((cls, file))
        return original(ctx, cls, file, count)

    monkeypatch.setattr(patches, "published_views", spy)
    patch_init(ctx, _scorer(ctx), torch.arange(4), 0)
    picks = published_picks(ctx, torch.arange(4))
    assert sorted(built) == sorted({(c, f) for c in range(4) for f in picks[c].tolist()})


def test_picks_repeat_across_indices_as_often_as_uniform_draws_do(tmp_path, data):
    ctx = _ctx(tmp_path, data, ipc=5)
    picks = published_picks(ctx, torch.arange(4000))  # [4000, 5]
    repeats = torch.tensor([row.unique().numel() < 5 for row in picks]).float().mean().item()
    expected = 1 - 120 / 5**5  # 1 − 5!/5⁵ ≈ 0.9616: some two of five indices share a file
    assert abs(repeats - expected) < 0.015  # ~5 standard deviations at 4000 classes
    shares = torch.bincount(picks.flatten(), minlength=PUBLISHED_PATCH_FILES).float() / picks.numel()
    assert torch.allclose(shares, torch.full((5,), 0.2), atol=0.015)
    for ipc in (1, 3):  # smaller sets start from the same files
        smaller = published_picks(_ctx(tmp_path, data, ipc=ipc), torch.arange(4000))
        assert torch.equal(smaller, picks[:, :ipc])


def test_a_short_pool_says_its_views_are_reused(tmp_path, data):
    assert patch_wrap_note(_ctx(tmp_path, data, patch_factor=2)) is None
    note = patch_wrap_note(_ctx(tmp_path, data, patch_factor=2, patch_pool=3))
    assert "first 3 train images" in note and "factor² = 4" in note


# --- the scorer -----------------------------------------------------------------------------------


def _keys(path: Path) -> tuple[set[str], dict[str, str]]:
    with safe_open(str(path), framework="pt") as fh:
        return set(fh.keys()), dict(fh.metadata() or {})


def test_fd2_scores_with_a_plain_teacher_trained_once_and_reused(tmp_path, data, monkeypatch):
    raw = tiny_spec(ipc=2, patch_rule="published", evaluate=False)
    trained, events = [], []
    original = pretrain_stage.pretrain_teacher
    monkeypatch.setattr(pretrain_stage, "pretrain_teacher", lambda ctx: trained.append(ctx.spec.uses_cal)
                        or original(ctx))
    result = run(raw, data, tmp_path, on_event=events.append)
    assert trained == [True, False]  # the CAL teacher, then the plain scorer
    # the report names the scorer and its accuracy
    scorer_entry = result.report["teacher"]["patch_scorer"]
    assert scorer_entry["kind"].startswith("plain cross-entropy") and 0.0 <= scorer_entry["test_accuracy"] <= 1.0
    teacher_keys, _ = _keys(tmp_path / "stages" / "teacher.safetensors")
    scorer_keys, meta = _keys(tmp_path / SCORER)
    assert any(k.startswith("cal_head.") for k in teacher_keys)
    assert not any(k.startswith("cal_head.") for k in scorer_keys) and json.loads(meta["cal"]) is False
    pretraining = [e for e in events if e.stage == "pretrain"]
    assert pretraining[0].kind == "stage_start" and pretraining[-1].kind == "stage_end"
    assert [e.progress for e in pretraining] == sorted(e.progress for e in pretraining)

    ctx = _ctx(tmp_path, data, method="fd2", ipc=2)
    scorer = load_scorer(ctx)
    assert scorer.cal_head is None
    for j in range(2):  # the saved initialisation is the scorer's selection
        assert torch.equal(load_tensors(ipc_path(ctx, j))["init"], patch_init(ctx, scorer, torch.arange(4), j))

    for j in range(2):  # a resumed run reuses the scorer: nothing is pretrained again
        ipc_path(ctx, j).unlink()
    monkeypatch.setattr(pretrain_stage, "teacher_optimizer", lambda *a, **k: pytest.fail("pretrained again"))
    trained.clear()
    run(raw, data, tmp_path)
    assert trained == [True, False] and (tmp_path / SCORER).exists()


def test_a_plain_teacher_is_its_own_scorer(tmp_path, data, monkeypatch):
    trained = []
    original = pretrain_stage.pretrain_teacher
    monkeypatch.setattr(pretrain_stage, "pretrain_teacher", lambda ctx: trained.append(ctx.workdir) or original(ctx))
    result = run(tiny_spec(**PUBLISHED, evaluate=False), data, tmp_path)
    assert trained == [tmp_path] and not (tmp_path / "teachers").exists()
    assert "patch_scorer" not in result.report["teacher"]
    assert not resolve_spec(tiny_spec(**PUBLISHED)).trains_scorer
    # ranked: the CAL teacher scores
    assert not resolve_spec(tiny_spec(patch_rule="ranked")).trains_scorer


def test_the_scorer_is_the_first_members_backbone_without_cal():
    spec = resolve_spec({"patch_rule": "published", "committee": [{"backbone": "convnet", "model_width": 24},
                                                                  {"backbone": "convnet", "model_width": 40}]})
    plain = scorer_spec(spec)
    assert spec.trains_scorer and not plain.uses_cal and not plain.trains_scorer
    assert (plain.backbone, plain.model_width, plain.committee) == ("convnet", 24, None)
    assert plain.pretrain_epochs == spec.pretrain_epochs and plain.seed == spec.seed


def test_the_scorer_is_a_shard_the_blocks_wait_for(tmp_path):
    spec = resolve_spec({"patch_rule": "published", "distill_batch_classes": 2})
    by_id = {s.id: s for s in plan_shards(spec, num_classes=4)}
    assert list(by_id)[:3] == ["pretrain:m0", "pretrain:scorer", "distill:c00000"]
    assert by_id["distill:c00002"].depends_on == ("pretrain:m0", "pretrain:scorer")
    assert by_id["relabel:merge"].depends_on and "pretrain:scorer" not in by_id["evaluate:random"].depends_on
    assert shard_done(spec, tmp_path, "pretrain:scorer") is False
    plain = resolve_spec({"method": "sre2l++", "patch_rule": "published"})
    assert "pretrain:scorer" not in [s.id for s in plan_shards(plain, num_classes=4)]
    with pytest.raises(ValueError, match="not a shard of this job"):
        shard_done(plain, tmp_path, "pretrain:scorer")


# --- cost -----------------------------------------------------------------------------------------

CUB_LIKE = DatasetSize(num_classes=200, train_images=5994, test_images=5794)


def test_the_scorer_costs_one_more_plain_pretraining():
    ranked = resolve_spec({"preset": "paper-cub", "patch_rule": "ranked"})
    published = resolve_spec({"preset": "paper-cub", "patch_rule": "published"})
    plain_pretraining = published.pretrain_epochs * CUB_LIKE.train_images * 3.0
    assert stage_image_passes(published, CUB_LIKE)["pretrain"] == pytest.approx(
        stage_image_passes(ranked, CUB_LIKE)["pretrain"] + plain_pretraining)
    sre2l = {"preset": "paper-cub", "method": "sre2l++", "patch_rule": "ranked"}
    assert stage_image_passes(resolve_spec({**sre2l, "patch_rule": "published"}), CUB_LIKE)["pretrain"] == \
        stage_image_passes(resolve_spec(sre2l), CUB_LIKE)["pretrain"]


def test_published_scoring_counts_the_picked_files_of_the_first_n_images():
    spec = resolve_spec({"patch_rule": "published", "ipc": 3, "patch_pool": 300, "patch_candidates": 5})
    # at most 3 files per class
    assert patch_scoring_passes(spec, CUB_LIKE) == 200 * 3 * (5994 // 200) * 5
    many = spec.model_copy(update={"ipc": 10})
    # never more than the five files
    assert patch_scoring_passes(many, CUB_LIKE) == 200 * 5 * 29 * 5


def test_a_bare_cal_teacher_still_selects_patches_with_the_scorer(tmp_path, data):
    """A caller that hands `distill` the CAL teacher alone (a library user,
    a benchmark) gets the scorer's patches, or a clear error while the
    scorer is not pretrained: never the CAL teacher's ranking in silence."""
    ctx = _ctx(tmp_path / "fresh", data, method="fd2", ipc=1)
    assert ctx.spec.trains_scorer
    torch.manual_seed(0)
    cal_teacher = new_teacher(ctx)
    with pytest.raises(FileNotFoundError, match="scorer is not pretrained"):
        distill(ctx, cal_teacher)
    run(tiny_spec(ipc=1, patch_rule="published", evaluate=False), data, tmp_path / "done")
    done = _ctx(tmp_path / "done", data, method="fd2", ipc=1)
    ipc_path(done, 0).unlink()
    images = distill(done, cal_teacher)
    scorer = load_scorer(done)
    assert torch.equal(load_tensors(ipc_path(done, 0))["init"], patch_init(done, scorer, torch.arange(4), 0))
    assert images.shape == (1, 4, 3, 32, 32)
