"""fd2_core.storage_report: the download's bytes (images + soft labels) against the real data, on
hand-made artifacts whose every size is known."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fd2_core.storage_report import (
    DECODED_PIXELS,
    ENCODED_FILES,
    ONLINE,
    RATIO_FORMULA,
    STORED,
    real_data,
    safetensors_metadata,
    storage_line,
    storage_report,
)

ROOT = Path(__file__).resolve().parents[2]
MEMBERS = {  # name → bytes; the images are the two members under images/
    "labels.csv": b"file,class_index,class_name\nimages/a/a_0.png,0,a\nimages/b/b_0.png,1,b\n",
    "manifest.json": b'{"format": "fd2.distilled.v1"}\n',
    "images/a/a_0.png": b"\x89PNG" + b"a" * 996,  # 1000 bytes
    "images/b/b_0.png": b"\x89PNG" + b"b" * 296,  # 300 bytes
}


def _tar_gz(path: Path) -> Path:
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w") as tar:
            for name, data in MEMBERS.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _artifacts(tmp_path: Path, label_encoding: dict | None) -> dict[str, Path]:
    out = {"distilled.tar.gz": _tar_gz(tmp_path / "distilled.tar.gz"),
           "soft_labels.safetensors": tmp_path / "soft_labels.safetensors",
           "teacher.safetensors": tmp_path / "teacher.safetensors"}
    meta = {"format": "fd2.soft_labels.v4"}
    if label_encoding is not None:
        meta["label_encoding"] = json.dumps(label_encoding)
    save_file({"logits": torch.zeros(2, 2, 3, dtype=torch.float16)}, str(out["soft_labels.safetensors"]), meta)
    save_file({"w": torch.zeros(500)}, str(out["teacher.safetensors"]), {"classes": '["a", "b"]'})
    return out


def test_stored_soft_labels_count_their_own_file(tmp_path):
    paths = _artifacts(tmp_path, {"online": False, "dtype": "float16"})
    labels_size = os.path.getsize(paths["soft_labels.safetensors"])
    teacher_size = os.path.getsize(paths["teacher.safetensors"])
    assert teacher_size > 2000 > labels_size  # so that the two cases below cannot agree by chance

    storage = storage_report(paths, 5000, ENCODED_FILES)

    assert storage == {
        # the PNG members only: no tar headers, labels.csv or manifest.json
        "distilled_images_bytes": 1300,
        "distilled_archive_bytes": os.path.getsize(paths["distilled.tar.gz"]),
        "soft_labels_bytes": labels_size,
        "soft_labels_kind": STORED,
        "soft_labels_file_bytes": labels_size,
        "teacher_bytes": teacher_size,
        "real_data_bytes": 5000,
        "real_data_kind": ENCODED_FILES,
        "compressed_bytes": 1300 + labels_size,
        "compression_ratio": 5000 / (1300 + labels_size),
        "compression_ratio_formula": RATIO_FORMULA,
    }
    assert json.loads(json.dumps(storage)) == storage


def test_online_soft_labels_cost_the_teacher_file(tmp_path):
    paths = _artifacts(tmp_path, {"online": True})
    teacher_size = os.path.getsize(paths["teacher.safetensors"])

    storage = storage_report(paths, 12_000, DECODED_PIXELS)

    assert storage["soft_labels_kind"] == ONLINE
    assert storage["soft_labels_bytes"] == teacher_size
    assert storage["soft_labels_file_bytes"] == os.path.getsize(paths["soft_labels.safetensors"])
    assert storage["compressed_bytes"] == 1300 + teacher_size
    assert storage["compression_ratio"] == 12_000 / (1300 + teacher_size)


@pytest.mark.parametrize("encoding", [None, {"online": "yes"}, {"online": 1}, ["online"]])
def test_labels_are_stored_unless_label_encoding_says_online_true(tmp_path, encoding):
    paths = _artifacts(tmp_path, encoding)
    storage = storage_report(paths, 1, ENCODED_FILES)
    assert storage["soft_labels_kind"] == STORED
    assert storage["soft_labels_bytes"] == os.path.getsize(paths["soft_labels.safetensors"])


def test_the_header_reader_agrees_with_safetensors(tmp_path):
    paths = _artifacts(tmp_path, {"online": True, "k": 4})
    for name in ("soft_labels.safetensors", "teacher.safetensors"):
        with safe_open(str(paths[name]), "pt") as fh:
            assert safetensors_metadata(paths[name]) == fh.metadata()


def test_real_data_is_the_files_read_or_the_decoded_pixels():
    assert real_data(123_456, 40, 32) == (123_456, ENCODED_FILES)
    assert real_data(None, 40, 32) == (32 * 32 * 3 * 40, DECODED_PIXELS)


def test_the_summary_line():
    storage = {"distilled_images_bytes": 41_200, "soft_labels_bytes": 267_100, "soft_labels_kind": STORED,
               "compressed_bytes": 308_300, "real_data_bytes": 3_100_000, "real_data_kind": ENCODED_FILES,
               "compression_ratio": 3_100_000 / 308_300, "teacher_bytes": 1_200_000}
    assert storage_line(storage) == (
        "storage: images 41.2 KB + soft labels 267.1 KB = 308.3 KB; real data 3.1 MB (encoded files); "
        "ratio ×10.1 (real / (images + labels)); teacher 1.2 MB")
    online = storage_line({**storage, "soft_labels_kind": ONLINE, "compression_ratio": None})
    assert "soft labels (online: teacher file) 267.1 KB" in online and "ratio n/a" in online


def test_the_module_loads_without_torch():
    code = "import sys, fd2_core.storage_report; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
