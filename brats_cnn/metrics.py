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

HD95 (mm) is the 95th percentile of the distances between the two masks' surfaces, in two
definitions (see :func:`hd95`): ``"brats"`` (default) pools the distances of both directions
before taking the percentile, as the BraTS evaluation package and MedPy do; ``"monai"`` takes the
larger of the two one-way 95th percentiles, as MONAI's ``compute_hausdorff_distance`` does. It is
0.0 when both masks are empty and :data:`HD95_ONE_EMPTY` (373.13 mm) when exactly one is.

A surface is the mask minus its erosion by the face-connected (6-neighbour) structuring element,
with everything outside the array counted as background, so mask voxels on the array border are
surface voxels.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from brats_cnn.labels import REGIONS, region_mask

HD95_ONE_EMPTY = 373.13  # mm, the BraTS value when exactly one mask is empty (the image diagonal)
HD95_DEFINITIONS: dict[str, str] = {
    "brats": "95th percentile of the pooled surface distances of both directions "
             "(BraTS evaluation package, MedPy hd95)",
    "monai": "larger of the two one-way 95th percentiles of the surface distances "
             "(MONAI compute_hausdorff_distance, percentile=95)",
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


def volume_ml(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Volume of a boolean mask in millilitres; ``spacing`` is the voxel size in mm per axis."""
    return float(np.count_nonzero(mask)) * float(np.prod(spacing)) / 1000.0


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


def hd95(mask_ref: np.ndarray, mask_pred: np.ndarray, spacing: Sequence[float],
         definition: str = "brats") -> float:
    """95th-percentile Hausdorff distance in mm.

    Args:
        mask_ref, mask_pred: boolean arrays of the same shape.
        spacing: voxel size in mm per axis.
        definition: ``"brats"`` (pooled distances of both directions, as BraTS and MedPy) or
            ``"monai"`` (max of the two one-way percentiles, as MONAI); see :data:`HD95_DEFINITIONS`.

    Returns:
        HD95 in mm; 0.0 when both masks are empty, :data:`HD95_ONE_EMPTY` when exactly one is.
        Percentiles use linear interpolation (NumPy's and torch's default).
    """
    if definition not in HD95_DEFINITIONS:
        raise ValueError(f"unknown HD95 definition '{definition}' (expected one of {list(HD95_DEFINITIONS)})")
    ref, pred = _check_pair(mask_ref, mask_pred)
    ref_any, pred_any = bool(ref.any()), bool(pred.any())
    if not ref_any and not pred_any:
        return 0.0
    if ref_any != pred_any:
        return HD95_ONE_EMPTY
    ref_to_pred, pred_to_ref = surface_distances(ref, pred, spacing)
    if definition == "brats":
        return float(np.percentile(np.concatenate([ref_to_pred, pred_to_ref]), 95))
    return float(max(np.percentile(ref_to_pred, 95), np.percentile(pred_to_ref, 95)))


def mask_metrics(mask_ref: np.ndarray, mask_pred: np.ndarray, spacing: Sequence[float],
                 hd95_definition: str = "brats", n_voxels: int | None = None) -> dict[str, float]:
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
        "hd95": hd95(mask_ref, mask_pred, spacing, hd95_definition),
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
                   pred_convention: str | None = None) -> dict[str, dict[str, float]]:
    """Metrics of the complete, core and enhancing regions of two label maps.

    Each map's regions are taken in its own convention, which equals converting the prediction
    to ``convention`` first and also works where that conversion is not defined (to brats2013).
    The work is done on the bounding box of both maps' foreground (:func:`foreground_box`).

    Args:
        labels_ref, labels_pred: ``(X, Y, Z)`` integer label values.
        convention: label convention of ``labels_ref`` (``brats2013``, ``brats2017``,
            ``brats2023``, ``msd``); ``pred_convention`` that of ``labels_pred`` (default: the same).
        spacing: voxel size in mm per axis.

    Returns:
        ``{region: {metric: value}}`` for the regions of :data:`brats_cnn.labels.REGIONS`.
    """
    box = foreground_box(labels_ref, labels_pred)
    ref, pred = np.asarray(labels_ref)[box], np.asarray(labels_pred)[box]
    n_voxels = int(np.asarray(labels_ref).size)
    return {region: mask_metrics(region_mask(ref, convention, region),
                                 region_mask(pred, pred_convention or convention, region), spacing,
                                 hd95_definition, n_voxels=n_voxels)
            for region in REGIONS}
