"""Image and prompt pre/post-processing, exactly as the official EfficientSAM computes it.

The one place where the model-input frame exists. Everywhere else boxes and points are in
original image pixels (see `sameo_jax.boxes`).

- Images are resized straight to `size x size` with bilinear interpolation
  (align_corners=False, no antialiasing; the aspect ratio is NOT kept, there is no padding),
  then normalised with the ImageNet mean and std on the [0, 1] scale.
- Prompt coordinates are rescaled per axis (`x * size / W`, `y * size / H`); any negative
  coordinate becomes -1, as in the original (so a box corner left of / above the image is
  treated as lying on the border, and padding points stay -1).
- Low-res mask logits go back to the original size with PyTorch-convention bicubic
  interpolation (A = -0.75, align_corners=False, border clamp, no antialias).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

PIXEL_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
PIXEL_STD = np.array([0.229, 0.224, 0.225], np.float32)

BOX_TOP_LEFT_LABEL = 2
BOX_BOTTOM_RIGHT_LABEL = 3
POSITIVE_POINT_LABEL = 1
NEGATIVE_POINT_LABEL = 0
PADDING_LABEL = -1
VALID_LABELS = (NEGATIVE_POINT_LABEL, POSITIVE_POINT_LABEL, BOX_TOP_LEFT_LABEL,
                BOX_BOTTOM_RIGHT_LABEL)

_CUBIC_A = -0.75  # PyTorch's bicubic coefficient (Keys uses -0.5)


def _is_jax(x) -> bool:
    return not isinstance(x, np.ndarray | np.generic | list | tuple | int | float)


@functools.lru_cache(maxsize=64)
def _linear_taps(in_size: int, out_size: int):
    """Bilinear (align_corners=False, no antialias) taps: indices i0, i1 and weight of i1."""
    dst = np.arange(out_size, dtype=np.float64)
    src = np.maximum((dst + 0.5) * (in_size / out_size) - 0.5, 0.0)
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, w1


def _cubic_weight(d: np.ndarray) -> np.ndarray:
    a = _CUBIC_A
    d = np.abs(d)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def cubic_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float64 matrix of PyTorch's 1-D bicubic resize.

    align_corners=False, A = -0.75, taps clamped to the border, no antialias. Applying it
    along each axis reproduces `torch.nn.functional.interpolate(mode="bicubic")`.
    """
    dst = np.arange(out_size, dtype=np.float64)
    src = (dst + 0.5) * (in_size / out_size) - 0.5
    i0 = np.floor(src).astype(np.int64)
    t = src - i0
    matrix = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    for k, d in zip(range(-1, 3), (t + 1, t, 1 - t, 2 - t), strict=True):
        idx = np.clip(i0 + k, 0, in_size - 1)
        np.add.at(matrix, (rows, idx), _cubic_weight(d))
    matrix.setflags(write=False)
    return matrix


def resize_image(images, size: int):
    """Bilinear resize to [..., size, size, C] float32 (align_corners=False, no antialias).

    images: [..., H, W, C] (uint8 or float), numpy or jax. Returns the same array kind.
    An image already `size x size` is only cast. Matches the official preprocessing.
    """
    xp = jnp if _is_jax(images) else np
    x = xp.asarray(images).astype(xp.float32)
    h, w = x.shape[-3], x.shape[-2]
    if (h, w) == (size, size):
        return x
    if h != size:
        i0, i1, w1 = _linear_taps(h, size)
        w1 = w1[:, None, None]
        x = xp.take(x, i0, axis=-3) * (1 - w1) + xp.take(x, i1, axis=-3) * w1
    if w != size:
        i0, i1, w1 = _linear_taps(w, size)
        w1 = w1[:, None]
        x = xp.take(x, i0, axis=-2) * (1 - w1) + xp.take(x, i1, axis=-2) * w1
    return x


def resize_image_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """[H, W, C] uint8 -> [size, size, C] uint8: `resize_image` rounded (within half a grey
    level of the float32 result)."""
    return np.clip(np.rint(resize_image(image, size)), 0, 255).astype(np.uint8)


