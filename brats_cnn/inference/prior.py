"""The class-prior correction of class-balanced posteriors (Bayes' rule), used by ``segment``,
``calibrate`` and training's validation.

The networks are trained on class-balanced patches, so their softmax estimates the posterior under a
uniform class prior; inside a real brain, background and edema are far more frequent than necrosis
or enhancing tumour. Bayes' rule gives the posterior under the true prior ``pi``:
``p(c | x) ~ p_balanced(c | x) * pi_c``. :func:`apply_class_prior` applies ``pi_c ** alpha``: ``alpha``
= 0 leaves the network's output alone, 1 is the full correction. ``pi`` is the training cases' class
frequencies (:func:`class_frequencies`), or (``segment.prior_adapt``) each case's own prior,
estimated from them by EM (:func:`estimate_case_prior`, Saerens et al. 2002). ``calibrate`` chooses
``alpha`` on validation cases.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from brats_cnn.errors import ConfigError, InputError

# EM estimate of a case's own class prior (segment.prior_adapt): at most this many steps, stopped when no
# class share moves by more than the tolerance; a share never drops below the floor (apply_class_prior
# needs every weight > 0, and a class absent from one case must stay possible)
PRIOR_EM_ITERATIONS = 100
PRIOR_EM_TOLERANCE = 1e-5
PRIOR_EM_FLOOR = 1e-6


def class_frequencies(cases: Sequence[tuple[np.ndarray, np.ndarray]], num_classes: int) -> np.ndarray:
    """``(num_classes,)`` float64 share of each class among the brain voxels of all ``cases``.

    Args:
        cases: ``(label, mask)`` pairs: class indices and the bool brain mask of the same shape.
    """
    from brats_cnn.data.labels import class_voxel_counts

    counts = np.zeros(num_classes, dtype=np.int64)
    for label, mask in cases:
        counts += class_voxel_counts(label, mask, num_classes)
    if counts.sum() == 0:
        raise InputError("no brain voxels in the training cases: class frequencies are undefined")
    return counts / counts.sum()


def apply_class_prior(probabilities: np.ndarray, frequencies: Sequence[float], alpha: float) -> np.ndarray:
    """Prior correction of class-balanced posteriors: ``p'(c|x) ~ p(c|x) * frequencies[c] ** alpha``.

    Args:
        probabilities: ``(C, ...)`` float32 probabilities (class axis first), summing to 1 over C.
        frequencies: ``(C,)`` class frequencies (> 0) of the data the correction is for.
        alpha: exponent; 0 returns a copy of the input.

    Returns:
        ``(C, ...)`` float32, renormalised to sum to 1 over the classes; the input is not modified.
    """
    frequencies = np.asarray(frequencies, dtype=np.float64)
    if frequencies.shape != (probabilities.shape[0],):
        raise ConfigError(f"class frequencies have {frequencies.size} entries but the network has "
                          f"{probabilities.shape[0]} classes")
    if not np.all(np.isfinite(frequencies)) or np.any(frequencies <= 0):
        raise ConfigError(f"class frequencies must be finite and > 0, got {frequencies.tolist()}")
    if alpha == 0:
        return probabilities.copy()
    weights = (frequencies ** alpha).astype(np.float32).reshape((-1,) + (1,) * (probabilities.ndim - 1))
    weighted = probabilities * weights
    return weighted / np.maximum(weighted.sum(axis=0, keepdims=True), np.finfo(np.float32).tiny)


def estimate_case_prior(probabilities: np.ndarray, mask: np.ndarray, frequencies: Sequence[float], alpha: float,
                        iterations: int = PRIOR_EM_ITERATIONS, tolerance: float = PRIOR_EM_TOLERANCE) -> np.ndarray:
    """This case's own class prior in the brain, by EM (Saerens, Latinne & Decaestecker, Neural Comput. 2002).

    The training frequencies are the prior of the training cases; a case with more edema than they had
    is under-called with them. Starting from ``frequencies``, each step corrects the posteriors with the
    current prior (``p(c|x) * pi_c ** alpha``, as :func:`apply_class_prior`) and takes their mean over
    the brain voxels as the next prior, until no class share moves by more than ``tolerance``. With
    ``alpha`` = 1 this is Saerens et al.'s maximum-likelihood estimate of a balanced-prior network's new
    prior; a smaller ``alpha`` tempers both the correction and the estimate.

    Args:
        probabilities: ``(C, X, Y, Z)`` class-balanced posteriors of one case.
        mask: ``(X, Y, Z)`` bool brain mask; only these voxels count.
        frequencies: ``(C,)`` training class frequencies (> 0), the starting point.
        alpha: the correction exponent; 0 returns ``frequencies`` unchanged.

    Returns:
        ``(C,)`` float64 prior summing to 1, every entry at least :data:`PRIOR_EM_FLOOR`.
    """
    prior = np.asarray(frequencies, dtype=np.float64)
    if mask.shape != probabilities.shape[1:]:
        raise InputError(f"brain mask of shape {mask.shape} does not match probabilities of shape "
                         f"{probabilities.shape}")
    if alpha == 0 or not mask.any():
        return prior
    brain = probabilities[:, mask].astype(np.float64)  # (C, N): only the brain voxels
    for _ in range(iterations):
        # mean over voxels of p_c w_c / sum_k p_k w_k, as two matrix-vector products (no (C, N) temporaries)
        weights = prior ** alpha
        inverse = 1.0 / np.maximum(weights @ brain, np.finfo(np.float64).tiny)
        updated = np.maximum(weights * (brain @ inverse) / brain.shape[1], PRIOR_EM_FLOOR)
        updated /= updated.sum()
        converged = np.max(np.abs(updated - prior)) < tolerance
        prior = updated
        if converged:
            break
    return prior


def weight_classes(probabilities: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """``p'(c|x) ~ p(c|x) * weights[c]``, renormalised over the classes (``segment.class_weights``: a
    per-class lever the single prior exponent lacks, e.g. more edema). Empty ``weights``: a copy.

    Args:
        probabilities: ``(C, ...)`` float32, summing to 1 over C.
        weights: ``(C,)`` finite values > 0, or empty.
    """
    if len(weights) == 0:
        return probabilities.copy()
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (probabilities.shape[0],) or not np.all(np.isfinite(weights)) or np.any(weights <= 0):
        raise ConfigError(f"segment.class_weights must hold {probabilities.shape[0]} finite values > 0 (one per class), "
                          f"got {weights.tolist()}")
    weighted = probabilities * weights.astype(np.float32).reshape((-1,) + (1,) * (probabilities.ndim - 1))
    return weighted / np.maximum(weighted.sum(axis=0, keepdims=True), np.finfo(np.float32).tiny)


def correct_class_prior(probabilities: np.ndarray, mask: np.ndarray, frequencies: Sequence[float], alpha: float,
                        adapt: bool) -> tuple[np.ndarray, np.ndarray]:
    """The prior correction ``segment`` and ``calibrate`` apply: with the training frequencies, or
    (``adapt``) with the case's own prior estimated from them by :func:`estimate_case_prior`.

    Returns:
        The corrected ``(C, X, Y, Z)`` probabilities and the ``(C,)`` prior used.
    """
    prior = (estimate_case_prior(probabilities, mask, frequencies, alpha) if adapt
             else np.asarray(frequencies, dtype=np.float64))
    return apply_class_prior(probabilities, prior, alpha), prior
