"""Stages 1-3: N4 bias-field correction, Nyul intensity standardisation and z-scoring.

Every stage is a plain function on arrays. Fitting returns plain data (:class:`NyulStandard`,
:class:`CaseStatistics`, :class:`NormaliserState`); applying is a pure function of an image and
that data, so inference never refits.

Conventions:

- A case image is ``(4, X, Y, Z)`` float32 in :data:`brats_cnn.CHANNELS` order (T1, T1c, T2, FLAIR).
- The brain mask is ``(X, Y, Z)`` bool: voxels where any raw sequence is non-zero (SPEC choice).
- A sequence *has data* at the brain voxels where it is non-zero (:func:`sequence_data_mask`). Real
  BraTS sequences sometimes cover only part of the brain (a FLAIR that is 0 in a third of it); such
  zeros are missing data, not intensities, so every statistic of a sequence is taken over its own
  data voxels only.
- Nyul landmarks are the percentiles ``(pc1, 10, 20, ..., 90, pc2)`` of a sequence's data voxels
  (``NyulConfig``); an image's ``[pc1, pc2]`` is mapped linearly onto ``[s1, s2]`` when fitting,
  and the standard landmarks are the mean mapped positions over the training images.
- z-scoring uses the mean/std of all training data voxels after Nyul, per sequence. Voxels outside
  the brain, and brain voxels where a sequence has no data, get ``PreprocessConfig.background_value``
  (choice: 0.0, which is also the mean of the data voxels after z-scoring).

Fitting streams over cases: one case is in memory at a time, and only its landmarks and, for each
linear piece of its Nyul map, the count / sum / sum of squares of its brain voxels are kept. Because
the Nyul map is linear on each piece, these moments give the exact mean and variance of the
standardised voxels once the standard landmarks are known, without a second pass (and without
running N4 twice).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import numpy as np

from brats_cnn import CHANNELS
from brats_cnn.config import N4Config, NyulConfig, PreprocessConfig
from brats_cnn.errors import ConfigError, InputError

NORMALISER_VERSION = 1
"""Format version of :class:`NormaliserState`; bump it when the meaning of a field changes."""


# --------------------------------------------------------------------------------------------
# brain mask
# --------------------------------------------------------------------------------------------

def brain_mask(image: np.ndarray) -> np.ndarray:
    """Voxels where any sequence is non-zero (SPEC choice).

    Args:
        image: ``(C, X, Y, Z)`` raw intensities, any dtype.

    Returns:
        ``(X, Y, Z)`` bool mask.
    """
    image = np.asarray(image)
    if image.ndim != 4:
        raise InputError(f"expected a (C, X, Y, Z) image, got shape {image.shape}")
    return np.any(image != 0, axis=0)


def sequence_data_mask(volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Brain voxels where one sequence has data: inside ``mask`` and non-zero.

    Args:
        volume: ``(X, Y, Z)`` intensities of one sequence (raw or N4-corrected: N4 keeps zeros).
        mask: ``(X, Y, Z)`` bool brain mask.

    Returns:
        ``(X, Y, Z)`` bool, a new array.
    """
    return np.asarray(mask, dtype=bool) & (np.asarray(volume) != 0)


