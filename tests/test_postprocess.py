"""Tests for brats_cnn.inference.postprocess: small-component removal on hand-built label maps."""

from __future__ import annotations

import numpy as np
import pytest

from brats_cnn.errors import ConfigError
from brats_cnn.inference.postprocess import component_sizes, remove_small_components


def _bar(volume: np.ndarray, start: tuple[int, int, int], length: int, value: int) -> None:
    """Write a 1-voxel-thick bar of ``length`` voxels along x (test helper; mutates ``volume``)."""
    x, y, z = start
    volume[x:x + length, y, z] = value


def test_threshold_is_strict_minus_one_removed_equal_and_plus_one_kept():
    labels = np.zeros((20, 10, 10), dtype=np.int16)
    _bar(labels, (0, 1, 1), 9, 2)   # threshold - 1
    _bar(labels, (0, 4, 4), 10, 4)  # threshold
    _bar(labels, (0, 7, 7), 11, 1)  # threshold + 1
    out = remove_small_components(labels, min_voxels=10)
    assert out[:, 1, 1].sum() == 0
    assert (out[:10, 4, 4] == 4).all() and out[:, 4, 4].sum() == 40
    assert (out[:11, 7, 7] == 1).all()
    assert np.count_nonzero(out) == 21


def test_all_tumour_labels_count_together_and_values_are_kept():
    labels = np.zeros((12, 4, 4), dtype=np.uint8)
    labels[0:4, 1, 1] = 1
    labels[4:8, 1, 1] = 2
    labels[8:10, 1, 1] = 4  # one component of 10 voxels made of three labels
    out = remove_small_components(labels, min_voxels=10)
    np.testing.assert_array_equal(out, labels)
    assert out.dtype == np.uint8
    assert np.count_nonzero(remove_small_components(labels, min_voxels=11)) == 0


def test_input_not_modified_and_new_array_returned():
    labels = np.zeros((6, 6, 6), dtype=np.int16)
    labels[1, 1, 1] = 2
    before = labels.copy()
    out = remove_small_components(labels, min_voxels=5)
    np.testing.assert_array_equal(labels, before)
    assert out is not labels and np.count_nonzero(out) == 0


def _touching_cubes(kind: str) -> np.ndarray:
    """Two 3x3x3 cubes (27 voxels each) that share an edge or only a corner."""
    labels = np.zeros((10, 10, 10), dtype=np.int16)
    labels[1:4, 1:4, 1:4] = 1
    if kind == "edge":
        labels[4:7, 4:7, 1:4] = 2  # touches along the z-edge at x=3|4, y=3|4
    else:
        labels[4:7, 4:7, 4:7] = 2  # touches only at the corner (3,3,3)|(4,4,4)
    return labels


@pytest.mark.parametrize("kind, connectivity, expected_components", [
    ("edge", 1, 2), ("edge", 2, 1), ("edge", 3, 1),
    ("corner", 1, 2), ("corner", 2, 2), ("corner", 3, 1),
])
def test_connectivity_of_cubes_touching_at_edge_or_corner(kind, connectivity, expected_components):
    labels = _touching_cubes(kind)
    _components, sizes = component_sizes(labels != 0, connectivity)
    assert len(sizes) - 1 == expected_components
    # 27-voxel cubes: separate ones are removed at t=28, a merged 54-voxel one survives.
    out = remove_small_components(labels, min_voxels=28, connectivity=connectivity)
    assert np.count_nonzero(out) == (54 if expected_components == 1 else 0)


def test_min_voxels_of_one_or_less_removes_nothing():
    rng = np.random.default_rng(0)
    labels = (rng.random((8, 8, 8)) < 0.2).astype(np.int16) * 2
    np.testing.assert_array_equal(remove_small_components(labels, 1), labels)
    np.testing.assert_array_equal(remove_small_components(labels, 0), labels)


def test_bad_connectivity_is_a_config_error():
    with pytest.raises(ConfigError, match="connectivity"):
        remove_small_components(np.zeros((3, 3, 3), dtype=np.int16), 10, connectivity=4)


def _blobs(sizes_and_corners):
    labels = np.zeros((30, 30, 30), dtype=np.int16)
    for (side, (x, y, z)) in sizes_and_corners:
        labels[x:x + side, y:y + side, z:z + side] = 2
    return labels


