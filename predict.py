r"""Amodal masks for box / point prompts on one image.

The checkpoint decides the model; --variant (vitt, vits, tiny) only checks it:
  official EfficientSAM weights   efficient_sam_vitt.pt, efficient_sam_vits.pt.zip, or a .npz
  a converted orbax directory     python -m sameo_jax.model_io efficient_sam_vitt.pt ckpt_vitt
  a training workdir              workdir_demo (the demo model: procedural scenes only)

Examples:
  python predict.py --checkpoint efficient_sam_vitt.pt --image photo.jpg \
      --prompts prompts.json --save_npz out.npz --overlay out.png
  python predict.py --checkpoint workdir_vitt --image photo.jpg --prompts prompts.json \
      --overlay out.png --overwrite

PROMPTS.json: [{"box": [x0, y0, x1, y1]}, {"points": [[x, y]], "labels": [1]}, ...] in
original pixel coordinates (labels: 1 positive, 0 negative point). Existing outputs are
replaced only with --overwrite; a run whose outputs would exceed --max_output_gb is refused
before any work.

Visible masks and occlusion order from the same image embedding, with the EfficientSAM
decoder a SAMEO workdir was fine-tuned from (found in the workdir, or --visible_checkpoint):

  python predict.py --checkpoint workdir_sameo --image photo.jpg --prompts prompts.json \
      --layers layers.png --save_json scene.json
"""

import jax
from absl import app, flags, logging

from sameo_jax.cli import parse_flags
from sameo_jax.inference import (
    DEFAULT_MAX_OUTPUT_GB,
    ScenePrediction,
    check_outputs,
    predict_files,
)
from sameo_jax.model_io import CheckpointError
from sameo_jax.predictor import Predictor

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Official .pt / .pt.zip / .npz, or an orbax directory.", required=True)
_VARIANT = flags.DEFINE_enum("variant", None, ["vitt", "vits", "tiny"],
                             "Model variant (inferred from the weights when not given).")
_IMAGE = flags.DEFINE_string("image", None, "Image file.", required=True)
_PROMPTS = flags.DEFINE_string("prompts", None, "PROMPTS.json.", required=True)
_SAVE_NPZ = flags.DEFINE_string("save_npz", None,
                                "Write arrays to this .npz ('.npz' is added when missing).")
_OVERLAY = flags.DEFINE_string("overlay", None, "Write a PNG with the best mask per query.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing output files.")
_VISIBLE_CHECKPOINT = flags.DEFINE_string(
    "visible_checkpoint", None,
    "Checkpoint whose decoder gives visible masks (default: the init_checkpoint a training "
    "workdir --checkpoint started from, when it exists).")
_LAYERS = flags.DEFINE_string(
    "layers", None, "Write a PNG of the objects coloured by depth layer (needs visible masks).")
_SAVE_JSON = flags.DEFINE_string(
    "save_json", None, "Write masks (RLE), layers and the order matrix as JSON (needs visible "
    "masks).")
_BEST_ONLY = flags.DEFINE_bool(
    "best_only", False, "Keep only the candidate with the highest predicted IoU (1 of 3).")
_MAX_OUTPUT_GB = flags.DEFINE_float(
    "max_output_gb", DEFAULT_MAX_OUTPUT_GB,
    "Refuse runs whose masks and logits would take more host memory than this.", lower_bound=0)


def _error(message: object) -> SystemExit:
    """The one line a failed run ends with."""
    return SystemExit("error: " + " ".join(str(message).split()))


def main(argv):
    if len(argv) > 1:
        raise _error(f"unexpected arguments {argv[1:]}; every input is a --flag")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep orbax's and JAX's INFO lines off
    inputs = [_IMAGE.value, _PROMPTS.value, _CHECKPOINT.value]
    try:
        check_outputs(_SAVE_NPZ.value, _OVERLAY.value, _OVERWRITE.value, inputs,
                      layers=_LAYERS.value, save_json=_SAVE_JSON.value)  # before loading
        predictor = Predictor.from_checkpoint(
            _CHECKPOINT.value, _VARIANT.value,
            visible_checkpoint=_VISIBLE_CHECKPOINT.value or "auto")
        out = predict_files(predictor, _IMAGE.value, _PROMPTS.value, _SAVE_NPZ.value,
                            _OVERLAY.value, _OVERWRITE.value, best_only=_BEST_ONLY.value,
                            max_output_bytes=_MAX_OUTPUT_GB.value * 1e9, inputs=inputs,
                            layers=_LAYERS.value, save_json=_SAVE_JSON.value)
    except (ValueError, CheckpointError) as exc:
        raise _error(exc) from None
    except (MemoryError, jax.errors.JaxRuntimeError) as exc:  # beyond what was checked
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _error(f"the run failed ({first}); with less memory, pass --best_only, fewer "
                     "prompts or a lower --max_output_gb") from None
    for q in range(len(out.iou)):
        scores = ", ".join(f"{v:.3f}" for v in out.iou[q])
        print(f"query {q}: predicted IoU [{scores}], mask pixels "
              f"{[int(m.sum()) for m in out.masks[q]]}")
        if isinstance(out, ScenePrediction):
            print(f"  layer {out.order.layers[q]}: visible pixels {int(out.visible[q].sum())} "
                  f"(predicted IoU {out.visible_iou[q]:.3f}), hidden {int(out.hidden[q].sum())}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
