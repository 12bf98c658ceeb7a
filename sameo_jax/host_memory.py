"""Keep freed host memory for reuse when JAX runs on the CPU (glibc's malloc settings).

XLA's CPU runtime allocates the temporary buffer of every call afresh and frees it when the
call ends: about 1 GB for the ViT-T training step, 0.1 GB for decoding 16 boxes. glibc's
malloc hands out blocks that large with mmap and gives them back with munmap, so each call
touches brand-new pages and the kernel zeroes the whole buffer again: about 0.7 of the
training step's 2.8 CPU-seconds on a 2-core machine, spent in page faults.

`reuse_freed_host_memory()` sets three mallopt(3) parameters so that freed blocks stay in the
process and the next call reuses them without faults:

- M_ARENA_MAX = 1: the runtime's worker threads allocate from the main heap (a thread's own
  arena cannot grow past 64 MB and falls back to mmap for larger blocks);
- M_MMAP_MAX = 0: large blocks come from the heap, not from mmap;
- M_TRIM_THRESHOLD = 2**31 - 1: the free top of the heap is not returned to the system.

The process then keeps its peak host memory for its lifetime (the same peak it reaches
anyway). Threads choose their arena at their first allocation, so this must run before JAX
starts its backend (before the first `jax.devices()`, array or compiled call); later it does
nothing and says so. It applies only where JAX will run on the CPU (JAX_PLATFORMS is 'cpu',
or no accelerator plugin is installed) and only under glibc. SAMEO_KEEP_FREED_MEMORY=0
turns it off.

Measured side by side on a 2-core CPU (BENCHMARKS.md): the ViT-T training step takes
0.62x-0.67x the time, decoding 16 boxes 0.92x-0.98x, the image encoder 1.02x-1.08x. All
threads then share one malloc arena, which costs programs that allocate a lot of small
blocks: compiling takes about 1.3x as long, and the tiny demo model's training steps ran
1.5x slower. So train.py calls it where the config asks (`keep_freed_host_memory`: the
vitt/vits configs, not the demo), and `benchmarks/run.py` does; evaluate.py and predict.py
(mostly the encoder) and the test suite (mostly compiling) leave malloc as it is. Where the
settings took effect, train.py and run.py also give the encoder bigger attention chunks
(`models/config.kept_memory_config`), which run 0.81x-0.89x the encoder's time there.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import platform

import jax

# (mallopt(3) parameter number from glibc's malloc.h, the same setting's environment
# variable, value), in the order they are set.
_SETTINGS = (
    (-8, "MALLOC_ARENA_MAX", 1),  # M_ARENA_MAX
    (-4, "MALLOC_MMAP_MAX_", 0),  # M_MMAP_MAX
    (-1, "MALLOC_TRIM_THRESHOLD_", 2**31 - 1),  # M_TRIM_THRESHOLD
)

OPT_OUT_VARIABLE = "SAMEO_KEEP_FREED_MEMORY"
MALLOC_VARIABLES = tuple(name for _, name, _ in _SETTINGS)


def _accelerator_plugins() -> list[str]:
    """Names of the installed JAX accelerator plugins (PJRT plugins and libtpu)."""
    found = [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
    try:
        import jax_plugins  # the namespace package of PJRT plugins (CUDA, ROCm, ...)
    except ImportError:
        pass
    else:
        found += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    if importlib.util.find_spec("libtpu") is not None:
        found.append("libtpu")
    return found


def runs_on_cpu_only() -> bool:
    """Whether JAX will run on the CPU: JAX_PLATFORMS (or jax_platforms) names only 'cpu',
    or it is unset and no accelerator plugin is installed."""
    platforms = jax.config.jax_platforms
    if platforms:
        return all(p.strip() == "cpu" for p in platforms.split(","))
    return not _accelerator_plugins()


def _why_not() -> str | None:
    """Why the settings do not apply to this process (None: they do)."""
    if os.environ.get(OPT_OUT_VARIABLE, "1") == "0":
        return f"{OPT_OUT_VARIABLE}=0"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    if not runs_on_cpu_only():
        return "JAX runs on an accelerator"
    return None


def reuse_freed_host_memory() -> bool:
    """Make glibc keep freed memory for reuse (module docstring). Returns whether the
    settings were applied; logs why not otherwise."""
    from jax._src import xla_bridge  # no public way to ask whether a backend has started

    reason = _why_not()
    if reason is None and xla_bridge.backends_are_initialized():
        reason = "JAX's backend has already started (call this before the first JAX operation)"
    if reason is not None:
        logging.info("host memory: malloc settings left as they are (%s)", reason)
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    failed = [name for param, name, value in _SETTINGS if mallopt(param, value) != 1]
    if failed:
        logging.warning("host memory: mallopt refused %s", failed)
        return False
    logging.info("host memory: freed blocks are kept for reuse (no page faults per call)")
    return True


def malloc_environment() -> dict[str, str]:
    """The same settings as environment variables, for a child process that imports JAX
    (glibc reads them at start-up); empty where `reuse_freed_host_memory` would not apply."""
    if _why_not() is not None:
        return {}
    return {name: str(value) for _, name, value in _SETTINGS}
