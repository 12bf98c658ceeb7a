"""File-level inference used by predict.py: read an image and a prompts file, predict,
write arrays and an overlay picture; with a visible decoder also the visible masks, the
occlusion order and a picture of the depth layers.

Outputs never replace a file without `overwrite` (numpy's implicit `.npz` suffix included),
never share one path or an input's path, and are written to a temporary file renamed into place,
so a failed run leaves no half-written file. A run whose outputs would exceed
`max_output_bytes` is refused before any work.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import pathlib
import secrets
from collections.abc import Callable, Sequence
from typing import IO, Any

import numpy as np
from PIL import Image

from sameo_jax import image_io
from sameo_jax import masks as mask_lib
from sameo_jax import order as order_lib
from sameo_jax import preprocessing as pp
from sameo_jax.predictor import Prediction, Predictor

DEFAULT_MAX_OUTPUT_GB = 4.0
MAX_PROMPTS_FILE_BYTES = 64 << 20  # about two million box queries
MAX_POINTS_PER_QUERY = 6  # the model's prompt length; a box counts as two points


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
    """An image file of any mode -> [H, W, 3] uint8 RGB (see `sameo_jax.image_io`).
    Raises ValueError naming the file."""
    return image_io.read_rgb(path)


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
            if len(points) > MAX_POINTS_PER_QUERY:
                raise ValueError(f"{where}: {len(points)} points; the model takes at most "
                                 f"{MAX_POINTS_PER_QUERY} (a box counts as 2)")
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
        if len(pts) > MAX_POINTS_PER_QUERY:
            raise ValueError(f"{where}: {len(pts)} points (a box counts as 2); the model takes "
                             f"at most {MAX_POINTS_PER_QUERY}")
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
    if path.stat().st_size > MAX_PROMPTS_FILE_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size / 2**20:.0f} MiB is more than a prompts "
                         f"file may hold ({MAX_PROMPTS_FILE_BYTES >> 20} MiB); split it")
    try:
        queries = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply for a prompts list") from None
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


def npz_path(path: str | os.PathLike) -> pathlib.Path:
    """The file `np.savez(path)` writes: numpy adds `.npz` when the name lacks it."""
    text = os.fspath(path)
    return pathlib.Path(text if text.endswith(".npz") else text + ".npz")


def plan_outputs(outputs: dict[str, str | os.PathLike | None], overwrite: bool,
                 inputs: Sequence[str | os.PathLike] = ()) -> dict[str, pathlib.Path]:
    """Checks output files before any work: {flag: path} -> {flag: path} of those given.

    Refuses an existing file without `overwrite`, a directory, a missing parent folder, two
    outputs with one path and an output that is one of `inputs`. Raises ValueError.
    """
    planned: dict[str, pathlib.Path] = {}
    seen: dict[str, str] = {os.path.realpath(p): "an input of this run" for p in inputs}
    for flag, path in outputs.items():
        if path is None:
            continue
        path = pathlib.Path(path)
        real = os.path.realpath(path)
        if real in seen:
            raise ValueError(f"{flag} {path} is {seen[real]}; choose another path")
        seen[real] = f"also the path of {flag}"
        if path.is_dir():
            raise ValueError(f"{flag} {path} is a directory")
        if not path.parent.is_dir():
            raise ValueError(f"{flag} {path}: folder {path.parent} does not exist")
        if (path.exists() or path.is_symlink()) and not overwrite:
            raise ValueError(f"{path} exists; pass --overwrite to replace it")
        planned[flag] = path
    return planned


def check_outputs(save_npz: str | os.PathLike | None, overlay: str | os.PathLike | None,
                  overwrite: bool, inputs: Sequence[str | os.PathLike], *,
                  layers: str | os.PathLike | None = None,
                  save_json: str | os.PathLike | None = None) -> dict[str, pathlib.Path]:
    """predict.py's outputs, checked by `plan_outputs` ('--save_npz' with numpy's suffix)."""
    return plan_outputs(
        {"--save_npz": None if save_npz is None else npz_path(save_npz), "--overlay": overlay,
         "--layers": layers, "--save_json": save_json},
        overwrite, inputs)


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None],
                 overwrite: bool = False) -> None:
    """Writes through `write(file)` to a temporary file next to `path`, then renames it.

    Without `overwrite` an existing `path` is never replaced, also one that appeared while
    writing. Raises ValueError naming the file; the temporary file is removed on failure.
    """
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except OSError as exc:
        raise ValueError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)


def _link_new(tmp: pathlib.Path, path: pathlib.Path) -> None:
    """Renames `tmp` to `path` only when `path` does not exist (a hard link fails if it does)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise ValueError(f"{path} exists; pass --overwrite to replace it") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        if path.exists():  # no hard links on this file system: check, then rename
            raise ValueError(f"{path} exists; pass --overwrite to replace it") from None
        os.replace(tmp, path)


def output_bytes(num_prompts: int, candidates: int, image_hw: tuple[int, int],
                 low_res_size: int, overlay: bool = False) -> dict[str, int]:
    """Host bytes of one run's outputs: masks [Q, K, H, W] bool, low-res logits
    [Q, K, L, L] float32, and the best mask per prompt when drawing an overlay."""
    pixels = image_hw[0] * image_hw[1]
    sizes = {"masks": num_prompts * candidates * pixels,
             "low-res logits": num_prompts * candidates * (low_res_size**2 + 1) * 4}
    if overlay:
        sizes["overlay masks"] = num_prompts * pixels
    return sizes


