"""What ``segment`` writes for a case and what it refuses to write over: output paths, the NIfTI
mark of its own outputs, and the settings a rerun's provenance compares.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from brats_cnn.device import compute_settings
from brats_cnn.errors import InputError
from brats_cnn.inference.members import RUNTIME_KEYS

if TYPE_CHECKING:  # heavy imports stay lazy
    import torch

    from brats_cnn.data.layouts import CaseRef


@dataclass(frozen=True)
class OutputTarget:
    """Output files of one case."""

    labels: Path
    probabilities: Path
    sidecar: Path


def output_targets(refs: list[CaseRef], out: str | Path) -> list[OutputTarget]:
    """Output paths per case: ``--out x.nii.gz`` for one case, else ``<out>/<case_id>.nii.gz``."""
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
        targets.append(OutputTarget(labels, labels.with_name(f"{stem}_probabilities.nii.gz"),
                               labels.with_name(f"{stem}.json")))
    return targets


OUTPUT_DESCRIPTION = "brats-cnn segment"  # NIfTI descrip of every label map/probability map segment writes


def is_segment_output(path: Path) -> bool:
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


def refuse_overwriting(pairs: list, checkpoint_paths: list, save_probabilities: bool, overwrite: bool) -> None:
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
            if not overwrite and not is_segment_output(output):
                raise InputError("exists and was not written by brats-cnn segment; pass --overwrite to replace "
                                 "it, or choose another --out", output)


def requested_outputs(target: OutputTarget, save_probabilities: bool) -> dict:
    """Output role -> path of what this run writes for a case (the sidecar aside)."""
    return {"labels": target.labels, **({"probabilities": target.probabilities} if save_probabilities else {})}


def output_settings(members: list, mode: str, device: "torch.device", convention: str, postprocess: bool) -> dict:
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


def refuse_foreign_outputs(pairs: list, overwrite: bool) -> None:
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
