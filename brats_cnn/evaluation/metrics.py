"""Segmentation metrics as plain functions of two boolean masks (SPEC.md, stage 10).

Every function takes ``mask_ref`` (ground truth) and ``mask_pred`` (prediction): boolean arrays of
the same shape, usually ``(X, Y, Z)``. Overlap metrics come from the four confusion counts, which
:func:`compute_tp_fp_fn_tn` computes once:

=============  ===================  =====================================================
metric         formula              when the denominator is 0 (BraTS convention)
=============  ===================  =====================================================
DSC            2TP / (2TP+FP+FN)    both masks empty -> 1.0
PPV            TP / (TP+FP)         prediction empty: 1.0 if the truth is empty too, else 0.0
sensitivity    TP / (TP+FN)         truth empty: 1.0 if the prediction is empty too, else 0.0
specificity    TN / (TN+FP)         truth covers every voxel: 1.0 if the prediction does too, else 0.0
=============  ===================  =====================================================

HD95 (mm) is the 95th percentile of the distances between the two masks' surfaces, in three
definitions (see :func:`hd95`): ``"brats"`` (default) pools the distances of both directions
before taking the percentile, as the BraTS evaluation package and MedPy do; ``"monai"`` takes the
larger of the two one-way 95th percentiles, as MONAI's ``compute_hausdorff_distance`` does;
``"surfel"`` takes the larger of the two one-way percentiles of surface elements on the
voxel-corner lattice weighted by their area (:func:`surfel_distances`), the scheme of the BraTS
2023 lesion-wise code. It is 0.0 when both masks are empty and :data:`HD95_ONE_EMPTY` (373.13 mm,
the BraTS 2017-2021 value) when exactly one is; the lesion-wise HD95 of a missed or false-positive
lesion is :data:`LESION_HD95_PENALTY` (374 mm, the BraTS 2023+ value, which the organisers' 2023 code
also gives its whole-region "Legacy_HD95" with one mask empty; brats-cnn keeps 373.13 there).

For ``brats`` and ``monai``, a surface is the mask minus its erosion by the face-connected
(6-neighbour) structuring element, with everything outside the array counted as background, so
mask voxels on the array border are surface voxels.

Lesion-wise DSC and HD95 (BraTS 2023+, :func:`lesion_wise_metrics`) score each ground-truth lesion
on its own and average over lesions; see that function for the matching rules and
:data:`LESION_PRESETS` for the per-challenge parameters.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from brats_cnn.data.labels import REGIONS, region_mask

HD95_ONE_EMPTY = 373.13  # mm, BraTS 2017-2021 whole-region HD95 when exactly one mask is empty (the image diagonal)
HD95_DEFINITIONS: dict[str, str] = {
    "brats": "95th percentile of the pooled surface distances of both directions "
             "(BraTS evaluation package, MedPy hd95)",
    "monai": "larger of the two one-way 95th percentiles of the surface distances "
             "(MONAI compute_hausdorff_distance, percentile=95)",
    "surfel": "larger of the two one-way 95th percentiles of the distances between surface elements on "
              "the voxel-corner lattice, weighted by their marching-cubes area (the scheme of DeepMind's "
              "surface_distance, used by the BraTS 2023 lesion-wise code)",
}
METRIC_NAMES: tuple[str, ...] = ("dsc", "ppv", "sensitivity", "specificity", "hd95",
                                 "vol_pred_ml", "vol_gt_ml")


def _check_pair(mask_ref: np.ndarray, mask_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref, pred = np.asarray(mask_ref, dtype=bool), np.asarray(mask_pred, dtype=bool)
    if ref.shape != pred.shape:
        raise ValueError(f"mask shapes differ: reference {ref.shape}, prediction {pred.shape}")
    return ref, pred


def compute_tp_fp_fn_tn(mask_ref: np.ndarray, mask_pred: np.ndarray) -> tuple[int, int, int, int]:
    """Confusion counts of two boolean masks of the same shape.

    Returns:
        ``(tp, fp, fn, tn)`` as Python ints (voxel counts).
    """
    ref, pred = _check_pair(mask_ref, mask_pred)
    tp = int(np.count_nonzero(ref & pred))
    n_ref, n_pred = int(np.count_nonzero(ref)), int(np.count_nonzero(pred))
    fp, fn = n_pred - tp, n_ref - tp
    tn = ref.size - tp - fp - fn
    return tp, fp, fn, tn


def _ratio(numerator: int, denominator: int, other_empty: bool) -> float:
    """``numerator / denominator``; with a zero denominator 1.0 if the other mask is empty, else 0.0."""
    if denominator == 0:
        return 1.0 if other_empty else 0.0
    return numerator / denominator


def dice_from_counts(tp: int, fp: int, fn: int, tn: int = 0) -> float:
    """DSC = 2TP / (2TP + FP + FN); 1.0 when both masks are empty."""
    return _ratio(2 * tp, 2 * tp + fp + fn, other_empty=True)


def ppv_from_counts(tp: int, fp: int, fn: int, tn: int = 0) -> float:
    """PPV = TP / (TP + FP); prediction empty: 1.0 if the truth is empty too (FN = 0), else 0.0."""
    return _ratio(tp, tp + fp, other_empty=fn == 0)


def sensitivity_from_counts(tp: int, fp: int, fn: int, tn: int = 0) -> float:
    """Sensitivity = TP / (TP + FN); truth empty: 1.0 if the prediction is empty too (FP = 0), else 0.0."""
    return _ratio(tp, tp + fn, other_empty=fp == 0)


def specificity_from_counts(tp: int, fp: int, fn: int, tn: int) -> float:
    """Specificity = TN / (TN + FP); no negatives in the truth: 1.0 if none in the prediction (FN = 0), else 0.0."""
    return _ratio(tn, tn + fp, other_empty=fn == 0)


def dice(mask_ref: np.ndarray, mask_pred: np.ndarray) -> float:
    """Dice similarity coefficient of two boolean masks (see the module table for empty masks)."""
    return dice_from_counts(*compute_tp_fp_fn_tn(mask_ref, mask_pred))


def ppv(mask_ref: np.ndarray, mask_pred: np.ndarray) -> float:
    """Positive predictive value (precision) of two boolean masks."""
    return ppv_from_counts(*compute_tp_fp_fn_tn(mask_ref, mask_pred))


def sensitivity(mask_ref: np.ndarray, mask_pred: np.ndarray) -> float:
    """Sensitivity (recall, true positive rate) of two boolean masks."""
    return sensitivity_from_counts(*compute_tp_fp_fn_tn(mask_ref, mask_pred))


def specificity(mask_ref: np.ndarray, mask_pred: np.ndarray) -> float:
    """Specificity (true negative rate) of two boolean masks."""
    return specificity_from_counts(*compute_tp_fp_fn_tn(mask_ref, mask_pred))


def _surface(mask: np.ndarray) -> np.ndarray:
    """Mask minus its face-connected erosion (outside the array counts as background)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(mask_ref: np.ndarray, mask_pred: np.ndarray,
                      spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of one mask to the nearest surface voxel of the other.

    Both masks must be non-empty. The work is done on the bounding box of the union of both masks
    with a one-voxel zero margin, which gives the same distances as the full array: every surface
    voxel lies inside the box, and the margin makes voxels on the array border surface voxels.

    Args:
        mask_ref, mask_pred: boolean arrays of the same shape ``(X, Y, Z)`` (any dimension works).
        spacing: voxel size in mm per axis.

    Returns:
        ``(ref_to_pred, pred_to_ref)``: float64 arrays with one distance per surface voxel of
        ``mask_ref`` and of ``mask_pred`` respectively.
    """
    ref, pred = _check_pair(mask_ref, mask_pred)
    if not ref.any() or not pred.any():
        raise ValueError("surface distances need two non-empty masks")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ref.ndim:
        raise ValueError(f"spacing has {len(spacing)} values for a {ref.ndim}-D mask")
    box = ndimage.find_objects((ref | pred).astype(np.uint8))[0]
    ref_box = np.pad(ref[box], 1)
    pred_box = np.pad(pred[box], 1)
    surface_ref, surface_pred = _surface(ref_box), _surface(pred_box)
    # distance_transform_edt measures the distance to the nearest zero, so invert the surfaces.
    to_pred_surface = ndimage.distance_transform_edt(~surface_pred, sampling=spacing)
    to_ref_surface = ndimage.distance_transform_edt(~surface_ref, sampling=spacing)
    return to_pred_surface[surface_ref], to_ref_surface[surface_pred]


# Bit of each corner of a 2x2x2 cell of voxels in the corner code (first axis slowest).
_CORNER_BITS = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]], dtype=np.uint8)


@functools.lru_cache(maxsize=32)
def corner_code_areas(spacing: tuple[float, float, float]) -> np.ndarray:
    """Surface area (mm^2) inside one cell of 2x2x2 voxel centres, for each of the 256 corner codes.

    The surface is the marching-cubes iso-surface at 0.5 of the cell's 0/1 corner values (vertices
    at edge midpoints, scaled by ``spacing``) as Lorensen and Cline's original method builds it: 15
    base cases extended by rotation *and complement*, so a configuration and its complement (inside
    and outside swapped) have the same surface. A configuration with more than four corners inside
    is therefore triangulated as its complement. This is the table of DeepMind's
    ``surface_distance`` (the BraTS 2023 lesion-wise code); skimage's ``method="lorensen"`` table
    alone triangulates 44 of those configurations differently (it joins what the complement keeps
    apart: 6 corners inside around two opposite corners of a face give 1.30 mm^2 there instead of
    two corner triangles, sqrt(3)/4 mm^2, at 1 mm spacing). Codes 0 and 255: 0.

    Args:
        spacing: voxel size in mm per axis (first axis = the 128 bit's axis, see ``_CORNER_BITS``).

    Returns:
        ``(256,)`` float64.
    """
    from skimage.measure import marching_cubes

    areas = np.zeros(256)
    scale = np.asarray(spacing, dtype=np.float64)
    for code in range(1, 255):
        inside = (code & _CORNER_BITS) > 0
        if np.count_nonzero(inside) > 4:
            inside = ~inside                # complement symmetry: the same surface, from the other side
        vertices, faces, _, _ = marching_cubes(inside.astype(np.float32), level=0.5, method="lorensen")
        triangles = (vertices.astype(np.float64) * scale)[faces]
        edges = np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0])
        areas[code] = 0.5 * np.linalg.norm(edges, axis=1).sum()
    return areas


def surfel_distances(mask_ref: np.ndarray, mask_pred: np.ndarray, spacing: Sequence[float]
                     ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Distances between surface elements of two non-empty 3-D masks, with the elements' areas.

    Surface elements sit on the lattice of voxel corners: a corner whose 8 surrounding voxels are
    neither all inside nor all outside a mask is on its surface, with the area
    :func:`corner_code_areas` gives its configuration. Distances (mm) go from each element of one
    mask to the nearest element of the other (exact Euclidean distance transform on the lattice).

    Returns:
        ``((ref_to_pred, ref_areas), (pred_to_ref, pred_areas))``: float64 arrays, one value per
        surface element of ``mask_ref`` and of ``mask_pred``.
    """
    ref, pred = _check_pair(mask_ref, mask_pred)
    if ref.ndim != 3 or not ref.any() or not pred.any():
        raise ValueError("surface elements need two non-empty 3-D masks")
    spacing = tuple(float(s) for s in spacing)
    box = ndimage.find_objects((ref | pred).astype(np.uint8))[0]
    areas = corner_code_areas(spacing)
    codes = [ndimage.correlate(np.pad(m[box], 1).astype(np.uint8), _CORNER_BITS, mode="constant", cval=0)[1:, 1:, 1:]
             for m in (ref, pred)]
    borders = [(c != 0) & (c != 255) for c in codes]
    to_ref, to_pred = (ndimage.distance_transform_edt(~b, sampling=spacing) for b in borders)
    return ((to_pred[borders[0]], areas[codes[0][borders[0]]]),
            (to_ref[borders[1]], areas[codes[1][borders[1]]]))


def _weighted_percentile(distances: np.ndarray, weights: np.ndarray, percent: float) -> float:
    """The smallest distance at which the cumulative weight (sorted by distance) reaches ``percent`` %."""
    order = np.lexsort((weights, distances))
    sorted_distances, sorted_weights = distances[order], weights[order]
    cumulative = np.cumsum(sorted_weights) / np.sum(sorted_weights)
    index = int(np.searchsorted(cumulative, percent / 100.0))
    return float(sorted_distances[min(index, sorted_distances.size - 1)])


def _hd95_key(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], definition: str) -> bytes:
    """A key equal for two mask pairs that differ only by a translation (or crop) of both: HD95 is the same."""
    import hashlib

    box = ndimage.find_objects((ref | pred).astype(np.uint8))[0]
    digest = hashlib.blake2b(digest_size=16)
    for part in (np.packbits(ref[box]).tobytes(), np.packbits(pred[box]).tobytes(),
                 repr((ref[box].shape, tuple(float(s) for s in spacing), definition)).encode()):
        digest.update(part)
    return digest.digest()