def sequence_coverage(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Fraction of the brain mask where each sequence has data.

    Args:
        image: ``(C, X, Y, Z)`` intensities.
        mask: ``(X, Y, Z)`` bool brain mask.

    Returns:
        ``(C,)`` float64 in [0, 1]; all 0 for an empty mask.
    """
    mask = np.asarray(mask, dtype=bool)
    brain = int(mask.sum())
    if brain == 0:
        return np.zeros(np.shape(image)[0])
    return np.array([np.count_nonzero(sequence_data_mask(channel, mask)) / brain for channel in image])


# --------------------------------------------------------------------------------------------
# N4 bias-field correction (stage 1)
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Nyul standardisation (stage 2)
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# z-score (stage 3)
# --------------------------------------------------------------------------------------------

def zscore(image: np.ndarray, mask: np.ndarray, mean: float, std: float,
           background_value: float = 0.0) -> np.ndarray:
    """``(image - mean) / std`` inside the mask, ``background_value`` outside.

    Args:
        image: ``(X, Y, Z)`` (or any shape matching ``mask``).
        mask: bool, same shape.
        mean, std: fitted statistics of the training brain voxels (``std > 0``).

    Returns:
        float32 array, new.
    """
    if not std > 0:
        raise InputError(f"z-score: standard deviation must be positive, got {std}")
    out = np.full(np.shape(image), background_value, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    out[mask] = ((np.asarray(image)[mask].astype(np.float64) - mean) / std).astype(np.float32)
    return out


# --------------------------------------------------------------------------------------------
# fitted state
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NormaliserState:
    """Everything fitted on the training cases, as plain, versioned data.

    ``to_dict()`` gives JSON types only and ``from_dict(json.loads(json.dumps(d)))`` rebuilds an
    equal state (floats round-trip exactly through JSON). It is saved as ``normaliser.json`` in the
    cache and inside every checkpoint; inference uses it unchanged.

    Attributes:
        version: :data:`NORMALISER_VERSION`.
        channel_order: sequences of the image's first axis, e.g. ``("t1", "t1c", "t2", "flair")``.
        percentiles: Nyul landmark percentiles ``(pc1, 10, ..., 90, pc2)``, in percent.
        standard_scale: ``(s1, s2)``.
        landmarks: per sequence, the standard landmarks (one per percentile).
        mean, std: per sequence, statistics of the training brain voxels after Nyul.
        n4_sequences, n4_shrink_factor, n4_iterations, n4_convergence_threshold: the N4 settings
            used when fitting; applying uses the same ones.
        n_cases: number of training cases fitted on.
        case_ids: their ids (provenance).
    """

    version: int
    channel_order: tuple[str, ...]
    percentiles: tuple[float, ...]
    standard_scale: tuple[float, float]
    landmarks: dict[str, tuple[float, ...]]
    mean: dict[str, float]
    std: dict[str, float]
    n4_sequences: tuple[str, ...]
    n4_shrink_factor: int
    n4_iterations: tuple[int, ...]
    n4_convergence_threshold: float
    n_cases: int
    case_ids: tuple[str, ...] = ()

    def nyul_standard(self, sequence: str) -> NyulStandard:
        """The fitted :class:`NyulStandard` of one sequence."""
        return NyulStandard(self.percentiles, self.landmarks[sequence])

    def n4_config(self) -> N4Config:
        """The N4 settings this state was fitted with."""
        return N4Config(sequences=self.n4_sequences, shrink_factor=self.n4_shrink_factor,
                        iterations=self.n4_iterations, convergence_threshold=self.n4_convergence_threshold)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists instead of tuples)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | Path | None = None) -> "NormaliserState":
        """Rebuild a state from :meth:`to_dict` output; raises InputError on a bad or newer dict."""
        if not isinstance(data, Mapping):
            raise InputError("normaliser state must be a JSON object", source)
        version = data.get("version")
        if version != NORMALISER_VERSION:
            raise InputError(f"normaliser state version {version!r} is not supported "
                             f"(this brats-cnn reads version {NORMALISER_VERSION})", source)
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data and n != "case_ids"]
        if missing:
            raise InputError(f"normaliser state lacks field(s) {missing}", source)
        try:
            order = tuple(str(c) for c in data["channel_order"])
            state = cls(
                version=int(data["version"]),
                channel_order=order,
                percentiles=tuple(float(p) for p in data["percentiles"]),
                standard_scale=(float(data["standard_scale"][0]), float(data["standard_scale"][1])),
                landmarks={str(k): tuple(float(v) for v in vals) for k, vals in data["landmarks"].items()},
                mean={str(k): float(v) for k, v in data["mean"].items()},
                std={str(k): float(v) for k, v in data["std"].items()},
                n4_sequences=tuple(str(s) for s in data["n4_sequences"]),
                n4_shrink_factor=int(data["n4_shrink_factor"]),
                n4_iterations=tuple(int(i) for i in data["n4_iterations"]),
                n4_convergence_threshold=float(data["n4_convergence_threshold"]),
                n_cases=int(data["n_cases"]),
                case_ids=tuple(str(c) for c in data.get("case_ids", ())),
            )
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise InputError(f"malformed normaliser state ({type(exc).__name__}: {exc})", source) from None
        for name in order:
            if name not in state.landmarks or name not in state.mean or name not in state.std:
                raise InputError(f"normaliser state has no statistics for sequence '{name}'", source)
            if len(state.landmarks[name]) != len(state.percentiles):
                raise InputError(f"normaliser state: sequence '{name}' has {len(state.landmarks[name])} "
                                 f"landmarks for {len(state.percentiles)} percentiles", source)
            # z = (x - mean) / std: a zero or non-finite std makes every brain voxel inf or NaN
            if not (math.isfinite(state.std[name]) and state.std[name] > 0 and math.isfinite(state.mean[name])):
                raise InputError(f"normaliser state: sequence '{name}' has z-score mean {state.mean[name]} and "
                                 f"std {state.std[name]}; expected a finite mean and a finite std > 0", source)
            landmarks = state.landmarks[name]
            if not all(math.isfinite(v) for v in landmarks) or any(b <= a for a, b in zip(landmarks, landmarks[1:])):
                raise InputError(f"normaliser state: sequence '{name}' has Nyul landmarks {list(landmarks)}; "
                                 "expected finite, strictly increasing values", source)
        return state


def save_normaliser(state: NormaliserState, path: str | Path) -> Path:
    """Write ``state`` as JSON (atomically) and return the path."""
    from brats_cnn.fsutil import write_json_atomic

    return write_json_atomic(path, state.to_dict())


def load_normaliser(path: str | Path) -> NormaliserState:
    """Read a state written by :func:`save_normaliser`; InputError names the file on any problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError("normaliser file not found", path) from None
    except OSError as exc:
        raise InputError(f"cannot read normaliser ({exc.strerror})", path) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"normaliser is not valid JSON ({exc.msg} at line {exc.lineno})", path) from None
    return NormaliserState.from_dict(data, source=path)


