"""Post-processing (SPEC stage 9): remove small 3-D connected components of tumour.

Pereira et al. drop every connected tumour component smaller than ``t_vol`` voxels
(10,000 for HGG, 3,000 for LGG, ``config.postprocess.min_component_voxels``). All non-zero labels
count as tumour together, so a component is a connected blob of any mix of tumour labels.
Optionally (``postprocess.keep_largest``, a choice of ours, off in the paper's configs) only the
largest remaining component is kept: BraTS glioma cases have one lesion as a rule, and the
network's false positives lie far from it.

Never empty (``postprocess.never_empty``, on by default, a choice of ours): when every component is
smaller than ``t_vol``, the paper's rule would answer "no tumour" for a case where the network
called tumour (seen on a 38 ml BraTS 2021 tumour the network under-called: 6,465 voxels, all
removed). The largest component is kept instead, and :func:`postprocess_with_report` says so.

Require a core (``postprocess.require_core``, off in the paper's configs, a choice of ours chosen by
cross-validation, docs/results.md): a glioma's edema surrounds a tumour core (necrosis,
non-enhancing or enhancing tumour), so a component the network labelled edema only is dropped,
whatever its size. Out of fold these are the network's large false positives far from the tumour
(FLAIR-bright tissue elsewhere), which ``t_vol`` keeps and ``keep_largest`` removes only together
with true satellite components that do carry core. Never empty applies to it as to ``t_vol``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from brats_cnn.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from brats_cnn.config import PostprocessConfig

CONNECTIVITIES: dict[int, str] = {1: "face (6-neighbour)", 2: "edge (18-neighbour)", 3: "vertex (26-neighbour)"}


def component_sizes(tumour: np.ndarray, connectivity: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Label the connected components of a boolean mask.

    Args:
        tumour: ``(X, Y, Z)`` bool mask.
        connectivity: 1 = face, 2 = edge, 3 = vertex neighbours (``scipy.ndimage`` convention).

    Returns:
        ``(components, sizes)``: ``(X, Y, Z)`` int32 component ids (0 = outside the mask) and the
        voxel count of each id (``sizes[0]`` counts the voxels outside the mask).
    """
    from scipy import ndimage

    if connectivity not in CONNECTIVITIES:
        raise ConfigError(f"postprocess.connectivity must be 1, 2 or 3 ({', '.join(CONNECTIVITIES.values())}), "
                          f"got {connectivity!r}")
    tumour = np.asarray(tumour, dtype=bool)
    structure = ndimage.generate_binary_structure(tumour.ndim, connectivity)
    components, _count = ndimage.label(tumour, structure=structure)
    return components, np.bincount(components.ravel())


def remove_small_components(labels: np.ndarray, min_voxels: int, connectivity: int = 1) -> np.ndarray:
    """Set tumour components with *strictly fewer* than ``min_voxels`` voxels to background.

    A component of exactly ``min_voxels`` voxels is kept (the paper: "smaller than t_vol" removed).
    ``min_voxels <= 1`` removes nothing. The input is not modified.

    Args:
        labels: ``(X, Y, Z)`` integer label values of any convention or class indices; 0 is
            background, every other value is tumour.
        min_voxels: ``t_vol``, the smallest component size that is kept.
        connectivity: 1 = face (6-), 2 = edge (18-), 3 = vertex (26-) connectivity.

    Returns:
        A new array of the same shape and dtype as ``labels``.
    """
    labels = np.asarray(labels)
    components, sizes = component_sizes(labels != 0, connectivity)
    too_small = sizes < min_voxels
    too_small[0] = False  # id 0 is the background, never "removed"
    out = labels.copy()
    out[too_small[components]] = 0
    return out


