"""Tests for brats_cnn.data.labels: the conventions of SPEC.md, class indices, conversions, validation."""

from __future__ import annotations

import numpy as np
import pytest

from brats_cnn.data import labels as L
from brats_cnn.errors import InputError

# SPEC.md, "Data and labels": convention -> (labels, complete, core, enhancing)
SPEC_TABLE = {
    "brats2013": ((0, 1, 2, 3, 4), (1, 2, 3, 4), (1, 3, 4), (4,)),
    "brats2017": ((0, 1, 2, 4), (1, 2, 4), (1, 4), (4,)),
    "brats2023": ((0, 1, 2, 3), (1, 2, 3), (1, 3), (3,)),
    "msd": ((0, 1, 2, 3), (1, 2, 3), (2, 3), (3,)),
}
# tissue of each label value per convention, from SPEC.md
TISSUE = {
    "brats2013": {1: "necrosis", 2: "edema", 3: "non_enhancing", 4: "enhancing"},
    "brats2017": {1: "core_non_enhancing", 2: "edema", 4: "enhancing"},
    "brats2023": {1: "core_non_enhancing", 2: "edema", 3: "enhancing"},
    "msd": {1: "edema", 2: "core_non_enhancing", 3: "enhancing"},
}


def test_conventions_are_exactly_the_spec_table():
    assert set(L.CONVENTIONS) == set(SPEC_TABLE)
    assert L.REGIONS == ("complete", "core", "enhancing")
    for name, (values, complete, core, enhancing) in SPEC_TABLE.items():
        conv = L.get_convention(name)
        assert conv.labels == values and conv.num_classes == len(values)
        assert conv.regions == {"complete": complete, "core": core, "enhancing": enhancing}
        assert conv.tissues[0] == "background"
        assert dict(zip(conv.labels[1:], conv.tissues[1:])) == TISSUE[name]


def test_get_convention_is_case_insensitive_and_rejects_unknown():
    assert L.get_convention("BraTS2017") is L.CONVENTIONS["brats2017"]
    with pytest.raises(InputError) as info:
        L.get_convention("brats2020")
    assert str(info.value) == "unknown label convention 'brats2020' (expected one of: brats2013, brats2017, brats2023, msd)"


@pytest.mark.parametrize("name", list(SPEC_TABLE))
def test_region_masks_match_the_table_voxel_by_voxel(name):
    values, complete, core, enhancing = SPEC_TABLE[name]
    labels = np.array(values * 3, dtype=np.int16).reshape(3, len(values), 1)
    masks = L.region_masks(labels, name)
    assert list(masks) == ["complete", "core", "enhancing"]
    for region, members in (("complete", complete), ("core", core), ("enhancing", enhancing)):
        expected = np.isin(labels, members)
        np.testing.assert_array_equal(masks[region], expected)
        assert masks[region].dtype == bool
        np.testing.assert_array_equal(L.region_mask(labels, name, region), expected)
    # nesting: enhancing within core within complete
    assert not np.any(masks["enhancing"] & ~masks["core"]) and not np.any(masks["core"] & ~masks["complete"])


def test_unknown_region():
    with pytest.raises(InputError) as info:
        L.region_mask(np.zeros(3), "brats2017", "whole")
    assert str(info.value) == "unknown region 'whole' (expected one of: complete, core, enhancing)"


@pytest.mark.parametrize("name", list(SPEC_TABLE))
def test_class_index_round_trip(name):
    conv = L.get_convention(name)
    labels = np.array(conv.labels, dtype=np.int16)
    indices = L.to_class_indices(labels, name)
    assert indices.dtype == np.uint8
    np.testing.assert_array_equal(indices, np.arange(conv.num_classes))
    back = L.from_class_indices(indices, name)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, labels)
    volume = np.random.default_rng(0).choice(conv.labels, size=(5, 6, 7))
    np.testing.assert_array_equal(L.from_class_indices(L.to_class_indices(volume, conv), conv), volume)


def test_brats2017_label_4_is_class_3():
    np.testing.assert_array_equal(L.to_class_indices(np.array([4, 2, 1, 0]), "brats2017"), [3, 2, 1, 0])


@pytest.mark.parametrize("bad", [3, -1, 7])
def test_class_indices_reject_values_outside_the_convention(bad):
    # before the fix, 3 became background and -1 wrapped to the last class
    with pytest.raises(InputError) as info:
        L.to_class_indices(np.array([0, bad, 4]), "brats2017")
    assert str(info.value) == f"label values [{bad}] are not in the brats2017 convention (expected [0, 1, 2, 4])"


def test_brats2013_to_2017_merges_necrosis_and_non_enhancing():
    assert L.conversion_table("brats2013", "brats2017") == {0: 0, 1: 1, 2: 2, 3: 1, 4: 4}
    converted = L.convert_labels(np.array([0, 1, 2, 3, 4]), "brats2013", "brats2017")
    np.testing.assert_array_equal(converted, [0, 1, 2, 1, 4])
    assert converted.dtype == np.uint8
    assert L.conversion_table("brats2013", "brats2023") == {0: 0, 1: 1, 2: 2, 3: 1, 4: 3}
    assert L.conversion_table("brats2013", "msd") == {0: 0, 1: 2, 2: 1, 3: 2, 4: 3}


