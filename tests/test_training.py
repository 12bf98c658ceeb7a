"""Training: freezing, resume, learning, safe defaults, bounded steps in flight, flat memory,
embedding-cache keys, clear errors (many devices and processes: test_distributed.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.sameo import get_config
from sameo_jax.training import embed, loop, optimizer
from sameo_jax.training.checkpointing import TrainCheckpointer, abstract_like
from sameo_jax.training.state import TrainState

REPO = pathlib.Path(__file__).resolve().parents[1]
N_STEPS = 12
RESUME_AT = 5

# A model smaller than 'tiny': 64 px input, 4x4 embedding grid, 16x16 masks.
MICRO = dict(img_size=64, encoder_width=32, encoder_depth=1, encoder_heads=2, embed_dim=32,
             decoder_depth=1, decoder_heads=2, decoder_mlp_dim=64, iou_head_hidden=32)



def micro_config(**overrides):
    c = get_config("demo")
    c.model.overrides.update(MICRO)
    c.trainable = ("mask_decoder/",)
    c.data.demo_train_examples = 64
    c.data.demo_eval_examples = 8
    c.batch_size = 8
    c.instances_per_image = 2
    c.total_steps = N_STEPS
    c.lr = 3e-3
    c.warmup_steps = 0
    c.lr_schedule = "constant"
    c.log_every = 1
    c.checkpoint_every = 100
    c.eval_every = -1
    c.progress_bar = False
    for k, v in overrides.items():
        c[k] = v
    return c


def read_metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").open()]


# ----------------------------------------------------------------------------- optimizer


def toy_params():
    return {
        "image_encoder": {"w": jnp.ones(3)},
        "prompt_encoder": {"pe": {"b": jnp.full(2, -0.0)}},
        "mask_decoder": {"k": jnp.ones((2, 2)), "iou_head": {"b": jnp.zeros(2)}},
    }


def test_optimizer_freezes_unmatched_paths():
    params = toy_params()
    labels = optimizer.trainable_labels(params, ("mask_decoder/",))
    assert labels["image_encoder"]["w"] == optimizer.FROZEN
    assert labels["mask_decoder"]["iou_head"]["b"] == optimizer.TRAINABLE
    c = micro_config()
    tx = optimizer.make_optimizer(c, labels)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)  # even given gradients, frozen leaves stay
    p = params
    for _ in range(3):
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
    for path in (("image_encoder", "w"), ("prompt_encoder", "pe", "b")):
        before, after = params, p
        for k in path:
            before, after = before[k], after[k]
        assert np.array_equal(np.asarray(before), np.asarray(after))
    assert np.all(np.asarray(p["mask_decoder"]["k"]) < 1.0)
    # The split used by the train step differentiates only the trainable subtree.
    trainable, frozen = optimizer.split_params(params, labels)
    assert set(trainable) == {"mask_decoder"}
    assert set(frozen) == {"image_encoder", "prompt_encoder"}
    merged = optimizer.merge_params(trainable, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(params)


def test_trainable_pattern_errors():
    with pytest.raises(ValueError, match="'mask_decodr/' matches no parameter"):
        optimizer.trainable_labels(toy_params(), ("mask_decodr/",))
    with pytest.raises(ValueError, match="invalid pattern"):
        optimizer.trainable_labels(toy_params(), ("mask_decoder/(",))
    everything = optimizer.trainable_labels(toy_params(), (".*",))
    assert set(jax.tree.leaves(everything)) == {optimizer.TRAINABLE}


# ----------------------------------------------------------------------------- the loop


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted N-step decoder-only run, its initial params and its workdir."""
    workdir = tmp_path_factory.mktemp("full")
    c = micro_config()
    init = loop.initial_params(c, loop.build_model_config(c))
    state = loop.train_and_evaluate(c, workdir)
    return c, jax.device_get(init), jax.device_get(state), workdir