def check_output_size(num_prompts: int, candidates: int, image_hw: tuple[int, int],
                      low_res_size: int, overlay: bool, max_bytes: float) -> None:
    """Refuses, before any work, a run whose outputs alone would exceed `max_bytes`."""
    sizes = output_bytes(num_prompts, candidates, image_hw, low_res_size, overlay)
    total = sum(sizes.values())
    if total <= max_bytes:
        return
    parts = ", ".join(f"{name} {n / 1e9:.1f} GB" for name, n in sizes.items())
    fewer = " --best_only (1 candidate instead of 3)," if candidates > 1 else ""
    raise ValueError(
        f"{num_prompts} prompts x {candidates} candidates on a {image_hw[0]}x{image_hw[1]} "
        f"image need {total / 1e9:.1f} GB of outputs ({parts}), over the limit of "
        f"{max_bytes / 1e9:g} GB (--max_output_gb); lower it with{fewer} fewer prompts per "
        "run, or raise --max_output_gb")


def predict_files(predictor: Predictor, image_path: str | os.PathLike,
                  prompts_path: str | os.PathLike, save_npz: str | os.PathLike | None = None,
                  overlay: str | os.PathLike | None = None, overwrite: bool = False, *,
                  best_only: bool = False,
                  max_output_bytes: float = DEFAULT_MAX_OUTPUT_GB * 1e9,
                  inputs: Sequence[str | os.PathLike] = (),
                  layers: str | os.PathLike | None = None,
                  save_json: str | os.PathLike | None = None) -> Prediction:
    """Runs the predictor on one image file and one prompts file; optionally writes
    `save_npz` (low_res_logits [Q,K,L,L], iou [Q,K], masks [Q,K,H,W] bool,
    image_embeddings [D,E,E]; K = 3, or 1 with `best_only`) and `overlay` (PNG of the best
    mask per query with its box and score). `inputs`: more paths no output may replace (the
    checkpoint). Raises ValueError naming the file before any work where it can.

    With a visible decoder the result is a `ScenePrediction`, the npz also holds
    visible_masks / hidden_masks [Q,H,W] bool, visible_iou [Q], order_matrix [Q,Q] int8 and
    layers [Q], and `layers` (a PNG of the depth layers) and `save_json` (the same per query,
    masks as COCO RLE) can be written; those two need the visible decoder.
    """
    outputs = check_outputs(save_npz, overlay, overwrite, [image_path, prompts_path, *inputs],
                            layers=layers, save_json=save_json)
    if layers is not None:
        predictor.require_visible("--layers")
    if save_json is not None:
        predictor.require_visible("--save_json")
    image = load_image(image_path)
    points, labels = read_prompts(prompts_path)
    check_output_size(len(points), 1 if best_only else 3, image.shape[:2],
                      predictor.config.low_res_size, overlay is not None, max_output_bytes)
    embedding = predictor.encode([image])
    predictor.set_image(image, embedding)
    out = predictor.predict(points=points, point_labels=labels, multimask=True,
                            best_only=best_only)
    arrays = {}
    if predictor.has_visible:
        out = _with_visible(predictor, out, points, labels)
        arrays = dict(visible_masks=out.visible, hidden_masks=out.hidden,
                      visible_iou=out.visible_iou, order_matrix=out.order.matrix,
                      layers=out.order.layers)
    if "--save_npz" in outputs:
        arrays.update(low_res_logits=out.low_res_logits, iou=out.iou, masks=out.masks,
                      image_embeddings=np.asarray(embedding[0]).transpose(2, 0, 1))
        write_atomic(outputs["--save_npz"], lambda f: np.savez_compressed(f, **arrays),
                     overwrite)
    if "--save_json" in outputs:
        scene = _scene_json(out, image_path, prompt_boxes(points, labels))
        write_atomic(outputs["--save_json"], lambda f: f.write(scene.encode()), overwrite)
    if "--layers" in outputs:
        from sameo_jax.visualize import draw_layers

        texts = [f"#{q} L{k}" for q, k in enumerate(out.order.layers)]
        _write_png(outputs["--layers"],
                   draw_layers(image, out.amodal, out.visible, out.order.layers, texts), overwrite)
    if "--overlay" in outputs:
        from sameo_jax.visualize import overlay_masks

        best = np.argmax(out.iou, axis=1)
        masks = out.masks[np.arange(len(best)), best]
        texts = [f"#{q} iou {out.iou[q, b]:.2f}" for q, b in enumerate(best)]
        _write_png(outputs["--overlay"],
                   overlay_masks(image, masks, prompt_boxes(points, labels), texts), overwrite)
    return out


def _write_png(path: pathlib.Path, pixels: np.ndarray, overwrite: bool) -> None:
    picture = Image.fromarray(pixels)
    write_atomic(path, lambda f: picture.save(f, format="PNG"), overwrite)


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


def _scene_json(out: ScenePrediction, image_path: str | os.PathLike, boxes: np.ndarray) -> str:
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
    return json.dumps(scene)