def hd95(mask_ref: np.ndarray, mask_pred: np.ndarray, spacing: Sequence[float],
         definition: str = "brats", cache: dict | None = None) -> float:
    """95th-percentile Hausdorff distance in mm.

    Args:
        mask_ref, mask_pred: boolean arrays of the same shape.
        spacing: voxel size in mm per axis.
        definition: ``"brats"`` (pooled distances of both directions, as BraTS and MedPy),
            ``"monai"`` (max of the two one-way percentiles, as MONAI) or ``"surfel"`` (max of the
            two one-way area-weighted percentiles of surface elements, :func:`surfel_distances`;
            3-D only); see :data:`HD95_DEFINITIONS`.

    Returns:
        HD95 in mm; 0.0 when both masks are empty, :data:`HD95_ONE_EMPTY` when exactly one is.
        Percentiles use linear interpolation (NumPy's and torch's default).

    ``cache``: a dict shared by the calls for one case; a pair already measured (the same masks up
    to a crop, e.g. a region's only lesion matched by the whole prediction, scored again lesion-wise)
    is not measured again: its distance transforms are computed once.
    """
    if definition not in HD95_DEFINITIONS:
        raise ValueError(f"unknown HD95 definition '{definition}' (expected one of {list(HD95_DEFINITIONS)})")
    ref, pred = _check_pair(mask_ref, mask_pred)
    ref_any, pred_any = bool(ref.any()), bool(pred.any())
    if not ref_any and not pred_any:
        return 0.0
    if ref_any != pred_any:
        return HD95_ONE_EMPTY
    if cache is not None:
        key = _hd95_key(ref, pred, spacing, definition)
        if key not in cache:
            cache[key] = hd95(ref, pred, spacing, definition)
        return cache[key]
    if definition == "surfel":
        return float(max(_weighted_percentile(d, a, 95) for d, a in surfel_distances(ref, pred, spacing)))
    ref_to_pred, pred_to_ref = surface_distances(ref, pred, spacing)
    if definition == "brats":
        return float(np.percentile(np.concatenate([ref_to_pred, pred_to_ref]), 95))
    return float(max(np.percentile(ref_to_pred, 95), np.percentile(pred_to_ref, 95)))


