"""Model files in and out: official EfficientSAM checkpoints -> Flax params, orbax save/restore.

Reads, without torch and without executing code from the file:
- the official `.pt` (a `torch.save` zip whose `data.pkl` holds `{"model": state_dict}`), also
  when it is wrapped in another zip (ViT-S ships as `efficient_sam_vits.pt.zip`);
- a plain `.npz` of the state_dict (official key names and PyTorch layouts);
- an orbax directory written by `save_params` or by training (`WORKDIR/checkpoints`).

Run `python -m sameo_jax.model_io INPUT OUTPUT_DIR [--variant vitt]` to convert once.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import os
import pathlib
import re
import sys
import threading
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from sameo_jax.models.config import VARIANTS, EfficientSamConfig, model_config
from sameo_jax.models.efficient_sam import param_shapes
from sameo_jax.state_dict_file import CheckpointError as CheckpointError
from sameo_jax.state_dict_file import UnsafeCheckpointError as UnsafeCheckpointError
from sameo_jax.state_dict_file import open_state_dict, printable

PARAMS_ITEM = "params"
CONFIG_ITEM = "model_config"
# The training config's init_checkpoint that asks for random initial weights.
RANDOM_INIT = "random"
# The items of a training checkpoint (sameo_jax/training/checkpointing.py): arrays, JSON.
TRAIN_ARRAY_ITEMS = (PARAMS_ITEM, "opt_state", "train")
CHECKSUM_ITEM = "checksums"  # CRC-32s of a training step's arrays, checked on restore
TRAIN_JSON_ITEMS = (CONFIG_ITEM, "config", "data", CHECKSUM_ITEM)


def item_handlers() -> dict[str, Any]:
    """orbax handlers for every item of a training checkpoint (so that orbax knows the items
    a restore skips)."""
    import orbax.checkpoint as ocp

    handlers = {name: ocp.StandardCheckpointHandler() for name in TRAIN_ARRAY_ITEMS}
    handlers.update({name: ocp.JsonCheckpointHandler() for name in TRAIN_JSON_ITEMS})
    return handlers


# ----------------------------------------------------------------------------- reading


def read_state_dict(path: str | os.PathLike, variant: str | None = None
                    ) -> dict[str, np.ndarray]:
    """An official `.pt` (or `.pt.zip`) or `.npz` checkpoint -> {torch key: numpy array}.

    Never executes code from the file. Every tensor is checked against its storage and, when
    the variant is given or can be told from the file, against the model's shapes before its
    data is read (see sameo_jax.state_dict_file).
    """
    with open_state_dict(path) as file:
        name = _check_variant(file.tensors, variant, file.source)
        if name is not None:
            check_tensors(file.tensors, model_config(name), file.source)
        return file.read()


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


def infer_variant(state_dict: Mapping[str, Any]) -> str | None:
    """'vitt' / 'vits' from the encoder width of an official state_dict, else None.

    Values may be arrays or anything with a `.shape` (the tensors a file claims)."""
    w = state_dict.get("image_encoder.patch_embed.proj.weight")
    if w is None or len(w.shape) == 0:
        return None
    for name in ("vitt", "vits"):
        if model_config(name).encoder_width == w.shape[0]:
            return name
    return None


def _check_variant(state_dict: Mapping[str, Any], variant: str | None, source: str
                   ) -> str | None:
    """The asked variant, else the one the weights show; an error when they disagree."""
    if variant is not None and variant not in VARIANTS:
        raise CheckpointError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    found = infer_variant(state_dict)
    if variant is not None and found is not None and found != variant:
        raise CheckpointError(
            f"{source}: this is a {_pretty(found)} checkpoint, you asked for {_pretty(variant)}")
    return variant or found


def _converted_shape(key: str, shape: tuple[int, ...], path: tuple[str, ...],
                     want: tuple[int, ...]) -> tuple[int, ...] | None:
    """The Flax shape a torch shape becomes, without data; None when it cannot be `want`."""
    if math.prod(shape) != math.prod(want):  # first, so the layout sees a bounded shape
        return None
    try:
        return _to_flax_layout(key, np.broadcast_to(np.float32(0), shape), path).shape
    except CheckpointError:
        return None


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype.name == "bfloat16"


def check_tensors(tensors: Mapping[str, Any], config: EfficientSamConfig,
                  source: str = "checkpoint") -> None:
    """Checks the keys, shapes and dtypes of an official state_dict against `config`.

    `tensors` maps torch keys to arrays or to anything with `.shape` and `.dtype`, so a file's
    claims are checked before its data is read. Raises CheckpointError naming the key.
    """
    expected = _flatten(param_shapes(config))
    paths = {key: _flax_path(key) for key in tensors}
    unexpected = [printable(k) for k, path in paths.items() if path not in expected]
    if unexpected:
        raise CheckpointError(f"{source}: unexpected keys {_first_few(unexpected)}")
    for key, value in tensors.items():
        want = tuple(expected[paths[key]].shape)
        shape = tuple(value.shape)
        if not _is_float(np.dtype(value.dtype)):
            raise CheckpointError(
                f"{source}: {key} has dtype {value.dtype}; weights must be floating point")
        if _converted_shape(key, shape, paths[key], want) != want:
            raise CheckpointError(
                f"{source}: {key} has shape {shape}, which does not fit the model (expected "
                f"{want} after conversion)")
    found = set(paths.values())
    missing = [".".join(p) for p in expected if p not in found]
    if missing:
        raise CheckpointError(f"{source}: missing parameters {_first_few(missing)}")


def convert_state_dict(state_dict: Mapping[str, Any], config: EfficientSamConfig,
                       source: str = "checkpoint", variant: str | None = None
                       ) -> dict[str, Any]:
    """Official state_dict -> Flax params of `config` (float32 numpy arrays).

    Raises CheckpointError naming the key for any missing, unexpected, mis-shaped, non-float
    or non-finite entry.
    """
    _check_variant(state_dict, variant, source)
    arrays = {key: np.asarray(value) for key, value in state_dict.items()}
    check_tensors(arrays, config, source)
    params: dict[tuple[str, ...], np.ndarray] = {}
    for key, value in arrays.items():
        path = _flax_path(key)
        value = np.ascontiguousarray(_to_flax_layout(key, value, path), dtype=np.float32)
        if not np.isfinite(value).all():
            raise CheckpointError(f"{source}: {key} holds NaN or infinite values")
        params[path] = value
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


def array_checksums(items: Mapping[str, Any], to_host: Any = np.asarray) -> dict[str, str]:
    """{item/leaf path: CRC-32 (hex) of the leaf's dtype, shape and bytes}, in tree order
    (the `checksums` item of a training step)."""
    sums = {}
    for name, tree in items.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            value = np.ascontiguousarray(to_host(leaf))
            crc = zlib.crc32(f"{value.dtype.str}{value.shape}".encode())
            sums[name + jax.tree_util.keystr(path)] = f"{zlib.crc32(value, crc):08x}"
    return sums


def checksum_failure(got: Mapping[str, str], want: Mapping[str, str]) -> str | None:
    """None when two `array_checksums` results agree, else the reason naming the leaves."""
    bad = sorted(k for k in got.keys() | want.keys() if got.get(k) != want.get(k))
    if not bad:
        return None
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    return f"{bad[0]}{more} fail their checksums"


def _abandoned_read(exc: BaseException | None, obj: Any = None) -> bool:
    """Whether an error comes from a read orbax gave up on after another failed: its
    coroutine, or tensorstore's reply to an event loop that is closed by then."""
    return inspect.iscoroutine(obj) or (
        isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed")


def _drop_abandoned_tasks(record: logging.LogRecord) -> bool:
    """False for asyncio's report of a read task dropped with its exception unretrieved."""
    return not str(record.msg).startswith(("Task exception was never retrieved",
                                           "Future exception was never retrieved"))


def silence_abandoned_reads() -> Callable[[], None]:
    """Keeps the tracebacks of reads orbax abandons when a restore fails (they end later, in
    other threads) off stderr; every other error is printed as before. Install it before the
    read (an abandoned read may end while the failure is handled) and call what it returns
    after a read that succeeded, which puts the previous hooks back."""
    if getattr(sys.excepthook, "_sameo", False):
        return lambda: None
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

    def quiet_excepthook(kind, exc, tb):
        if not _abandoned_read(exc):
            excepthook(kind, exc, tb)

    def quiet_unraisablehook(u):
        if not _abandoned_read(u.exc_value, u.object):
            unraisablehook(u)

    thread_hook = threading.excepthook

    def quiet_thread_hook(args):
        if not _abandoned_read(args.exc_value):
            thread_hook(args)

    quiet_excepthook._sameo = True
    sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook
    threading.excepthook = quiet_thread_hook
    asyncio_logger = logging.getLogger("asyncio")  # logs tasks dropped with an exception
    asyncio_logger.addFilter(_drop_abandoned_tasks)

    def restore() -> None:
        if sys.excepthook is quiet_excepthook:
            sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
            threading.excepthook = thread_hook
            asyncio_logger.removeFilter(_drop_abandoned_tasks)

    return restore


def _restore_orbax(directory: pathlib.Path) -> tuple[EfficientSamConfig | None, Any]:
    """The newest undamaged step's model config (None if not stored) and params (numpy).

    A step whose files cannot be read or whose params fail the step's checksums is reported
    on stderr by step and path, and the next older step is tried.
    """
    import orbax.checkpoint as ocp

    unsilence = silence_abandoned_reads()
    with ocp.CheckpointManager(directory, item_handlers=item_handlers()) as manager:
        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"{directory}: no checkpoint steps found in this directory")
        damage = []
        for step in steps:
            step_dir = pathlib.Path(manager.directory) / str(step)
            try:
                restored = _restore_step(manager, step, step_dir, directory)
                if not damage:
                    unsilence()
                return restored
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - any read failure means a damaged step
                reason = printable(str(e) or type(e).__name__)[:200]
                damage.append(f"step {step} at {step_dir} ({reason})")
                if step != steps[-1]:
                    print(f"warning: checkpoint step {step} at {step_dir} is damaged "
                          f"({reason}); trying the step before it", file=sys.stderr)
        raise CheckpointError(f"{directory}: every checkpoint step is damaged; newest: "
                              f"{damage[0]}")


class _DamagedStep(Exception):
    """A step whose params fail their checksums."""


def _restore_step(manager: Any, step: int, step_dir: pathlib.Path, directory: pathlib.Path
                  ) -> tuple[EfficientSamConfig | None, Any]:
    """One step's model config and params, read whole onto this process's first device
    (whatever mesh or number of processes wrote them) and checked against its checksums."""
    import orbax.checkpoint as ocp

    if not (step_dir / PARAMS_ITEM).is_dir():
        raise CheckpointError(f"{step_dir}: no '{PARAMS_ITEM}' item in this checkpoint")

    def json_item(name: str) -> Any:
        if not (step_dir / name).exists():
            return None
        return manager.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.JsonRestore()}))[name]

    config = None
    saved = json_item(CONFIG_ITEM)
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
    checksums = json_item(CHECKSUM_ITEM)
    if checksums is not None:
        want = {k: v for k, v in dict(checksums.get("crc32") or {}).items()
                if k.startswith(PARAMS_ITEM + "[")}
        failure = checksum_failure(array_checksums({PARAMS_ITEM: params}), want)
        if failure:
            raise _DamagedStep(failure)
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
    state_dict = read_state_dict(path, variant)
    name = _check_variant(state_dict, variant, str(path))
    if name is None:
        raise CheckpointError(f"{path}: cannot tell the model variant; pass --variant")
    config = model_config(name)
    return config, convert_state_dict(state_dict, config, str(path), variant=variant)


