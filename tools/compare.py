"""Side-by-side speed of two (or more) revisions of sameo-jax on this machine.

    python tools/compare.py REV_A REV_B [--rows decoder_boxes_16 train_step_cached]
                                 [--rounds 12] [--variant vitt] [--default-malloc N ...]
                                 [--set N FIELD=VALUE ...]

A revision is a git revision (`HEAD`, `HEAD~3`, a commit) or `.` for the working tree. Each
revision's `sameo_jax` (and `configs/`) is extracted with `git archive` and imported by its
own worker process; the parent then times the rows round by round, alternating between the
workers, so a change in the machine's speed hits every revision alike. It prints, per row and
revision, the minimum and median over the rounds and the ratio of minima to the first
revision, and the largest difference between the revisions' outputs (0 or rounding for a
change that only reorders arithmetic). Weights and inputs are random and the same for all.
Workers run under ./cpu.sh (malloc keeps freed memory, as for a CPU training run), except
those named by `--default-malloc` (positions from 1):
`compare.py . . --default-malloc 2` times the settings themselves. `--set N FIELD=VALUE`
gives the N-th revision's model a config field of its own (repeatable), so one revision can
be timed against itself with another setting:
`compare.py HEAD HEAD --set 2 encoder_attention_chunk=1024 --rows encoder`.

Rows: `decoder_boxes_N` (prompt encoder + mask decoder, N boxes, one image),
`encoder` (the image encoder on one image), `train_step_cached` (decoder-only SAMEO step,
2 images x 4 boxes, cached embeddings).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_ROWS = ("decoder_boxes_16", "train_step_cached")


def extract(rev: str, dest: pathlib.Path) -> pathlib.Path:
    """The tree whose `sameo_jax` and `configs` a worker imports: the working tree for '.',
    else `rev`'s files extracted into `dest`."""
    if rev == ".":
        return REPO
    dest.mkdir(parents=True)
    archive = dest / "src.tar"
    done = subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(archive), rev,
                           "sameo_jax", "configs"], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"compare.py: cannot read revision {rev!r} from git: "
                         f"{done.stderr.strip()}")
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest


# ----------------------------------------------------------------------------- worker side
def _import_tree(root: str):
    """Import `sameo_jax` from `root`, not from an installed (or editable) copy."""
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__
                        and "editable" not in getattr(f, "__name__", "")]
    sys.path.insert(0, root)
    import sameo_jax

    where = pathlib.Path(sameo_jax.__file__).resolve()
    if not where.is_relative_to(pathlib.Path(root).resolve()):
        raise SystemExit(f"compare.py worker: imported sameo_jax from {where}, not {root}")


def _random_params(config, seed: int = 0) -> Any:
    import jax
    import jax.numpy as jnp

    from sameo_jax.models.efficient_sam import param_shapes

    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray((0.02 * rng.standard_normal(s.shape)).astype(np.float32)),
        param_shapes(config))