def test_on_disk_embedding_cache_gives_the_encoders_losses(full_run, tmp_path):
    """The first steps again, reading the frozen encoder's embeddings from an embed.py cache
    (bfloat16: rtol 1e-2), as a user would: the cache made first, then the config key."""
    c, init, _, workdir = full_run
    cache = tmp_path / "cache"
    embed.write_embeddings(c, loop.build_model_config(c), init, cache, [c.data.train_split])
    cached = micro_config(total_steps=3)
    cached.data.embedding_cache_dir = str(cache)
    loop.train_and_evaluate(cached, tmp_path / "cached")
    losses = [m["loss"] for m in read_metrics(tmp_path / "cached") if "loss" in m]
    want = [m["loss"] for m in read_metrics(workdir) if "loss" in m][:3]
    np.testing.assert_allclose(losses, want, rtol=1e-2)
    # With weights other than those the cache was made of, the run stops at once, by name.
    other = micro_config(total_steps=3, seed=1)
    other.data.embedding_cache_dir = str(cache)
    with pytest.raises(ValueError, match=f"embedding cache {cache} was made with other "
                                         "encoder weights"):
        loop.train_and_evaluate(other, tmp_path / "other")


def test_frozen_params_bit_identical_decoder_changed(full_run):
    _, init, state, _ = full_run
    assert int(state.step) == N_STEPS
    for name in ("image_encoder", "prompt_encoder"):
        for a, b in zip(jax.tree.leaves(init[name]), jax.tree.leaves(state.params[name]),
                        strict=True):
            assert a.tobytes() == b.tobytes()
    changed = [not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(init["mask_decoder"]), jax.tree.leaves(state.params["mask_decoder"]),
        strict=True)]
    # Most of the decoder moved; the single-mask token's hypernetwork cannot (multimask
    # training never uses it), nor can a candidate's that never had the lowest loss.
    assert np.mean(changed) > 0.6, np.mean(changed)


def test_metrics_and_checkpoints_written(full_run):
    c, _, state, workdir = full_run
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, N_STEPS + 1))
    for key in ("loss", "dice", "focal", "iou_l1", "lr", "steps_per_s", "examples_per_s"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert records[0]["lr"] == pytest.approx(c.lr)
    assert list(pathlib.Path(workdir).glob("events.out.tfevents.*"))
    # The lead's loader reads the params of the latest step from this layout.
    from sameo_jax.model_io import load_model

    model_cfg, params = load_model(workdir)
    assert model_cfg == loop.build_model_config(c)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_loss_decreases_on_demo_data(full_run):
    _, _, _, workdir = full_run
    losses = [r["loss"] for r in read_metrics(workdir)]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.02, losses


def test_resume_equals_uninterrupted_run(full_run, tmp_path):
    c, _, full_state, _ = full_run
    loop.train_and_evaluate(micro_config(total_steps=RESUME_AT), tmp_path)
    resumed = jax.device_get(loop.train_and_evaluate(micro_config(), tmp_path))
    assert int(resumed.step) == N_STEPS
    for a, b in zip(jax.tree.leaves(full_state), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    # Both runs logged their own steps; the data stream continued where it stopped.
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, N_STEPS + 1))
    full_losses = [r["loss"] for r in read_metrics(full_run[3])]
    assert [r["loss"] for r in read_metrics(tmp_path)] == full_losses


# ----------------------------------------------------------------------------- safe defaults


def test_bare_design_card_config_stops_with_one_error_line(tmp_path):
    """`train.py --config configs/sameo.py` without weights stops before any work: one
    `error:` line naming what to pass, no traceback, nothing written."""
    workdir = tmp_path / "wd"
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/sameo.py", "--workdir", str(workdir)],
        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=120, cwd=REPO)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr[-2000:]
    for needed in ("config.init_checkpoint", "efficient_sam_vitt.pt", "configs/sameo.py:demo",
                   "--config.init_checkpoint=random"):
        assert needed in errors[0]
    assert not workdir.exists()


