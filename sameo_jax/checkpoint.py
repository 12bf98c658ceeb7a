"""Official EfficientSAM checkpoints -> Flax params, and orbax save/restore.

Reads, without torch and without executing code from the file:
- the official `.pt` (a `torch.save` zip whose `data.pkl` holds `{"model": state_dict}`), also
  when it is wrapped in another zip (ViT-S ships as `efficient_sam_vits.pt.zip`);
- a plain `.npz` of the state_dict (official key names and PyTorch layouts);
- an orbax directory written by `save_params` or by training (`WORKDIR/checkpoints`).

Run `python -m sameo_jax.checkpoint INPUT OUTPUT_DIR [--variant vitt]` to convert once.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import pathlib
import pickle
import re
import zipfile
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from sameo_jax.models.config import VARIANTS, EfficientSamConfig, model_config
from sameo_jax.models.efficient_sam import param_shapes

PARAMS_ITEM = "params"
CONFIG_ITEM = "model_config"
# The items of a training checkpoint (sameo_jax/training/checkpointing.py).
_ARRAY_ITEMS = (PARAMS_ITEM, "opt_state", "train")
_JSON_ITEMS = (CONFIG_ITEM, "config", "data")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that asks for something other than tensors and plain containers."""


# ----------------------------------------------------------------------------- .pt reading

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        dtype = _STORAGE_DTYPES[name]
        if dtype == "bfloat16":
            import ml_dtypes

            dtype = ml_dtypes.bfloat16
        self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None,
                    metadata=None):
    itemsize = storage.dtype.itemsize
    if len(size) == 0:
        return storage[offset].copy()
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride))
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, hooks=None, *extra):
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Unpickler that builds numpy arrays for tensors and refuses every other global."""

    def __init__(self, data: bytes, read_record: Callable[[str], bytes], source: str):
        super().__init__(io.BytesIO(data))
        self._read_record = read_record
        self._source = source
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._source}: refusing to load '{module}.{name}' from the checkpoint; only "
                "tensors and plain containers are accepted (the file may be malicious or not a "
                "weights file)") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpointError(f"{self._source}: unexpected persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if key not in self._storages:
            raw = self._read_record(f"data/{key}")
            self._storages[key] = np.frombuffer(raw, dtype=storage_type.dtype.newbyteorder("<"))
        return self._storages[key]


def _open_torch_zip(data: bytes, source: str) -> dict[str, np.ndarray]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise CheckpointError(
            f"{source}: not a zip archive; only the torch.save zip format (torch >= 1.6) is "
            "supported") from None
    names = archive.namelist()
    pkl = [n for n in names if n.endswith("data.pkl")]
    if not pkl:
        inner = [n for n in names if n.endswith(".pt") or n.endswith(".pth")]
        if len(inner) == 1:  # ViT-S is distributed as a zip holding the .pt
            return _open_torch_zip(archive.read(inner[0]), f"{source}:{inner[0]}")
        raise CheckpointError(f"{source}: no data.pkl (and no single .pt) inside the archive")
    prefix = pkl[0][: -len("data.pkl")]
    byteorder = prefix + "byteorder"
    if byteorder in names and archive.read(byteorder).strip() != b"little":
        raise CheckpointError(f"{source}: big-endian checkpoints are not supported")
    unpickler = _TensorOnlyUnpickler(archive.read(pkl[0]),
                                     lambda rec: archive.read(prefix + rec), source)
    try:
        obj = unpickler.load()
    except CheckpointError:
        raise
    except Exception as exc:  # a truncated/corrupt pickle
        raise CheckpointError(f"{source}: corrupt checkpoint pickle ({exc})") from None
    return _state_dict_from(obj, source)


def _state_dict_from(obj: Any, source: str) -> dict[str, np.ndarray]:
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise CheckpointError(f"{source}: expected {{'model': state_dict}} or a state_dict")
    return dict(obj)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """An official `.pt` (or `.pt.zip`) or `.npz` checkpoint -> {torch key: numpy array}.

    Never executes code from the file.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except ValueError as exc:
            raise CheckpointError(f"{path}: cannot read .npz without pickles ({exc})") from None
    return _open_torch_zip(path.read_bytes(), str(path))


# ----------------------------------------------------------------------------- key mapping