# --------------------------------------------------------------------------------------------
# streaming fit
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SequenceMoments:
    """Per-case sufficient statistics of one sequence's data voxels (after N4).

    Piece ``k`` of the Nyul map is the line through landmarks ``k`` and ``k+1``; voxels below the
    second landmark belong to piece 0 and voxels above the second-to-last to the last piece (the
    extrapolated ends). ``sums``/``squares`` are of ``value - landmarks[k]``, which keeps the
    numbers small and the later variance free of cancellation.

    Attributes:
        landmarks: the image's own landmarks, ``(P,)``.
        counts, sums, squares: ``(P - 1,)`` per-piece count, sum and sum of squares.
    """

    landmarks: tuple[float, ...]
    counts: tuple[int, ...]
    sums: tuple[float, ...]
    squares: tuple[float, ...]


@dataclass(frozen=True)
class CaseStatistics:
    """What fitting keeps of one training case: its id and per-sequence moments.

    ``to_dict()`` / ``from_dict()`` round-trip exactly through JSON (the preprocess command keeps
    one per case so that a refit does not have to run N4 again).
    """

    case_id: str
    moments: dict[str, SequenceMoments]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"case_id": self.case_id,
                "moments": {name: {f.name: list(getattr(m, f.name)) for f in dataclasses.fields(m)}
                            for name, m in self.moments.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | Path | None = None) -> "CaseStatistics":
        """Rebuild from :meth:`to_dict` output; InputError on a malformed dict."""
        try:
            moments = {str(name): SequenceMoments(tuple(float(v) for v in m["landmarks"]),
                                                  tuple(int(v) for v in m["counts"]),
                                                  tuple(float(v) for v in m["sums"]),
                                                  tuple(float(v) for v in m["squares"]))
                       for name, m in data["moments"].items()}
            return cls(case_id=str(data["case_id"]), moments=moments)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise InputError(f"malformed case statistics ({type(exc).__name__}: {exc})", source) from None


def sequence_moments(image: np.ndarray, mask: np.ndarray, percentiles: Sequence[float], *,
                     source: str | Path | None = None) -> SequenceMoments:
    """Landmarks and per-piece moments of one ``(X, Y, Z)`` sequence where it has data inside ``mask``."""
    values, coverage = _data_values(image, mask, source)
    values = values.astype(np.float64)
    landmarks = _landmarks_of_values(values, percentiles, source, coverage)
    pieces = np.clip(np.searchsorted(landmarks[1:-1], values, side="right"), 0, len(landmarks) - 2)
    shifted = values - landmarks[pieces]
    n_pieces = len(landmarks) - 1
    counts = np.bincount(pieces, minlength=n_pieces)
    sums = np.bincount(pieces, weights=shifted, minlength=n_pieces)
    squares = np.bincount(pieces, weights=shifted * shifted, minlength=n_pieces)
    return SequenceMoments(tuple(float(v) for v in landmarks), tuple(int(c) for c in counts),
                           tuple(float(s) for s in sums), tuple(float(q) for q in squares))


def _as_preprocess_config(config: Any) -> PreprocessConfig:
    """Accept a full ``Config`` or its ``preprocess`` section."""
    return config.preprocess if hasattr(config, "preprocess") else config


