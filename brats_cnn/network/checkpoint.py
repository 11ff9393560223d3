"""Checkpoints: the one file format a trained network is saved in, loaded from, and averaged over."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brats_cnn import CHANNELS
from brats_cnn.config import GRADES, Config, config_to_dict
from brats_cnn.errors import CheckpointError, ConfigError
from brats_cnn.network.model import PereiraCNN, build_network

CHECKPOINT_FORMAT = "brats-cnn-checkpoint"
LAST_CHECKPOINT = "last.pt"  # a train run folder's checkpoints: the resume state, and the best validation score
BEST_CHECKPOINT = "best.pt"
CHECKPOINT_FORMAT_VERSION = 2  # 2 added "calibration"; version 1 files still load (calibration None)


CHECKPOINT_KEYS_BY_VERSION: dict[int, frozenset[str]] = {
    1: frozenset({"format", "format_version", "architecture", "num_classes", "state_dict", "grade",
                  "label_convention", "channel_order", "normaliser", "config", "epoch", "training_state"}),
}
CHECKPOINT_KEYS_BY_VERSION[2] = CHECKPOINT_KEYS_BY_VERSION[1] | {"calibration"}
CHECKPOINT_KEYS: frozenset[str] = CHECKPOINT_KEYS_BY_VERSION[CHECKPOINT_FORMAT_VERSION]


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        network: the network in eval mode on ``map_location``.
        config: the resolved config the model was trained with.
        grade: ``"hgg"`` or ``"lgg"``.
        label_convention: convention whose labels the class indices stand for.
        channel_order: input channel order, e.g. ``("t1", "t1c", "t2", "flair")``.
        normaliser: the fitted normaliser (Nyul landmarks, z-score statistics) to apply at inference.
        epoch: number of completed training epochs.
        training_state: optimiser state, step counter, RNG states... (for ``--resume``), or None.
        format_version: :data:`CHECKPOINT_FORMAT_VERSION` of the file.
        calibration: fitted output calibration (``{"class_frequencies": [...], ...}``: the class
            frequencies inside the brain of the training cases, for the prior correction of
            :mod:`brats_cnn.inference.calibrate`), or None.
    """

    network: PereiraCNN
    config: Config
    grade: str
    label_convention: str
    channel_order: tuple[str, ...]
    normaliser: Any
    epoch: int
    training_state: dict | None
    format_version: int
    calibration: dict | None = None


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain network inside a ``torch.compile`` and/or ``DistributedDataParallel`` wrapper."""
    while True:
        if hasattr(network, "_orig_mod"):
            network = network._orig_mod
        elif isinstance(network, nn.parallel.DistributedDataParallel):
            network = network.module
        else:
            return network


def save_checkpoint(path: str | Path, *, network: nn.Module, config: Config, normaliser: Any,
                    label_convention: str, epoch: int = 0, training_state: dict | None = None,
                    calibration: dict | None = None) -> Path:
    """Write a self-contained checkpoint atomically and return its path.

    Everything is stored as tensors and plain Python types (dict/list/str/int/float/bool/None), so
    that :func:`load_checkpoint` can use ``torch.load(weights_only=True)``.

    Args:
        network: a :class:`PereiraCNN` (optionally wrapped by torch.compile or DDP); weights are
            saved on the CPU.
        config: the resolved config (stored as a nested dict).
        normaliser: a ``NormaliserState`` (stored via its ``to_dict()``).
        label_convention: the convention of the class indices, e.g. ``"brats2017"``.
        epoch: completed epochs.
        training_state: optional resume state; tensors and plain types only.
        calibration: optional fitted calibration (plain types), see :class:`Checkpoint`.
    """
    from brats_cnn.fsutil import atomic_path

    plain = unwrap_network(network)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "architecture": plain.architecture,
        "num_classes": int(plain.num_classes),
        "state_dict": {k: v.detach().cpu().clone() for k, v in plain.state_dict().items()},
        "grade": config.grade,
        "label_convention": label_convention,
        "channel_order": list(config.data.channel_order),
        "normaliser": normaliser.to_dict(),
        "config": config_to_dict(config),
        "epoch": int(epoch),
        "training_state": training_state,
        "calibration": calibration,
    }
    bad = non_finite_weights(payload["state_dict"])
    if bad:  # a diverged network is never written: it would segment everything as background
        raise CheckpointError(f"refused to write a checkpoint with non-finite weights ({bad})", path)
    with atomic_path(path) as tmp:
        try:
            torch.save(payload, tmp)
        except RuntimeError as exc:  # torch's zip writer reports a full disk as RuntimeError, naming no file
            first = " ".join(str(exc).split())[-160:] or type(exc).__name__
            raise CheckpointError(f"cannot write checkpoint ({first})", path) from exc
    return Path(path)


def non_finite_weights(state_dict: dict) -> str | None:
    """``"<n> NaN/inf value(s) in <first tensor>"`` if any floating tensor is not finite, else None."""
    for name, tensor in state_dict.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point():
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                return f"{count} NaN/inf value(s) in {name}"
    return None


def _looks_like_torch_file(path: Path) -> bool:
    """Whether the file starts like something ``torch.load`` reads: a zip archive or a pickle (protocol >= 2).

    Only the first bytes are checked, so a truncated checkpoint still reaches ``torch.load`` and is reported as
    truncated; an empty file is reported as truncated too.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return True  # let torch.load report the read error
    return not head or head.startswith(b"\x80") or head == b"PK\x03\x04"