def keep_largest_component(labels: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """Keep only the largest connected tumour component (all non-zero labels together).

    Ties keep the component with the lowest id (the first in scan order). An all-background input
    is returned as a copy. The input is not modified.

    Args:
        labels: ``(X, Y, Z)`` integer label values or class indices; 0 is background.
        connectivity: 1 = face (6-), 2 = edge (18-), 3 = vertex (26-) connectivity.

    Returns:
        A new array of the same shape and dtype as ``labels``.
    """
    labels = np.asarray(labels)
    components, sizes = component_sizes(labels != 0, connectivity)
    out = labels.copy()
    if sizes.size <= 2:  # background only, or a single component
        return out
    largest = 1 + int(np.argmax(sizes[1:]))
    out[(components != largest) & (components != 0)] = 0
    return out


def kept_components(sizes: np.ndarray, config: "PostprocessConfig",
                    core_voxels: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
    """Which components the configured post-processing keeps, from their sizes and core counts alone.

    Args:
        sizes: voxel count per component id, ``sizes[0]`` the background (:func:`component_sizes`).
        config: ``min_component_voxels``, ``keep_largest``, ``never_empty`` and ``require_core``.
        core_voxels: tumour-core voxel count per component id (needed with ``require_core``).

    Returns:
        ``(keep, rescued)``: bool per id (``keep[0]`` True), and whether ``never_empty`` kept the
        largest component because ``t_vol`` (and ``require_core``) would have removed them all.
    """
    keep = np.asarray(sizes) >= config.min_component_voxels  # the paper's rule: exactly t_vol stays
    if getattr(config, "require_core", False):
        if core_voxels is None or len(core_voxels) != len(keep):
            raise ValueError("postprocess.require_core needs the tumour-core voxel count of every component")
        keep &= np.asarray(core_voxels) > 0
    keep[0] = True  # the background id
    rescued = bool(getattr(config, "never_empty", False) and keep.size > 1 and not keep[1:].any())
    if rescued or (config.keep_largest and keep[1:].any()):
        candidates = np.where(keep | rescued, sizes, -1)
        candidates[0] = -1
        largest = int(np.argmax(candidates))  # ties: the lowest id, the first in scan order
        keep[1:] = False
        keep[largest] = True
    return keep, rescued


def core_of(classes: np.ndarray, convention: str) -> np.ndarray:
    """The tumour-core voxels (the ``core`` region) of ``(X, Y, Z)`` class indices of a label convention."""
    from brats_cnn.data.labels import from_class_indices, region_mask

    return region_mask(from_class_indices(classes, convention), convention, "core")


def postprocess_with_report(labels: np.ndarray, config: "PostprocessConfig", core: np.ndarray | None = None,
                            *, convention: str | None = None) -> tuple[np.ndarray, dict]:
    """:func:`postprocess_labels` and what it removed.

    Args:
        labels, config: as :func:`postprocess_labels`.
        core: ``(X, Y, Z)`` bool tumour-core voxels of ``labels`` (:func:`core_of`); needed with
            ``config.require_core`` unless ``convention`` is given.
        convention: the label convention of ``labels`` (class indices of it); with ``config.require_core``
            and no ``core``, the core is derived from it (:func:`core_of`).

    Returns:
        ``(kept, report)``; ``report`` holds ``removed_voxels``, ``removed_components`` (tumour
        components dropped in whole or in part), ``kept_voxels``, ``never_empty_applied`` (True when
        every component was under ``t_vol`` or without core and the largest was kept instead of
        none) and ``removed_without_core`` (components of at least ``t_vol`` voxels dropped for
        having no core voxel).
    """
    labels = np.asarray(labels)
    components, sizes = component_sizes(labels != 0, config.connectivity)  # one labelling for every step
    core_voxels = None
    if getattr(config, "require_core", False):
        if core is None and convention is not None:
            core = core_of(labels, convention)
        if core is None or np.shape(core) != labels.shape:
            raise ValueError("postprocess.require_core needs the tumour-core mask of the labels (core_of)")
        core_voxels = np.bincount(components[np.asarray(core, dtype=bool)], minlength=sizes.size)
    keep, rescued = kept_components(sizes, config, core_voxels)
    kept = labels.copy()
    kept[~keep[components]] = 0
    coreless = 0
    if core_voxels is not None:
        coreless = int(np.count_nonzero((~keep[1:]) & (sizes[1:] >= config.min_component_voxels) & (core_voxels[1:] == 0)))
    report = {"removed_voxels": int(np.count_nonzero(labels) - np.count_nonzero(kept)),
              "removed_components": int(np.count_nonzero(~keep[1:])), "kept_voxels": int(np.count_nonzero(kept)),
              "never_empty_applied": rescued, "removed_without_core": coreless}
    return kept, report


def postprocess_labels(labels: np.ndarray, config: "PostprocessConfig", core: np.ndarray | None = None,
                       *, convention: str | None = None) -> np.ndarray:
    """The configured post-processing: small-component removal (and, with ``require_core``, of the
    components without a tumour-core voxel), then (optionally) the largest component.

    Never empty where the network called tumour unless ``config.never_empty`` is off (module docstring).

    Args:
        labels: ``(X, Y, Z)`` label values or class indices, 0 = background.
        config: ``min_component_voxels``, ``connectivity``, ``keep_largest``, ``never_empty`` and ``require_core``.
        core: the tumour-core voxels of ``labels`` (:func:`core_of`), with ``require_core`` only.
        convention: instead of ``core``, the label convention to derive it from (class indices of it).
    """
    return postprocess_with_report(labels, config, core, convention=convention)[0]
