"""sameo_jax/host_memory.py: with the malloc settings, repeated JAX calls on the CPU reuse
their buffers instead of page-faulting fresh ones; without them (the control) they do not.

Each case runs in its own process: the settings are process-wide and must precede JAX's
backend."""

import json
import os
import pathlib
import platform
import subprocess
import sys
import textwrap

import pytest

from sameo_jax import host_memory

ROOT = pathlib.Path(__file__).resolve().parents[1]

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the settings are glibc's")

# A call with a 64 MB output and a temporary buffer of at least 64 MB (a 4096 x 4096 product
# of a computed operand); `fault_bytes`: the fewest page faults of a call after 2 warm-ups.
_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import jax, jax.numpy as jnp
    from sameo_jax.host_memory import reuse_freed_host_memory

    applied = reuse_freed_host_memory() if sys.argv[1] == "reuse" else None
    if sys.argv[1] == "late":
        jax.devices()
        applied = reuse_freed_host_memory()
    x = jnp.ones((4096, 4096), jnp.float32)
    w = jnp.ones((4096, 64), jnp.float32)
    f = jax.jit(lambda x, w: (jnp.sin(x) @ w, x * 2.0)).lower(x, w).compile()
    sizes = f.memory_analysis()
    faults = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        jax.block_until_ready(f(x, w))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"applied": applied, "faults": faults,
                      "fault_bytes": min(faults[2:]) * resource.getpagesize(),
                      "temp_bytes": sizes.temp_size_in_bytes,
                      "output_bytes": sizes.output_size_in_bytes}))
""")


def _run(mode: str, **env: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, timeout=300,
        env={**{k: v for k, v in os.environ.items() if k not in host_memory.MALLOC_VARIABLES},
             "JAX_PLATFORMS": "cpu", **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@glibc_only
def test_freed_buffers_are_reused_without_page_faults():
    reuse, control = _run("reuse"), _run("default")
    assert reuse["applied"] is True
    per_call = reuse["temp_bytes"] + reuse["output_bytes"]
    assert reuse["temp_bytes"] >= 64 << 20 and reuse["output_bytes"] >= 64 << 20
    # Without the settings every call faults in most of its fresh buffers ...
    assert control["fault_bytes"] > 0.5 * per_call
    # ... with them, (nearly) none.
    assert reuse["fault_bytes"] < 0.05 * per_call


@glibc_only
def test_too_late_or_opted_out_changes_nothing():
    late = _run("late")
    assert late["applied"] is False  # JAX's threads already hold their malloc arenas
    assert late["fault_bytes"] > 0.5 * (late["temp_bytes"] + late["output_bytes"])
    assert _run("reuse", **{host_memory.OPT_OUT_VARIABLE: "0"})["applied"] is False


def test_applies_only_where_jax_runs_on_the_cpu(monkeypatch):
    import jax

    platforms = jax.config.jax_platforms
    try:
        jax.config.update("jax_platforms", "cuda")
        assert not host_memory.runs_on_cpu_only()
        assert host_memory.malloc_environment() == {}
        jax.config.update("jax_platforms", "cpu")
        assert host_memory.runs_on_cpu_only()
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            assert host_memory.malloc_environment() == {
                "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
                "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}
        monkeypatch.setenv(host_memory.OPT_OUT_VARIABLE, "0")
        assert host_memory.malloc_environment() == {}
    finally:
        jax.config.update("jax_platforms", platforms)


def test_kept_memory_config_enlarges_only_the_encoder_attention_chunks():
    """ViT-T 1024 and ViT-S 512 queries at a time (48 MiB of logits per image); a model whose
    chunks already cover its tokens, or that does not chunk, is left as it is."""
    import dataclasses

    from sameo_jax.models.config import kept_memory_config, model_config

    for variant, chunk in (("vitt", 1024), ("vits", 512), ("tiny", 256)):
        config = model_config(variant)
        kept = kept_memory_config(config)
        assert kept.encoder_attention_chunk == chunk
        assert dataclasses.replace(kept, encoder_attention_chunk=256) == config
    assert kept_memory_config(model_config("vitt", encoder_attention_chunk=0)) \
        .encoder_attention_chunk == 0
    assert kept_memory_config(model_config("vitt", encoder_attention_chunk=2048)) \
        .encoder_attention_chunk == 2048


def test_encoder_attention_chunks_do_not_change_the_embeddings():
    """Query chunks are rows of independent softmaxes: any chunk size gives the unchunked
    embeddings up to float32 rounding (different programs may order sums differently)."""
    import jax
    import numpy as np

    from sameo_jax.models.efficient_sam import EfficientSam, init_params, model_config

    images = jax.random.uniform(jax.random.key(1), (1, 256, 256, 3))
    params = init_params(model_config("tiny"), jax.random.key(0))
    out = {chunk: np.asarray(EfficientSam(model_config("tiny", encoder_attention_chunk=chunk))
                             .apply({"params": params}, images, method=EfficientSam.encode))
           for chunk in (0, 32, 128)}
    for chunk in (32, 128):
        np.testing.assert_allclose(out[chunk], out[0], rtol=0, atol=1e-5)


def test_train_py_takes_the_kept_memory_chunks_unless_the_config_names_one():
    sys.path.insert(0, str(ROOT))
    try:
        import train
        from configs import sameo
    finally:
        sys.path.remove(str(ROOT))

    for variant, chunk in (("vitt", 1024), ("vits", 512)):
        config = sameo.get_config(variant)
        config.lock()
        train.use_kept_memory_chunks(config)
        assert config.model.overrides.encoder_attention_chunk == chunk
    config = sameo.get_config("vitt")
    config.model.overrides.encoder_attention_chunk = 128
    train.use_kept_memory_chunks(config)
    assert config.model.overrides.encoder_attention_chunk == 128
