"""Sliding-window inference (SPEC stage 8) in two modes, and the ``segment`` command.

* **exact** (:func:`predict_exact`): every brain voxel is classified from its own 33x33 axial
  patch, exactly as in training; patches that cross the volume border are filled with the
  normalised background value. Patches are gathered in batches from a strided view of the padded
  volume (no copy of all patches, no Python loop per voxel). About 357.5 MFLOP per voxel for
  the HGG network: seconds on a data-centre GPU, hours on a CPU.
* **fast** (:func:`predict_fast`): the same weights run fully convolutionally over whole slices:
  each 3x3 stride-2 max-pool becomes a stride-1 pool and every layer after it is dilated by the
  product of the removed strides (2, then 4), so every voxel gets its own output at full
  resolution; the first FC layer is evaluated at brain voxels only, on the dilated 7x7x128
  neighbourhood of each. This equals exact mode except that the zero "same" padding that the
  convolutions see at the edge of each 33x33 training patch is replaced by the real image around
  it (see docs/segmentation.md for the measured agreement).

Probabilities are ``(C, X, Y, Z)`` float32 in class-index order; voxels outside the brain mask
are background (probability 1 for class 0).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from brats_cnn import progress_wanted
from brats_cnn.device import Compute, compute_settings, resolve_device, torchrun_environment
from brats_cnn.errors import ConfigError, InputError

if TYPE_CHECKING:  # heavy imports stay lazy
    import torch
    from torch import nn

    from brats_cnn.config import Config, PostprocessConfig
    from brats_cnn.io import Case, CaseRef
    from brats_cnn.model import Checkpoint

log = logging.getLogger(__name__)

# Bytes of GPU memory one exact-mode patch may need, as a multiple of its largest activation:
# input + output of the widest layer plus cuDNN workspace (measured headroom; choice).
ACTIVATION_OVERHEAD = 4.0


# ----------------------------------------------------------------------------------------------
# shared helpers


def _check_inputs(image: np.ndarray, mask: np.ndarray) -> None:
    if image.ndim != 4 or mask.shape != image.shape[1:]:
        raise InputError(f"expected image (C, X, Y, Z) and mask (X, Y, Z) of the same grid, "
                         f"got image {image.shape} and mask {mask.shape}")


def background_probabilities(num_classes: int, shape: tuple[int, int, int]) -> np.ndarray:
    """``(num_classes, *shape)`` float32 probabilities that are 1 for class 0 everywhere."""
    probs = np.zeros((num_classes, *shape), dtype=np.float32)
    probs[0] = 1.0
    return probs


def _inference_copy(network: "nn.Module", device: "torch.device") -> "nn.Module":
    """A copy of ``network`` on ``device`` in eval mode (the caller's module is left alone)."""
    return copy.deepcopy(network).to(device).eval()


def _max_activation_elements(network: "nn.Module") -> int:
    """Largest per-patch activation (elements) of the network's feature stack."""
    import torch

    largest = 0
    size = network.patch_size
    channels = 0
    for layer in network.features:
        if isinstance(layer, torch.nn.Conv2d):
            channels = layer.out_channels
        elif isinstance(layer, torch.nn.MaxPool2d):
            size = (size - layer.kernel_size) // layer.stride + 1
        largest = max(largest, channels * size * size)
    return largest


def exact_batch_size(network: "nn.Module", device: "torch.device", requested: int,
                     memory_fraction: float = 0.5) -> int:
    """Patches per forward pass: ``requested``, lowered on CUDA to what fits in free memory.

    Uses ``memory_fraction`` of the free memory reported by ``torch.cuda.mem_get_info`` and
    :data:`ACTIVATION_OVERHEAD` times the largest float32 activation per patch.
    """
    import torch

    if device.type != "cuda":
        return max(1, requested)
    free, _total = torch.cuda.mem_get_info(device)
    per_patch = ACTIVATION_OVERHEAD * 4 * _max_activation_elements(network)
    return max(1, min(requested, int(free * memory_fraction / per_patch)))


def _progress(total: int, desc: str, unit: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enabled, leave=False,
                dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------
# exact mode


def _compute_of(compute: Compute | None, device: "str | torch.device") -> Compute:
    """``compute``, or float32 NCHW on ``device`` (the reference path) when None."""
    import torch

    return compute if compute is not None else Compute(torch.device(device), bf16=False, channels_last=False)


def predict_exact(network: "nn.Module", image: np.ndarray, mask: np.ndarray, *, batch_size: int = 4096,
                  device: "str | torch.device" = "cpu", compute: Compute | None = None,
                  background_value: float = 0.0, memory_fraction: float = 0.5, progress: bool = False) -> np.ndarray:
    """Classify every brain voxel from its own axial patch (the paper's sliding window).

    Args:
        network: a :class:`~brats_cnn.model.PereiraCNN` (any device; a copy is moved to ``device``).
        image: ``(4, X, Y, Z)`` float32 normalised image, channels in ``CHANNELS`` order.
        mask: ``(X, Y, Z)`` bool brain mask; only these voxels are classified.
        batch_size: patches per forward pass (on CUDA lowered to fit ``memory_fraction`` of the
            free memory).
        device: torch device for the network and the padded volume (when ``compute`` is None).
        compute: device, precision and memory format (:func:`brats_cnn.device.compute_settings`);
            None: float32, NCHW on ``device``. bf16 keeps 8 significant bits: probabilities differ
            from float32 by up to ~1e-2 and near-ties may flip (docs/segmentation.md, "Precision").
        background_value: the value of voxels outside the volume in a border patch (the
            normalised background, ``config.preprocess.background_value``).
        progress: show a tqdm bar over voxels (exact mode on a CPU takes hours).

    Returns:
        ``(C, X, Y, Z)`` float32 softmax probabilities; outside ``mask`` class 0 has probability 1.
    """
    import torch

    _check_inputs(image, mask)
    compute = _compute_of(compute, device)
    device = compute.device
    net = compute.network(_inference_copy(network, device))
    size = net.patch_size
    half = size // 2
    probs = background_probabilities(net.num_classes, mask.shape)
    # slice-major voxel order keeps consecutive patches in the same few slices (cache locality)
    zs, xs, ys = np.nonzero(np.moveaxis(np.asarray(mask, dtype=bool), 2, 0))
    count = len(zs)
    if count == 0:
        return probs
    volume = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image.astype(np.float32, copy=False), 3, 0)))
    volume = torch.nn.functional.pad(volume, (half, half, half, half), value=background_value).to(device)
    windows = volume.unfold(2, size, 1).unfold(3, size, 1)  # (Z, 4, X, Y, size, size) view, no copy
    index = [torch.from_numpy(a).to(device) for a in (zs, xs, ys)]
    chunk = exact_batch_size(net, device, batch_size, memory_fraction)
    voxel_probs = np.empty((net.num_classes, count), dtype=np.float32)
    with torch.inference_mode(), _progress(count, "exact", "vox", progress) as bar:
        for start in range(0, count, chunk):
            stop = min(start + chunk, count)
            patches = windows[index[0][start:stop], :, index[1][start:stop], index[2][start:stop]]
            with compute.autocast():
                logits = net(patches.contiguous(memory_format=compute.memory_format))
            voxel_probs[:, start:stop] = torch.softmax(logits.float(), dim=1).T.cpu().numpy()
            bar.update(stop - start)
    probs[:, xs, ys, zs] = voxel_probs
    return probs


