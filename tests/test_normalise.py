"""Tests for brats_cnn.preprocessing.normalise: N4, Nyul fit/apply, z-score, NormaliserState."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from brats_cnn.config import N4Config, NyulConfig, PreprocessConfig
from brats_cnn.errors import BratsCnnError, InputError
from brats_cnn.preprocessing.normalise import NORMALISER_VERSION, NormaliserState, brain_mask, case_statistics, fit_normaliser, CaseStatistics, load_normaliser, normalise_case, save_normaliser, sequence_coverage, sequence_moments, state_from_statistics, zscore
from brats_cnn.preprocessing.nyul import sequence_data_mask
from brats_cnn.preprocessing.nyul import apply_nyul, fit_nyul, image_landmarks, piecewise_linear
from brats_cnn.preprocessing.bias import correct_bias, n4_correct
from brats_cnn.data.phantom import WHITE_MATTER, bias_field, make_phantom, phantom_tissues

SHAPE = (32, 32, 20)
# two fitting levels: on a 48-voxel phantom the 4-level ITK default fits tissue edges as "bias"
FAST_N4 = N4Config(iterations=(30, 30), shrink_factor=2)
FAST = PreprocessConfig(n4=FAST_N4)


def _blob(shape=SHAPE, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth positive volume inside an ellipsoid mask (continuous histogram, no ties)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.ix_(*[np.linspace(-1, 1, n) for n in shape])
    mask = (x * x + y * y + z * z) < 0.8
    image = (100 + 50 * x + 30 * y * y + 20 * z + rng.normal(0, 5, shape)).astype(np.float32)
    return np.where(mask, image, 0).astype(np.float32), np.broadcast_to(mask, shape).copy()


# --- brain mask ------------------------------------------------------------------------------

def test_brain_mask_is_any_sequence_nonzero():
    image = np.zeros((4, 3, 3, 2), np.float32)
    image[0, 0, 0, 0] = 5
    image[3, 2, 2, 1] = -1
    mask = brain_mask(image)
    assert mask.dtype == bool and mask.shape == (3, 3, 2)
    assert mask.sum() == 2 and mask[0, 0, 0] and mask[2, 2, 1]


# --- N4 --------------------------------------------------------------------------------------

def test_n4_reduces_multiplicative_bias_in_homogeneous_tissue():
    shape = (48, 48, 32)
    case = make_phantom(shape, seed=3, bias_strength=0.4, noise="rician", noise_level=0.02)
    white = phantom_tissues(shape, 3) == WHITE_MATTER
    mask = brain_mask(case.image)
    before = case.image[0]
    after = n4_correct(before, mask, FAST_N4)

    def cv(a):
        return a[white].std() / a[white].mean()
    # noise alone gives a CV of ~0.03; the bias field adds ~0.045 on top
    assert cv(before) > 0.05
    assert cv(after) < 0.7 * cv(before)
    estimated_log_field = np.log(before[mask] / after[mask])
    true_log_field = np.log(bias_field(shape, 3, 0.4)[mask])
    assert np.corrcoef(estimated_log_field, true_log_field)[0, 1] > 0.9
    assert after.dtype == np.float32 and np.all(after[~mask] == 0)


def test_n4_does_not_modify_input_and_rejects_empty_mask():
    image, mask = _blob()
    original = image.copy()
    n4_correct(image, mask, FAST_N4)
    assert np.array_equal(image, original)
    with pytest.raises(InputError, match="no positive voxels"):
        n4_correct(image, np.zeros_like(mask), FAST_N4, source="case_x")


# --- Nyul ------------------------------------------------------------------------------------

def test_piecewise_linear_interpolates_and_extrapolates_linearly():
    out = piecewise_linear(np.array([-1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0]), [0, 1, 2], [0, 10, 30])
    np.testing.assert_allclose(out, [-10, 0, 5, 10, 20, 30, 50])
    assert out.dtype == np.float32


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.1, 10), min_size=2, max_size=6), st.lists(st.floats(0.1, 10), min_size=2, max_size=6),
       st.lists(st.floats(-100, 200), min_size=2, max_size=30))
def test_piecewise_linear_is_monotone(gaps_in, gaps_out, values):
    n = min(len(gaps_in), len(gaps_out))
    xp, fp = np.cumsum(gaps_in[:n]), np.cumsum(gaps_out[:n])
    x = np.sort(np.asarray(values))
    y = piecewise_linear(x, xp, fp).astype(np.float64)
    assert np.all(np.diff(y) >= -1e-4 * (1 + np.abs(y[1:])))


def test_fit_nyul_standard_of_uniform_images_is_the_scale():
    nyul = NyulConfig()
    values = np.linspace(0, 1, 10_001, dtype=np.float64).reshape(1, 1, -1) * 1000 + 1
    mask = np.ones(values.shape, bool)
    standard = fit_nyul([values, 3 * values + 7], [mask, mask], nyul)
    p = np.array(standard.percentiles)
    expected = nyul.s1 + (p - nyul.pc1) / (nyul.pc2 - nyul.pc1) * (nyul.s2 - nyul.s1)
    np.testing.assert_allclose(standard.landmarks, expected, atol=1e-9)
    assert standard.landmarks[0] == nyul.s1 and standard.landmarks[-1] == pytest.approx(nyul.s2)


def test_nyul_brings_differently_scaled_copies_to_the_same_landmarks():
    image, mask = _blob(seed=1)
    other, _ = _blob(seed=2)
    copies = [image, 3.0 * image, np.where(mask, 0.5 * image + 40, 0), np.where(mask, other ** 1.3, 0)]
    standard = fit_nyul(copies, [mask] * len(copies), NyulConfig())
    outputs = [apply_nyul(c, mask, standard) for c in copies]
    for out in outputs:
        np.testing.assert_allclose(image_landmarks(out, mask, standard.percentiles), standard.landmarks, atol=0.05)
    # affine copies of one image become the same image
    np.testing.assert_allclose(outputs[1][mask], outputs[0][mask], atol=1e-3)
    np.testing.assert_allclose(outputs[2][mask], outputs[0][mask], atol=1e-3)


def test_apply_nyul_is_pure_and_repeatable():
    image, mask = _blob()
    standard = fit_nyul([image], [mask], NyulConfig())
    frozen = copy.deepcopy(standard)
    original = image.copy()
    first, second = apply_nyul(image, mask, standard), apply_nyul(image, mask, standard)
    assert np.array_equal(first, second) and np.array_equal(image, original) and standard == frozen


@pytest.mark.parametrize("make, match", [
    (lambda img, m: (np.where(m, 7.0, 0).astype(np.float32), m), "landmarks repeat"),
    (lambda img, m: (np.where(m & (np.arange(img.shape[0])[:, None, None] < 20), 7.0, img), m), "landmarks repeat"),
    (lambda img, m: (np.zeros_like(img), m), "no data inside the brain"),
    (lambda img, m: (img, np.zeros_like(m)), "empty brain mask"),
    (lambda img, m: (np.where(m, np.nan, 0), m), "NaN"),
])
def test_degenerate_histograms_raise_input_error(make, match):
    image, mask = _blob()
    bad_image, bad_mask = make(image, mask)
    with pytest.raises(InputError, match=match) as info:
        fit_nyul([bad_image], [bad_mask], NyulConfig())
    assert "\n" not in str(info.value)
    standard = fit_nyul([image], [mask], NyulConfig())
    with pytest.raises(InputError, match=match) as info:
        apply_nyul(bad_image, bad_mask, standard, source="case_42/t1.nii.gz")
    assert str(info.value).startswith("case_42/t1.nii.gz")


def test_degenerate_message_tells_a_constant_image_from_partial_coverage():
    image, mask = _blob()
    # constant (7) where the image has data, 0 (no data) in the rest of the brain: 40 % coverage
    covered = mask & (np.arange(SHAPE[0])[:, None, None] >= 16)
    constant = np.where(covered, 7.0, 0.0).astype(np.float32)
    with pytest.raises(InputError) as info:
        image_landmarks(constant, mask, (1.0, 50.0, 99.0), source="case_7 (flair)")
    coverage = 100 * covered.sum() / mask.sum()
    assert str(info.value) == (
        f"case_7 (flair): degenerate intensity histogram: Nyul landmarks repeat ([7., 7., 7.]) over the "
        f"{covered.sum()} brain voxels where this sequence has data ({coverage:.1f} % of the brain mask; "
        "missing coverage is excluded); the image is constant or almost constant there")


def test_landmarks_and_apply_use_only_the_voxels_where_the_sequence_has_data():
    image, mask = _blob()
    gap = mask & (np.arange(SHAPE[0])[:, None, None] < 12)  # this sequence has no data there
    partial = np.where(gap, 0, image).astype(np.float32)
    percentiles = (1.0, 10.0, 50.0, 90.0, 99.0)
    data = mask & ~gap
    np.testing.assert_array_equal(image_landmarks(partial, mask, percentiles),
                                  np.percentile(image[data].astype(np.float64), percentiles))
    np.testing.assert_array_equal(sequence_data_mask(partial, mask), data)
    assert sequence_coverage(np.stack([image, partial]), mask) == pytest.approx([1.0, data.sum() / mask.sum()])
    standard = fit_nyul([image], [mask], NyulConfig())
    everywhere = apply_nyul(partial, mask, standard)
    only_data = apply_nyul(partial, mask, standard, data_only=True)
    np.testing.assert_array_equal(only_data[data], everywhere[data])
    assert np.all(only_data[~data] == 0) and np.all(everywhere[gap] < standard.landmarks[0])


def test_unordered_percentiles_are_a_config_error():
    with pytest.raises(BratsCnnError, match="increase strictly"):
        fit_nyul([_blob()[0]], [_blob()[1]], NyulConfig(pc1=20.0))


# --- z-score and the fitted state --------------------------------------------------------------

def test_zscore_sets_background_and_standardises():
    image, mask = _blob()
    out = zscore(image, mask, mean=100.0, std=10.0, background_value=-3.0)
    assert np.all(out[~mask] == -3.0)
    np.testing.assert_allclose(out[mask], (image[mask] - 100) / 10, rtol=1e-6)
    with pytest.raises(InputError, match="positive"):
        zscore(image, mask, 0.0, 0.0)


def test_moments_give_exact_mean_and_std_of_standardised_voxels():
    """The streaming fit equals computing Nyul on every image and pooling the voxels."""
    cases = [make_phantom(SHAPE, seed=s, intensity_scale=None) for s in range(3)]
    state = fit_normaliser(cases, PreprocessConfig(n4=N4Config(sequences=())))
    for c, name in enumerate(state.channel_order):
        pooled = np.concatenate([
            apply_nyul(case.image[c], brain_mask(case.image), state.nyul_standard(name))[brain_mask(case.image)]
            for case in cases]).astype(np.float64)
        assert state.mean[name] == pytest.approx(pooled.mean(), rel=1e-9)
        assert state.std[name] == pytest.approx(pooled.std(), rel=1e-9)


def test_phantom_with_a_partly_covered_flair_fits_and_normalises():
    """FLAIR is 0 in 35 % of one phantom's brain (as in the real Brats18_2013_20_1)."""
    full = make_phantom(SHAPE, seed=0)
    partial = make_phantom(SHAPE, seed=1, no_data={"flair": 0.35})
    mask = brain_mask(partial.image)
    flair = partial.image[3]
    gap = mask & (flair == 0)
    assert np.array_equal(mask, brain_mask(make_phantom(SHAPE, seed=1).image))  # the mask stays whole
    assert gap.sum() == round(0.35 * mask.sum())
    old_definition = np.percentile(flair[mask], (1, 10, 20, 30))  # zeros counted: a spike at 0
    assert np.all(old_definition == 0)

    config = PreprocessConfig(n4=N4Config(sequences=()), background_value=-5.0)
    stats = [case_statistics(case, config) for case in (full, partial)]
    np.testing.assert_array_equal(stats[1].moments["flair"].landmarks,
                                  np.percentile(flair[mask & ~gap].astype(np.float64), (1, *range(10, 100, 10), 99)))
    assert sum(stats[1].moments["flair"].counts) == mask.sum() - gap.sum()
    assert sum(stats[1].moments["t1"].counts) == mask.sum()
    state = state_from_statistics(stats, config)
    image, out_mask = normalise_case(partial, state, config)
    assert np.array_equal(out_mask, mask)
    assert np.all(image[3][gap] == -5.0) and np.all(image[3][~mask] == -5.0)  # no data looks like background
    assert np.all(image[:3][:, gap] != -5.0)  # the other sequences keep their values there
    # z-score statistics are over the data voxels of both cases: mean 0, std 1 there
    pooled = np.concatenate([normalise_case(full, state, config)[0][3][mask], image[3][mask & ~gap]])
    assert pooled.mean() == pytest.approx(0.0, abs=1e-5) and pooled.std() == pytest.approx(1.0, abs=1e-5)
    # the fitted FLAIR standard stays close to that of two fully covered phantoms up to the 80th
    # percentile (no spike at 0); the 90th moves (by ~10 of 100) because the uncovered part of this
    # phantom holds bright tumour/edema voxels, so the covered part has fewer of them
    reference = fit_normaliser([full, make_phantom(SHAPE, seed=1)], config)
    difference = np.abs(np.subtract(state.landmarks["flair"], reference.landmarks["flair"]))
    assert np.max(difference[:9]) < 1.5 and difference[9] < 15


