"""Tests for sameo_jax.visualize: overlays, panels, PNG output."""

import numpy as np
import pytest
from PIL import Image

from sameo_jax import visualize


def _image(h=20, w=30, value=100):
    return np.full((h, w, 3), value, np.uint8)


def test_overlay_blends_only_masked_pixels():
    image = _image()
    masks = np.zeros((2, 20, 30), bool)
    masks[0, 2:5, 3:6] = True
    masks[1, 10:12, 20:25] = True
    out = visualize.overlay_masks(image, masks, alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == image.shape
    expected0 = np.rint(0.5 * 100 + 0.5 * visualize.PALETTE[0].astype(np.float32))
    np.testing.assert_array_equal(out[3, 4], expected0.astype(np.uint8))
    expected1 = np.rint(0.5 * 100 + 0.5 * visualize.PALETTE[1].astype(np.float32))
    np.testing.assert_array_equal(out[11, 22], expected1.astype(np.uint8))
    outside = ~(masks.any(axis=0))
    np.testing.assert_array_equal(out[outside], image[outside])
    np.testing.assert_array_equal(image, _image())  # input untouched


def test_overlay_alpha_one_paints_colour_and_zero_masks_is_identity():
    image = _image()
    masks = np.zeros((1, 20, 30), bool)
    masks[0, 0, 0] = True
    out = visualize.overlay_masks(image, masks, alpha=1.0)
    np.testing.assert_array_equal(out[0, 0], visualize.PALETTE[0])
    empty = visualize.overlay_masks(image, np.zeros((0, 20, 30), bool))
    np.testing.assert_array_equal(empty, image)


def test_overlay_draws_box_outline_and_text():
    image = _image(value=0)
    masks = np.zeros((1, 20, 30), bool)
    boxes = np.array([[5, 5, 15, 12]], np.float32)
    out = visualize.overlay_masks(image, masks, boxes=boxes, alpha=0.5)
    colour = visualize.PALETTE[0]
    np.testing.assert_array_equal(out[5, 10], colour)  # top edge
    np.testing.assert_array_equal(out[8, 5], colour)  # left edge
    np.testing.assert_array_equal(out[8, 14], colour)  # right edge (x1 - 1)
    np.testing.assert_array_equal(out[8, 10], [0, 0, 0])  # inside stays untouched
    with_text = visualize.overlay_masks(image, masks, boxes=boxes, texts=["cat 0.9"])
    assert (with_text != out).any()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"masks": np.zeros((1, 5, 5), bool)}, "masks"),
        ({"masks": np.zeros((1, 20, 30), bool), "boxes": np.zeros((2, 4))}, "boxes"),
        ({"masks": np.zeros((1, 20, 30), bool), "texts": ["a", "b"]}, "texts"),
        ({"masks": np.zeros((1, 20, 30), bool), "alpha": 1.5}, "alpha"),
    ],
)
def test_overlay_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        visualize.overlay_masks(_image(), **kwargs)


def test_overlay_rejects_float_image():
    with pytest.raises(ValueError, match="uint8"):
        visualize.overlay_masks(np.zeros((4, 4, 3), np.float32), np.zeros((0, 4, 4), bool))


def test_hstack_panels_layout_and_titles():
    a = _image(10, 8, 50)
    b = _image(6, 5, 200)
    out = visualize.hstack_panels([a, b], gap=2)
    assert out.shape == (10, 8 + 2 + 5, 3)
    np.testing.assert_array_equal(out[:10, :8], a)
    np.testing.assert_array_equal(out[:6, 10:15], b)
    assert (out[6:, 10:15] == 0).all()
    titled = visualize.hstack_panels([a, b], titles=["image", "pred"], gap=2)
    assert titled.shape == (24, 15, 3)
    np.testing.assert_array_equal(titled[14:, :8], a)
    assert titled[:14].any()  # title text was drawn
    with pytest.raises(ValueError, match="titles"):
        visualize.hstack_panels([a, b], titles=["one"])


def test_save_png_roundtrip(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    path = tmp_path / "sub" / "x.png"
    visualize.save_png(path, image)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
