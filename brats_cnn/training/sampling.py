"""Patch sampling (SPEC steps 4-5): class-balanced centres, on-the-fly extraction, rotations.

Arrays follow the preprocessed cache (see docs/architecture.md): a case image is slice-major
``(Z, 4, X, Y)`` (float16/float32, usually a read-only memmap), the brain mask ``(Z, X, Y)`` bool and
the label map ``(Z, X, Y)`` uint8 class indices. A patch is the axial ``P x P`` neighbourhood
``image[z, :, x-P//2 : x+P//2+1, y-P//2 : y+P//2+1]`` of a centre voxel ``(z, x, y)``; its label is
the centre voxel's. Patches are never materialised for the whole training set: a batch is gathered
from the memory-mapped volumes when it is asked for, with one numpy fancy-indexing call per case.

Randomness is explicit: every draw comes from a ``numpy.random.Generator`` seeded from
``(seed, stream, epoch, batch)``, so results do not depend on the number of data-loader workers or
on where a run was interrupted and resumed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from brats_cnn.data.labels import class_voxel_counts
from brats_cnn.errors import ConfigError
from brats_cnn.preprocessing.cache import case_arrays

log = logging.getLogger(__name__)

# Independent random streams derived from the run seed (names, not magic numbers).
CENTRE_STREAM = 1
VALIDATION_STREAM = 2
ORDER_STREAM = 3
AUGMENT_STREAM = 4
INTENSITY_STREAM = 5
PLANE_STREAM = 6
GAMMA_STREAM = 7
RIGHT_ANGLE = 90


def make_rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
    """A generator determined by ``(seed, stream, *keys)`` alone (e.g. keys = epoch, batch)."""
    return np.random.default_rng([int(seed), int(stream), *map(int, keys)])


@dataclass(frozen=True)
class Centres:
    """Patch centres over a list of cases; all arrays ``(N,)``.

    Attributes:
        case: int32 index of the case in the list the centres were drawn from.
        z, x, y: int32 voxel coordinates in the ``(Z, X, Y)`` cache arrays.
        label: uint8 class index of the centre voxel.
    """

    case: np.ndarray
    z: np.ndarray
    x: np.ndarray
    y: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return int(self.case.shape[0])

    def take(self, index: np.ndarray) -> "Centres":
        """The centres at ``index`` (a new object; arrays are copied)."""
        return Centres(self.case[index], self.z[index], self.x[index], self.y[index], self.label[index])

    def class_counts(self, num_classes: int) -> np.ndarray:
        """``(num_classes,)`` int64 number of centres per class."""
        return np.bincount(self.label, minlength=num_classes)


def sample_balanced_centres(cases: Sequence[tuple[np.ndarray, np.ndarray]], total: int, num_classes: int,
                            rng: np.random.Generator) -> Centres:
    """Draw about ``total // num_classes`` centres of every class, uniformly inside the brain masks.

    Each class's quota is spread over the cases in proportion to how many voxels of that class each
    case has (multivariate hypergeometric draw), i.e. voxels of a class are drawn uniformly from the
    whole set, without replacement. A class with fewer voxels than its quota contributes all of them
    (logged); the total is then smaller than asked.

    Args:
        cases: ``(label (Z, X, Y) uint8 class indices, mask (Z, X, Y) bool)`` per case (memmaps fine).
        total: requested number of centres over all classes.
        num_classes: number of classes (class indices ``0..num_classes-1``).
        rng: source of randomness.

    Returns:
        Centres sorted by case then class (shuffle them for training).
    """
    counts = np.stack([class_voxel_counts(label, mask, num_classes) for label, mask in cases]) \
        if cases else np.zeros((0, num_classes), np.int64)
    quota = total // num_classes
    per_case = np.zeros_like(counts)
    for cls in range(num_classes):
        available = int(counts[:, cls].sum())
        wanted = min(quota, available)
        if wanted < quota:
            log.info("class %d has only %d brain voxels in %d cases; taking all of them (quota %d)",
                     cls, available, len(cases), quota)
        if wanted:
            per_case[:, cls] = rng.multivariate_hypergeometric(counts[:, cls], wanted)
    parts: list[tuple[np.ndarray, ...]] = []
    for index, (label, mask) in enumerate(cases):
        if not per_case[index].any():
            continue
        label = np.asarray(label)
        inside = np.asarray(mask)
        for cls in np.flatnonzero(per_case[index]):
            voxels = np.flatnonzero((label == cls) & inside)
            chosen = np.sort(rng.choice(voxels, size=int(per_case[index, cls]), replace=False))
            z, x, y = np.unravel_index(chosen, label.shape)
            parts.append((np.full(chosen.size, index), z, x, y, np.full(chosen.size, cls)))
    if not parts:
        empty = np.zeros(0, np.int32)
        return Centres(empty, empty, empty, empty, np.zeros(0, np.uint8))
    case, z, x, y, cls = (np.concatenate(column) for column in zip(*parts))
    return Centres(case.astype(np.int32), z.astype(np.int32), x.astype(np.int32), y.astype(np.int32),
                   cls.astype(np.uint8))


def sample_natural_centres(cases: Sequence[tuple[np.ndarray, np.ndarray]], total: int, num_classes: int,
                           rng: np.random.Generator) -> Centres:
    """Draw ``total`` centres uniformly from all brain voxels of all cases, without replacement: every
    class at its natural frequency (the second training phase of Havaei et al. 2017, which retrains the
    output layer on the label distribution the network meets when it segments).

    Args and Returns as :func:`sample_balanced_centres` (``num_classes`` is not used: the labels
    come as they are); fewer than ``total`` only if the brains have fewer voxels.
    """
    del num_classes
    voxels = np.array([int(np.count_nonzero(mask)) for _, mask in cases], dtype=np.int64)
    wanted = min(total, int(voxels.sum()))
    if wanted < total:
        log.info("only %d brain voxels in %d cases; taking all of them (asked %d)", wanted, len(cases), total)
    per_case = rng.multivariate_hypergeometric(voxels, wanted) if wanted else np.zeros_like(voxels)
    parts: list[tuple[np.ndarray, ...]] = []
    for index, (label, mask) in enumerate(cases):
        if not per_case[index]:
            continue
        inside = np.flatnonzero(np.asarray(mask))
        chosen = np.sort(rng.choice(inside, size=int(per_case[index]), replace=False))
        z, x, y = np.unravel_index(chosen, mask.shape)
        parts.append((np.full(chosen.size, index), z, x, y, np.asarray(label).reshape(-1)[chosen]))
    if not parts:
        empty = np.zeros(0, np.int32)
        return Centres(empty, empty, empty, empty, np.zeros(0, np.uint8))
    case, z, x, y, cls = (np.concatenate(column) for column in zip(*parts))
    return Centres(case.astype(np.int32), z.astype(np.int32), x.astype(np.int32), y.astype(np.int32),
                   cls.astype(np.uint8))


CENTRE_SAMPLERS = {"balanced": sample_balanced_centres, "natural": sample_natural_centres}  # sampling.centres


def extract_patches(image: np.ndarray, z: np.ndarray, x: np.ndarray, y: np.ndarray, patch_size: int,
                    background: float) -> np.ndarray:
    """Gather axial patches around centres of one case.

    Args:
        image: ``(Z, C, X, Y)`` float16/float32 volume (a memmap is read only where needed).
        z, x, y: ``(N,)`` integer centre coordinates.
        patch_size: odd patch side ``P``.
        background: value of positions outside the volume (only border centres need it).

    Returns:
        ``(N, C, P, P)`` float32 patches; ``out[n, :, P//2, P//2] == image[z[n], :, x[n], y[n]]``.
    """
    half = patch_size // 2
    _, channels, size_x, size_y = image.shape
    z, x, y = (np.asarray(a, dtype=np.intp) for a in (z, x, y))
    out = np.empty((z.shape[0], channels, patch_size, patch_size), np.float32)
    inside = (x >= half) & (x < size_x - half) & (y >= half) & (y < size_y - half)
    if inside.any():
        # (Z, C, X-P+1, Y-P+1, P, P) view, no copy; one fancy index gathers the whole batch
        windows = np.lib.stride_tricks.sliding_window_view(image, (patch_size, patch_size), axis=(2, 3))
        out[inside] = windows[z[inside], :, x[inside] - half, y[inside] - half]
    if not inside.all():
        border = ~inside
        offsets = np.arange(-half, half + 1)
        xs = x[border, None] + offsets  # (n, P)
        ys = y[border, None] + offsets
        valid = ((xs >= 0) & (xs < size_x))[:, :, None] & ((ys >= 0) & (ys < size_y))[:, None, :]
        gathered = image[z[border, None, None], :, np.clip(xs, 0, size_x - 1)[:, :, None],
                         np.clip(ys, 0, size_y - 1)[:, None, :]]  # (n, P, P, C)
        gathered = np.moveaxis(gathered, -1, 1)
        out[border] = np.where(valid[:, None], gathered, np.float32(background))
    return out


# The two (Z, X, Y) cache axes a patch of each slice plane runs along (its rows, then its columns),
# in the order segment's views put them (predict.VIEW_AXES): axial (X, Y), coronal (X, Z), sagittal (Y, Z).
PLANE_AXES: dict[str, tuple[int, int]] = {"axial": (1, 2), "coronal": (1, 0), "sagittal": (2, 0)}


def extract_plane_patches(image: np.ndarray, z: np.ndarray, x: np.ndarray, y: np.ndarray, patch_size: int,
                          background: float, plane: str) -> np.ndarray:
    """Gather patches of one slice plane around centres of one case (:data:`PLANE_AXES`).

    Axial patches are :func:`extract_patches`; a coronal patch is ``image[z-P//2 : z+P//2+1, :,
    x-P//2 : x+P//2+1, y]`` with rows along X and columns along Z, a sagittal one rows along Y and
    columns along Z. Arguments and output as :func:`extract_patches`; positions outside the volume
    get ``background``.
    """
    if plane == "axial":
        return extract_patches(image, z, x, y, patch_size, background)
    if plane not in PLANE_AXES:
        raise ConfigError(f"sampling.planes must name planes from {', '.join(PLANE_AXES)}, got '{plane}'")
    rows, columns = PLANE_AXES[plane]
    half = patch_size // 2
    sizes = (image.shape[0], image.shape[2], image.shape[3])
    out = np.full((len(z), image.shape[1], patch_size, patch_size), background, np.float32)
    # one basic slice per patch (the part inside the volume): a gather of (N, P, P) coordinates costs
    # 10-20x more for the wide patches of a context pathway (99 x 99), and a loop over patches is not
    # one over voxels
    for n, centre in enumerate(zip(*(np.asarray(a, dtype=np.intp) for a in (z, x, y)))):
        index, target = [], {}
        for axis, at in enumerate(centre):
            if axis in (rows, columns):
                low, high = max(at - half, 0), min(at + half + 1, sizes[axis])
                index.append(slice(low, high))
                target[axis] = slice(low - (at - half), high - (at - half))
            else:
                index.append(int(at))
        # Z is always a column axis here, so the block is (Z, C, rows) and its transpose (C, rows, Z)
        block = image[index[0], :, index[1], index[2]]
        out[n, :, target[rows], target[columns]] = np.transpose(block, (1, 2, 0))
    return out


def quarter_turns(angles: Sequence[int]) -> np.ndarray:
    """Rotation angles in degrees (multiples of 90) -> quarter turns ``(K,)`` int64 in 0..3."""
    angles = np.asarray(angles, dtype=np.int64)
    if angles.size == 0 or np.any(angles % RIGHT_ANGLE):
        raise ConfigError(f"sampling.rotation_angles must be non-empty multiples of 90, got {angles.tolist()}")
    return (angles // RIGHT_ANGLE) % 4


def rotate_patches_90(patches: np.ndarray, turns: np.ndarray) -> np.ndarray:
    """Rotate each patch by ``turns[n]`` quarter turns in its axial plane (all channels together).

    Args:
        patches: ``(N, C, P, P)`` array.
        turns: ``(N,)`` int quarter turns (counter-clockwise from the X axis towards Y, as
            ``np.rot90``/``torch.rot90`` with axes/dims ``(2, 3)``).

    Returns:
        A new ``(N, C, P, P)`` array; the centre voxel (hence the label) is unchanged.
    """
    out = np.array(patches, copy=True)
    turns = np.asarray(turns) % 4
    for k in (1, 2, 3):
        selected = turns == k
        if selected.any():
            out[selected] = np.rot90(patches[selected], k, axes=(2, 3))
    return out


def jitter_intensity(patches: np.ndarray, factors: np.ndarray, offsets: np.ndarray, background: float) -> np.ndarray:
    """Per-patch, per-sequence affine intensity change ``x * factor + offset`` of the brain voxels.

    Mimics what intensity standardisation leaves between scanners and sites (the role of MONAI's
    ``RandScaleIntensity`` + ``RandShiftIntensity`` or nnU-Net's brightness augmentation), drawn
    independently for every patch and sequence. Voxels equal to ``background`` (outside the brain,
    or a sequence without data) keep it, so the network still sees where the brain ends.

    Args:
        patches: ``(N, C, H, W)`` float32 z-scored intensities.
        factors, offsets: ``(N, C)`` multiplicative factors and additive offsets (brain std units).
        background: the cache's ``preprocess.background_value``.

    Returns:
        A new ``(N, C, H, W)`` float32 array.
    """
    changed = patches * factors[:, :, None, None] + offsets[:, :, None, None]
    return np.where(patches == background, patches, changed).astype(np.float32, copy=False)


def gamma_intensity(patches: np.ndarray, gammas: np.ndarray, background: float) -> np.ndarray:
    """Per-patch, per-sequence gamma curve of the brain voxels, with their mean and spread kept.

    nnU-Net's gamma augmentation (``GammaTransform`` with ``retain_stats``; TorchIO's ``RandomGamma``
    draws the exponent the same way, log-uniformly): the brain voxels of patch ``n``, sequence ``c``
    are mapped to ``[0, 1]`` by their own minimum and range, raised to ``gammas[n, c]``, mapped back,
    then shifted and scaled to the mean and standard deviation they had. The curve is monotone, so
    the order of intensities inside a patch is kept while their contrast is bent: an exponent below 1
    spreads the dark end (faint lesions against normal tissue), one above 1 the bright end. Voxels
    equal to ``background`` keep it; a patch-sequence with fewer than two brain values is returned
    unchanged.

    Args:
        patches: ``(N, C, H, W)`` float32 z-scored intensities.
        gammas: ``(N, C)`` positive exponents (1 = unchanged).
        background: the cache's ``preprocess.background_value``.

    Returns:
        A new ``(N, C, H, W)`` float32 array.
    """
    x = np.asarray(patches, np.float32)
    brain = x != background
    weight = brain.astype(np.float32)
    count = weight.sum(axis=(2, 3), keepdims=True)
    low = np.where(brain, x, np.inf).min(axis=(2, 3), keepdims=True)
    spread = np.where(brain, x, -np.inf).max(axis=(2, 3), keepdims=True) - low
    usable = (count > 1) & (spread > 0)
    low, spread = np.where(usable, low, 0.0).astype(np.float32), np.where(usable, spread, 1.0).astype(np.float32)
    bent = np.clip((x - low) / spread, 0.0, 1.0)
    with np.errstate(divide="ignore"):  # log 0 = -inf, and exp(-inf * gamma) = 0: numpy's power is slow at 0
        np.log(bent, out=bent)
    bent *= np.asarray(gammas, np.float32)[:, :, None, None]
    np.exp(bent, out=bent)
    bent *= spread
    bent += low
    total = np.maximum(count, 1.0)

    def mean_std(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean = (values * weight).sum(axis=(2, 3), keepdims=True) / total
        spread_sq = (np.square(values - mean) * weight).sum(axis=(2, 3), keepdims=True) / total
        return mean, np.sqrt(spread_sq)

    (mean, std), (mean_bent, std_bent) = mean_std(x), mean_std(bent)
    bent -= mean_bent
    bent *= std / np.where(std_bent > 0, std_bent, 1.0)
    bent += mean
    return np.where(brain & usable, bent, x).astype(np.float32, copy=False)


def rotation_support(patch_size: int) -> int:
    """Side of the patch to extract so that any rotation of it still covers ``patch_size``."""
    half = patch_size // 2
    return 2 * math.ceil(half * math.sqrt(2)) + 1


def rotate_patches(patches: np.ndarray, angles: np.ndarray, patch_size: int, background: float) -> np.ndarray:
    """Rotate each patch by an arbitrary angle (bilinear) and crop the central ``patch_size`` square.

    Args:
        patches: ``(N, C, L, L)`` float32 with ``L >= rotation_support(patch_size)``, so that the crop
            never samples outside the extracted patch.
        angles: ``(N,)`` angles in radians.
        patch_size: side ``P`` of the returned patches.
        background: fill value for any sample that falls outside (only when ``L`` is too small).

    Returns:
        ``(N, C, P, P)`` float32; the centre voxel is unchanged.
    """
    import torch.nn.functional as F

    source = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32)) - background
    theta = torch.from_numpy(np.asarray(angles, dtype=np.float32))
    cos, sin = torch.cos(theta), torch.sin(theta)
    zeros = torch.zeros_like(cos)
    affine = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
    grid = F.affine_grid(affine, list(source.shape), align_corners=True)
    rotated = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    side = patches.shape[-1]
    start = (side - patch_size) // 2
    crop = rotated[:, :, start:start + patch_size, start:start + patch_size] + background
    return crop.numpy().copy()


class PatchBatches(Dataset):
    """Map-style ``torch.utils.data`` dataset whose item ``i`` is a whole batch.

    The centres are shuffled once per epoch (generator ``(seed, ORDER_STREAM, epoch)``) and cut into
    global batches of ``batch_size``; with ``world_size`` processes, rank ``r`` gets the ``r``-th
    equal slice of every global batch (so the union over ranks is the single-process batch) and the
    last incomplete batch is dropped. Augmentation draws come from ``(seed, AUGMENT_STREAM, epoch,
    batch)`` for the whole global batch, so they do not depend on workers or world size.

    Item: ``(patches (B, C, P, P) float32 tensor, labels (B,) int64 tensor)``.
    Use with ``DataLoader(dataset, batch_size=None, ...)``.

    Args:
        cases: per case either a cache folder (opened lazily in each worker, so memory maps are never
            pickled) or an object with ``image (Z, C, X, Y)``.
        centres: centres indexing into ``cases``.
        rotation_angles: degrees, multiples of 90; each patch gets one uniformly at random.
        arbitrary_rotation: rotate by a uniform angle in [0, 2 pi) instead (bilinear).
        planes: slice planes (:data:`PLANE_AXES`); each patch is taken from one of them, drawn uniformly
            from ``(seed, PLANE_STREAM, epoch, batch)`` (only when there are several), then rotated
            in its own plane. ``("axial",)`` is the paper's sampling.
        intensity_scale, intensity_shift: each patch's sequence ``c`` is multiplied by a factor drawn
            uniformly from ``[1 - scale, 1 + scale]`` and shifted by one from ``[-shift, shift]``
            (:func:`jitter_intensity`, draws from ``(seed, INTENSITY_STREAM, epoch, batch)``); 0 and
            0 (the default) draw nothing.
        gamma: each patch's sequence gets the gamma curve ``exp(U[-gamma, gamma])`` after that
            (:func:`gamma_intensity`, draws from ``(seed, GAMMA_STREAM, epoch, batch)``); 0 (the
            default) draws nothing, so turning it on changes no other draw.
        shuffle: permute the centres per epoch (False for validation).
    """

    def __init__(self, cases: Sequence[Any], centres: Centres, *, batch_size: int, patch_size: int,
                 background: float, rotation_angles: Sequence[int] = (0,), arbitrary_rotation: bool = False,
                 intensity_scale: float = 0.0, intensity_shift: float = 0.0, gamma: float = 0.0,
                 planes: Sequence[str] = ("axial",), seed: int = 0, epoch: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ConfigError(f"train.batch_size {batch_size} must be divisible by the {world_size} processes")
        self.cases = list(cases)
        self.centres = centres
        self.batch_size = batch_size
        self.local_batch = batch_size // world_size
        self.patch_size = patch_size
        self.background = float(background)
        self.turns = quarter_turns(rotation_angles)
        self.arbitrary_rotation = arbitrary_rotation
        self.intensity_scale, self.intensity_shift = float(intensity_scale), float(intensity_shift)
        self.gamma = float(gamma)
        self.planes = tuple(planes)
        if not self.planes or any(plane not in PLANE_AXES for plane in self.planes):
            raise ConfigError(f"sampling.planes must name planes from {', '.join(PLANE_AXES)}, got {list(self.planes)}")
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.order = (make_rng(seed, ORDER_STREAM, epoch).permutation(len(centres)) if shuffle
                      else np.arange(len(centres)))
        full, rest = divmod(len(centres), batch_size)
        self.num_batches = full + (1 if rest and world_size == 1 else 0)
        self._opened: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.num_batches

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_opened"] = {}  # workers reopen the memmaps instead of receiving copies
        return state

    def _case(self, index: int) -> Any:
        if index not in self._opened:
            self._opened[index] = case_arrays(self.cases[index])
        return self._opened[index]

    def _image(self, index: int) -> np.ndarray:
        return self._case(index).image

    def _global_batch(self, batch: int) -> tuple[np.ndarray, slice]:
        """Centre indices of a whole (global) batch, and the slice of them that is this rank's."""
        if not 0 <= batch < self.num_batches:
            raise IndexError(batch)
        start = batch * self.batch_size
        local = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
        return self.order[start:start + self.batch_size], local

    def _members(self, batch: int) -> tuple[Centres, np.ndarray]:
        """This rank's centres of a batch and their augmentation draws (quarter turns or radians)."""
        members, local = self._global_batch(batch)
        rng = make_rng(self.seed, AUGMENT_STREAM, self.epoch, batch)
        if self.arbitrary_rotation:
            draws = rng.uniform(0.0, 2 * math.pi, size=members.size)
        else:
            draws = self.turns[rng.integers(0, self.turns.size, size=members.size)]
        return self.centres.take(members[local]), draws[local]

    def _jitter(self, batch: int, patches: np.ndarray) -> np.ndarray:
        """:func:`jitter_intensity`, then :func:`gamma_intensity`, of this rank's part of a batch
        (each drawn for the global batch from its own stream)."""
        if not len(patches) or not (self.intensity_scale or self.intensity_shift or self.gamma):
            return patches
        members, local = self._global_batch(batch)
        if self.intensity_scale or self.intensity_shift:
            patches = self._affine(batch, patches, members.size, local)
        if self.gamma:
            log_gammas = make_rng(self.seed, GAMMA_STREAM, self.epoch, batch).uniform(
                -self.gamma, self.gamma, size=(members.size, patches.shape[1]))
            patches = gamma_intensity(patches, np.exp(log_gammas[local]), self.background)
        return patches

    def _affine(self, batch: int, patches: np.ndarray, size: int, local: slice) -> np.ndarray:
        """:func:`jitter_intensity` of this rank's part of a batch of ``size`` patches in all."""
        rng = make_rng(self.seed, INTENSITY_STREAM, self.epoch, batch)
        shape = (size, patches.shape[1])
        factors = rng.uniform(1.0 - self.intensity_scale, 1.0 + self.intensity_scale, size=shape)
        offsets = rng.uniform(-self.intensity_shift, self.intensity_shift, size=shape)
        return jitter_intensity(patches, factors[local].astype(np.float32), offsets[local].astype(np.float32),
                                self.background)

    def _plane_draws(self, batch: int) -> np.ndarray:
        """Index into ``planes`` of each patch of this rank's part of a batch (drawn for the global batch)."""
        members, local = self._global_batch(batch)
        if len(self.planes) == 1:
            return np.zeros(members[local].size, np.intp)
        return make_rng(self.seed, PLANE_STREAM, self.epoch, batch).integers(0, len(self.planes), members.size)[local]

    def batch_arrays(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(patches (B, C, P, P) float32, labels (B,) int64)`` of this rank's part of a batch."""
        centres, draws = self._members(batch)
        planes = self._plane_draws(batch)
        side = rotation_support(self.patch_size) if self.arbitrary_rotation else self.patch_size
        patches = np.empty((len(centres), self._image(int(centres.case[0])).shape[1], side, side), np.float32) \
            if len(centres) else np.zeros((0, 0, side, side), np.float32)
        for case in np.unique(centres.case):
            for index, plane in enumerate(self.planes):
                selected = (centres.case == case) & (planes == index)
                if selected.any():
                    patches[selected] = extract_plane_patches(self._image(int(case)), centres.z[selected],
                                                              centres.x[selected], centres.y[selected], side,
                                                              self.background, plane)
        patches = self._jitter(batch, patches)
        if self.arbitrary_rotation:
            patches = rotate_patches(patches, draws, self.patch_size, self.background)
        elif self.turns.max() > 0:
            patches = rotate_patches_90(patches, draws)
        return patches, centres.label.astype(np.int64)

    def __getitem__(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        patches, labels = self.batch_arrays(batch)
        return torch.from_numpy(patches), torch.from_numpy(labels)


class SlabBatches(PatchBatches):
    """Batches of axial crops for dense training (``train.mode: dense``); item ``i`` is a whole batch.

    A crop is centred on a class-balanced centre (as the patches of :class:`PatchBatches`, with the
    same per-epoch order, per-batch augmentation draws and rank slicing) and labels its central
    ``crop_size x crop_size`` voxels; the input adds half a patch on each side, so every labelled
    voxel sees its whole 33x33 neighbourhood. Voxels outside the brain mask or the volume get the
    label :data:`IGNORE_LABEL`. Image and labels are rotated together by the same quarter turns.

    Item: ``(crops (B, C, S + P - 1, S + P - 1) float32, labels (B, S, S) int64)``.
    """

    def __init__(self, cases: Sequence[Any], centres: Centres, *, crop_size: int, **kwargs: Any):
        if crop_size % 2 == 0:
            raise ConfigError(f"dense.crop_size must be odd (crops are centred on a voxel), got {crop_size}")
        if kwargs.get("arbitrary_rotation"):
            raise ConfigError("dense training rotates by multiples of 90 degrees only; "
                              "set sampling.arbitrary_rotation: false")
        if tuple(kwargs.get("planes", ("axial",))) != ("axial",):
            raise ConfigError("dense training takes axial crops only; set sampling.planes: [axial]")
        super().__init__(cases, centres, **kwargs)
        self.crop_size = crop_size

    def batch_arrays(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(crops (B, C, L, L) float32, labels (B, S, S) int64)`` of this rank's part of a batch."""
        centres, turns = self._members(batch)
        side, size = self.crop_size + self.patch_size - 1, self.crop_size
        channels = self._image(int(centres.case[0])).shape[1] if len(centres) else 0
        crops = np.empty((len(centres), channels, side, side), np.float32)
        labels = np.empty((len(centres), size, size), np.int64)
        for case in np.unique(centres.case):
            selected = centres.case == case
            arrays = self._case(int(case))
            at = (centres.z[selected], centres.x[selected], centres.y[selected])
            crops[selected] = extract_patches(arrays.image, *at, side, self.background)
            label = extract_patches(arrays.label[:, None], *at, size, IGNORE_LABEL)[:, 0]
            inside = extract_patches(arrays.mask[:, None], *at, size, 0.0)[:, 0] > 0
            labels[selected] = np.where(inside, label, IGNORE_LABEL).astype(np.int64)
        crops = self._jitter(batch, crops)
        if self.turns.max() > 0:
            crops = rotate_patches_90(crops, turns)
            labels = rotate_patches_90(labels[:, None], turns)[:, 0]
        return crops, np.ascontiguousarray(labels)


IGNORE_LABEL = -100  # the label of unlabelled voxels in dense batches (torch's cross-entropy ignore_index)
