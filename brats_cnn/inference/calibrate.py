"""Output calibration chosen on validation cases: the class-prior correction, test-time augmentation
and post-processing (the ``brats-cnn calibrate`` command).

The networks are trained on class-balanced patches, so their softmax estimates the posterior under a
uniform class prior; inside a real brain, background and edema are far more frequent than necrosis
or enhancing tumour. Bayes' rule gives the posterior under the true prior ``pi``:
``p(c | x) ~ p_balanced(c | x) * pi_c``. :func:`apply_class_prior` applies ``pi_c ** alpha``: ``alpha``
= 0 leaves the network's output alone, 1 is the full correction; the best value lies in between
and is chosen on validation cases (the sampling is only approximately uniform, and the network is
not a perfect estimator). ``pi`` is the training cases' class frequencies, or (``segment.prior_adapt``)
each case's own prior, estimated from them by EM (:func:`estimate_case_prior`).

:func:`run_calibrate` reads a training run folder, predicts every validation case once per
test-time-augmentation setting, and picks the ``alpha`` x prior x TTA x decision rule x
post-processing combination with the best mean validation Dice; it writes a calibrated checkpoint
whose config holds the choice (``segment.prior_alpha``, ``segment.prior_adapt``,
``segment.tta_rotations``, ``segment.decision``, ``postprocess.keep_largest``) and whose
``calibration`` holds the class frequencies and the whole validation table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from brats_cnn.data.labels import DECISIONS, REGIONS, classify, from_class_indices, get_convention, region_masks
from brats_cnn.errors import CheckpointError, ConfigError, InputError
from brats_cnn.inference.prior import class_frequencies, correct_class_prior

log = logging.getLogger(__name__)

# 0 = no correction, 1 = the Bayes correction for a perfectly calibrated balanced-prior network; the grid
# goes beyond 1 because an under-trained network is under-confident (measured: the validation optimum of
# an early v3 checkpoint was at the grid's end when it stopped at 1)
ALPHAS: tuple[float, ...] = tuple(round(a, 2) for a in np.arange(0.0, 2.01, 0.1))
TTA_SETTINGS: dict[str, tuple[int, ...]] = {"none": (0,), "rot90": (0, 90, 180, 270)}
CALIBRATED_NAME = "calibrated.pt"


# ---- pure functions ----------------------------------------------------------------------------









def region_dice(classes: np.ndarray, truth: np.ndarray, convention: str) -> dict[str, float]:
    """Dice of complete/core/enhancing between two ``(X, Y, Z)`` class-index maps."""
    from brats_cnn.evaluation.metrics import dice

    predicted = region_masks(from_class_indices(classes, convention), convention)
    reference = region_masks(from_class_indices(truth, convention), convention)
    return {region: dice(reference[region], predicted[region]) for region in REGIONS}


def region_mean(dice_by_region: dict[str, float]) -> float:
    """The mean over the regions of one ``{region: Dice}``: the score calibration and model selection rank by."""
    return float(np.mean([dice_by_region[region] for region in REGIONS]))


@dataclass(frozen=True)
class Choice:
    """One calibration setting and its mean validation Dice."""

    alpha: float
    tta: str
    keep_largest: bool
    decision: str
    dice: dict
    score: float
    prior_adapt: bool = False


def score_settings(probabilities: dict[str, list[np.ndarray]], truths: list[np.ndarray], masks: list[np.ndarray],
                   frequencies: np.ndarray, postprocess: Any, convention: str,
                   alphas: Sequence[float] = ALPHAS, decisions: Sequence[str] = DECISIONS,
                   adapts: Sequence[bool] = (False, True)) -> list[Choice]:
    """Mean validation Dice of every ``alpha`` x prior (training or adapted) x TTA setting x decision
    rule x keep-largest combination (the adapted prior only for ``alpha`` > 0, where it differs).

    Args:
        probabilities: per TTA setting name, the ``(C, X, Y, Z)`` probabilities of each case.
        truths: the ``(X, Y, Z)`` class indices of each case.
        masks: the ``(X, Y, Z)`` brain mask of each case (where the adapted prior is estimated).
        frequencies: training class frequencies.
        postprocess: a ``PostprocessConfig`` (``keep_largest`` is varied, the rest applied as is).
        adapts: the ``segment.prior_adapt`` values to try.
    """
    from dataclasses import replace

    from brats_cnn.inference.postprocess import postprocess_labels

    choices = []
    for tta, per_case in probabilities.items():
        for alpha, adapt in ((a, d) for a in alphas for d in adapts if a > 0 or not d):
            corrected = [correct_class_prior(p, m, frequencies, alpha, adapt)[0] for p, m in zip(per_case, masks)]
            for decision in decisions:
                classes = [classify(p, convention, decision) for p in corrected]
                for keep_largest in (False, True):
                    config = replace(postprocess, keep_largest=keep_largest)
                    scores = [region_dice(postprocess_labels(c, config, convention=convention), t, convention)
                              for c, t in zip(classes, truths)]
                    mean = {region: float(np.mean([s[region] for s in scores])) for region in REGIONS}
                    choices.append(Choice(float(alpha), tta, keep_largest, decision, mean, region_mean(mean), adapt))
    return choices


def best_choice(choices: Sequence[Choice]) -> Choice:
    """The highest score; ties go to the simpler setting (no TTA, argmax, the training prior, no
    keep-largest, smaller alpha)."""
    return max(choices, key=lambda c: (round(c.score, 6), c.tta == "none", c.decision == "argmax",
                                       not c.prior_adapt, not c.keep_largest, -c.alpha))


# ---- the command ---------------------------------------------------------------------------------

# the settings calibrate chooses; --fixed may set only these (the class weights and t_vol: chosen by
# cross-validation, pipelines/cross_validate.py)
CALIBRATION_KEYS = ("segment.prior_alpha", "segment.prior_adapt", "segment.tta_rotations", "segment.tta",
                    "segment.decision", "segment.class_weights", "postprocess.keep_largest",
                    "postprocess.min_component_voxels", "postprocess.never_empty", "postprocess.require_core")


def _refuse_to_overwrite(run: Path, model: Path, out: Path) -> None:
    """ConfigError if ``out`` or ``<out>.json`` is the checkpoint being calibrated or the run's last/best.pt."""
    from brats_cnn.network.checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT

    for name, source in (("the checkpoint being calibrated", model), ("the run's last.pt", run / LAST_CHECKPOINT),
                         ("the run's best.pt", run / BEST_CHECKPOINT)):
        if out.resolve() == source.resolve() or out.with_suffix(".json").resolve() == source.resolve():
            raise ConfigError(f"--out would write over {name} ({source}); choose another file", out)