def test_brats2017_2023_msd_conversions_are_bijective_and_keep_regions():
    names = ("brats2017", "brats2023", "msd")
    assert L.conversion_table("brats2017", "brats2023") == {0: 0, 1: 1, 2: 2, 4: 3}
    assert L.conversion_table("brats2017", "msd") == {0: 0, 1: 2, 2: 1, 4: 3}
    assert L.conversion_table("brats2023", "msd") == {0: 0, 1: 2, 2: 1, 3: 3}
    for source in names:
        values = np.array(L.get_convention(source).labels)
        for target in names:
            table = L.conversion_table(source, target)
            assert sorted(table.values()) == sorted(L.get_convention(target).labels)  # bijective
            converted = L.convert_labels(values, source, target)
            np.testing.assert_array_equal(L.convert_labels(converted, target, source), values)
            for region in L.REGIONS:  # the regions mean the same voxels after conversion
                np.testing.assert_array_equal(L.region_mask(converted, target, region),
                                              L.region_mask(values, source, region))


def test_brats2013_regions_survive_conversion():
    values = np.array([0, 1, 2, 3, 4])
    converted = L.convert_labels(values, "brats2013", "brats2017")
    for region in L.REGIONS:
        np.testing.assert_array_equal(L.region_mask(converted, "brats2017", region),
                                      L.region_mask(values, "brats2013", region))


@pytest.mark.parametrize("source", ["brats2017", "brats2023", "msd"])
def test_conversion_to_brats2013_raises(source):
    with pytest.raises(InputError) as info:
        L.convert_labels(np.array([0, 1]), source, "brats2013")
    assert str(info.value) == (f"cannot convert labels from {source} to brats2013: "
                               "'core_non_enhancing' has no single counterpart")
    assert L.conversion_table("brats2013", "brats2013") == {0: 0, 1: 1, 2: 2, 3: 3, 4: 4}


def test_convert_rejects_values_outside_the_source_convention():
    with pytest.raises(InputError) as info:
        L.convert_labels(np.array([0, 3]), "brats2017", "msd")
    assert str(info.value) == "label values [3] are not in the brats2017 convention (expected [0, 1, 2, 4])"


def test_convert_does_not_mutate_input():
    labels = np.array([[0, 1], [2, 4]], dtype=np.int16)
    copy = labels.copy()
    L.convert_labels(labels, "brats2017", "msd")
    L.to_class_indices(labels, "brats2017")
    np.testing.assert_array_equal(labels, copy)


def test_validate_labels_accepts_integer_valued_and_returns_int16():
    out = L.validate_labels(np.array([0.0, 1.0, 2.0, 4.0], dtype=np.float32), "brats2017")
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, [0, 1, 2, 4])
    assert L.validate_labels(np.array([True, False]), "msd").dtype == np.int16


def test_validate_labels_messages():
    with pytest.raises(InputError) as info:
        L.validate_labels(np.array([0, 3, 5]), "brats2017", "seg.nii.gz")
    assert str(info.value) == ("seg.nii.gz: label values [3, 5] are not in the brats2017 convention "
                               "(expected [0, 1, 2, 4]); pass the right --label-convention")
    with pytest.raises(InputError) as info:
        L.validate_labels(np.array([0.0, 2.5]), "msd", "seg.nii.gz")
    assert str(info.value) == ("seg.nii.gz: label map has non-integer values (e.g. 2.5); "
                               "expected integer labels [0, 1, 2, 3] (msd)")
    with pytest.raises(InputError) as info:
        L.validate_labels(np.array([0.0, np.nan]), "msd")
    assert str(info.value) == "label map contains NaN or infinite values"


def test_class_strata_follow_each_conventions_regions():
    np.testing.assert_array_equal(L.class_strata("brats2017"), [0, 2, 1, 3])  # bg, core_non_enh, edema, enh
    np.testing.assert_array_equal(L.class_strata("msd"), [0, 1, 2, 3])  # bg, edema, non_enh, enh
    np.testing.assert_array_equal(L.class_strata("brats2013"), [0, 2, 1, 2, 3])


def test_region_decision_by_hand():
    # brats2017 class order: 0 bg, 1 core without enhancement, 2 edema, 3 enhancing; one voxel per column
    probs = np.array([[0.40, 0.50, 0.10, 0.10, 0.45],
                      [0.20, 0.10, 0.10, 0.30, 0.05],
                      [0.25, 0.30, 0.60, 0.20, 0.30],
                      [0.15, 0.10, 0.20, 0.40, 0.20]], dtype=np.float32)
    np.testing.assert_array_equal(L.classify(probs, "brats2017"), [0, 0, 2, 3, 0])
    # 1: tumour 0.60 > 0.40, core 0.35 > edema 0.25, enhancing 0.15 < 0.20 -> core without enhancement;
    # 2: tumour 0.50 = 0.50, a tie goes outward; 5: tumour 0.55 > 0.45, core 0.25 < edema 0.30
    np.testing.assert_array_equal(L.classify(probs, "brats2017", "regions"), [1, 0, 2, 3, 2])
    # brats2013: core minus enhancing holds necrosis and non-enhancing; the more probable one wins
    five = np.array([[0.30], [0.15], [0.20], [0.20], [0.15]], dtype=np.float32)
    np.testing.assert_array_equal(L.classify(five, "brats2013", "regions"), [3])
    with pytest.raises(InputError, match="unknown decision 'vote'"):
        L.classify(probs, "brats2017", "vote")
    with pytest.raises(InputError, match="brats2013 convention has 5 classes but the probabilities have 4"):
        L.classify(probs, "brats2013", "regions")


def test_region_decision_calls_tumour_wherever_background_is_below_one_half():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=(6, 7, 5)).transpose(3, 0, 1, 2).astype(np.float32)
    classes = L.classify(probs, "brats2023", "regions")
    assert classes.shape == (6, 7, 5) and classes.dtype == np.uint8
    np.testing.assert_array_equal(classes > 0, probs[0] < probs[1:].sum(axis=0))
    argmax = L.classify(probs, "brats2023")
    assert np.all((argmax > 0) <= (classes > 0))  # regions calls tumour wherever argmax does, and more
    assert np.count_nonzero(classes > 0) > np.count_nonzero(argmax > 0)