# ----------------------------------------------------------------------------------------------
# fast mode








def _slice_groups(mask: np.ndarray, slices_per_batch: int) -> Iterator[tuple[np.ndarray, slice, slice]]:
    """Groups of brain slices with the union of their brain bounding boxes (X and Y slices)."""
    in_plane = mask.any(axis=(0, 1))
    brain_slices = np.flatnonzero(in_plane)
    for start in range(0, len(brain_slices), slices_per_batch):
        group = brain_slices[start:start + slices_per_batch]
        sub = mask[:, :, group]
        xs = np.flatnonzero(sub.any(axis=(1, 2)))
        ys = np.flatnonzero(sub.any(axis=(0, 2)))
        yield group, slice(xs[0], xs[-1] + 1), slice(ys[0], ys[-1] + 1)


def predict_fast(network: "nn.Module", image: np.ndarray, mask: np.ndarray, *, batch_size: int = 4096,
                 device: "str | torch.device" = "cpu", compute: Compute | None = None,
                 background_value: float = 0.0, slices_per_batch: int = 2, progress: bool = False) -> np.ndarray:
    """Fully convolutional approximation of :func:`predict_exact` (same signature and output).

    Per group of ``slices_per_batch`` brain slices, the union brain bounding box plus a margin of
    half a patch (16 voxels, background-padded beyond the volume) runs through the dense feature
    stack, then through the FC layers run as convolutions (:meth:`brats_cnn.dense.FullyConvolutional.convolutional_head`)
    over the box, in strips of whole rows of about ``batch_size`` voxels. Every voxel's output is
    computed in place: no neighbourhood is gathered into a new tensor (the former per-chunk gather
    spent a third of the CPU time in page faults). Box voxels outside the brain are computed and
    dropped (about 40 % more FC work than brain voxels alone, still 2x faster than the gather).

    Args:
        network, image, mask, device, compute, background_value, progress: as :func:`predict_exact`
            (bf16 on a CPU with native bf16 is about 3x faster; agreement with float32 measured in
            docs/segmentation.md).
        batch_size: voxels per pass through the FC layers (bounds the 256-channel activations).
        slices_per_batch: axial slices per pass through the convolutions.

    Returns:
        ``(C, X, Y, Z)`` float32 probabilities; outside ``mask`` class 0 has probability 1.
    """
    import torch

    _check_inputs(image, mask)
    mask = np.asarray(mask, dtype=bool)
    compute = _compute_of(compute, device)
    device = compute.device
    from brats_cnn.dense import to_fully_convolutional

    dense = to_fully_convolutional(network)
    memory_format = compute.memory_format
    features = dense.features.to(device, memory_format=memory_format)
    head = dense.convolutional_head().to(device, memory_format=memory_format)
    half = network.patch_size // 2
    reach = dense.head_reach
    lead = dense.window_lead(half)  # first FC-window start inside the crop
    num_classes = network.num_classes
    # slice-major buffer: each group writes whole (C, X, Y) slabs; one transpose at the end
    by_slice = np.zeros((mask.shape[2], num_classes, *mask.shape[:2]), dtype=np.float32)
    by_slice[:, 0] = 1.0
    volume = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image.astype(np.float32, copy=False), 3, 0)))
    volume = torch.nn.functional.pad(volume, (half, half, half, half), value=background_value)  # (Z, 4, X+2h, Y+2h)
    total = int(mask.sum())
    with torch.inference_mode(), _progress(total, "fast", "vox", progress) as bar:
        for group, xr, yr in _slice_groups(mask, slices_per_batch):
            nx, ny = xr.stop - xr.start, yr.stop - yr.start
            # padded index x + half is voxel x, so the crop [x0, x1 + 2 half) spans the box +- half
            crop = volume[group, :, xr.start:xr.stop + 2 * half, yr.start:yr.stop + 2 * half]
            crop = crop.to(device).contiguous(memory_format=memory_format)
            with compute.autocast():
                fmap = features(crop)[:, :, lead:lead + nx + 2 * reach, lead:lead + ny + 2 * reach]
            inside = np.moveaxis(mask[xr, yr][:, :, group], 2, 0)[:, None]  # (B, 1, nx, ny)
            box = by_slice[group, :, xr, yr]  # (B, C, nx, ny) copy, background outside the brain
            rows = max(1, batch_size // (len(group) * ny))
            for row in range(0, nx, rows):
                stop = min(row + rows, nx)
                # only the columns this strip's brain voxels span: less FC work than the whole box
                columns = np.flatnonzero(inside[:, :, row:stop].any(axis=(0, 1, 2)))
                if not len(columns):
                    continue
                c0, c1 = columns[0], columns[-1] + 1
                with compute.autocast():
                    logits = head(fmap[:, :, row:stop + 2 * reach, c0:c1 + 2 * reach])
                strip = torch.softmax(logits.float(), dim=1).cpu().numpy()
                box[:, :, row:stop, c0:c1] = np.where(inside[:, :, row:stop, c0:c1], strip, box[:, :, row:stop, c0:c1])
            by_slice[group, :, xr, yr] = box
            bar.update(int(inside.sum()))
    return np.ascontiguousarray(np.moveaxis(by_slice, 0, -1))


# ----------------------------------------------------------------------------------------------
# the `segment` command

MODES: tuple[str, ...] = ("auto", "exact", "fast")
WEIGHTS_DIR_NAME = "weights"
DEFAULT_GRADE = "hgg"  # bundled model used when neither --grade nor --model is given
# The bundled checkpoint that serves each grade, and the settings applied to it for that grade (before
# the user's --set). LGG cases get the HGG network: on the sample's LGG cases it beats the paper's
# LGG network trained on the one or two LGG cases the sample can spare on the complete tumour and
# HD95 (docs/results.md, "LGG"); its prior correction is off for them (alpha 0, chosen on the two LGG
# cases outside the test split: complete-tumour Dice 0.82 against 0.72 with the HGG calibration's 0.8
# for v3, chosen again for v8: 0.81 against 0.73).
BUNDLED_MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "hgg": ("hgg.pt", ()),
    "lgg": ("hgg.pt", ("segment.prior_alpha=0",)),
}


