r"""SAMEO on the procedural demo data: what amodal fine-tuning of the mask decoder buys.

  python benchmarks/demo_amodal_gain.py --workdir workdir_gain

Three trainings of the tiny demo model (configs/sameo.py:demo), then one table of amodal IoU
on the held-out split, prompted with the instances' visible (modal) boxes:

  1. modal:   everything trained from scratch on VISIBLE-mask targets (a modal segmenter).
  2. sameo:   starting from (1), only the mask decoder trains, on AMODAL targets, with the
              embedding cache (the frozen encoder runs once per image). The image encoder must
              come out bit-identical; the script checks it.
  3. amodal:  everything trained from scratch on amodal targets (the demo's main job).

Rows: the visible mask itself (the modal baseline: what a modal segmenter at best returns),
and each model's prediction (best of its 3 masks by predicted IoU), on all held-out instances
and on the occluded ones (occlusion rate >= config.eval_occluded_min). IoU is measured at the
model's low-res mask size. Workdirs are reused: a finished stage is only evaluated again.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs.sameo import get_config  # noqa: E402
from sameo_jax.checkpoint import load_params  # noqa: E402
from sameo_jax.training.loop import train_and_evaluate  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the three training runs.")
_MODAL_STEPS = flags.DEFINE_integer("modal_steps", 600, "Steps of stage 1 (modal targets).")
_SAMEO_STEPS = flags.DEFINE_integer("sameo_steps", 1500, "Steps of stage 2 (decoder only).")
_AMODAL_STEPS = flags.DEFINE_integer("amodal_steps", 600, "Steps of stage 3 (0: skip it).")
flags.mark_flag_as_required("workdir")

METRICS = ("amodal_iou", "amodal_iou_occluded", "visible_iou_occluded", "num_instances",
           "num_occluded")


def last_eval(workdir: pathlib.Path) -> dict[str, float]:
    """The last evaluation record of a run, keys without the 'eval/demo/' prefix."""
    result = {}
    for line in (workdir / "metrics.jsonl").open():
        record = json.loads(line)
        if "eval/demo/amodal_iou" in record:
            result = {k.removeprefix("eval/demo/"): v for k, v in record.items()}
    return result


def run_stage(workdir: pathlib.Path, steps: int, **overrides) -> tuple[dict[str, float], float]:
    config = get_config("demo")
    config.total_steps = steps
    config.eval_every = 0  # once, at the end
    for key, value in overrides.items():
        config[key] = value
    start = time.perf_counter()
    train_and_evaluate(config, workdir)
    return last_eval(workdir), time.perf_counter() - start


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    root = pathlib.Path(_WORKDIR.value)
    modal_dir, sameo_dir, amodal_dir = root / "modal", root / "sameo", root / "amodal"

    modal, t_modal = run_stage(modal_dir, _MODAL_STEPS.value, target="modal")
    sameo, t_sameo = run_stage(
        sameo_dir, _SAMEO_STEPS.value, target="amodal", init_checkpoint=str(modal_dir),
        trainable=("mask_decoder/",), cache_embeddings=True, warmup_steps=0,
    )
    rows = [("visible mask (modal baseline)", None), ("1. modal-trained model", modal),
            ("2. + decoder-only amodal fine-tune (SAMEO)", sameo)]
    if _AMODAL_STEPS.value > 0:
        amodal, _ = run_stage(amodal_dir, _AMODAL_STEPS.value, target="amodal")
        rows.append(("3. amodal-trained from scratch", amodal))

    before = load_params(modal_dir)["image_encoder"]
    after = load_params(sameo_dir)["image_encoder"]
    identical = all(
        np.asarray(a).tobytes() == np.asarray(b).tobytes()
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    )

    print(f"\nheld-out demo split: {int(sameo['num_instances'])} instances, "
          f"{int(sameo['num_occluded'])} occluded; prompts: visible boxes")
    print(f"{'predictor':45s} {'amodal IoU (all)':>17s} {'amodal IoU (occluded)':>22s}")
    for name, result in rows:
        if result is None:
            print(f"{name:45s} {'':>17s} {sameo['visible_iou_occluded']:22.3f}")
        else:
            print(f"{name:45s} {result['amodal_iou']:17.3f} {result['amodal_iou_occluded']:22.3f}")
    gain = sameo["amodal_iou_occluded"] - modal["amodal_iou_occluded"]
    print(f"\nSAMEO fine-tune gain on occluded instances: {gain:+.3f} amodal IoU")
    print(f"image encoder bit-identical after fine-tuning: {identical}")
    print(f"wall time: modal stage {t_modal:.0f} s, SAMEO stage {t_sameo:.0f} s (CPU)")
    if not identical:
        raise SystemExit("error: the image encoder changed during decoder-only fine-tuning")


if __name__ == "__main__":
    app.run(main)
