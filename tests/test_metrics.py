"""Metrics on hand-built masks with hand-computed values, every empty-mask rule, and cross-checks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from brats_cnn.evaluation import metrics
from brats_cnn.data.labels import region_mask
from brats_cnn.evaluation.metrics import HD95_ONE_EMPTY


def _cube(shape, lo, hi):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


# ---------------------------------------------------------------- confusion counts and overlap

def test_two_cubes_offset_by_one_voxel():
    ref = _cube((5, 5, 5), (1, 1, 1), (3, 3, 3))    # 8 voxels
    pred = _cube((5, 5, 5), (2, 1, 1), (4, 3, 3))   # 8 voxels, 4 shared
    assert metrics.compute_tp_fp_fn_tn(ref, pred) == (4, 4, 4, 113)
    assert metrics.dice(ref, pred) == pytest.approx(0.5)
    assert metrics.ppv(ref, pred) == pytest.approx(0.5)
    assert metrics.sensitivity(ref, pred) == pytest.approx(0.5)
    assert metrics.specificity(ref, pred) == pytest.approx(113 / 117)


def test_prediction_inside_truth():
    ref = _cube((6, 6, 6), (1, 1, 1), (4, 4, 4))    # 27 voxels
    pred = _cube((6, 6, 6), (2, 1, 1), (4, 4, 4))   # 18 voxels, all inside ref
    assert metrics.compute_tp_fp_fn_tn(ref, pred) == (18, 0, 9, 189)
    m = metrics.mask_metrics(ref, pred, spacing=(1.0, 2.0, 0.5))
    assert m["dsc"] == pytest.approx(36 / 45)
    assert m["ppv"] == 1.0
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == 1.0
    assert m["vol_gt_ml"] == pytest.approx(27 * 1.0 / 1000)
    assert m["vol_pred_ml"] == pytest.approx(18 * 1.0 / 1000)
    # pred lacks the x=1 layer of ref: the pred->ref distances are 0, ref->pred are 0 or 1 mm
    assert m["hd95"] == pytest.approx(1.0)


def test_arguments_are_not_mutated():
    ref = _cube((5, 5, 5), (1, 1, 1), (3, 3, 3))
    pred = _cube((5, 5, 5), (2, 1, 1), (4, 3, 3))
    ref0, pred0 = ref.copy(), pred.copy()
    metrics.mask_metrics(ref, pred, (1, 1, 1))
    assert np.array_equal(ref, ref0) and np.array_equal(pred, pred0)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.compute_tp_fp_fn_tn(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool))


# ---------------------------------------------------------------- empty masks (SPEC rules)

EMPTY = np.zeros((4, 4, 4), dtype=bool)
SOME = _cube((4, 4, 4), (1, 1, 1), (3, 3, 3))


def test_both_empty():
    m = metrics.mask_metrics(EMPTY, EMPTY, (1, 1, 1))
    assert (m["dsc"], m["ppv"], m["sensitivity"], m["specificity"], m["hd95"]) == (1.0, 1.0, 1.0, 1.0, 0.0)
    assert m["vol_gt_ml"] == 0.0 and m["vol_pred_ml"] == 0.0


def test_empty_prediction_nonempty_truth():
    m = metrics.mask_metrics(SOME, EMPTY, (1, 1, 1))
    assert m["dsc"] == 0.0
    assert m["ppv"] == 0.0          # denominator 0, truth not empty
    assert m["sensitivity"] == 0.0  # 0 / 8
    assert m["specificity"] == 1.0  # 56 / 56
    assert m["hd95"] == HD95_ONE_EMPTY == 373.13


def test_empty_truth_nonempty_prediction():
    m = metrics.mask_metrics(EMPTY, SOME, (1, 1, 1))
    assert m["dsc"] == 0.0
    assert m["ppv"] == 0.0          # 0 / 8
    assert m["sensitivity"] == 0.0  # denominator 0, prediction not empty
    assert m["specificity"] == pytest.approx(56 / 64)
    assert m["hd95"] == HD95_ONE_EMPTY


def test_truth_covers_every_voxel():
    full = np.ones((2, 2, 2), dtype=bool)
    assert metrics.specificity(full, full) == 1.0
    assert metrics.specificity(full, _cube((2, 2, 2), (0, 0, 0), (1, 2, 2))) == 0.0


# ---------------------------------------------------------------- HD95

def test_hd95_parallel_planes_anisotropic():
    ref = np.zeros((8, 5, 4), dtype=bool)
    pred = np.zeros((8, 5, 4), dtype=bool)
    ref[2], pred[5] = True, True  # 3 voxels apart along x
    spacing = (2.0, 0.5, 3.0)
    for definition in ("brats", "monai"):
        assert metrics.hd95(ref, pred, spacing, definition) == pytest.approx(6.0)
    ref_to_pred, pred_to_ref = metrics.surface_distances(ref, pred, spacing)
    assert ref_to_pred.shape == (20,) and pred_to_ref.shape == (20,)
    assert np.allclose(ref_to_pred, 6.0) and np.allclose(pred_to_ref, 6.0)


def test_hd95_definitions_differ_on_a_small_outlier():
    # ref: a 10x10 plane; pred: the same plane plus an 8-voxel patch 10 voxels away.
    # pred->ref: 8 of 108 distances (7.4 %) are 10*1.5 mm, so its 95th percentile is 15 mm (MONAI);
    # pooled: 8 of 208 (3.8 %) are 15 mm, so the pooled 95th percentile is 0 (BraTS).
    ref = np.zeros((12, 10, 10), dtype=bool)
    ref[0] = True
    pred = ref.copy()
    pred[10, 0:2, 0:4] = True
    spacing = (1.5, 1.0, 1.0)
    assert metrics.hd95(ref, pred, spacing, "brats") == pytest.approx(0.0)
    assert metrics.hd95(ref, pred, spacing, "monai") == pytest.approx(15.0)


def test_hd95_mask_on_array_border_has_surface():
    ref = np.ones((3, 3, 3), dtype=bool)       # touches every border: all 26 outer voxels are surface
    pred = _cube((3, 3, 3), (0, 0, 0), (3, 3, 2))
    ref_to_pred, pred_to_ref = metrics.surface_distances(ref, pred, (1, 1, 1))
    assert ref_to_pred.size == 26 and pred_to_ref.size == 18
    assert metrics.hd95(ref, pred, (1, 1, 1)) == pytest.approx(1.0)


def test_unknown_hd95_definition():
    with pytest.raises(ValueError, match="unknown HD95 definition"):
        metrics.hd95(SOME, SOME, (1, 1, 1), "medpy")


# ---------------------------------------------------------------- regions of label maps

def test_region_metrics_brats2017():
    ref = np.zeros((6, 6, 6), dtype=np.int16)
    ref[1:5, 1:5, 1:5] = 2     # edema
    ref[2:4, 2:4, 2:4] = 1     # core (8 voxels)
    ref[2, 2, 2] = 4           # one enhancing voxel
    pred = ref.copy()
    pred[2, 2, 2] = 1          # enhancing missed, still core
    out = metrics.region_metrics(ref, pred, "brats2017", (1, 1, 1))
    assert set(out) == {"complete", "core", "enhancing"}
    assert out["complete"]["dsc"] == 1.0 and out["core"]["dsc"] == 1.0
    assert out["enhancing"]["dsc"] == 0.0 and out["enhancing"]["hd95"] == HD95_ONE_EMPTY
    assert out["core"]["vol_gt_ml"] == pytest.approx(0.008)
    assert ref[2, 2, 2] == 4  # not mutated


# ---------------------------------------------------------------- cross-checks

def _random_blobs(seed: int, shape=(40, 36, 24)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.standard_normal(shape), 2.5) > 0.08
    b = ndimage.gaussian_filter(rng.standard_normal(shape), 2.5) > 0.08
    return a, b


def _brute_force_distances(ref, pred, spacing):
    """Independent implementation: surface by explicit 6-neighbour test, distances by cdist."""
    def surface(mask):
        padded = np.pad(mask, 1)
        interior = padded.copy()
        for axis in range(3):
            for shift in (1, -1):
                interior &= np.roll(padded, shift, axis=axis)
        return (padded & ~interior)[1:-1, 1:-1, 1:-1]
    pts_ref = np.argwhere(surface(ref)) * np.asarray(spacing)
    pts_pred = np.argwhere(surface(pred)) * np.asarray(spacing)
    d = cdist(pts_ref, pts_pred)
    return d.min(axis=1), d.min(axis=0)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI deprecation notice inside its own code
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cross_check_independent_and_monai(seed):
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics")
    ref, pred = _random_blobs(seed)
    spacing = (1.0, 1.3, 2.5)
    ref_to_pred, pred_to_ref = _brute_force_distances(ref, pred, spacing)
    brats_expected = np.percentile(np.concatenate([ref_to_pred, pred_to_ref]), 95)
    monai_expected_own = max(np.percentile(ref_to_pred, 95), np.percentile(pred_to_ref, 95))
    # Same surfaces and exact Euclidean distances: agreement to rounding.
    assert metrics.hd95(ref, pred, spacing, "brats") == pytest.approx(brats_expected, abs=1e-9)
    assert metrics.hd95(ref, pred, spacing, "monai") == pytest.approx(monai_expected_own, abs=1e-9)

    y_pred = torch.from_numpy(pred[None, None].astype(np.float32))
    y = torch.from_numpy(ref[None, None].astype(np.float32))
    monai_dice = float(monai_metrics.compute_dice(y_pred, y, include_background=True))
    monai_hd95 = float(monai_metrics.compute_hausdorff_distance(
        y_pred, y, include_background=True, percentile=95, spacing=spacing))
    assert metrics.dice(ref, pred) == pytest.approx(monai_dice, abs=1e-6)
    # MONAI computes in float32 (torch.quantile): 1e-4 mm tolerance.
    assert metrics.hd95(ref, pred, spacing, "monai") == pytest.approx(monai_hd95, abs=1e-4)


def test_foreground_box_crop_gives_whole_image_values():
    rng = np.random.default_rng(3)
    ref = np.zeros((20, 18, 16), dtype=np.int16)
    pred = np.zeros_like(ref)
    ref[5:12, 4:10, 3:9] = rng.choice([1, 2, 4], size=(7, 6, 6))
    pred[6:13, 4:11, 3:8] = rng.choice([0, 1, 2, 4], size=(7, 7, 5))
    spacing = (1.0, 1.5, 2.0)
    assert metrics.foreground_box(ref, pred) == (slice(5, 13), slice(4, 11), slice(3, 9))
    cropped = metrics.region_metrics(ref, pred, "brats2017", spacing)
    for region in ("complete", "core", "enhancing"):
        whole = metrics.mask_metrics(region_mask(ref, "brats2017", region), region_mask(pred, "brats2017", region),
                                     spacing)
        assert cropped[region] == pytest.approx(whole)
    empty = metrics.region_metrics(np.zeros((3, 3, 3)), np.zeros((3, 3, 3)), "brats2017", (1, 1, 1))
    assert empty["core"]["specificity"] == 1.0 and empty["core"]["dsc"] == 1.0


def test_region_metrics_across_conventions():
    # brats2013 truth vs a brats2017 prediction of the same tumour (no conversion to 2013 exists)
    ref = np.zeros((5, 5, 5), dtype=np.int16)
    ref[1:4, 1:4, 1:4] = 2
    ref[2, 2, 1:4] = [1, 3, 4]
    pred = np.where(np.isin(ref, (1, 3)), 1, ref)
    out = metrics.region_metrics(ref, pred, "brats2013", (1, 1, 1), pred_convention="brats2017")
    assert [out[r]["dsc"] for r in ("complete", "core", "enhancing")] == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------- lesion-wise (BraTS 2023+)

GLI = metrics.lesion_preset("gli")   # dilation 3, lesions of at most 50 mm^3 ignored
MEN = metrics.lesion_preset("men")   # dilation 1
LESION_SHAPE = (40, 30, 30)


def _lesion_wise(ref, pred, params=GLI, spacing=(1.0, 1.0, 1.0)):
    return metrics.lesion_wise_metrics(ref, pred, spacing, params)


def _counts(result):
    return tuple(result[k] for k in ("gt_lesions", "detected_lesions", "missed_lesions", "fp_lesions"))


def test_presets():
    assert (GLI.dilation, GLI.min_volume_mm3, GLI.hd95_definition) == (3, 50.0, "surfel")
    assert (metrics.lesion_preset("MET").dilation, metrics.lesion_preset("met").min_volume_mm3) == (1, 2.0)
    with pytest.raises(ValueError, match="unknown lesion-wise preset 'abc'"):
        metrics.lesion_preset("abc")


def test_lesion_split_by_the_prediction_is_one_detected_lesion():
    ref = _cube(LESION_SHAPE, (5, 5, 5), (11, 11, 11))       # 216 voxels
    pred = ref.copy()
    pred[8] = False                                           # two components: 108 + 72 voxels
    r = _lesion_wise(ref, pred)
    assert _counts(r) == (1, 1, 0, 0)
    assert r["lesion_dsc"] == pytest.approx(2 * 180 / (216 + 180))
    assert r["lesion_hd95"] == pytest.approx(metrics.hd95(ref, pred, (1, 1, 1), "surfel"))


def test_ground_truth_parts_within_the_dilation_are_one_lesion():
    ref = _cube(LESION_SHAPE, (5, 5, 5), (9, 9, 9)) | _cube(LESION_SHAPE, (13, 5, 5), (17, 9, 9))  # 64 + 64, gap 4
    pred = _cube(LESION_SHAPE, (5, 5, 5), (9, 9, 9))         # finds only the first part
    assert metrics.ground_truth_lesions(ref, 3)[1] == 1 and metrics.ground_truth_lesions(ref, 1)[1] == 2
    gli = _lesion_wise(ref, pred, GLI)                          # one lesion of 128 voxels, half found
    assert _counts(gli) == (1, 1, 0, 0)
    assert gli["lesion_dsc"] == pytest.approx(2 * 64 / (128 + 64))
    assert gli["lesion_hd95"] == pytest.approx(metrics.hd95(ref, pred, (1, 1, 1), "surfel"))
    men = _lesion_wise(ref, pred, MEN)                          # two lesions: one perfect, one missed
    assert _counts(men) == (2, 1, 1, 0)
    assert men["lesion_dsc"] == pytest.approx(0.5)
    assert men["lesion_hd95"] == pytest.approx(374.0 / 2)


def test_one_predicted_component_merging_two_lesions_counts_for_both():
    ref = _cube(LESION_SHAPE, (5, 5, 5), (9, 9, 9)) | _cube(LESION_SHAPE, (13, 5, 5), (17, 9, 9))
    pred = _cube(LESION_SHAPE, (5, 5, 5), (17, 9, 9))         # 192 voxels bridging the gap
    r = _lesion_wise(ref, pred, MEN)
    assert _counts(r) == (2, 2, 0, 0)
    assert r["lesion_dsc"] == pytest.approx(2 * 64 / (64 + 192))  # each lesion against the whole component
    first = _cube(LESION_SHAPE, (5, 5, 5), (9, 9, 9))
    assert r["lesion_hd95"] == pytest.approx(metrics.hd95(first, pred, (1, 1, 1), "surfel"))  # mirror images


def test_small_lesions_are_ignored_but_every_false_positive_counts():
    ref = _cube(LESION_SHAPE, (5, 5, 5), (11, 11, 11))
    tiny_fp = _cube(LESION_SHAPE, (30, 20, 20), (32, 22, 22))  # 8 voxels far from the lesion
    r = _lesion_wise(ref, ref | tiny_fp)
    assert _counts(r) == (1, 1, 0, 1)                           # the organisers count a false positive of any size
    assert r["lesion_dsc"] == pytest.approx(0.5) and r["lesion_hd95"] == pytest.approx(374.0 / 2)
    # a missed ground-truth lesion of 8 voxels (<= 50 mm^3) is left out of score and counts
    r = _lesion_wise(ref | tiny_fp, ref)
    assert _counts(r) == (1, 1, 0, 0) and r["lesion_dsc"] == 1.0 and r["lesion_hd95"] == 0.0
    # a prediction that hits an ignored lesion is no false positive either
    r = _lesion_wise(ref | tiny_fp, ref | _cube(LESION_SHAPE, (31, 21, 21), (32, 22, 22)))
    assert _counts(r) == (1, 1, 0, 0) and r["lesion_dsc"] == 1.0


def test_volume_threshold_is_inclusive_and_in_mm3():
    lesion = _cube(LESION_SHAPE, (5, 5, 5), (10, 10, 7))        # 50 voxels
    empty = np.zeros(LESION_SHAPE, bool)
    at = _lesion_wise(lesion, empty, spacing=(1.0, 1.0, 1.0))   # 50 mm^3: ignored
    above = _lesion_wise(lesion, empty, spacing=(1.0, 1.0, 1.02))  # 51 mm^3: a missed lesion
    assert _counts(at) == (0, 0, 0, 0) and (at["lesion_dsc"], at["lesion_hd95"]) == (1.0, 0.0)
    assert _counts(above) == (1, 0, 1, 0) and (above["lesion_dsc"], above["lesion_hd95"]) == (0.0, 374.0)


def test_empty_ground_truth():
    empty = np.zeros(LESION_SHAPE, bool)
    two = _cube(LESION_SHAPE, (2, 2, 2), (6, 6, 6)) | _cube(LESION_SHAPE, (20, 20, 20), (24, 24, 24))
    r = _lesion_wise(empty, two)
    assert _counts(r) == (0, 0, 0, 2) and (r["lesion_dsc"], r["lesion_hd95"]) == (0.0, 374.0)
    r = _lesion_wise(empty, empty)
    assert _counts(r) == (0, 0, 0, 0) and (r["lesion_dsc"], r["lesion_hd95"]) == (1.0, 0.0)


def test_match_through_the_dilation_only():
    ref = _cube(LESION_SHAPE, (5, 5, 5), (11, 11, 11))
    near = _cube(LESION_SHAPE, (13, 5, 5), (15, 11, 11))        # 2 voxels between: reached by dilation 3
    far = _cube(LESION_SHAPE, (14, 5, 5), (16, 11, 11))         # 3 voxels between: a false positive
    assert _counts(_lesion_wise(ref, ref | near)) == (1, 1, 0, 0)
    assert _counts(_lesion_wise(ref, ref | far)) == (1, 1, 0, 1)


def _naive_lesion_wise(ref, pred, spacing, params):
    """Full-array lesion-wise scores, written out one lesion at a time (no crops)."""
    structure = ndimage.generate_binary_structure(3, 2)
    full = np.ones((3, 3, 3), bool)
    def dilate(mask):  # scipy reads iterations=0 as "until nothing changes"
        return ndimage.binary_dilation(mask, structure, iterations=params.dilation) if params.dilation else mask

    grown = dilate(ref)
    grown_labels, n = ndimage.label(grown, full)
    pred_labels, n_pred = ndimage.label(pred, full)
    hit, scores = set(), []
    for k in range(1, n + 1):
        lesion = ref & (grown_labels == k)
        reach = dilate(lesion)
        ids = set(np.unique(pred_labels[reach])) - {0}
        hit |= ids
        if lesion.sum() * np.prod(spacing) <= params.min_volume_mm3:
            continue
        found = np.isin(pred_labels, list(ids)) if ids else np.zeros_like(pred)
        scores.append((metrics.dice(lesion, found),
                       metrics.hd95(lesion, found, spacing, params.hd95_definition) if ids else 374.0))
    n_fp = n_pred - len(hit)
    scores += [(0.0, 374.0)] * n_fp
    if not scores:
        return 1.0, 0.0
    return float(np.mean([s[0] for s in scores])), float(np.mean([s[1] for s in scores]))


@pytest.mark.parametrize("seed", [3, 4])
def test_lesion_wise_agrees_with_a_naive_full_array_version(seed):
    rng = np.random.default_rng(seed)
    shape = (36, 32, 24)
    ref = np.zeros(shape, bool)
    for _ in range(6):                                          # scattered blobs of various sizes
        centre, radius = rng.integers(3, np.array(shape) - 3), rng.uniform(1.0, 4.0)
        grid = np.indices(shape).T - centre
        ref |= (np.linalg.norm(grid, axis=-1).T <= radius)
    pred = ndimage.binary_dilation(ref, iterations=1) & (rng.random(shape) > 0.15)
    pred |= _cube(shape, (0, 0, 0), (2, 2, 2))                  # a false positive on the border
    spacing = (1.0, 1.2, 1.5)
    for params in (GLI, MEN, metrics.LesionWiseParams(0, 10.0, hd95_definition="brats")):
        r = metrics.lesion_wise_metrics(ref, pred, spacing, params)
        dsc, hd = _naive_lesion_wise(ref, pred, spacing, params)
        assert r["lesion_dsc"] == pytest.approx(dsc, abs=1e-12) and r["lesion_hd95"] == pytest.approx(hd, abs=1e-9)


# ---------------------------------------------------------------- HD95 of surface elements ("surfel")

CORNER_BITS = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]])


def test_corner_code_areas_by_hand():
    iso = metrics.corner_code_areas((1.0, 1.0, 1.0))
    assert iso[0] == 0.0 and iso[255] == 0.0
    assert iso[1] == pytest.approx(np.sqrt(3) / 8) and iso[128] == pytest.approx(np.sqrt(3) / 8)  # one corner
    assert iso[3] == pytest.approx(np.sqrt(2) / 2)              # two corners along the last axis: a tilted square
    assert iso[15] == pytest.approx(1.0)                          # one face of the cell: a flat square
    aniso = metrics.corner_code_areas((1.0, 1.3, 2.5))
    a, b, c = np.array([0.5, 0, 0]), np.array([0, 0.65, 0]), np.array([0, 0, 1.25])
    assert aniso[128] == pytest.approx(0.5 * np.linalg.norm(np.cross(b - a, c - a)))
    assert aniso[15] == pytest.approx(1.3 * 2.5)                  # half the cells along axis 0 -> plane of 1.3 x 2.5



def test_corner_code_areas_complement_has_the_same_surface():
    iso = metrics.corner_code_areas((1.0, 1.0, 1.0))
    corner, edge = np.sqrt(3) / 8, np.sqrt(2) / 2
    assert iso[255 - 0b10010000] == pytest.approx(2 * corner)   # 6 inside, the 2 outside on a face diagonal
    assert iso[61] == pytest.approx(edge + corner)                # 5 inside; outside: an edge pair and a corner
    codes = np.arange(256)
    aniso = metrics.corner_code_areas((1.0, 1.3, 2.5))
    assert np.array_equal(aniso, aniso[255 - codes])


def _total_surfel_area(mask, spacing):
    (_, areas), _ = metrics.surfel_distances(mask, mask, spacing)
    return float(areas.sum())


def _block_surface(k, spacing):
    """Marching-cubes surface (mm^2) of a k x k x k block of voxels: faces, bevelled edges, corners."""
    sx, sy, sz = spacing
    faces = 2 * (k - 1) ** 2 * (sy * sz + sx * sz + sx * sy)
    edges = 4 * (k - 1) * (sx * np.hypot(sy, sz) + sy * np.hypot(sx, sz) + sz * np.hypot(sx, sy)) / 2
    corners = 8 * np.sqrt((sy * sz) ** 2 + (sx * sz) ** 2 + (sx * sy) ** 2) / 8
    return faces + edges + corners


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 1.3, 2.5)])
def test_total_surfel_area_of_blocks(spacing):
    voxel = _cube((3, 3, 3), (1, 1, 1), (2, 2, 2))
    assert _total_surfel_area(voxel, spacing) == pytest.approx(_block_surface(1, spacing), rel=1e-12)
    if spacing == (1.0, 1.0, 1.0):
        assert _total_surfel_area(voxel, spacing) == pytest.approx(np.sqrt(3))   # an octahedron
    block = _cube((9, 9, 9), (1, 1, 1), (7, 7, 7))
    assert _total_surfel_area(block, spacing) == pytest.approx(_block_surface(6, spacing), rel=1e-12)


def test_total_surfel_area_of_a_cavity_is_that_of_its_complement():
    # two one-voxel holes touching along an edge: the cavity is the surface of two voxels (2 sqrt 3 at
    # 1 mm); the two cells holding both holes have 6 corners inside and must count as two corners each
    holed = _cube((9, 9, 9), (1, 1, 1), (7, 7, 7))
    holed[3, 3, 3] = holed[4, 4, 3] = False
    assert _total_surfel_area(holed, (1.0, 1.0, 1.0)) == pytest.approx(_block_surface(6, (1, 1, 1)) + 2 * np.sqrt(3))


def test_corner_code_areas_match_the_reference_table(monkeypatch):
    """All 256 areas against the organisers' reference (DeepMind surface_distance), when importable.

    Set BRATS_REFERENCE_2023 to a checkout of the BraTS 2023 lesion-wise metrics repository (it holds
    ``surface_distance/``) or install ``surface_distance``; skipped otherwise.
    """
    import os

    if os.environ.get("BRATS_REFERENCE_2023"):
        monkeypatch.syspath_prepend(os.environ["BRATS_REFERENCE_2023"])
    tables = pytest.importorskip("surface_distance.lookup_tables")
    for spacing in ((1.0, 1.0, 1.0), (1.0, 1.3, 2.5), (0.9, 0.9, 3.0)):
        sx, sy, sz = spacing
        # each listed normal's length is a triangle's area; its components scale with the other two axes
        reference = np.array([np.linalg.norm(np.array(normals, dtype=float) * (sy * sz, sx * sz, sx * sy),
                                             axis=1).sum() for normals in tables.neighbour_code_to_normals])
        assert reference.shape == (256,)
        np.testing.assert_allclose(metrics.corner_code_areas(spacing), reference, rtol=0, atol=1e-12)

def _brute_surfel_hd95(ref, pred, spacing):
    """Surface elements by an explicit loop over voxel corners, distances by cdist."""
    areas = metrics.corner_code_areas(tuple(spacing))

    def elements(mask):
        padded = np.pad(mask, 1).astype(int)
        points, weights = [], []
        for i, j, k in np.ndindex(*(n - 1 for n in padded.shape)):
            code = int((padded[i:i + 2, j:j + 2, k:k + 2] * CORNER_BITS).sum())
            if 0 < code < 255:
                points.append((i, j, k))
                weights.append(areas[code])
        return np.array(points) * np.asarray(spacing), np.array(weights)

    (points_a, weights_a), (points_b, weights_b) = elements(ref), elements(pred)
    distances = cdist(points_a, points_b)

    def percentile(d, w):
        order = np.lexsort((w, d))
        cumulative = np.cumsum(w[order]) / np.sum(w[order])
        return d[order][min(int(np.searchsorted(cumulative, 0.95)), d.size - 1)]

    return max(percentile(distances.min(axis=1), weights_a), percentile(distances.min(axis=0), weights_b))


@pytest.mark.parametrize("seed", [5, 6])
def test_surfel_hd95_agrees_with_a_brute_force_version(seed):
    ref, pred = _random_blobs(seed, shape=(14, 12, 10))
    for spacing in ((1.0, 1.0, 1.0), (1.0, 1.3, 2.5)):
        assert metrics.hd95(ref, pred, spacing, "surfel") == pytest.approx(_brute_surfel_hd95(ref, pred, spacing),
                                                                          abs=1e-9)


def test_surfel_hd95_simple_cases():
    cube = _cube((10, 10, 10), (2, 2, 2), (6, 6, 6))
    assert metrics.hd95(cube, cube, (1, 1, 1), "surfel") == 0.0
    shifted = _cube((10, 10, 10), (4, 2, 2), (8, 6, 6))         # 2 voxels along x: faces 2 mm apart
    assert metrics.hd95(cube, shifted, (1, 1, 1), "surfel") == pytest.approx(2.0)
    assert metrics.hd95(cube, np.zeros_like(cube), (1, 1, 1), "surfel") == HD95_ONE_EMPTY


def test_hd95_of_one_mask_pair_is_measured_once_per_case(monkeypatch):
    # a region whose only lesion is matched by the whole prediction: with --hd95 surfel the legacy and the
    # lesion-wise HD95 are the same measurement, computed once (one pair of distance transforms)
    from brats_cnn.evaluation import metrics

    ref = np.zeros((30, 30, 30), dtype=bool)
    ref[5:15, 5:15, 5:15] = True
    pred = np.zeros_like(ref)
    pred[6:16, 5:14, 5:15] = True
    params = metrics.LesionWiseParams(dilation=1, min_volume_mm3=0.0, hd95_definition="surfel")
    expected = metrics.hd95(ref, pred, (1.0, 1.0, 1.0), "surfel")
    calls = []
    real = metrics.surfel_distances
    monkeypatch.setattr(metrics, "surfel_distances", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache: dict = {}
    legacy = metrics.mask_metrics(ref, pred, (1.0, 1.0, 1.0), "surfel", hd95_cache=cache)["hd95"]
    lesion = metrics.lesion_wise_metrics(ref, pred, (1.0, 1.0, 1.0), params, hd95_cache=cache)["lesion_hd95"]
    assert len(calls) == 1 and lesion == legacy == expected
    # another pair, or another definition, is measured again
    assert metrics.hd95(ref, pred[::-1].copy(), (1.0, 1.0, 1.0), "surfel", cache=cache) == 9.0
    assert len(calls) == 2
    metrics.hd95(ref, pred, (1.0, 1.0, 1.0), "brats", cache=cache)
    assert len(cache) == 3