@dataclass(frozen=True)
class SegmentResult:
    """What :func:`run_segment` did: written label maps, skipped outputs and failed cases."""

    outputs: list
    skipped: list
    failures: dict


@dataclass(frozen=True)
class _Target:
    """Output files of one case."""

    labels: Path
    probabilities: Path
    sidecar: Path


@dataclass(frozen=True)
class _Member:
    """One checkpoint of ``segment``: a single model, or one member of an ensemble (``--model`` repeated)."""

    path: Path
    checkpoint: Checkpoint
    config: Config  # the checkpoint's config with the grade's settings and --set applied


def bundled_weights(grade: str) -> Path:
    """Path of the bundled checkpoint that serves a grade (:data:`BUNDLED_MODELS`)."""
    from pathlib import Path

    return Path(__file__).parent / WEIGHTS_DIR_NAME / BUNDLED_MODELS[grade.lower()][0]


def _checkpoint_paths(model: str | Path | list | None, grade: str | None) -> tuple[list[Path], tuple[str, ...]]:
    """The checkpoint(s) to load and the grade's settings for them (none unless it is a bundled one)."""
    from pathlib import Path

    from brats_cnn.config import check_grade
    from brats_cnn.errors import CheckpointError

    if grade is not None:
        grade = check_grade(grade)
    models = list(model) if isinstance(model, (list, tuple)) else [] if model is None else [model]
    if models:
        return [Path(m) for m in models], ()  # with --grade as well, run_segment checks each checkpoint's grade
    if grade is None:  # BraTS 2019+ data carries no grade: the documented default (docs/results.md)
        grade = DEFAULT_GRADE
        log.warning("no --grade or --model given: using the bundled %s model (the default for cases of unknown "
                    "grade; see docs/results.md)", grade.upper())
    path = bundled_weights(grade)
    if path.name != f"{grade}.pt":
        log.warning("--grade %s: using the bundled %s model, which scores better on %s cases than the paper's "
                    "%s network trained on the sample (see docs/results.md)", grade, path.stem.upper(),
                    grade.upper(), grade.upper())
    if not path.is_file():
        raise CheckpointError(f"no bundled {grade.upper()} weights in this installation; train a model "
                              f"(brats-cnn train) and pass it with --model", path)
    return [path], BUNDLED_MODELS[grade][1]


def resolve_mode(mode: str, device: "torch.device") -> str:
    """``exact`` or ``fast``; ``auto`` is exact on CUDA and fast elsewhere."""
    from brats_cnn.errors import ConfigError

    if mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got '{mode}'")
    if mode == "auto":
        return "exact" if device.type == "cuda" else "fast"
    return mode