def mask_metrics(mask_ref: np.ndarray, mask_pred: np.ndarray, spacing: Sequence[float],
                 hd95_definition: str = "brats", n_voxels: int | None = None,
                 hd95_cache: dict | None = None) -> dict[str, float]:
    """All metrics of one region: the keys of :data:`METRIC_NAMES` (volumes in ml, HD95 in mm).

    Args:
        mask_ref, mask_pred: boolean arrays of the same shape.
        spacing: voxel size in mm per axis.
        hd95_definition: see :func:`hd95`.
        n_voxels: voxel count of the whole image when the masks are a crop of it that holds every
            foreground voxel of both (the voxels outside the crop are true negatives); default:
            the masks' own size.
    """
    tp, fp, fn, tn = compute_tp_fp_fn_tn(mask_ref, mask_pred)
    if n_voxels is not None:
        tn += int(n_voxels) - np.asarray(mask_ref).size
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return {
        "dsc": dice_from_counts(tp, fp, fn, tn),
        "ppv": ppv_from_counts(tp, fp, fn, tn),
        "sensitivity": sensitivity_from_counts(tp, fp, fn, tn),
        "specificity": specificity_from_counts(tp, fp, fn, tn),
        "hd95": hd95(mask_ref, mask_pred, spacing, hd95_definition, cache=hd95_cache),
        "vol_pred_ml": (tp + fp) * voxel_ml,
        "vol_gt_ml": (tp + fn) * voxel_ml,
    }


