"""Synthetic BraTS-like cases for tests and the demo.

A phantom is a skull-stripped "brain" ellipsoid (white matter, grey matter, a ventricle) holding a
tumour made of necrosis, non-enhancing core, an enhancing rim and surrounding edema, imaged in four
sequences with distinct contrasts, a smooth multiplicative bias field, Rician or Gaussian noise and
an optional global intensity scale. Background voxels are exactly 0. Everything is deterministic
by ``seed``; tumour position, size and shape vary with it.
"""

from __future__ import annotations

import csv
import io as _stdio
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from brats_cnn import CHANNELS
from brats_cnn.data.io import Case, header_from_affine, save_case
from brats_cnn.data.labels import convert_labels
from brats_cnn.data.layouts import LAYOUTS, CaseRef
from brats_cnn.errors import InputError
from brats_cnn.fsutil import write_text_atomic

# Tissue classes of the phantom; tumour classes carry their brats2013 label value.
BACKGROUND, NECROSIS, EDEMA, NON_ENHANCING, ENHANCING = 0, 1, 2, 3, 4
WHITE_MATTER, GREY_MATTER, CSF = 10, 11, 12

# Relative intensities (T1, T1c, T2, FLAIR) of each tissue, loosely following real contrasts:
# enhancing tumour is bright on T1c, edema bright on T2/FLAIR, necrosis and CSF dark on T1/FLAIR.
CONTRASTS: dict[int, tuple[float, float, float, float]] = {
    WHITE_MATTER: (0.70, 0.68, 0.40, 0.45),
    GREY_MATTER: (0.55, 0.55, 0.55, 0.55),
    CSF: (0.25, 0.25, 0.95, 0.15),
    EDEMA: (0.50, 0.50, 0.80, 0.85),
    NON_ENHANCING: (0.45, 0.48, 0.70, 0.65),
    ENHANCING: (0.55, 0.95, 0.60, 0.72),
    NECROSIS: (0.30, 0.32, 0.90, 0.38),
}
BASE_INTENSITY = 1000.0  # intensity of a relative contrast of 1.0 at intensity_scale 1
BRAIN_RADIUS = (0.42, 0.42, 0.42)  # brain semi-axes as fractions of the volume's extent
WHITE_MATTER_FRACTION = 0.7  # white-matter ellipsoid relative to the brain
VENTRICLE_RADIUS = (0.10, 0.05, 0.12)  # ventricle semi-axes as fractions of the brain's
TUMOUR_RADIUS_RANGE = (0.25, 0.40)  # outer radius of the enhancing rim / brain radius
EDEMA_FACTOR_RANGE = (1.4, 1.8)  # edema outer radius / tumour radius
NECROSIS_FRACTION = 0.45  # necrosis radius / tumour radius (HGG only)
RIM_FRACTION = {"HGG": 0.72, "LGG": 0.88}  # inner radius of the enhancing rim / tumour radius
RANDOM_SCALE_RANGE = (0.5, 2.0)  # log-uniform per-sequence scale when intensity_scale is None
NATURAL_CONVENTION = {"brats2017": "brats2017", "brats2023": "brats2023", "nnunet": "brats2017",
                      "msd": "msd", "brats2013": "brats2013"}


def phantom_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """A BraTS-like LPS-stored affine (``diag(-sx, -sy, sz)``, origin at the far corner), float64."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[0, 3] = (shape[0] - 1) * spacing[0]
    affine[1, 3] = (shape[1] - 1) * spacing[1]
    return affine


def _grid(shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised coordinates in [-1, 1] along each axis (broadcastable, float32)."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    return np.ix_(*axes)


def bias_field(shape: Sequence[int], seed: int = 0, strength: float = 0.2) -> np.ndarray:
    """Smooth multiplicative field ``exp(strength * f)``, ``f`` a random quadratic in [-1, 1].

    Returns:
        ``(X, Y, Z)`` float32, between ``exp(-strength)`` and ``exp(strength)``; all ones at 0.
    """
    rng = np.random.default_rng([seed, 1])
    x, y, z = _grid(shape)
    terms = [x, y, z, x * y, x * z, y * z, x * x, y * y, z * z]
    coefficients = rng.normal(size=len(terms))
    poly = sum(c * t for c, t in zip(coefficients, terms))
    poly = np.broadcast_to(poly, tuple(shape)).astype(np.float32)
    poly = poly - poly.mean()
    peak = np.abs(poly).max()
    return np.exp(strength * poly / peak if peak > 0 else poly).astype(np.float32)


def _ellipsoid_distance(shape: Sequence[int], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Normalised ellipsoidal distance (1 on the surface) with centre/radii in voxels."""
    axes = [(np.arange(n, dtype=np.float32) - c) / r for n, c, r in zip(shape, centre, radii)]
    x, y, z = np.ix_(*axes)
    return np.sqrt(x * x + y * y + z * z)