def test_normalised_training_voxels_have_zero_mean_unit_std():
    cases = [make_phantom(SHAPE, seed=s, intensity_scale=None) for s in range(2)]
    config = PreprocessConfig(n4=FAST_N4, background_value=-9.0)
    state = fit_normaliser(cases, config)
    outputs = [normalise_case(case, state, config) for case in cases]
    for image, mask in outputs:
        assert image.dtype == np.float32 and image.shape == (4,) + SHAPE
        assert np.all(image[:, ~mask] == -9.0)
    pooled = np.concatenate([image[:, mask] for image, mask in outputs], axis=1)
    np.testing.assert_allclose(pooled.mean(axis=1), 0, atol=1e-4)
    np.testing.assert_allclose(pooled.std(axis=1), 1, atol=1e-4)


def test_fit_normaliser_streams_loader_callables_once_each():
    calls = []

    def loader(seed):
        def load():
            calls.append(seed)
            return make_phantom(SHAPE, seed=seed)
        return load
    state = fit_normaliser([loader(0), loader(1)], FAST)
    assert calls == [0, 1]
    assert state.n_cases == 2 and state.case_ids == ("phantom_000", "phantom_001")
    assert state.n4_iterations == (30, 30) and state.n4_shrink_factor == 2
    for name in state.channel_order:
        assert len(state.landmarks[name]) == 11
        assert state.landmarks[name][0] == 0.0 and state.landmarks[name][-1] == pytest.approx(100.0)
        assert np.all(np.diff(state.landmarks[name]) > 0)