def foreground_box(labels_ref: np.ndarray, labels_pred: np.ndarray) -> tuple[slice, ...]:
    """Bounding box (slices) of the non-zero voxels of two label maps of the same shape.

    Cropping both maps to it keeps every region voxel, so metrics on the crop are those of the
    whole image once the voxels outside are counted as true negatives (``n_voxels``). Two empty
    maps give an empty box.
    """
    ref, pred = np.asarray(labels_ref), np.asarray(labels_pred)
    if ref.shape != pred.shape:
        raise ValueError(f"label map shapes differ: reference {ref.shape}, prediction {pred.shape}")
    found = ndimage.find_objects(((ref != 0) | (pred != 0)).astype(np.uint8))
    return found[0] if found else tuple(slice(0, 0) for _ in ref.shape)


def region_metrics(labels_ref: np.ndarray, labels_pred: np.ndarray, convention: str,
                   spacing: Sequence[float], hd95_definition: str = "brats",
                   pred_convention: str | None = None, lesion_params: LesionWiseParams | None = None
                   ) -> dict[str, dict[str, float]]:
    """Metrics of the complete, core and enhancing regions of two label maps.

    Each map's regions are taken in its own convention, which equals converting the prediction
    to ``convention`` first and also works where that conversion is not defined (to brats2013).
    The work is done on the bounding box of both maps' foreground (:func:`foreground_box`).

    Args:
        labels_ref, labels_pred: ``(X, Y, Z)`` integer label values.
        convention: label convention of ``labels_ref`` (``brats2013``, ``brats2017``,
            ``brats2023``, ``msd``); ``pred_convention`` that of ``labels_pred`` (default: the same).
        spacing: voxel size in mm per axis.
        lesion_params: when given, each region also gets the lesion-wise metrics and counts of
            :func:`lesion_wise_metrics` (keys :data:`LESION_METRIC_NAMES`); their HD95 follows
            ``lesion_params.hd95_definition``, not ``hd95_definition``.

    Returns:
        ``{region: {metric: value}}`` for the regions of :data:`brats_cnn.data.labels.REGIONS`.
    """
    box = foreground_box(labels_ref, labels_pred)
    ref, pred = np.asarray(labels_ref)[box], np.asarray(labels_pred)[box]
    n_voxels = int(np.asarray(labels_ref).size)
    out = {}
    cache: dict = {}  # HD95 of a mask pair measured once per case (legacy and lesion-wise of one region)
    for region in REGIONS:
        mask_ref = region_mask(ref, convention, region)
        mask_pred = region_mask(pred, pred_convention or convention, region)
        out[region] = mask_metrics(mask_ref, mask_pred, spacing, hd95_definition, n_voxels=n_voxels, hd95_cache=cache)
        if lesion_params is not None:
            out[region].update(lesion_wise_metrics(mask_ref, mask_pred, spacing, lesion_params, hd95_cache=cache))
    return out


