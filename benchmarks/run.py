"""Speed of sameo-jax, each time set against its FLOP floor measured in the same run.

    python benchmarks/run.py [--quick] [--json OUT.json] [--repeats 5] [--variant tiny]
                             [--rows PATTERN ...] [--products [--detail N]]
    python benchmarks/run.py --pipeline [--json OUT.json]   # input-pipeline rows instead

Rows: image encoder (ViT-T, ViT-S) at 1024x1024; prompt encoder + mask decoder for 1, 16 and
64 boxes, low-res only and with the bicubic upsample to a 603x1072 image; one decoder-only
training step with cached embeddings and one that runs the frozen encoder; the cached step at
the training batch (32 images) with its memory per image (XLA's memory analysis), with and
without the training config's decoder remat (`train_step_cached_b32`). Each time is the
median of `--repeats` runs after a warm-up (compile excluded). FLOPs come from XLA's cost
analysis of the compiled call; the floor is FLOPs / the matmul rate measured right before
each row in the same run, so the ratio `x floor` is comparable across noisy machines.
`--quick` measures ViT-T and the decoder only; `--variant` runs every row on one model variant
(the tests check the script on 'tiny'). Weights are random: timings do not depend on their
values. `--pipeline` measures the rows of benchmarks/pipeline_rows.py (data building and
input pipeline, on data the benchmark generates) instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import functools
import json
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sameo_jax import preprocessing as pp
from sameo_jax.models.efficient_sam import EfficientSam, model_config, param_shapes

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # for configs/
TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"  # products.py, with --products

IMAGE_HW = (603, 1072)  # the reference image's size, for the upsample rows


def random_params(config, seed: int = 0) -> Any:
    """Parameters of the right shapes drawn with numpy (no model init to compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray((0.02 * rng.standard_normal(s.shape)).astype(np.float32)),
        param_shapes(config))


def unchunked(config):
    """The same model without its loops over query / prompt chunks. XLA's cost analysis counts
    a loop body once, so work is counted on this program; the arithmetic is the same."""
    return dataclasses.replace(config, encoder_attention_chunk=0, decoder_prompt_chunk=0)


def time_call(fn: Callable, args: tuple, repeats: int) -> float:
    """Median wall time of fn(*args) after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def xla_flops(jitted: Callable, args: tuple) -> float:
    """FLOPs of one call from XLA's cost analysis (loop bodies are counted once)."""
    return compiled_flops(jitted, args)[1]


def compiled_flops(jitted: Callable, args: tuple) -> tuple[Callable, float]:
    compiled = jitted.lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return compiled, float(cost.get("flops", 0.0)) if cost else 0.0


def matmul_rate(dtype=jnp.float32, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n matmul, fastest of `repeats` runs: the machine's practical peak for
    dense math (the fastest run is the one least disturbed by other work)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(a))
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


class Table:
    """Rows of (time, FLOPs, floor, product floor). The matmul rate is measured again right
    before each row is timed, so a load change on a shared machine moves both sides of the
    ratio; with `products`, the row's dots and convolutions are timed right after it, each on
    its own (tools/products.py)."""

    def __init__(self, device: str, detail: int = 0, products: bool = False,
                 only: list[str] | None = None):
        self.device, self.rows, self.detail, self.only = device, [], detail, only
        self.products = None
        if products or detail:
            sys.path.insert(0, str(TOOLS))
            import products as product_tools

            self.products = product_tools
        self.timer = None

    def wants(self, name: str) -> bool:
        """Whether the row `name` is measured (`--rows` patterns; all by default)."""
        return not self.only or any(fnmatch.fnmatchcase(name, p) for p in self.only)

    def add(self, name: str, fn: Callable, args: tuple, flops: float, repeats: int,
            note: str = "", hlo: str | None = None, extra: dict | None = None) -> None:
        """hlo: the optimized HLO text of what `fn` runs, for the product floor; extra:
        more fields of the row."""
        rate = matmul_rate()
        seconds = time_call(fn, args, repeats)
        floor = flops / rate
        row = {"name": name, "seconds": seconds, "gflops": flops / 1e9,
               "floor_seconds": floor, "matmul_gflops_per_s": rate / 1e9,
               "device": self.device, "note": note, **(extra or {})}
        products = None
        if hlo is not None and self.products:
            self.timer = self.timer or self.products.ProductTimer(rate, repeats)
            products = self.products.hlo_products(hlo)
            row["products_seconds"] = self.timer.floor(products)
        self.rows.append(row)
        ratio = seconds / floor if floor else float("nan")
        prod = row.get("products_seconds")
        prod_text = (f"{prod * 1e3:9.1f} ms {seconds / prod:6.2f}x" if prod
                     else f"{'-':>12} {'-':>7}")
        print(f"{name:<28} {seconds * 1e3:10.1f} ms {flops / 1e9:9.2f} GFLOP "
              f"{rate / 1e9:7.1f} {floor * 1e3:9.1f} ms {ratio:7.2f}x {prod_text}  {note}",
              flush=True)
        if products and self.detail:
            for text, count, total, speed in self.timer.breakdown(products, self.detail):
                print(f"    {total * 1e3:8.1f} ms = {count:4d} x {text}  "
                      f"({speed / 1e9:.0f} GFLOP/s)")


