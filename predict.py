"""Amodal masks for box / point prompts on one image.

  python predict.py --checkpoint efficient_sam_vitt.pt --image photo.jpg \
      --prompts prompts.json --save-npz out.npz --overlay out.png

PROMPTS.json: [{"box": [x0, y0, x1, y1]}, {"points": [[x, y]], "labels": [1]}, ...] in
original pixel coordinates.

Visible masks and occlusion order from the same image embedding, with the EfficientSAM
decoder a SAMEO workdir was fine-tuned from (found in the workdir, or --visible_checkpoint):

  python predict.py --checkpoint workdir_sameo --image photo.jpg --prompts prompts.json \
      --layers layers.png --save-json scene.json
"""

from absl import app, flags

from sameo_jax.checkpoint import CheckpointError
from sameo_jax.inference import ScenePrediction, predict_files
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
_VISIBLE_CHECKPOINT = flags.DEFINE_string(
    "visible_checkpoint", None,
    "Checkpoint whose decoder gives visible masks (default: the init_checkpoint a training "
    "workdir --checkpoint started from, when it exists).")
_LAYERS = flags.DEFINE_string(
    "layers", None, "Write a PNG of the objects coloured by depth layer (needs visible masks).")
_SAVE_JSON = flags.DEFINE_string(
    "save-json", None, "Write masks (RLE), layers and the order matrix as JSON (needs visible "
    "masks).")


def main(argv):
    del argv
    try:
        predictor = Predictor.from_checkpoint(
            _CHECKPOINT.value, _VARIANT.value,
            visible_checkpoint=_VISIBLE_CHECKPOINT.value or "auto")
        out = predict_files(predictor, _IMAGE.value, _PROMPTS.value, _SAVE_NPZ.value,
                            _OVERLAY.value, _OVERWRITE.value, layers=_LAYERS.value,
                            save_json=_SAVE_JSON.value)
    except (ValueError, CheckpointError) as exc:
        raise SystemExit(f"error: {exc}") from None
    for q in range(len(out.iou)):
        scores = ", ".join(f"{v:.3f}" for v in out.iou[q])
        print(f"query {q}: predicted IoU [{scores}], mask pixels "
              f"{[int(m.sum()) for m in out.masks[q]]}")
        if isinstance(out, ScenePrediction):
            print(f"  layer {out.order.layers[q]}: visible pixels {int(out.visible[q].sum())} "
                  f"(predicted IoU {out.visible_iou[q]:.3f}), hidden {int(out.hidden[q].sum())}")


if __name__ == "__main__":
    app.run(main)
