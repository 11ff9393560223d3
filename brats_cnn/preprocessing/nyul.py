"""Nyul & Udupa histogram standardisation (SPEC stage 2): landmarks, the standard scale, and the
piecewise-linear map of each sequence onto it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from brats_cnn.config import NyulConfig
from brats_cnn.errors import ConfigError, InputError


@dataclass(frozen=True)
class NyulStandard:
    """Fitted Nyul standard histogram of one sequence (plain data).

    Attributes:
        percentiles: ``(pc1, 10, ..., 90, pc2)`` in percent, strictly increasing.
        landmarks: the standard landmark intensities, one per percentile, strictly increasing,
            on the standard scale (``landmarks[0] == s1``, ``landmarks[-1] == s2``).
    """

    percentiles: tuple[float, ...]
    landmarks: tuple[float, ...]


def nyul_percentiles(nyul: NyulConfig) -> tuple[float, ...]:
    """The landmark percentiles ``(pc1, *landmarks, pc2)`` in percent; ConfigError if not increasing."""
    percentiles = (float(nyul.pc1), *(float(p) for p in nyul.landmarks), float(nyul.pc2))
    if not all(0.0 <= p <= 100.0 for p in percentiles) or np.any(np.diff(percentiles) <= 0):
        raise ConfigError(f"preprocess.nyul: pc1 < landmarks < pc2 must increase strictly within "
                          f"[0, 100], got {list(percentiles)}", "preprocess.nyul")
    if not float(nyul.s1) < float(nyul.s2):
        raise ConfigError(f"preprocess.nyul: s1 < s2 required, got s1={nyul.s1}, s2={nyul.s2}",
                          "preprocess.nyul")
    return percentiles


def _data_values(image: np.ndarray, mask: np.ndarray, source: str | Path | None) -> tuple[np.ndarray, float]:
    """The values of one sequence where it has data, and its coverage (fraction of the brain mask)."""
    image = np.asarray(image)
    mask = np.asarray(mask, dtype=bool)
    if image.shape != mask.shape:
        raise InputError(f"image shape {image.shape} and brain mask shape {mask.shape} differ", source)
    values = image[mask]
    if values.size == 0:
        raise InputError("empty brain mask (every voxel is zero); cannot standardise intensities", source)
    if not np.all(np.isfinite(values)):
        raise InputError("image has NaN or infinite values inside the brain", source)
    data = values[values != 0]
    if data.size == 0:
        raise InputError(f"sequence has no data inside the brain: it is 0 in all {values.size} voxels where "
                         "another sequence is non-zero", source)
    return data, data.size / values.size


def image_landmarks(image: np.ndarray, mask: np.ndarray, percentiles: Sequence[float], *,
                    source: str | Path | None = None) -> np.ndarray:
    """An image's own Nyul landmarks: percentiles of the brain voxels where it has data (non-zero).

    Args:
        image: ``(X, Y, Z)`` intensities of one sequence.
        mask: ``(X, Y, Z)`` bool brain mask (any sequence non-zero).
        percentiles: in percent, increasing.

    Returns:
        ``(len(percentiles),)`` float64, strictly increasing.

    Raises:
        InputError: empty mask, non-finite values, no data in the brain, or repeated landmarks
        (an image that is constant or almost constant where it has data).
    """
    values, coverage = _data_values(image, mask, source)
    return _landmarks_of_values(values, percentiles, source, coverage)


def _landmarks_of_values(values: np.ndarray, percentiles: Sequence[float],
                         source: str | Path | None, coverage: float = 1.0) -> np.ndarray:
    landmarks = np.percentile(values.astype(np.float64), list(percentiles))
    if np.any(np.diff(landmarks) <= 0):
        # zeros (missing coverage) are already excluded here, so this is the image itself
        raise InputError("degenerate intensity histogram: Nyul landmarks repeat "
                         f"({np.array2string(landmarks, precision=4, separator=', ')}) over the "
                         f"{values.size} brain voxels where this sequence has data ({100 * coverage:.1f} % "
                         "of the brain mask; missing coverage is excluded); the image is constant or "
                         "almost constant there", source)
    return landmarks


def _scale_to_standard(landmarks: np.ndarray, s1: float, s2: float) -> np.ndarray:
    """Map an image's landmarks linearly so that its [pc1, pc2] lands on [s1, s2]."""
    return s1 + (landmarks - landmarks[0]) * ((s2 - s1) / (landmarks[-1] - landmarks[0]))


