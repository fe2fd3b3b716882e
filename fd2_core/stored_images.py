"""How a finished ipc index of distilled images is stored before any later stage reads it (`synthetic_format`).

The published code truncates every optimised image to uint8 and saves it as a JPEG of quality 75; SC's reference
maps of the later indices, the relabel and the students all read those JPEGs back. To reproduce that, the
storage step runs once, when an index is finished, and its decoded pixels replace the optimised float images, so
every later reader (and the artifact's lossless PNGs) sees exactly the pixels the published pipeline would.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

JPEG_QUALITY = 75  # the published save: Pillow's JPEG at quality 75 (its default 4:2:0 chroma subsampling)


def truncate_to_u8(pixels: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] pixels in [0, 1] → uint8 by truncation, as the published `(x * 255).astype(np.uint8)`."""
    return (pixels.float() * 255.0).clamp(0.0, 255.0).to(torch.uint8)


def jpeg_roundtrip(images_u8: torch.Tensor, quality: int = JPEG_QUALITY) -> torch.Tensor:
    """[N,3,H,W] uint8 → the same images encoded as JPEG by Pillow at `quality` and decoded again, uint8 [N,3,H,W].

    Pillow encodes one image per call, so this loops over images; it runs once per finished ipc index, never in
    an optimisation step. Pillow rather than torchvision.io: the published files were written by Pillow, and two
    JPEG encoders need not agree bit for bit.
    """
    out = torch.empty_like(images_u8, device="cpu")
    for i, image in enumerate(images_u8.cpu()):
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            out[i] = torch.from_numpy(np.array(decoded.convert("RGB"))).permute(2, 0, 1)
    return out.to(images_u8.device)


def stored_pixels(pixels: torch.Tensor, synthetic_format: str) -> torch.Tensor:
    """[N,3,H,W] pixels in [0, 1] → what storage keeps of them, as uint8: `jpeg` = truncation then JPEG 75 and
    back (published); `png` = rounded to the nearest 8-bit level, lossless. Raises ValueError for another format."""
    if synthetic_format == "jpeg":
        return jpeg_roundtrip(truncate_to_u8(pixels))
    if synthetic_format == "png":
        return (pixels.float() * 255.0).round().clamp(0.0, 255.0).to(torch.uint8)
    raise ValueError(f"unknown synthetic_format {synthetic_format!r} (png or jpeg)")
