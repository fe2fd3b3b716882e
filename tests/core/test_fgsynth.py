"""FGSynth: determinism, shapes, the small class part, the writers, and the fine-grained property itself."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from fd2_core.data.archive import safe_extract
from fd2_core.data.fgsynth import (
    MAX_CLASSES,
    PATTERNS,
    Nuisance,
    class_recipes,
    generate,
    render,
    write_fgsynth,
    write_imagefolder,
)
from fd2_core.data.layout import scan_source


def test_same_seed_same_data_other_seed_other_data():
    a = generate(num_classes=4, train_per_class=6, test_per_class=3, seed=1)
    b = generate(num_classes=4, train_per_class=6, test_per_class=3, seed=1)
    c = generate(num_classes=4, train_per_class=6, test_per_class=3, seed=2)
    assert np.array_equal(a.train_images, b.train_images) and np.array_equal(a.test_images, b.test_images)
    assert not np.array_equal(a.train_images, c.train_images)
    assert not np.array_equal(a.train_images[:3], a.test_images[:3])


@pytest.mark.parametrize("variant", ["birds", "cars"])
@pytest.mark.parametrize("size", [16, 32, 48])
def test_shapes_labels_and_names(variant, size):
    data = generate(num_classes=7, image_size=size, train_per_class=5, test_per_class=2, variant=variant)
    assert data.train_images.shape == (35, size, size, 3) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (14, size, size, 3)
    assert data.train_labels.dtype == np.int64
    assert np.bincount(data.train_labels).tolist() == [5] * 7 and np.bincount(data.test_labels).tolist() == [2] * 7
    assert data.classes == sorted(data.classes) and len(set(data.classes)) == 7
    assert data.train_images.std() > 10


def test_variants_draw_different_objects():
    birds = generate(num_classes=2, train_per_class=4, test_per_class=0, variant="birds")
    cars = generate(num_classes=2, train_per_class=4, test_per_class=0, variant="cars")
    assert not np.array_equal(birds.train_images, cars.train_images)
    assert birds.recipes[0].placement != cars.recipes[0].placement


def test_classes_form_confusable_groups():
    recipes = class_recipes(MAX_CLASSES, "birds")
    assert len({(r.shape, r.pattern, r.placement) for r in recipes}) == MAX_CLASSES
    group = len(PATTERNS)
    for start in range(0, 20, group):
        members = recipes[start:start + group]
        assert len({(r.shape, r.placement) for r in members}) == 1
        assert len({r.pattern for r in members}) == group
    with pytest.raises(ValueError):
        class_recipes(MAX_CLASSES + 1)
    with pytest.raises(ValueError):
        generate(num_classes=3, variant="fish")


@pytest.mark.parametrize("variant", ["birds", "cars"])
def test_class_part_covers_at_most_ten_percent_of_the_object(variant):
    data = generate(num_classes=40, image_size=48, train_per_class=6, test_per_class=0, variant=variant,
                    with_masks=True)
    part = data.train.part_masks.sum(axis=(1, 2))
    whole = data.train.object_masks.sum(axis=(1, 2))
    share = part / whole
    assert share.max() <= 0.10
    assert share.min() > 0.03  # the part is always drawn and visible
    assert (data.train.part_masks <= data.train.object_masks + 1e-6).all()
    with pytest.raises(ValueError):
        Nuisance(part_area=0.2)


def test_classes_differ_only_inside_the_part():
    """Same nuisance draws, other labels: every changed pixel lies under one of the two class parts."""
    first = render(np.array([0, 1, 7, 12]), num_classes=20, seed=3, with_masks=True)
    second = render(np.array([5, 1, 2, 19]), num_classes=20, seed=3, with_masks=True)
    assert np.array_equal(first.images[1], second.images[1])
    changed = (first.images != second.images).any(axis=-1)
    parts = (first.part_masks > 0) | (second.part_masks > 0)
    assert changed[[0, 2, 3]].any(axis=(1, 2)).all()
    assert not (changed & ~parts).any()


def test_written_tree_and_zip_read_back(tmp_path):
    data = generate(num_classes=3, train_per_class=4, test_per_class=2)
    layout = scan_source(write_imagefolder(data, tmp_path / "tree"))
    assert layout.classes == data.classes
    assert layout.per_class == {name: {"train": 4, "test": 2} for name in data.classes}
    archive = write_fgsynth(tmp_path / "fg.zip", "zip", num_classes=3, train_per_class=4, test_per_class=2)
    root = safe_extract(archive, tmp_path / "unzipped")
    assert scan_source(root).per_class == layout.per_class
    with pytest.raises(FileExistsError):
        write_imagefolder(data, tmp_path / "tree")
    with pytest.raises(ValueError):
        write_fgsynth(tmp_path / "x", "tar")


def _histogram_features(images: np.ndarray, bins: int = 16) -> torch.Tensor:
    """Per-channel colour histograms (normalised): what a model sees if it ignores where colours are."""
    idx = images.reshape(len(images), -1, 3).astype(np.int64) * bins // 256
    feats = np.stack([np.apply_along_axis(np.bincount, 1, idx[..., c], minlength=bins) for c in range(3)], 1)
    return torch.from_numpy(feats.reshape(len(images), -1) / idx.shape[1]).float()


def _train_linear(
    x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300
) -> Callable[[torch.Tensor], torch.Tensor]:
    model = nn.Linear(x.shape[1], classes)
    mean, std = x.mean(0), x.std(0) + 1e-6
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model((x - mean) / std), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lambda z: model((z - mean) / std)


def _small_convnet(classes: int, width: int = 32) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.AvgPool2d(2)]

    return nn.Sequential(*block(3, width), *block(width, width), *block(width, width), nn.Flatten(),
                         nn.Linear(width * 16, classes))


def _accuracies(classes: int) -> tuple[float, float, float]:
    """(linear on histograms, nearest centroid on histograms, small CNN) test accuracies on FGSynth."""
    torch.manual_seed(0)
    data = generate(num_classes=classes, image_size=32, train_per_class=150, test_per_class=60, seed=11)
    y_train, y_test = torch.from_numpy(data.train_labels), torch.from_numpy(data.test_labels)

    hist_train, hist_test = _histogram_features(data.train_images), _histogram_features(data.test_images)
    predict = _train_linear(hist_train, y_train, classes)
    centroids = torch.stack([hist_train[y_train == k].mean(0) for k in range(classes)])
    with torch.no_grad():
        linear_acc = (predict(hist_test).argmax(1) == y_test).float().mean().item()
        centroid_acc = (torch.cdist(hist_test, centroids).argmin(1) == y_test).float().mean().item()

    def prep(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.25)

    x_train, x_test = prep(data.train_images), prep(data.test_images)
    net = _small_convnet(classes)
    epochs, batch = 12, 32
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * -(-len(x_train) // batch))
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x_train)).split(batch):
            loss = nn.functional.cross_entropy(net(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        cnn_acc = (net(x_test).argmax(1) == y_test).float().mean().item()

    return linear_acc, centroid_acc, cnn_acc


def test_a_cnn_learns_the_part_while_colour_histograms_stay_at_chance():
    """The class is in the small part's shape and pattern, never in global colour statistics. Four classes
    (one confusable group: same part shape, four patterns) keep this under half a minute on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        classes = 4
        linear_acc, centroid_acc, cnn_acc = _accuracies(classes)
    finally:
        torch.set_num_threads(threads)
    chance = 1 / classes
    assert linear_acc < chance + 0.12 and centroid_acc < chance + 0.12
    assert cnn_acc > chance + 0.3
    assert cnn_acc > max(linear_acc, centroid_acc) + 0.25