def _build(row: str, variant: str, overrides: dict[str, Any]):
    """(call, outputs of a first call as numpy arrays) for one row."""
    import jax
    import jax.numpy as jnp

    from sameo_jax import preprocessing as pp
    from sameo_jax.models.efficient_sam import EfficientSam, model_config

    try:
        config = model_config(variant, **overrides)
    except TypeError as err:  # a field this revision's config does not have
        raise SystemExit(f"compare.py worker: cannot set {overrides} on this revision's "
                         f"model config: {err}") from None
    model = EfficientSam(config)
    params = _random_params(config)
    rng = np.random.default_rng(1)
    e, d, s = config.embedding_size, config.embed_dim, config.img_size
    if row.startswith("decoder_boxes_"):
        q = int(row.rsplit("_", 1)[1])
        emb = jnp.asarray(rng.standard_normal((1, e, e, d)), jnp.float32)
        xy = rng.uniform(0, 0.5 * s, (1, q, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(0.02, 0.5, (1, q, 2)) * s], -1)
        points, labels = (jnp.asarray(x) for x in pp.boxes_to_prompts(
            boxes.astype(np.float32)))
        fn = jax.jit(lambda p, x, pt, lb: model.apply({"params": p}, x, pt, lb,
                                                       method=EfficientSam.decode))
        args = (params, emb, points, labels)
        return (lambda: fn(*args)), [np.asarray(x) for x in fn(*args)]
    if row == "encoder":
        images = jnp.asarray(rng.standard_normal((1, s, s, 3)), jnp.float32)
        fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=EfficientSam.encode))
        return (lambda: fn(params, images)), [np.asarray(fn(params, images))]
    if row == "train_step_cached":
        from configs import sameo as sameo_configs
        from sameo_jax.training.optimizer import (
            learning_rate_schedule,
            make_optimizer,
            trainable_labels,
        )
        from sameo_jax.training.state import TrainState
        from sameo_jax.training.step import make_train_step

        train = sameo_configs.get_config("vitt")
        b, n, low = 2, train.instances_per_image, config.low_res_size
        train.batch_size = b
        labels = trainable_labels(params, train.trainable)
        tx = make_optimizer(train, labels)
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
        step = make_train_step(model, train, labels, tx, learning_rate_schedule(train), mesh)
        xy = rng.uniform(0, 0.6 * s, (b, n, 2)).astype(np.float32)
        batch = jax.tree_util.tree_map(jnp.asarray, {
            "prompt_boxes": np.concatenate([xy, xy + 0.2 * s], -1),
            "amodal_masks": rng.random((b, n, low, low)) > 0.5,
            "visible_masks": rng.random((b, n, low, low)) > 0.7,
            "valid": np.ones((b, n), bool),
            "embedding": rng.standard_normal((b, e, e, d)).astype(np.float32)})
        holder = {"state": TrainState.create(params, tx, 0)}

        def call():
            holder["state"], metrics = step(holder["state"], batch)
            return metrics["loss"]

        return call, [np.asarray(call())]
    raise SystemExit(f"compare.py: unknown row {row!r}; expected decoder_boxes_N, encoder or "
                     "train_step_cached")


def worker(root: str, rows: list[str], variant: str, outputs: str,
           overrides: dict[str, Any]) -> None:
    """Serve timing requests on stdin: each line names a row, the reply is its seconds."""
    _import_tree(root)
    import jax

    calls = {}
    saved = {}
    for row in rows:
        calls[row], outs = _build(row, variant, overrides)
        jax.block_until_ready(calls[row]())  # warm-up after the compile
        saved.update({f"{row}/{i}": x for i, x in enumerate(outs)})
    np.savez(outputs, **saved)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        row = line.strip()
        start = time.perf_counter()
        jax.block_until_ready(calls[row]())
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


# ----------------------------------------------------------------------------- parent side
def parse_setting(text: str) -> tuple[str, Any]:
    """'FIELD=VALUE' -> (field, value); the value is a Python literal (1024, 0.5, False,
    'name') or else the plain string."""
    field, sep, value = text.partition("=")
    if not sep or not field.strip():
        raise ValueError(f"expected FIELD=VALUE, got {text!r}")
    try:
        return field.strip(), ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return field.strip(), value.strip()


def _labels(revs: list[str], default_malloc: set[int],
            overrides: dict[int, dict[str, Any]]) -> list[str]:
    """A unique name per worker: the revision with its settings, marked when it runs on
    malloc's defaults, numbered when it repeats."""
    names = [rev + "".join(f" [{k}={v}]" for k, v in overrides.get(i, {}).items())
             + (" (malloc defaults)" if i in default_malloc else "")
             for i, rev in enumerate(revs, 1)]
    return [f"{n} #{i}" if names.count(n) > 1 else n for i, n in enumerate(names, 1)]


