"""Tests for brats_cnn.data.phantom: determinism, contrasts, labels, bias field, noise, scale, dataset writer."""

from __future__ import annotations

import numpy as np
import pytest

from brats_cnn.data import io
from brats_cnn.data import phantom as P
from brats_cnn.errors import InputError
from brats_cnn.data.labels import convert_labels

SHAPE = (32, 32, 20)


def test_shape_dtype_and_defaults():
    case = P.make_phantom(SHAPE, seed=0)
    assert case.image.shape == (4,) + SHAPE and case.image.dtype == np.float32
    assert case.label.shape == SHAPE and case.label.dtype == np.int16
    assert case.label_convention == "brats2017" and case.grade == "HGG" and case.case_id == "phantom_000"
    assert sorted(np.unique(case.label).tolist()) == [0, 1, 2, 4]
    assert case.affine.shape == (4, 4) and case.spacing == (1.0, 1.0, 1.0)
    assert int(case.header["qform_code"]) == 1 and int(case.header["sform_code"]) == 1


def test_default_size_is_small():
    # what keeps the default phantom quick to make (timing belongs in benchmarks): 64x64x40 voxels
    case = P.make_phantom(seed=1)
    assert case.image.shape == (4, 64, 64, 40) and case.image.nbytes == 4 * 64 * 64 * 40 * 4


def test_deterministic_by_seed_and_varies_with_it():
    a, b, c = P.make_phantom(SHAPE, seed=7), P.make_phantom(SHAPE, seed=7), P.make_phantom(SHAPE, seed=8)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    centres = [np.argwhere(case.label == 4).mean(axis=0) for case in (a, c)]
    assert np.abs(centres[0] - centres[1]).max() > 1.0  # tumour moved
    sizes = {int((P.make_phantom(SHAPE, seed=s).label > 0).sum()) for s in range(4)}
    assert len(sizes) == 4  # tumour size varies


def test_background_exactly_zero_and_brain_positive():
    case = P.make_phantom(SHAPE, seed=2, noise="gaussian", noise_level=0.5)
    brain = P.phantom_tissues(SHAPE, seed=2) > 0
    assert np.all(case.image[:, ~brain] == 0.0)
    assert np.all(case.image[:, brain] > 0.0)
    np.testing.assert_array_equal((case.image != 0).any(axis=0), brain)  # the project's brain mask
    assert np.all(case.label[~brain] == 0)  # tumour only inside the brain


def test_hgg_and_lgg_tissues():
    hgg = P.make_phantom(SHAPE, seed=0, grade="HGG", label_convention="brats2013")
    lgg = P.make_phantom(SHAPE, seed=0, grade="lgg", label_convention="brats2013")
    assert sorted(np.unique(hgg.label).tolist()) == [0, 1, 2, 3, 4]
    assert sorted(np.unique(lgg.label).tolist()) == [0, 2, 3, 4]  # no necrosis
    assert (lgg.label == 4).sum() < (hgg.label == 4).sum()  # thinner enhancing rim
    assert lgg.grade == "LGG"


@pytest.mark.parametrize("convention", ["brats2017", "brats2023", "msd"])
def test_label_conventions_are_conversions_of_brats2013(convention):
    source = P.make_phantom(SHAPE, seed=4, label_convention="brats2013")
    converted = P.make_phantom(SHAPE, seed=4, label_convention=convention)
    np.testing.assert_array_equal(converted.label, convert_labels(source.label, "brats2013", convention))
    np.testing.assert_array_equal(converted.image, source.image)
    assert converted.label_convention == convention


def test_noise_free_contrasts_are_the_table():
    case = P.make_phantom(SHAPE, seed=3, noise="none", bias_strength=0.0)
    tissues = P.phantom_tissues(SHAPE, seed=3)
    for tissue, contrast in P.CONTRASTS.items():
        voxels = case.image[:, tissues == tissue]
        assert voxels.shape[1] > 0, tissue
        expected = np.float32(P.BASE_INTENSITY) * np.asarray(contrast, dtype=np.float32)[:, None]
        np.testing.assert_allclose(voxels, np.broadcast_to(expected, voxels.shape), rtol=1e-6)
    # sequences tell the tumour compartments apart as in real MRI
    assert P.CONTRASTS[P.ENHANCING][1] == max(P.CONTRASTS[t][1] for t in P.CONTRASTS)  # enhancing brightest on T1c
    assert P.CONTRASTS[P.EDEMA][3] > P.CONTRASTS[P.WHITE_MATTER][3]  # edema bright on FLAIR
    assert len({P.CONTRASTS[t] for t in P.CONTRASTS}) == len(P.CONTRASTS)  # all tissues distinct


