"""Majority area pooling of instance masks to the training target size.

Each of the size x size cells (equal parts of the whole H x W image) is in the pooled mask
when at least half of its area is covered by the mask. Computed exactly, in integers (areas
in units of 1 / size^2 pixel), over the mask's bounding box only.

Stored form (`encode_pooled` at build time, `read_pooled` in the loader): a mask pooled to
STORED_SIZE, as five little-endian uint16 (size, i0, i1, j0, j1: the pooled mask's bounding
box in cells, ends exclusive, all 0 when nothing is left at that size) and the cells of that
box as `np.packbits` bits, row-major; b"" for a mask with no pixel at all.
"""

from __future__ import annotations

import functools

import numpy as np

# EfficientSAM's low-resolution mask size (1024 px input / 4), the training target size.
STORED_SIZE = 256
_HEADER = np.dtype("<u2")


@functools.lru_cache(maxsize=4096)
def _cell_taps(n: int, size: int, c0: int, c1: int, lo: int, hi: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Overlaps of cells c0..c1-1 (`size` equal cells over n pixels) with pixels lo..hi-1, in
    units of 1/size pixel (integers): pixel index from lo and weight, both int32 [cells, T]."""
    cells = np.arange(c0, c1)[:, None]
    pixels = np.maximum(cells * n // size, lo) + np.arange(-(-n // size) + 1)[None]
    weight = np.maximum(0, np.minimum((cells + 1) * n, (pixels + 1) * size)
                        - np.maximum(cells * n, pixels * size))
    weight = np.where(pixels < hi, weight, 0).astype(np.int32)
    return (np.minimum(pixels, hi - 1) - lo).astype(np.int32), weight


def pool_mask_crop(crop: np.ndarray, box: tuple[int, int, int, int], hw: tuple[int, int],
                   size: int) -> np.ndarray:
    """Majority area pooling of an [H, W] mask given as its bounding box's crop: [y1 - y0,
    x1 - x0] bool, box = (x0, y0, x1, y1), hw = (H, W) -> [size, size] bool. Only the cells
    the box touches are computed."""
    (h, w), (x0, y0, x1, y1) = hw, (int(v) for v in box)
    out = np.zeros((size, size), bool)
    i0, i1 = y0 * size // h, -(-y1 * size // h)
    j0, j1 = x0 * size // w, -(-x1 * size // w)
    crop = np.asarray(crop, bool).astype(np.int32 if 2 * h * w < 2**31 else np.int64)
    index, weight = _cell_taps(h, size, i0, i1, y0, y1)
    rows = sum(crop[index[:, t]] * weight[:, t, None] for t in range(index.shape[1]))
    rows = np.ascontiguousarray(rows.T)  # [columns, cells]: each cell row's covered lengths
    index, weight = _cell_taps(w, size, j0, j1, x0, x1)
    area = sum(rows[index[:, t]] * weight[:, t, None] for t in range(index.shape[1]))
    out[i0:i1, j0:j1] = 2 * area.T >= h * w  # areas in units of 1 / size^2 pixel
    return out


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1), ends exclusive, of an [H, W] bool mask; None if empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def downsample_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """[N, H, W] bool -> [N, size, size] bool by majority area pooling."""
    masks = np.asarray(masks, bool)
    n, h, w = masks.shape
    if h % size == 0 and w % size == 0:  # whole cells: the same area count, vectorised
        cells = masks.reshape(n, size, h // size, size, w // size)
        return 2 * cells.sum(axis=(2, 4)) >= (h // size) * (w // size)
    out = np.zeros((n, size, size), bool)
    for k, mask in enumerate(masks):
        box = mask_box(mask)
        if box is not None:
            out[k] = pool_mask_crop(mask[box[1] : box[3], box[0] : box[2]], box, (h, w), size)
    return out


def encode_pooled(mask: np.ndarray, size: int = STORED_SIZE) -> bytes:
    """[H, W] bool -> the stored form of its pooling to [size, size] (module docstring)."""
    mask = np.asarray(mask, bool)
    box = mask_box(mask)
    if box is None:
        return b""
    pooled = pool_mask_crop(mask[box[1] : box[3], box[0] : box[2]], box, mask.shape, size)
    j0, i0, j1, i1 = mask_box(pooled) or (0, 0, 0, 0)
    header = np.asarray([size, i0, i1, j0, j1], _HEADER).tobytes()
    return header + np.packbits(pooled[i0:i1, j0:j1]).tobytes()


def stored_size(data: bytes) -> int | None:
    """The size a stored pooled mask was pooled to; None for a mask with no pixel."""
    if not data:
        return None
    if len(data) < _HEADER.itemsize * 5:
        raise ValueError(f"stored pooled mask of {len(data)} bytes, shorter than its header")
    return int(np.frombuffer(data, _HEADER, 1)[0])


def read_pooled(data: bytes, out: np.ndarray) -> bool:
    """Writes a stored pooled mask into `out` ([size, size] bool, all False) and returns
    whether the mask had a pixel. Raises ValueError for bytes that are not that form."""
    if not data:
        return False
    size = stored_size(data)
    i0, i1, j0, j1 = (int(v) for v in np.frombuffer(data, _HEADER, 4, _HEADER.itemsize))
    if out.shape != (size, size) or not (i0 <= i1 <= size and j0 <= j1 <= size):
        raise ValueError(f"stored pooled mask of size {size} with cells [{i0}:{i1}, {j0}:{j1}]"
                         f" does not fit [{out.shape[0]}, {out.shape[1]}]")
    cells, bits = (i1 - i0) * (j1 - j0), data[_HEADER.itemsize * 5 :]
    if len(bits) != -(-cells // 8):
        raise ValueError(f"stored pooled mask: {len(bits)} bytes of bits for {cells} cells")
    if cells:
        flat = np.unpackbits(np.frombuffer(bits, np.uint8), count=cells).view(bool)
        out[i0:i1, j0:j1] = flat.reshape(i1 - i0, j1 - j0)
    return True