def _find_cases(inputs: list) -> list[CaseRef]:
    """Case references of every input (a case file/folder, or a dataset folder = many cases)."""
    from pathlib import Path

    from brats_cnn.io import find_case, list_cases

    refs = []
    for item in inputs:
        path = Path(item)
        try:
            refs.append(find_case(path))
        except InputError:
            if not path.is_dir():
                raise
            try:
                found = list_cases(path)
            except InputError:
                found = []
            if not found:
                raise
            refs.extend(found)
    return refs


def _targets(refs: list[CaseRef], out: str | Path) -> list[_Target]:
    """Output paths per case: ``--out x.nii.gz`` for one case, else ``<out>/<case_id>.nii.gz``."""
    from pathlib import Path

    from brats_cnn.errors import ConfigError

    out = Path(out)
    as_file = out.name.lower().endswith((".nii.gz", ".nii"))  # x/CASE.NII.GZ is a file too, never a folder
    if as_file and len(refs) != 1:
        raise ConfigError(f"--out names one file but {len(refs)} cases were given; give a folder", out)
    ids = [ref.case_id for ref in refs]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise InputError(f"case id '{duplicated[0]}' appears more than once in the inputs")
    targets = []
    for ref in refs:
        labels = out if as_file else out / f"{ref.case_id}.nii.gz"
        stem = labels.name[:-len(".nii.gz")] if labels.name.lower().endswith(".nii.gz") else labels.stem
        targets.append(_Target(labels, labels.with_name(f"{stem}_probabilities.nii.gz"),
                               labels.with_name(f"{stem}.json")))
    return targets


def _reorder_channels(image: np.ndarray, channel_order: tuple[str, ...]) -> np.ndarray:
    """io's ``CHANNELS`` order -> the checkpoint's channel order."""
    from brats_cnn import CHANNELS

    if tuple(channel_order) == tuple(CHANNELS):
        return image
    missing = [c for c in channel_order if c not in CHANNELS]
    if missing:
        raise InputError(f"the checkpoint expects sequence '{missing[0]}', which this project does not read")
    return image[[CHANNELS.index(c) for c in channel_order]]