def standard_from_landmarks(per_image_landmarks: Iterable[Sequence[float]], nyul: NyulConfig) -> NyulStandard:
    """The standard histogram from the landmarks of the training images of one sequence."""
    percentiles = nyul_percentiles(nyul)
    rows = [np.asarray(lm, dtype=np.float64) for lm in per_image_landmarks]
    if not rows:
        raise InputError("Nyul fit needs at least one training image")
    for lm in rows:
        if lm.shape != (len(percentiles),) or np.any(np.diff(lm) <= 0):
            raise InputError(f"Nyul fit: landmarks must be {len(percentiles)} strictly increasing values, "
                             f"got {lm.tolist()}")
    mapped = np.stack([_scale_to_standard(lm, float(nyul.s1), float(nyul.s2)) for lm in rows])
    standard = mapped.mean(axis=0)
    return NyulStandard(percentiles=percentiles, landmarks=tuple(float(v) for v in standard))


def fit_nyul(images: Iterable[np.ndarray], masks: Iterable[np.ndarray], nyul: NyulConfig) -> NyulStandard:
    """Fit Nyul's standard histogram on training images of ONE sequence.

    Args:
        images: ``(X, Y, Z)`` volumes of one sequence (may be a generator; one is held at a time).
        masks: matching ``(X, Y, Z)`` bool brain masks.
        nyul: percentiles and standard scale.

    Returns:
        :class:`NyulStandard` (plain data).
    """
    percentiles = nyul_percentiles(nyul)
    return standard_from_landmarks(
        (image_landmarks(img, msk, percentiles) for img, msk in zip(images, masks, strict=True)), nyul)


def piecewise_linear(values: np.ndarray, source_landmarks: Sequence[float],
                     target_landmarks: Sequence[float]) -> np.ndarray:
    """Monotone piecewise-linear map with linear extrapolation at both ends.

    Between landmarks it interpolates; below the first (above the last) landmark it continues the
    first (last) segment's line.

    Args:
        values: any shape, real dtype.
        source_landmarks, target_landmarks: equal length >= 2, both strictly increasing.

    Returns:
        float32 array of the shape of ``values``.
    """
    xp = np.asarray(source_landmarks, dtype=np.float64)
    fp = np.asarray(target_landmarks, dtype=np.float64)
    x = np.asarray(values, dtype=np.float64)
    out = np.interp(x, xp, fp)
    low_slope = (fp[1] - fp[0]) / (xp[1] - xp[0])
    high_slope = (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    below, above = x < xp[0], x > xp[-1]
    out[below] = fp[0] + (x[below] - xp[0]) * low_slope
    out[above] = fp[-1] + (x[above] - xp[-1]) * high_slope
    return out.astype(np.float32)


def apply_nyul(image: np.ndarray, mask: np.ndarray, standard: NyulStandard, *,
               source: str | Path | None = None, data_only: bool = False) -> np.ndarray:
    """Standardise one sequence: map its own landmarks onto ``standard.landmarks`` (pure).

    The landmarks come from the brain voxels where the image has data (:func:`image_landmarks`).
    By default every voxel is mapped (background and zeros included) and callers mask afterwards;
    with ``data_only=True`` only the data voxels (:func:`sequence_data_mask`) are mapped and the
    others are 0, which is what the pipeline (:func:`standardise_sequence`) uses.

    Args:
        image: ``(X, Y, Z)`` intensities.
        mask: ``(X, Y, Z)`` bool brain mask.
        standard: fitted :class:`NyulStandard` of this sequence.

    Returns:
        ``(X, Y, Z)`` float32 on the standard scale.
    """
    own = image_landmarks(image, mask, standard.percentiles, source=source)
    if not data_only:
        return piecewise_linear(image, own, standard.landmarks)
    data = sequence_data_mask(image, mask)
    out = np.zeros(np.shape(image), dtype=np.float32)
    out[data] = piecewise_linear(np.asarray(image)[data], own, standard.landmarks)
    return out


def sequence_data_mask(volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Brain voxels where one sequence has data: inside ``mask`` and non-zero.

    Args:
        volume: ``(X, Y, Z)`` intensities of one sequence (raw or N4-corrected: N4 keeps zeros).
        mask: ``(X, Y, Z)`` bool brain mask.

    Returns:
        ``(X, Y, Z)`` bool, a new array.
    """
    return np.asarray(mask, dtype=bool) & (np.asarray(volume) != 0)
