"""SAMEO losses against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sameo_jax import losses

LN2 = math.log(2.0)
# One 2x2 mask with a single foreground pixel.
TARGET = np.array([[True, False], [False, False]])


def test_dice_hand_values():
    # logits 0 -> p = 0.5 everywhere: inter 0.5, sum p 2, sum t 1 -> 1 - (1 + 1) / (3 + 1).
    assert float(losses.dice_loss(jnp.zeros((2, 2)), TARGET)) == pytest.approx(0.5)
    # Confident and right: p ~ t -> (2 * 1 + 1) / (1 + 1 + 1) = 1 -> loss ~ 0.
    perfect = jnp.where(TARGET, 30.0, -30.0)
    assert float(losses.dice_loss(perfect, TARGET)) == pytest.approx(0.0, abs=1e-6)
    # p = 0.75 on the target pixel, 0.25 elsewhere: inter .75, sum p 1.5, sum t 1.
    logits = jnp.where(TARGET, math.log(3.0), -math.log(3.0))
    want = 1.0 - (2 * 0.75 + 1) / (1.5 + 1 + 1)
    assert float(losses.dice_loss(logits, TARGET)) == pytest.approx(want, rel=1e-6)


def test_focal_hand_values():
    # logits 0: p_t = 0.5, (1 - p_t)^2 = 0.25, CE = ln 2 per pixel.
    no_alpha = losses.focal_loss(jnp.zeros((2, 2)), TARGET, alpha=None)
    assert float(no_alpha) == pytest.approx(0.25 * LN2, rel=1e-6)
    # alpha 0.25 weights the 1 positive pixel by .25 and the 3 negatives by .75, mean of 4.
    with_alpha = losses.focal_loss(jnp.zeros((2, 2)), TARGET, alpha=0.25)
    assert float(with_alpha) == pytest.approx((0.25 + 3 * 0.75) * 0.25 * LN2 / 4, rel=1e-6)
    # p = 0.75 on every pixel: positive pixel (1/4)^2 * ln(4/3), negatives (3/4)^2 * ln 4.
    logits = jnp.full((2, 2), math.log(3.0))
    want = (0.0625 * math.log(4 / 3) + 3 * 0.5625 * math.log(4)) / 4
    assert float(losses.focal_loss(logits, TARGET, alpha=None)) == pytest.approx(want, rel=1e-5)


def test_true_iou_thresholds_at_zero():
    # Logit exactly 0 counts as foreground (MASK_THRESHOLD = 0): all 4 predicted, 1 true.
    assert float(losses.mask_iou_of_logits(jnp.zeros((2, 2)), TARGET)) == pytest.approx(0.25)
    empty = jnp.full((2, 2), -1.0)
    assert float(losses.mask_iou_of_logits(empty, np.zeros((2, 2), bool))) == 1.0
    assert float(losses.mask_iou_of_logits(empty, TARGET)) == 0.0


def _batch():
    """B=1, N=2 (second instance is padding), K=3 candidates on 2x2 masks."""
    good = np.where(TARGET, 30.0, -30.0)  # dice ~0, focal ~0, IoU 1
    half = np.zeros((2, 2))  # dice .5, IoU .25
    wrong = np.where(TARGET, -30.0, 30.0)  # dice ~1, IoU 0
    logits = np.stack([np.stack([half, good, wrong]), np.stack([wrong, wrong, wrong])])[None]
    pred_iou = np.array([[[0.25, 0.5, 0.0], [9.0, 9.0, 9.0]]], np.float32)
    target = np.stack([TARGET, np.ones((2, 2), bool)])[None]
    valid = np.array([[True, False]])
    return jnp.asarray(logits, jnp.float32), jnp.asarray(pred_iou), target, valid


def test_min_loss_selection_and_iou_l1():
    logits, pred_iou, target, valid = _batch()
    out = losses.sameo_loss(logits, pred_iou, target, valid, mask_selection="min_loss")
    assert int(out.selected[0, 0]) == 1  # the near-perfect candidate
    assert float(out.dice) == pytest.approx(0.0, abs=1e-6)
    assert float(out.true_iou) == pytest.approx(1.0)
    # |.25 - .25| + |.5 - 1| + |0 - 0| over 3 candidates; the padding instance is ignored.
    assert float(out.iou_l1) == pytest.approx(0.5 / 3, rel=1e-6)
    assert float(out.total) == pytest.approx(float(out.focal) + 0.05 * 0.5 / 3, rel=1e-5)


def test_first_selection_trains_candidate_zero():
    logits, pred_iou, target, valid = _batch()
    out = losses.sameo_loss(
        logits, pred_iou, target, valid, mask_selection="first", focal_alpha=None
    )
    assert int(out.selected[0, 0]) == 0
    assert float(out.dice) == pytest.approx(0.5)
    assert float(out.focal) == pytest.approx(0.25 * LN2, rel=1e-6)
    assert float(out.true_iou) == pytest.approx(0.25)
    want = 0.5 + 0.25 * LN2 + 0.05 * 0.5 / 3
    assert float(out.total) == pytest.approx(want, rel=1e-6)


def test_single_selection_requires_one_candidate():
    logits, pred_iou, target, valid = _batch()
    with pytest.raises(ValueError, match="K=3"):
        losses.sameo_loss(logits, pred_iou, target, valid, mask_selection="single")
    out = losses.sameo_loss(
        logits[:, :, :1], pred_iou[:, :, :1], target, valid, mask_selection="single"
    )
    assert float(out.dice) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="mask_selection='best'"):
        losses.sameo_loss(logits, pred_iou, target, valid, mask_selection="best")


def test_padding_contributes_exactly_nothing():
    logits, pred_iou, target, valid = _batch()
    base = losses.sameo_loss(logits, pred_iou, target, valid)
    # Garbage (even NaN) in the padding instance changes neither the loss nor the gradient.
    junk_logits = logits.at[0, 1].set(jnp.nan)
    junk_iou = pred_iou.at[0, 1].set(jnp.nan)
    junk = losses.sameo_loss(junk_logits, junk_iou, target, valid)
    assert float(junk.total) == float(base.total)

    def total(lg, pi):
        return losses.sameo_loss(lg, pi, target, valid).total

    g_logits, g_iou = jax.grad(total, argnums=(0, 1))(logits, pred_iou)
    assert np.all(np.asarray(g_logits[0, 1]) == 0.0)
    assert np.all(np.asarray(g_iou[0, 1]) == 0.0)
    # The unselected candidates of a valid instance get no mask gradient either.
    assert np.all(np.asarray(g_logits[0, 0, 0]) == 0.0)
    assert np.any(np.asarray(g_logits[0, 0, 1]) != 0.0)
    # Nothing valid at all: loss 0, not NaN.
    none = losses.sameo_loss(logits, pred_iou, target, np.zeros_like(valid))
    assert float(none.total) == 0.0


def test_shape_errors_are_clear():
    logits, pred_iou, target, valid = _batch()
    with pytest.raises(ValueError, match="target"):
        losses.sameo_loss(logits, pred_iou, target[:, :, :1], valid)
