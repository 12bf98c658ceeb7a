"""Builds one data set into TFDS array_record (no TensorFlow needed).

  python -m datasets.build NAME --manual_dir M --data_dir D [--split S ...] [--max_images N]

NAME: cocoa, cocoa_cls, d2sa, kins[/update_2020], demo, amodal_lvis. Prints, per split, how
many images and instances were read, skipped (with reason), removed by each cleaning rule and
kept, and the name and folder to read the result from (`sameo_jax.data.sources.open_source`).

amodal_lvis only: `--workers N` synthesis processes (default: all cores; the result does not
depend on N); `--shard_size S` images per shard (default 256; occluders come from the same
shard, so S is part of the recipe); `--completeness_checkpoint CKPT [--completeness_iou T]`
judges complete objects with a model (any checkpoint predict.py reads; each worker loads its
own copy) instead of the geometric rules; `--beam_runner R [--beam_options "..."]` runs the
shards as an Apache Beam pipeline (optional: pip install apache-beam), e.g. on many hosts.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib
import io
import logging
import os
import pathlib
import shlex
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from datasets import cleaning

NAMES = ("cocoa", "cocoa_cls", "d2sa", "kins", "demo", "amodal_lvis")


def builder_class(name: str) -> type:
    """'kins/update_2020' -> the Builder class of datasets/kins."""
    base = name.split("/")[0]
    if base not in NAMES:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(NAMES)}")
    return importlib.import_module(f"datasets.{base}.{base}_dataset_builder").Builder


def parse_cleaning(overrides: Sequence[str]):
    """['min_visible_fraction=0.1', ...] -> cleaning config with those values."""
    cfg = cleaning.default_config()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in cfg:
            raise ValueError(f"--clean {item!r}: expected KEY=VALUE with KEY in {sorted(cfg)}")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        cfg[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    return cfg


@functools.lru_cache(maxsize=2)
def _loaded(path: str, variant: str | None) -> dict[str, Any]:
    """One predictor per checkpoint and process, with the image it last encoded."""
    from sameo_jax.predictor import Predictor

    return {"predictor": Predictor.from_checkpoint(path, variant), "image": None}


class CheckpointCompleteness:
    """`predict_amodal(image, box) -> [H, W] bool` of a checkpoint, for the model completeness
    rule: the best of the three multimask outputs by predicted IoU (as evaluation takes it).

    Picklable (only the path travels); each process loads the model at its first call and
    encodes each image once for all its boxes.
    """

    def __init__(self, path: str | os.PathLike, variant: str | None = None):
        self.path, self.variant = str(path), variant

    def check(self) -> None:
        """Loads the checkpoint once; raises CheckpointError (a ValueError) naming it."""
        from sameo_jax.model_io import load_model

        load_model(self.path, self.variant)

    def __call__(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        model = _loaded(self.path, self.variant)
        if image is not model["image"]:
            model["predictor"].set_image(image)
            model["image"] = image
        out = model["predictor"].predict(boxes=np.asarray(box, np.float32)[None],
                                         multimask=True, best_only=True)
        return out.masks[0, 0]


def synthesis_options(name: str, *, workers: int | None = None, shard_size: int | None = None,
                      completeness_checkpoint: str | None = None,
                      completeness_iou: float | None = None, beam: bool = False,
                      ) -> dict[str, Any]:
    """Builder arguments of the amodal_lvis-only options (an error for another data set)."""
    given = {"--workers": workers, "--shard_size": shard_size,
             "--completeness_checkpoint": completeness_checkpoint,
             "--completeness_iou": completeness_iou, "--beam_runner": beam or None}
    given = [flag for flag, value in given.items() if value is not None]
    if name.split("/")[0] != "amodal_lvis":
        if given:
            raise ValueError(f"{', '.join(given)}: only for amodal_lvis, not {name}")
        return {}
    from datasets.amodal_lvis import synthesis as amodal_lvis

    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if completeness_iou is not None and completeness_checkpoint is None:
        raise ValueError("--completeness_iou needs --completeness_checkpoint")
    overrides = {"shard_size": shard_size, "model_iou_threshold": completeness_iou}
    config = amodal_lvis.SynthesisConfig(**{k: v for k, v in overrides.items() if v is not None})
    predict = None
    if completeness_checkpoint is not None:
        predict = CheckpointCompleteness(completeness_checkpoint)
        predict.check()
    return dict(workers=workers, predict_amodal=predict, synthesis=config, beam=beam)


def beam_config(runner: str | None, options: str | None) -> dict[str, Any]:
    """DownloadConfig arguments for a Beam runner (apache-beam is imported only then)."""
    if runner is None:
        if options:
            raise ValueError("--beam_options needs --beam_runner")
        return {}
    try:
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        raise ValueError(f"--beam_runner {runner}: apache-beam is not installed "
                         "(pip install apache-beam)") from None
    return dict(beam_runner=runner, beam_options=PipelineOptions(shlex.split(options or "")))


def make_builder(name: str, data_dir: str, **kwargs):
    """The builder for NAME (optionally 'name/config') writing array_record under data_dir."""
    base, _, config = name.partition("/")
    return builder_class(base)(
        data_dir=data_dir, config=config or None, file_format="array_record", **kwargs
    )


def build(
    name: str,
    manual_dir: str | None,
    data_dir: str,
    *,
    splits: Sequence[str] | None = None,
    max_images: int | None = None,
    strict_sizes: bool = False,
    overwrite: bool = False,
    clean: Sequence[str] = (),
    workers: int | None = None,
    shard_size: int | None = None,
    completeness_checkpoint: str | None = None,
    completeness_iou: float | None = None,
    beam_runner: str | None = None,
    beam_options: str | None = None,
):
    """Builds NAME; returns the builder (its `.stats` hold the per-split summary).

    The build is written to a temporary folder inside `data_dir` and moved into place only when
    it succeeded, so a failed (re)build leaves an existing build as it was. workers,
    shard_size, completeness_* and beam_*: amodal_lvis only (see the module docstring).
    """
    beam = beam_config(beam_runner, beam_options)
    kwargs = dict(splits=splits, cleaning_cfg=parse_cleaning(clean), max_images=max_images,
                  strict_sizes=strict_sizes,
                  **synthesis_options(name, workers=workers, shard_size=shard_size,
                                      completeness_checkpoint=completeness_checkpoint,
                                      completeness_iou=completeness_iou, beam=bool(beam)))
    target = make_builder(name, data_dir, **kwargs)
    if manual_dir is None and target.SPLIT_FILES:
        raise ValueError(f"{name}: --manual_dir is required (the folder with the release files)")
    if manual_dir is not None:
        target.check_manual_files(manual_dir)
    out = pathlib.Path(target.data_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already built; pass --overwrite to rebuild it")
    pathlib.Path(data_dir).mkdir(parents=True, exist_ok=True)
    prefix = f".{name.replace('/', '_')}-building-"
    staging = pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir=data_dir))
    try:
        builder = make_builder(name, str(staging), **kwargs)
        # Nothing is downloaded (scratch keeps D clean); TFDS's lines would name the staging
        # folder, so they are not shown.
        with tempfile.TemporaryDirectory() as scratch, \
                contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(
                download_dir=scratch,
                download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, **beam),
            )
        swap_in(pathlib.Path(builder.data_dir), out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return builder


def swap_in(new: pathlib.Path, out: pathlib.Path) -> None:
    """Moves the finished build `new` to `out`; an existing `out` is set aside first and put
    back if the move fails, and deleted only after it succeeded."""
    out.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}-replaced-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(new, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old)


def summary(builder, data_dir: str) -> str:
    """Human-readable build summary (per split) and how to read the result."""
    full_name = builder.info.full_name  # name[/config]/version
    read_name = full_name.rsplit("/", 1)[0]
    lines = [f"== {full_name} =="]
    for split, stats in builder.stats.items():
        lines.append(f"[{split}]")
        lines += ["  " + line for line in stats.lines()]
    lines.append(f"TFDS name: {read_name} (data_dir {data_dir})")
    lines.append(
        f"read with: sameo_jax.data.sources.open_source({read_name!r}, split, {data_dir!r})"
    )
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A usage mistake is one `error:` line (exit status 2), like every other error."""
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return int(text)


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in (0, 1]")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="python -m datasets.build", description=__doc__.split("\n")[0])
    p.add_argument("name", help=f"one of {', '.join(NAMES)} (kins/update_2020 for KINS 2020)")
    p.add_argument("--manual_dir", help="folder with the downloaded release files")
    p.add_argument("--data_dir", required=True, help="TFDS data folder to write to")
    p.add_argument("--split", action="append", help="build only this split (repeatable)")
    p.add_argument("--max_images", type=_positive_int,
                   help="stop after this many images per split (>= 1)")
    p.add_argument("--strict_sizes", action="store_true",
                   help="fail when a split's image count differs from the full release")
    p.add_argument("--overwrite", action="store_true", help="replace an existing build")
    p.add_argument("--clean", action="append", default=[],
                   help="cleaning threshold override KEY=VALUE (repeatable)")
    p.add_argument("--workers", type=_positive_int,
                   help="amodal_lvis: synthesis processes (default: all cores)")
    p.add_argument("--shard_size", type=_positive_int,
                   help="amodal_lvis: images per shard, whose occluders come from the same "
                        "shard (default 256; part of the recipe, unlike --workers)")
    p.add_argument("--completeness_checkpoint",
                   help="amodal_lvis: judge complete objects with this model checkpoint")
    p.add_argument("--completeness_iou", type=_unit_float,
                   help="amodal_lvis: IoU(predicted amodal, modal mask) at or above which an "
                        "object is complete (default 0.9)")
    p.add_argument("--beam_runner",
                   help="amodal_lvis: run the shards with this Apache Beam runner")
    p.add_argument("--beam_options", help="amodal_lvis: Beam pipeline flags, one string")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    tfds.disable_progress_bar()
    try:
        builder = build(
            args.name, args.manual_dir, args.data_dir, splits=args.split,
            max_images=args.max_images, strict_sizes=args.strict_sizes,
            overwrite=args.overwrite, clean=args.clean, workers=args.workers,
            shard_size=args.shard_size,
            completeness_checkpoint=args.completeness_checkpoint,
            completeness_iou=args.completeness_iou, beam_runner=args.beam_runner,
            beam_options=args.beam_options,
        )
    except (ValueError, OSError) as e:  # bad release files, existing build, unwritable folder
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    print(summary(builder, args.data_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