_RENAMES = [
    (r"^image_encoder\.blocks\.(\d+)\.attn\.", r"image_encoder.blocks_\1."),
    (r"^image_encoder\.blocks\.(\d+)\.mlp\.", r"image_encoder.blocks_\1."),
    (r"^image_encoder\.blocks\.(\d+)\.", r"image_encoder.blocks_\1."),
    (r"^image_encoder\.patch_embed\.proj\.", "image_encoder.patch_embed."),
    (r"^image_encoder\.neck\.0\.", "image_encoder.neck_conv1."),
    (r"^image_encoder\.neck\.1\.", "image_encoder.neck_norm1."),
    (r"^image_encoder\.neck\.2\.", "image_encoder.neck_conv2."),
    (r"^image_encoder\.neck\.3\.", "image_encoder.neck_norm2."),
    (r"^prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$",
     "prompt_encoder.gaussian_matrix"),
    (r"^prompt_encoder\.(\w+)\.weight$", r"prompt_encoder.\1"),
    (r"^mask_decoder\.(iou_token|mask_tokens)\.weight$", r"mask_decoder.\1"),
    (r"\.layers\.(\d+)\.mlp\.", r".layers_\1.mlp."),
    (r"\.layers\.(\d+)\.", r".layers_\1."),
    (r"\.layers_(\d+)\.0\.", r".layers_\1."),
    (r"^mask_decoder\.final_output_upscaling_layers\.0\.0\.", "mask_decoder.upscale_conv1."),
    (r"^mask_decoder\.final_output_upscaling_layers\.0\.1\.", "mask_decoder.upscale_norm."),
    (r"^mask_decoder\.final_output_upscaling_layers\.1\.0\.", "mask_decoder.upscale_conv2."),
    (r"^mask_decoder\.output_hypernetworks_mlps\.(\d+)\.", r"mask_decoder.hypernet_\1."),
    (r"^mask_decoder\.iou_prediction_head\.", "mask_decoder.iou_head."),
]

_NORM_NAMES = re.compile(r"(^|\.)(norm\w*|neck_norm\d|upscale_norm)$")


def _flax_path(key: str) -> tuple[str, ...]:
    name = key
    for pattern, repl in _RENAMES:
        name = re.sub(pattern, repl, name)
    parts = name.split(".")
    if parts[-1] in ("weight", "bias"):
        module = ".".join(parts[:-1])
        if parts[-1] == "weight":
            parts[-1] = "scale" if _NORM_NAMES.search(module) else "kernel"
    return tuple(parts)


def _to_flax_layout(key: str, value: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    if path[-1] != "kernel":
        return value
    if value.ndim == 2:  # Linear (out, in) -> (in, out)
        return value.T
    if "upscale_conv" in path[-2]:  # ConvTranspose2d (in, out, kh, kw) -> (kh, kw, in, out)
        return value.transpose(2, 3, 0, 1)
    if path[-2] == "neck_conv1":  # 1x1 Conv2d (out, in, 1, 1) -> Dense (in, out)
        return value.reshape(value.shape[0], -1).T
    if value.ndim == 4:  # Conv2d (out, in, kh, kw) -> HWIO
        return value.transpose(2, 3, 1, 0)
    raise CheckpointError(f"{key}: unexpected kernel of shape {value.shape}")


def _flatten(tree: Any) -> dict[tuple[str, ...], Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): leaf for path, leaf in flat}


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = leaf
    return tree


def infer_variant(state_dict: dict[str, np.ndarray]) -> str | None:
    """'vitt' / 'vits' from the encoder width of an official state_dict, else None."""
    w = state_dict.get("image_encoder.patch_embed.proj.weight")
    if w is None:
        return None
    for name in ("vitt", "vits"):
        if model_config(name).encoder_width == w.shape[0]:
            return name
    return None


def convert_state_dict(state_dict: dict[str, np.ndarray], config: EfficientSamConfig,
                       source: str = "checkpoint", variant: str | None = None
                       ) -> dict[str, Any]:
    """Official state_dict -> Flax params of `config` (float32 numpy arrays).

    Raises CheckpointError naming the key for any missing, unexpected or mis-shaped entry.
    """
    found = infer_variant(state_dict)
    if variant is not None and found is not None and found != variant:
        raise CheckpointError(
            f"{source}: this is a {_pretty(found)} checkpoint, you asked for {_pretty(variant)}")
    expected = _flatten(param_shapes(config))
    params: dict[tuple[str, ...], np.ndarray] = {}
    unexpected = []
    for key, value in state_dict.items():
        path = _flax_path(key)
        if path not in expected:
            unexpected.append(key)
            continue
        value = _to_flax_layout(key, np.asarray(value), path)
        want = tuple(expected[path].shape)
        if value.shape != want:
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(state_dict[key].shape)}, which does not fit "
                f"the model (expected {want} after conversion)")
        params[path] = np.ascontiguousarray(value, dtype=np.float32)
    if unexpected:
        raise CheckpointError(f"{source}: unexpected keys {_first_few(unexpected)}")
    missing = [".".join(p) for p in expected if p not in params]
    if missing:
        raise CheckpointError(f"{source}: missing parameters {_first_few(missing)}")
    return _unflatten(params)


def _first_few(names: list[str], n: int = 5) -> str:
    return f"{names[:n]}" + (f" (+{len(names) - n} more)" if len(names) > n else "")


def _pretty(variant: str) -> str:
    return {"vitt": "ViT-T", "vits": "ViT-S"}.get(variant, variant)