@pytest.fixture(scope="module")
def fitted_state() -> NormaliserState:
    stats = [case_statistics(make_phantom(SHAPE, seed=s, intensity_scale=None), FAST) for s in range(2)]
    return state_from_statistics(stats, FAST)


def test_normalise_case_never_refits_and_does_not_mutate(fitted_state):
    case = make_phantom(SHAPE, seed=7, intensity_scale=(3.0, 0.5, 1.0, 2.0))
    before_state = copy.deepcopy(fitted_state.to_dict())
    before_image = case.image.copy()
    first, mask = normalise_case(case, fitted_state, FAST)
    second, _ = normalise_case(case, fitted_state, FAST)
    assert fitted_state.to_dict() == before_state
    assert np.array_equal(case.image, before_image)
    np.testing.assert_allclose(first, second, atol=1e-5)  # N4 is deterministic up to thread order
    assert np.array_equal(mask, brain_mask(case.image))


def test_case_statistics_json_round_trip_is_exact():
    stats = case_statistics(make_phantom(SHAPE, seed=4, intensity_scale=None), PreprocessConfig(n4=N4Config(sequences=())))
    again = CaseStatistics.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert again == stats and set(again.moments) == {"t1", "t1c", "t2", "flair"}
    with pytest.raises(InputError, match="malformed case statistics"):
        CaseStatistics.from_dict({"case_id": "x"}, source="stats.json")