def load_params(path: str | os.PathLike, variant: str | None = None) -> dict[str, Any]:
    """Params only; see `load_model`."""
    return load_model(path, variant)[1]


def _error(message: object) -> SystemExit:
    """The one line a failed command ends with."""
    return SystemExit("error: " + " ".join(str(message).split()))


def _remove_partial(out: pathlib.Path, created: bool) -> None:
    """Removes what a failed save wrote: `out` itself when it was new, else its new entries."""
    import shutil

    if created:
        shutil.rmtree(out, ignore_errors=True)
    elif out.is_dir():
        for child in out.iterdir():
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()


TRAINING_CONFIG_ITEM = "config"  # the training config a training step saves beside params


def training_init_checkpoint(path: str | os.PathLike) -> str | None:
    """The `init_checkpoint` a training workdir (or its `checkpoints` folder) started from,
    as its latest step's training config records it; None for files, for directories
    without a training config and for runs from random initialisation."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path)
    if not path.is_dir():
        return None
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    with ocp.CheckpointManager(directory.absolute()) as manager:
        step = manager.latest_step()
        if step is None or not (pathlib.Path(manager.directory) / str(step)
                                / TRAINING_CONFIG_ITEM).exists():
            return None
        restored = manager.restore(step, args=ocp.args.Composite(
            **{TRAINING_CONFIG_ITEM: ocp.args.JsonRestore()}))
    config = restored[TRAINING_CONFIG_ITEM]
    value = config.get("init_checkpoint") if isinstance(config, dict) else None
    return str(value) if isinstance(value, str) and value not in ("", RANDOM_INIT) else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="official .pt / .pt.zip / .npz checkpoint")
    parser.add_argument("output", help="new directory for the orbax checkpoint")
    parser.add_argument("--variant", choices=("vitt", "vits"), default=None)
    args = parser.parse_args(argv)
    out = pathlib.Path(args.output).absolute()
    if out.exists() and not out.is_dir():
        raise _error(f"{out} exists and is not a directory; choose a new directory")
    if out.is_dir() and any(out.iterdir()):
        raise _error(f"{out} exists and is not empty; choose a new directory")
    if not out.parent.is_dir():
        raise _error(f"{out.parent}: no such directory to create {out.name} in")
    try:
        config, params = load_model(args.input, args.variant)
    except CheckpointError as exc:
        raise _error(exc) from None
    created = not out.exists()
    try:
        save_params(params, out, config)
    except (OSError, ValueError, RuntimeError) as exc:
        _remove_partial(out, created)
        raise _error(f"{out}: cannot write the checkpoint ({exc})") from None
    n = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(params))
    print(f"wrote {out} ({n:,} parameters)")


if __name__ == "__main__":
    main()
