"""The ``segment`` command (SPEC stages 6-7): every case through its models, decision rule and
post-processing into a label map, a sidecar and, on request, the probabilities.

The maths is elsewhere: the voxel-wise prediction in :mod:`brats_cnn.inference.predict`, the models
and each one's calibrated probabilities in :mod:`brats_cnn.inference.members`, the output files and
what may be written over in :mod:`brats_cnn.inference.outputs`, the skip rule in
:mod:`brats_cnn.provenance`. This module runs the cases: sharding (``--shard``, torchrun ranks),
skip or recompute, one case's stages in order, and one error naming every case that failed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from brats_cnn import progress_wanted
from brats_cnn.device import compute_settings, resolve_device, torchrun_environment
from brats_cnn.errors import ConfigError, InputError
from brats_cnn.inference.members import (
    load_members,
    member_input,
    member_probabilities,
    member_record,
    resolve_checkpoints,
)
from brats_cnn.inference.outputs import (
    OUTPUT_DESCRIPTION,
    OutputTarget,
    output_settings,
    output_targets,
    refuse_foreign_outputs,
    refuse_overwriting,
    requested_outputs,
)
from brats_cnn.inference.predict import resolve_mode

if TYPE_CHECKING:  # heavy imports stay lazy
    import torch

    from brats_cnn.config import PostprocessConfig
    from brats_cnn.data.layouts import CaseRef

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentResult:
    """What :func:`run_segment` did: written label maps, skipped outputs and failed cases."""

    outputs: list
    skipped: list
    failures: dict


def _find_cases(inputs: list) -> list[CaseRef]:
    """Case references of every input (a case file/folder, or a dataset folder = many cases)."""
    from brats_cnn.data.layouts import find_case, list_cases

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


def _say_what_was_removed(case_id: str, report: dict, config: PostprocessConfig) -> None:
    """One terminal line when post-processing removed tumour; a warning when it would have removed all of it."""
    if report["never_empty_applied"]:
        log.warning("%s: every tumour component was smaller than t_vol = %d voxels%s; kept the largest (%d voxels) "
                    "instead of an empty segmentation, removed %d voxels in %d component(s)", case_id,
                    config.min_component_voxels, " or had no tumour core" if config.require_core else "",
                    report["kept_voxels"], report["removed_voxels"], report["removed_components"])
    elif report["removed_voxels"]:
        log.info("%s: post-processing removed %d tumour voxels in %d component(s) (t_vol %d%s%s)", case_id,
                 report["removed_voxels"], report["removed_components"], config.min_component_voxels,
                 f", {report['removed_without_core']} of them without tumour core" if config.require_core else "",
                 ", keep-largest" if config.keep_largest else "")


def segment_case(ref: CaseRef, target: OutputTarget, *, members: list, mode: str, device: "torch.device", convention: str,
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
    from brats_cnn.data.io import load_case, save_label_map, save_volume
    from brats_cnn.data.labels import classify, convert_labels, from_class_indices
    from brats_cnn.data.resample import needs_resampling, resample_volume, to_isotropic
    from brats_cnn.fsutil import write_json_atomic
    from brats_cnn.inference.postprocess import postprocess_with_report

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
        image, member_mask = member_input(member, case)
        if mask is not None and not np.array_equal(member_mask, mask):
            raise ConfigError("finds another brain mask than the first --model (other preprocess settings); "
                              "an ensemble needs models preprocessed alike", member.path)
        mask = member_mask
        lap("normalise")
        one, class_prior = member_probabilities(member, image, mask, mode, device, progress)
        lap("predict")
        probabilities = one if probabilities is None else probabilities + one
        records.append(member_record(member, class_prior))
    if len(members) > 1:
        probabilities = probabilities / np.float32(len(members))
    classes = classify(probabilities, checkpoint.label_convention, config.segment.decision)
    lap("predict")
    report = {"removed_voxels": 0, "removed_components": 0, "never_empty_applied": False, "removed_without_core": 0}
    if postprocess:
        classes, report = postprocess_with_report(classes, config.postprocess, convention=checkpoint.label_convention)
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
                        "never_empty": config.postprocess.never_empty,
                        "require_core": config.postprocess.require_core, **report},
        "brain_voxels": int(mask.sum()),
        "resampled_to_1mm": case is not grid,
        "timings_s": timings,
        "brats_cnn_version": __version__,
    }
    try:
        if proof is not None:
            from brats_cnn import provenance

            sidecar["provenance"] = provenance.record(ref.case_id, ref.image_paths, proof[0], proof[1],
                                                      requested_outputs(target, save_probabilities))
        write_json_atomic(target.sidecar, sidecar)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return sidecar


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

    from brats_cnn.data.labels import conversion_table, get_convention
    from brats_cnn.device import keep_freed_memory
    from brats_cnn.errors import BratsCnnError

    checkpoint_paths, grade_overrides = resolve_checkpoints(model, grade)
    keep_freed_memory()  # large freed blocks are reused, not faulted in again (system time)
    torchrun = torchrun_environment()
    rank, world = torchrun.rank, torchrun.world_size
    torch_device = resolve_device(device, torchrun.local_rank)
    members = load_members(checkpoint_paths, grade, bool(model) and grade is not None,
                            [*grade_overrides, *(overrides or ())], torch_device)
    checkpoint, config = members[0].checkpoint, members[0].config
    chosen_mode = resolve_mode(mode or config.segment.mode, torch_device)
    convention = get_convention(label_convention or checkpoint.label_convention).name
    conversion_table(checkpoint.label_convention, convention)  # fail before any work if undefined
    refs = _find_cases(inputs if isinstance(inputs, (list, tuple)) else [inputs])
    if not refs:
        raise InputError("no cases found in the inputs")
    pairs = shard_pairs(list(zip(refs, output_targets(refs, out))),
                        parse_shard(shard) if isinstance(shard, (str, type(None))) else shard, rank, world)
    refuse_overwriting(pairs, checkpoint_paths, save_probabilities, overwrite)  # before any work
    refuse_foreign_outputs(pairs, overwrite)
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
    settings = output_settings(members, chosen_mode, torch_device, convention, postprocess)
    outputs, skipped, failures, last_error = [], [], {}, None
    show_cases = len(pairs) > 1
    from tqdm import tqdm

    for ref, target in tqdm(pairs, desc="cases", unit="case", disable=not (show_cases and progress_wanted()),
                            dynamic_ncols=True):
        try:
            wanted = requested_outputs(target, save_probabilities)
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
