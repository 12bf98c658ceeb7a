"""The on-disk embedding cache: the loss it gives, refusal of other weights, resuming and
reusing a partly written cache, and damaged files as one clear error."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

from sameo_jax.data import embedding_store, pipeline
from sameo_jax.data.embedding_store import CacheError, EmbeddingStore
from sameo_jax.models.efficient_sam import EfficientSam
from sameo_jax.preprocessing import preprocess_image
from sameo_jax.training import embed, input_pipeline, loop
from sameo_jax.training import step as step_lib
from tests.conftest import random_params
from tests.test_training import micro_config

REPO = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = 20
SHARD = 8


def _config(**data):
    config = micro_config()
    config.data.demo_train_examples = EXAMPLES
    config.data.demo_image_size = 80  # not the model frame: the device resize is exercised
    config.data.image_pad_hw = (80, 96)
    config.data.update(data)
    return config


def _write(config, params, out, **kw):
    model_cfg = loop.build_model_config(config)
    return embed.write_embeddings(config, model_cfg, params, out, ["train"], shard_size=SHARD,
                                  batch_size=4, **kw)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    config = _config()
    params = random_params(loop.build_model_config(config))
    out = tmp_path_factory.mktemp("cache")
    assert _write(config, params, out) == {"demo/train": EXAMPLES}
    return config, params, out


def _fingerprint(config, params):
    return embedding_store.fingerprint(loop.build_model_config(config), params["image_encoder"])


def test_cached_embeddings_give_the_encoders_loss(written):
    config, params, out = written
    model_cfg = loop.build_model_config(config)
    model = EfficientSam(model_cfg)
    reader = EmbeddingStore(out, _fingerprint(config, params)).reader("demo", "train")
    source = input_pipeline.open_sources(config, "train")["demo"]
    assert len(reader) == EXAMPLES
    assert [reader.image_id(i) for i in range(EXAMPLES)] == [
        int(source[i]["image_id"]) for i in range(EXAMPLES)]

    # The encoder in float32 on the host-resized images, against the bfloat16 cache.
    batch = next(pipeline.make_train_loader(
        {"demo": source}, batch_size=8, image_size=model_cfg.img_size,
        mask_size=model_cfg.low_res_size, instances_per_image=2, seed=0))
    images = np.stack([embed.load_image(source, int(k))[0] for k in batch["image_key"]])
    exact = model.apply({"params": params}, preprocess_image(images, model_cfg.img_size),
                        method=EfficientSam.encode)
    cached = np.stack([reader.get(int(k)) for k in batch["image_key"]])
    assert cached.dtype == ml_dtypes.bfloat16
    np.testing.assert_allclose(cached.astype(np.float32), exact, rtol=2**-7, atol=1e-5)

    # The train step's loss: the cache against the frozen encoder in the step (on the images
    # as the pipeline hands them: padded, resized on the device), and against the cache's
    # embeddings of other images (the tiny random decoder barely depends on its input, so
    # that difference sets the scale).
    hw = np.tile(np.asarray(images.shape[1:3], np.int32), (8, 1))
    padded = {"image": np.pad(images, ((0, 0), (0, 0), (0, 16), (0, 0))), "pixels_hw": hw}
    common = {k: batch[k] for k in ("prompt_boxes", "amodal_masks", "visible_masks", "valid")}

    @jax.jit
    def losses(padded, cached):
        encoded = step_lib._embeddings(model, params, {**common, **padded})
        embeddings = jax.numpy.stack([encoded, cached.astype(np.float32), cached[::-1]])
        return jax.vmap(lambda e: step_lib.batch_loss(
            model, config, params, {**common, "embedding": e}).total)(embeddings)

    encoder, cache, other = np.asarray(losses(padded, cached)).tolist()
    assert cache == pytest.approx(encoder, rel=1e-2)
    assert abs(cache - encoder) < 0.1 * abs(other - encoder)


def test_cache_from_other_weights_or_preprocessing_is_refused(written):
    config, params, out = written
    other = random_params(loop.build_model_config(config), seed=1)
    with pytest.raises(CacheError, match=f"{out} was made with other encoder weights"):
        EmbeddingStore(out, _fingerprint(config, other))
    bigger = _config()
    bigger.model.overrides.img_size = 96
    with pytest.raises(CacheError, match=r"another encoder or preprocessing: encoder.img_size "
                                         r"\(cache: 64, now: 96\)"):
        EmbeddingStore(out, _fingerprint(bigger, params))
    with pytest.raises(CacheError, match="other encoder weights"):
        _write(config, other, out)  # nothing is written over it
    # Other data under the same name (here: other demo scenes) is refused too.
    store = EmbeddingStore(out, _fingerprint(config, params))
    source = input_pipeline.open_sources(_config(demo_image_size=96), "train")["demo"]
    with pytest.raises(CacheError, match="made of DemoSource.*image_size=80.*now is "
                                         "DemoSource.*image_size=96"):
        store.reader("demo", "train", repr(source))


def test_the_command_refuses_other_weights_in_one_line(written, tmp_path):
    config, params, out = written
    command = [sys.executable, "embed.py", "--config", "tests/test_embedding_store.py",
               "--out", str(out), "--config.seed=5"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and lines[-1].startswith("error: embedding cache "), proc.stderr
    assert "other encoder weights" in lines[-1] and "Traceback" not in proc.stderr


def get_config():
    """The config `embed.py` reads in the test above (random micro weights)."""
    return _config()


def test_interrupted_cache_is_resumed_and_a_finished_one_reused(written, tmp_path):
    config, params, full = written
    out = tmp_path / "cache"
    fp = _fingerprint(config, params)
    store = EmbeddingStore.create(out, fp, EmbeddingStore(full).embedding_shape)
    writer = store.writer("demo", "train", EXAMPLES, SHARD,
                          repr(input_pipeline.open_sources(config, "train")["demo"]))
    assert writer.pending() == [0, 1, 2]
    assert writer.pending(1, 2) == [1] and writer.pending(0, 2) == [0, 2]
    # An interruption: shard 1 written, shard 0's .npy renamed in place but not its .json,
    # and a temporary file left behind.
    done = EmbeddingStore(full).reader("demo", "train")
    shard1 = [done.get(i) for i in writer.shard_examples(1)]
    writer.write(1, np.stack(shard1), [done.image_id(i) for i in writer.shard_examples(1)])
    (out / "demo/train/shard-00000.npy").write_bytes(b"half")
    (out / "demo/train/shard-00002.npy.tmp-999").write_bytes(b"half")
    with pytest.raises(CacheError, match=r"incomplete \(2 of 3 shards missing, first "
                                         r"shard-00000\); finish it with embed.py"):
        store.reader("demo", "train")
    assert _write(config, params, out) == {"demo/train": EXAMPLES - SHARD}
    assert _write(config, params, out) == {"demo/train": 0}  # finished: reused as it is
    assert not list(out.rglob("*.tmp-*"))
    reader = EmbeddingStore(out, fp).reader("demo", "train")
    for i in range(EXAMPLES):
        np.testing.assert_array_equal(reader.get(i).view(np.uint16), done.get(i).view(np.uint16))


def _damaged_copy(full: pathlib.Path, tmp_path: pathlib.Path, name: str, damage
                  ) -> tuple[pathlib.Path, pathlib.Path]:
    out = tmp_path / "damaged"
    shutil.copytree(full, out)
    damage(out / name)
    return out, out / name


@pytest.mark.parametrize("name, damage, message", [
    ("demo/train/shard-00001.npy",
     lambda p: p.write_bytes(p.read_bytes()[:-100]), r"bytes, expected \d+ \(truncated"),
    ("demo/train/shard-00001.npy",
     lambda p: p.write_bytes(p.read_bytes()[:-1] + b"\x00"), "do not match the checksum"),
    ("demo/train/shard-00001.npy",
     lambda p: p.write_bytes(b"\x93NUMPY\x01\x00" + p.read_bytes()[8:20]), "not a .npy file"),
    ("demo/train/shard-00001.npy", lambda p: p.unlink(), "missing"),
    ("demo/train/shard-00001.json", lambda p: p.write_text("{\"start\": 8"), "not a readable"),
    ("demo/train/shard-00001.json",
     lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "count": 10**12})),
     "holds examples from 8"),
    ("demo/train/split.json", lambda p: p.write_text("[]"), "split.json: expected a JSON object"),
    ("demo/train/split.json",  # a claim far beyond the files: no work or memory to match it
     lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "num_examples": 10**15})),
     r"incomplete \(124999999999997 of 125000000000000 shards missing"),
    ("cache.json", lambda p: p.write_bytes(b"\x00" * (2 << 20)), "more than any"),
])
def test_damaged_files_are_named(written, tmp_path, name, damage, message):
    out, path = _damaged_copy(written[2], tmp_path, name, damage)
    with pytest.raises(CacheError, match=message) as e:
        EmbeddingStore(out).reader("demo", "train").get(9)
    assert str(path) in str(e.value)


class _Logged(pipeline.DecodedExample):
    """A decoded example that logs what the pipeline asks it to decode."""

    def __init__(self, example, index, log):
        super().__init__(example)
        self.index, self.log = index, log

    def image(self):
        self.log.append(("image", self.index))
        return super().image()

    def masks(self, kind, indices):
        self.log.append((kind, self.index, tuple(int(i) for i in indices)))
        return super().masks(kind, indices)


class _LoggedSource:
    """A source of records (like a built data set) that logs every decode."""

    def __init__(self, source):
        self.source, self.log = source, []

    def __len__(self):
        return len(self.source)

    def record(self, index):
        return _Logged(self.source[index], index, self.log)


def test_loader_reads_the_cache_and_decodes_only_what_it_needs(written):
    config, params, out = written
    model_cfg = loop.build_model_config(config)
    demo = input_pipeline.open_sources(config, "train")["demo"]
    reader = EmbeddingStore(out, _fingerprint(config, params)).reader("demo", "train")
    kw = dict(batch_size=4, image_size=model_cfg.img_size, mask_size=model_cfg.low_res_size,
              instances_per_image=2, seed=3)
    plain, cached = _LoggedSource(demo), _LoggedSource(demo)
    padded = pipeline.make_train_loader({"demo": plain}, image_pad_hw=(80, 96), **kw)
    from_cache = pipeline.make_train_loader({"demo": cached}, embeddings={"demo": reader}, **kw)
    for _ in range(3):
        a, b = next(padded), next(from_cache)
        assert a["image"].shape == (4, 80, 96, 3) and "embedding" not in a
        np.testing.assert_array_equal(a["pixels_hw"], np.full((4, 2), 80))
        assert "image" not in b and "pixels_hw" not in b
        for key in set(a) - {"image", "pixels_hw"}:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        want = np.stack([reader.get(int(k)) for k in b["image_key"]])
        np.testing.assert_array_equal(b["embedding"].view(np.uint16), want.view(np.uint16))
    # No image decoded from the cache; only the used instances' masks (at most 2 of up to 4).
    assert not [e for e in cached.log if e[0] == "image"]
    assert {e for e in cached.log if e[0] != "image"} == {
        e for e in plain.log if e[0] != "image"}
    assert all(len(e[2]) <= 2 for e in cached.log)
    assert max(len(demo[i]["objects"]["category_id"]) for i in range(len(demo))) > 2

    # Evaluation: one ordered pass, the same rows from the cache.
    eval_kw = dict(batch_size=3, image_size=model_cfg.img_size,
                   mask_size=model_cfg.low_res_size, instances_per_image=2)
    rows = list(pipeline.make_eval_loader(demo, image_pad_hw=(80, 80), **eval_kw))
    logged = _LoggedSource(demo)
    cached_rows = list(pipeline.make_eval_loader(logged, embeddings=reader, **eval_kw))
    assert len(rows) == len(cached_rows) and not [e for e in logged.log if e[0] == "image"]
    for a, b in zip(rows, cached_rows, strict=True):
        for key in set(a) - {"image", "pixels_hw"}:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


class _Renumbered(_LoggedSource):
    """The same scenes under other image ids: data the cache was not made of."""

    def record(self, index):
        record = super().record(index)
        record.image_id += 1000
        return record


def test_cache_of_other_data_is_refused_by_the_loader(written):
    config, params, out = written
    demo = input_pipeline.open_sources(config, "train")["demo"]
    reader = EmbeddingStore(out).reader("demo", "train")
    kw = dict(batch_size=4, image_size=64, mask_size=16, instances_per_image=2)
    with pytest.raises(ValueError, match=r"source 'demo' example \d+: image id 10\d\d, but the "
                                         f"embedding cache {out}/demo/train holds image id"):
        next(pipeline.make_train_loader({"demo": _Renumbered(demo)},
                                        embeddings={"demo": reader}, **kw))
    with pytest.raises(ValueError, match="holds 20 examples, source 'demo' has 8"):
        pipeline.make_train_loader({"demo": input_pipeline.open_sources(config, "validation")[
            "demo"]}, embeddings={"demo": reader}, **kw)