def predict(network: "nn.Module", image: np.ndarray, mask: np.ndarray, mode: str, device: "torch.device",
            config: Config, progress: bool = False) -> np.ndarray:
    """Run :func:`predict_exact` or :func:`predict_fast` with the settings of a full ``Config``.

    With ``segment.tta_rotations`` other than ``(0,)`` (test-time augmentation), the image and mask
    are turned in the axial plane by each angle (multiples of 90 degrees, as in training), predicted,
    turned back, and the probabilities averaged. Shapes and dtypes as :func:`predict_exact`.
    """
    rotations = tuple(config.segment.tta_rotations)
    if not rotations or any(angle % 90 for angle in rotations):
        raise ConfigError(f"segment.tta_rotations must be multiples of 90 degrees, got {list(rotations)}")
    common = dict(batch_size=config.segment.batch_size, compute=compute_settings(device, config.compute),
                  background_value=config.preprocess.background_value, progress=progress)
    total = None
    for angle in rotations:
        turns = (angle // 90) % 4
        turned_image = np.ascontiguousarray(np.rot90(image, turns, axes=(1, 2))) if turns else image
        turned_mask = np.ascontiguousarray(np.rot90(mask, turns, axes=(0, 1))) if turns else mask
        if mode == "exact":
            probs = predict_exact(network, turned_image, turned_mask, memory_fraction=config.segment.memory_fraction,
                                  **common)
        else:
            probs = predict_fast(network, turned_image, turned_mask, slices_per_batch=config.segment.slices_per_batch,
                                 **common)
        probs = np.rot90(probs, -turns, axes=(1, 2))
        total = probs if total is None else total + probs  # predict_* return fresh arrays: no copy needed
    if len(rotations) > 1:
        total = total / np.float32(len(rotations))
    return np.ascontiguousarray(total, dtype=np.float32)  # no copy for the plain (untransformed) prediction


def prior_frequencies(checkpoint: Checkpoint, checkpoint_path: str | Path) -> list[float]:
    """The class frequencies of a calibrated checkpoint (needed when ``segment.prior_alpha > 0``)."""
    import math

    frequencies = (checkpoint.calibration or {}).get("class_frequencies")
    if not frequencies:
        raise ConfigError("segment.prior_alpha > 0 needs a calibrated checkpoint (brats-cnn calibrate); this one "
                          "has no class frequencies", checkpoint_path)
    classes = checkpoint.network.num_classes
    try:
        valid = len(frequencies) == classes and all(math.isfinite(float(f)) and float(f) > 0 for f in frequencies)
    except (TypeError, ValueError):
        valid = False
    if not valid:  # checked when the model is loaded, not after the prediction
        raise ConfigError(f"the checkpoint's calibration holds invalid class frequencies {frequencies!r} (need "
                          f"{classes} finite values > 0); recalibrate it (brats-cnn calibrate)", checkpoint_path)
    return [float(f) for f in frequencies]


OUTPUT_DESCRIPTION = "brats-cnn segment"  # NIfTI descrip of every label map/probability map segment writes


def _is_segment_output(path: Path) -> bool:
    """True if ``path`` is a NIfTI file that ``segment`` wrote (its header's descrip), or a sidecar of it."""
    import json

    if path.name.endswith(".json"):
        try:
            return "brats_cnn_version" in json.loads(path.read_text())
        except (OSError, ValueError, TypeError):
            return False
    import nibabel as nib

    try:
        return bytes(nib.load(path).header["descrip"]).rstrip(b"\0").decode(errors="replace") == OUTPUT_DESCRIPTION
    except Exception:  # not a NIfTI file at all
        return False


def _refuse_overwriting(pairs: list, checkpoint_paths: list, save_probabilities: bool, overwrite: bool) -> None:
    """InputError before any work if an output would replace an input, or (without ``--overwrite``) a file
    that ``segment`` did not write."""
    import os

    inputs = [Path(c) for c in checkpoint_paths] + [p for ref, _ in pairs
                                                    for p in (*ref.image_paths, ref.label_path) if p]
    for ref, target in pairs:
        outputs = [target.labels, target.sidecar] + ([target.probabilities] if save_probabilities else [])
        for output in outputs:
            if not output.exists():
                continue
            for source in inputs:
                if os.path.samefile(output, source):
                    raise InputError(f"refusing to write over an input of this command ({source}); choose "
                                     "another --out", output)
            if not overwrite and not _is_segment_output(output):
                raise InputError("exists and was not written by brats-cnn segment; pass --overwrite to replace "
                                 "it, or choose another --out", output)


def _member_input(member: _Member, case: Case) -> tuple[np.ndarray, np.ndarray]:
    """A case normalised for one checkpoint (its normaliser, its channel order) and the brain mask."""
    from brats_cnn.normalise import normalise_case

    image, mask = normalise_case(case, member.checkpoint.normaliser, member.config.preprocess)
    return _reorder_channels(image, member.checkpoint.channel_order), mask


def _member_probabilities(member: _Member, image: np.ndarray, mask: np.ndarray, mode: str, device: "torch.device",
                          progress: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """One checkpoint's calibrated probabilities of a case: its own TTA, prior correction and class weights.

    Returns:
        ``(probabilities, class_prior)``; ``class_prior`` is ``None`` without prior correction.
    """
    from brats_cnn.prior import correct_class_prior, weight_classes

    checkpoint, config = member.checkpoint, member.config
    probabilities = predict(checkpoint.network, image, mask, mode, device, config, progress)
    class_prior = None
    if config.segment.prior_alpha > 0:
        probabilities, class_prior = correct_class_prior(probabilities, mask,
                                                         prior_frequencies(checkpoint, member.path),
                                                         config.segment.prior_alpha, config.segment.prior_adapt)
    if config.segment.class_weights:
        probabilities = weight_classes(probabilities, config.segment.class_weights)
    return probabilities, class_prior


def _member_record(member: _Member, class_prior: np.ndarray | None) -> dict:
    """The sidecar's account of one checkpoint's settings."""
    segment = member.config.segment
    return {"model": str(member.path), "prior_alpha": segment.prior_alpha, "prior_adapt": segment.prior_adapt,
            "class_prior": None if class_prior is None else [round(float(p), 6) for p in class_prior],
            "class_weights": list(segment.class_weights) or None,
            "tta": segment.tta, "tta_rotations": list(segment.tta_rotations)}


def _say_what_was_removed(case_id: str, report: dict, config: PostprocessConfig) -> None:
    """One terminal line when post-processing removed tumour; a warning when it would have removed all of it."""
    if report["never_empty_applied"]:
        log.warning("%s: every tumour component was smaller than t_vol = %d voxels; kept the largest (%d voxels) "
                    "instead of an empty segmentation, removed %d voxels in %d component(s)", case_id,
                    config.min_component_voxels, report["kept_voxels"], report["removed_voxels"],
                    report["removed_components"])
    elif report["removed_voxels"]:
        log.info("%s: post-processing removed %d tumour voxels in %d component(s) (t_vol %d%s)", case_id,
                 report["removed_voxels"], report["removed_components"], config.min_component_voxels,
                 ", keep-largest" if config.keep_largest else "")


def segment_case(ref: CaseRef, target: _Target, *, members: list, mode: str, device: "torch.device", convention: str,
                 postprocess: bool, save_probabilities: bool, progress: bool,
                 proof: "tuple[dict, dict] | None" = None) -> dict:
    """Load, normalise, predict, post-process and write one case; returns the sidecar dict.

    With several ``members`` (an ensemble) each one's calibrated probabilities are averaged; the
    first member's decision rule, post-processing and label convention apply to the mean.
    ``proof``: ``(models, settings)`` for the sidecar's ``provenance`` record (:mod:`brats_cnn.provenance`);
    :func:`run_segment` passes what it will compare on a rerun.
    """
    import time

    from brats_cnn import __version__
    from brats_cnn.fsutil import write_json_atomic
    from brats_cnn.io import load_case, save_label_map, save_volume
    from brats_cnn.labels import classify, convert_labels, from_class_indices
    from brats_cnn.postprocess import postprocess_with_report
    from brats_cnn.resample import needs_resampling, resample_volume, to_isotropic

    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(timings.get(stage, 0.0) + now - clock, 3)  # an ensemble laps once per member
        clock = now

    grid = load_case(ref, load_label=False)  # the input grid: the outputs are written on it
    case = to_isotropic(grid) if needs_resampling(grid.spacing) else grid  # the network's 1 mm grid
    lap("load")
    checkpoint, config = members[0].checkpoint, members[0].config
    probabilities, mask, records = None, None, []
    for member in members:
        image, member_mask = _member_input(member, case)
        if mask is not None and not np.array_equal(member_mask, mask):
            raise ConfigError("finds another brain mask than the first --model (other preprocess settings); "
                              "an ensemble needs models preprocessed alike", member.path)
        mask = member_mask
        lap("normalise")
        member_probabilities, class_prior = _member_probabilities(member, image, mask, mode, device, progress)
        lap("predict")
        probabilities = member_probabilities if probabilities is None else probabilities + member_probabilities
        records.append(_member_record(member, class_prior))
    if len(members) > 1:
        probabilities = probabilities / np.float32(len(members))
    classes = classify(probabilities, checkpoint.label_convention, config.segment.decision)
    lap("predict")
    report = {"removed_voxels": 0, "removed_components": 0, "never_empty_applied": False}
    if postprocess:
        classes, report = postprocess_with_report(classes, config.postprocess)
        _say_what_was_removed(ref.case_id, report, config.postprocess)
    lap("postprocess")
    labels = from_class_indices(classes, checkpoint.label_convention)
    if convention != checkpoint.label_convention:
        labels = convert_labels(labels, checkpoint.label_convention, convention)
    if case is not grid:  # back to the input grid: labels nearest neighbour, probabilities linear
        shape = grid.image.shape[1:]
        labels = resample_volume(labels, case.spacing, shape, grid.spacing, "nearest")
        if save_probabilities:
            probabilities = np.stack([resample_volume(p, case.spacing, shape, grid.spacing, "linear")
                                      for p in probabilities])
    written = []
    try:  # a case that fails while writing leaves none of its outputs under a final name
        save_label_map(labels, grid, target.labels, description=OUTPUT_DESCRIPTION)
        written.append(target.labels)
        if save_probabilities:
            # NIfTI-1 has no float16 datatype code (nibabel refuses it), so probabilities are float32
            save_volume(np.moveaxis(probabilities, 0, -1), grid, target.probabilities, dtype=np.float32,
                        description=OUTPUT_DESCRIPTION)
            written.append(target.probabilities)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    lap("write")
    sidecar = {
        "case_id": ref.case_id,
        "inputs": [str(p) for p in ref.image_paths],
        "segmentation": str(target.labels),
        "probabilities": str(target.probabilities) if save_probabilities else None,
        "model": str(members[0].path),
        "grade": checkpoint.grade,
        "mode": mode,
        "device": str(device),
        "precision": compute_settings(device, config.compute).precision,
        "channels_last": config.compute.channels_last,
        "label_convention": convention,
        **{key: value for key, value in records[0].items() if key != "model"},
        "ensemble": records if len(members) > 1 else None,
        "decision": config.segment.decision,
        "postprocess": {"enabled": postprocess, "min_component_voxels": config.postprocess.min_component_voxels,
                        "connectivity": config.postprocess.connectivity,
                        "keep_largest": config.postprocess.keep_largest,
                        "never_empty": config.postprocess.never_empty, **report},
        "brain_voxels": int(mask.sum()),
        "resampled_to_1mm": case is not grid,
        "timings_s": timings,
        "brats_cnn_version": __version__,
    }
    try:
        if proof is not None:
            from brats_cnn import provenance

            sidecar["provenance"] = provenance.record(ref.case_id, ref.image_paths, proof[0], proof[1],
                                                      _requested_outputs(target, save_probabilities))
        write_json_atomic(target.sidecar, sidecar)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return sidecar


# Speed and memory settings of the machine that runs inference, not of the model: ``segment`` takes
# them from this version's defaults (then --set), never from the checkpoint's training config, so an
# older checkpoint gets today's fastest settings (slices_per_batch 2; benchmarks/bench_segment.py).
RUNTIME_KEYS: tuple[str, ...] = ("batch_size", "slices_per_batch", "memory_fraction")
TTA_CHOICES: tuple[str, ...] = ("auto", "always", "never")


def tta_rotations(config: Config, device: "torch.device") -> tuple[int, ...]:
    """The rotations ``segment`` averages over: ``segment.tta_rotations`` when ``segment.tta`` is ``always``,
    or ``auto`` on CUDA; ``(0,)`` (no test-time augmentation) when ``never``, or ``auto`` on a CPU, where
    the 4x time buys about +0.006 Dice (docs/results.md)."""
    setting = config.segment.tta
    if setting not in TTA_CHOICES:
        raise ConfigError(f"segment.tta must be one of {', '.join(TTA_CHOICES)}, got '{setting}'")
    use = setting == "always" or (setting == "auto" and device.type == "cuda")
    return tuple(config.segment.tta_rotations) if use else (0,)


def _load_members(paths: list, grade: str | None, check_grade: bool, overrides: list,
                  device: "torch.device") -> list[_Member]:
    """Load each checkpoint with its config; one-line errors before any work for any that does not fit.

    Each member's config has :data:`RUNTIME_KEYS` from this version's defaults and its
    ``segment.tta_rotations`` resolved for ``device`` (:func:`tta_rotations`).
    """
    import dataclasses

    from brats_cnn.config import SegmentConfig, config_to_dict, load_config
    from brats_cnn.model import load_checkpoint

    members = []
    for path in paths:
        checkpoint = load_checkpoint(path, map_location=device)
        if check_grade and checkpoint.grade != grade.lower():
            raise ConfigError(f"checkpoint is for grade '{checkpoint.grade}' but --grade {grade.lower()} was given",
                              path)
        base = config_to_dict(checkpoint.config)
        base.setdefault("segment", {}).update({key: getattr(SegmentConfig(), key) for key in RUNTIME_KEYS})
        config = load_config(None, overrides, base=base)
        config = dataclasses.replace(config, segment=dataclasses.replace(
            config.segment, tta_rotations=tta_rotations(config, device)))
        if config.sampling.patch_size != checkpoint.network.patch_size:  # the trained network fixes it
            raise ConfigError(f"sampling.patch_size={config.sampling.patch_size} cannot be changed at segmentation: "
                              f"the network was trained on {checkpoint.network.patch_size}x"
                              f"{checkpoint.network.patch_size} patches", path)
        if config.segment.prior_alpha > 0:
            prior_frequencies(checkpoint, path)
        weights = config.segment.class_weights
        if weights and len(weights) != checkpoint.network.num_classes:
            raise ConfigError(f"segment.class_weights has {len(weights)} values but the network predicts "
                              f"{checkpoint.network.num_classes} classes", path)
        if members and (checkpoint.label_convention, checkpoint.network.num_classes) != (
                members[0].checkpoint.label_convention, members[0].checkpoint.network.num_classes):
            first = members[0].checkpoint
            raise ConfigError(f"cannot be averaged with the first --model: it predicts {checkpoint.network.num_classes} "
                              f"classes in {checkpoint.label_convention}, the first {first.network.num_classes} in "
                              f"{first.label_convention}", path)
        members.append(_Member(path, checkpoint, config))
    return members


def _requested_outputs(target: _Target, save_probabilities: bool) -> dict:
    """Output role -> path of what this run writes for a case (the sidecar aside)."""
    return {"labels": target.labels, **({"probabilities": target.probabilities} if save_probabilities else {})}


def _output_settings(members: list, mode: str, device: "torch.device", convention: str, postprocess: bool) -> dict:
    """Every setting that changes a case's outputs (the provenance compared by a rerun): mode, device
    kind and precision, label convention, post-processing on/off, and each member's whole config
    but :data:`RUNTIME_KEYS` and ``segment.tta`` (the rotations it resolved to are in the config)."""
    from brats_cnn.config import config_to_dict

    configs = []
    for member in members:
        values = config_to_dict(member.config)
        for key in (*RUNTIME_KEYS, "tta"):
            values["segment"].pop(key, None)
        configs.append(values)
    return {"mode": mode, "device": device.type, "precision": compute_settings(device, members[0].config.compute).precision,
            "label_convention": convention, "postprocess": postprocess, "configs": configs}


def _refuse_foreign_outputs(pairs: list, overwrite: bool) -> None:
    """InputError before any work when (without ``--overwrite``) a case's output folder holds another
    case's segmentation under its name (its sidecar's ``case_id`` says so)."""
    from brats_cnn.provenance import held_case

    if overwrite:
        return
    for ref, target in pairs:
        holder = held_case(target.sidecar)  # None when absent or unreadable: provenance.check_existing decides
        if holder is not None and holder != ref.case_id:
            raise InputError(f"holds the segmentation of case '{holder}', not '{ref.case_id}'; pass --overwrite to "
                             "replace it, or choose another --out", target.labels)


def shard_pairs(pairs: list, shard: "tuple[int, int] | None", rank: int, world: int) -> list:
    """This process's cases: every ``N``-th from ``K`` (``--shard K/N``, 0-based), then every
    ``WORLD_SIZE``-th of those from ``RANK`` (torchrun or any launcher that sets them)."""
    if shard is not None:
        index, count = shard
        pairs = pairs[index::count]
    return pairs[rank::world]


def parse_shard(text: "str | None") -> "tuple[int, int] | None":
    """``"K/N"`` -> ``(K, N)`` with ``0 <= K < N``; ConfigError otherwise."""
    if text is None:
        return None
    try:
        index, count = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ConfigError(f"--shard must be K/N with integers, e.g. 0/4 (the first of 4 shards), got '{text}'") from None
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard K/N needs 0 <= K < N, got '{text}' (SLURM arrays: --shard "
                          "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --array=0-(N-1))")
    return index, count


def run_segment(inputs: str | Path | list, model: str | Path | list | None = None, grade: str | None = None,
                out: str | Path = "segmentations",
                mode: str | None = None, device: str = "auto", save_probabilities: bool = False,
                label_convention: str | None = None, overwrite: bool = False, postprocess: bool = True,
                overrides: list[str] | tuple[str, ...] = (), shard: "str | tuple[int, int] | None" = None) -> SegmentResult:
    """The ``brats-cnn segment`` command: segment one case or a whole dataset with a checkpoint.

    Args:
        inputs: paths io can read: a 4-D ``case.nii.gz``, a case folder, one of a case's files, or a
            dataset folder (every case in it).
        model: checkpoint file, or a list of them (an ensemble: their calibrated probabilities are
            averaged, and the first one's decision rule and post-processing apply); or ``grade``
            (``hgg``/``lgg``) for ``brats_cnn/weights/<grade>.pt``.
        out: ``x.nii.gz`` for a single case, else a folder receiving ``<case_id>.nii.gz``,
            ``<case_id>.json`` and (``save_probabilities``) ``<case_id>_probabilities.nii.gz``.
        mode: ``exact``, ``fast`` or ``auto`` (default: the config's, ``auto`` = exact on CUDA).
        device: ``auto``, ``cpu``, ``cuda``; under torchrun rank ``r`` uses ``cuda:LOCAL_RANK`` and
            takes cases ``r, r + WORLD_SIZE, ...``.
        label_convention: convention of the written labels (default: the checkpoint's).
        overwrite: recompute every case (default: skip a case whose outputs prove they were produced
            from the same inputs, model and settings and still verify; recompute a stale or broken one,
            saying why; refuse an output that holds another case).
        shard: ``"K/N"`` or ``(K, N)``: only every N-th case from the K-th (0-based; SLURM arrays).
        postprocess: remove components smaller than the checkpoint config's ``t_vol``.
        overrides: ``--set key=value`` applied on top of the checkpoint's config.

    Raises:
        BratsCnnError: bad model/options before any work; or, after trying every case, one error
            naming the cases that failed.
    """
    import time
    from pathlib import Path

    from brats_cnn.errors import BratsCnnError
    from brats_cnn.labels import conversion_table, get_convention

    from brats_cnn.device import keep_freed_memory

    checkpoint_paths, grade_overrides = _checkpoint_paths(model, grade)
    keep_freed_memory()  # large freed blocks are reused, not faulted in again (system time)
    torchrun = torchrun_environment()
    rank, world = torchrun.rank, torchrun.world_size
    torch_device = resolve_device(device, torchrun.local_rank)
    members = _load_members(checkpoint_paths, grade, bool(model) and grade is not None,
                            [*grade_overrides, *(overrides or ())], torch_device)
    checkpoint, config = members[0].checkpoint, members[0].config
    chosen_mode = resolve_mode(mode or config.segment.mode, torch_device)
    convention = get_convention(label_convention or checkpoint.label_convention).name
    conversion_table(checkpoint.label_convention, convention)  # fail before any work if undefined
    refs = _find_cases(inputs if isinstance(inputs, (list, tuple)) else [inputs])
    if not refs:
        raise InputError("no cases found in the inputs")
    pairs = shard_pairs(list(zip(refs, _targets(refs, out))),
                        parse_shard(shard) if isinstance(shard, (str, type(None))) else shard, rank, world)
    _refuse_overwriting(pairs, checkpoint_paths, save_probabilities, overwrite)  # before any work
    _refuse_foreign_outputs(pairs, overwrite)
    for folder in sorted({target.labels.parent for _, target in pairs}):  # fail before any work
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create output folder ({exc.strerror})", folder) from exc
    log.info("segmenting %d case(s) in %s mode on %s%s%s", len(pairs), chosen_mode, torch_device,
             f" (rank {rank} of {world})" if world > 1 else "",
             f", averaging {len(members)} models" if len(members) > 1 else "")
    rotations = tuple(config.segment.tta_rotations)
    if len(rotations) > 1:
        log.info("test-time augmentation on (segment.tta %s): averaging over rotations %s, %dx the time",
                 config.segment.tta, list(rotations), len(rotations))
    elif config.segment.tta == "always":
        log.info("test-time augmentation asked for, but the model's segment.tta_rotations is %s: nothing to average "
                 "(--set \"segment.tta_rotations=[0,90,180,270]\" to choose rotations)", list(rotations))
    else:
        log.info("test-time augmentation off (segment.tta %s on %s); --tta averages over the calibrated rotations",
                 config.segment.tta, torch_device.type)

    from brats_cnn import provenance
    from brats_cnn.fsutil import remove_stale_temporaries

    models = {str(member.path): provenance.sha256(member.path) for member in members}
    settings = _output_settings(members, chosen_mode, torch_device, convention, postprocess)
    outputs, skipped, failures, last_error = [], [], {}, None
    show_cases = len(pairs) > 1
    from tqdm import tqdm

    for ref, target in tqdm(pairs, desc="cases", unit="case", disable=not (show_cases and progress_wanted()),
                            dynamic_ncols=True):
        try:
            wanted = _requested_outputs(target, save_probabilities)
            left = [p for output in (*wanted.values(), target.sidecar) for p in remove_stale_temporaries(output)]
            if left:
                log.info("%s: removed %d temporary file(s) left by an interrupted run", ref.case_id, len(left))
            if not overwrite:
                # the sidecar is written last: a case killed between the writes has no proof and is done again
                existing = provenance.check_existing(ref.case_id, target.sidecar, wanted, list(ref.image_paths),
                                                     models, settings)
                if existing.action == "skip":
                    skipped.append(target.labels)
                    continue
                if existing.action == "foreign":  # appeared after the check before any work
                    raise InputError(f"{existing.reason}; pass --overwrite to replace it", target.labels)
                if existing.action == "recompute":
                    log.info("%s: recomputing %s: %s", ref.case_id, target.labels, existing.reason)
            started = time.perf_counter()
            segment_case(ref, target, members=members, mode=chosen_mode, device=torch_device, convention=convention,
                         postprocess=postprocess, save_probabilities=save_probabilities,
                         progress=(chosen_mode == "exact" or not show_cases) and progress_wanted(),
                         proof=(models, settings))
            outputs.append(target.labels)
            log.info("%s: wrote %s%s in %.1f s", ref.case_id, target.labels,
                     f" and {target.probabilities}" if save_probabilities else "", time.perf_counter() - started)
        except (BratsCnnError, OSError, ValueError, RuntimeError) as exc:  # a bad case must not stop a batch
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning("%s: failed: %s", ref.case_id, message)
            log.debug("traceback of %s", ref.case_id, exc_info=True)
            failures[ref.case_id] = message
            last_error = exc
    if skipped:
        log.info("skipped %d case(s) whose outputs were produced from the same inputs, model and settings "
                 "(use --overwrite to recompute)", len(skipped))
    if failures:
        listed = "; ".join(f"{case_id} ({message})" for case_id, message in failures.items())
        if len(pairs) == 1 and isinstance(last_error, BratsCnnError):
            raise last_error  # one case: its own one-line error, naming the input file that is wrong
        raise BratsCnnError(f"{len(failures)} of {len(pairs)} case(s) failed: {listed}", Path(out))
    return SegmentResult(outputs, skipped, failures)
