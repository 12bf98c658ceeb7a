"""Evaluation pictures: image | visible GT | amodal GT | prediction, side by side.

Hidden parts (amodal minus visible) are striped in the instance's colour over the occluder
and every amodal mask is outlined, so the amodal panels show what the visible panel cannot.
Small images are enlarged (pixel repetition) so that masks and labels can be read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sameo_jax import masks as mask_lib
from sameo_jax import visualize

MIN_PANEL_SIDE = 256  # smaller images are enlarged by a whole factor to at least this side
MAX_ENLARGE = 8


def enlarge_factor(height: int, width: int) -> int:
    """Whole factor that brings the shorter side to MIN_PANEL_SIDE (1 to MAX_ENLARGE)."""
    side = max(1, min(height, width))
    return int(min(MAX_ENLARGE, max(1, -(-MIN_PANEL_SIDE // side))))


def evaluation_panel(
    example: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    max_predictions: int = 20,
) -> np.ndarray:
    """One schema example and its segmentation results -> [H', W', 3] uint8 picture.

    Shows the image, the visible GT masks, the amodal GT masks (hidden parts striped), and
    the `max_predictions` highest-scoring predicted amodal masks labelled with their scores.
    A prediction from a GT prompt (`gt_instance`) takes its instance's colour, and its part
    outside that instance's visible mask is striped like the GT's hidden part.
    """
    image = np.asarray(example["image"], np.uint8)
    h, w = image.shape[:2]
    objects = example["objects"]
    visible = np.asarray(objects["visible_mask"], bool).reshape(-1, h, w)
    amodal = np.asarray(objects["amodal_mask"], bool).reshape(-1, h, w)
    ranked = sorted(range(len(results)), key=lambda i: -float(results[i]["score"]))
    top = [results[i] for i in sorted(ranked[:max_predictions])]
    if top:
        pred = np.stack([mask_lib.decode_segmentation(r["segmentation"], h, w) for r in top])
    else:
        pred = np.zeros((0, h, w), bool)
    instance = [int(r.get("gt_instance", -1)) for r in top]
    known = [0 <= k < len(visible) for k in instance]
    # Predictions without a GT instance get colours after the GT's, to match none of them.
    pred_colours = [k if ok else len(visible) + j
                    for j, (k, ok) in enumerate(zip(instance, known, strict=True))]
    pred_hidden = np.stack([p & ~visible[k] if ok else np.zeros_like(p)
                            for p, k, ok in zip(pred, instance, known, strict=True)]
                           ) if top else pred
    texts = [f"{float(r['score']):.2f}" for r in top]
    boxes = np.asarray(objects["amodal_bbox"], np.float32).reshape(-1, 4)

    f = enlarge_factor(h, w)
    image_f = visualize.upscale(image, f)
    visible_f, amodal_f, pred_f, pred_hidden_f = (
        visualize.upscale(m, f, axes=(1, 2)) for m in (visible, amodal, pred, pred_hidden))
    panels = [
        image_f,
        visualize.overlay_masks(image_f, visible_f),
        visualize.overlay_masks(image_f, amodal_f, boxes=boxes * f,
                                hidden=amodal_f & ~visible_f),
        visualize.overlay_masks(image_f, pred_f, texts=texts, hidden=pred_hidden_f,
                                colours=pred_colours),
    ]
    return visualize.hstack_panels(
        panels, titles=["image", "visible GT", "amodal GT (stripes: hidden)",
                        f"prediction ({len(top)}, score)"]
    )
