"""`synthetic_format`: the published storage of distilled images (uint8 truncation, then JPEG 75) is
what every later stage reads and what the artifact's lossless PNGs hold (docs/DATA_PATH.md)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_helpers import TINY_DATA, tiny_spec

from fd2_core.atomic import load_tensors
from fd2_core.data.dataset import load_dataset
from fd2_core.distilled import read_distilled
from fd2_core.pipeline import run
from fd2_core.spec_resolution import resolve_spec
from fd2_core.stages.distill_files import ipc_file
from fd2_core.stages.package import image_storage
from fd2_core.stored_images import jpeg_roundtrip, stored_pixels, truncate_to_u8


def test_truncation_is_numpys_astype_of_the_scaled_pixels() -> None:
    pixels = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    pixels[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.99999])
    expected = (pixels.numpy() * 255).astype(np.uint8)
    assert np.array_equal(truncate_to_u8(pixels).numpy(), expected)
    rounded = stored_pixels(pixels, "png")
    assert int(rounded[0, 0, 0, 2]) == 255 and int(truncate_to_u8(pixels)[0, 0, 0, 2]) == 254


def test_the_jpeg_roundtrip_is_pillows_quality_75_file_read_back() -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 3, 24, 24), dtype=torch.uint8, generator=g)
    out = jpeg_roundtrip(images)
    for image, decoded in zip(images, out, strict=True):
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=75)
        reference = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        assert np.array_equal(decoded.permute(1, 2, 0).numpy(), reference)
    assert not torch.equal(out, images)  # lossy: random pixels never survive JPEG 75
    with pytest.raises(ValueError, match="synthetic_format"):
        stored_pixels(images.float() / 255, "webp")


@pytest.fixture(scope="module")
def tiny_data():
    return load_dataset(TINY_DATA, 32, seed=0)


def _pixels(result) -> torch.Tensor:
    return read_distilled(result.artifacts["distilled.tar.gz"]).images


def test_a_jpeg_run_stores_reads_and_exports_the_decoded_jpeg_pixels(tmp_path, tiny_data) -> None:
    spec = resolve_spec(tiny_spec(ipc=2, synthetic_format="jpeg"))
    result = run(spec, tiny_data, tmp_path / "jpeg")


    mean = torch.tensor(tiny_data.mean).view(1, 3, 1, 1)
    std = torch.tensor(tiny_data.std).view(1, 3, 1, 1)
    exported = _pixels(result)
    for j in range(2):
        tensors = load_tensors(ipc_file(tmp_path / "jpeg" / "stages", j))
        raw_pixels = (tensors["raw"] * std + mean).clamp(0, 1)
        expected = jpeg_roundtrip(truncate_to_u8(raw_pixels))
        stored = (tensors["images"] * std + mean) * 255
        # the index itself holds the decoded JPEG
        assert torch.allclose(stored, expected.float(), atol=1e-3)
        rows = exported[j * 4 : (j + 1) * 4]
        assert torch.equal(rows, expected)  # the artifact's PNGs: the same pixels, losslessly
    manifest = read_distilled(result.artifacts["distilled.tar.gz"]).manifest
    assert manifest["synthetic_format"]["format"] == "jpeg"
    assert result.report["synthetic_format"]["format"] == "jpeg"
    assert "JPEG quality 75" in result.report["synthetic_format"]["stored_as"]
    # drift is measured before storage: the JPEG loss alone would read as tens of dB of movement
    assert result.report["distill"]["init_psnr_db"] > 40

    png = run(resolve_spec(tiny_spec(ipc=2, synthetic_format="png")), tiny_data, tmp_path / "png")
    assert "raw" not in load_tensors(ipc_file(tmp_path / "png" / "stages", 0))
    assert png.report["synthetic_format"] == {"format": "png", "stored_as": "rounded to uint8, lossless"}
    assert not torch.equal(_pixels(png), exported)
    assert image_storage("jpeg", "random")["format"] == "png"  # real images are never re-encoded
