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
    title_h = titled.shape[0] - 10
    assert titled.shape[1:] == (15, 3)
    assert visualize.MIN_FONT_SIZE <= title_h <= 2 * visualize.MIN_FONT_SIZE  # fits the text
    np.testing.assert_array_equal(titled[title_h:, :8], a)
    assert titled[:title_h].any()  # title text was drawn
    with pytest.raises(ValueError, match="titles"):
        visualize.hstack_panels([a, b], titles=["one"])


def test_save_png_roundtrip(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    path = tmp_path / "sub" / "x.png"
    visualize.save_png(path, image)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image)


def test_outline_and_hatching():
    mask = np.zeros((7, 7), bool)
    mask[1:6, 1:6] = True
    edge = visualize.outline(mask)
    assert edge.sum() == 16 and not edge[2:5, 2:5].any() and (edge <= mask).all()
    assert visualize.outline(mask, width=2).sum() == 24
    stripes = visualize.hatching(4, 4, period=4, thickness=1)
    np.testing.assert_array_equal(stripes[0], [True, False, False, False])
    np.testing.assert_array_equal(stripes[1], [False, False, False, True])


def test_overlay_stripes_hidden_parts_over_the_occluder():
    """An amodal mask reads as 'seen part + hidden part': the seen part is blended, the hidden
    part is painted in stripes of the instance's colour over what hides it, and the amodal
    mask is outlined; without `hidden` the same mask is one flat blend."""
    image = _image(64, 64, value=0)
    amodal = np.zeros((1, 64, 64), bool)
    amodal[0, 8:56, 8:56] = True
    hidden = np.zeros_like(amodal)
    hidden[0, 8:56, 32:56] = True
    out = visualize.overlay_masks(image, amodal, hidden=hidden, alpha=0.5)
    colour = visualize.PALETTE[0]
    blend = np.rint(0.5 * colour.astype(np.float32)).astype(np.uint8)
    np.testing.assert_array_equal(out[30, 20], blend)  # seen part: blended
    np.testing.assert_array_equal(out[8, 20], colour)  # outline
    stripes = visualize.hatching(64, 64, period=6, thickness=2)
    inner = hidden[0].copy()
    inner[:, 54:] = inner[54:, :] = inner[:10, :] = False  # away from the outline
    np.testing.assert_array_equal(out[inner & stripes], np.broadcast_to(colour, (
        int((inner & stripes).sum()), 3)))
    assert (out[inner & ~stripes] == 0).all()  # between stripes the occluder shows through
    flat = visualize.overlay_masks(image, amodal, alpha=0.5)
    assert (flat[amodal[0]] == blend).all()
    with pytest.raises(ValueError, match="hidden"):
        visualize.overlay_masks(image, amodal, hidden=np.zeros((2, 64, 64), bool))


def test_overlay_colours_and_labels_that_do_not_cover_each_other():
    image = _image(100, 100, value=0)
    masks = np.zeros((2, 100, 100), bool)
    masks[:, 10:60, 10:60] = True  # same top-left corner: the labels would coincide
    out = visualize.overlay_masks(image, masks[:1], alpha=1.0, colours=[3])
    np.testing.assert_array_equal(out[30, 30], visualize.PALETTE[3])
    labelled = visualize.overlay_masks(image, masks, texts=["0.91", "0.42"], alpha=0.0)
    dark = (labelled[:, 10:40] == 0).all(axis=(1, 2))  # label boxes are black rows
    rows = np.flatnonzero(~dark)
    # Two separate text rows: the second label was moved below the first.
    assert rows.size and (np.diff(rows) > 1).any()
    with pytest.raises(ValueError, match="colours"):
        visualize.overlay_masks(image, masks, colours=[1])


def test_label_font_grows_with_the_picture_and_upscale_keeps_masks_exact():
    assert visualize.label_font_size(20, 30) == visualize.MIN_FONT_SIZE
    assert visualize.label_font_size(720, 1280) == 40
    masks = np.zeros((2, 3, 4), bool)
    masks[1, 2, 3] = True
    big = visualize.upscale(masks, 3, axes=(1, 2))
    assert big.shape == (2, 9, 12) and big.sum() == 9 and big[1, 6:9, 9:12].all()
    assert visualize.upscale(_image(2, 3), 2).shape == (4, 6, 3)
    with pytest.raises(ValueError, match="factor"):
        visualize.upscale(masks, 0)
