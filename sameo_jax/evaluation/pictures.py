"""Evaluation pictures: image | visible GT | amodal GT | prediction, side by side."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sameo_jax import masks as mask_lib
from sameo_jax import visualize


def evaluation_panel(
    example: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    max_predictions: int = 20,
) -> np.ndarray:
    """One schema example and its segmentation results -> [H', W', 3] uint8 picture.

    Shows the image, the visible GT masks, the amodal GT masks, and the `max_predictions`
    highest-scoring predicted amodal masks labelled with their scores. Predictions keep their
    results order, so with GT prompts instance i has the same colour in every panel.
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
    texts = [f"{float(r['score']):.2f}" for r in top]
    boxes = np.asarray(objects["amodal_bbox"], np.float32).reshape(-1, 4)
    panels = [
        image,
        visualize.overlay_masks(image, visible),
        visualize.overlay_masks(image, amodal, boxes=boxes),
        visualize.overlay_masks(image, pred, texts=texts),
    ]
    return visualize.hstack_panels(
        panels, titles=["image", "visible GT", "amodal GT", f"prediction ({len(top)})"]
    )