def kept_memory() -> bool:
    """Whether this process runs under ./cpu.sh (glibc's malloc keeps freed memory)."""
    return os.environ.get("MALLOC_ARENA_MAX") == "1"


def tuned(config, variant: str, kept: bool):
    """The model config as training runs it: under ./cpu.sh, the encoder's bigger attention
    chunks of the configs' *_cpu variants."""
    from configs.sameo import CPU_ENCODER_CHUNKS

    chunk = CPU_ENCODER_CHUNKS.get(variant) if kept else None
    return dataclasses.replace(config, encoder_attention_chunk=chunk) if chunk else config


def bench_encoder(table: Table, variant: str, repeats: int, dtype: str = "float32",
                  kept: bool = False) -> None:
    suffix = "" if dtype == "float32" else f"_{dtype}"
    if not table.wants(f"encoder_{variant}{suffix}"):
        return
    config = tuned(model_config(variant, dtype=dtype), variant, kept)
    model = EfficientSam(config)
    params = random_params(config)
    s = config.img_size
    images = jnp.asarray(np.random.default_rng(0).standard_normal((1, s, s, 3)), jnp.float32)
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=EfficientSam.encode))
    compiled = fn.lower(params, images).compile()
    counted = EfficientSam(unchunked(config))
    flops = xla_flops(jax.jit(lambda p, x: counted.apply(
        {"params": p}, x, method=EfficientSam.encode)), (params, images))
    table.add(f"encoder_{variant}{suffix}", compiled, (params, images), flops, repeats,
              f"1x3x{s}x{s}", compiled.as_text())


def bench_decoder(table: Table, repeats: int, variant: str = "vitt") -> None:
    config = model_config(variant)
    model = EfficientSam(config)
    params = random_params(config)
    rng = np.random.default_rng(1)
    e = config.embedding_size
    emb = jnp.asarray(rng.standard_normal((1, e, e, config.embed_dim)), jnp.float32)
    # The reference image's size, scaled with the model's input size (603x1072 at 1024).
    h, w = (round(x * config.img_size / 1024) for x in IMAGE_HW)

    def decode(p, e, pts, lab, model=model):
        logits, iou = model.apply({"params": p}, e, pts, lab, method=EfficientSam.decode)
        return logits, iou

    def decode_upsampled(p, e, pts, lab, model=model):
        logits, iou = decode(p, e, pts, lab, model)
        return pp.upsample_logits(logits, (h, w)) >= 0, iou

    counted = EfficientSam(unchunked(config))

    for q in (1, 16, 64):
        xy = rng.uniform(0, 500, (1, q, 2)).astype(np.float32)
        boxes = np.concatenate([xy, xy + rng.uniform(20, 500, (1, q, 2))], -1)
        pts, lab = pp.boxes_to_prompts(pp.rescale_points(
            boxes.reshape(1, q, 2, 2), (h, w), config.img_size).reshape(1, q, 4))
        args = (params, emb, jnp.asarray(pts), jnp.asarray(lab))
        for name, fn in ((f"decoder_boxes_{q}", decode),
                         (f"decoder_boxes_{q}_upsampled", decode_upsampled)):
            if not table.wants(name):
                continue
            compiled = jax.jit(fn).lower(*args).compile()
            flops = xla_flops(jax.jit(functools.partial(fn, model=counted)), args)
            low = config.low_res_size
            note = f"low-res {low}x{low}" if fn is decode else f"3 masks at {h}x{w}"
            table.add(name, compiled, args, flops, repeats, note, compiled.as_text())