def write_fixed_calibration(run: Path, model: Path, out: Path, settings: Sequence[str]) -> dict:
    """Write ``model`` with calibration settings given in advance (``calibrate --fixed``), no search.

    For a model trained on every case (no validation cases), with the settings chosen on validation
    cases by an earlier run of the same recipe. The class frequencies are the ones ``train`` stored
    in the checkpoint (its own training cases).

    Args:
        run: the ``train`` run folder (its ``last.pt`` and ``best.pt`` are never written over).
        model: the checkpoint (it must carry class frequencies).
        out: the calibrated checkpoint; ``<out>.json`` gets the settings.
        settings: ``key=value`` strings, keys from :data:`CALIBRATION_KEYS`.

    Returns:
        The summary written next to ``out``.
    """
    from brats_cnn.config import config_to_dict, load_config, parse_overrides
    from brats_cnn.fsutil import write_json_atomic
    from brats_cnn.network.checkpoint import load_checkpoint, save_checkpoint

    run, out, model = Path(run), Path(out), Path(model)
    parse_overrides(list(settings))  # one-line errors for malformed items
    unknown = [key for key in (item.split("=", 1)[0].strip() for item in settings) if key not in CALIBRATION_KEYS]
    if unknown:
        raise ConfigError(f"--fixed sets only {', '.join(CALIBRATION_KEYS)}; got '{unknown[0]}'", "--fixed")
    _refuse_to_overwrite(run, model, out)
    checkpoint = load_checkpoint(model)
    frequencies = (checkpoint.calibration or {}).get("class_frequencies")
    if not frequencies:
        raise CheckpointError("has no class frequencies (checkpoints written by train carry them); "
                              "--fixed cannot calibrate it", model)
    config = load_config(None, list(settings), base=config_to_dict(checkpoint.config))
    summary = {"model": str(model), "fixed": list(settings), "class_frequencies": list(frequencies),
               "validation_cases": []}
    save_checkpoint(out, network=checkpoint.network, config=config, normaliser=checkpoint.normaliser,
                    label_convention=checkpoint.label_convention, epoch=checkpoint.epoch, training_state=None,
                    calibration={"class_frequencies": list(frequencies), "validation_cases": [],
                                 "fixed": list(settings)})
    write_json_atomic(out.with_suffix(".json"), summary)
    log.info("wrote %s with the fixed calibration %s", out, ", ".join(settings))
    return summary


def _validation_cases(run: Path, cache: Path) -> tuple[list[Path], list[Path]]:
    """Training and validation cache folders recorded in the run's ``last.pt``."""
    from brats_cnn.network.checkpoint import LAST_CHECKPOINT, load_checkpoint

    state = load_checkpoint(run / LAST_CHECKPOINT).training_state or {}
    train_ids, val_ids = state.get("train_cases"), state.get("validation_cases")
    if not train_ids or not val_ids:
        raise CheckpointError("last.pt records no training or no validation cases; calibration needs both "
                              "(train with data.validation_cases >= 1)", run / LAST_CHECKPOINT)
    missing = [c for c in [*train_ids, *val_ids] if not (cache / c).is_dir()]
    if missing:
        raise InputError(f"case '{missing[0]}' of the run is not in the cache", cache)
    return [cache / c for c in train_ids], [cache / c for c in val_ids]


