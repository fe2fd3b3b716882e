"""Layout discovery: ImageFolder trees, flat class folders, manifests, splits and per-file errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fd2_core.data.errors import DataError
from fd2_core.data.layout import DatasetLayout, scan_manifest_items, scan_source, validate_images
from fd2_core.data.limits import DataLimits


def _tree(root: Path, make_image, spec: dict[str, int], ext: str = ".png") -> None:
    """`spec` maps "<folder>/<class>" (or "<class>") to a number of images."""
    for folder, count in spec.items():
        for i in range(count):
            make_image(root / folder / f"img{i:03d}{ext}")


def _reasons(layout: DatasetLayout) -> dict[str, str]:
    return {e.path: e.reason for e in layout.errors}


def test_train_test_imagefolder(tmp_path, make_image):
    _tree(tmp_path, make_image, {"train/cat": 4, "train/ant": 3, "test/cat": 2, "test/ant": 1})
    layout = scan_source(tmp_path)
    assert layout.kind == "imagefolder"
    assert layout.classes == ["ant", "cat"]
    assert layout.per_class == {"ant": {"train": 3, "test": 1}, "cat": {"train": 4, "test": 2}}
    assert layout.splits == {"train": 7, "test": 3}
    assert layout.errors == []
    for item in layout.items:
        assert item.path.parent.name == layout.classes[item.label]
        assert item.path.parent.parent.name == item.split


def test_val_folder_is_the_test_split(tmp_path, make_image):
    _tree(tmp_path, make_image, {"train/a": 3, "train/b": 3, "val/a": 2, "val/b": 1})
    layout = scan_source(tmp_path)
    assert layout.splits == {"train": 6, "test": 3}


def test_test_wins_over_val_and_val_is_reported(tmp_path, make_image):
    _tree(tmp_path, make_image, {"train/a": 3, "train/b": 3, "test/a": 1, "test/b": 1, "val/a": 5})
    layout = scan_source(tmp_path)
    assert layout.splits == {"train": 6, "test": 2}
    assert "val/" in _reasons(layout)


def test_one_wrapping_folder_is_looked_through(tmp_path, make_image):
    _tree(tmp_path / "my_dataset", make_image, {"train/a": 2, "train/b": 2, "test/a": 1, "test/b": 1})
    (tmp_path / "__MACOSX").mkdir()
    (tmp_path / ".DS_Store").write_bytes(b"x")
    layout = scan_source(tmp_path)
    assert layout.root == tmp_path / "my_dataset"
    assert layout.splits == {"train": 4, "test": 2}
    assert layout.errors == []


def test_flat_layout_carves_a_seeded_split(tmp_path, make_image):
    _tree(tmp_path, make_image, {"a": 10, "b": 5, "c": 2})
    layout = scan_source(tmp_path, test_fraction=0.2, seed=3)
    assert layout.kind == "flat"
    assert layout.per_class == {"a": {"train": 8, "test": 2}, "b": {"train": 4, "test": 1},
                                "c": {"train": 1, "test": 1}}
    again = scan_source(tmp_path, test_fraction=0.2, seed=3)
    assert [(i.path, i.split) for i in again.items] == [(i.path, i.split) for i in layout.items]
    test_sets = {
        seed: frozenset(i.path for i in scan_source(tmp_path, seed=seed).items if i.split == "test")
        for seed in range(6)
    }
    assert len(set(test_sets.values())) > 1


def test_single_image_class_stays_in_train(tmp_path, make_image):
    _tree(tmp_path, make_image, {"a": 1, "b": 3})
    layout = scan_source(tmp_path, test_fraction=0.5)
    assert layout.per_class["a"] == {"train": 1, "test": 0}
    assert layout.per_class["b"]["train"] >= 1 and layout.per_class["b"]["test"] >= 1


def test_split_of_a_class_ignores_other_classes(tmp_path, make_image):
    _tree(tmp_path, make_image, {"a": 9, "b": 9})
    before = {i.path for i in scan_source(tmp_path, seed=1).items if i.split == "test" and i.path.parent.name == "a"}
    _tree(tmp_path, make_image, {"c": 4})
    after = {i.path for i in scan_source(tmp_path, seed=1).items if i.split == "test" and i.path.parent.name == "a"}
    assert before == after


def test_train_only_tree_carves_test(tmp_path, make_image):
    _tree(tmp_path, make_image, {"train/a": 5, "train/b": 5})
    layout = scan_source(tmp_path, test_fraction=0.4)
    assert layout.splits == {"train": 6, "test": 4}


def test_clutter_is_silent_and_other_files_are_reported(tmp_path, make_image):
    _tree(tmp_path, make_image, {"a": 2, "b": 2})
    (tmp_path / "a" / "notes.txt").write_text("hello")
    (tmp_path / "a" / "._img000.png").write_bytes(b"resource fork")
    (tmp_path / "__MACOSX" / "a").mkdir(parents=True)
    (tmp_path / "__MACOSX" / "a" / "img.png").write_bytes(b"x")
    make_image(tmp_path / "loose.png")
    make_image(tmp_path / "a" / "UPPER.JPG")
    layout = scan_source(tmp_path)
    reasons = _reasons(layout)
    assert set(reasons) == {"a/notes.txt", "loose.png"}
    assert "not an image" in reasons["a/notes.txt"]
    assert layout.per_class["a"]["train"] + layout.per_class["a"]["test"] == 3


def test_nested_class_subfolders_are_included(tmp_path, make_image):
    _tree(tmp_path, make_image, {"a/sub": 2, "a": 1, "b": 3})
    layout = scan_source(tmp_path)
    assert sum(layout.per_class["a"].values()) == 3


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links on this platform")
def test_symlinks_are_not_followed(tmp_path, make_image):
    outside = tmp_path / "outside"
    _tree(outside, make_image, {"x": 3})
    data = tmp_path / "data"
    _tree(data, make_image, {"a": 2, "b": 2})
    os.symlink(outside / "x", data / "linked_class")
    os.symlink(outside / "x" / "img000.png", data / "a" / "linked.png")
    layout = scan_source(data)
    assert layout.classes == ["a", "b"]
    assert all(outside not in item.path.parents for item in layout.items)
    reasons = _reasons(layout)
    assert "link" in reasons["linked_class"] and "link" in reasons["a/linked.png"]


def test_no_images_and_one_class_and_missing(tmp_path, make_image):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "readme.txt").write_text("no images")
    with pytest.raises(DataError) as info:
        scan_source(tmp_path / "empty")
    assert info.value.code == "no_images"
    _tree(tmp_path / "one", make_image, {"only": 3})
    with pytest.raises(DataError) as info:
        scan_source(tmp_path / "one")
    assert info.value.code == "one_class"
    with pytest.raises(DataError) as info:
        scan_source(tmp_path / "missing")
    assert info.value.code == "not_found"


def test_file_and_class_limits(tmp_path, make_image):
    _tree(tmp_path, make_image, {"a": 3, "b": 3, "c": 1})
    with pytest.raises(DataError) as info:
        scan_source(tmp_path, limits=DataLimits(max_files=5))
    assert info.value.code == "too_many_files"
    with pytest.raises(DataError) as info:
        scan_source(tmp_path, limits=DataLimits(max_classes=2))
    assert info.value.code == "too_many_classes"


def test_test_class_without_training_images_is_reported(tmp_path, make_image):
    _tree(tmp_path, make_image, {"train/a": 2, "train/b": 2, "test/a": 1, "test/zebra": 2})
    layout = scan_source(tmp_path)
    assert layout.classes == ["a", "b"]
    assert sum("no training images" in e.reason for e in layout.errors) == 2


def test_manifest_json_list_and_items(tmp_path, make_image):
    _tree(tmp_path, make_image, {"imgs": 4})
    rows = [{"path": f"imgs/img{i:03d}.png", "label": "odd" if i % 2 else "even"} for i in range(4)]
    (tmp_path / "manifest.json").write_text(json.dumps(rows))
    layout = scan_source(tmp_path)
    assert layout.kind == "manifest"
    assert layout.classes == ["even", "odd"]
    assert layout.per_class == {"even": {"train": 1, "test": 1}, "odd": {"train": 1, "test": 1}}
    (tmp_path / "manifest.json").write_text(json.dumps({"items": [dict(r, split="train") for r in rows]}))
    assert scan_source(tmp_path / "manifest.json").splits == {"train": 4, "test": 0}


def test_manifest_beside_its_images_inside_a_wrapping_folder(tmp_path, make_image):
    for i in range(4):
        make_image(tmp_path / "upload" / f"{i}.png")
    rows = "path,label,split\n" + "".join(f"{i}.png,{'ab'[i % 2]},train\n" for i in range(4))
    (tmp_path / "upload" / "manifest.csv").write_text(rows)
    layout = scan_source(tmp_path)
    assert layout.kind == "manifest" and layout.per_class == {"a": {"train": 2, "test": 0},
                                                               "b": {"train": 2, "test": 0}}


def test_manifest_csv_with_splits_and_bad_rows(tmp_path, make_image):
    _tree(tmp_path / "data", make_image, {"x": 4})
    (tmp_path / "secret.png").write_bytes(b"outside the root")
    lines = ["path,label,split", "x/img000.png,b,train", "x/img001.png,a,val", "x/img002.png,a,", "x/img003.png,b,test",
             "../secret.png,a,train", "/etc/passwd.png,a,train", "x/missing.png,a,train", "x/img000.png,a,holdout",
             "x/img000.png,b,train"]
    (tmp_path / "data" / "manifest.csv").write_text("\n".join(lines) + "\n")
    layout = scan_source(tmp_path / "data")
    assert layout.per_class == {"a": {"train": 1, "test": 1}, "b": {"train": 1, "test": 1}}
    reasons = _reasons(layout)
    assert "escapes" in reasons["../secret.png"]
    assert "absolute" in reasons["/etc/passwd.png"]
    assert "not found" in reasons["x/missing.png"]
    assert any("unknown split" in e.reason for e in layout.errors)
    assert any("twice" in e.reason for e in layout.errors)
    assert all(tmp_path / "secret.png" != item.path for item in layout.items)


def test_manifest_integer_labels_keep_their_index(tmp_path, make_image):
    _tree(tmp_path, make_image, {"i": 12})
    rows = [{"path": f"i/img{k:03d}.png", "label": k % 12, "split": "train"} for k in range(12)]
    layout = scan_manifest_items(tmp_path, rows)
    assert layout.classes == [str(k) for k in range(12)]
    assert all(int(layout.classes[item.label]) == item.label for item in layout.items)


def test_bad_manifests(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError) as info:
        scan_source(tmp_path)
    assert info.value.code == "bad_manifest"
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "manifest.csv").write_text("file,class\na.png,x\n")
    with pytest.raises(DataError) as info:
        scan_source(tmp_path)
    assert info.value.code == "bad_manifest"
    with pytest.raises(DataError) as info:
        scan_manifest_items(tmp_path, [{"path": "a.png", "label": "x"}] * 3, limits=DataLimits(max_manifest_rows=2))
    assert info.value.code == "too_many_files"


def test_validate_images_moves_broken_files_to_errors(tmp_path, make_image):
    _tree(tmp_path, make_image, {"a": 3, "b": 3, "c": 2})
    good = (tmp_path / "a" / "img000.png").read_bytes()
    (tmp_path / "a" / "img001.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "b" / "img002.png").write_bytes(b"GIF89a not really")
    for name in ("img000.png", "img001.png"):
        (tmp_path / "c" / name).write_bytes(b"")
    layout = validate_images(scan_source(tmp_path, test_fraction=0.0))
    assert layout.classes == ["a", "b"]
    assert layout.per_class == {"a": {"train": 2, "test": 0}, "b": {"train": 2, "test": 0}}
    reasons = _reasons(layout)
    assert {"a/img001.png", "b/img002.png", "c/img000.png", "c/img001.png"} <= set(reasons)
    assert all(layout.classes[i.label] == i.path.parent.name for i in layout.items)
    summary = layout.summary()
    assert summary["num_classes"] == 2 and summary["splits"] == {"train": 4, "test": 0}
    assert json.loads(json.dumps(summary)) == summary


def test_validate_images_raises_when_one_class_remains(tmp_path, make_image):
    _tree(tmp_path, make_image, {"a": 2, "b": 1})
    (tmp_path / "b" / "img000.png").write_bytes(b"broken")
    with pytest.raises(DataError) as info:
        validate_images(scan_source(tmp_path))
    assert info.value.code == "one_class"


def test_layout_and_archive_imports_stay_torch_free():
    code = "import sys, fd2_core.data, fd2_core.data.layout, fd2_core.data.archive; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"