def _train_setup(variant: str, kept: bool, b: int):
    """The ViT-T training config at `b` images x `instances_per_image` boxes, `variant`'s
    model, random parameters, optimizer, one-device mesh and a batch (with 'image'; drop it
    and add 'embedding' for the cached path)."""
    from configs import sameo as sameo_configs
    from sameo_jax.training.optimizer import (
        learning_rate_schedule,
        make_optimizer,
        trainable_labels,
    )

    config = sameo_configs.get_config("vitt")
    n = config.instances_per_image
    config.batch_size = b
    model_cfg = tuned(model_config(variant), variant, kept)
    params = random_params(model_cfg)
    s, e, low = model_cfg.img_size, model_cfg.embedding_size, model_cfg.low_res_size
    labels = trainable_labels(params, config.trainable)
    tx = make_optimizer(config, labels)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 0.6 * s, (b, n, 2)).astype(np.float32)
    batch = {
        "prompt_boxes": np.concatenate([xy, xy + 0.2 * s], -1),
        "amodal_masks": rng.random((b, n, low, low)) > 0.5,
        "visible_masks": rng.random((b, n, low, low)) > 0.7,
        "valid": np.ones((b, n), bool),
        "image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
    }
    embedding = rng.standard_normal((b, e, e, model_cfg.embed_dim)).astype(np.float32)
    cached = dict(batch, embedding=embedding)
    del cached["image"]
    return (config, model_cfg, params, labels, tx, learning_rate_schedule(config), mesh,
            batch, cached)


def _stepper(compiled: Callable, state) -> Callable:
    """batch -> loss of one `compiled` train step, carrying the (donated) state along."""
    holder = {"state": state}

    def run(d):
        holder["state"], metrics = compiled(holder["state"], d)
        return metrics["loss"]

    return run


def bench_train_steps(table: Table, repeats: int, variant: str = "vitt",
                      kept: bool = False) -> None:
    """Decoder-only SAMEO step (the ViT-T training config, 2 images x `instances_per_image`
    boxes, on `variant`'s model) with and without cached embeddings."""
    if not (table.wants("train_step_cached") or table.wants("train_step_encoder")):
        return
    from sameo_jax.training.state import TrainState
    from sameo_jax.training.step import make_train_step

    config, model_cfg, params, labels, tx, schedule, mesh, batch, cached = _train_setup(
        variant, kept, 2)
    b, n = config.batch_size, config.instances_per_image
    step = make_train_step(EfficientSam(model_cfg), config, labels, tx, schedule, mesh)
    flop_step = make_train_step(EfficientSam(unchunked(model_cfg)), config, labels, tx,
                                schedule, mesh)
    for name, data in (("train_step_cached", cached), ("train_step_encoder", batch)):
        if not table.wants(name):
            continue
        # Fresh buffers: the step donates its state.
        state = TrainState.create(jax.tree_util.tree_map(jnp.copy, params), tx, 0)
        data = jax.tree_util.tree_map(jnp.asarray, data)
        compiled = step.lower(state, data).compile()
        flops = xla_flops(flop_step, (state, data))
        table.add(name, _stepper(compiled, state), (data,), flops, repeats,
                  f"{b} images x {n} boxes", compiled.as_text())


def step_bytes(compiled) -> int:
    """Device memory of one compiled call from XLA's memory analysis: temporaries + arguments
    + outputs, less the outputs that reuse a donated argument's buffer (the new state)."""
    m = compiled.memory_analysis()
    return (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
            - m.alias_size_in_bytes)