def run_calibrate(run: Path, model: Path | None = None, out: Path | None = None, cache: Path | None = None,
                  device: str = "auto", tta: bool = True) -> dict:
    """Choose the prior correction, TTA and post-processing on the run's validation cases.

    Args:
        run: a ``train`` run folder (``last.pt`` lists the cases; ``best.pt`` is calibrated by default).
        model: the checkpoint to calibrate (default ``<run>/best.pt``).
        out: the calibrated checkpoint (default ``<run>/calibrated.pt``); ``<out>.json`` gets the table.
        cache: the preprocessed cache of the run's cases (default ``<run>/cache``).
        device: ``auto``, ``cpu`` or ``cuda``.
        tta: also try averaging over the four 90-degree rotations (4x the prediction time).

    Returns:
        The summary written next to ``out``: the choice, its Dice, and every setting's scores.
    """
    import dataclasses

    from brats_cnn.config import config_from_dict, config_to_dict
    from brats_cnn.device import compute_settings, resolve_device
    from brats_cnn.fsutil import write_json_atomic
    from brats_cnn.inference.predict import predict
    from brats_cnn.network.checkpoint import BEST_CHECKPOINT, load_checkpoint, save_checkpoint
    from brats_cnn.preprocessing.cache import cases_label_mask, load_cached_case

    run = Path(run)
    model = Path(model) if model else run / BEST_CHECKPOINT
    out = Path(out) if out else run / CALIBRATED_NAME
    cache = Path(cache) if cache else run / "cache"
    _refuse_to_overwrite(run, model, out)
    checkpoint = load_checkpoint(model)
    train_dirs, val_dirs = _validation_cases(run, cache)
    convention = checkpoint.label_convention
    num_classes = get_convention(convention).num_classes
    frequencies = class_frequencies(cases_label_mask(train_dirs), num_classes)
    log.info("class frequencies in the brain of %d training case(s): %s", len(train_dirs),
             np.round(frequencies, 5).tolist())

    device_ = resolve_device(device)
    settings = {name: rotations for name, rotations in TTA_SETTINGS.items() if tta or name == "none"}
    probabilities: dict[str, list[np.ndarray]] = {name: [] for name in settings}
    truths, masks = [], []
    for folder in val_dirs:
        case = load_cached_case(folder)
        image = np.transpose(np.asarray(case.image, dtype=np.float32), (1, 2, 3, 0))  # (Z,4,X,Y) -> (4,X,Y,Z)
        mask = np.transpose(np.asarray(case.mask), (1, 2, 0))
        masks.append(mask)
        truths.append(np.transpose(np.asarray(case.label), (1, 2, 0)))
        for name, rotations in settings.items():
            config = dataclasses.replace(checkpoint.config, segment=dataclasses.replace(
                checkpoint.config.segment, tta_rotations=rotations))
            probabilities[name].append(predict(checkpoint.network, image, mask, "fast", device_, config))
        log.info("validation case %s predicted (%s)", folder.name, ", ".join(settings))
    choices = score_settings(probabilities, truths, masks, frequencies, checkpoint.config.postprocess, convention)
    best = best_choice(choices)
    baseline = next(c for c in choices
                    if c.alpha == 0 and c.tta == "none" and not c.keep_largest and c.decision == "argmax")
    log.info("chosen: alpha %.1f, prior_adapt %s, tta %s, decision %s, keep_largest %s: validation Dice %s "
             "(uncalibrated %s)", best.alpha, best.prior_adapt, best.tta, best.decision, best.keep_largest,
             {k: round(v, 4) for k, v in best.dice.items()}, {k: round(v, 4) for k, v in baseline.dice.items()})

    values = config_to_dict(checkpoint.config)
    values["segment"].update(prior_alpha=best.alpha, prior_adapt=best.prior_adapt,
                             tta_rotations=list(settings[best.tta]), decision=best.decision)
    values["postprocess"]["keep_largest"] = best.keep_largest
    summary = {
        "model": str(model), "validation_cases": [p.name for p in val_dirs],
        "train_cases": [p.name for p in train_dirs], "class_frequencies": frequencies.tolist(),
        "chosen": dataclasses.asdict(best), "uncalibrated": dataclasses.asdict(baseline),
        "compute": compute_settings(device_, checkpoint.config.compute).precision,
        "table": [dataclasses.asdict(c) for c in choices],
    }
    save_checkpoint(out, network=checkpoint.network, config=config_from_dict(values), normaliser=checkpoint.normaliser,
                    label_convention=convention, epoch=checkpoint.epoch, training_state=None,
                    calibration={"class_frequencies": frequencies.tolist(),
                                 "validation_cases": summary["validation_cases"],
                                 "validation_dice": best.dice, "uncalibrated_dice": baseline.dice})
    write_json_atomic(out.with_suffix(".json"), summary)
    return summary