# ----------------------------------------------------------------------------------------------
# Lesion-wise metrics (BraTS 2023+)
# ----------------------------------------------------------------------------------------------

LESION_HD95_PENALTY = 374.0  # mm, the BraTS 2023+ HD95 of a missed or a false-positive lesion
LESION_METRIC_NAMES: tuple[str, ...] = ("lesion_dsc", "lesion_hd95", "gt_lesions", "detected_lesions",
                                        "missed_lesions", "fp_lesions")


@dataclass(frozen=True)
class LesionWiseParams:
    """Parameters of lesion-wise scoring.

    Attributes:
        dilation: iterations of the 18-neighbour dilation of the ground truth that decides which
            ground-truth components form one lesion and which predicted components match a lesion.
        min_volume_mm3: ground-truth lesions whose volume is at most this (mm^3) are left out of
            the score and the counts (predicted components matching them are not false positives).
        hd95_definition: HD95 of a matched lesion (see :func:`hd95`); ``"surfel"``, the scheme of
            the organisers' lesion-wise code, by default.
    """

    dilation: int
    min_volume_mm3: float
    hd95_definition: str = "surfel"


# The organisers' parameters per challenge (BraTS 2023 lesion-wise evaluation).
LESION_PRESETS: dict[str, LesionWiseParams] = {
    "gli": LesionWiseParams(dilation=3, min_volume_mm3=50.0),   # adult glioma
    "ssa": LesionWiseParams(dilation=3, min_volume_mm3=50.0),   # sub-Saharan Africa glioma
    "ped": LesionWiseParams(dilation=3, min_volume_mm3=50.0),   # paediatric tumours
    "men": LesionWiseParams(dilation=1, min_volume_mm3=50.0),   # meningioma
    "met": LesionWiseParams(dilation=1, min_volume_mm3=2.0),    # brain metastases
}