def test_only_an_explicit_choice_starts_from_random_weights(tmp_path):
    for variant in ("vitt", "vits"):
        with pytest.raises(ValueError, match="config.init_checkpoint is not set"):
            loop.check_start(get_config(variant), tmp_path)
    loop.check_start(get_config("demo"), tmp_path)  # the demo says 'random' itself
    random_vitt = get_config("vitt")
    random_vitt.init_checkpoint = loop.RANDOM_INIT
    loop.check_start(random_vitt, tmp_path)
    (tmp_path / "checkpoints" / "1000").mkdir(parents=True)  # a run to resume
    loop.check_start(get_config("vitt"), tmp_path)


def test_init_checkpoint_compares_the_model_structure_only(tmp_path):
    """An init checkpoint saved under other compute-only fields (chunking, fast paths,
    dtype) loads; one of another structure is refused by field name."""
    from sameo_jax.model_io import save_params

    c = micro_config()
    model_cfg = loop.build_model_config(c)
    params = jax.device_get(loop.initial_params(c, model_cfg))
    saved_cfg = dataclasses.replace(model_cfg, encoder_attention_chunk=7,
                                    decoder_prompt_chunk=0, factored_upscale=False)
    save_params(params, tmp_path / "init", saved_cfg)
    c.init_checkpoint = str(tmp_path / "init")
    loaded = jax.device_get(loop.initial_params(c, model_cfg))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    c.model.overrides.embed_dim = 16
    with pytest.raises(ValueError, match="embed_dim"):
        loop.initial_params(c, loop.build_model_config(c))


# ----------------------------------------------------------------------------- progress


def test_at_most_two_steps_in_flight_and_progress_counts_completed_steps():
    done = []
    in_flight = loop._StepsInFlight(2, lambda step, m: done.append((step, m["loss"])))
    for step in range(1, 6):
        in_flight.add(step, {"loss": jnp.float32(step)})
        # Adding step s waits for step s - 2: the host never runs further ahead.
        assert [s for s, _ in done] == list(range(1, max(step - 1, 1)))
    in_flight.drain()
    assert done == [(s, float(s)) for s in range(1, 6)]
    in_flight.add(6, {"loss": jnp.float32(np.nan)})
    with pytest.raises(FloatingPointError, match="at step 6"):
        in_flight.drain()


def test_resident_memory_stays_flat(tmp_path):
    """Host memory of a run at step 20 and at step 80 (after 60 more steps) is the same to
    within 40 MB; a leak of one training batch a step would be 60 x 330 KB = 20 MB on top of
    noise, one of the step's 100 KB of outputs 6 MB, so the bound is loose but a queue of
    unfinished steps or metrics growing with the run would show in a longer one."""
    c = micro_config(total_steps=80, log_every=20, async_checkpoints=False)
    loop.train_and_evaluate(c, tmp_path)
    records = {r["step"]: r for r in read_metrics(tmp_path)}
    assert sorted(records) == [20, 40, 60, 80]
    growth = records[80]["host_memory_gb"] - records[20]["host_memory_gb"]
    assert growth < 0.04, [records[s]["host_memory_gb"] for s in sorted(records)]


# ----------------------------------------------------------------------------- cache


def test_embedding_cache_keeps_two_eval_sources_apart(tmp_path, monkeypatch):
    """With two evaluation sources whose image keys coincide, cached embeddings give each
    source its own numbers: those of the same run without the cache (evaluation only)."""
    from sameo_jax.data.demo_scenes import DemoSource
    from sameo_jax.training import input_pipeline

    def two_sources(config, split):
        seed = 10 if split == config.data.train_split else 20
        return {name: DemoSource(8, 64, seed + k) for k, name in enumerate(("a", "b"))}

    monkeypatch.setattr(input_pipeline, "open_sources", two_sources)
    results = {}
    for cached in (False, True):
        workdir = tmp_path / str(cached)
        loop.train_and_evaluate(
            micro_config(total_steps=0, eval_every=0, cache_embeddings=cached), workdir)
        results[cached] = {k: v for r in read_metrics(workdir) for k, v in r.items()
                           if k.startswith("eval/")}
    for source in ("a", "b"):
        assert results[True][f"eval/{source}/num_instances"] > 0
        for key in ("amodal_iou", "amodal_iou_occluded"):
            name = f"eval/{source}/{key}"
            np.testing.assert_allclose(results[True][name], results[False][name], rtol=1e-5)
    assert results[True]["eval/a/amodal_iou"] != results[True]["eval/b/amodal_iou"]


