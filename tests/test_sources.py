"""open_source: the in-memory demo, clear errors for missing builds, empty records."""

import numpy as np
import pytest

from datasets import build
from sameo_jax.data import sources
from sameo_jax.data.demo_scenes import DemoSource


def test_demo_needs_no_build():
    train = sources.open_source("demo", "train", None)
    assert isinstance(train, DemoSource)
    assert (len(train), train.seed, train.image_size) == (2000, 0, 256)
    val = sources.open_source("demo", "validation")
    assert (len(val), val.seed) == (200, 1)
    ex = val[3]
    assert ex["image"].shape == (256, 256, 3) and ex["image"].dtype == np.uint8
    assert not np.array_equal(ex["image"], train[3]["image"])
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        sources.open_source("demo", "dev")


def test_missing_data_set_names_build_command(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        sources.open_source("cocoa", "train", str(tmp_path))
    msg = str(e.value)
    assert "no built data set 'cocoa'" in msg
    assert f"python -m datasets.build cocoa --manual_dir <release folder> --data_dir {tmp_path}" \
        in msg
    with pytest.raises(FileNotFoundError, match="datasets.build kins/update_2020"):
        sources.open_source("kins/update_2020", "train", str(tmp_path))


def test_missing_split_names_build_command(tmp_path, capsys):
    assert build.main(["demo", "--data_dir", str(tmp_path), "--split", "test",
                       "--max_images", "2"]) == 0
    capsys.readouterr()
    assert len(sources.open_source("demo", "test", str(tmp_path))) == 2
    with pytest.raises(ValueError) as e:
        sources.open_source("demo", "train", str(tmp_path))
    assert "split 'train' not built" in str(e.value) and "(has: test)" in str(e.value)
    assert "--split train" in str(e.value)


def test_to_schema_without_objects():
    record = {"image": np.zeros((4, 5, 3), np.uint8), "image_id": 7, "source": b"x",
              "objects": {"amodal_mask": [], "visible_mask": [], "amodal_bbox": [],
                          "visible_bbox": [], "category_id": [], "occlusion_rate": []}}
    ex = sources.to_schema(record)
    assert ex["source"] == "x" and ex["image_id"] == 7
    o = ex["objects"]
    assert o["amodal_mask"].shape == (0, 4, 5) and o["amodal_mask"].dtype == bool
    assert o["amodal_bbox"].shape == (0, 4) and o["amodal_bbox"].dtype == np.float32
    assert o["category_id"].dtype == np.int64 and o["occlusion_rate"].dtype == np.float32
