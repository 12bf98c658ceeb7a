"""Converter: official .pt / .npz -> Flax params, safety of the unpickler, orbax round trip."""

import pickle
import zipfile

import jax
import numpy as np
import pytest

from sameo_jax import model_io
from sameo_jax.models.config import model_config
from sameo_jax.models.efficient_sam import param_shapes

WEIGHTS = "synthetic_weights/synthetic_efficient_sam_vitt"


@pytest.fixture(scope="module")
def state_dict(reference_dir):
    return model_io.read_state_dict(reference_dir / f"{WEIGHTS}.npz")


def _leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_pt_and_npz_give_identical_params(reference_dir, state_dict):
    from_pt = model_io.read_state_dict(reference_dir / f"{WEIGHTS}.pt")
    assert set(from_pt) == set(state_dict) and len(state_dict) == 278
    for key, value in state_dict.items():
        np.testing.assert_array_equal(from_pt[key], value, err_msg=key)
    config, params = model_io.load_model(reference_dir / f"{WEIGHTS}.pt")
    assert config == model_config("vitt")
    leaves = _leaves(params)
    assert len(leaves) == 278
    assert sum(v.size for v in leaves.values()) == 10_223_460


def test_layouts_are_transposed_correctly(state_dict):
    params = model_io.convert_state_dict(state_dict, model_config("vitt"))
    enc, dec = params["image_encoder"], params["mask_decoder"]
    np.testing.assert_array_equal(enc["blocks_3"]["qkv"]["kernel"],
                                  state_dict["image_encoder.blocks.3.attn.qkv.weight"].T)
    np.testing.assert_array_equal(
        enc["patch_embed"]["kernel"],
        state_dict["image_encoder.patch_embed.proj.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        dec["upscale_conv1"]["kernel"],
        state_dict["mask_decoder.final_output_upscaling_layers.0.0.weight"].transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(dec["upscale_norm"]["scale"],
                                  state_dict["mask_decoder.final_output_upscaling_layers.0.1.weight"])
    np.testing.assert_array_equal(
        params["prompt_encoder"]["gaussian_matrix"],
        state_dict["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"])


def test_pt_inside_zip_is_read(reference_dir, tmp_path, state_dict):
    wrapped = tmp_path / "efficient_sam_vitt.pt.zip"
    with zipfile.ZipFile(wrapped, "w") as z:
        z.write(reference_dir / f"{WEIGHTS}.pt", "weights/efficient_sam_vitt.pt")
    got = model_io.read_state_dict(wrapped)
    np.testing.assert_array_equal(got["mask_decoder.iou_token.weight"],
                                  state_dict["mask_decoder.iou_token.weight"])


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pt"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"model": Exploit()}, protocol=2))
        z.writestr("evil/byteorder", "little")
    with pytest.raises(model_io.UnsafeCheckpointError, match="refusing to load 'posix.system'"):
        model_io.read_state_dict(bad)
    assert not marker.exists()


def test_npz_with_pickled_objects_is_refused(tmp_path):
    bad = tmp_path / "objects.npz"
    np.savez(bad, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(model_io.CheckpointError, match="without pickles"):
        model_io.read_state_dict(bad)


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a zip")
    with pytest.raises(model_io.CheckpointError, match="not a zip archive"):
        model_io.read_state_dict(junk)
    with pytest.raises(model_io.CheckpointError, match="not found"):
        model_io.read_state_dict(tmp_path / "missing.pt")


def test_missing_extra_and_misshaped_keys_are_named(state_dict):
    config = model_config("vitt")
    missing = dict(state_dict)
    del missing["mask_decoder.transformer.layers.1.norm3.bias"]
    missing_name = r"missing parameters \['mask_decoder.transformer.layers_1.norm3.bias'"
    with pytest.raises(model_io.CheckpointError, match=missing_name):
        model_io.convert_state_dict(missing, config)
    extra = dict(state_dict, **{"mask_decoder.extra_head.weight": np.zeros(3, np.float32)})
    with pytest.raises(model_io.CheckpointError, match="unexpected keys.*extra_head"):
        model_io.convert_state_dict(extra, config)
    bad = dict(state_dict)
    bad["mask_decoder.iou_token.weight"] = np.zeros((2, 256), np.float32)
    with pytest.raises(model_io.CheckpointError, match=r"iou_token.weight has shape"):
        model_io.convert_state_dict(bad, config)


def test_wrong_variant_is_named(state_dict, reference_dir):
    with pytest.raises(model_io.CheckpointError,
                       match="this is a ViT-T checkpoint, you asked for ViT-S"):
        model_io.load_model(reference_dir / f"{WEIGHTS}.npz", "vits")
    fake_vits = dict(state_dict)
    fake_vits["image_encoder.patch_embed.proj.weight"] = np.zeros((384, 3, 16, 16), np.float32)
    with pytest.raises(model_io.CheckpointError,
                       match="this is a ViT-S checkpoint, you asked for ViT-T"):
        model_io.convert_state_dict(fake_vits, model_config("vitt"), variant="vitt")


def test_vits_structure_matches_official_key_list(reference_dir):
    """ViT-S from the same code: every official key maps to a param of the right shape."""
    expected = {k: tuple(v.shape) for k, v in model_io._flatten(
        param_shapes(model_config("vits"))).items()}
    seen, trainable = {}, 0
    for line in (reference_dir / "efficient_sam_vits_keys.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _, kind, _ = line.split("\t")
        shape = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        path = model_io._flax_path(key)
        converted = model_io._to_flax_layout(key, np.zeros(shape, np.float32), path)
        seen[path] = converted.shape
        trainable += int(np.prod(shape)) if kind == "param" else 0
    assert seen == expected
    assert trainable == 26_413_028
    assert sum(int(np.prod(s)) for s in expected.values()) == 26_413_028 + 256


def test_orbax_round_trip_and_no_overwrite(tmp_path):
    config = model_config("tiny")
    from sameo_jax.models.efficient_sam import init_params

    params = init_params(config, jax.random.key(1))
    out = model_io.save_params(params, tmp_path / "ckpt", config)
    got_config, got = model_io.load_model(out)
    assert got_config == config
    a, b = _leaves(params), _leaves(got)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    with pytest.raises(FileExistsError, match="not empty"):
        model_io.save_params(params, out, config)


def test_converter_cli(reference_dir, tmp_path, capsys):
    out = tmp_path / "converted"
    model_io.main([str(reference_dir / f"{WEIGHTS}.pt"), str(out)])
    assert "10,223,460 parameters" in capsys.readouterr().out
    config, params = model_io.load_model(out, "vitt")
    assert config == model_config("vitt")
    with pytest.raises(SystemExit, match="not empty"):
        model_io.main([str(reference_dir / f"{WEIGHTS}.pt"), str(out)])


def test_param_shapes_then_init_params():
    """Shapes first (an abstract trace, as loading a checkpoint does), then a real init of
    the same config in the same process: the cached init must not hold leaked tracers."""
    from sameo_jax.models.efficient_sam import init_params

    config = model_config("tiny", iou_head_hidden=48)  # a config no other test builds
    shapes = param_shapes(config)
    params = init_params(config, jax.random.key(0))
    assert (jax.tree_util.tree_map(lambda p: p.shape, params)
            == jax.tree_util.tree_map(lambda s: s.shape, shapes))