def compare(revs: list[str], rows: list[str], rounds: int, variant: str,
            default_malloc: set[int] = frozenset(),
            overrides: dict[int, dict[str, Any]] | None = None,
            ) -> dict[str, dict[str, list[float]]]:
    """{row: {label: [seconds per round]}}, printed as a table. A worker runs under ./cpu.sh
    (malloc keeps freed memory), except the revisions numbered (from 1) in `default_malloc`,
    which keep glibc's defaults. `overrides` maps a revision's number to
    model config fields it runs with."""
    overrides = overrides or {}
    labels = _labels(revs, default_malloc, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        procs = []
        for i, rev in enumerate(revs):
            root = extract(rev, tmp / f"rev{i}")
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
            launcher = [] if i + 1 in default_malloc else [str(REPO / "cpu.sh")]
            procs.append(subprocess.Popen(
                [*launcher, sys.executable, __file__, "--worker", str(root), "--variant", variant,
                 "--outputs", str(tmp / f"out{i}.npz"),
                 "--overrides", json.dumps(overrides.get(i + 1, {})), "--rows", *rows],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env))
        try:
            for label, p in zip(labels, procs, strict=True):
                if not p.stdout.readline():
                    raise SystemExit(f"compare.py: the worker for {label!r} failed to start")
            times = {row: {label: [] for label in labels} for row in rows}
            for _ in range(rounds):
                for row in rows:
                    for label, p in zip(labels, procs, strict=True):
                        p.stdin.write(row + "\n")
                        p.stdin.flush()
                        times[row][label].append(json.loads(p.stdout.readline())["seconds"])
        finally:
            for p in procs:
                p.stdin.close()
                p.wait()
        outs = [dict(np.load(tmp / f"out{i}.npz")) for i in range(len(revs))]
    width = max(14, *map(len, labels))
    print(f"{'row':<22} {'revision':<{width}} {'min':>10} {'median':>10} {'min ratio':>10}")
    for row in rows:
        first = min(times[row][labels[0]])
        for label in labels:
            t = times[row][label]
            print(f"{row:<22} {label:<{width}} {min(t) * 1e3:8.1f}ms "
                  f"{statistics.median(t) * 1e3:8.1f}ms {min(t) / first:9.3f}x")
        for label, out in zip(labels[1:], outs[1:], strict=True):
            keys = [k for k in outs[0] if k.startswith(row + "/")]
            diff = max(float(np.max(np.abs(out[k] - outs[0][k]))) if out[k].shape ==
                       outs[0][k].shape else float("inf") for k in keys)
            print(f"{'':<22} {label:<{width}} max |output - {labels[0]}'s| = {diff:.3g}")
    return times


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revs", nargs="*", help="git revisions, or '.' for the working tree")
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS))
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--variant", default="vitt")
    parser.add_argument("--default-malloc", nargs="+", type=int, default=[], metavar="N",
                        help="run the N-th revisions (from 1) on glibc's malloc defaults, "
                             "e.g. '. . --default-malloc 2' times train.py's malloc settings")
    parser.add_argument("--set", nargs=2, action="append", default=[],
                        metavar=("N", "FIELD=VALUE"), dest="settings",
                        help="run the N-th revision's model with this config field, e.g. "
                             "'HEAD HEAD --set 2 encoder_attention_chunk=1024' (repeatable)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--outputs", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.rows, args.variant, args.outputs, json.loads(args.overrides))
        return None
    if len(args.revs) < 2:
        parser.error("give at least two revisions (e.g. HEAD~1 .)")
    bad = [n for n in args.default_malloc if not 1 <= n <= len(args.revs)]
    if bad:
        parser.error(f"--default-malloc {bad}: there are {len(args.revs)} revisions")
    overrides = _overrides(parser, args.settings, len(args.revs))
    return compare(args.revs, args.rows, args.rounds, args.variant, set(args.default_malloc),
                   overrides)


def _overrides(parser: argparse.ArgumentParser, settings: list[list[str]],
               count: int) -> dict[int, dict[str, Any]]:
    """--set pairs -> {revision number: {field: value}}, checked against the model config's
    fields (of the working tree) and the number of revisions."""
    from sameo_jax.models.config import EfficientSamConfig

    fields = {f.name for f in dataclasses.fields(EfficientSamConfig)}
    overrides: dict[int, dict[str, Any]] = {}
    for number, text in settings:
        if not number.isdigit() or not 1 <= int(number) <= count:
            parser.error(f"--set {number} {text}: N must be a revision's position, "
                         f"1 to {count}")
        try:
            field, value = parse_setting(text)
        except ValueError as err:
            parser.error(f"--set {number} {text}: {err}")
        if field not in fields:
            parser.error(f"--set {number} {text}: the model config has no field {field!r} "
                         f"(fields: {', '.join(sorted(fields))})")
        overrides.setdefault(int(number), {})[field] = value
    return overrides


if __name__ == "__main__":
    main()