def read_checkpoint_payload(path: Path, map_location: Any) -> dict:
    """``torch.load(weights_only=True)`` with every failure turned into a one-line CheckpointError."""
    import pickle

    if not path.is_file():
        raise CheckpointError("checkpoint not found", path)
    if not _looks_like_torch_file(path):
        raise CheckpointError("not a checkpoint: neither a zip archive (torch.save) nor a pickle", path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError("refused to load: the file holds objects other than tensors and plain data "
                              "(weights_only load failed; it may run code)", path) from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"corrupt or truncated checkpoint ({first})", path) from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError("not a brats-cnn checkpoint (no 'format' marker)", path)
    version = payload.get("format_version")
    if version not in CHECKPOINT_KEYS_BY_VERSION:
        raise CheckpointError(f"checkpoint format version {version!r} is not supported "
                              f"(expected one of {sorted(CHECKPOINT_KEYS_BY_VERSION)})", path)
    keys = CHECKPOINT_KEYS_BY_VERSION[version]
    missing = sorted(keys - set(payload))
    if missing:
        raise CheckpointError(f"checkpoint is missing key '{missing[0]}'", path)
    unexpected = sorted(set(payload) - keys)
    if unexpected:
        raise CheckpointError(f"checkpoint has unexpected key '{unexpected[0]}'", path)
    return payload


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> Checkpoint:
    """Load and validate a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: missing file, truncated/corrupt file, unsafe pickle, another format
            version, a missing/unexpected key, or weights that do not fit the stored network.
    """
    from brats_cnn.config import config_from_dict

    path = Path(path)
    payload = read_checkpoint_payload(path, map_location)
    from brats_cnn.preprocessing.normalise import NormaliserState

    try:
        config = config_from_dict(payload["config"], str(path))
        normaliser = NormaliserState.from_dict(payload["normaliser"])
        network = build_network(config.model, int(payload["num_classes"]), patch_size=config.sampling.patch_size)
        if network.architecture != payload["architecture"]:
            raise ValueError(f"architecture {payload['architecture']!r} does not match the config's "
                             f"{network.architecture!r}")
        network.load_state_dict(payload["state_dict"], strict=True)
        bad = non_finite_weights(payload["state_dict"])
        if bad:
            raise CheckpointError(f"checkpoint has non-finite weights ({bad}); the run it comes from diverged",
                                  path)
        if str(payload["grade"]) not in GRADES or str(payload["grade"]) != config.grade:
            raise CheckpointError(f"checkpoint grade {payload['grade']!r} is not valid (expected "
                                  f"{' or '.join(GRADES)}, the grade of its config '{config.grade}')", path)
        order = [str(c) for c in payload["channel_order"]]
        if sorted(order) != sorted(CHANNELS) or tuple(order) != tuple(config.data.channel_order):
            raise CheckpointError(f"checkpoint channel order {order} is not valid (expected each of "
                                  f"{list(CHANNELS)} once, as in its config)", path)
    except CheckpointError:
        raise
    except Exception as exc:  # any inconsistency inside a well-formed file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"inconsistent checkpoint ({first})", path) from exc
    network.to(map_location).eval()
    return Checkpoint(network=network, config=config, grade=str(payload["grade"]),
                      label_convention=str(payload["label_convention"]),
                      channel_order=tuple(payload["channel_order"]), normaliser=normaliser,
                      epoch=int(payload["epoch"]), training_state=payload["training_state"],
                      format_version=int(payload["format_version"]), calibration=payload.get("calibration"))