def case_statistics(case: Any, config: Any, channel_order: Sequence[str] = CHANNELS, *,
                    correct: Callable[..., np.ndarray] = correct_bias) -> CaseStatistics:
    """Fitting pass over one case: brain mask, N4, then landmarks and moments per sequence.

    Args:
        case: a :class:`brats_cnn.data.io.Case` (needs ``image``, ``case_id``, ``spacing``, ``source``).
        config: ``PreprocessConfig`` or a full ``Config``.
        correct: the bias correction, called as :func:`correct_bias` is; ``brats-cnn preprocess``
            passes one that reuses a kept N4 result (the arithmetic stays :func:`correct_bias`).
    """
    pre = _as_preprocess_config(config)
    source = getattr(case, "source", None) or case.case_id
    check_case_image(case.image, channel_order, source)
    mask = brain_mask(case.image)
    corrected = correct(case.image, mask, pre.n4, spacing=getattr(case, "spacing", (1.0, 1.0, 1.0)),
                        channel_order=channel_order, source=source)
    return corrected_image_statistics(str(case.case_id), corrected, mask, pre, channel_order, source=source)


def corrected_image_statistics(case_id: str, corrected: np.ndarray, mask: np.ndarray, config: Any,
                               channel_order: Sequence[str] = CHANNELS, *,
                               source: str | Path | None = None) -> CaseStatistics:
    """:class:`CaseStatistics` of an already bias-corrected ``(C, X, Y, Z)`` image and its mask."""
    pre = _as_preprocess_config(config)
    percentiles = nyul_percentiles(pre.nyul)
    check_case_image(corrected, channel_order, source)
    moments = {name: sequence_moments(corrected[c], mask, percentiles, source=f"{source or case_id} ({name})")
               for c, name in enumerate(channel_order)}
    return CaseStatistics(case_id=str(case_id), moments=moments)


def check_case_image(image: np.ndarray, channel_order: Sequence[str], source: Any) -> None:
    """Raise InputError unless ``image`` is ``(len(channel_order), X, Y, Z)``."""
    if np.ndim(image) != 4 or np.shape(image)[0] != len(channel_order):
        raise InputError(f"expected a ({len(channel_order)}, X, Y, Z) image in order {list(channel_order)}, "
                         f"got shape {np.shape(image)}", source)


def state_from_statistics(stats: Iterable[CaseStatistics], config: Any,
                          channel_order: Sequence[str] = CHANNELS) -> NormaliserState:
    """Combine per-case statistics into a :class:`NormaliserState` (no images needed)."""
    pre = _as_preprocess_config(config)
    stats = list(stats)
    if not stats:
        raise InputError("cannot fit the normaliser on zero cases")
    percentiles = nyul_percentiles(pre.nyul)
    landmarks: dict[str, tuple[float, ...]] = {}
    means: dict[str, float] = {}
    stds: dict[str, float] = {}
    for name in channel_order:
        standard = standard_from_landmarks((s.moments[name].landmarks for s in stats), pre.nyul)
        target = np.asarray(standard.landmarks)
        total_n, total_y, total_y2 = 0, 0.0, 0.0
        for s in stats:
            m = s.moments[name]
            own = np.asarray(m.landmarks)
            slope = np.diff(target) / np.diff(own)  # y = target[k] + slope[k] * (x - own[k]) on piece k
            n, s1, s2 = np.asarray(m.counts, float), np.asarray(m.sums), np.asarray(m.squares)
            total_n += int(n.sum())
            total_y += float(np.sum(n * target[:-1] + slope * s1))
            total_y2 += float(np.sum(n * target[:-1] ** 2 + 2 * target[:-1] * slope * s1 + slope ** 2 * s2))
        mean = total_y / total_n
        variance = max(total_y2 / total_n - mean * mean, 0.0)
        if not variance > 0:
            raise InputError(f"sequence '{name}' has zero variance inside the brain over the training cases")
        landmarks[name] = standard.landmarks
        means[name] = float(mean)
        stds[name] = float(math.sqrt(variance))
    return NormaliserState(
        version=NORMALISER_VERSION,
        channel_order=tuple(channel_order),
        percentiles=percentiles,
        standard_scale=(float(pre.nyul.s1), float(pre.nyul.s2)),
        landmarks=landmarks, mean=means, std=stds,
        n4_sequences=tuple(pre.n4.sequences), n4_shrink_factor=int(pre.n4.shrink_factor),
        n4_iterations=tuple(int(i) for i in pre.n4.iterations),
        n4_convergence_threshold=float(pre.n4.convergence_threshold),
        n_cases=len(stats), case_ids=tuple(s.case_id for s in stats))


