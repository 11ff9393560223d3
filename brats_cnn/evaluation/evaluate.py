"""``brats-cnn evaluate``: match predictions to ground truth, score every case, write the report.

Matching (by case id):

* Predictions: a single file, or a folder holding ``<ID>.nii.gz``, ``<ID>_seg.nii.gz`` or
  ``<ID>-seg.nii.gz`` (``.nii`` and ``.mha`` too), or case folders ``<ID>/`` holding one of those
  names (or exactly one label file).
* Ground truth: anything :func:`brats_cnn.data.layouts.list_cases` reads (the label map of each case), a
  dataset whose images are incomplete (only label maps are needed), a folder of label files named
  like predictions, or a single label file.

A case with ground truth but no prediction is scored as an empty prediction and flagged, as the
challenge does (one warning line gives their count; ``only_predicted`` leaves them out);
predictions without ground truth are listed, not scored. Lesion-wise metrics (BraTS 2023+) are
computed with a challenge preset (default ``gli``). :func:`run_compare` scores two or more
prediction folders on the same cases and compares them (:mod:`brats_cnn.evaluation.compare`). A case whose files
cannot be read, hold labels outside their convention, or whose prediction is on another voxel
grid (shape, or affine beyond :data:`brats_cnn.data.io.AFFINE_TOLERANCE_MM` /
:data:`brats_cnn.data.io.DIRECTION_TOLERANCE`) is listed as a failure and the others are still scored.
The report is written first; then, if any case failed, :class:`~brats_cnn.errors.InputError` is
raised so that the command exits non-zero (code 2).
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brats_cnn import __version__
from brats_cnn.data import io, layouts
from brats_cnn.data.labels import REGIONS, get_convention, region_masks
from brats_cnn.errors import BratsCnnError, InputError
from brats_cnn.evaluation.metrics import (
    HD95_DEFINITIONS,
    LESION_HD95_PENALTY,
    LESION_PRESETS,
    LesionWiseParams,
    region_metrics,
)
from brats_cnn.evaluation.pairing import (
    CaseFailure,
    GroundTruth,
    _image_refs,
    _pair,
    find_ground_truth,
    find_predictions,
    label_file_case_id,
)
from brats_cnn.fsutil import staged_folder

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Scoring one case
# ----------------------------------------------------------------------------------------------

def check_same_geometry(case_id: str, gt: io.LabelMap, pred: io.LabelMap) -> None:
    """Raise :class:`InputError` (naming the case and the prediction file) unless both share a voxel grid."""
    if gt.labels.shape != pred.labels.shape:
        raise InputError(f"case {case_id}: prediction shape {pred.labels.shape} differs from ground truth "
                         f"{gt.labels.shape} ({gt.source})", pred.source)
    mm, direction, same = io.affine_difference(pred.affine, gt.affine)
    if not same:
        raise InputError(f"case {case_id}: prediction affine differs from the ground truth's ({gt.source}) by "
                         f"{mm:.3g} mm in origin/spacing and {direction:.3g} in direction cosines (tolerance "
                         f"{io.AFFINE_TOLERANCE_MM:g} mm, {io.DIRECTION_TOLERANCE:g}); resample the prediction "
                         "onto the ground-truth grid", pred.source)


def score_case(case_id: str, gt_path: Path, pred_path: Path | None, *, label_convention: str,
               pred_convention: str, hd95_definition: str = "brats",
               lesion_params: LesionWiseParams | None = None
               ) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
    """Read one case's label maps and compute every metric per region.

    Regions are taken from each map in its own convention (see ``metrics.region_metrics``). A
    missing prediction (``pred_path`` None) is scored as an empty one. With ``lesion_params`` the
    rows also hold the lesion-wise metrics and counts (``metrics.lesion_wise_metrics``).

    Returns:
        ``(rows, gt_labels, pred_labels)``: three rows (one per region) with the columns of
        ``metrics.csv``; the two ``(X, Y, Z)`` int16 label maps (for figures).

    Raises:
        InputError: unreadable file, labels outside the convention, geometry mismatch.
    """
    gt = io.load_label_map(gt_path, label_convention=label_convention)
    if pred_path is None:
        pred_labels = np.zeros_like(gt.labels)
    else:
        pred = io.load_label_map(pred_path, label_convention=pred_convention)
        check_same_geometry(case_id, gt, pred)
        pred_labels = pred.labels
    by_region = region_metrics(gt.labels, pred_labels, label_convention, gt.spacing, hd95_definition,
                               pred_convention=pred_convention, lesion_params=lesion_params)
    rows = [{"case_id": case_id, "region": region, **by_region[region], "missing_prediction": pred_path is None}
            for region in REGIONS]
    return rows, gt.labels, pred_labels


def _flair_slice(ref: layouts.CaseRef, z: int) -> np.ndarray:
    """One axial FLAIR slice ``(X, Y)`` float32 of a case (reads only that slice where it can)."""
    flair = ref.image_paths[-1]
    if ref.layout in ("brats2017", "brats2023", "nnunet") and len(ref.image_paths) == 4:
        import nibabel as nib

        return np.asarray(nib.load(flair).dataobj[:, :, z], dtype=np.float32)
    case = io.load_case(ref, load_label=False)
    return case.image[3, :, :, z]


def _overlay(case_id: str, ref: layouts.CaseRef, gt_labels: np.ndarray, pred_labels: np.ndarray,
             label_convention: str, pred_convention: str, rows: list[dict[str, Any]]) -> bytes | None:
    from brats_cnn.evaluation import report

    gt_regions = region_masks(gt_labels, label_convention)
    z = report.largest_cross_section(gt_regions["complete"] if gt_regions["complete"].any()
                                     else region_masks(pred_labels, pred_convention)["complete"])
    try:
        flair = _flair_slice(ref, z)
    except (BratsCnnError, OSError, ValueError, EOFError) as exc:
        log.warning("%s: no overlay (%s)", case_id, exc)
        return None
    if flair.shape != gt_labels.shape[:2]:
        log.warning("%s: no overlay (FLAIR slice %s does not match the label map %s)", case_id, flair.shape,
                    gt_labels.shape[:2])
        return None
    pred_regions = region_masks(pred_labels[:, :, z], pred_convention)
    dsc = " / ".join(f"{r['dsc']:.2f}" for r in rows)
    title = f"{case_id}  (slice z={z}; DSC complete/core/enh {dsc})"
    return report.overlay_png(flair, {k: v[:, :, z] for k, v in gt_regions.items()}, pred_regions, title)


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------

NO_LESION_WISE = ("none", "off")


@dataclass(frozen=True)
class EvaluateSettings:
    """How every case is scored (validated once, before anything is read)."""

    label_convention: str
    pred_convention: str
    hd95_definition: str = "brats"
    lesion_preset: str | None = None    # the name reported: "gli", "met (changed)"...; None: no lesion-wise metrics
    lesion_params: LesionWiseParams | None = None
    only_predicted: bool = False

    def as_dict(self) -> dict[str, Any]:
        lesion = None if self.lesion_params is None else {
            "preset": self.lesion_preset, "dilation": self.lesion_params.dilation,
            "min_volume_mm3": self.lesion_params.min_volume_mm3, "hd95_penalty_mm": LESION_HD95_PENALTY,
            "hd95_definition": self.lesion_params.hd95_definition,
            "connectivity": 26}
        return {"label_convention": self.label_convention, "pred_convention": self.pred_convention,
                "hd95_definition": self.hd95_definition, "hd95_definition_text": HD95_DEFINITIONS[self.hd95_definition],
                "hd95_unit": "mm", "volume_unit": "ml", "lesion_wise": lesion, "only_predicted": self.only_predicted}


def evaluate_settings(label_convention: str = "brats2017", pred_convention: str | None = None,
                      hd95_definition: str = "brats", lesion_wise: str | None = None,
                      lesion_dilation: int | None = None, lesion_min_volume: float | None = None,
                      only_predicted: bool = False, config: str | Path | None = None,
                      overrides: list[str] | tuple[str, ...] = ()) -> EvaluateSettings:
    """Validate the scoring options.

    Args:
        lesion_wise: a preset of :data:`brats_cnn.evaluation.metrics.LESION_PRESETS` (``gli``, ``ssa``,
            ``ped``, ``men``, ``met``), or ``none`` for no lesion-wise metrics; None: the config's
            ``evaluate.lesion_wise.preset`` (``gli`` by default).
        lesion_dilation, lesion_min_volume: override the preset's dilation (voxels) and volume
            threshold (mm^3); None: the config's ``evaluate.lesion_wise.dilation`` and
            ``min_volume_mm3`` (null there: the preset's).
        config, overrides: a YAML config (file or bundled name) and ``--set key=value`` strings,
            read for the ``evaluate`` section; the arguments above win over them.

    Raises:
        InputError: an unknown convention, HD95 definition or preset, or a negative override.
        ConfigError: a bad config file or value (one line naming the key).
    """
    from brats_cnn.config import check_value, load_config

    if lesion_dilation is not None:
        check_value("evaluate.lesion_wise.dilation", lesion_dilation, "--lesion-dilation")
    if lesion_min_volume is not None:
        check_value("evaluate.lesion_wise.min_volume_mm3", float(lesion_min_volume), "--lesion-min-volume")
    lesion_config = load_config(config, overrides).evaluate.lesion_wise
    lesion_wise = lesion_config.preset if lesion_wise is None else lesion_wise
    lesion_dilation = lesion_config.dilation if lesion_dilation is None else lesion_dilation
    lesion_min_volume = lesion_config.min_volume_mm3 if lesion_min_volume is None else lesion_min_volume
    pred_convention = pred_convention or label_convention
    get_convention(label_convention), get_convention(pred_convention)  # fail early on a typo
    if hd95_definition not in HD95_DEFINITIONS:
        raise InputError(f"unknown HD95 definition '{hd95_definition}' (expected one of {list(HD95_DEFINITIONS)})")
    preset, params = None, None
    if lesion_wise.lower() not in NO_LESION_WISE:
        if lesion_wise.lower() not in LESION_PRESETS:
            raise InputError(f"unknown lesion-wise preset '{lesion_wise}' (expected one of "
                             f"{list(LESION_PRESETS)} or none)")
        preset, params = lesion_wise.lower(), LESION_PRESETS[lesion_wise.lower()]
        if lesion_dilation is not None or lesion_min_volume is not None:
            if (lesion_dilation or 0) < 0 or (lesion_min_volume or 0) < 0:
                raise InputError(f"lesion dilation ({lesion_dilation}) and minimum volume ({lesion_min_volume}) "
                                 "must not be negative")
            params = LesionWiseParams(params.dilation if lesion_dilation is None else int(lesion_dilation),
                                      params.min_volume_mm3 if lesion_min_volume is None else float(lesion_min_volume),
                                      params.hd95_definition)
            preset = f"{preset} (changed)"
    return EvaluateSettings(label_convention, pred_convention, hd95_definition, preset, params, only_predicted)


# ----------------------------------------------------------------------------------------------
# Scoring a folder
# ----------------------------------------------------------------------------------------------

@dataclass
class FolderScores:
    """The result of scoring one prediction folder against the ground truth."""

    rows: list[dict[str, Any]]
    failures: list[CaseFailure]
    missing: list[str]          # ground truth without prediction (scored as empty unless only_predicted)
    extra: list[str]            # predictions without ground truth (not scored)
    seconds: dict[str, float]
    figures: dict[str, bytes]


def score_folder(pred: str | Path, truths: list[GroundTruth], settings: EvaluateSettings, *,
                 image_refs: dict[str, layouts.CaseRef] | None = None, overlays: bool = True,
                 max_overlays: int = 200, workers: int | None = None) -> FolderScores:
    """Score every ground-truth case against its prediction in ``pred``; failures are collected, not raised.

    ``workers`` processes score cases in parallel (None: one per usable CPU; 1: in this process).

    Raises:
        InputError: ``pred`` does not exist or holds no prediction file.
    """
    predictions, failures = _pair(pred, *find_predictions(pred), truths)
    failed_ids = {f.case_id for f in failures}
    extra = sorted(set(predictions) - {t.case_id for t in truths})
    if extra:  # a typo in a file name must not pass as a missing case silently (summary.json: extra_predictions)
        log.warning("%d prediction file(s) in %s match no ground-truth case and are not scored (unmatched): %s",
                    len(extra), pred, ", ".join(predictions[c].name for c in extra[:10])
                    + (", ..." if len(extra) > 10 else ""))
    missing = [t.case_id for t in truths if t.case_id not in predictions and t.case_id not in failed_ids]
    if missing:
        scored = len(truths) - len(missing) - len(failed_ids)
        log.warning("%d of %d ground-truth cases have no prediction in %s: %s", len(missing), len(truths), pred,
                    "left out (--only-predicted)" if settings.only_predicted else
                    f"scored as empty predictions (DSC 0) as BraTS does; --only-predicted scores only the "
                    f"{scored} predicted case(s)")
    result = FolderScores([], failures, missing, extra, {}, {})
    tasks = []
    for truth in truths:
        if truth.case_id in failed_ids or (settings.only_predicted and truth.case_id in missing):
            continue
        image_ref = (image_refs or {}).get(truth.case_id) if overlays else None
        with_figure = image_ref is not None and sum(t[3] is not None for t in tasks) < max_overlays
        tasks.append((truth, predictions.get(truth.case_id), settings, image_ref if with_figure else None))
    for part, records in _map_cases(_score_task, tasks, workers):
        for record in records:  # a worker's log lines, in case order
            log.handle(record)
        result.failures += part.failures
        result.seconds.update(part.seconds)
        result.rows += part.rows
        result.figures.update(part.figures)
    return result


def default_workers() -> int:
    """Processes for scoring cases in parallel: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _map_cases(function: Any, tasks: list, workers: int | None) -> list:
    """``[function(task) for task in tasks]``, in order, over ``workers`` processes (None: every CPU).

    Cases are independent (each reads its own two files), so the second core scores another case;
    the results come back in the input order, so reports do not depend on the number of workers.
    """
    workers = default_workers() if workers is None else max(1, int(workers))
    workers = min(workers, len(tasks))
    if workers <= 1:
        return [function(task) for task in tasks]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(function, tasks, chunksize=1))


