"""grain input pipeline: batch schema, prompts, mask pooling, determinism, resume, devices."""

import json

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sameo_jax.boxes import boxes_from_masks
from sameo_jax.data import pipeline
from sameo_jax.data.demo_scenes import DemoSource
from sameo_jax.preprocessing import resize_image

S, L, N = 64, 16, 3


def _loader(sources, **kw):
    args = dict(batch_size=4, image_size=S, mask_size=L, instances_per_image=N, seed=0)
    args.update(kw)
    return pipeline.make_train_loader(sources, **args)


def _equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.fixture(scope="module")
def demo():
    return DemoSource(24, image_size=96, seed=1)


def test_batch_schema_and_contents(demo):
    it = _loader({"demo": demo}, prompt_mode="random")
    spec = pipeline.batch_spec(4, S, L, N)
    amodal_prompts, prompts = 0, 0
    for _ in range(6):
        batch = next(it)
        assert set(batch) == set(pipeline.BATCH_KEYS)
        for key, (shape, dtype) in spec.items():
            assert batch[key].shape == shape and batch[key].dtype == dtype, key
        for b in range(4):
            ex = demo[int(batch["image_key"][b])]
            o = ex["objects"]
            np.testing.assert_array_equal(
                batch["image"][b], np.clip(np.rint(resize_image(ex["image"], S)), 0, 255))
            valid = batch["valid"][b]
            n = int(valid.sum())
            assert n == min(N, len(o["category_id"]))
            assert not valid[n:].any()  # padding at the end
            for j in range(n):
                # The prompt box is the S-frame image of the instance's modal or amodal box.
                box = batch["prompt_boxes"][b, j]
                scaled_a = o["amodal_bbox"] * S / 96
                scaled_v = o["visible_bbox"] * S / 96
                table = scaled_a if batch["prompt_is_amodal"][b, j] else scaled_v
                k = int(np.flatnonzero(np.abs(table - box).max(1) < 1e-4)[0])
                np.testing.assert_allclose(batch["occlusion_rate"][b, j],
                                           o["occlusion_rate"][k])
                # 96 -> 16 is a whole factor of 6: majority of each 6 x 6 cell.
                cells = o["amodal_mask"][k].reshape(L, 6, L, 6).sum((1, 3))
                np.testing.assert_array_equal(batch["amodal_masks"][b, j], cells >= 18)
            assert not batch["amodal_masks"][b, n:].any() and not batch["prompt_boxes"][b, n:].any()
            assert not np.any(batch["visible_masks"][b] & ~batch["amodal_masks"][b])
            amodal_prompts += int(batch["prompt_is_amodal"][b, :n].sum())
            prompts += n
    # p = 0.5 per prompt; 4-sigma band.
    assert abs(amodal_prompts / prompts - 0.5) < 4 * np.sqrt(0.25 / prompts)
    for mode, expected in (("modal", False), ("amodal", True)):
        batch = next(_loader({"demo": demo}, prompt_mode=mode))
        assert np.all(batch["prompt_is_amodal"][batch["valid"]] == expected)


def test_downsample_masks_is_majority_area_pooling():
    mask = np.zeros((1, 100, 100), bool)
    mask[0, :, :50] = True  # left half: cells 0..31 lie in x < 50 (cell width 1.5625)
    out = pipeline.downsample_masks(mask, 64)
    assert out[0].all(axis=0)[:32].all() and not out[0].any(axis=0)[32:].any()
    mask = np.zeros((1, 8, 8), bool)
    mask[0, 0, 0:2] = True  # half of the top-left 2 x 2 cell
    mask[0, 2, 2] = True  # a quarter of cell (1, 1)
    np.testing.assert_array_equal(pipeline.downsample_masks(mask, 4)[0].nonzero(), ([0], [0]))


def _covered_half(mask: np.ndarray, size: int) -> np.ndarray:
    """Majority area pooling by its definition, in exact fractions."""
    from fractions import Fraction

    h, w = mask.shape
    out = np.zeros((size, size), bool)
    for i, j in np.ndindex(size, size):
        y0, y1 = Fraction(i * h, size), Fraction((i + 1) * h, size)
        x0, x1 = Fraction(j * w, size), Fraction((j + 1) * w, size)
        area = sum((min(y1, y + 1) - max(y0, y)) * (min(x1, x + 1) - max(x0, x))
                   for y, x in zip(*np.nonzero(mask), strict=True)
                   if y0 < y + 1 and y < y1 and x0 < x + 1 and x < x1)
        out[i, j] = 2 * area >= (y1 - y0) * (x1 - x0)
    return out