# ----------------------------------------------------------------------------- orbax


def save_params(params: Any, directory: str | os.PathLike, config: EfficientSamConfig,
                step: int = 0) -> pathlib.Path:
    """Writes params + model config as an orbax checkpoint (the training layout).

    Refuses to write into an existing non-empty directory.
    """
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists and is not empty; choose a new directory")
    with ocp.CheckpointManager(directory) as manager:
        manager.save(step, args=ocp.args.Composite(**{
            PARAMS_ITEM: ocp.args.StandardSave(params),
            CONFIG_ITEM: ocp.args.JsonSave(config.to_dict()),
        }))
        manager.wait_until_finished()
    return directory


def _restore_orbax(directory: pathlib.Path) -> tuple[EfficientSamConfig | None, Any]:
    """The latest step's model config (None if not stored) and params (numpy), whatever mesh
    or number of processes wrote them: the stored arrays are read whole onto this process's
    first device (the saved shapes and dtypes are the restore target)."""
    import orbax.checkpoint as ocp

    # Every item a training step holds, so that orbax knows what it skips.
    handlers = {name: ocp.StandardCheckpointHandler() for name in _ARRAY_ITEMS}
    handlers.update({name: ocp.JsonCheckpointHandler() for name in _JSON_ITEMS})
    with ocp.CheckpointManager(directory, item_handlers=handlers) as manager:
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"{directory}: no checkpoint steps found in this directory")
        step_dir = pathlib.Path(manager.directory) / str(step)
        if not (step_dir / PARAMS_ITEM).is_dir():
            raise CheckpointError(f"{step_dir}: no '{PARAMS_ITEM}' item in this checkpoint")
        config = None
        if (step_dir / CONFIG_ITEM).exists():
            saved = manager.restore(step, args=ocp.args.Composite(
                **{CONFIG_ITEM: ocp.args.JsonRestore()}))[CONFIG_ITEM]
            if saved is not None:
                config = EfficientSamConfig.from_dict(dict(saved))
        metadata = manager.item_metadata(step)[PARAMS_ITEM]
        stored = getattr(metadata, "tree", metadata)
        if stored is None:
            raise CheckpointError(f"{step_dir}: the '{PARAMS_ITEM}' item has no metadata")
        # Nothing is read unless the stored shapes are the config's.
        if config is not None and _shapes(stored) != _shapes(param_shapes(config)):
            raise CheckpointError(f"{directory}: stored params do not match the stored model "
                                  "config")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), stored)
        restored = manager.restore(step, args=ocp.args.Composite(
            **{PARAMS_ITEM: ocp.args.StandardRestore(target)}))
    params = jax.tree_util.tree_map(np.asarray, restored[PARAMS_ITEM])
    return config, params


def _shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in _flatten(tree).items()}


def load_model(path: str | os.PathLike, variant: str | None = None
               ) -> tuple[EfficientSamConfig, dict[str, Any]]:
    """Any supported checkpoint -> (model config, params).

    `path`: official `.pt` / `.pt.zip` / `.npz` (variant inferred from the weights when not
    given; a mismatch is an error), or an orbax directory from `save_params` / training.
    """
    path = pathlib.Path(path)
    if variant is not None and variant not in VARIANTS:
        raise CheckpointError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    if path.is_dir():
        directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        config, params = _restore_orbax(directory.absolute())
        if config is None:
            if variant is None:
                raise CheckpointError(f"{path}: no model config stored; pass the variant")
            config = model_config(variant)
        elif variant is not None and config.structure() != model_config(variant).structure():
            raise CheckpointError(f"{path}: the stored model is not {_pretty(variant)}")
        if _shapes(params) != _shapes(param_shapes(config)):
            raise CheckpointError(f"{path}: stored params do not match the stored model config")
        return config, params
    state_dict = read_state_dict(path)
    found = infer_variant(state_dict)
    name = variant or found
    if name is None:
        raise CheckpointError(f"{path}: cannot tell the model variant; pass --variant")
    config = model_config(name)
    return config, convert_state_dict(state_dict, config, str(path), variant=variant)


def load_params(path: str | os.PathLike, variant: str | None = None) -> dict[str, Any]:
    """Params only; see `load_model`."""
    return load_model(path, variant)[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="official .pt / .pt.zip / .npz checkpoint")
    parser.add_argument("output", help="new directory for the orbax checkpoint")
    parser.add_argument("--variant", choices=("vitt", "vits"), default=None)
    args = parser.parse_args(argv)
    try:
        config, params = load_model(args.input, args.variant)
        out = save_params(params, args.output, config)
    except (CheckpointError, FileExistsError) as exc:
        raise SystemExit(f"error: {exc}") from None
    n = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(params))
    print(f"wrote {out} ({n:,} parameters)")


if __name__ == "__main__":
    main()
