"""Class-balanced centres, on-the-fly patch extraction, rotation augmentation, batch datasets."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from brats_cnn.errors import ConfigError
from brats_cnn.training.sampling import GAMMA_STREAM, PLANE_AXES, Centres, PatchBatches, extract_patches, extract_plane_patches, gamma_intensity, jitter_intensity, make_rng, quarter_turns, rotate_patches, rotate_patches_90, rotation_support, sample_balanced_centres, sample_natural_centres

SHAPE = (6, 40, 44)  # (Z, X, Y)


def fake_case(seed: int, shape=SHAPE, rare_class_voxels: int = 30) -> SimpleNamespace:
    """A CachedCase-like object: image (Z,4,X,Y) float16, mask (Z,X,Y) bool, label (Z,X,Y) uint8."""
    rng = np.random.default_rng(seed)
    z, x, y = shape
    image = rng.standard_normal((z, 4, x, y)).astype(np.float16)
    mask = np.zeros(shape, bool)
    mask[:, 4:x - 4, 4:y - 4] = True
    label = np.zeros(shape, np.uint8)
    label[:, 12:28, 12:30] = 2          # edema block
    label[:, 16:24, 16:24] = 1          # core inside it
    flat = np.flatnonzero(label == 1)[:rare_class_voxels]
    label.flat[flat] = 3                # a rare enhancing class
    return SimpleNamespace(case_id=f"c{seed}", image=image, mask=mask, label=label, meta={})


# ---- extraction --------------------------------------------------------------------------------

def test_extract_patches_equals_slicing_inside_the_volume():
    case = fake_case(0)
    z, x, y = np.array([0, 3, 5]), np.array([16, 20, 23]), np.array([16, 21, 27])
    patches = extract_patches(case.image, z, x, y, 33, background=0.0)
    assert patches.shape == (3, 4, 33, 33) and patches.dtype == np.float32
    for n in range(3):
        expected = case.image[z[n], :, x[n] - 16:x[n] + 17, y[n] - 16:y[n] + 17].astype(np.float32)
        np.testing.assert_array_equal(patches[n], expected)
        np.testing.assert_array_equal(patches[n, :, 16, 16], case.image[z[n], :, x[n], y[n]])


def test_extract_patches_pads_border_centres_with_background():
    case = fake_case(1)
    patches = extract_patches(case.image, np.array([2, 2]), np.array([0, 20]), np.array([43, 20]), 33,
                              background=-7.0)
    border = patches[0]
    assert np.all(border[:, :16, :] == -7.0)       # rows above x=0
    assert np.all(border[:, :, 17:] == -7.0)       # columns beyond y=43
    np.testing.assert_array_equal(border[:, 16:, :17], case.image[2, :, 0:17, 27:44].astype(np.float32))
    np.testing.assert_array_equal(patches[1], case.image[2, :, 4:37, 4:37].astype(np.float32))


def test_extract_patches_reads_a_memmap(tmp_path):
    case = fake_case(2)
    np.save(tmp_path / "image.npy", case.image)
    mapped = np.load(tmp_path / "image.npy", mmap_mode="r")
    a = extract_patches(mapped, np.array([1]), np.array([20]), np.array([22]), 33, 0.0)
    b = extract_patches(case.image, np.array([1]), np.array([20]), np.array([22]), 33, 0.0)
    np.testing.assert_array_equal(a, b)


def test_plane_patches_are_the_axial_patches_of_the_volume_segment_views_transposes():
    # a coronal (sagittal) training patch is exactly what the network sees at that voxel when segment
    # runs it on coronal (sagittal) slices: the same rows and columns, not their transpose
    from brats_cnn.config import PLANES
    from brats_cnn.inference.predict import VIEW_AXES

    # the config's plane names (sampling.planes, segment.views) are exactly the planes both axis maps know
    assert tuple(VIEW_AXES) == PLANES and tuple(PLANE_AXES) == PLANES
    case = fake_case(3, shape=(40, 38, 44))  # Z deep enough for whole patches across slices
    z, x, y = np.array([16, 20, 23]), np.array([16, 19, 21]), np.array([17, 20, 27])
    volume = np.moveaxis(case.image.astype(np.float32), 0, -1)  # (C, X, Y, Z), as segment holds a case
    for plane in PLANES:
        patches = extract_plane_patches(case.image, z, x, y, 33, 0.0, plane)
        assert patches.shape == (3, 4, 33, 33) and patches.dtype == np.float32
        axes = VIEW_AXES[plane]
        view = volume.transpose(0, *(a + 1 for a in axes))  # this plane's slices along the last axis
        for n in range(3):
            at = np.array([x[n], y[n], z[n]])[list(axes)]  # the centre in the view's (rows, columns, slice)
            expected = view[:, at[0] - 16:at[0] + 17, at[1] - 16:at[1] + 17, at[2]]
            np.testing.assert_array_equal(patches[n], expected)
            np.testing.assert_array_equal(patches[n, :, 16, 16], case.image[z[n], :, x[n], y[n]])
    np.testing.assert_array_equal(extract_plane_patches(case.image, z, x, y, 33, 0.0, "axial"),
                                  extract_patches(case.image, z, x, y, 33, 0.0))
    with pytest.raises(ConfigError, match="sampling.planes must name planes"):
        extract_plane_patches(case.image, z, x, y, 33, 0.0, "oblique")


def test_plane_patches_pad_beyond_the_volume_with_background():
    case = fake_case(4)  # 6 slices: every coronal or sagittal patch crosses the volume's Z ends
    patch = extract_plane_patches(case.image, np.array([2]), np.array([20]), np.array([21]), 33, -7.0, "coronal")[0]
    # rows along X (x 4..36 inside), columns along Z (z -14..18, slices 0..5 inside)
    np.testing.assert_array_equal(patch[:, :, 14:20], np.moveaxis(case.image[0:6, :, 4:37, 21], 0, -1).astype(np.float32))
    assert np.all(patch[:, :, :14] == -7.0) and np.all(patch[:, :, 20:] == -7.0)
    patch = extract_plane_patches(case.image, np.array([5]), np.array([20]), np.array([3]), 33, -7.0, "sagittal")[0]
    np.testing.assert_array_equal(patch[:, 13:, 11:17], np.moveaxis(case.image[0:6, :, 20, 0:20], 0, -1).astype(np.float32))
    assert np.all(patch[:, :13] == -7.0) and np.all(patch[:, :, 17:] == -7.0) and np.all(patch[:, :, :11] == -7.0)


@pytest.mark.parametrize("patch_size", [9, 27])
def test_plane_patches_equal_slices_of_the_background_padded_volume_anywhere(patch_size):
    # random centres, border ones included, and patches wider than the volume (a context pathway's)
    case = fake_case(5, shape=(14, 20, 18))
    half = patch_size // 2
    padded = np.pad(case.image.astype(np.float32), ((half, half), (0, 0), (half, half), (half, half)),
                    constant_values=-3.0)  # (Z, C, X, Y) + half on every spatial side
    rng = np.random.default_rng(1)
    z, x, y = (rng.integers(0, n, 12) for n in (14, 20, 18))
    for plane, take in (("coronal", lambda n: padded[z[n]:z[n] + patch_size, :, x[n]:x[n] + patch_size, y[n] + half]),
                        ("sagittal", lambda n: padded[z[n]:z[n] + patch_size, :, x[n] + half, y[n]:y[n] + patch_size])):
        patches = extract_plane_patches(case.image, z, x, y, patch_size, -3.0, plane)
        for n in range(12):
            np.testing.assert_array_equal(patches[n], np.transpose(take(n), (1, 2, 0)))


def test_patch_batches_draw_each_patchs_plane_reproducibly_and_axial_alone_is_the_paper():
    cases = [fake_case(0, shape=(36, 40, 44)), fake_case(1, shape=(36, 40, 44))]
    centres = sample_balanced_centres([(c.label, c.mask) for c in cases], 256, 4, make_rng(0, 1))
    axial = _dataset(cases, centres, rotation_angles=(0,))
    default = _dataset(cases, centres, rotation_angles=(0,), planes=("axial",))
    torch.testing.assert_close(axial[0][0], default[0][0], rtol=0, atol=0)
    three = _dataset(cases, centres, rotation_angles=(0,), planes=("axial", "coronal", "sagittal"))
    draws = three._plane_draws(0)
    assert np.bincount(draws, minlength=3).min() >= 3  # all three planes drawn in a batch of 32
    patches, labels = three[0]
    members = centres.take(three.order[:32])
    np.testing.assert_array_equal(labels.numpy(), members.label)
    for j in range(32):
        case = cases[members.case[j]]
        at = [np.array([v]) for v in (members.z[j], members.x[j], members.y[j])]
        expected = extract_plane_patches(case.image, *at, 33, 0.0, three.planes[draws[j]])[0]
        np.testing.assert_array_equal(patches[j].numpy(), expected)
    torch.testing.assert_close(three[0][0], _dataset(cases, centres, rotation_angles=(0,),
                                                     planes=("axial", "coronal", "sagittal"))[0][0], rtol=0, atol=0)
    ranks = [_dataset(cases, centres, rotation_angles=(0,), planes=("axial", "coronal", "sagittal"), rank=r,
                      world_size=2)[0][0] for r in (0, 1)]
    torch.testing.assert_close(torch.cat(ranks), patches, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="sampling.planes must name planes"):
        _dataset(cases, centres, planes=("axial", "oblique"))


# ---- centres -----------------------------------------------------------------------------------

def test_centres_are_class_balanced_inside_the_mask_and_deterministic():
    cases = [fake_case(0), fake_case(1)]
    pairs = [(c.label, c.mask) for c in cases]
    centres = sample_balanced_centres(pairs, total=400, num_classes=4, rng=make_rng(5, 1))
    counts = centres.class_counts(4)
    assert counts.tolist() == [100, 100, 100, 60]   # class 3 has only 2 x 30 voxels: all taken
    for n in range(len(centres)):
        case = cases[centres.case[n]]
        assert case.mask[centres.z[n], centres.x[n], centres.y[n]]
        assert case.label[centres.z[n], centres.x[n], centres.y[n]] == centres.label[n]
    keys = set(zip(centres.case.tolist(), centres.z.tolist(), centres.x.tolist(), centres.y.tolist()))
    assert len(keys) == len(centres)               # without replacement
    again = sample_balanced_centres(pairs, total=400, num_classes=4, rng=make_rng(5, 1))
    np.testing.assert_array_equal(again.x, centres.x)
    other = sample_balanced_centres(pairs, total=400, num_classes=4, rng=make_rng(6, 1))
    assert not np.array_equal(other.x, centres.x)
    assert set(np.unique(centres.case)) == {0, 1}


def test_centres_of_a_missing_class(caplog):
    case = fake_case(0)
    label = np.where(case.label == 3, 1, case.label).astype(np.uint8)
    with caplog.at_level("INFO"):
        centres = sample_balanced_centres([(label, case.mask)], 40, 4, make_rng(0, 1))
    assert centres.class_counts(4).tolist() == [10, 10, 10, 0]
    assert "class 3 has only 0" in caplog.text


def test_natural_centres_follow_the_class_frequencies_inside_the_mask():
    cases = [fake_case(0), fake_case(1)]
    pairs = [(c.label, c.mask) for c in cases]
    brain = sum(int(c.mask.sum()) for c in cases)                           # 2 x 6 x 32 x 36 = 13,824
    truth = sum(np.bincount(c.label[c.mask], minlength=4) for c in cases)   # [10560, 708, 2496, 60]
    centres = sample_natural_centres(pairs, total=brain // 2, num_classes=4, rng=make_rng(5, 1))
    assert len(centres) == brain // 2
    for n in range(len(centres)):
        case = cases[centres.case[n]]
        assert case.mask[centres.z[n], centres.x[n], centres.y[n]]
        assert case.label[centres.z[n], centres.x[n], centres.y[n]] == centres.label[n]
    keys = set(zip(centres.case.tolist(), centres.z.tolist(), centres.x.tolist(), centres.y.tolist()))
    assert len(keys) == len(centres)               # without replacement
    counts = centres.class_counts(4)
    # half the brain drawn without replacement: each class count is hypergeometric around half its
    # voxels, standard deviation at most sqrt(13824 / 16) = 29.4; 5 sigma
    assert np.all(np.abs(counts - truth / 2) < 5 * 29.4), (counts, truth)
    again = sample_natural_centres(pairs, total=brain // 2, num_classes=4, rng=make_rng(5, 1))
    np.testing.assert_array_equal(again.x, centres.x)
    everything = sample_natural_centres(pairs, total=brain + 5, num_classes=4, rng=make_rng(5, 1))
    assert everything.class_counts(4).tolist() == truth.tolist()   # fewer brain voxels than asked: all


# ---- rotation ----------------------------------------------------------------------------------

def test_quarter_turn_rotation_equals_torch_rot90_and_keeps_the_centre():
    rng = np.random.default_rng(0)
    patches = rng.standard_normal((8, 4, 33, 33)).astype(np.float32)
    turns = np.array([0, 1, 2, 3, 1, 2, 3, 0])
    rotated = rotate_patches_90(patches, turns)
    for n, k in enumerate(turns):
        expected = torch.rot90(torch.from_numpy(patches[n]), int(k), dims=(1, 2)).numpy()
        np.testing.assert_array_equal(rotated[n], expected)
    np.testing.assert_array_equal(rotated[:, :, 16, 16], patches[:, :, 16, 16])
    assert not np.shares_memory(rotated, patches)


def test_quarter_turns_rejects_non_right_angles():
    assert quarter_turns([0, 90, 180, 270, 360]).tolist() == [0, 1, 2, 3, 0]
    with pytest.raises(ConfigError, match="multiples of 90"):
        quarter_turns([0, 45])


def test_arbitrary_rotation_matches_rot90_at_right_angles_and_keeps_the_centre():
    side = rotation_support(33)
    assert side == 47
    rng = np.random.default_rng(1)
    big = rng.standard_normal((3, 4, side, side)).astype(np.float32)
    rotated = rotate_patches(big, np.array([0.0, np.pi / 2, 0.7]), 33, background=0.0)
    crop = big[:, :, 7:40, 7:40]
    np.testing.assert_allclose(rotated[0], crop[0], atol=1e-4)
    quarter = np.stack([torch.rot90(torch.from_numpy(crop[1]), k, dims=(1, 2)).numpy() for k in (1, 3)])
    best = min(np.abs(rotated[1] - q).max() for q in quarter)  # direction convention of the grid
    assert best < 1e-4
    np.testing.assert_allclose(rotated[:, :, 16, 16], crop[:, :, 16, 16], atol=1e-4)


# ---- batch dataset -----------------------------------------------------------------------------

def _dataset(cases, centres, **kw):
    defaults = dict(batch_size=32, patch_size=33, background=0.0, rotation_angles=(0, 90, 180, 270), seed=3)
    return PatchBatches(cases, centres, **{**defaults, **kw})


def test_patch_batches_cover_every_centre_once_per_epoch_with_labels():
    cases = [fake_case(0), fake_case(1)]
    centres = sample_balanced_centres([(c.label, c.mask) for c in cases], 200, 4, make_rng(0, 1))
    data = _dataset(cases, centres)
    assert len(data) == int(np.ceil(len(centres) / 32))
    seen = []
    for i in range(len(data)):
        patches, labels = data[i]
        assert patches.dtype == torch.float32 and labels.dtype == torch.int64
        assert patches.shape[1:] == (4, 33, 33)
        idx = data.order[i * 32:(i + 1) * 32]
        np.testing.assert_array_equal(labels.numpy(), centres.label[idx])
        # rotations keep the centre voxel: it is the volume value at the centre
        for j, n in enumerate(idx[:4]):
            case = cases[centres.case[n]]
            np.testing.assert_array_equal(patches[j, :, 16, 16].numpy(),
                                          case.image[centres.z[n], :, centres.x[n], centres.y[n]])
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(len(centres)))
    a, b = _dataset(cases, centres, epoch=0), _dataset(cases, centres, epoch=1)
    assert not np.array_equal(a.order, b.order)
    torch.testing.assert_close(a[0][0], _dataset(cases, centres, epoch=0)[0][0], rtol=0, atol=0)


def test_ranks_split_each_global_batch():
    cases = [fake_case(0)]
    centres = sample_balanced_centres([(c.label, c.mask) for c in cases], 100, 4, make_rng(0, 1))
    single = _dataset(cases, centres)
    ranks = [_dataset(cases, centres, rank=r, world_size=2) for r in (0, 1)]
    assert len(ranks[0]) == len(centres) // 32 == len(ranks[1])
    for i in range(len(ranks[0])):
        joined = torch.cat([ranks[0][i][0], ranks[1][i][0]])
        torch.testing.assert_close(joined, single[i][0], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="divisible"):
        _dataset(cases, centres, batch_size=33, world_size=2)


def test_dataloader_workers_give_the_same_batches():
    cases = [fake_case(0)]
    centres = sample_balanced_centres([(c.label, c.mask) for c in cases], 120, 4, make_rng(0, 1))
    data = _dataset(cases, centres, arbitrary_rotation=True)
    plain = [b for b in torch.utils.data.DataLoader(data, batch_size=None, num_workers=0)]
    workers = [b for b in torch.utils.data.DataLoader(data, batch_size=None, num_workers=2)]
    for (p0, l0), (p1, l1) in zip(plain, workers):
        assert torch.equal(p0, p1) and torch.equal(l0, l1)
    assert len(plain) == len(workers) == 4


def test_jitter_intensity_changes_brain_voxels_only_and_returns_a_new_array():
    patches = np.array([[[[0.0, 1.0], [2.0, -1.0]], [[0.0, 0.5], [0.0, 3.0]]]], np.float32)  # (1, 2, 2, 2)
    before = patches.copy()
    out = jitter_intensity(patches, np.array([[2.0, 0.5]], np.float32), np.array([[1.0, -1.0]], np.float32), 0.0)
    np.testing.assert_array_equal(out, [[[[0.0, 3.0], [5.0, -1.0]], [[0.0, -0.75], [0.0, 0.5]]]])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(patches, before)


def test_intensity_augmentation_is_one_affine_map_per_patch_and_sequence_within_its_range():
    case = fake_case(0)
    case.image = np.where(case.mask[:, None], case.image, 0).astype(np.float16)  # background 0 outside the brain
    centres = sample_balanced_centres([(case.label, case.mask)], 64, 4, make_rng(0, 1))
    plain = _dataset([case], centres, rotation_angles=(0,))
    jitter = dict(rotation_angles=(0,), intensity_scale=0.2, intensity_shift=0.5)
    jittered = _dataset([case], centres, **jitter)
    (p, labels), (q, labels_j) = plain[0], jittered[0]
    assert torch.equal(labels, labels_j)
    p, q = p.numpy(), q.numpy()
    np.testing.assert_array_equal(q[p == 0], 0.0)  # outside the brain and the volume: untouched
    factors, offsets = np.empty(p.shape[:2]), np.empty(p.shape[:2])
    for n, c in np.ndindex(*p.shape[:2]):
        brain = p[n, c] != 0
        factors[n, c], offsets[n, c] = np.polyfit(p[n, c][brain], q[n, c][brain], 1)
        np.testing.assert_allclose(q[n, c][brain], factors[n, c] * p[n, c][brain] + offsets[n, c], atol=1e-5)
    assert factors.min() >= 0.8 - 1e-6 and factors.max() <= 1.2 + 1e-6 and np.abs(offsets).max() <= 0.5 + 1e-6
    assert (np.ptp(factors, axis=0) > 0.1).all() and (np.ptp(factors, axis=1) > 0.01).all()  # per patch and sequence
    torch.testing.assert_close(jittered[0][0], _dataset([case], centres, **jitter)[0][0], rtol=0, atol=0)
    ranks = [_dataset([case], centres, **jitter, rank=r, world_size=2)[0][0] for r in (0, 1)]
    torch.testing.assert_close(torch.cat(ranks), jittered[0][0], rtol=0, atol=0)


def test_intensity_augmentation_ranges_are_checked():
    from brats_cnn.config import load_config

    with pytest.raises(ConfigError, match="sampling.intensity_scale"):
        load_config("smoke", ["sampling.intensity_scale=1.0"])
    with pytest.raises(ConfigError, match="sampling.intensity_shift"):
        load_config("smoke", ["sampling.intensity_shift=-0.1"])


def test_gamma_intensity_bends_a_hand_computed_patch_and_keeps_its_mean_and_spread():
    # brain values 0, 2, 4 (range 4) with gamma 2: 0, 1, 4 before the stats are restored to mean 2,
    # std sqrt(8/3); by hand: 0.39872, 1.35949, 4.24179. The background voxel (1.0 here) stays.
    patches = np.array([[[[0.0, 2.0], [4.0, 1.0]]]], np.float32)
    out = gamma_intensity(patches, np.array([[2.0]]), background=1.0)
    np.testing.assert_allclose(out[0, 0].ravel(), [0.39872, 1.35949, 4.24179, 1.0], atol=2e-5)
    assert out.dtype == np.float32


def test_gamma_intensity_is_monotone_keeps_the_stats_and_is_the_identity_at_one():
    rng = np.random.default_rng(0)
    patches = rng.normal(size=(6, 4, 33, 33)).astype(np.float32)
    patches[:, :, :5] = 0.0  # background rows
    patches[5, 2] = 0.0  # a sequence without brain voxels
    before = patches.copy()
    np.testing.assert_allclose(gamma_intensity(patches, np.ones((6, 4)), 0.0), patches, atol=1e-5)
    gammas = np.exp(rng.uniform(-0.4, 0.4, size=(6, 4)))
    out = gamma_intensity(patches, gammas, 0.0)
    np.testing.assert_array_equal(patches, before)  # a new array
    np.testing.assert_array_equal(out[patches == 0], 0.0)
    np.testing.assert_array_equal(out[5, 2], patches[5, 2])
    for n, c in np.ndindex(5, 4):
        brain = patches[n, c] != 0
        x, y = patches[n, c][brain], out[n, c][brain]
        np.testing.assert_allclose([y.mean(), y.std()], [x.mean(), x.std()], atol=1e-4)
        order = np.argsort(x)
        assert (np.diff(y[order]) >= -1e-5).all()  # monotone: intensities keep their order
        assert np.abs(y - x).max() > 0.01  # and are changed
    assert np.abs(out[patches != 0] - patches[patches != 0]).max() > 0.1


def test_gamma_augmentation_draws_from_its_own_stream_per_patch_and_sequence():
    case = fake_case(0)
    case.image = np.where(case.mask[:, None], case.image, 0).astype(np.float16)
    centres = sample_balanced_centres([(case.label, case.mask)], 64, 4, make_rng(0, 1))
    affine = dict(rotation_angles=(0,), intensity_scale=0.2, intensity_shift=0.5)
    plain, bent = _dataset([case], centres, **affine)[0][0].numpy(), _dataset([case], centres, gamma=0.4, **affine)[0][0].numpy()
    np.testing.assert_array_equal(bent[plain == 0], 0.0)
    gammas = np.exp(make_rng(3, GAMMA_STREAM, 0, 0).uniform(-0.4, 0.4, size=plain.shape[:2]))  # seed 3, epoch 0, batch 0
    np.testing.assert_allclose(bent, gamma_intensity(plain, gammas, 0.0), atol=1e-6)  # the affine draws are unchanged
    ranks = [_dataset([case], centres, gamma=0.4, **affine, rank=r, world_size=2)[0][0] for r in (0, 1)]
    torch.testing.assert_close(torch.cat(ranks).numpy(), bent, rtol=0, atol=0)
    from brats_cnn.config import load_config

    assert load_config("smoke", ["sampling.gamma=0.4"]).sampling.gamma == 0.4
    with pytest.raises(ConfigError, match="sampling.gamma"):
        load_config("smoke", ["sampling.gamma=-0.1"])


def test_patch_batches_empty_centres():
    empty = Centres(*(np.zeros(0, np.int32) for _ in range(4)), np.zeros(0, np.uint8))
    assert len(_dataset([fake_case(0)], empty)) == 0


# ---- dense training crops ----------------------------------------------------------------------

def test_slab_batches_label_the_crop_centre_ignore_outside_the_brain_and_rotate_with_the_image():
    from brats_cnn.training.sampling import IGNORE_LABEL, SlabBatches

    cases = [fake_case(0), fake_case(1)]
    centres = sample_balanced_centres([(c.label, c.mask) for c in cases], 24, 4, make_rng(0, 1))
    kwargs = dict(crop_size=9, batch_size=6, patch_size=33, background=0.0, seed=0)
    plain = SlabBatches(cases, centres, rotation_angles=(0,), **kwargs)
    with pytest.raises(ConfigError, match="dense training takes axial crops only"):
        SlabBatches(cases, centres, rotation_angles=(0,), planes=("axial", "coronal"), **kwargs)
    crops, labels = plain[0]
    assert crops.shape == (6, 4, 41, 41) and labels.shape == (6, 9, 9) and labels.dtype == torch.int64
    for j, n in enumerate(plain.order[:6]):
        case, z, x, y = cases[centres.case[n]], centres.z[n], centres.x[n], centres.y[n]
        np.testing.assert_array_equal(crops[j, :, 20, 20].numpy(), case.image[z, :, x, y])
        assert labels[j, 4, 4] == centres.label[n]
        # the 9x9 labelled window: the label map inside the mask, IGNORE_LABEL outside it and the volume
        for dx in (-4, 0, 4):
            for dy in (-4, 0, 4):
                xx, yy = x + dx, y + dy
                inside = 0 <= xx < SHAPE[1] and 0 <= yy < SHAPE[2] and case.mask[z, xx, yy]
                assert labels[j, 4 + dx, 4 + dy] == (case.label[z, xx, yy] if inside else IGNORE_LABEL)
    assert (labels == IGNORE_LABEL).any() and (labels >= 0).any()
    turned = SlabBatches(cases, centres, rotation_angles=(0, 90, 180, 270), **kwargs)
    crops_t, labels_t = turned[0]
    turns = turned.turns[make_rng(0, 4, 0, 0).integers(0, 4, size=6)]
    assert len(set(turns.tolist())) > 1
    for j, k in enumerate(turns):
        torch.testing.assert_close(crops_t[j], torch.rot90(crops[j], int(k), dims=(1, 2)), rtol=0, atol=0)
        assert torch.equal(labels_t[j], torch.rot90(labels[j], int(k), dims=(0, 1)))
    with pytest.raises(ConfigError, match="dense.crop_size must be odd"):
        SlabBatches(cases, centres, crop_size=8, batch_size=6, patch_size=33, background=0.0)
    with pytest.raises(ConfigError, match="multiples of 90 degrees only"):
        SlabBatches(cases, centres, arbitrary_rotation=True, **kwargs)


def test_slab_batches_jitter_the_crop_intensities_and_keep_the_labels():
    from brats_cnn.training.sampling import SlabBatches

    case = fake_case(0)
    case.image = np.where(case.mask[:, None], case.image, 0).astype(np.float16)
    centres = sample_balanced_centres([(case.label, case.mask)], 12, 4, make_rng(0, 1))
    kwargs = dict(crop_size=9, batch_size=6, patch_size=33, background=0.0, seed=0, rotation_angles=(0,))
    (crops, labels), (crops_j, labels_j) = (SlabBatches([case], centres, **kwargs)[0],
                                            SlabBatches([case], centres, intensity_scale=0.3, **kwargs)[0])
    assert torch.equal(labels, labels_j)
    brain = crops != 0
    assert torch.equal(crops_j[~brain], crops[~brain])
    ratio = crops_j[brain] / crops[brain]
    assert 0.7 - 1e-6 <= ratio.min() and ratio.max() <= 1.3 + 1e-6 and ratio.std() > 0.05
