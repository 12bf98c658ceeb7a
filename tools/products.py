"""The matrix products a compiled call runs, each timed on its own: a floor set by the shapes.

The FLOP floor (work / the rate of a 2048 x 2048 matmul) assumes every product runs at the big
square matmul's rate. Many of the model's products cannot: a 64-wide attention head, a
[4096, 64] x [64, 256] low-rank update. This module reads the optimized HLO of a compiled
call, lists its dots and convolutions with the number of times each runs (loop bodies times
their known trip counts), and times each distinct product standalone (XLA on random inputs of
the same shapes, fastest of a few runs). The sum is what the call's products cost with
nothing else around them: its elementwise work, memory passes and scheduling add to it.

    products = hlo_products(compiled.as_text())
    seconds = ProductTimer(peak=matmul_flops_per_second).floor(products)

Only dots and convolutions count; products inside conditionals are left out (the floor stays a
lower bound), as are products of less than `TINY_FLOPS`, whose standalone time would be the
call's dispatch overhead (counted at `peak` FLOP/s instead).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections import defaultdict
from collections.abc import Iterable

import jax
import numpy as np

TINY_FLOPS = 1e6

_DTYPES = {"f32": np.float32, "f64": np.float64, "f16": np.float16, "bf16": jax.numpy.bfloat16,
           "s32": np.int32, "s8": np.int8}
_SHAPE = r"(\w+)\[([\d,]*)\]"
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY_OP = re.compile(_SHAPE + r"(?:\{[^}]*\})?\s+([\w\-]+)\((.*?)\)(.*)$")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition)=%?([\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass(frozen=True)
class Product:
    """One dot or convolution as XLA runs it: operand shapes/dtypes and its attributes."""

    kind: str  # "dot" | "convolution"
    lhs: tuple[int, ...]
    rhs: tuple[int, ...]
    dtype: str  # HLO element type of the operands, e.g. "f32"
    out: tuple[int, ...]
    attrs: tuple[tuple[str, str], ...]  # dimension numbers / window, as HLO prints them

    @property
    def flops(self) -> float:
        a = dict(self.attrs)
        if self.kind == "dot":
            contracted = math.prod(self.lhs[int(i)] for i in _ints(a.get("lhs_contracting_dims")))
            return 2.0 * math.prod(self.out) * contracted
        lhs_spec, rhs_spec, _ = _dim_labels(a["dim_labels"])
        kernel = math.prod(n for n, c in zip(self.rhs, rhs_spec, strict=True) if c not in "io")
        in_features = self.rhs[rhs_spec.index("i")]
        return 2.0 * math.prod(self.out) * kernel * in_features

    def describe(self) -> str:
        a = dict(self.attrs)
        if self.kind == "dot":
            text = f"{self.dtype}{list(self.lhs)} x {list(self.rhs)} -> {list(self.out)}"
            lc, rc = _ints(a.get("lhs_contracting_dims")), _ints(a.get("rhs_contracting_dims"))
            if lc != (len(self.lhs) - 1,) or rc != (len(_ints(a.get("rhs_batch_dims"))),):
                text += f" (contracting {list(lc)} x {list(rc)})"  # not a plain matmul
            return text
        return (f"conv {self.dtype}{list(self.lhs)} * {list(self.rhs)} -> {list(self.out)} "
                f"({a.get('window', '')})")

    def function(self):
        """(fn, operand shapes) computing this product with jax.lax."""
        a = dict(self.attrs)
        if self.kind == "dot":
            dims = ((_ints(a.get("lhs_contracting_dims")), _ints(a.get("rhs_contracting_dims"))),
                    (_ints(a.get("lhs_batch_dims")), _ints(a.get("rhs_batch_dims"))))
            return (lambda x, y: jax.lax.dot_general(x, y, dims)), (self.lhs, self.rhs)
        specs = _dim_labels(a["dim_labels"])
        window = _window(a.get("window", ""))
        ndim = len(self.lhs) - 2
        kwargs = dict(
            window_strides=window.get("stride", (1,) * ndim),
            padding=window.get("pad", ((0, 0),) * ndim),
            lhs_dilation=window.get("lhs_dilate", (1,) * ndim),
            rhs_dilation=window.get("rhs_dilate", (1,) * ndim),
            dimension_numbers=tuple(_jax_spec(s) for s in specs),
            feature_group_count=int(a.get("feature_group_count", 1)),
            batch_group_count=int(a.get("batch_group_count", 1)),
        )
        return (lambda x, y: jax.lax.conv_general_dilated(x, y, **kwargs)), (self.lhs, self.rhs)


def _ints(text: str | None) -> tuple[int, ...]:
    """'{0,2}' or '4,4096' (or None) -> (0, 2) / (4, 4096) / ()."""
    return tuple(int(i) for i in text.strip("{}").split(",") if i) if text else ()


def _dim_labels(text: str) -> tuple[str, str, str]:
    lhs, rest = text.split("_", 1)
    rhs, out = rest.split("->")
    return lhs, rhs, out


def _jax_spec(labels: str) -> str:
    """HLO dim labels ('b01f', '01io') -> jax's conv spec letters ('NHWC', 'HWIO'): batch and
    feature letters mapped, spatial digits to the same letters in every spec."""
    letters = {"b": "N", "f": "C", "i": "I", "o": "O"}
    spatial = "HWDXYZUV"
    return "".join(letters.get(c) or spatial[int(c)] for c in labels)


def _window(text: str) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for item in text.strip("{}").split():
        key, value = item.split("=")
        if key == "pad":
            out[key] = tuple(tuple(int(v) for v in p.split("_")) for p in value.split("x"))
        elif key in ("stride", "lhs_dilate", "rhs_dilate"):
            out[key] = tuple(int(v) for v in value.split("x"))
    return out


def _attributes(rest: str) -> tuple[tuple[str, str], ...]:
    keys = ("lhs_batch_dims", "lhs_contracting_dims", "rhs_batch_dims", "rhs_contracting_dims",
            "window", "dim_labels", "feature_group_count", "batch_group_count")
    found = []
    for key in keys:
        m = re.search(rf"\b{key}=(\{{[^}}]*\}}|[\w\->]+)", rest)
        if m:
            found.append((key, m.group(1)))
    return tuple(found)


def hlo_products(hlo_text: str) -> list[tuple[Product, int]]:
    """(product, times it runs per call) for every dot and convolution in an optimized HLO
    module (`compiled.as_text()`). A while loop's body counts its known trip count; a loop
    without one counts once (the floor stays a lower bound)."""
    shapes: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    found: dict[str, list[Product]] = defaultdict(list)
    calls: dict[str, list[tuple[str, int]]] = defaultdict(list)
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            shapes[current] = {}
            if header.group(1):
                entry = current
            continue
        m = _INSTRUCTION.match(line) if current else None
        if not m:
            continue
        name, text = m.groups()
        trips = _TRIP_COUNT.search(text)
        for key, callee in _CALLEE.findall(text):
            calls[current].append((callee, int(trips.group(1)) if trips and key == "body" else 1))
        array = _ARRAY_OP.match(text)  # tuple-shaped results (while, ...) hold no product
        if not array:
            continue
        dtype, dims, op, operands, rest = array.groups()
        shapes[current][name] = (dtype, _ints(dims))
        if op in ("dot", "convolution"):
            inline = re.findall(_SHAPE, operands)  # newer HLO prints operand shapes inline
            if len(inline) >= 2:
                (lt, ls), (rt, rs) = inline[:2]
                lhs, rhs = (lt, _ints(ls)), (rt, _ints(rs))
            else:
                names = [o.strip().lstrip("%") for o in operands.split(",")[:2]]
                lhs, rhs = (shapes[current][n] for n in names)
            found[current].append(Product(op, lhs[1], rhs[1], lhs[0], _ints(dims),
                                           _attributes(rest)))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    times: dict[str, int] = defaultdict(int)

    def visit(computation: str, count: int) -> None:
        times[computation] += count
        for callee, factor in calls.get(computation, ()):
            visit(callee, count * factor)

    visit(entry, 1)
    merged: dict[Product, int] = defaultdict(int)
    for computation, products in found.items():
        for p in products:
            merged[p] += times[computation]
    return [(p, n) for p, n in merged.items() if n]


class ProductTimer:
    """Times products standalone (fastest of `repeats` runs after a warm-up) and remembers
    each shape's time for the rest of the run. Products under TINY_FLOPS count at `peak`."""

    def __init__(self, peak: float, repeats: int = 5, seed: int = 0):
        self.peak, self.repeats = peak, repeats
        self._rng = np.random.default_rng(seed)
        self._seconds: dict[Product, float] = {}

    def seconds(self, product: Product) -> float:
        if product.flops < TINY_FLOPS:
            return product.flops / self.peak
        if product not in self._seconds:
            fn, shapes = product.function()
            dtype = _DTYPES.get(product.dtype, np.float32)
            args = [jax.numpy.asarray(self._rng.standard_normal(s).astype(np.float32), dtype)
                    for s in shapes]
            compiled = jax.jit(fn).lower(*args).compile()
            jax.block_until_ready(compiled(*args))
            best = float("inf")
            for _ in range(self.repeats):
                start = time.perf_counter()
                jax.block_until_ready(compiled(*args))
                best = min(best, time.perf_counter() - start)
            self._seconds[product] = best
        return self._seconds[product]

    def floor(self, products: Iterable[tuple[Product, int]]) -> float:
        """Seconds of all products of one call: sum of count x standalone time."""
        return sum(n * self.seconds(p) for p, n in products)

    def breakdown(self, products: Iterable[tuple[Product, int]], top: int = 8,
                  ) -> list[tuple[str, int, float, float]]:
        """The `top` products by total time: (description, count, total seconds, FLOP/s)."""
        rows = [(p.describe(), n, n * self.seconds(p), p.flops / self.seconds(p))
                for p, n in products if p.flops]
        return sorted(rows, key=lambda r: -r[2])[:top]
