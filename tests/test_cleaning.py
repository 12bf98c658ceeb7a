"""SAMEO cleaning rules: each rule's threshold, rule order and reasons."""

import numpy as np
import pytest

from datasets import cleaning


def _table(**overrides):
    n = 6
    t = {
        "name": np.array(["cup", "wall-other", "Floor", "person", "ceiling tile", "wallet"],
                         dtype=object),
        "is_stuff": np.array([False, True, False, False, False, False]),
        "amodal_area": np.array([100, 100, 100, 100, 0, 2000], np.int64),
        "visible_area": np.array([100, 50, 4, 6, 0, 100], np.int64),
        "occlusion_rate": np.array([0.0, 0.5, 0.96, 0.94, 0.0, 0.95], np.float32),
        "image_area": np.full(n, 10000, np.int64),
    }
    t.update(overrides)
    return t


def test_each_rule_alone():
    t, cfg = _table(), cleaning.default_config()
    assert cleaning.drop_empty_amodal(t, cfg).tolist() == [1, 1, 1, 1, 0, 1]
    assert cleaning.drop_stuff(t, cfg).tolist() == [1, 0, 1, 1, 1, 1]
    # Word match: 'wall-other', 'Floor', 'ceiling tile' are architectural; 'wallet' is not.
    assert cleaning.drop_architectural(t, cfg).tolist() == [1, 0, 0, 1, 0, 1]
    # visible / amodal >= 0.05: 4/100 fails, 6/100 passes, 100/2000 = 0.05 passes.
    assert cleaning.drop_tiny_visible(t, cfg).tolist() == [1, 1, 0, 1, 0, 1]
    cfg.walt_min_occupancy = 0.01  # amodal / image >= 1 %
    assert cleaning.drop_walt_occupancy(t, cfg).tolist() == [1, 1, 1, 1, 0, 1]
    cfg.walt_max_occlusion = 0.95
    assert cleaning.drop_walt_occlusion(t, cfg).tolist() == [1, 1, 0, 1, 1, 1]


def test_apply_rules_reports_first_rule_in_order():
    keep, reasons = cleaning.apply_rules(
        _table(), ["empty_amodal", "stuff", "architectural", "tiny_visible"]
    )
    assert keep.tolist() == [True, False, False, True, False, True]
    assert reasons == [None, "stuff", "architectural", None, "empty_amodal", None]


def test_threshold_is_configurable():
    cfg = cleaning.default_config()
    cfg.min_visible_fraction = 0.07
    keep, reasons = cleaning.apply_rules(_table(), ["tiny_visible"], cfg)
    assert reasons == [None, None, "tiny_visible", "tiny_visible", "tiny_visible",
                       "tiny_visible"]
    assert keep.sum() == 2


def test_unknown_rule_is_named():
    with pytest.raises(ValueError, match="unknown cleaning rule 'nope'"):
        cleaning.apply_rules(_table(), ["nope"])


def test_make_table_from_masks():
    amodal = np.zeros((2, 4, 5), bool)
    amodal[0, :2, :] = True  # 10 px
    amodal[1, 1:3, 1:3] = True  # 4 px
    visible = amodal.copy()
    visible[0, 0, :] = False  # 5 px visible
    t = cleaning.make_table(amodal, visible, names=["a", "b"])
    assert t["amodal_area"].tolist() == [10, 4]
    assert t["visible_area"].tolist() == [5, 4]
    np.testing.assert_allclose(t["occlusion_rate"], [0.5, 0.0])
    assert t["image_area"].tolist() == [20, 20]
    empty = cleaning.make_table(np.zeros((0, 4, 5), bool), np.zeros((0, 4, 5), bool))
    keep, reasons = cleaning.apply_rules(empty, ["stuff", "tiny_visible"])
    assert keep.shape == (0,) and reasons == []
