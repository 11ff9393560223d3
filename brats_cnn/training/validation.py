"""What a training run measures and records: validation loss, accuracy and Dice, and its CSV files."""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from brats_cnn.config import Config
from brats_cnn.data.labels import REGIONS
from brats_cnn.device import Compute
from brats_cnn.fsutil import write_json_atomic, write_text_atomic
from brats_cnn.network.checkpoint import unwrap_network
from brats_cnn.training.loss import loss_function

log = logging.getLogger(__name__)


METRIC_COLUMNS = ("epoch", "step", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                  *(f"dice_{region}" for region in REGIONS), "score", "score_alpha", "epoch_seconds",
                  "patches_per_second")


@torch.no_grad()
def evaluate_patches(network: torch.nn.Module, loader: Any, compute: Compute,
                     config: Any = None) -> tuple[float, float]:
    """Mean :func:`loss_function` and accuracy over labelled patch batches (eval mode)."""
    network.eval()
    loss_sum = torch.zeros((), device=compute.device, dtype=torch.float64)
    correct = torch.zeros((), device=compute.device, dtype=torch.int64)
    count = 0
    for patches, labels in loader:
        labels = compute.batch(labels)
        with compute.autocast():
            logits = network(compute.batch(patches))
        loss_sum += loss_function(logits, labels, config).double() * labels.numel()
        correct += (logits.argmax(1) == labels).sum()
        count += labels.numel()
    if count == 0:
        return math.nan, math.nan
    return loss_sum.item() / count, correct.item() / count


def dice_slice_indices(mask: np.ndarray, count: int) -> np.ndarray:
    """``count`` evenly spaced axial indices over the slices of ``mask (Z, X, Y)`` holding brain (all if 0)."""
    brain = np.flatnonzero(np.asarray(mask).any(axis=(1, 2)))
    if count <= 0 or count >= brain.size:
        return brain
    return np.unique(brain[np.round(np.linspace(0, brain.size - 1, count)).astype(int)])


def validation_dice(network: torch.nn.Module, folders: Sequence[Path], config: Config, compute: Compute,
                    frequencies: Sequence[float] | None = None) -> dict[float, dict[str, dict[str, float]]]:
    """Dice of complete/core/enhancing of each validation case, per prior-correction exponent.

    Uses :func:`brats_cnn.inference.predict.predict_fast` on whole volumes (``train.dice_slices = 0``, the
    default) or on that many evenly spaced brain slices per case; the networks are 2-D, so a slice's
    prediction does not depend on which other slices are predicted. No post-processing.

    Returns:
        ``{alpha: {case id: {region: Dice}}}`` (case ids in the order of ``folders``) for ``alpha = 0``
        (the network's own output) and, when the training class ``frequencies`` are given, every
        ``train.selection_alphas`` value (the prior correction of :mod:`brats_cnn.inference.calibrate`, which
        ``calibrate`` later tunes on the same cases). :func:`mean_dice` averages over the cases.
    """
    from brats_cnn.data.labels import classify
    from brats_cnn.inference.calibrate import region_dice
    from brats_cnn.inference.predict import predict_fast
    from brats_cnn.inference.prior import apply_class_prior
    from brats_cnn.preprocessing.cache import load_cached_case

    convention = config.data.label_convention
    if frequencies is not None and min(frequencies) <= 0:  # a class absent from training: no prior to correct to
        log.info("a class has no training voxels; validation Dice without prior correction only")
        frequencies = None
    alphas = sorted({0.0, *(config.train.selection_alphas if frequencies is not None else ())})
    scores: dict[float, dict[str, dict[str, float]]] = {a: {} for a in alphas}
    plain = unwrap_network(network)
    was_training = plain.training
    for folder in folders:
        case = load_cached_case(folder)
        slices = dice_slice_indices(case.mask, config.train.dice_slices)
        image = np.transpose(case.image[slices], (1, 2, 3, 0)).astype(np.float32)  # (z,4,X,Y) -> (4,X,Y,z)
        mask = np.transpose(case.mask[slices], (1, 2, 0))
        truth = np.transpose(case.label[slices], (1, 2, 0))
        probabilities = predict_fast(plain, image, mask, compute=compute, batch_size=config.segment.batch_size,
                                     slices_per_batch=config.segment.slices_per_batch,
                                     background_value=config.preprocess.background_value)
        for alpha in alphas:
            corrected = apply_class_prior(probabilities, frequencies, alpha) if alpha else probabilities
            classes = classify(corrected, convention, config.segment.decision)
            scores[alpha][folder.name] = region_dice(classes, truth, convention)
    plain.train(was_training)
    return scores


def mean_dice(per_case: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{region: mean Dice}`` over the cases of one :func:`validation_dice` entry."""
    return {region: float(np.mean([dice[region] for dice in per_case.values()])) for region in REGIONS}


def write_metrics(out: Path, history: list[dict]) -> None:
    """Rewrite ``metrics.csv`` and ``metrics.json`` from the full history (atomically)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(out / "metrics.csv", buffer.getvalue())
    write_json_atomic(out / "metrics.json", history)


def write_step_losses(out: Path, rows: list[tuple[int, float, float]]) -> None:
    """Rewrite ``steps.csv`` (step, lr, loss) from all iterations so far (atomically)."""
    text = "step,lr,loss\n" + "".join(f"{step},{lr:.8g},{loss:.6g}\n" for step, lr, loss in rows)
    write_text_atomic(out / "steps.csv", text)


def read_step_losses(out: Path, last_step: int) -> list[tuple[int, float, float]]:
    try:
        lines = (out / "steps.csv").read_text().splitlines()[1:]
    except OSError:
        return []
    rows = [(int(a), float(b), float(c)) for a, b, c in (line.split(",") for line in lines)]
    return [row for row in rows if row[0] <= last_step]


def read_history(out: Path, last_step: int) -> list[dict]:
    import json

    try:
        history = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return []
    return [row for row in history if row.get("step", math.inf) <= last_step]


def json_float(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)
