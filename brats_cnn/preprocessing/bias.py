"""N4 bias-field correction (SPEC stage 1) with SimpleITK, on a shrunk image inside the brain mask."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from brats_cnn import CHANNELS
from brats_cnn.config import N4Config
from brats_cnn.errors import InputError


def n4_correct(volume: np.ndarray, mask: np.ndarray, n4: N4Config, *,
               spacing: Sequence[float] = (1.0, 1.0, 1.0), shrink_factor: int | None = None,
               source: str | Path | None = None) -> np.ndarray:
    """N4 bias-field correction of one sequence (SimpleITK).

    The field is fitted on the image and mask shrunk by ``shrink_factor`` (default
    ``n4.shrink_factor``; 1 = full resolution) and evaluated at full resolution; the corrected image
    is ``volume / exp(log_field)``. Only voxels inside ``mask`` with a positive intensity take part
    in the fit (N4 works on log intensities). Zeros stay zeros.

    Args:
        volume: ``(X, Y, Z)`` intensities (any real dtype; computed in float32).
        mask: ``(X, Y, Z)`` bool brain mask.
        n4: iterations per fitting level, convergence threshold and default shrink factor.
        spacing: voxel size in mm along X, Y, Z.
        shrink_factor: override of ``n4.shrink_factor`` (the benchmark compares 1 and 4).
        source: file or case named in error messages.

    Returns:
        ``(X, Y, Z)`` float32 corrected intensities.
    """
    import SimpleITK as sitk

    volume = np.asarray(volume, dtype=np.float32)
    fit_mask = np.asarray(mask, dtype=bool) & (volume > 0)
    if volume.shape != fit_mask.shape:
        raise InputError(f"N4: image shape {volume.shape} and mask shape {fit_mask.shape} differ", source)
    if not fit_mask.any():
        raise InputError("N4: no positive voxels inside the brain mask", source)
    factor = n4.shrink_factor if shrink_factor is None else int(shrink_factor)
    if factor < 1:
        raise InputError(f"N4: shrink factor must be >= 1, got {factor}", source)
    smallest = 2 * factor  # ITK's B-spline fit needs >= 2 voxels per axis after shrinking
    if min(volume.shape) < smallest:
        raise InputError(f"the volume is {'x'.join(map(str, volume.shape))} voxels; N4 with shrink factor {factor} "
                         f"needs at least {smallest} voxels along every axis (a larger crop, or a lower "
                         "preprocess.n4.shrink_factor)", source)

    # SimpleITK indexes arrays as (z, y, x); transposing keeps our X, Y, Z as ITK's x, y, z.
    image_itk = sitk.GetImageFromArray(volume.T)
    image_itk.SetSpacing(tuple(float(s) for s in spacing))
    mask_itk = sitk.GetImageFromArray(fit_mask.T.astype(np.uint8))
    mask_itk.CopyInformation(image_itk)
    if factor > 1:
        small_image = sitk.Shrink(image_itk, [factor] * 3)
        small_mask = sitk.Shrink(mask_itk, [factor] * 3)
    else:
        small_image, small_mask = image_itk, mask_itk
    if not sitk.GetArrayViewFromImage(small_mask).any():
        raise InputError(f"N4: brain mask is empty after shrinking by {factor}; lower "
                         f"preprocess.n4.shrink_factor", source)

    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([int(i) for i in n4.iterations])
    corrector.SetConvergenceThreshold(float(n4.convergence_threshold))
    corrector.Execute(small_image, small_mask)
    log_field = sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(image_itk)).T
    return (volume / np.exp(log_field)).astype(np.float32)


def correct_bias(image: np.ndarray, mask: np.ndarray, n4: N4Config, *,
                 spacing: Sequence[float] = (1.0, 1.0, 1.0),
                 channel_order: Sequence[str] = CHANNELS,
                 source: str | Path | None = None) -> np.ndarray:
    """N4 on the sequences named in ``n4.sequences``; the others are copied unchanged.

    Args:
        image: ``(C, X, Y, Z)`` intensities in ``channel_order``.
        mask: ``(X, Y, Z)`` bool brain mask.

    Returns:
        ``(C, X, Y, Z)`` float32, a new array.
    """
    unknown = sorted(set(n4.sequences) - set(channel_order))
    if unknown:
        raise InputError(f"preprocess.n4.sequences names unknown sequences {unknown} "
                         f"(expected some of {list(channel_order)})", source)
    out = np.array(image, dtype=np.float32, copy=True)
    for c, name in enumerate(channel_order):
        if name in n4.sequences:
            out[c] = n4_correct(out[c], mask, n4, spacing=spacing, source=f"{source or 'image'} ({name})")
    return out
