"""Pictures for people: mask overlays, hidden parts, side-by-side panels, PNG output (PIL only).

Labels use a scalable font sized to the picture (`label_font_size`), so that they stay
readable whether a panel is 128 or 2000 pixels wide.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# A fixed palette of well-separated colours (RGB); instance i gets PALETTE[i % len(PALETTE)].
PALETTE = np.array(
    [
        (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
        (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
        (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
        (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
    ],
    np.uint8,
)
MIN_FONT_SIZE = 12  # pixels; smaller text is hard to read on any screen


def _check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{name}: expected [H, W, 3], got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8, got {image.dtype}")
    return image


def _check_masks(masks: np.ndarray, h: int, w: int, name: str = "masks") -> np.ndarray:
    masks = np.asarray(masks, bool)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3 or masks.shape[1:] != (h, w):
        raise ValueError(f"{name}: expected [N, {h}, {w}], got shape {masks.shape}")
    return masks


def label_font_size(height: int, width: int) -> int:
    """Font size (pixels) for labels on an [height, width] picture: 1/18 of the shorter side,
    at least MIN_FONT_SIZE."""
    return max(MIN_FONT_SIZE, round(min(height, width) / 18))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def colour_of(index: int) -> tuple[int, int, int]:
    """The palette colour of instance `index` (RGB)."""
    return tuple(int(c) for c in PALETTE[index % len(PALETTE)])


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """[H, W] bool -> its boundary pixels (inside the mask, `width` pixels thick)."""
    mask = np.asarray(mask, bool)
    inner = mask.copy()
    for _ in range(max(1, width)):
        padded = np.pad(inner, 1, constant_values=False)
        inner = (inner & padded[:-2, 1:-1] & padded[2:, 1:-1]
                 & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~inner


def hatching(height: int, width: int, period: int = 8, thickness: int = 2) -> np.ndarray:
    """[H, W] bool diagonal stripes: `thickness` of every `period` pixels along x + y."""
    yy, xx = np.mgrid[0:height, 0:width]
    return (xx + yy) % max(period, 2) < max(1, min(thickness, period - 1))


def overlay_masks(
    image: np.ndarray,
    masks: np.ndarray,
    boxes: np.ndarray | None = None,
    texts: Sequence[str] | None = None,
    alpha: float = 0.5,
    hidden: np.ndarray | None = None,
    colours: Sequence[int] | None = None,
) -> np.ndarray:
    """Blends coloured masks (and optional hidden parts, box outlines, labels) onto an image.

    Args:
      image: [H, W, 3] uint8.
      masks: [N, H, W] bool (N may be 0).
      boxes: optional [N, 4] xyxy boxes in image pixels, drawn as outlines.
      texts: optional N strings drawn at each box's (or mask's) top-left corner.
      alpha: mask opacity in [0, 1].
      hidden: optional [N, H, W] bool: the parts of each mask that are occluded. They are
        drawn as stripes of the instance's colour over whatever hides them, and every mask
        gets its outline, so that an amodal mask reads as "seen part + hidden part".
      colours: optional N palette indices (default 0..N-1), to give an instance the same
        colour in several panels.

    Returns:
      [H, W, 3] uint8; the input is not modified.
    """
    image = _check_image(image)
    h, w = image.shape[:2]
    masks = _check_masks(masks, h, w)
    n = masks.shape[0]
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if boxes is not None:
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        if boxes.shape[0] != n:
            raise ValueError(f"boxes: expected {n} boxes (one per mask), got {boxes.shape[0]}")
    if texts is not None and len(texts) != n:
        raise ValueError(f"texts: expected {n} strings (one per mask), got {len(texts)}")
    if hidden is not None:
        hidden = _check_masks(hidden, h, w, "hidden")
        if hidden.shape[0] != n:
            raise ValueError(f"hidden: expected {n} masks (one per mask), got {hidden.shape[0]}")
    if colours is None:
        colours = range(n)
    elif len(colours) != n:
        raise ValueError(f"colours: expected {n} palette indices, got {len(colours)}")
    rgb = [np.asarray(colour_of(int(c)), np.float32) for c in colours]

    out = image.astype(np.float32)
    for i in range(n):
        seen = masks[i] if hidden is None else masks[i] & ~hidden[i]
        out[seen] = (1.0 - alpha) * out[seen] + alpha * rgb[i]
    if hidden is not None:
        # Stripes and outlines after all fills, so that no other instance paints over them.
        stripes = hatching(h, w, period=max(6, min(h, w) // 40),
                           thickness=max(2, min(h, w) // 160))
        line = max(1, min(h, w) // 256)
        for i in range(n):
            out[hidden[i] & stripes] = rgb[i]
            edge = outline(masks[i], line)
            out[edge] = rgb[i]
    canvas = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))

    if boxes is not None or texts is not None:
        draw = ImageDraw.Draw(canvas)
        font = _font(label_font_size(h, w))
        placed: list[tuple[float, float, float, float]] = []
        for i in range(n):
            colour = tuple(int(c) for c in rgb[i])
            if boxes is not None:
                x0, y0, x1, y1 = (float(v) for v in boxes[i])
                if np.isfinite([x0, y0, x1, y1]).all() and x1 >= x0 and y1 >= y0:
                    # Pixel-edge boxes: the last covered pixel is x1 - 1.
                    draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour)
            if texts is not None and texts[i]:
                if boxes is not None and np.isfinite(boxes[i]).all():
                    x, y = float(boxes[i, 0]), float(boxes[i, 1])
                else:
                    ys, xs = np.nonzero(masks[i])
                    x, y = (float(xs.min()), float(ys.min())) if xs.size else (0.0, 0.0)
                placed.append(_label(draw, (x, y), texts[i], colour, font, (w, h), placed))
    return np.asarray(canvas, np.uint8)


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str,
           colour: tuple[int, ...], font, size: tuple[int, int],
           placed: Sequence[tuple[float, float, float, float]] = ()
           ) -> tuple[float, float, float, float]:
    """Text on a black box at `xy`, kept inside the picture and moved down past the labels
    already `placed` (x0, y0, x1, y1) that it would cover. Returns its own box."""
    w, h = size
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left + 2, bottom - top + 2
    x = min(max(xy[0], 0.0), max(w - tw, 0))
    y = min(max(xy[1], 0.0), max(h - th, 0))
    for _ in range(len(placed)):
        hit = [b for b in placed if x < b[2] and b[0] < x + tw and y < b[3] and b[1] < y + th]
        if not hit:
            break
        y = min(max(b[3] for b in hit) + 1, max(h - th, 0))
    draw.rectangle([x, y, x + tw, y + th], fill=(0, 0, 0))
    draw.text((x + 1 - left, y + 1 - top), text, fill=colour, font=font)
    return x, y, x + tw, y + th


def upscale(array: np.ndarray, factor: int, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """Repeats every pixel `factor` times along `axes` (the height and width axes: (0, 1) for
    [H, W, 3] images, (1, 2) for [N, H, W] masks); masks stay exact."""
    if factor < 1:
        raise ValueError(f"upscale factor must be >= 1, got {factor}")
    array = np.asarray(array)
    if factor == 1:
        return array
    return np.repeat(np.repeat(array, factor, axis=axes[0]), factor, axis=axes[1])


# Colours of depth layers 0 (front), 1, 2, ...; repeats past the last.
LAYER_PALETTE = np.array(
    [(230, 25, 75), (0, 130, 200), (60, 180, 75), (255, 225, 25), (145, 30, 180),
     (70, 240, 240)],
    np.uint8,
)


def _outline(mask: np.ndarray) -> np.ndarray:
    """[H, W] bool: pixels of `mask` with a 4-neighbour outside it."""
    padded = np.pad(mask, 1)
    inner = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~inner


def _label_spot(mask: np.ndarray) -> tuple[float, float] | None:
    """(x, y) of the mask pixel nearest to its centroid; None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if not xs.size:
        return None
    k = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
    return float(xs[k]), float(ys[k])


