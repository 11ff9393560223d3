"""Stages 1-3 on one case: the brain mask, N4 (:mod:`~brats_cnn.preprocessing.bias`), Nyul
(:mod:`~brats_cnn.preprocessing.nyul`) and z-scoring, fitted into a :class:`NormaliserState` and applied.

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
from brats_cnn.config import N4Config, PreprocessConfig
from brats_cnn.errors import InputError
from brats_cnn.preprocessing.bias import correct_bias
from brats_cnn.preprocessing.nyul import (
    NyulStandard,
    _data_values,
    _landmarks_of_values,
    apply_nyul,
    nyul_percentiles,
    sequence_data_mask,
    standard_from_landmarks,
)

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
