"""Resampling to the 1 mm isotropic grid the method assumes, and back.

Pereira et al. train and test on BraTS images, which are 1 mm isotropic: a 33x33 patch covers
33 mm. Images with other voxel sizes (2 mm, 1x1x5 mm) are resampled to 1 mm for the network and
the outputs are resampled back to the input grid, as nnU-Net does: images and probabilities with
linear interpolation, label maps with nearest neighbour. Both grids share the position of the
first voxel centre and the direction cosines; the 1 mm grid covers the same extent
(``round(shape * spacing)`` voxels per axis).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

ISOTROPIC_MM = 1.0
SPACING_TOLERANCE_MM = 1e-3  # the affine tolerance of io (AFFINE_TOLERANCE_MM): within it a grid is 1 mm


def needs_resampling(spacing: Sequence[float]) -> bool:
    """True unless every voxel side is 1 mm (within :data:`SPACING_TOLERANCE_MM`)."""
    return any(abs(float(s) - ISOTROPIC_MM) > SPACING_TOLERANCE_MM for s in spacing)


def isotropic_shape(shape: Sequence[int], spacing: Sequence[float]) -> tuple[int, int, int]:
    """Voxels per axis of the 1 mm grid covering ``shape`` voxels of ``spacing`` mm (at least 1)."""
    return tuple(max(1, int(round(n * float(s) / ISOTROPIC_MM))) for n, s in zip(shape, spacing))


def resample_volume(volume: np.ndarray, spacing: Sequence[float], shape: Sequence[int],
                    new_spacing: Sequence[float], interpolation: str) -> np.ndarray:
    """Resample one ``(X, Y, Z)`` volume onto a grid of ``shape`` voxels of ``new_spacing`` mm.

    Args:
        interpolation: ``"linear"`` (images, probabilities; returns float32) or ``"nearest"``
            (label maps; returns the input dtype).

    Voxels of the new grid outside the old one (at most half a voxel at the far edges) get 0.
    """
    import SimpleITK as sitk

    volume = np.asarray(volume)
    nearest = interpolation == "nearest"
    source = volume if nearest else volume.astype(np.float32, copy=False)
    image = sitk.GetImageFromArray(np.ascontiguousarray(source.transpose(2, 1, 0)))
    image.SetSpacing(tuple(float(s) for s in spacing))
    resampled = sitk.Resample(image, [int(n) for n in shape], sitk.Transform(),
                              sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear, (0.0, 0.0, 0.0),
                              tuple(float(s) for s in new_spacing), (1, 0, 0, 0, 1, 0, 0, 0, 1), 0,
                              image.GetPixelID())
    return sitk.GetArrayFromImage(resampled).transpose(2, 1, 0).copy()


def to_isotropic(case: Any) -> Any:
    """The case on the 1 mm grid: images linear, label map nearest neighbour; affine with 1 mm columns.

    ``case`` is a :class:`brats_cnn.data.io.Case`; the header is dropped (outputs are written on the
    input grid, with the input's header, after :func:`resample_volume` back).
    """
    shape = isotropic_shape(case.image.shape[1:], case.spacing)
    new_spacing = (ISOTROPIC_MM,) * 3
    image = np.stack([resample_volume(channel, case.spacing, shape, new_spacing, "linear")
                      for channel in case.image])
    label = None if case.label is None else resample_volume(case.label, case.spacing, shape, new_spacing, "nearest")
    affine = np.asarray(case.affine, dtype=np.float64).copy()
    affine[:3, :3] = affine[:3, :3] / np.asarray(case.spacing, dtype=np.float64) * ISOTROPIC_MM
    log.info("%s: voxel spacing %s mm is not the 1 mm of the method: resampled to 1 mm (%s -> %s voxels) for "
             "the network%s", case.case_id, "x".join(f"{s:g}" for s in case.spacing),
             "x".join(map(str, case.image.shape[1:])), "x".join(map(str, shape)),
             "" if case.label is None else " (label map: nearest neighbour)")
    return dataclasses.replace(case, image=image, label=label, affine=affine, header=None, spacing=new_spacing)