def draw_layers(
    image: np.ndarray,
    amodal: np.ndarray,
    visible: np.ndarray,
    layers: np.ndarray,
    texts: Sequence[str] | None = None,
    alpha: float = 0.55,
    hidden_alpha: float = 0.3,
) -> np.ndarray:
    """Objects coloured by depth layer: visible parts filled, hidden parts (amodal minus
    visible) translucent and hatched on top of whatever hides them, every amodal outline
    drawn, and each object's label (default "L<layer>", on its layer colour) at its visible
    part.

    Args:
      image: [H, W, 3] uint8.
      amodal, visible: [N, H, W] bool.
      layers: [N] int depth layers (0 = front; see sameo_jax.order).
      texts: optional N labels.
      alpha, hidden_alpha: opacity of the visible and the hidden parts' colour.

    Returns:
      [H, W, 3] uint8; the input is not modified.
    """
    image = _check_image(image)
    h, w = image.shape[:2]
    amodal = np.asarray(amodal, bool).reshape(-1, h, w)
    visible = np.asarray(visible, bool).reshape(-1, h, w) & amodal
    layers = np.asarray(layers, np.int64).reshape(-1)
    n = len(amodal)
    if len(visible) != n or len(layers) != n:
        raise ValueError(f"draw_layers: {n} amodal masks, {len(visible)} visible masks and "
                         f"{len(layers)} layers; expected one of each per object")
    if texts is not None and len(texts) != n:
        raise ValueError(f"texts: expected {n} strings (one per object), got {len(texts)}")
    colours = LAYER_PALETTE[layers % len(LAYER_PALETTE)].astype(np.float32)
    out = image.astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    hatch = (xx + yy) % 6 < 2
    back_to_front = sorted(range(n), key=lambda k: (-layers[k], k))
    for k in back_to_front:
        m = visible[k]
        out[m] = (1.0 - alpha) * out[m] + alpha * colours[k]
    for k in back_to_front:
        hidden = amodal[k] & ~visible[k]
        out[hidden] = (1.0 - hidden_alpha) * out[hidden] + hidden_alpha * colours[k]
        lines = hidden & hatch
        out[lines] = 0.5 * out[lines] + 0.5 * colours[k]
    for k in back_to_front:
        out[_outline(amodal[k])] = colours[k]
    canvas = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, min(h, w) // 24))
    for k in range(n):
        spot = _label_spot(visible[k]) or _label_spot(amodal[k])
        if spot is None:
            continue
        text = f"L{layers[k]}" if texts is None else texts[k]
        left, top, right, bottom = draw.textbbox(spot, text, font=font)
        dx, dy = (right - left) / 2, (bottom - top) / 2
        x = min(max(spot[0] - dx, 0.0), max(w - 2 * dx, 0.0))
        y = min(max(spot[1] - dy, 0.0), max(h - 2 * dy, 0.0))
        box = draw.textbbox((x, y), text, font=font)
        draw.rectangle(box, fill=tuple(int(c) for c in colours[k]), outline=(0, 0, 0))
        draw.text((x, y), text, fill=(0, 0, 0), font=font)
    return np.asarray(canvas, np.uint8)


