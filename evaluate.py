r"""Amodal COCO mask AP of SAMEO on an evaluation split.

Oracle GT boxes as prompts on the embedded demo split (no download):
  python evaluate.py --split demo --checkpoint workdir_demo --prompts gt_amodal
Any detector's COCO results as prompts:
  python evaluate.py --split cocoa_cls --checkpoint CKPT --data_dir DIR \
      --detections detector.json --json metrics.json
Score an existing segmentation results file, no model:
  python evaluate.py --split kins --data_dir DIR --results results.json
Occlusion order too (visible masks from the EfficientSAM decoder the workdir started from,
or from the results' `visible_segmentation`):
  python evaluate.py --split demo --checkpoint workdir_sameo --order

A model run writes two COCO results files to --out_dir: the detector score alone
(`*_det.json`) and the refined score det_score * predicted IoU (`*_refined.json`), and prints
AP for both. The work is done by `sameo_jax.evaluation.evaluator.evaluate`.

Several processes share the work when each runs the same command plus --distributed
--coordinator_address=HOST:PORT --num_processes=P --process_id=I (on TPU pods and SLURM,
--distributed alone); process 0 prints and writes the results of the whole split.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from sameo_jax import distributed
from sameo_jax.cli import parse_flags
from sameo_jax.evaluation import runner
from sameo_jax.evaluation.evaluator import SPLITS, EvalOptions, evaluate

_SPLIT = flags.DEFINE_enum("split", "demo", list(SPLITS), "Evaluation data set.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "Model checkpoint: official .pt/.npz or an orbax directory.")
_VARIANT = flags.DEFINE_string("variant", None, "Model variant (vitt, vits); else inferred.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the built data sets live.")
_DATA_SPLIT = flags.DEFINE_string("data_split", None,
                                  "Which split of the data set (default: its held-out split, "
                                  "e.g. validation; demo: test).")
_PROMPTS = flags.DEFINE_enum("prompts", None, list(runner.PROMPT_KINDS),
                             "GT boxes as prompts (gt_amodal when no --detections).")
_DETECTIONS = flags.DEFINE_string("detections", None,
                                  "Detector COCO results JSON (image_id, category_id, bbox "
                                  "xywh, score); its boxes become the prompts.")
_RESULTS = flags.DEFINE_string("results", None,
                               "Score this COCO segmentation results file; runs no model.")
_CANDIDATE = flags.DEFINE_enum("candidate", "best", list(runner.CANDIDATES),
                               "best: best of 3 masks by predicted IoU; single: 1-mask output.")
_CLASS_AGNOSTIC = flags.DEFINE_bool("class_agnostic", False,
                                    "Ignore categories (COCOeval useCats=0).")
_JSON = flags.DEFINE_string("json", None, "Write the metrics as JSON to this file.")
_VISUALIZE = flags.DEFINE_integer("visualize", 0, "Write pictures of this many images.")
_OUT_DIR = flags.DEFINE_string("out_dir", "eval_results", "Folder for results and pictures.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing output files.")
_MAX_IMAGES = flags.DEFINE_integer("max_images", None, "Evaluate only the first N images.")
_MAX_DETS = flags.DEFINE_integer("max_dets_per_image", 100,
                                 "Run at most this many detections per image (top scores).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images per encoder batch.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "One of several processes: start jax.distributed first.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "",
                                   "HOST:PORT of process 0 (empty: cluster auto-detection).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_ORDER = flags.DEFINE_bool("order", False,
                           "Also score pairwise occlusion order against the area and y-axis "
                           "baselines (needs visible masks).")
_VISIBLE_CHECKPOINT = flags.DEFINE_string(
    "visible_checkpoint", None,
    "With --order: the checkpoint whose decoder gives visible masks (default: the "
    "init_checkpoint the --checkpoint workdir was trained from).")


def options_from_flags() -> EvalOptions:
    """EvalOptions from the parsed command-line flags."""
    return EvalOptions(
        split=_SPLIT.value, checkpoint=_CHECKPOINT.value, variant=_VARIANT.value,
        data_dir=_DATA_DIR.value, data_split=_DATA_SPLIT.value,
        prompts=_PROMPTS.value, detections=_DETECTIONS.value,
        results=_RESULTS.value, candidate=_CANDIDATE.value,
        class_agnostic=_CLASS_AGNOSTIC.value, json=_JSON.value, visualize=_VISUALIZE.value,
        out_dir=_OUT_DIR.value, overwrite=_OVERWRITE.value, max_images=_MAX_IMAGES.value,
        max_dets_per_image=_MAX_DETS.value, batch_size=_BATCH_SIZE.value,
        order=_ORDER.value, visible_checkpoint=_VISIBLE_CHECKPOINT.value,
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep library INFO chatter off the console
    try:
        if _DISTRIBUTED.value:
            distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        evaluate(options_from_flags())
    except (ValueError, OSError) as exc:  # bad inputs, unreadable or existing files
        sys.exit("error: " + " ".join(str(exc).split()))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
