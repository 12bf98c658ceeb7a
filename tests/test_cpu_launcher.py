"""./cpu.sh: under it, repeated JAX calls on the CPU reuse their buffers instead of
page-faulting fresh ones; without it (the control) they do not. And the *_cpu configs."""

import json
import os
import pathlib
import platform
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A call with a 64 MB output and a temporary buffer of at least 64 MB (a 4096 x 4096 product
# of a computed operand); `fault_bytes`: the fewest page faults of a call after 2 warm-ups.
# Each output is dropped, and its release given time (another thread may free it), first.
_SCRIPT = textwrap.dedent("""
    import json, resource, time
    import jax, jax.numpy as jnp

    x = jnp.ones((4096, 4096), jnp.float32)
    w = jnp.ones((4096, 64), jnp.float32)
    f = jax.jit(lambda x, w: (jnp.sin(x) @ w, x * 2.0)).lower(x, w).compile()
    sizes = f.memory_analysis()
    faults = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        out = jax.block_until_ready(f(x, w))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        del out
        time.sleep(0.1)
    print(json.dumps({"fault_bytes": min(faults[2:]) * resource.getpagesize(),
                      "temp_bytes": sizes.temp_size_in_bytes,
                      "output_bytes": sizes.output_size_in_bytes}))
""")


def _run(launcher: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([*launcher, sys.executable, "-c", _SCRIPT], capture_output=True,
                          text=True, timeout=300, env={**env, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the settings are glibc's")
def test_freed_buffers_are_reused_without_page_faults():
    kept, control = _run([str(ROOT / "cpu.sh")]), _run([])
    per_call = kept["temp_bytes"] + kept["output_bytes"]
    assert kept["temp_bytes"] >= 64 << 20 and kept["output_bytes"] >= 64 << 20
    # Without the settings every call faults in most of its fresh buffers ...
    assert control["fault_bytes"] > 0.5 * per_call
    # ... with them, (nearly) none.
    assert kept["fault_bytes"] < 0.05 * per_call


def test_cpu_configs_change_only_the_encoder_chunks():
    sys.path.insert(0, str(ROOT))
    try:
        from configs import sameo
    finally:
        sys.path.remove(str(ROOT))
    for variant, chunk in (("vitt", 1024), ("vits", 512)):
        cpu = sameo.get_config(f"{variant}_cpu")
        assert cpu.model.overrides.encoder_attention_chunk == chunk
        del cpu.model.overrides["encoder_attention_chunk"]
        assert cpu.to_dict() == sameo.get_config(variant).to_dict()


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
