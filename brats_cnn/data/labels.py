"""Label conventions and evaluation regions (see SPEC.md, "Data and labels").

Four conventions are read and written:

=========  =============================================================  =========  =====  =====
name       labels                                                         complete   core   enh.
=========  =============================================================  =========  =====  =====
brats2013  0 bg, 1 necrosis, 2 edema, 3 non-enhancing, 4 enhancing        1,2,3,4    1,3,4  4
brats2017  0, 1 necrotic + non-enhancing core, 2 edema, 4 enhancing       1,2,4      1,4    4
brats2023  0, 1 NETC, 2 SNFH (edema), 3 ET                                1,2,3      1,3    3
msd        0, 1 edema, 2 non-enhancing, 3 enhancing                       1,2,3      2,3    3
=========  =============================================================  =========  =====  =====

The network predicts contiguous class indices ``0..n-1``, index ``i`` standing for
``convention.labels[i]``. Conversion goes through tissue names; brats2013 keeps necrosis and
non-enhancing tumour apart, the others merge them into one "tumour core without enhancement"
label, so converting *to* brats2013 is not defined.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brats_cnn.errors import InputError

REGIONS: tuple[str, ...] = ("complete", "core", "enhancing")
# How ``classify`` turns class probabilities into one class per voxel.
DECISIONS: tuple[str, ...] = ("argmax", "regions")


@dataclass(frozen=True)
class LabelConvention:
    """One label convention.

    Attributes:
        name: ``brats2013``, ``brats2017``, ``brats2023`` or ``msd``.
        labels: label values in the files, background first; class index ``i`` is ``labels[i]``.
        tissues: the tissue each label stands for, same order as ``labels``.
        regions: label values making up the complete, core and enhancing regions.
    """

    name: str
    labels: tuple[int, ...]
    tissues: tuple[str, ...]
    regions: dict[str, tuple[int, ...]]

    @property
    def num_classes(self) -> int:
        return len(self.labels)


CONVENTIONS: dict[str, LabelConvention] = {
    "brats2013": LabelConvention(
        "brats2013", (0, 1, 2, 3, 4),
        ("background", "necrosis", "edema", "non_enhancing", "enhancing"),
        {"complete": (1, 2, 3, 4), "core": (1, 3, 4), "enhancing": (4,)}),
    "brats2017": LabelConvention(
        "brats2017", (0, 1, 2, 4),
        ("background", "core_non_enhancing", "edema", "enhancing"),
        {"complete": (1, 2, 4), "core": (1, 4), "enhancing": (4,)}),
    "brats2023": LabelConvention(
        "brats2023", (0, 1, 2, 3),
        ("background", "core_non_enhancing", "edema", "enhancing"),
        {"complete": (1, 2, 3), "core": (1, 3), "enhancing": (3,)}),
    "msd": LabelConvention(
        "msd", (0, 1, 2, 3),
        ("background", "edema", "core_non_enhancing", "enhancing"),
        {"complete": (1, 2, 3), "core": (2, 3), "enhancing": (3,)}),
}

# brats2013 splits "core_non_enhancing" in two; converting from it merges them.
_MERGED_FROM_2013 = {"necrosis": "core_non_enhancing", "non_enhancing": "core_non_enhancing"}


def get_convention(name: str) -> LabelConvention:
    """Look up a convention by name (case-insensitive)."""
    try:
        return CONVENTIONS[name.lower()]
    except (KeyError, AttributeError):
        raise InputError(f"unknown label convention '{name}' (expected one of: {', '.join(CONVENTIONS)})") \
            from None


def _as_convention(convention: str | LabelConvention) -> LabelConvention:
    return convention if isinstance(convention, LabelConvention) else get_convention(convention)


def validate_labels(labels: np.ndarray, convention: str | LabelConvention,
                    path: str | Path | None = None) -> np.ndarray:
    """Check a label map and return it as ``int16``.

    Raises:
        InputError: non-integer values (e.g. 1.5, NaN) or values outside the convention.
    """
    conv = _as_convention(convention)
    arr = np.asarray(labels)
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        if not np.all(np.isfinite(arr)):
            raise InputError("label map contains NaN or infinite values", path)
        if not np.array_equal(arr, np.round(arr)):
            bad = arr[arr != np.round(arr)].flat[0]
            raise InputError(f"label map has non-integer values (e.g. {bad:g}); expected integer labels "
                             f"{list(conv.labels)} ({conv.name})", path)
    present = np.unique(arr).astype(np.int64)
    unexpected = sorted(set(present.tolist()) - set(conv.labels))
    if unexpected:
        raise InputError(f"label values {unexpected} are not in the {conv.name} convention "
                         f"(expected {list(conv.labels)}); pass the right --label-convention", path)
    return arr.astype(np.int16)


def region_mask(labels: np.ndarray, convention: str | LabelConvention, region: str) -> np.ndarray:
    """Boolean mask of an evaluation region (``complete``, ``core`` or ``enhancing``)."""
    conv = _as_convention(convention)
    if region not in conv.regions:
        raise InputError(f"unknown region '{region}' (expected one of: {', '.join(REGIONS)})")
    return np.isin(labels, conv.regions[region])


def region_masks(labels: np.ndarray, convention: str | LabelConvention) -> dict[str, np.ndarray]:
    """All three region masks of a label map, keyed by region name."""
    return {region: region_mask(labels, convention, region) for region in REGIONS}


def _lookup_table(values: tuple[int, ...], targets: tuple[int, ...]) -> np.ndarray:
    table = np.full(max(values) + 1, -1, dtype=np.int16)  # -1 marks values outside the convention
    table[list(values)] = targets
    return table


def _apply_table(table: np.ndarray, labels: np.ndarray, conv: LabelConvention) -> np.ndarray:
    """``table[labels]``, raising instead of silently mapping (or wrapping) unknown values."""
    values = np.asarray(labels, dtype=np.int64)
    if values.size and (values.min() < 0 or values.max() >= len(table)):
        mapped = np.full(values.shape, -1, dtype=np.int16)
    else:
        mapped = table[values]
    if values.size and mapped.min() < 0:
        unexpected = sorted(set(np.unique(values).tolist()) - set(conv.labels))
        raise InputError(f"label values {unexpected} are not in the {conv.name} convention "
                         f"(expected {list(conv.labels)})")
    return mapped


def to_class_indices(labels: np.ndarray, convention: str | LabelConvention) -> np.ndarray:
    """Label values -> contiguous class indices ``0..n-1`` (``uint8``); unknown values raise InputError."""
    conv = _as_convention(convention)
    table = _lookup_table(conv.labels, tuple(range(conv.num_classes)))
    return _apply_table(table, labels, conv).astype(np.uint8)


def from_class_indices(indices: np.ndarray, convention: str | LabelConvention) -> np.ndarray:
    """Class indices ``0..n-1`` -> label values of the convention (``uint8``)."""
    conv = _as_convention(convention)
    return np.asarray(conv.labels, dtype=np.uint8)[np.asarray(indices, dtype=np.int64)]


def conversion_table(source: str | LabelConvention, target: str | LabelConvention) -> dict[int, int]:
    """Mapping of label values from ``source`` to ``target``.

    Raises:
        InputError: when the conversion is not defined (anything -> brats2013 other than itself,
            because necrosis and non-enhancing tumour cannot be told apart).
    """
    src, dst = _as_convention(source), _as_convention(target)
    mapping = {}
    for value, tissue in zip(src.labels, src.tissues):
        if tissue not in dst.tissues and src.name == "brats2013":
            tissue = _MERGED_FROM_2013.get(tissue, tissue)
        if tissue not in dst.tissues:
            raise InputError(f"cannot convert labels from {src.name} to {dst.name}: "
                             f"'{tissue}' has no single counterpart")
        mapping[value] = dst.labels[dst.tissues.index(tissue)]
    return mapping


def convert_labels(labels: np.ndarray, source: str | LabelConvention,
                   target: str | LabelConvention) -> np.ndarray:
    """Convert a label map between conventions (``uint8``); see :func:`conversion_table`."""
    mapping = conversion_table(source, target)
    table = _lookup_table(tuple(mapping), tuple(mapping.values()))
    return _apply_table(table, labels, _as_convention(source)).astype(np.uint8)


def class_strata(convention: str | LabelConvention) -> np.ndarray:
    """``(num_classes,)`` int: 0 outside the complete region, 1 complete minus core, 2 core minus
    enhancing, 3 enhancing (the nested evaluation regions, outermost first)."""
    conv = _as_convention(convention)
    return sum(region_mask(np.asarray(conv.labels), conv, region).astype(np.int64) for region in REGIONS)


def classify(probabilities: np.ndarray, convention: str | LabelConvention, decision: str = "argmax") -> np.ndarray:
    """One class index per voxel from ``(C, ...)`` class probabilities -> ``(...)`` ``uint8``.

    ``argmax`` takes the most probable class. ``regions`` decides the nested evaluation regions
    from the outside in, each by the probability mass of its classes: tumour if
    P(complete) > P(outside), then core if P(core) > P(complete minus core) inside it, then
    enhancing if P(enhancing) > P(core minus enhancing); the class is the most probable one of the
    stratum reached (ties go outward). A voxel whose tumour probability is spread over several
    tumour classes, none beating background alone, is then tumour, as the complete-region Dice
    counts it.
    """
    if decision == "argmax":
        return np.asarray(probabilities).argmax(axis=0).astype(np.uint8)
    if decision != "regions":
        raise InputError(f"unknown decision '{decision}' (expected one of: {', '.join(DECISIONS)})")
    strata = class_strata(convention)
    if strata.shape != (probabilities.shape[0],):
        raise InputError(f"the {_as_convention(convention).name} convention has {strata.size} classes but the "
                         f"probabilities have {probabilities.shape[0]}")
    # inner[s]: probability mass of the classes in stratum s or deeper (inner[0] = 1)
    inner = [probabilities[strata >= s].sum(axis=0) for s in range(4)]
    reached = np.zeros(probabilities.shape[1:], dtype=np.int64)
    for s in (1, 2, 3):  # P(stratum s and deeper) against P(stratum s - 1 alone), among voxels that got to s - 1
        deeper = inner[s] > inner[s - 1] - inner[s]
        reached += (reached == s - 1) & deeper
    in_stratum = strata.reshape((-1,) + (1,) * reached.ndim) == reached[None]
    return np.where(in_stratum, probabilities, -1).argmax(axis=0).astype(np.uint8)


def class_voxel_counts(label: np.ndarray, mask: np.ndarray, num_classes: int) -> np.ndarray:
    """``(num_classes,)`` int64 number of brain-mask voxels of each class in one case."""
    return np.bincount(np.asarray(label)[np.asarray(mask)], minlength=num_classes)[:num_classes]
