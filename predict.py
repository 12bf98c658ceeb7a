"""Amodal masks for box / point prompts on one image.

  python predict.py --checkpoint efficient_sam_vitt.pt --image photo.jpg \
      --prompts prompts.json --save-npz out.npz --overlay out.png

PROMPTS.json: [{"box": [x0, y0, x1, y1]}, {"points": [[x, y]], "labels": [1]}, ...] in
original pixel coordinates.
"""

from absl import app, flags

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