def test_state_json_round_trip_is_exact(fitted_state, tmp_path):
    text = json.dumps(fitted_state.to_dict())
    assert NormaliserState.from_dict(json.loads(text)) == fitted_state
    path = save_normaliser(fitted_state, tmp_path / "sub" / "normaliser.json")
    loaded = load_normaliser(path)
    assert loaded == fitted_state and loaded.to_dict() == fitted_state.to_dict()
    assert loaded.version == NORMALISER_VERSION and loaded.channel_order == ("t1", "t1c", "t2", "flair")


def test_bad_state_files_raise_one_line_input_errors(fitted_state, tmp_path):
    newer = dict(fitted_state.to_dict(), version=NORMALISER_VERSION + 1)
    (tmp_path / "newer.json").write_text(json.dumps(newer))
    with pytest.raises(InputError, match="version"):
        load_normaliser(tmp_path / "newer.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON") as info:
        load_normaliser(tmp_path / "broken.json")
    assert "broken.json" in str(info.value) and "\n" not in str(info.value)
    partial = fitted_state.to_dict()
    del partial["std"]
    with pytest.raises(InputError, match="lacks"):
        NormaliserState.from_dict(partial)
    with pytest.raises(InputError, match="not found"):
        load_normaliser(tmp_path / "missing.json")


