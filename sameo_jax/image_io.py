"""Image files of any PIL mode -> [H, W, 3] uint8 RGB, with the pixel count checked first.

One reader for data set builds and for predict.py, so both see the same pixels:
- EXIF orientation is applied (the picture as viewers show it); animations give frame 0.
- 16-bit grey (`I;16*`, and `I` holding 0..65535) is scaled to 0..255, not clipped;
  float images (`F`) must hold values in [0, 1]; CMYK with an ICC profile goes through it.
- Alpha is dropped (the colour under it is kept), as cv2 and PIL's convert do.
- Images over MAX_PIXELS are refused from the header, before any pixel is decoded.
Failures raise `ImageError` (a ValueError naming the file, with a `reason` for counting).
"""

from __future__ import annotations

import io
import os
import pathlib
import struct
import warnings

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit (about 0.25 GB as RGB)
MAX_FILE_BYTES = 1 << 30
EXIF_ORIENTATION = 0x0112
# What PIL raises on damaged files besides OSError (its fuzzing finds all of these).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError,
                  TypeError, KeyError, ZeroDivisionError, Image.DecompressionBombError)


class ImageError(ValueError):
    """An image that cannot be read; `reason`: missing_image, corrupt_image,
    decompression_bomb, file_too_large, unsupported_image or path_outside_folder."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def to_rgb(img: Image.Image, name: str = "image") -> np.ndarray:
    """A loaded PIL image of any mode -> [H, W, 3] uint8 (see the module doc)."""
    mode = img.mode
    if mode.startswith("I;16"):
        return _grey_to_rgb(_scale_16bit(np.asarray(img)))
    if mode == "I":
        values = np.asarray(img)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageError("unsupported_image", f"{name}: 32-bit integer image with values "
                             f"in [{values.min()}, {values.max()}], outside 16-bit range")
        return _grey_to_rgb(_scale_16bit(values))
    if mode == "F":
        values = np.asarray(img, np.float32)
        if not np.isfinite(values).all() or (values.size and (values.min() < 0
                                                               or values.max() > 1)):
            raise ImageError("unsupported_image",
                             f"{name}: float image with values outside [0, 1] or not finite")
        return _grey_to_rgb(np.round(values * 255).astype(np.uint8))
    if mode == "CMYK" and img.info.get("icc_profile"):
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
            img = ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"),
                                            outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken profile: PIL's plain conversion below
    if mode == "La":  # premultiplied grey + alpha converts only to LA
        img = img.convert("LA")
    try:
        rgb = img if img.mode == "RGB" else img.convert("RGB")
    except ValueError as e:
        raise ImageError("unsupported_image", f"{name}: image mode {mode} ({e})") from None
    return np.asarray(rgb, np.uint8)


def _open(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Encoded bytes -> loaded PIL image at frame 0, as stored (no EXIF turn yet)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError("decompression_bomb", f"{name}: {e}") from None
    except UnidentifiedImageError:
        raise ImageError("corrupt_image", f"{name}: not an image file PIL can read") from None
    except _DECODE_ERRORS as e:
        raise ImageError("corrupt_image", f"{name}: cannot read image ({e})") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError("decompression_bomb", f"{name}: {width}x{height} pixels, more than "
                         f"the {max_pixels} allowed")
    if width <= 0 or height <= 0:
        raise ImageError("corrupt_image", f"{name}: empty image ({width}x{height})")
    try:
        img.seek(0)
        img.load()
    except _DECODE_ERRORS as e:
        raise ImageError("corrupt_image", f"{name}: cannot read image ({e})") from None
    return img


def exif_rotated(img: Image.Image) -> bool:
    """Whether the file's EXIF orientation turns or flips the stored pixels."""
    try:
        return img.getexif().get(EXIF_ORIENTATION, 1) not in (1, None)
    except _DECODE_ERRORS:
        return False


def path_inside(root: str | os.PathLike, name: str) -> pathlib.Path:
    """`root / name` with symlinks resolved; ImageError (path_outside_folder) when it leaves
    `root` (an absolute name, '..', a symlink pointing out). `root` itself may be a link."""
    base = pathlib.Path(root).resolve()
    path = (base / name).resolve()
    if not path.is_relative_to(base):
        raise ImageError("path_outside_folder",
                         f"{name!r} resolves to {path}, outside {pathlib.Path(root)}")
    return path


def read_file_bytes(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of an image file; ImageError (missing_image, file_too_large) naming it."""
    path = pathlib.Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ImageError("missing_image", f"{path}: not a file")
        if size > max_bytes:
            raise ImageError("file_too_large", f"{path}: {size} bytes, more than the "
                             f"{max_bytes} allowed for an image")
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError("missing_image", f"{path}: image file not found") from None
    except OSError as e:
        raise ImageError("missing_image", f"{path}: cannot read ({e.strerror or e})") from None


def decode(data: bytes, name: str = "image", max_pixels: int = MAX_PIXELS
           ) -> tuple[np.ndarray, bool]:
    """Encoded image bytes -> ([H, W, 3] uint8 RGB, plain), `plain` when the bytes are an 8-bit
    RGB JPEG or PNG shown as stored (no EXIF turn): decoders elsewhere give the same pixels.
    Raises ImageError naming `name`."""
    with _open(data, name, max_pixels) as img:
        turned = exif_rotated(img)
        plain = not turned and img.mode == "RGB" and (
            img.format == "JPEG" or (img.format == "PNG" and data[24:25] == b"\x08"))
        if turned:
            try:
                img = ImageOps.exif_transpose(img)
            except _DECODE_ERRORS as e:
                raise ImageError("corrupt_image", f"{name}: bad EXIF orientation ({e})") from None
        return to_rgb(img, name), plain


def decode_rgb(data: bytes, name: str = "image", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> [H, W, 3] uint8 RGB. Raises ImageError naming `name`."""
    return decode(data, name, max_pixels)[0]


def read_rgb(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An image file -> [H, W, 3] uint8 RGB. Raises ImageError naming the file."""
    return decode_rgb(read_file_bytes(path), str(path), max_pixels)