def _dynamic_taps(in_sizes: jax.Array, out_size: int):
    """`_linear_taps` for per-image input sizes [B] int32, in integer arithmetic (exact floor):
    i0, i1 int32 [B, out_size] and the weight of i1, float32 [B, out_size]."""
    den = 2 * out_size  # src = ((2 * dst + 1) * in - out) / (2 * out)
    num = (2 * jnp.arange(out_size, dtype=jnp.int32) + 1)[None] * in_sizes[:, None] - out_size
    num = jnp.maximum(num, 0)
    i0 = jnp.minimum(num // den, in_sizes[:, None] - 1)
    i1 = jnp.minimum(i0 + 1, in_sizes[:, None] - 1)
    w1 = (num - i0 * den).astype(jnp.float32) / np.float32(den)
    return i0, i1, w1


def resize_padded(images: jax.Array, image_hw: jax.Array, size: int) -> jax.Array:
    """`resize_image` of padded images, jittable: [B, P, Q, C] uint8 whose image b fills the
    top-left image_hw[b] = (h, w) (int32 [B, 2]; the rest is padding, never read) ->
    [B, size, size, C] float32. The same taps and float32 arithmetic as `resize_image`."""
    hw = jnp.asarray(image_hw, jnp.int32)
    i0, i1, w1 = _dynamic_taps(hw[:, 0], size)
    rows0 = jnp.take_along_axis(images, i0[:, :, None, None], axis=1).astype(jnp.float32)
    rows1 = jnp.take_along_axis(images, i1[:, :, None, None], axis=1).astype(jnp.float32)
    w1 = w1[:, :, None, None]
    x = rows0 * (1 - w1) + rows1 * w1
    i0, i1, w1 = _dynamic_taps(hw[:, 1], size)
    w1 = w1[:, None, :, None]
    return (jnp.take_along_axis(x, i0[:, None, :, None], axis=2) * (1 - w1)
            + jnp.take_along_axis(x, i1[:, None, :, None], axis=2) * w1)


def pad_image(image: np.ndarray, pad_hw: tuple[int, int], size: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """[H, W, 3] uint8 -> ([P, Q, 3] uint8 padded with zeros, image_hw int32 [2]) for
    `resize_padded` (pad_hw = (P, Q), both >= size).

    An image larger than the pad on a side is resized to size x size here instead (rounded to
    uint8: within half a grey level of the exact path) and its image_hw is (size, size).
    """
    p, q = pad_hw
    if p < size or q < size:
        raise ValueError(f"image pad {tuple(pad_hw)} is smaller than the model frame {size}")
    image = np.asarray(image)
    h, w = image.shape[:2]
    if h > p or w > q:
        image = resize_image_uint8(image, size)
        h = w = size
    out = np.zeros((p, q, image.shape[-1]), np.uint8)
    out[:h, :w] = image
    return out, np.asarray([h, w], np.int32)


def normalize_image(images):
    """[..., 3] pixel values in [0, 255] -> ImageNet-normalised float32 (same array kind)."""
    xp = jnp if _is_jax(images) else np
    x = xp.asarray(images).astype(xp.float32)
    return (x / 255.0 - PIXEL_MEAN) / PIXEL_STD


def preprocess_image(images, size: int = 1024):
    """[..., H, W, 3] uint8 RGB -> [..., size, size, 3] float32 model input.

    Division by 255 and normalisation commute with the (linear) resize, so this equals the
    original's resize-after-/255 up to float rounding (~1e-6).
    """
    return normalize_image(resize_image(images, size))


def boxes_to_prompts(boxes):
    """[..., 4] xyxy boxes -> points [..., 2, 2] and labels [..., 2] int32 (2 = top-left,
    3 = bottom-right), the way EfficientSAM encodes a box."""
    xp = jnp if _is_jax(boxes) else np
    b = xp.asarray(boxes, dtype=xp.float32)
    points = b.reshape(*b.shape[:-1], 2, 2)
    labels = xp.broadcast_to(
        xp.asarray([BOX_TOP_LEFT_LABEL, BOX_BOTTOM_RIGHT_LABEL], xp.int32), b.shape[:-1] + (2,)
    )
    return points, labels


def rescale_points(points, orig_hw: tuple[int, int], size: int = 1024):
    """Original-pixel (x, y) points [..., 2] -> the model-input frame, per axis.

    x' = x * size / W and y' = y * size / H (float32, multiply then divide); any negative
    coordinate becomes -1, independently per coordinate, as in the original.
    """
    xp = jnp if _is_jax(points) else np
    p = xp.asarray(points, dtype=xp.float32)
    h, w = orig_hw
    scale_x = p[..., 0] * np.float32(size) / np.float32(w)
    scale_y = p[..., 1] * np.float32(size) / np.float32(h)
    x = xp.where(p[..., 0] >= 0, scale_x, -1.0)
    y = xp.where(p[..., 1] >= 0, scale_y, -1.0)
    return xp.stack([x, y], axis=-1).astype(xp.float32)


def pad_prompts(points, labels, num_points: int):
    """Pads points [..., P, 2] / labels [..., P] to exactly `num_points` with (-1, -1) / -1.

    Raises ValueError when P > num_points (the original would silently truncate).
    """
    xp = jnp if _is_jax(points) else np
    p = xp.asarray(points, dtype=xp.float32)
    lab = xp.asarray(labels).astype(xp.int32)
    n = p.shape[-2]
    if n > num_points:
        raise ValueError(f"a prompt has {n} points; the model takes at most {num_points}")
    if n == num_points:
        return p, lab
    pad = num_points - n
    p = xp.concatenate([p, xp.full(p.shape[:-2] + (pad, 2), -1.0, xp.float32)], axis=-2)
    lab = xp.concatenate([lab, xp.full(lab.shape[:-1] + (pad,), PADDING_LABEL, xp.int32)], axis=-1)
    return p, lab


def upsample_logits(logits, out_hw: tuple[int, int]):
    """[..., L, L] low-res logits -> [..., H, W] with PyTorch bicubic (A = -0.75).

    Works on numpy or jax arrays (a jax array stays on device; jittable for static out_hw).
    """
    xp = jnp if _is_jax(logits) else np
    x = xp.asarray(logits, dtype=xp.float32)
    h_in, w_in = x.shape[-2], x.shape[-1]
    ry = cubic_resize_matrix(h_in, out_hw[0]).astype(np.float32)
    rx = cubic_resize_matrix(w_in, out_hw[1]).astype(np.float32)
    if xp is jnp:
        precision = "highest"
        x = jnp.einsum("...hw,Hh->...Hw", x, ry, precision=precision)
        return jnp.einsum("...Hw,Ww->...HW", x, rx, precision=precision)
    x = np.einsum("...hw,Hh->...Hw", x, ry)
    return np.einsum("...Hw,Ww->...HW", x, rx)