def test_sequence_moments_pieces_cover_all_voxels():
    image, mask = _blob()
    m = sequence_moments(image, mask, (1.0, 50.0, 99.0))
    assert sum(m.counts) == mask.sum() and len(m.counts) == 2
    assert m.landmarks[0] < m.landmarks[1] < m.landmarks[2]


# --- cross-check against TorchIO's HistogramStandardization on real data -----------------------

def test_nyul_matches_torchio_histogram_standardization_on_real_cases(sample_dir, tmp_path):
    """Same landmarks and the same mapped image as TorchIO, given the same masks (brain = T1 > 0).

    TorchIO trains on 13 percentiles (cutoffs, deciles and quartiles) and applies with 11 (it drops
    the quartiles), which are ours; it computes percentiles in float32, we in float64.
    """
    tio = pytest.importorskip("torchio")
    import nibabel as nib
    import torch

    ids = ["Brats18_CBICA_ABM_1", "Brats18_TCIA10_637_1", "Brats18_2013_3_1"]
    paths = [sample_dir / i / f"{i}_t1.nii.gz" for i in ids]
    images = [np.asarray(nib.load(p).dataobj, dtype=np.float32) for p in paths]
    masks = [img > 0 for img in images]

    ours = fit_nyul(images, masks, NyulConfig())
    theirs = tio.HistogramStandardization.train(paths, cutoff=(0.01, 0.99), masking_function=lambda t: t > 0,
                                                progress=False)
    theirs_11 = theirs[[0, 1, 2, 4, 5, 6, 7, 8, 10, 11, 12]]  # drop the quartile landmarks (25, 75)
    np.testing.assert_allclose(ours.landmarks, theirs_11, atol=1e-3)

    transform = tio.HistogramStandardization({"t1": theirs}, masking_method=lambda t: t > 0)
    subject = tio.Subject(t1=tio.ScalarImage(tensor=torch.from_numpy(images[0])[None], affine=np.eye(4)))
    theirs_out = transform(subject)["t1"].data[0].numpy()
    ours_out = apply_nyul(images[0], masks[0], ours)
    brain = masks[0]
    difference = np.abs(ours_out[brain] - theirs_out[brain])
    assert difference.max() < 1e-2  # on a 0-100 scale
    assert np.median(difference) < 1e-3


def test_correct_bias_touches_only_the_configured_sequences():
    case = make_phantom(SHAPE, seed=5)
    mask = brain_mask(case.image)
    out = correct_bias(case.image, mask, N4Config(sequences=("t1c",), iterations=(10,), shrink_factor=2))
    assert out.dtype == np.float32 and out is not case.image
    np.testing.assert_array_equal(out[[0, 2, 3]], case.image[[0, 2, 3]])
    assert not np.allclose(out[1], case.image[1])
    with pytest.raises(InputError, match="unknown sequences"):
        correct_bias(case.image, mask, N4Config(sequences=("t1gd",)))