def test_downsample_masks_is_exact_for_any_sizes():
    rng = np.random.default_rng(0)
    for h, w, size in [(13, 29, 8), (30, 17, 7), (9, 11, 16), (24, 36, 5), (40, 40, 1)]:
        yy, xx = np.mgrid[0:h, 0:w]
        masks = np.stack([((xx - rng.uniform(0, w)) / rng.uniform(2, w)) ** 2
                          + ((yy - rng.uniform(0, h)) / rng.uniform(2, h)) ** 2 <= 1
                          for _ in range(3)] + [np.zeros((h, w), bool)])
        masks[2] &= rng.random((h, w)) < 0.6
        want = np.stack([_covered_half(m, size) for m in masks])
        np.testing.assert_array_equal(pipeline.downsample_masks(masks, size), want)


def test_stored_pooled_masks_read_back_as_pooled_and_refuse_bad_bytes():
    from sameo_jax.data import pooling

    rng = np.random.default_rng(1)
    h, w = 48, 70
    masks = rng.random((4, h, w)) < 0.5
    masks[1] = False  # no pixel: stored as b""
    masks[2] = False
    masks[2, 5, 7] = True  # a pixel, but no cell at size 16: a header with an empty box
    masks[3] = False
    masks[3, 20:41, 9:60] = True
    for size in (16, 13, 256):
        want = pipeline.downsample_masks(masks, size)
        for mask, cells in zip(masks, want, strict=True):
            data = pooling.encode_pooled(mask, size)
            out = np.zeros((size, size), bool)
            assert pooling.read_pooled(data, out) == mask.any()
            np.testing.assert_array_equal(out, cells)
            assert pooling.stored_size(data) == (size if mask.any() else None)
    data = pooling.encode_pooled(masks[3], 16)
    assert len(data) == 10 + -(-int(pipeline.downsample_masks(masks[3:], 16).sum()) // 8)
    header = np.frombuffer(data[:10], "<u2").copy()
    bad = {"short header": data[:6], "bits cut": data[:-1], "bits added": data + b"\0",
           "box past the grid": np.asarray([16, 0, 17, 0, 4], "<u2").tobytes() + data[10:],
           "end before start": np.asarray([16, 5, 4, *header[3:]], "<u2").tobytes() + data[10:]}
    for damaged in bad.values():
        with pytest.raises(ValueError, match="stored pooled mask"):
            pooling.read_pooled(damaged, np.zeros((16, 16), bool))
    with pytest.raises(ValueError, match="does not fit"):
        pooling.read_pooled(data, np.zeros((32, 32), bool))


class _PaddedScenes:
    """Demo scenes zero-padded to sizes that differ between images (top-left kept)."""

    def __init__(self, demo):
        self.demo = demo

    def __len__(self):
        return len(self.demo)

    def __getitem__(self, i):
        example = self.demo[i]
        h, w = 96 + 8 * (i % 3), 96 + 4 * (i % 2)
        image = np.zeros((h, w, 3), np.uint8)
        image[:96, :96] = example["image"]
        objects = dict(example["objects"])
        for key in ("amodal_mask", "visible_mask"):
            masks = np.zeros((len(objects[key]), h, w), bool)
            masks[:, :96, :96] = objects[key]
            objects[key] = masks
        return {**example, "image": image, "objects": objects}


def test_worker_processes_give_the_same_batches(demo):
    """Through grain's worker processes (masks cross as bits, images padded only to the
    batch's largest) the batches equal those made in this process."""
    sources = {"demo": _PaddedScenes(demo)}
    args = dict(image_pad_hw=(112, 104), mask_size=12)
    here = _loader(sources, **args)
    workers = _loader(sources, worker_count=2, **args)
    try:
        for _ in range(4):
            a, b = next(here), next(workers)
            _equal(a, b)
            assert a["amodal_masks"].dtype == bool and a["image"].shape == (4, 112, 104, 3)
    finally:
        workers.close()


def test_images_padded_into_the_batch_or_resized_when_larger_than_the_pad(demo):
    plain = next(_loader({"demo": demo}))  # resized to S x S on the host
    fits = next(_loader({"demo": demo}, image_pad_hw=(100, 112)))
    larger = next(_loader({"demo": demo}, image_pad_hw=(S, S + 16)))  # the 96 px scenes
    assert fits["image"].shape == (4, 100, 112, 3) and larger["image"].shape == (4, S, S + 16, 3)
    np.testing.assert_array_equal(fits["pixels_hw"], np.full((4, 2), 96))
    np.testing.assert_array_equal(larger["pixels_hw"], np.full((4, 2), S))
    for b, key in enumerate(fits["image_key"]):
        np.testing.assert_array_equal(fits["image"][b, :96, :96], demo[int(key)]["image"])
    assert not fits["image"][:, 96:].any() and not fits["image"][:, :, 96:].any()
    np.testing.assert_array_equal(larger["image"][:, :, :S], plain["image"])
    assert not larger["image"][:, :, S:].any()
    for key in set(plain) - {"image"}:
        np.testing.assert_array_equal(fits[key], plain[key], err_msg=key)
        np.testing.assert_array_equal(larger[key], plain[key], err_msg=key)


def test_deterministic_resumable_and_thread_independent(demo):
    first = [next(_loader({"demo": demo})) for _ in range(1)][0]
    it = _loader({"demo": demo})
    batches = [next(it) for _ in range(3)]
    _equal(first, batches[0])
    state = json.loads(json.dumps(it.get_state()))
    later = [next(it) for _ in range(2)]
    resumed = _loader({"demo": demo})
    resumed.set_state(state)
    for a, b in zip(later, [next(resumed) for _ in range(2)], strict=True):
        _equal(a, b)
    threaded = _loader({"demo": demo}, read_threads=2)
    for a in batches:
        _equal(a, next(threaded))
    other = next(_loader({"demo": demo}, seed=1))
    assert not np.array_equal(other["image_key"], first["image_key"]) or not np.array_equal(
        other["prompt_is_amodal"], first["prompt_is_amodal"])


def test_orbax_saves_the_iterator_state(demo, tmp_path):
    it = _loader({"demo": demo})
    next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt",
                               item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as m:
        m.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        m.wait_until_finished()
        expected = next(it)
        restored = _loader({"demo": demo})
        m.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    _equal(expected, next(restored))


def test_mixture_of_two_sources_and_image_keys():
    big, small = DemoSource(60, image_size=64, seed=2), DemoSource(6, image_size=64, seed=3)
    it = _loader({"big": big, "small": small}, batch_size=8, mixture="uniform")
    keys = np.concatenate([next(it)["image_key"] for _ in range(8)])
    from_small = keys >= 60
    assert 0.5 - 0.2 < from_small.mean() < 0.5 + 0.2  # 64 draws at p = 0.5
    assert set(keys[from_small] - 60) == set(range(6))  # one shuffled epoch after another
    assert keys.max() < 66
    it = _loader({"big": big, "small": small}, batch_size=8,
                 mixture={"big": 1.0, "small": 0.0})
    assert (next(it)["image_key"] < 60).all()


def test_box_jitter():
    boxes = np.array([[10, 20, 50, 40]], np.float32)
    rng = np.random.default_rng(0)
    out = np.stack([pipeline.jitter_boxes(boxes, 0.1, rng, (64, 64))[0] for _ in range(400)])
    assert np.all(out[:, 0] <= out[:, 2]) and np.all(out[:, 1] <= out[:, 3])
    assert out.min() >= 0 and out.max() <= 64
    np.testing.assert_allclose(out.mean(0), boxes[0], atol=0.6)
    np.testing.assert_allclose(out.std(0), [4, 2, 4, 2], rtol=0.2)  # 0.1 * (40, 20)
    assert np.abs(out - boxes).max(0).tolist() <= [8, 4, 8, 4]
    np.testing.assert_array_equal(pipeline.jitter_boxes(boxes, 0.0, rng, (64, 64)), boxes)


def test_eval_loader_covers_every_instance_once_in_order():
    src = DemoSource(7, image_size=64, seed=4)
    batches = list(pipeline.make_eval_loader(src, batch_size=3, image_size=S, mask_size=L,
                                             instances_per_image=2, prompt_mode="amodal"))
    again = list(pipeline.make_eval_loader(src, batch_size=3, image_size=S, mask_size=L,
                                           instances_per_image=2, prompt_mode="amodal"))
    for a, b in zip(batches, again, strict=True):
        _equal(a, b)
    seen = []
    for batch in batches:
        assert batch["image"].shape == (3, S, S, 3)
        for b in range(3):
            for j in np.flatnonzero(batch["valid"][b]):
                key, k = int(batch["image_key"][b]), int(batch["instance_index"][b, j])
                seen.append((key, k))
                np.testing.assert_allclose(batch["prompt_boxes"][b, j],
                                           src[key]["objects"]["amodal_bbox"][k])
            assert (batch["instance_index"][b][~batch["valid"][b]] == -1).all()
    expected = [(i, k) for i in range(7) for k in range(len(src[i]["objects"]["category_id"]))]
    assert seen == expected
    rows = sum(-(-len(src[i]["objects"]["category_id"]) // 2) for i in range(7))
    assert len(batches) == -(-rows // 3)
    filler = 3 * len(batches) - rows  # the last batch is completed with empty rows
    assert filler < 3
    if filler:
        assert not batches[-1]["valid"][-filler:].any()
        assert (batches[-1]["image_key"][-filler:] == -1).all()
    with pytest.raises(ValueError, match="eval prompt_mode"):
        pipeline.make_eval_loader(src, batch_size=1, image_size=S, mask_size=L,
                                  instances_per_image=1, prompt_mode="random")


def test_to_global_batch(demo):
    batch = next(_loader({"demo": demo}))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    placed = pipeline.to_global_batch(batch, sharding)
    for k in batch:
        assert isinstance(placed[k], jax.Array) and placed[k].sharding == sharding
        np.testing.assert_array_equal(np.asarray(placed[k]), batch[k])


class _Broken:
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return {"image": np.zeros((8, 8, 3), np.uint8), "objects": {"amodal_mask": 0}}


def test_bad_input_errors(demo):
    with pytest.raises(ValueError, match="source 'bad' example [01]: 'objects' has no field"):
        next(_loader({"bad": _Broken()}))
    with pytest.raises(ValueError, match="prompt_mode must be one of"):
        _loader({"demo": demo}, prompt_mode="box")
    with pytest.raises(ValueError, match="source 'empty' is empty"):
        _loader({"empty": DemoSource(0)})
    with pytest.raises(ValueError, match="batch_size must be positive"):
        _loader({"demo": demo}, batch_size=0)


class _Crafted:
    """One 32 x 32 image: a fully hidden instance, an empty one, a tiny one, a normal one."""

    def __len__(self):
        return 1

    def __getitem__(self, i):
        amodal = np.zeros((4, 32, 32), bool)
        amodal[0, 4:12, 4:12] = True  # fully occluded: visible empty
        amodal[2, 20, 20] = True  # one pixel: vanishes at L = 8 (4 x 4 cells)
        amodal[3, 16:32, 0:16] = True
        visible = amodal.copy()
        visible[0] = False
        return {"image": np.full((32, 32, 3), 7, np.uint8), "image_id": np.int64(0),
                "source": "x",
                "objects": {"amodal_mask": amodal, "visible_mask": visible,
                            "amodal_bbox": boxes_from_masks(amodal),
                            "visible_bbox": boxes_from_masks(visible),
                            "category_id": np.arange(4), "occlusion_rate":
                            np.array([1, 0, 0, 0], np.float32)}}


def test_edge_instances():
    batch = next(pipeline.make_train_loader(
        {"x": _Crafted()}, batch_size=1, image_size=16, mask_size=8, instances_per_image=4,
        prompt_mode="modal", seed=0))
    # Rows: instance 0, 2, 3 (the empty instance 1 is never used), then padding.
    np.testing.assert_array_equal(batch["valid"][0], [True, False, True, False])
    # Fully hidden -> its amodal box even in modal mode, in the 16-pixel frame.
    np.testing.assert_array_equal(batch["prompt_is_amodal"][0], [True, False, False, False])
    np.testing.assert_allclose(batch["prompt_boxes"][0, 0], [2, 2, 6, 6])
    np.testing.assert_allclose(batch["prompt_boxes"][0, 2], [0, 8, 8, 16])
    assert not batch["amodal_masks"][0, 1].any()  # the vanished one-pixel instance
    assert batch["amodal_masks"][0, 2, 4:, :4].all() and batch["amodal_masks"][0, 2].sum() == 16