def phantom_tissues(shape: Sequence[int], seed: int = 0, grade: str = "HGG") -> np.ndarray:
    """Tissue map ``(X, Y, Z)`` uint8 with the class constants of this module."""
    rng = np.random.default_rng([seed, 0])
    shape = tuple(int(n) for n in shape)
    centre = [(n - 1) / 2 for n in shape]
    brain_radii = [f * n for f, n in zip(BRAIN_RADIUS, shape)]
    tissues = np.zeros(shape, dtype=np.uint8)
    brain = _ellipsoid_distance(shape, centre, brain_radii)
    tissues[brain <= 1] = GREY_MATTER
    tissues[brain <= WHITE_MATTER_FRACTION] = WHITE_MATTER
    ventricle = _ellipsoid_distance(shape, centre, [f * r for f, r in zip(VENTRICLE_RADIUS, brain_radii)])
    tissues[ventricle <= 1] = CSF

    size = rng.uniform(*TUMOUR_RADIUS_RANGE)
    radii = np.array([size * r for r in brain_radii]) * rng.uniform(0.8, 1.2, size=3)
    edema_factor = rng.uniform(*EDEMA_FACTOR_RANGE)
    # keep the tumour core inside the brain: centre within (1 - size) of the brain radius, off-centre
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    offset = direction * rng.uniform(0.25, 0.9) * (1 - 1.2 * size) * np.array(brain_radii)
    tumour = _ellipsoid_distance(shape, np.array(centre) + offset, radii)
    inside = tissues > 0
    tissues[inside & (tumour < edema_factor)] = EDEMA
    tissues[inside & (tumour < 1)] = ENHANCING
    tissues[inside & (tumour < RIM_FRACTION[grade])] = NON_ENHANCING
    if grade == "HGG":
        tissues[inside & (tumour < NECROSIS_FRACTION)] = NECROSIS
    return tissues


def make_phantom(shape: Sequence[int] = (64, 64, 40), seed: int = 0, *, grade: str = "HGG",
                 label_convention: str = "brats2017", bias_strength: float = 0.2, noise: str = "rician",
                 noise_level: float = 0.03, intensity_scale: float | Sequence[float] | None = 1.0,
                 spacing: Sequence[float] = (1.0, 1.0, 1.0), case_id: str | None = None,
                 no_data: Mapping[str, float] | None = None) -> Case:
    """A synthetic case.

    Args:
        shape: ``(X, Y, Z)`` voxels; Z is the axial axis.
        seed: everything (geometry, bias field, noise, random scale) is deterministic by it.
        grade: ``"HGG"`` (necrosis and a thick enhancing rim) or ``"LGG"`` (no necrosis, thin rim).
        label_convention: convention of ``case.label`` (made in brats2013 and converted).
        bias_strength: log-amplitude of the multiplicative bias field (0 = none); see :func:`bias_field`.
        noise: ``"rician"``, ``"gaussian"`` or ``"none"``.
        noise_level: noise standard deviation relative to ``BASE_INTENSITY`` (times the scale).
        intensity_scale: global multiplier, one per case or one per sequence; None draws a
            log-uniform scale per sequence from ``RANDOM_SCALE_RANGE`` (to exercise Nyul).
        spacing: voxel size in mm.
        no_data: sequence name -> fraction of the brain where that sequence is 0 (missing
            coverage, as in some real BraTS cases): the ``round(fraction * brain voxels)`` brain
            voxels with the lowest Y index. The other sequences keep the brain mask whole.

    Returns:
        :class:`~brats_cnn.data.io.Case` with ``image`` ``(4, X, Y, Z)`` float32 (background exactly 0,
        brain voxels > 0) and ``label`` ``(X, Y, Z)`` int16.
    """
    grade = grade.upper()
    if grade not in RIM_FRACTION:
        raise InputError(f"unknown grade '{grade}' (expected HGG or LGG)")
    if noise not in ("rician", "gaussian", "none"):
        raise InputError(f"unknown noise model '{noise}' (expected rician, gaussian or none)")
    shape = tuple(int(n) for n in shape)
    tissues = phantom_tissues(shape, seed, grade)
    brain = tissues > 0
    rng = np.random.default_rng([seed, 2])
    if intensity_scale is None:
        low, high = np.log(RANDOM_SCALE_RANGE)
        scales = np.exp(rng.uniform(low, high, size=len(CHANNELS)))
    else:
        scales = np.broadcast_to(np.asarray(intensity_scale, dtype=np.float64), (len(CHANNELS),))
    field = bias_field(shape, seed, bias_strength)
    image = np.zeros((len(CHANNELS),) + shape, dtype=np.float32)
    for index in range(len(CHANNELS)):
        table = np.zeros(max(CONTRASTS) + 1, dtype=np.float32)
        for tissue, contrast in CONTRASTS.items():
            table[tissue] = contrast[index]
        clean = table[tissues] * field * np.float32(BASE_INTENSITY)
        sigma = np.float32(noise_level * BASE_INTENSITY)
        if noise == "rician":
            channel = np.hypot(clean + sigma * rng.standard_normal(shape, dtype=np.float32),
                               sigma * rng.standard_normal(shape, dtype=np.float32))
        elif noise == "gaussian":
            channel = clean + sigma * rng.standard_normal(shape, dtype=np.float32)
        else:
            channel = clean
        # brain voxels stay strictly positive so that the brain mask (any sequence non-zero) is exact
        channel = np.maximum(channel, np.float32(1e-3 * BASE_INTENSITY)) * np.float32(scales[index])
        image[index] = np.where(brain, channel, np.float32(0.0))
    for name, fraction in (no_data or {}).items():
        if name not in CHANNELS or not 0.0 <= float(fraction) < 1.0:
            raise InputError(f"no_data: expected a sequence of {list(CHANNELS)} and a fraction in [0, 1), "
                             f"got {name!r}: {fraction!r}")
        image[CHANNELS.index(name)][_lowest_y_voxels(brain, float(fraction))] = 0.0
    labels = np.where(tissues <= ENHANCING, tissues, BACKGROUND).astype(np.int16)
    if label_convention != "brats2013":
        labels = convert_labels(labels, "brats2013", label_convention).astype(np.int16)
    affine = phantom_affine(shape, spacing)
    return Case(case_id or f"phantom_{seed:03d}", image, labels, affine, header_from_affine(affine, shape),
                tuple(float(s) for s in spacing), label_convention, grade, Path(f"<phantom seed={seed}>"))


