"""Turn one image file of any common mode into a square uint8 RGB array (torch-free, Pillow + numpy).

Every step that can go wrong on user data is guarded: the pixel count is read from the header before decoding
(decompression bombs), only the four accepted formats are parsed (Pillow would otherwise try dozens of
decoders on a renamed file), and any failure becomes an `ImageDecodeError` with a short reason.

The extension only decides which files are worth opening (`IMAGE_EXTENSIONS`); the content decides the
format, so a `.jfif` is read as the JPEG it is and a `.jpg` holding PNG bytes as a PNG.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fd2_core.data.errors import ImageDecodeError

# Names worth opening, case-insensitive: the usual extensions of the accepted formats and of formats that are
# refused by content (GIF, TIFF), so such a file is reported as the image it is rather than as a stray file.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".jif", ".pjpeg", ".pjp", ".png", ".apng", ".webp", ".bmp", ".dib",
    ".gif", ".tif", ".tiff",
})
# What the content may be, whatever the extension says. Multi-picture JPEGs open through the JPEG plugin and
# then report the format "MPO".
PIL_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def is_image_name(name: str | Path) -> bool:
    """True for a name worth opening as an image (`IMAGE_EXTENSIONS`, case-insensitive); the content then
    decides the format."""
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def open_checked(path: str | Path, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and refuse unknown formats and too many pixels before any decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path, formats=PIL_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"too many pixels ({exc})") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not a JPEG, PNG, WebP or BMP image") from None
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"unreadable image header: {exc}") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        img.close()
        raise ImageDecodeError("image has no pixels")
    if width * height > max_pixels:
        img.close()
        raise ImageDecodeError(f"too many pixels: {width}x{height} is over the limit of {max_pixels}")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: alpha composited on white, 16-bit and float grey rescaled (not clipped)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return Image.fromarray(_grey_to_uint8(np.asarray(img), mode)).convert("RGB")
    if "A" in img.getbands() or "a" in img.getbands():
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _grey_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    values = arr.astype(np.float64)
    if mode == "F":
        top = 1.0 if values.size and values.max() <= 1.0 else 255.0
    elif mode == "I" and values.size and values.max() <= 255:
        top = 255.0
    else:
        top = 65535.0
    return np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)


def square_resize(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`, centre crop: one antialiased bicubic resize of the centred square box."""
    width, height = img.size
    side = min(width, height)
    left = (width - side) / 2
    top = (height - side) / 2
    return img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))


def pixel_digest(rgb: np.ndarray) -> str:
    """Fingerprint of decoded pixels: blake2b-128 (32 hex characters) of the shape and the uint8 bytes.

    `rgb` is `[H, W, 3]` uint8 at the file's own resolution; files whose bytes differ (metadata, compression,
    PNG versus lossless WebP) but whose pixels are the same get the same digest.
    """
    arr = np.ascontiguousarray(rgb, dtype=np.uint8)
    digest = hashlib.blake2b(repr(arr.shape).encode(), digest_size=16)
    digest.update(arr)
    return digest.hexdigest()


def _first_frame_rgb(img: Image.Image, draft_size: int | None) -> Image.Image:
    """Decode the first frame, EXIF-oriented, as RGB; JPEG at a reduced scale when `draft_size` allows it."""
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    if draft_size is not None and img.format in ("JPEG", "MPO") and img.mode in ("RGB", "L", "CMYK"):
        # Let libjpeg decode at a reduced scale when the image is much larger than needed.
        side = min(img.size)
        img.draft(img.mode, (max(1, img.size[0] * draft_size // side), max(1, img.size[1] * draft_size // side)))
    img.load()
    return to_rgb(ImageOps.exif_transpose(img))


def _decode(path: str | Path, size: int | None, max_pixels: int, digest: bool) -> tuple[np.ndarray | None, str]:
    if size is not None and size <= 0:
        raise ValueError("size must be positive")
    img = open_checked(path, max_pixels)
    try:
        with img:
            rgb = _first_frame_rgb(img, None if digest else size)
            fingerprint = pixel_digest(np.asarray(rgb)) if digest else ""
            arr = None if size is None else np.asarray(square_resize(rgb, size), dtype=np.uint8)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"too many pixels ({exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError(f"cannot decode image: {exc}") from None
    if arr is not None and arr.shape != (size, size, 3):
        raise ImageDecodeError(f"decoded to an unexpected shape {arr.shape}")
    return (None if arr is None else np.ascontiguousarray(arr)), fingerprint


def decode_image(path: str | Path, size: int, max_pixels: int = 40_000_000) -> np.ndarray:
    """Decode an image file to a `[size, size, 3]` uint8 array (EXIF-oriented, first frame, RGB).

    A large JPEG is decoded at a reduced scale. Raises ImageDecodeError with a short reason for anything that
    cannot be decoded.
    """
    arr, _ = _decode(path, size, max_pixels, digest=False)
    assert arr is not None
    return arr


def decode_with_digest(path: str | Path, size: int, max_pixels: int = 40_000_000) -> tuple[np.ndarray, str]:
    """A `[size, size, 3]` uint8 array like `decode_image`, plus the `pixel_digest` of the same decode at the
    file's own resolution: one decode serves both.

    The digest needs every pixel, so a large JPEG is decoded at full scale here (never at a reduced one).
    Raises ImageDecodeError.
    """
    arr, fingerprint = _decode(path, size, max_pixels, digest=True)
    assert arr is not None
    return arr, fingerprint


def image_digest(path: str | Path, max_pixels: int = 40_000_000) -> str:
    """Check that a file decodes, by decoding it fully, and return its `pixel_digest`; raises ImageDecodeError."""
    return _decode(path, None, max_pixels, digest=True)[1]


def check_image(path: str | Path, max_pixels: int = 40_000_000, full: bool = True) -> None:
    """Raise ImageDecodeError when the file would not decode; `full=False` only reads the header.

    The full check decodes the pixels (JPEG at a reduced scale), because Pillow's `verify` does not notice a
    truncated JPEG; truncation is the most common breakage of uploaded photos.
    """
    img = open_checked(path, max_pixels)
    if not full:
        img.close()
        return
    try:
        with img:
            if img.format in ("JPEG", "MPO") and img.mode in ("RGB", "L", "CMYK"):
                img.draft(img.mode, (64, 64))
            img.load()
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"too many pixels ({exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError(f"cannot decode image: {exc}") from None
