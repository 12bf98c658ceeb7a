"""Mask conventions and COCO mask encodings (pycocotools), shared by data and evaluation.

Every COCO segmentation is checked here before pycocotools sees it: pycocotools trusts its
input, so an RLE whose counts do not add up to H x W loops for minutes or leaves pixels
uninitialised, and a polygon with a huge coordinate makes it allocate by the coordinate range.
`check_segmentation` raises `BadSegmentation` (a ValueError with a short `reason` for counting)
and bounds what decoding may cost: the image's own pixel count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

MASK_THRESHOLD = 0.0  # a pixel is in the mask where the logit is >= this value

# pycocotools writes 5 bits per character; 6 characters hold any count of a 2^29-pixel image
# (a 7th would overflow the C decoder's int shift).
MAX_CHARS_PER_COUNT = 6
# Polygons may reach this many image sizes beyond the image (amodal masks extend past it).
POLYGON_MARGIN = 1.0
# pycocotools traces a polygon's outline at 5 points per pixel; outlines are allowed this many
# points or the image's pixel count, whichever is larger.
MIN_OUTLINE_BUDGET = 1 << 16
_CHUNK = 1 << 16  # characters of compressed counts checked at a time (bounds temporaries)


class BadSegmentation(ValueError):
    """A COCO segmentation that cannot be decoded safely; `reason` names the problem class."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def logits_to_mask(logits: np.ndarray) -> np.ndarray:
    """Logits of any shape -> bool mask (logit >= MASK_THRESHOLD)."""
    return np.asarray(logits) >= MASK_THRESHOLD


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """[H, W] bool -> COCO RLE dict with `counts` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def coco_rle(seg: dict[str, Any]) -> dict[str, Any]:
    """A compressed RLE dict whose `counts` may be str (JSON) -> the form pycocotools takes."""
    counts = seg["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [int(v) for v in seg["size"]], "counts": counts}


# ----------------------------------------------------------------------------- checks


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_))


def _compressed_counts_sum(counts: str | bytes, limit: int) -> int:
    """Sum of the runs of pycocotools' compressed counts string, decoded as its C code does
    (rleFrString: 5 bits a character from '0', bit 0x20 continues a run, bit 0x10 of the last
    character signs it, runs after the third are deltas to the run two before). Raises
    BadSegmentation for characters outside '0'..'o', an unfinished last run, a run longer than
    MAX_CHARS_PER_COUNT characters, and a negative run. Stops once the sum passes `limit`."""
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError:
            raise BadSegmentation("RLE counts malformed", "non-ASCII characters") from None
    chars = np.frombuffer(counts, np.uint8)
    if chars.size == 0:
        raise BadSegmentation("RLE counts malformed", "empty counts string")
    bad = np.flatnonzero((chars < 48) | (chars > 111))
    if bad.size:
        raise BadSegmentation(
            "RLE counts malformed", f"character {chr(chars[bad[0]])!r} at {bad[0]}")
    if (chars[-1] - 48) & 0x20:
        raise BadSegmentation("RLE counts malformed", "the last run is unfinished")
    total, index, last = 0, 0, [0, 0]  # runs so far, and the latest odd / even run
    start = 0
    while start < chars.size:
        stop = min(start + _CHUNK, chars.size)
        c = chars[start:stop].astype(np.int64) - 48
        ends = np.flatnonzero((c & 0x20) == 0)
        if stop < chars.size:  # finish at the last whole run of this chunk
            if ends.size == 0:
                raise BadSegmentation("RLE counts malformed", "a run longer than the limit")
            c = c[: ends[-1] + 1]
            stop = start + ends[-1] + 1
        starts = np.concatenate([[0], ends[:-1] + 1])
        lengths = ends - starts + 1
        if lengths.max() > MAX_CHARS_PER_COUNT:
            raise BadSegmentation(
                "RLE counts malformed", f"a run of more than {MAX_CHARS_PER_COUNT} characters")
        shift = 5 * (np.arange(c.size) - np.repeat(starts, lengths))
        x = np.add.reduceat((c & 0x1F) << shift, starts)
        x -= np.where(c[ends] & 0x10, np.int64(1) << (5 * lengths), 0)
        g = index + np.arange(x.size)
        runs = x.copy()
        for parity, first in ((1, 1), (0, 2)):  # delta chains over odd and even run indices
            sel = (g % 2 == parity) & (g >= first)
            runs[sel] = last[parity] + np.cumsum(x[sel])
            if sel.any():
                last[parity] = int(runs[sel][-1])
        if (runs < 0).any():
            k = int(np.flatnonzero(runs < 0)[0])
            raise BadSegmentation("RLE counts malformed", f"run {index + k} is negative")
        total += int(runs.sum())
        if total > limit:
            break
        index += x.size
        start = stop
    return total


def _check_size(size: Any, image_size: tuple[int, int] | None) -> tuple[int, int]:
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(map(_is_int, size))):
        raise BadSegmentation("RLE size malformed", f"size {size!r} is not [height, width]")
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0:
        raise BadSegmentation("RLE size malformed", f"size {[h, w]} is not positive")
    if image_size is not None and (h, w) != tuple(image_size):
        raise BadSegmentation("RLE size disagrees with the image",
                              f"RLE size {[h, w]} but the image is {list(image_size)}")
    return h, w


def _check_rle(seg: dict, image_size: tuple[int, int] | None) -> None:
    if "counts" not in seg or "size" not in seg:
        raise BadSegmentation("RLE without counts/size", f"keys {sorted(map(str, seg))}")
    h, w = _check_size(seg["size"], image_size)
    counts, n = seg["counts"], h * w
    if isinstance(counts, (str, bytes)):
        if len(counts) > MAX_CHARS_PER_COUNT * (n + 1):
            raise BadSegmentation("RLE counts do not sum to H*W",
                                  f"{len(counts)} characters for {n} pixels")
        total = _compressed_counts_sum(counts, n)
    elif isinstance(counts, list):
        if len(counts) > n + 1:
            raise BadSegmentation("RLE counts do not sum to H*W",
                                  f"{len(counts)} runs for {n} pixels")
        if not all(_is_int(c) and c >= 0 for c in counts):
            bad = next(c for c in counts if not (_is_int(c) and c >= 0))
            raise BadSegmentation("RLE counts malformed", f"run {bad!r} is not an integer >= 0")
        total = sum(int(c) for c in counts)
    else:
        raise BadSegmentation("RLE counts malformed", f"counts of type {type(counts).__name__}")
    if total != n:
        got = f"more than {n}" if total > n else str(total)
        raise BadSegmentation("RLE counts do not sum to H*W",
                              f"runs sum to {got}, the {h}x{w} mask has {n} pixels")


def _check_polygons(seg: list, image_size: tuple[int, int] | None) -> None:
    outline = 0
    for k, poly in enumerate(seg):
        if not isinstance(poly, (list, tuple)) or not all(map(_is_number, poly)):
            raise BadSegmentation("polygon malformed",
                                  f"polygon {k} is not a flat list of numbers")
        if len(poly) % 2:
            raise BadSegmentation("polygon of odd length", f"polygon {k} has {len(poly)} values")
        if len(poly) < 6:
            raise BadSegmentation("polygon with fewer than 3 points",
                                  f"polygon {k} has {len(poly) // 2} points")
        xy = np.asarray(poly, np.float64).reshape(-1, 2)
        if not np.isfinite(xy).all():
            raise BadSegmentation("polygon with non-finite coordinates", f"polygon {k}")
        if image_size is None:
            continue
        h, w = image_size
        margin = POLYGON_MARGIN * max(h, w)
        lo, hi = np.array([-margin, -margin]), np.array([w + margin, h + margin])
        if ((xy < lo) | (xy > hi)).any():
            far = xy[((xy < lo) | (xy > hi)).any(axis=1)][0]
            raise BadSegmentation(
                "polygon far outside the image",
                f"polygon {k} has point ({far[0]:g}, {far[1]:g}) on a {h}x{w} image")
        # pycocotools' outline: (int)(5 * c + 0.5) per vertex, max(|dx|, |dy|) + 1 per edge.
        p = np.trunc(5.0 * xy + 0.5).astype(np.int64)
        d = np.abs(p - np.roll(p, -1, axis=0)).max(axis=1)
        outline += int(d.sum()) + len(d)
    if image_size is not None:
        budget = max(image_size[0] * image_size[1], MIN_OUTLINE_BUDGET)
        if outline > budget:
            raise BadSegmentation(
                "polygon outline too long",
                f"{outline} outline points, more than the {budget} allowed for the image")


def check_segmentation(seg: Any, image_size: Sequence[int] | None = None) -> None:
    """Raises BadSegmentation unless COCO `seg` (polygon list, uncompressed or compressed RLE)
    decodes safely on an image of `image_size` = (H, W) (None: checks what needs no size)."""
    hw = None if image_size is None else (int(image_size[0]), int(image_size[1]))
    if isinstance(seg, dict):
        _check_rle(seg, hw)
    elif isinstance(seg, list):
        _check_polygons(seg, hw)
    else:
        raise BadSegmentation("segmentation of an unsupported type", type(seg).__name__)


def decode_segmentation(seg: Any, height: int, width: int) -> np.ndarray:
    """COCO `segmentation` (polygon list, uncompressed or compressed RLE) -> [H, W] bool.

    Raises BadSegmentation (see `check_segmentation`) for anything pycocotools cannot decode
    safely, including an RLE whose stored size disagrees with (height, width).
    """
    check_segmentation(seg, (height, width))
    if isinstance(seg, list):
        if len(seg) == 0:
            return np.zeros((height, width), bool)
        polys = [[float(v) for v in poly] for poly in seg]
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(
            {"size": [height, width], "counts": [int(c) for c in seg["counts"]]}, height, width)
    else:
        rle = coco_rle(seg)
    return mask_utils.decode(rle).astype(bool)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks of the same shape (1.0 when both are empty)."""
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)

