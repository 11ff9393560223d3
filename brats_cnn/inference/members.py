"""The checkpoints one ``segment`` run averages: the bundled model per grade, loading each with its
config and runtime settings, and each member's calibrated probabilities of a case.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from brats_cnn.errors import ConfigError, InputError
from brats_cnn.inference.predict import predict

if TYPE_CHECKING:  # heavy imports stay lazy
    import torch

    from brats_cnn.config import Config
    from brats_cnn.data.io import Case
    from brats_cnn.network.checkpoint import Checkpoint

log = logging.getLogger(__name__)


WEIGHTS_DIR_NAME = "weights"


DEFAULT_GRADE = "hgg"  # bundled model used when neither --grade nor --model is given
UNKNOWN_GRADE = "unknown"  # BUNDLED_MODELS' entry for that case: the default model with the unknown-grade rule


# The bundled checkpoint that serves each grade, and the settings applied to it for that grade (before
# the user's --set). LGG cases get the HGG network: on the sample's LGG cases it beats the paper's
# LGG network trained on the one or two LGG cases the sample can spare (docs/results.md, "LGG").
# The decision rules are chosen by 4-fold cross-validation over the 23 sample cases outside the test
# split, on fold models trained with the bundled model's recipe (v11: intensity augmentation, patches
# from three slice planes, segmented over the three, the context pathway; docs/results.md,
# benchmarks/results/cv4_context/grid.json, fold models at half the schedule): HGG alpha 0.6, no TTA
# (segment.tta never: also on CUDA; --tta still turns it on), t_vol 1,000, require-core, all in the
# checkpoint's calibration. Cases of unknown grade (no --grade, no --model; chosen on the out-of-fold
# cases of both grades): alpha 0.4, TTA (segment.tta auto: on CUDA, or with --tta), t_vol 3,000,
# require-core. LGG: alpha 0, no TTA, t_vol 0 with keep-largest.
BUNDLED_MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "hgg": ("hgg.pt", ()),
    UNKNOWN_GRADE: ("hgg.pt", ("segment.prior_alpha=0.4", "segment.tta=auto", "postprocess.min_component_voxels=3000")),
    "lgg": ("hgg.pt", ("segment.prior_alpha=0", "postprocess.require_core=false",
                       "postprocess.min_component_voxels=0", "postprocess.keep_largest=true")),
}


@dataclass(frozen=True)
class Member:
    """One checkpoint of ``segment``: a single model, or one member of an ensemble (``--model`` repeated)."""

    path: Path
    checkpoint: Checkpoint
    config: Config  # the checkpoint's config with the grade's settings and --set applied


def bundled_weights(grade: str) -> Path:
    """Path of the bundled checkpoint that serves a grade (:data:`BUNDLED_MODELS`)."""
    package = Path(__file__).resolve().parents[1]  # brats_cnn/
    return package / WEIGHTS_DIR_NAME / BUNDLED_MODELS[grade.lower()][0]


def resolve_checkpoints(model: str | Path | list | None, grade: str | None) -> tuple[list[Path], tuple[str, ...]]:
    """The checkpoint(s) to load and the grade's settings for them (none unless it is a bundled one)."""
    from brats_cnn.config import check_grade
    from brats_cnn.errors import CheckpointError

    if grade is not None:
        grade = check_grade(grade)
    models = list(model) if isinstance(model, (list, tuple)) else [] if model is None else [model]
    if models:
        return [Path(m) for m in models], ()  # with --grade as well, run_segment checks each checkpoint's grade
    entry = grade or UNKNOWN_GRADE  # BraTS 2019+ data carries no grade: the documented default (docs/results.md)
    path = bundled_weights(entry)
    if grade is None:
        log.warning("no --grade or --model given: using the bundled %s model (the default for cases of unknown "
                    "grade; see docs/results.md)", DEFAULT_GRADE.upper())
    elif path.name != f"{grade}.pt":
        log.warning("--grade %s: using the bundled %s model, which scores better on %s cases than the paper's "
                    "%s network trained on the sample (see docs/results.md)", grade, path.stem.upper(),
                    grade.upper(), grade.upper())
    if not path.is_file():
        raise CheckpointError(f"no bundled {(grade or DEFAULT_GRADE).upper()} weights in this installation; train a "
                              f"model (brats-cnn train) and pass it with --model", path)
    return [path], BUNDLED_MODELS[entry][1]


def reorder_channels(image: np.ndarray, channel_order: tuple[str, ...]) -> np.ndarray:
    """io's ``CHANNELS`` order -> the checkpoint's channel order."""
    from brats_cnn import CHANNELS

    if tuple(channel_order) == tuple(CHANNELS):
        return image
    missing = [c for c in channel_order if c not in CHANNELS]
    if missing:
        raise InputError(f"the checkpoint expects sequence '{missing[0]}', which this project does not read")
    return image[[CHANNELS.index(c) for c in channel_order]]


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


def member_input(member: Member, case: Case) -> tuple[np.ndarray, np.ndarray]:
    """A case normalised for one checkpoint (its normaliser, its channel order) and the brain mask."""
    from brats_cnn.preprocessing.normalise import normalise_case

    image, mask = normalise_case(case, member.checkpoint.normaliser, member.config.preprocess)
    return reorder_channels(image, member.checkpoint.channel_order), mask


def member_probabilities(member: Member, image: np.ndarray, mask: np.ndarray, mode: str, device: "torch.device",
                          progress: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """One checkpoint's calibrated probabilities of a case: its own TTA, prior correction and class weights.

    Returns:
        ``(probabilities, class_prior)``; ``class_prior`` is ``None`` without prior correction.
    """
    from brats_cnn.inference.prior import correct_class_prior, weight_classes

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


def member_record(member: Member, class_prior: np.ndarray | None) -> dict:
    """The sidecar's account of one checkpoint's settings."""
    segment = member.config.segment
    return {"model": str(member.path), "prior_alpha": segment.prior_alpha, "prior_adapt": segment.prior_adapt,
            "class_prior": None if class_prior is None else [round(float(p), 6) for p in class_prior],
            "class_weights": list(segment.class_weights) or None,
            "tta": segment.tta, "tta_rotations": list(segment.tta_rotations), "views": list(segment.views)}


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


def load_members(paths: list, grade: str | None, check_grade: bool, overrides: list,
                  device: "torch.device") -> list[Member]:
    """Load each checkpoint with its config; one-line errors before any work for any that does not fit.

    Each member's config has :data:`RUNTIME_KEYS` from this version's defaults and its
    ``segment.tta_rotations`` resolved for ``device`` (:func:`tta_rotations`).
    """
    import dataclasses

    from brats_cnn.config import SegmentConfig, config_to_dict, load_config
    from brats_cnn.network.checkpoint import load_checkpoint

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
        members.append(Member(path, checkpoint, config))
    return members