_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


def lesion_preset(name: str) -> LesionWiseParams:
    """The parameters of a challenge preset (``gli``, ``ssa``, ``ped``, ``men``, ``met``)."""
    try:
        return LESION_PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown lesion-wise preset '{name}' (expected one of {list(LESION_PRESETS)})") from None


def ground_truth_lesions(mask_ref: np.ndarray, dilation: int) -> tuple[np.ndarray, int]:
    """Label the lesions of a ground-truth mask: 26-connected components merged through dilation.

    Ground-truth components that touch one connected component of the mask dilated ``dilation``
    times (18-neighbour structuring element) form one lesion, so two parts of a tumour a few
    voxels apart count once.

    Args:
        mask_ref: ``(X, Y, Z)`` bool.
        dilation: iterations of the dilation (0: plain 26-connected components).

    Returns:
        ``(lesions, n)``: int32 array of the mask's shape, 0 outside the mask and 1..n inside.
    """
    ref = np.asarray(mask_ref, dtype=bool)
    grown = ref if dilation == 0 else ndimage.binary_dilation(
        ref, structure=ndimage.generate_binary_structure(3, 2), iterations=dilation)
    labelled, n = ndimage.label(grown, structure=_CONNECTIVITY_26)
    lesions = np.where(ref, labelled, 0).astype(np.int32)
    # every component of the dilated mask holds ground-truth voxels, so the ids 1..n are all used
    return lesions, int(n)