# ----------------------------------------------------------------------------- errors


def test_missing_init_checkpoint_is_clear(tmp_path):
    c = micro_config(init_checkpoint=str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="config.init_checkpoint: .*nope.pt does not exist"):
        loop.train_and_evaluate(c, tmp_path / "wd")


def test_missing_data_set_names_the_build(tmp_path):
    c = micro_config()
    c.data.sources = ("cocoa",)
    c.data.data_dir = str(tmp_path)
    with pytest.raises((FileNotFoundError, ValueError), match="cocoa"):
        loop.train_and_evaluate(c, tmp_path / "wd")


def test_nan_loss_stops_with_step_and_good_checkpoint(tmp_path):
    c = micro_config(lr=1e12, grad_clip_norm=0.0, checkpoint_every=1, total_steps=8,
                     async_checkpoints=False)
    with pytest.raises(FloatingPointError, match=r"at step (\d+).*Last good checkpoint: step"):
        loop.train_and_evaluate(c, tmp_path)
    ckpt = TrainCheckpointer(tmp_path, c.max_to_keep)
    good = ckpt.latest_step()
    assert good is not None and good >= 1
    model_cfg = loop.build_model_config(c)
    params = loop.initial_params(c, model_cfg)
    labels = optimizer.trainable_labels(params, c.trainable)
    tx = optimizer.make_optimizer(c, labels)
    restored = ckpt.restore(abstract_like(TrainState.create(params, tx, 0)), model_cfg)
    ckpt.close()
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored.params))
    records = read_metrics(tmp_path)
    assert all(np.isfinite(r["loss"]) for r in records)
    assert records[-1]["step"] == good


def test_resume_ignores_compute_only_fields_and_rejects_another_model(tmp_path):
    """A workdir resumes under another dtype / chunking / factoring, or from a model config
    saved before a compute-only field existed; a different model is refused by name."""
    c = micro_config()
    model_cfg = loop.build_model_config(c)
    params = loop.initial_params(c, model_cfg)
    tx = optimizer.make_optimizer(c, optimizer.trainable_labels(params, c.trainable))
    state = TrainState.create(params, tx, 0)
    ckpt = TrainCheckpointer(tmp_path, 2, async_save=False)
    ckpt.save(state, model_cfg, c)
    ckpt.wait()
    like = abstract_like(state)
    compute_only = dataclasses.replace(model_cfg, decoder_prompt_chunk=0,
                                       factored_upscale=not model_cfg.factored_upscale)
    restored = ckpt.restore(like, compute_only)
    np.testing.assert_array_equal(
        restored.params["mask_decoder"]["iou_token"], params["mask_decoder"]["iou_token"])
    # A config saved by an older version, without the newest compute-only field.
    [saved] = [p for p in tmp_path.rglob("*") if p.is_file() and "model_config" in str(p)
               and p.read_text().startswith("{")]
    old = json.loads(saved.read_text())
    del old["factored_upscale"]
    saved.write_text(json.dumps(old))
    shutil.rmtree(saved.parents[1] / "checksums")  # that version stored no checksums either
    ckpt.restore(like, model_cfg)
    with pytest.raises(ValueError, match="embed_dim"):
        ckpt.restore(like, dataclasses.replace(model_cfg, embed_dim=64))
    ckpt.close()