def _run_difference(first: Checkpoint, other: Checkpoint) -> str | None:
    """What makes two checkpoints unfit to average (not the same network, data or preprocessing), or None."""
    a, b = first.network, other.network
    for what, mine, theirs in (
            ("architecture", a.architecture, b.architecture), ("number of classes", a.num_classes, b.num_classes),
            ("patch size", a.patch_size, b.patch_size), ("context", getattr(a, "context", 1), getattr(b, "context", 1)),
            ("grade", first.grade, other.grade),
            ("label convention", first.label_convention, other.label_convention),
            ("channel order", first.channel_order, other.channel_order)):
        if mine != theirs:
            return f"{what} {theirs!r}, not {mine!r}"
    if first.normaliser.to_dict() != other.normaliser.to_dict():
        return "another normaliser (Nyul landmarks / z-score statistics): trained on other data"
    return None


def average_checkpoints(paths: list[str | Path]) -> Checkpoint:
    """The equal-weight average of the weights of two or more checkpoints of one run.

    Stochastic weight averaging (Izmailov et al. 2018) over saved checkpoints, done by
    ``torch.optim.swa_utils.AveragedModel``: the network has no batch-norm statistics to refit.
    The result carries the first checkpoint's config and normaliser, the largest epoch, the class
    frequencies of the training cases (the same for every checkpoint of a run) and no training
    state; the prior correction, TTA and post-processing chosen for the checkpoints it came from need
    not suit it: calibrate it next.

    Raises:
        ConfigError: fewer than two checkpoints.
        CheckpointError: an unreadable checkpoint, or one of another network, grade, label
            convention, channel order or normaliser than the first (naming the file).
    """
    from torch.optim.swa_utils import AveragedModel

    if len(paths) < 2:
        raise ConfigError(f"averaging needs at least two checkpoints, got {len(paths)}")
    first = load_checkpoint(paths[0])
    averaged = AveragedModel(first.network)
    averaged.update_parameters(first.network)
    epoch = first.epoch
    for path in paths[1:]:
        other = load_checkpoint(path)
        difference = _run_difference(first, other)
        if difference:
            raise CheckpointError(f"cannot average with {paths[0]}: {difference}", path)
        averaged.update_parameters(other.network)
        epoch = max(epoch, other.epoch)
    network = averaged.module.eval()
    return Checkpoint(network=network, config=first.config, grade=first.grade,
                      label_convention=first.label_convention, channel_order=first.channel_order,
                      normaliser=first.normaliser, epoch=epoch, training_state=None,
                      format_version=CHECKPOINT_FORMAT_VERSION,
                      calibration={"class_frequencies": first.calibration["class_frequencies"]}
                      if first.calibration and "class_frequencies" in first.calibration else None)


def run_average(checkpoints: list[Path], out: Path) -> Path:
    """The ``brats-cnn average`` command: write the average of ``checkpoints`` to ``out`` atomically."""
    out = Path(out)
    if out.exists() and any(out.resolve() == Path(path).resolve() for path in checkpoints):
        raise ConfigError("--out would write over one of the checkpoints being averaged; choose another file", out)
    averaged = average_checkpoints(list(checkpoints))
    return save_checkpoint(out, network=averaged.network, config=averaged.config, normaliser=averaged.normaliser,
                           label_convention=averaged.label_convention, epoch=averaged.epoch,
                           calibration=averaged.calibration)