def lesion_wise_metrics(mask_ref: np.ndarray, mask_pred: np.ndarray, spacing: Sequence[float],
                        params: LesionWiseParams, hd95_cache: dict | None = None) -> dict[str, float | int]:
    """BraTS 2023+ lesion-wise DSC and HD95 of one region, with the lesion counts.

    Rules (the organisers' lesion-wise evaluation):

    * ground-truth lesions: see :func:`ground_truth_lesions`; predicted lesions: 26-connected
      components of the prediction (of any size);
    * a predicted component matches a ground-truth lesion when it overlaps that lesion dilated
      ``params.dilation`` times; a lesion is scored against the union of its matched components
      (DSC, and HD95 by ``params.hd95_definition``); a lesion without a match is *missed*: DSC 0, HD95
      :data:`LESION_HD95_PENALTY`;
    * predicted components that match no lesion are *false positives*, each scored DSC 0 and
      HD95 :data:`LESION_HD95_PENALTY`;
    * lesions of at most ``params.min_volume_mm3`` are left out (their matches are not false
      positives either);
    * the score is the mean over the kept lesions and the false positives; with neither (both
      masks empty, or only ignored lesions) DSC is 1 and HD95 0.

    Args:
        mask_ref, mask_pred: ``(X, Y, Z)`` bool of the same shape.
        spacing: voxel size in mm per axis (volumes and distances).
        params: dilation, volume threshold and HD95 definition (:data:`LESION_PRESETS`).
        hd95_cache: shared with the region's own HD95 (:func:`hd95`).

    Returns:
        ``lesion_dsc``, ``lesion_hd95`` (mm), and the counts ``gt_lesions`` (kept ground-truth
        lesions), ``detected_lesions``, ``missed_lesions`` and ``fp_lesions`` (ints).
    """
    ref, pred = _check_pair(mask_ref, mask_pred)
    if ref.ndim != 3:
        raise ValueError(f"lesion-wise metrics need 3-D masks, got shape {ref.shape}")
    if not ref.any() and not pred.any():
        return {"lesion_dsc": 1.0, "lesion_hd95": 0.0, "gt_lesions": 0, "detected_lesions": 0,
                "missed_lesions": 0, "fp_lesions": 0}
    box = _padded_box(ref | pred, params.dilation)
    ref, pred = ref[box], pred[box]
    voxel_mm3 = float(np.prod(spacing))
    lesions, n_lesions = ground_truth_lesions(ref, params.dilation)
    components, n_components = ndimage.label(pred, structure=_CONNECTIVITY_26)
    component_sizes = np.bincount(components.ravel(), minlength=n_components + 1)
    component_boxes = ndimage.find_objects(components)
    lesion_sizes = np.bincount(lesions.ravel(), minlength=n_lesions + 1)
    matched_any = np.zeros(n_components + 1, dtype=bool)
    dsc_sum = hd_sum = 0.0
    kept = detected = 0
    structure = ndimage.generate_binary_structure(3, 2)
    for lesion_id, lesion_box in enumerate(ndimage.find_objects(lesions), start=1):
        near = _grow_box(lesion_box, params.dilation, ref.shape)
        lesion = lesions[near] == lesion_id
        reach = lesion if params.dilation == 0 else ndimage.binary_dilation(
            lesion, structure=structure, iterations=params.dilation)
        matched = np.unique(components[near][reach])
        matched = matched[matched != 0]
        matched_any[matched] = True
        if lesion_sizes[lesion_id] * voxel_mm3 <= params.min_volume_mm3:
            continue
        kept += 1
        if matched.size == 0:
            hd_sum += LESION_HD95_PENALTY
            continue
        detected += 1
        union_box = _union_box([lesion_box, *(component_boxes[c - 1] for c in matched)])
        lesion_mask = lesions[union_box] == lesion_id
        matched_mask = np.isin(components[union_box], matched)
        overlap = int(np.count_nonzero(lesion_mask & matched_mask))
        dsc_sum += 2.0 * overlap / (int(lesion_sizes[lesion_id]) + int(component_sizes[matched].sum()))
        hd_sum += hd95(lesion_mask, matched_mask, spacing, params.hd95_definition, cache=hd95_cache)
    n_fp = int(n_components - np.count_nonzero(matched_any[1:]))
    denominator = kept + n_fp
    return {
        "lesion_dsc": dsc_sum / denominator if denominator else 1.0,
        "lesion_hd95": (hd_sum + n_fp * LESION_HD95_PENALTY) / denominator if denominator else 0.0,
        "gt_lesions": kept, "detected_lesions": detected, "missed_lesions": kept - detected,
        "fp_lesions": n_fp,
    }


def _padded_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Bounding box of a non-empty ``mask`` grown by ``margin`` voxels (clipped to the array)."""
    return _grow_box(ndimage.find_objects(mask.astype(np.uint8))[0], margin, mask.shape)


def _grow_box(box: tuple[slice, ...], margin: int, shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape))


def _union_box(boxes: Sequence[tuple[slice, ...]]) -> tuple[slice, ...]:
    return tuple(slice(min(b[k].start for b in boxes), max(b[k].stop for b in boxes)) for k in range(len(boxes[0])))