def bench_train_step_memory(table: Table, repeats: int, variant: str = "vitt",
                            kept: bool = False, b: int = 32) -> None:
    """The cached decoder-only step at the training batch (`b` images x 4 boxes): its memory
    per image and time under the training config's `decoder_remat`, and both without remat
    (fields `*_no_remat`, timed right after in the same run)."""
    name = f"train_step_cached_b{b}"
    if not table.wants(name):
        return
    from sameo_jax.training.state import TrainState
    from sameo_jax.training.step import make_train_step

    config, model_cfg, params, labels, tx, schedule, mesh, _, cached = _train_setup(
        variant, kept, b)
    policy = config.decoder_remat
    data = jax.tree_util.tree_map(jnp.asarray, cached)
    runs = {}
    for remat in (policy, ""):
        config.decoder_remat = remat
        state = TrainState.create(jax.tree_util.tree_map(jnp.copy, params), tx, 0)
        compiled = make_train_step(EfficientSam(model_cfg), config, labels, tx, schedule,
                                   mesh).lower(state, data).compile()
        runs[remat] = (compiled, state)
    # Work counted once, without the recomputation and the loops (see `unchunked`).
    flops = xla_flops(make_train_step(EfficientSam(unchunked(model_cfg)), config, labels, tx,
                                      schedule, mesh), (runs[""][1], data))
    compiled, state = runs[policy]
    plain, plain_state = runs[""]
    extra = {"decoder_remat": policy, "bytes_per_image": step_bytes(compiled) / b,
             "bytes_per_image_no_remat": step_bytes(plain) / b}
    table.add(name, _stepper(compiled, state), (data,), flops, repeats,
              f"{b} images x {config.instances_per_image} boxes, remat {policy}",
              compiled.as_text(), extra=extra)
    row = table.rows[-1]
    row["seconds_no_remat"] = time_call(_stepper(plain, plain_state), (data,), repeats)
    gib = 2.0**30
    print(f"    {row['bytes_per_image'] / gib:.3f} GiB/image with remat {policy}, "
          f"{row['bytes_per_image_no_remat'] / gib:.3f} without; step "
          f"{row['seconds'] / row['seconds_no_remat']:.2f}x the time without "
          f"({row['seconds_no_remat'] * 1e3:.1f} ms)", flush=True)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark rows and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ViT-T and the decoder only")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variant", default=None,
                        help="measure every row on this model variant only (e.g. 'tiny' to "
                             "check the script quickly); default: ViT-T, and ViT-S encoders")
    parser.add_argument("--rows", nargs="+", default=None, metavar="PATTERN",
                        help="only the rows whose names match (shell patterns, e.g. 'decoder_*')")
    parser.add_argument("--products", action="store_true",
                        help="also time each row's dots and convolutions alone (tools/)")
    parser.add_argument("--detail", type=int, default=0, metavar="N",
                        help="with --products: print each row's N most expensive products")
    parser.add_argument("--pipeline", action="store_true",
                        help="measure the input-pipeline rows (benchmarks/pipeline_rows.py)")
    parser.add_argument("--pipeline_rows", action="append", default=None,
                        help="with --pipeline: only this row (repeatable)")
    parser.add_argument("--pipeline_images", type=int, default=200,
                        help="with --pipeline: source images to generate")
    parser.add_argument("--workers", type=int, default=None,
                        help="with --pipeline: worker processes (default: all cores)")
    args = parser.parse_args(argv)
    if args.pipeline:
        from pipeline_rows import run as run_pipeline_rows

        rows = run_pipeline_rows(args.pipeline_rows, images=args.pipeline_images,
                                 workers=args.workers)
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
        return rows
    variant = args.variant or "vitt"

    reused = kept_memory()
    device = jax.devices()[0]
    device_name = f"{device.platform}:{device.device_kind}"
    if device.platform != "cpu":  # compare with float32 goldens at full precision
        jax.config.update("jax_default_matmul_precision", "highest")
    print(f"device {device_name} x{jax.device_count()}; 'rate' is the f32 matmul GFLOP/s "
          "(best of 5) measured just before each row, 'floor' = work / rate, 'products' = "
          "the call's dots and convolutions each timed alone (--products)")
    print("host memory: " + ("freed blocks kept for reuse (./cpu.sh), and the encoder's "
                             "attention in the bigger chunks of the *_cpu configs" if reused
                             else "malloc defaults (run under ./cpu.sh to keep freed memory)"))
    print(f"{'name':<28} {'time':>13} {'work':>15} {'rate':>7} {'floor':>12} {'ratio':>8} "
          f"{'products':>12} {'ratio':>7}")
    table = Table(device_name, args.detail, args.products, args.rows)
    encoders = [variant] if args.quick or args.variant else [variant, "vits"]
    for name in encoders:
        bench_encoder(table, name, args.repeats, kept=reused)
    if not args.quick and device.platform != "cpu":
        for name in encoders:
            bench_encoder(table, name, args.repeats, "bfloat16")
    bench_decoder(table, args.repeats, variant)
    if not args.quick:
        bench_train_steps(table, args.repeats, variant, kept=reused)
        bench_train_step_memory(table, args.repeats, variant, kept=reused)
    rows = {r["name"]: r for r in table.rows}
    if {"decoder_boxes_16", "decoder_boxes_64"} <= set(rows):
        per_box = ((rows["decoder_boxes_64"]["seconds"] - rows["decoder_boxes_16"]["seconds"])
                   / 48)
        print(f"decoder cost per extra box (16 -> 64): {per_box * 1e3:.1f} ms")
    if {"train_step_cached", "train_step_encoder"} <= set(rows):
        speedup = rows["train_step_encoder"]["seconds"] / rows["train_step_cached"]["seconds"]
        print(f"train step speed-up from cached embeddings: {speedup:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table.rows, f, indent=1)
    return table.rows


if __name__ == "__main__":
    main()