class _Collect(logging.Handler):
    """Keeps log records (message already formatted) for the parent process to emit."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args, record.exc_info = record.getMessage(), None, None
        self.records.append(record)


def _score_task(task: tuple) -> "tuple[FolderScores, list[logging.LogRecord]]":
    """One case scored into its own :class:`FolderScores` (a picklable unit of work for :func:`_map_cases`),
    with its log records, which the caller emits: a worker process writes nothing to the terminal itself."""
    truth, pred_path, settings, image_ref = task
    part = FolderScores([], [], [], [], {}, {})
    collect, handlers, propagate = _Collect(), log.handlers[:], log.propagate
    log.handlers, log.propagate = [collect], False
    try:
        _score_one(truth, pred_path, settings, part, image_ref)
    finally:
        log.handlers, log.propagate = handlers, propagate
    return part, collect.records


def _score_one(truth: GroundTruth, pred_path: Path | None, settings: EvaluateSettings, result: FolderScores,
               image_ref: layouts.CaseRef | None) -> None:
    """Score one case into ``result`` (rows, seconds, figure) or record its failure."""
    if truth.label_path is None:
        result.failures.append(CaseFailure(truth.case_id, f"case {truth.case_id}: no ground-truth label map"))
        return
    start = time.perf_counter()
    try:
        rows, gt_labels, pred_labels = score_case(
            truth.case_id, truth.label_path, pred_path, label_convention=settings.label_convention,
            pred_convention=settings.pred_convention, hd95_definition=settings.hd95_definition,
            lesion_params=settings.lesion_params)
    except BratsCnnError as exc:
        message = str(exc) if truth.case_id in str(exc) else f"case {truth.case_id}: {exc}"
        log.error("%s", message)
        result.failures.append(CaseFailure(truth.case_id, message))
        return
    result.seconds[truth.case_id] = time.perf_counter() - start
    result.rows += rows
    if image_ref is not None:
        png = _overlay(truth.case_id, image_ref, gt_labels, pred_labels, settings.label_convention,
                       settings.pred_convention, rows)
        if png is not None:
            result.figures[truth.case_id] = png
    if pred_path is None:
        log.info("%s: no prediction, scored as an empty one (%.2f s)", truth.case_id, result.seconds[truth.case_id])
    else:
        log.info("%s scored in %.2f s", truth.case_id, result.seconds[truth.case_id])


def folder_summary(pred: str | Path, gt: str | Path, truths: list[GroundTruth], settings: EvaluateSettings,
                   scores: FolderScores) -> dict[str, Any]:
    """The ``summary.json`` dictionary of one scored folder."""
    from brats_cnn.evaluation import report

    grades = {t.case_id: t.grade for t in truths}
    scored_ids = sorted({r["case_id"] for r in scores.rows})
    return {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "version": __version__,
        "pred": str(pred), "gt": str(gt),
        **settings.as_dict(),
        "n_cases_scored": len(scored_ids),
        "n_ground_truth_cases": len(truths),
        "missing_predictions": [c for c in scores.missing if c in scored_ids],
        "not_scored_without_prediction": [c for c in scores.missing if c not in scored_ids],
        "extra_predictions": scores.extra,
        "failures": [{"case_id": f.case_id, "error": f.error} for f in scores.failures],
        "grades": {c: grades[c] for c in scored_ids},
        "statistics": report.summarise(scores.rows, grades),
        "lesion_counts": report.lesion_counts(scores.rows) if settings.lesion_params is not None else None,
        "reference_pereira2016": report.PAPER_REFERENCE,
        "seconds_per_case": {c: round(s, 4) for c, s in scores.seconds.items()},
    }


def write_folder_report(out: str | Path, summary: dict[str, Any], scores: FolderScores) -> None:
    """Write ``metrics.csv``, ``summary.json`` and ``report.html`` of one folder into ``out``."""
    from brats_cnn.evaluation import report

    out = Path(out)
    report.write_metrics_csv(scores.rows, out / "metrics.csv")
    report.write_summary_json(summary, out / "summary.json")
    boxplot = report.boxplot_png(scores.rows, summary["grades"]) if scores.rows else None
    report.write_report_html(out / "report.html", summary, scores.rows, boxplot=boxplot, overlays=scores.figures)


def _raise_for_failures(failures: list[CaseFailure], n_scored: int, out: Path) -> None:
    if failures:
        names = ", ".join(f.case_id for f in failures[:5]) + (", ..." if len(failures) > 5 else "")
        raise InputError(f"{len(failures)} case(s) could not be scored ({names}); the other "
                         f"{n_scored} are in the report, the failures are listed in summary.json and "
                         "report.html", out)


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------

def run_evaluate(pred: str | Path, gt: str | Path, out: str | Path = "evaluation", label_convention: str = "brats2017",
                 pred_convention: str | None = None, manifest: str | Path | None = None,
                 images: str | Path | None = None, *, hd95_definition: str = "brats",
                 lesion_wise: str | None = None, lesion_dilation: int | None = None,
                 lesion_min_volume: float | None = None, only_predicted: bool = False,
                 config: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                 overlays: bool = True, max_overlays: int = 200, workers: int | None = None) -> dict[str, Any]:
    """Score predictions against ground truth and write ``metrics.csv``, ``summary.json``, ``report.html``.

    Args:
        pred: prediction file or folder (see the module docstring for names).
        gt: ground-truth dataset folder, folder of label files, or one label file.
        out: report folder.
        label_convention: convention of the ground truth; ``pred_convention`` that of the
            predictions (default: the same).
        manifest: CSV ``case_id,grade`` for per-grade statistics (default ``<gt>/manifest.csv``).
        images: dataset folder with the cases' images for overlays (default: ``gt`` when it
            holds full cases).
        hd95_definition: ``"brats"`` (default) or ``"monai"``, see :mod:`brats_cnn.evaluation.metrics`.
        lesion_wise, lesion_dilation, lesion_min_volume, config, overrides: lesion-wise metrics,
            see :func:`evaluate_settings` (default: the BraTS-GLI preset).
        only_predicted: score only the cases that have a prediction (default: a missing
            prediction is scored as an empty one, as BraTS does).
        overlays: draw the per-case FLAIR overlays when images are available; at most
            ``max_overlays`` of them (the report stays a reasonable size).
        workers: processes scoring cases in parallel (None: one per usable CPU; 1: none).

    Returns:
        The summary dictionary written to ``summary.json``.

    Raises:
        InputError: bad arguments or no case at all (nothing written); or, after writing the
            report, when one or more cases could not be scored (they are listed in it).
    """
    settings = evaluate_settings(label_convention, pred_convention, hd95_definition, lesion_wise,
                                 lesion_dilation, lesion_min_volume, only_predicted, config, overrides)
    find_predictions(pred)  # no prediction at all: stop before reading the ground truth
    truths = find_ground_truth(gt, manifest)
    image_refs = _image_refs(images) if images is not None else {
        t.case_id: t.case_ref for t in truths if t.case_ref is not None}
    scores = score_folder(pred, truths, settings, image_refs=image_refs, overlays=overlays, max_overlays=max_overlays,
                          workers=workers)
    summary = folder_summary(pred, gt, truths, settings, scores)
    with staged_folder(out) as stage:  # the whole set, or (on any failure) none of it and the old set as it was
        write_folder_report(stage, summary, scores)
    _raise_for_failures(scores.failures, summary["n_cases_scored"], Path(out))
    return summary


def prediction_names(preds: list[Path]) -> list[str]:
    """Short unique names for prediction folders: the resolved folder's name (safe characters, no leading
    dot), made unique with ``-2``, ``-3``..."""
    names: list[str] = []
    for pred in preds:
        pred = Path(pred).resolve()  # "runs/x/sub/.." is "runs/x": a name, never ".." (outputs stay inside --out)
        base = label_file_case_id(pred.name) if pred.is_file() else pred.name
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", base or "pred").lstrip(".") or "pred"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def run_compare(preds: list[str | Path], gt: str | Path, out: str | Path = "evaluation",
                label_convention: str = "brats2017", pred_convention: str | None = None,
                manifest: str | Path | None = None, images: str | Path | None = None, *,
                hd95_definition: str = "brats", lesion_wise: str | None = None,
                lesion_dilation: int | None = None, lesion_min_volume: float | None = None,
                only_predicted: bool = False, config: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = (), overlays: bool = True,
                max_overlays: int = 200, workers: int | None = None) -> dict[str, Any]:
    """Score two or more prediction folders on the same ground truth and compare them.

    Each folder gets its own report in ``out/<name>/`` (as :func:`run_evaluate`); ``out`` gets
    ``comparison.json``, ``comparison.csv`` (Wilcoxon tests per pair, region and metric),
    ``intervals.csv`` (bootstrap 95 % intervals of the means), ``ranking.csv`` (BraTS ranking),
    ``differences.csv`` (per-case differences) and ``report.html``. Only cases scored for every
    folder enter the comparison. Ranking uses lesion-wise DSC and HD95 when they are computed
    (BraTS 2023+), else DSC and HD95.

    Returns:
        The ``comparison.json`` dictionary.

    Raises:
        InputError: fewer than two predictions, bad arguments; after writing everything, when a
            case of any folder could not be scored.
    """
    from brats_cnn.evaluation import compare, report

    preds = [Path(p) for p in preds]
    if len(preds) < 2:
        raise InputError(f"a comparison needs at least two --pred folders, got {len(preds)}")
    settings = evaluate_settings(label_convention, pred_convention, hd95_definition, lesion_wise,
                                 lesion_dilation, lesion_min_volume, only_predicted, config, overrides)
    for pred in preds:
        find_predictions(pred)
    truths = find_ground_truth(gt, manifest)
    image_refs = _image_refs(images) if images is not None else {
        t.case_id: t.case_ref for t in truths if t.case_ref is not None}
    out = Path(out)
    names = prediction_names(preds)
    rows_by_name, summaries, failures, all_scores = {}, {}, [], {}
    for name, pred in zip(names, preds):
        log.info("scoring %s (%s)", name, pred)
        scores = score_folder(pred, truths, settings, image_refs=image_refs, overlays=overlays,
                              max_overlays=max_overlays, workers=workers)
        summaries[name] = folder_summary(pred, gt, truths, settings, scores)
        all_scores[name] = scores
        rows_by_name[name] = scores.rows
        failures += [CaseFailure(f.case_id, f"{name}: {f.error}") for f in scores.failures]
    lesion = settings.lesion_params is not None
    metrics = ("dsc", "hd95", "lesion_dsc", "lesion_hd95") if lesion else ("dsc", "hd95")
    ranking_metrics = ("lesion_dsc", "lesion_hd95") if lesion else ("dsc", "hd95")
    comparison = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"), "version": __version__,
        "gt": str(gt), "pred": {n: str(p) for n, p in zip(names, preds)}, **settings.as_dict(),
        "statistics": {n: s["statistics"]["all"] for n, s in summaries.items()},
        "missing_predictions": {n: s["missing_predictions"] for n, s in summaries.items()},
        "failures": [{"case_id": f.case_id, "error": f.error} for f in failures],
        "test": "two-sided Wilcoxon signed-rank test (scipy.stats.wilcoxon), zero differences dropped",
        "interval": f"bootstrap {compare.CONFIDENCE_LEVEL:.0%} interval of the mean (scipy.stats.bootstrap, BCa, "
                    f"{compare.BOOTSTRAP_RESAMPLES} resamples, seed {compare.BOOTSTRAP_SEED})",
        "ranking_scheme": "rank per case, region and metric (1 = best, ties share the best rank), averaged",
        **compare.compare(rows_by_name, metrics, ranking_metrics),
    }
    with staged_folder(out) as stage:  # the whole set, or (on any failure) none of it and the old set as it was
        for name, scores in all_scores.items():
            write_folder_report(stage / name, summaries[name], scores)
        report.write_comparison(stage, comparison, rows_by_name)
    _raise_for_failures(failures, len(comparison["cases"]), out)
    return comparison