CaseSource = Union[Any, Callable[[], Any]]


def fit_normaliser(cases: Iterable[CaseSource], config: Any,
                   channel_order: Sequence[str] = CHANNELS) -> NormaliserState:
    """Fit Nyul landmarks and z-score statistics on training cases, streaming.

    Args:
        cases: ``Case`` objects or zero-argument callables returning one (e.g.
            ``functools.partial(io.load_case, ref)``); each is loaded, reduced to
            :class:`CaseStatistics` and released before the next.
        config: ``PreprocessConfig`` or a full ``Config`` (N4 settings, Nyul percentiles/scale).

    Returns:
        :class:`NormaliserState`.
    """
    def stats_iter():
        for item in cases:
            case = item() if callable(item) else item
            yield case_statistics(case, config, channel_order)
    return state_from_statistics(stats_iter(), config, channel_order)


# --------------------------------------------------------------------------------------------
# apply
# --------------------------------------------------------------------------------------------

def standardise_image(image: np.ndarray, mask: np.ndarray, state: NormaliserState,
                      background_value: float = 0.0, *, source: str | Path | None = None) -> np.ndarray:
    """Nyul then z-score for every sequence of a bias-corrected image (pure).

    Args:
        image: ``(C, X, Y, Z)`` in ``state.channel_order``.
        mask: ``(X, Y, Z)`` bool brain mask.

    Returns:
        ``(C, X, Y, Z)`` float32; non-brain voxels, and brain voxels where a sequence has no data,
        are ``background_value`` (see :func:`standardise_sequence`).
    """
    check_case_image(image, state.channel_order, source)
    return np.stack([
        standardise_sequence(image[c], mask, state.nyul_standard(name), state.mean[name], state.std[name],
                             background_value, source=f"{source or 'image'} ({name})")
        for c, name in enumerate(state.channel_order)])


def standardise_sequence(volume: np.ndarray, mask: np.ndarray, standard: NyulStandard, mean: float,
                         std: float, background_value: float = 0.0, *,
                         source: str | Path | None = None) -> np.ndarray:
    """Nyul (:func:`apply_nyul`) then z-score (:func:`zscore`) of one bias-corrected sequence (pure).

    The network sees ``background_value`` wherever the sequence has no data: outside the brain
    and at brain voxels where this sequence is 0 (missing coverage), so a gap in one sequence
    looks like background in that channel while the other channels keep their values.

    Args:
        volume: ``(X, Y, Z)`` intensities of one sequence.
        mask: ``(X, Y, Z)`` bool brain mask.
        standard, mean, std: the fitted Nyul standard and z-score statistics of this sequence.

    Returns:
        ``(X, Y, Z)`` float32.
    """
    nyul = apply_nyul(volume, mask, standard, source=source, data_only=True)
    return zscore(nyul, sequence_data_mask(volume, mask), mean, std, background_value)


def normalise_case(case: Any, state: NormaliserState, config: Any, *,
                   correct: Callable[..., np.ndarray] = correct_bias) -> tuple[np.ndarray, np.ndarray]:
    """N4 -> Nyul -> z-score with a fitted state; never refits.

    N4 settings come from ``state`` (as fitted), the background value from ``config``. The one
    path of the pipeline: ``preprocess`` (hence ``train``) and ``segment`` both call it.

    Args:
        case: a :class:`brats_cnn.data.io.Case` (``image`` ``(4, X, Y, Z)`` raw intensities).
        state: fitted :class:`NormaliserState`.
        config: ``PreprocessConfig`` or a full ``Config``.
        correct: the bias correction, as in :func:`case_statistics`.

    Returns:
        ``(image, mask)``: ``(4, X, Y, Z)`` float32 with non-brain voxels (and brain voxels where
        a sequence has no data) set to ``config.background_value``, and the ``(X, Y, Z)`` bool
        brain mask (any raw sequence non-zero, unchanged by missing coverage).
    """
    pre = _as_preprocess_config(config)
    source = getattr(case, "source", None) or getattr(case, "case_id", None)
    check_case_image(case.image, state.channel_order, source)
    mask = brain_mask(case.image)
    corrected = correct(case.image, mask, state.n4_config(), spacing=getattr(case, "spacing", (1.0, 1.0, 1.0)),
                        channel_order=state.channel_order, source=source)
    return standardise_image(corrected, mask, state, float(pre.background_value), source=source), mask
