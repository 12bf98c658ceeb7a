"""Builders of generated data: demo scenes and Amodal-LVIS synthesis, read back exactly."""

import json

import numpy as np
from PIL import Image

from datasets import build
from datasets.amodal_lvis import synthesis as amodal_lvis
from sameo_jax.data import sources


def _assert_same(example, ref):
    np.testing.assert_array_equal(example["image"], ref["image"])
    assert example["image_id"] == ref["image_id"]
    assert example["source"] == ref["source"]
    for key, value in ref["objects"].items():
        got = example["objects"][key]
        assert got.dtype == np.asarray(value).dtype, key
        np.testing.assert_array_equal(got, value, err_msg=key)


def test_demo_build_round_trip(tmp_path, capsys):
    data = tmp_path / "data"
    assert build.main(["demo", "--data_dir", str(data), "--split", "validation",
                       "--max_images", "5"]) == 0
    out = capsys.readouterr().out
    assert "images read: 5, written: 5" in out
    built = sources.open_source("demo", "validation", str(data))
    memory = sources.open_source("demo", "validation", None)
    assert len(built) == 5 and len(memory) == sources.DEMO_SPLITS["validation"][1]
    for i in range(len(built)):
        example = built[i]
        _assert_same(example, memory[int(example["image_id"])])


def _write_coco(manual, num_images=3, size=96):
    """COCO 2017 layout: annotations/instances_val2017.json + val2017/ images."""
    (manual / "annotations").mkdir(parents=True)
    (manual / "val2017").mkdir()
    images, anns = [], []
    rng = np.random.default_rng(0)
    for i in range(num_images):
        name = f"{i + 1:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            manual / "val2017" / name)
        images.append({"id": i + 1, "file_name": name, "height": size, "width": size})
        for k, (x, y) in enumerate([(6, 8), (52, 48)]):
            w = 36 + 2 * i
            poly = [x, y, x + w, y, x + w, y + 36, x, y + 36]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1 + k,
                         "segmentation": [poly], "bbox": [x, y, w, 36], "iscrowd": 0,
                         "area": w * 36})
    (manual / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": anns,
                    "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))


def test_amodal_lvis_build_matches_synthesis(tmp_path, capsys):
    manual, data = tmp_path / "manual", tmp_path / "data"
    _write_coco(manual)
    assert build.main(["amodal_lvis/coco", "--manual_dir", str(manual), "--data_dir",
                       str(data), "--split", "validation"]) == 0
    out = capsys.readouterr().out
    expected = list(amodal_lvis.synthesize_from_coco(
        manual / "annotations" / "instances_val2017.json", manual / "val2017", seed=0))
    assert len(expected) > 3  # duals and synthesized occlusions
    assert f"written: {len(expected)}" in out
    built = sources.open_source("amodal_lvis/coco", "validation", str(data))
    by_id = {int(built[i]["image_id"]): built[i] for i in range(len(built))}
    assert len(by_id) == len(expected)
    for ref in expected:
        _assert_same(by_id[int(ref["image_id"])], ref)
    assert any((ref["objects"]["occlusion_rate"] > 0).any() for ref in expected)