def hstack_panels(
    images: Sequence[np.ndarray], titles: Sequence[str] | None = None, gap: int = 4
) -> np.ndarray:
    """Places [H_i, W_i, 3] uint8 panels side by side (tops aligned, black background).

    With `titles`, a strip with each panel's title (in a font sized to the panels) is added
    above it. Returns [H, W, 3] uint8.
    """
    if len(images) == 0:
        raise ValueError("hstack_panels: need at least one image")
    panels = [_check_image(im, f"images[{i}]") for i, im in enumerate(images)]
    if titles is not None and len(titles) != len(panels):
        raise ValueError(f"titles: expected {len(panels)} strings, got {len(titles)}")
    tallest = max(p.shape[0] for p in panels)
    font = _font(label_font_size(tallest, min(p.shape[1] for p in panels)))
    title_h = 0
    if titles is not None:
        ascent, descent = font.getmetrics()
        title_h = ascent + descent + 4
    height = tallest + title_h
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    out = np.zeros((height, width, 3), np.uint8)
    x = 0
    for p in panels:
        out[title_h : title_h + p.shape[0], x : x + p.shape[1]] = p
        x += p.shape[1] + gap
    if titles is None:
        return out
    canvas = Image.fromarray(out)
    draw = ImageDraw.Draw(canvas)
    x = 0
    for p, title in zip(panels, titles, strict=True):
        draw.text((x + 2, 2), str(title), fill=(255, 255, 255), font=font)
        x += p.shape[1] + gap
    return np.asarray(canvas, np.uint8)


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Writes a [H, W, 3] uint8 image as PNG, creating parent folders."""
    image = _check_image(image)
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    Image.fromarray(image).save(os.fspath(path), format="PNG")
