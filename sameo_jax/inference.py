"""File-level inference used by predict.py: read an image and a prompts file, predict,
write arrays and an overlay picture; with a visible decoder also the visible masks, the
occlusion order and a picture of the depth layers."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from sameo_jax import masks as mask_lib
from sameo_jax import order as order_lib
from sameo_jax import preprocessing as pp
from sameo_jax.predictor import Prediction, Predictor


@dataclasses.dataclass(frozen=True)
class ScenePrediction(Prediction):
    """A `Prediction` (the amodal decoder's candidates) plus, for the best amodal candidate of
    each query, the visible decoder's best mask and the occlusion order of the queries."""

    amodal: np.ndarray  # [Q, H, W] bool, best amodal candidate by predicted IoU
    visible: np.ndarray  # [Q, H, W] bool
    visible_iou: np.ndarray  # [Q] float32
    order: order_lib.OcclusionOrder

    @property
    def hidden(self) -> np.ndarray:
        """[Q, H, W] bool: amodal minus visible."""
        return self.amodal & ~self.visible


def load_image(path: str | os.PathLike) -> np.ndarray:
    """An image file -> [H, W, 3] uint8 RGB. Raises ValueError naming the file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{path}: cannot read image ({exc})") from None


def _coords(value: Any, where: str, n: int | None = None) -> list[float]:
    if not isinstance(value, list | tuple) or (n is not None and len(value) != n):
        raise ValueError(f"{where}: expected a list of {n} numbers, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"{where}: {v!r} is not a finite number")
        out.append(float(v))
    return out


def parse_prompts(queries: Any, source: str = "prompts") -> tuple[np.ndarray, np.ndarray]:
    """A PROMPTS.json list -> points [Q, P, 2], labels [Q, P] int32 in original pixels.

    Each query is {"box": [x0, y0, x1, y1]}, {"points": [[x, y], ...], "labels": [...]} or
    both (the box first). Queries are padded to the same P with (-1, -1) / -1.
    """
    if not isinstance(queries, list):
        raise ValueError(f"{source}: expected a JSON list of queries, got {type(queries).__name__}")
    if not queries:
        raise ValueError(f"{source}: the prompt list is empty")
    per_query = []
    for q, query in enumerate(queries):
        where = f"{source}: query {q}"
        if not isinstance(query, dict) or not ({"box", "points"} & set(query)):
            raise ValueError(f"{where}: needs a 'box' and/or 'points' with 'labels'")
        unknown = set(query) - {"box", "points", "labels"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        pts, labs = [], []
        if "box" in query:
            x0, y0, x1, y1 = _coords(query["box"], f"{where} box", 4)
            if x1 < x0 or y1 < y0:
                raise ValueError(f"{where} box {query['box']}: need x0 <= x1 and y0 <= y1")
            pts += [[x0, y0], [x1, y1]]
            labs += [pp.BOX_TOP_LEFT_LABEL, pp.BOX_BOTTOM_RIGHT_LABEL]
        if "points" in query:
            points, labels = query["points"], query.get("labels")
            if not isinstance(points, list) or not points:
                raise ValueError(f"{where}: 'points' must be a non-empty list of [x, y]")
            if not isinstance(labels, list) or len(labels) != len(points):
                raise ValueError(f"{where}: 'labels' must list one label per point")
            for i, (p, lab) in enumerate(zip(points, labels, strict=True)):
                pts.append(_coords(p, f"{where} point {i}", 2))
                if isinstance(lab, bool) or lab not in pp.VALID_LABELS:
                    raise ValueError(f"{where} point {i}: label {lab!r} not in {{0, 1, 2, 3}} "
                                     "(0 negative, 1 positive, 2/3 box corners)")
                labs.append(int(lab))
        elif "labels" in query:
            raise ValueError(f"{where}: 'labels' without 'points'")
        per_query.append((pts, labs))
    width = max(len(p) for p, _ in per_query)
    points = np.full((len(per_query), width, 2), -1.0, np.float32)
    labels = np.full((len(per_query), width), pp.PADDING_LABEL, np.int32)
    for q, (pts, labs) in enumerate(per_query):
        points[q, : len(pts)] = pts
        labels[q, : len(labs)] = labs
    return points, labels


def read_prompts(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads and checks a PROMPTS.json file; see `parse_prompts`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: prompts file not found")
    try:
        queries = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    return parse_prompts(queries, str(path))


def prompt_boxes(points: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[Q, 4] box of each query for drawing: its box prompt, else the extent of its points."""
    boxes = np.zeros((len(points), 4), np.float32)
    for q in range(len(points)):
        tl = labels[q] == pp.BOX_TOP_LEFT_LABEL
        br = labels[q] == pp.BOX_BOTTOM_RIGHT_LABEL
        if tl.any() and br.any():
            boxes[q] = np.concatenate([points[q][tl][0], points[q][br][0]])
        else:
            p = points[q][labels[q] >= 0]
            boxes[q] = np.concatenate([p.min(0), p.max(0)])
    return boxes


def _check_new_file(path: str | os.PathLike | None, overwrite: bool) -> None:
    if path is not None and pathlib.Path(path).exists() and not overwrite:
        raise ValueError(f"{path} exists; pass --overwrite to replace it")


def predict_files(predictor: Predictor, image_path: str | os.PathLike,
                  prompts_path: str | os.PathLike, save_npz: str | os.PathLike | None = None,
                  overlay: str | os.PathLike | None = None, overwrite: bool = False,
                  layers: str | os.PathLike | None = None,
                  save_json: str | os.PathLike | None = None) -> Prediction:
    """Runs the predictor on one image file and one prompts file; optionally writes
    `save_npz` (low_res_logits [Q,3,L,L], iou [Q,3], masks [Q,3,H,W] bool,
    image_embeddings [D,E,E]) and `overlay` (best mask per query with its box and score).

    With a visible decoder the result is a `ScenePrediction`, the npz also holds
    visible_masks / hidden_masks [Q,H,W] bool, visible_iou [Q], order_matrix [Q,Q] int8 and
    layers [Q], and `layers` (a PNG of the depth layers) and `save_json` (the same per query,
    masks as COCO RLE) can be written; those two need the visible decoder.
    """
    for path in (save_npz, overlay, layers, save_json):
        _check_new_file(path, overwrite)
    if layers is not None:
        predictor.require_visible("--layers")
    if save_json is not None:
        predictor.require_visible("--save-json")
    image = load_image(image_path)
    points, labels = read_prompts(prompts_path)
    embedding = predictor.encode([image])
    predictor.set_image(image, embedding)
    out = predictor.predict(points=points, point_labels=labels, multimask=True)
    arrays = {}
    if predictor.has_visible:
        out = _with_visible(predictor, out, points, labels)
        arrays = dict(visible_masks=out.visible, hidden_masks=out.hidden,
                      visible_iou=out.visible_iou, order_matrix=out.order.matrix,
                      layers=out.order.layers)
    if save_npz is not None:
        np.savez_compressed(save_npz, low_res_logits=out.low_res_logits, iou=out.iou,
                            masks=out.masks,
                            image_embeddings=np.asarray(embedding[0]).transpose(2, 0, 1),
                            **arrays)
    if save_json is not None:
        _write_scene_json(save_json, out, image_path, prompt_boxes(points, labels))
    if layers is not None:
        from sameo_jax.visualize import draw_layers, save_png

        texts = [f"#{q} L{k}" for q, k in enumerate(out.order.layers)]
        save_png(layers, draw_layers(image, out.amodal, out.visible, out.order.layers, texts))
    if overlay is not None:
        from sameo_jax.visualize import overlay_masks, save_png

        best = np.argmax(out.iou, axis=1)
        masks = out.masks[np.arange(len(best)), best]
        texts = [f"#{q} iou {out.iou[q, b]:.2f}" for q, b in enumerate(best)]
        save_png(overlay, overlay_masks(image, masks, prompt_boxes(points, labels), texts))
    return out


def _with_visible(predictor: Predictor, out: Prediction, points: np.ndarray,
                  labels: np.ndarray) -> ScenePrediction:
    """Adds the visible decoder's best masks (same embedding, same prompts) and the order."""
    visible = predictor.predict(points=points, point_labels=labels, multimask=True,
                                best_only=True, decoder="visible")
    best = np.argmax(out.iou, axis=1)
    amodal = out.masks[np.arange(len(best)), best]
    vis = visible.masks[:, 0]
    return ScenePrediction(masks=out.masks, low_res_logits=out.low_res_logits, iou=out.iou,
                           amodal=amodal, visible=vis, visible_iou=visible.iou[:, 0],
                           order=order_lib.occlusion_order(vis, amodal))


def _write_scene_json(path: str | os.PathLike, out: ScenePrediction,
                      image_path: str | os.PathLike, boxes: np.ndarray) -> None:
    """Per query: box, best amodal / visible / hidden mask (COCO RLE), predicted IoUs, layer;
    and the order matrix (row i, column j: +1 i occludes j, -1 j occludes i, 0 neither)."""
    h, w = out.amodal.shape[1:]
    best = np.argmax(out.iou, axis=1)
    objects = [
        {
            "query": q,
            "box": [round(float(v), 2) for v in boxes[q]],
            "amodal": mask_lib.encode_rle(out.amodal[q]),
            "visible": mask_lib.encode_rle(out.visible[q]),
            "hidden": mask_lib.encode_rle(out.hidden[q]),
            "amodal_iou": round(float(out.iou[q, best[q]]), 5),
            "visible_iou": round(float(out.visible_iou[q]), 5),
            "layer": int(out.order.layers[q]),
        }
        for q in range(len(best))
    ]
    scene = {
        "image": os.fspath(image_path),
        "height": int(h),
        "width": int(w),
        "objects": objects,
        "order_matrix": out.order.matrix.tolist(),
        "order_convention": "order_matrix[i][j] = 1: i occludes j; -1: j occludes i; 0: neither",
    }
    pathlib.Path(path).write_text(json.dumps(scene))
