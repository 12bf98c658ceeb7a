r"""Amodal masks for box / point prompts on one image.

The checkpoint decides the model; --variant (vitt, vits, tiny) only checks it:
  official EfficientSAM weights   efficient_sam_vitt.pt, efficient_sam_vits.pt.zip, or a .npz
  a converted orbax directory     python -m sameo_jax.checkpoint efficient_sam_vitt.pt ckpt_vitt
  a training workdir              workdir_demo (the demo model: procedural scenes only)

Examples:
  python predict.py --checkpoint efficient_sam_vitt.pt --image photo.jpg \
      --prompts prompts.json --save-npz out.npz --overlay out.png
  python predict.py --checkpoint workdir_vitt --image photo.jpg --prompts prompts.json \
      --overlay out.png --overwrite

PROMPTS.json: [{"box": [x0, y0, x1, y1]}, {"points": [[x, y]], "labels": [1]}, ...] in
original pixel coordinates (labels: 1 positive, 0 negative point).
"""

from absl import app, flags, logging

from sameo_jax.checkpoint import CheckpointError
from sameo_jax.inference import predict_files
from sameo_jax.predictor import Predictor

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Official .pt / .pt.zip / .npz, or an orbax directory.", required=True)
_VARIANT = flags.DEFINE_enum("variant", None, ["vitt", "vits", "tiny"],
                             "Model variant (inferred from the weights when not given).")
_IMAGE = flags.DEFINE_string("image", None, "Image file.", required=True)
_PROMPTS = flags.DEFINE_string("prompts", None, "PROMPTS.json.", required=True)
_SAVE_NPZ = flags.DEFINE_string("save-npz", None, "Write arrays to this .npz.")
_OVERLAY = flags.DEFINE_string("overlay", None, "Write a PNG with the best mask per query.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing output files.")


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep orbax's and JAX's INFO lines off
    try:
        predictor = Predictor.from_checkpoint(_CHECKPOINT.value, _VARIANT.value)
        out = predict_files(predictor, _IMAGE.value, _PROMPTS.value, _SAVE_NPZ.value,
                            _OVERLAY.value, _OVERWRITE.value)
    except (ValueError, CheckpointError) as exc:
        raise SystemExit(f"error: {exc}") from None
    for q in range(len(out.iou)):
        scores = ", ".join(f"{v:.3f}" for v in out.iou[q])
        print(f"query {q}: predicted IoU [{scores}], mask pixels "
              f"{[int(m.sum()) for m in out.masks[q]]}")


if __name__ == "__main__":
    app.run(main)