def _lowest_y_voxels(brain: np.ndarray, fraction: float) -> np.ndarray:
    """``(X, Y, Z)`` bool: the ``round(fraction * brain.sum())`` brain voxels of lowest Y index."""
    flat = np.flatnonzero(brain)
    y = np.unravel_index(flat, brain.shape)[1]
    chosen = flat[np.argsort(y, kind="stable")[:int(round(fraction * flat.size))]]
    out = np.zeros(brain.size, dtype=bool)
    out[chosen] = True
    return out.reshape(brain.shape)


def write_phantom_dataset(root: str | Path, n_cases: int, layout: str = "brats2017", seed: int = 0,
                          shape: Sequence[int] = (64, 64, 40), *, grades: Sequence[str] | None = None,
                          label_convention: str | None = None, grade_folders: bool = False,
                          write_manifest: bool = True,
                          channel_map: Mapping[str, str | int] | Sequence[str] | None = None,
                          **phantom_options) -> list[CaseRef]:
    """Write ``n_cases`` phantoms (seeds ``seed .. seed + n_cases - 1``) in ``layout`` under ``root``.

    Args:
        grades: one per case; default alternates HGG, LGG, HGG, ...
        label_convention: of the written labels; default the layout's own (brats2017 for
            brats2017/nnunet, brats2023, msd, brats2013).
        grade_folders: put case folders in ``root/HGG`` and ``root/LGG`` (brats2017/2023/2013 only).
        write_manifest: write ``root/manifest.csv`` (case_id,grade).
        phantom_options: passed to :func:`make_phantom`.

    Returns:
        The written cases' :class:`~brats_cnn.data.layouts.CaseRef` in case order.
    """
    if layout not in LAYOUTS:
        raise InputError(f"unknown layout '{layout}' (expected one of: {', '.join(LAYOUTS)})", root)
    root = Path(root)
    grades = list(grades) if grades is not None else ["HGG" if i % 2 == 0 else "LGG" for i in range(n_cases)]
    convention = label_convention or NATURAL_CONVENTION[layout]
    refs = []
    for index in range(n_cases):
        case = make_phantom(shape, seed + index, grade=grades[index], label_convention=convention,
                            case_id=f"Phantom_{seed + index:03d}", **phantom_options)
        folder = root / grades[index] if grade_folders else root
        refs.append(save_case(case, folder, layout, channel_map=channel_map))
    if write_manifest:
        buffer = _stdio.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["case_id", "grade"])
        writer.writerows([ref.case_id, grade] for ref, grade in zip(refs, grades))
        write_text_atomic(root / "manifest.csv", buffer.getvalue())
    return refs