def test_bias_field_is_smooth_bounded_and_multiplicative():
    field = P.bias_field(SHAPE, seed=5, strength=0.3)
    assert field.shape == SHAPE and field.dtype == np.float32
    assert np.exp(-0.3) - 1e-6 <= field.min() and field.max() <= np.exp(0.3) + 1e-6
    assert max(field.max(), 1 / field.min()) == pytest.approx(np.exp(0.3), rel=1e-5)  # peak reaches strength
    assert np.abs(np.diff(np.log(field), axis=0)).max() < 0.1  # smooth: small voxel-to-voxel change
    np.testing.assert_array_equal(P.bias_field(SHAPE, seed=5, strength=0.0), np.ones(SHAPE, np.float32))
    flat = P.make_phantom(SHAPE, seed=5, noise="none", bias_strength=0.0)
    biased = P.make_phantom(SHAPE, seed=5, noise="none", bias_strength=0.3)
    brain = flat.image[0] > 0
    np.testing.assert_allclose(biased.image[:, brain] / flat.image[:, brain], np.broadcast_to(field[brain], (4, brain.sum())),
                               rtol=1e-5)


def test_noise_levels():
    clean = P.make_phantom(SHAPE, seed=6, noise="none", bias_strength=0.0)
    brain = clean.image[0] > 0
    for model in ("gaussian", "rician"):
        noisy = P.make_phantom(SHAPE, seed=6, noise=model, noise_level=0.02, bias_strength=0.0)
        residual = (noisy.image - clean.image)[:, brain]
        assert residual.std() == pytest.approx(0.02 * P.BASE_INTENSITY, rel=0.1), model
    rician = P.make_phantom(SHAPE, seed=6, noise="rician", noise_level=0.2, bias_strength=0.0)
    assert np.all(rician.image[:, brain] > 0)  # magnitude data


def test_intensity_scale_global_per_sequence_and_random():
    base = P.make_phantom(SHAPE, seed=9)
    doubled = P.make_phantom(SHAPE, seed=9, intensity_scale=2.0)
    np.testing.assert_allclose(doubled.image, 2 * base.image, rtol=1e-6)
    per_sequence = P.make_phantom(SHAPE, seed=9, intensity_scale=(1, 2, 3, 4))
    for index in range(4):
        np.testing.assert_allclose(per_sequence.image[index], (index + 1) * base.image[index], rtol=1e-6)
    brain = base.image[0] > 0
    ratios = []
    for seed in (9, 10):
        scaled = P.make_phantom(SHAPE, seed=seed, intensity_scale=None)
        reference = P.make_phantom(SHAPE, seed=seed)
        ratio = np.median(scaled.image[:, brain] / reference.image[:, brain], axis=1)
        assert np.all((ratio >= P.RANDOM_SCALE_RANGE[0]) & (ratio <= P.RANDOM_SCALE_RANGE[1]))
        ratios.append(ratio)
    assert not np.allclose(ratios[0], ratios[1])  # scales differ between cases
    np.testing.assert_array_equal(P.make_phantom(SHAPE, seed=9, intensity_scale=None).image,
                                  P.make_phantom(SHAPE, seed=9, intensity_scale=None).image)


def test_spacing_and_affine():
    case = P.make_phantom(SHAPE, seed=0, spacing=(0.5, 0.5, 2.0))
    assert case.spacing == (0.5, 0.5, 2.0)
    np.testing.assert_allclose(case.affine, [[-0.5, 0, 0, 15.5], [0, -0.5, 0, 15.5], [0, 0, 2, 0], [0, 0, 0, 1]])


def test_bad_arguments():
    with pytest.raises(InputError, match="^unknown grade 'GBM' \\(expected HGG or LGG\\)$"):
        P.make_phantom(SHAPE, grade="gbm")
    with pytest.raises(InputError, match="^unknown noise model 'salt' \\(expected rician, gaussian or none\\)$"):
        P.make_phantom(SHAPE, noise="salt")


def test_write_dataset_manifest_and_natural_conventions(tmp_path):
    refs = P.write_phantom_dataset(tmp_path / "d", 4, "brats2023", seed=3, shape=(12, 12, 6))
    assert [r.case_id for r in refs] == ["Phantom_003", "Phantom_004", "Phantom_005", "Phantom_006"]
    assert (tmp_path / "d" / "manifest.csv").read_text() == (
        "case_id,grade\nPhantom_003,HGG\nPhantom_004,LGG\nPhantom_005,HGG\nPhantom_006,LGG\n")
    case = io.load_case(refs[0], label_convention="brats2023")
    expected = P.make_phantom((12, 12, 6), seed=3, label_convention="brats2023")
    np.testing.assert_array_equal(case.image, expected.image)
    np.testing.assert_array_equal(case.label, expected.label)
    assert P.NATURAL_CONVENTION == {"brats2017": "brats2017", "brats2023": "brats2023", "nnunet": "brats2017",
                                    "msd": "msd", "brats2013": "brats2013"}


def test_write_dataset_options(tmp_path):
    refs = P.write_phantom_dataset(tmp_path, 2, "msd", shape=(12, 12, 6), grades=["LGG", "LGG"],
                                   label_convention="brats2017", write_manifest=False, noise="none")
    assert not (tmp_path / "manifest.csv").exists()
    case = io.load_case(refs[1], label_convention="brats2017")
    assert case.grade is None  # no manifest
    np.testing.assert_array_equal(case.image, P.make_phantom((12, 12, 6), seed=1, grade="LGG", noise="none").image)
    with pytest.raises(InputError) as info:
        P.write_phantom_dataset(tmp_path, 1, "bids")
    assert str(info.value) == f"{tmp_path}: unknown layout 'bids' (expected one of: brats2017, brats2023, nnunet, msd, brats2013)"
