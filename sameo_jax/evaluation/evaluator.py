"""One evaluation run, as evaluate.py performs it: read a split, run SAMEO (or read a results
file), write COCO results files, score them, print tables, write metrics JSON and pictures.

With several processes (jax.distributed), process p runs the model on examples p, p + P, ...
on its own devices; process 0 gathers the ground truth and results in the split's order, so
it scores, prints and writes exactly what one process would have.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax

from sameo_jax import distributed, visualize
from sameo_jax.evaluation import (
    coco_eval,
    coco_results,
    occlusion,
    order_accuracy,
    pictures,
    runner,
)

SPLITS = ("cocoa_cls", "d2sa", "kins", "cocoa", "demo")
# The held-out split each data set is scored on by default, as the data sources name it
# (KINS's "val"/"test" set is built as "validation"; COCOA also has a "test" split).
EVAL_SPLIT = {
    "cocoa_cls": "validation",
    "d2sa": "validation",
    "kins": "validation",
    "cocoa": "validation",
    "demo": "test",
}
# The procedural scenes the demo model trains on (configs/sameo.py:demo, data.demo_*): 128 px,
# objects 30-45% of the image side, occluded ones 30-70% hidden. A test keeps the two equal.
DEMO_SCENES = {"image_size": 128, "object_size": (0.3, 0.45), "occlusion_range": (0.3, 0.7)}


@dataclasses.dataclass
class EvalOptions:
    """Settings of one run (evaluate.py's flags of the same names)."""

    split: str = "demo"
    checkpoint: str | None = None
    variant: str | None = None
    data_dir: str | None = None
    data_split: str | None = None  # default EVAL_SPLIT[split]
    prompts: str | None = None  # gt_amodal | gt_modal; gt_amodal when nothing else is given
    detections: str | None = None
    results: str | None = None
    candidate: str = "best"
    class_agnostic: bool = False
    json: str | None = None
    visualize: int = 0
    out_dir: str = "eval_results"
    overwrite: bool = False
    max_images: int | None = None
    max_dets_per_image: int = 100
    batch_size: int = 8
    progress: bool = True
    order: bool = False  # pairwise occlusion-order accuracy (needs visible masks)
    visible_checkpoint: str | None = None  # visible decoder for --order ("auto" if None)


def check_options(o: EvalOptions) -> None:
    """Raises ValueError naming the first bad or conflicting setting."""
    if o.split not in SPLITS:
        raise ValueError(f"--split {o.split!r}: choose one of {', '.join(SPLITS)}")
    if o.results and (o.detections or o.prompts or o.checkpoint):
        raise ValueError("--results scores an existing file: do not combine it with "
                         "--checkpoint, --prompts or --detections")
    if o.detections and o.prompts:
        raise ValueError("give either --prompts (GT boxes) or --detections, not both")
    if o.prompts and o.prompts not in runner.PROMPT_KINDS:
        raise ValueError(f"--prompts {o.prompts!r}: choose one of {runner.PROMPT_KINDS}")
    if o.candidate not in runner.CANDIDATES:
        raise ValueError(f"--candidate {o.candidate!r}: choose one of {runner.CANDIDATES}")
    if o.max_images is not None and o.max_images < 1:
        raise ValueError(f"--max_images must be >= 1, got {o.max_images}")
    if o.max_dets_per_image < 1:
        raise ValueError(f"--max_dets_per_image must be >= 1, got {o.max_dets_per_image}")
    if o.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {o.batch_size}")
    if o.visualize < 0:
        raise ValueError(f"--visualize must be >= 0, got {o.visualize}")
    if o.visible_checkpoint and (o.results or not o.order):
        raise ValueError("--visible_checkpoint gives a model run's visible masks for --order; "
                         "use it with --order and without --results")


def run_tag(o: EvalOptions) -> str:
    """File-name stem of a run: split, prompt source, candidate (, agnostic)."""
    if o.results:
        return f"{o.split}_{os.path.splitext(os.path.basename(o.results))[0]}"
    if o.detections:
        source = "det-" + os.path.splitext(os.path.basename(o.detections))[0]
    else:
        source = o.prompts or "gt_amodal"
    agnostic = "_agnostic" if o.class_agnostic else ""
    return f"{o.split}_{source}_{o.candidate}{agnostic}"


def output_paths(o: EvalOptions) -> dict[str, str]:
    """Results files a model run writes: {'det': path, 'refined': path}."""
    tag = run_tag(o)
    return {k: os.path.join(o.out_dir, f"{tag}_{k}.json") for k in runner.SCORE_KINDS}


def open_split(o: EvalOptions):
    """The split's random-access source of schema examples; 'demo' without --data_dir is the
    procedural split rendered with DEMO_SCENES, the settings the demo model trains on."""
    from sameo_jax.data.sources import DEMO_SPLITS, open_source

    split = o.data_split or EVAL_SPLIT[o.split]
    if o.split == "demo" and o.data_dir is None:
        from sameo_jax.data.demo_scenes import DemoSource

        if split not in DEMO_SPLITS:
            raise ValueError(f"demo: unknown split {split!r}; known: {sorted(DEMO_SPLITS)}")
        seed, size = DEMO_SPLITS[split]
        return DemoSource(size, seed=seed, **DEMO_SCENES)
    return open_source(o.split, split, o.data_dir)


def score_results(coco_gt, results: list[dict[str, Any]], class_agnostic: bool
                  ) -> dict[str, Any]:
    """COCO metrics (AP ... AR100) plus the occlusion breakdown of one results list."""
    metrics: dict[str, Any] = coco_eval.coco_metrics(coco_gt, results, class_agnostic)
    metrics["occlusion"] = occlusion.occlusion_breakdown(coco_gt, results, class_agnostic)
    metrics["num_results"] = len(results)
    return metrics


def format_tables(scores: Mapping[str, Mapping[str, Any]]) -> str:
    """Metrics in the paper's table form (percent): COCO AP/AR per score, then occlusion."""
    names = coco_eval.METRIC_NAMES

    def pct(v):
        return "-" if v is None or v < 0 else f"{100 * v:.1f}"

    width = max(8, *(len(k) for k in scores))
    lines = [f"{'score':<{width}}" + "".join(f"{n:>7}" for n in names)]
    for kind, m in scores.items():
        lines.append(f"{kind:<{width}}" + "".join(f"{pct(m[n]):>7}" for n in names))
    lines.append("")
    head = ("n", "AP", "AP50", "mIoU", "invIoU")
    lines.append(f"{'score':<{width}}{'occlusion':>10}" + "".join(f"{h:>7}" for h in head))
    for kind, m in scores.items():
        for level, row in m["occlusion"].items():
            vals = [row.get("AP"), row.get("AP50"), row["mIoU"], row["invisible_mIoU"]]
            lines.append(f"{kind:<{width}}{level:>10}{row['num_instances']:>7}"
                         + "".join(f"{pct(v):>7}" for v in vals))
    return "\n".join(lines)


def format_order(order: Mapping[str, Any]) -> str:
    """The order accuracy as a table (percent): model and baselines, all pairs and per level."""
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    names = ("model", *order_accuracy.BASELINES)
    lines = ["occlusion order (pairs of overlapping GT instances; accuracy %)",
             f"{'pairs':<10}{'n':>7}" + "".join(f"{k:>8}" for k in names)]
    for name, row in [("all", order), *order["levels"].items()]:
        values = [row["accuracy"], *(row["baselines"][k] for k in order_accuracy.BASELINES)]
        lines.append(f"{name:<10}{row['pairs']:>7}" + "".join(f"{pct(v):>8}" for v in values))
    notes = [f"{order['unanswered']} pairs without two distinct paired predictions",
             f"{order['overlapping_without_order']} overlapping pairs without a GT order"]
    if order["results_without_visible"]:
        notes.append(f"{order['results_without_visible']} results without "
                     "visible_segmentation (not used)")
    if order["release_order"] is not None:
        r = order["release_order"]
        notes.append(f"the release's depth ranks agree with the GT masks on "
                     f"{pct(r['agreement'])}% of {r['pairs']} pairs")
    return "\n".join(lines + notes)


def evaluate(o: EvalOptions, predictor=None, source=None) -> dict[str, Any]:
    """Runs one evaluation; returns the summary that --json writes.

    Args:
      o: the settings.
      predictor: a `sameo_jax.predictor.Predictor` to use instead of loading --checkpoint.
      source: a random-access source of schema examples to use instead of --split's data.

    Raises ValueError / FileExistsError / FileNotFoundError with a one-line message on bad
    settings or inputs, before any model work where that can be known. With several processes,
    every one calls it; process 0 returns the summary, the others an empty dict.
    """
    check_options(o)
    if o.results is None and predictor is None and not o.checkpoint:
        raise ValueError("--checkpoint is required to run the model (or give --results FILE)")
    paths = {} if o.results else output_paths(o)
    for path in paths.values():
        coco_results.check_writable(path, o.overwrite)
    if o.json:
        coco_results.check_writable(o.json, o.overwrite)
    if source is None:
        source = open_split(o)
    n = len(source) if o.max_images is None else min(len(source), o.max_images)
    if n == 0:
        raise ValueError(f"split {o.split!r} has no examples")
    gt = coco_eval.GroundTruthBuilder(class_agnostic=o.class_agnostic)
    reports: dict[str, coco_results.EntryReport] = {}

    primary = distributed.is_primary()
    if o.results and not primary:
        return {}  # scoring a file is process 0's alone
    if o.results:
        for i in range(n):
            gt.add(source[i])
        entries = coco_results.read_json_list(o.results)
        clean, reports["results"] = coco_results.parse_results(
            entries, o.results, gt.image_sizes,
            unknown_image=("an image outside --max_images" if n < len(source)
                           else "an unknown image_id"),
        )
        if o.order and not any("visible_segmentation" in r for r in clean):
            raise ValueError(f"{o.results}: --order needs the visible masks: no usable entry "
                             "carries a 'visible_segmentation' (RLE) beside 'segmentation'")
        all_results = {"results": clean}
    else:
        detections = None
        if o.detections:
            detections = runner.DetectionPrompts(o.detections, o.max_dets_per_image,
                                                 limited=n < len(source))
            prompts_for = detections
        else:
            kind = o.prompts or "gt_amodal"
            prompts_for = lambda ex: runner.gt_prompts(ex, kind, o.class_agnostic)
        if predictor is None:
            from sameo_jax.predictor import Predictor

            visible = (o.visible_checkpoint or "auto") if o.order else None
            predictor = Predictor.from_checkpoint(o.checkpoint, o.variant,
                                                  visible_checkpoint=visible,
                                                  devices=jax.local_devices())
        if o.order:
            predictor.require_visible("--order")
        count = jax.process_count()
        all_results = runner.run_split(
            predictor, source, range(jax.process_index(), n, count), prompts_for,
            candidate=o.candidate, batch_size=o.batch_size, on_example=gt.add,
            progress=o.progress and primary, with_visible=o.order,
        )
        if count > 1:
            gt, all_results = _gather(gt, all_results, detections, n)
            if not primary:
                return {}
        if detections is not None:
            reports["detections"] = detections.finish()
            _warn_unknown_categories(o, detections, gt)
        for kind, path in paths.items():
            coco_results.write_json(path, all_results[kind], overwrite=o.overwrite)
            print(f"wrote {path} ({len(all_results[kind])} results)")

    for report in reports.values():
        print(report.summary())
    coco_gt = gt.build()
    agnostic = o.class_agnostic
    if not agnostic and not gt.has_classes:
        print(f"{o.split}: the ground truth has no classes; scoring class-agnostic")
        agnostic = True
    scores = {k: score_results(coco_gt, rs, agnostic) for k, rs in all_results.items()}
    summary = {
        "split": o.split,
        "data_split": o.data_split or EVAL_SPLIT[o.split],
        "prompts": None if o.results else (o.detections or o.prompts or "gt_amodal"),
        "candidate": None if o.results else o.candidate,
        "class_agnostic": agnostic,
        "num_images": n,
        "num_instances": len(coco_gt.getAnnIds()),
        "gt_instances_skipped_empty": gt.num_empty_skipped,
        "results_files": paths or {"results": o.results},
        "inputs": {k: r.as_dict() for k, r in reports.items()},
        "scores": scores,
    }
    print(format_tables(scores))
    if o.order:
        # The score kinds share their masks: one order evaluation serves all of them.
        results = next(iter(all_results.values()))
        summary["order"] = order_accuracy.order_accuracy(coco_gt, results, agnostic)
        print(format_order(summary["order"]))
    if o.json:
        coco_results.write_json(o.json, summary, overwrite=o.overwrite)
        print(f"wrote {o.json}")
    if o.visualize:
        write_pictures(o, source, min(o.visualize, n), all_results)
    return summary


def _gather(gt: coco_eval.GroundTruthBuilder, results: dict[str, list[dict[str, Any]]],
            detections: runner.DetectionPrompts | None, n: int
            ) -> tuple[coco_eval.GroundTruthBuilder, dict[str, list[dict[str, Any]]]]:
    """Every process's share -> on process 0, the ground truth and results of all n examples
    in the split's order (example i was process i % P's (i // P)-th); elsewhere the inputs.

    A collective: every process calls it once.
    """
    share = {"images": gt.images, "annotations": gt.annotations, "results": results,
             "empty": gt.num_empty_skipped, "has_classes": gt.has_classes,
             "detections": detections.share() if detections is not None else None}
    parts = distributed.allgather_objects(share)
    if not distributed.is_primary():
        return gt, results

    def by_image(items: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
        grouped: dict[int, list[dict[str, Any]]] = {}
        for item in items:
            grouped.setdefault(int(item["image_id"]), []).append(item)
        return grouped

    annotations = [by_image(p["annotations"]) for p in parts]
    predictions = [{k: by_image(rs) for k, rs in p["results"].items()} for p in parts]
    merged = coco_eval.GroundTruthBuilder(class_agnostic=gt.class_agnostic)
    merged_results: dict[str, list[dict[str, Any]]] = {k: [] for k in results}
    for i in range(n):
        p = i % len(parts)
        image = parts[p]["images"][i // len(parts)]
        if image["id"] in merged.image_sizes:
            raise ValueError(f"duplicate image_id {image['id']} in the evaluated examples")
        merged.images.append(image)
        merged.image_sizes[image["id"]] = (image["height"], image["width"])
        for a in annotations[p].get(image["id"], []):
            merged.annotations.append({**a, "id": len(merged.annotations) + 1})
        for kind in merged_results:
            merged_results[kind].extend(predictions[p][kind].get(image["id"], []))
    merged.num_empty_skipped = sum(p["empty"] for p in parts)
    merged.has_classes = any(p["has_classes"] for p in parts)
    if detections is not None:
        others = parts[1:]
        detections.merge([p["detections"] for p in others],
                         [im["id"] for p in others for im in p["images"]])
    return merged, merged_results


def _warn_unknown_categories(o: EvalOptions, detections: runner.DetectionPrompts,
                             gt: coco_eval.GroundTruthBuilder) -> None:
    if o.class_agnostic or not gt.has_classes:
        return
    known = set(gt.category_ids())
    other = sum(1 for d in detections.detections if d.category_id not in known)
    if other:
        print(f"{o.detections}: {other} detections have category ids absent from the ground "
              "truth; COCOeval ignores them (--class_agnostic pools categories)")


def write_pictures(o: EvalOptions, source, count: int,
                   all_results: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    """PNG pictures (image | visible GT | amodal GT | prediction) of the first `count`
    examples, in OUT_DIR/<run tag>_pictures/<image_id>.png; returns the paths."""
    kind = "refined" if "refined" in all_results else next(iter(all_results))
    by_image: dict[int, list[dict[str, Any]]] = {}
    for r in all_results[kind]:
        by_image.setdefault(int(r["image_id"]), []).append(r)
    folder = os.path.join(o.out_dir, f"{run_tag(o)}_pictures")
    written = []
    for i in range(count):
        example = source[i]
        image_id = int(example["image_id"])
        path = os.path.join(folder, f"{image_id}.png")
        coco_results.check_writable(path, o.overwrite)
        visualize.save_png(path, pictures.evaluation_panel(example, by_image.get(image_id, [])))
        written.append(path)
    print(f"wrote {len(written)} pictures to {folder}")
    return written