def test_a_small_tumour_is_never_removed_entirely():
    from brats_cnn.config import PostprocessConfig
    from brats_cnn.inference.postprocess import postprocess_labels, postprocess_with_report

    labels = _blobs([(4, (0, 0, 0)), (5, (10, 10, 10)), (3, (20, 20, 20))])  # 64, 125 and 27 voxels, all < t_vol
    kept, report = postprocess_with_report(labels, PostprocessConfig(min_component_voxels=10_000))
    assert np.count_nonzero(kept) == 125 and (kept[10:15, 10:15, 10:15] == 2).all()
    assert report == {"removed_voxels": 91, "removed_components": 2, "kept_voxels": 125, "never_empty_applied": True,
                      "removed_without_core": 0}
    strict = PostprocessConfig(min_component_voxels=10_000, never_empty=False)  # the paper's rule as written
    assert np.count_nonzero(postprocess_labels(labels, strict)) == 0
    # a component at or above t_vol: the rule as before, nothing rescued
    kept, report = postprocess_with_report(labels, PostprocessConfig(min_component_voxels=100))
    assert np.count_nonzero(kept) == 125 and report["never_empty_applied"] is False and report["removed_voxels"] == 91
    empty, report = postprocess_with_report(np.zeros((4, 4, 4), dtype=np.int16), PostprocessConfig())
    assert not empty.any() and report["never_empty_applied"] is False


def test_require_core_removes_edema_only_components_of_any_size_and_keeps_satellites_with_core():
    from brats_cnn.config import PostprocessConfig
    from brats_cnn.inference.postprocess import core_of, postprocess_with_report

    # class indices of brats2017: 1 necrosis / non-enhancing, 2 edema, 3 enhancing; core = 1 and 3
    labels = _blobs([(6, (0, 0, 0)), (5, (10, 10, 10)), (3, (20, 20, 20))])  # 216, 125 and 27 voxels of edema
    labels[2, 2, 2] = 3   # the largest component has an enhancing voxel
    labels[21, 21, 21] = 1  # so has the small satellite; the middle one is edema only
    core = core_of(labels, "brats2017")
    assert np.count_nonzero(core) == 2
    config = PostprocessConfig(min_component_voxels=0, require_core=True)
    kept, report = postprocess_with_report(labels, config, core)
    assert np.count_nonzero(kept) == 216 + 27 and not kept[10:15, 10:15, 10:15].any()
    assert report["removed_voxels"] == 125 and report["removed_components"] == 1 and report["removed_without_core"] == 1
    # the label convention instead of the mask derives the same core (what segment and calibrate pass)
    by_convention, same_report = postprocess_with_report(labels, config, convention="brats2017")
    assert np.array_equal(by_convention, kept) and same_report == report
    # with t_vol 100 the 27-voxel satellite goes for its size; only the 125-voxel one counts as without core
    kept, report = postprocess_with_report(labels, PostprocessConfig(min_component_voxels=100, require_core=True), core)
    assert np.count_nonzero(kept) == 216 and report["removed_components"] == 2 and report["removed_without_core"] == 1
    # edema only everywhere: never empty keeps the largest component, and says so
    edema = np.where(labels > 0, 2, 0)
    kept, report = postprocess_with_report(edema, config, core_of(edema, "brats2017"))
    assert np.count_nonzero(kept) == 216 and report["never_empty_applied"] is True
    # off (the default) it changes nothing; on, it needs the core mask
    assert np.count_nonzero(postprocess_with_report(labels, PostprocessConfig(min_component_voxels=0))[0]) == 368
    with pytest.raises(ValueError, match="require_core needs the tumour-core mask"):
        postprocess_with_report(labels, config)


@pytest.mark.parametrize("t_vol", [0, 30, 100, 200])
def test_postprocess_with_report_equals_removal_then_keep_largest(t_vol):
    from brats_cnn.config import PostprocessConfig
    from brats_cnn.inference.postprocess import keep_largest_component, postprocess_with_report

    rng = np.random.default_rng(t_vol)
    labels = (rng.random((20, 20, 20)) < 0.3).astype(np.int16) * rng.integers(1, 4, (20, 20, 20)).astype(np.int16)
    for keep_largest in (False, True):
        config = PostprocessConfig(min_component_voxels=t_vol, keep_largest=keep_largest, never_empty=False)
        expected = remove_small_components(labels, t_vol)
        expected = keep_largest_component(expected) if keep_largest else expected
        kept, report = postprocess_with_report(labels, config)
        np.testing.assert_array_equal(kept, expected)
        assert report["removed_voxels"] == np.count_nonzero(labels) - np.count_nonzero(expected)
