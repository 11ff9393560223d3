"""``brats-cnn evaluate``: match predictions to ground truth, score every case, write the report.

Matching (by case id):

* Predictions: a single file, or a folder holding ``<ID>.nii.gz``, ``<ID>_seg.nii.gz`` or
  ``<ID>-seg.nii.gz`` (``.nii`` and ``.mha`` too), or case folders ``<ID>/`` holding one of those
  names (or exactly one label file).
* Ground truth: anything :func:`brats_cnn.io.list_cases` reads (the label map of each case), or a
  folder of label files named like predictions, or a single label file.

A case with ground truth but no prediction is scored as an empty prediction and flagged, as the
challenge does; predictions without ground truth are listed, not scored. A case whose files
cannot be read, hold labels outside their convention, or whose prediction is on another voxel
grid (shape, or affine beyond :data:`brats_cnn.io.AFFINE_TOLERANCE_MM` /
:data:`brats_cnn.io.DIRECTION_TOLERANCE`) is listed as a failure and the others are still scored.
The report is written first; then, if any case failed, :class:`~brats_cnn.errors.InputError` is
raised so that the command exits non-zero (code 2).
"""

from __future__ import annotations

import datetime
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brats_cnn import __version__, io
from brats_cnn.errors import BratsCnnError, InputError
from brats_cnn.labels import REGIONS, get_convention, region_masks
from brats_cnn.metrics import HD95_DEFINITIONS, region_metrics

log = logging.getLogger(__name__)

_LABEL_FILE_RE = re.compile(r"^(?P<id>.+?)(?:[_-]seg)?\.(?:nii\.gz|nii|mha)$", re.IGNORECASE)
_IMAGE_TAG_RE = re.compile(r"[_-](?:t1|t1ce|t2|flair|t1n|t1c|t2w|t2f|000[0-3])\.(?:nii\.gz|nii)$", re.IGNORECASE)


@dataclass(frozen=True)
class GroundTruth:
    """One ground-truth case: its label file, grade and, when known, the case's images."""

    case_id: str
    label_path: Path | None
    grade: str | None
    case_ref: io.CaseRef | None = None


@dataclass(frozen=True)
class CaseFailure:
    case_id: str
    error: str


# ----------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------

def label_file_case_id(name: str) -> str | None:
    """Case id of a label/prediction file name (``X.nii.gz``, ``X_seg.nii.gz``, ``X-seg.nii.gz``), else None."""
    match = _LABEL_FILE_RE.match(name)
    return match["id"] if match else None


def _label_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and label_file_case_id(p.name) and not _IMAGE_TAG_RE.search(p.name))


def find_predictions(pred: str | Path) -> tuple[dict[str, Path], list[CaseFailure]]:
    """Prediction files by case id.

    Returns:
        ``({case_id: path}, failures)``; a case with several candidate files (``X.nii.gz`` and
        ``X_seg.nii.gz``) is a failure rather than a silent choice.

    Raises:
        InputError: ``pred`` does not exist or holds no prediction file.
    """
    pred = Path(pred)
    if not pred.exists():
        raise InputError("no such prediction file or folder", pred)
    if pred.is_file():
        case_id = label_file_case_id(pred.name)
        if case_id is None:
            raise InputError("prediction must be a .nii.gz, .nii or .mha label map", pred)
        return {case_id: pred}, []
    candidates: dict[str, list[Path]] = {}
    for file in _label_files(pred):
        candidates.setdefault(label_file_case_id(file.name), []).append(file)
    for folder in sorted(p for p in pred.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _label_files(folder)
        named = [f for f in files if label_file_case_id(f.name) == folder.name]
        chosen = named or (files if len(files) == 1 else [])
        if chosen:
            candidates.setdefault(folder.name, []).extend(chosen)
    if not candidates:
        raise InputError("no prediction files found (expected <ID>.nii.gz, <ID>_seg.nii.gz, <ID>-seg.nii.gz "
                         "or case folders holding one)", pred)
    found, failures = {}, []
    for case_id, paths in sorted(candidates.items()):
        if len(paths) > 1:
            failures.append(CaseFailure(case_id, f"several prediction files for case {case_id}: "
                                                 f"{', '.join(str(p) for p in paths)}"))
        else:
            found[case_id] = paths[0]
    return found, failures


def find_ground_truth(gt: str | Path, manifest: str | Path | None = None) -> list[GroundTruth]:
    """Ground-truth cases of a dataset folder (any io layout), a folder of label files, or one file.

    Grades come from ``manifest`` or, for a dataset folder, ``<gt>/manifest.csv`` (as io reads them).

    Raises:
        InputError: ``gt`` does not exist or holds no case.
    """
    gt = Path(gt)
    if not gt.exists():
        raise InputError("no such ground-truth file or folder", gt)
    grades = io.read_manifest(manifest) if manifest is not None else {}
    label_files = [gt] if gt.is_file() and label_file_case_id(gt.name) else (_label_files(gt) if gt.is_dir() else [])
    try:
        refs = io.list_cases(gt, manifest=manifest)
    except InputError:
        if not label_files:
            raise
        refs = []
    if refs and all(ref.label_path is None for ref in refs):
        raise InputError(f"none of the {len(refs)} cases has a label map; nothing to score against", gt)
    if refs:
        return [GroundTruth(ref.case_id, ref.label_path, ref.grade, ref) for ref in refs]
    if manifest is None and gt.is_dir() and (gt / "manifest.csv").is_file():
        grades = io.read_manifest(gt / "manifest.csv")
    cases = {}
    for path in label_files:
        case_id = label_file_case_id(path.name)
        cases[case_id] = GroundTruth(case_id, path, grades.get(case_id))
    return [cases[k] for k in sorted(cases)]


def _image_refs(images: str | Path | None) -> dict[str, io.CaseRef]:
    """Cases with images for overlay figures, by case id (empty if the folder cannot be read)."""
    if images is None:
        return {}
    try:
        return {ref.case_id: ref for ref in io.list_cases(images)}
    except BratsCnnError as exc:
        log.warning("no overlay images: %s", exc)
        return {}


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
               pred_convention: str, hd95_definition: str = "brats"
               ) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
    """Read one case's label maps and compute every metric per region.

    Regions are taken from each map in its own convention (see ``metrics.region_metrics``). A missing prediction (``pred_path`` None) is scored as an empty one.

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
                               pred_convention=pred_convention)
    rows = [{"case_id": case_id, "region": region, **by_region[region], "missing_prediction": pred_path is None}
            for region in REGIONS]
    return rows, gt.labels, pred_labels


def _flair_slice(ref: io.CaseRef, z: int) -> np.ndarray:
    """One axial FLAIR slice ``(X, Y)`` float32 of a case (reads only that slice where it can)."""
    flair = ref.image_paths[-1]
    if ref.layout in ("brats2017", "brats2023", "nnunet") and len(ref.image_paths) == 4:
        import nibabel as nib

        return np.asarray(nib.load(flair).dataobj[:, :, z], dtype=np.float32)
    case = io.load_case(ref, load_label=False)
    return case.image[3, :, :, z]


def _overlay(case_id: str, ref: io.CaseRef, gt_labels: np.ndarray, pred_labels: np.ndarray,
             label_convention: str, pred_convention: str, rows: list[dict[str, Any]]) -> bytes | None:
    from brats_cnn import report

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
# The command
# ----------------------------------------------------------------------------------------------

def run_evaluate(pred: str | Path, gt: str | Path, out: str | Path = "evaluation", label_convention: str = "brats2017",
                 pred_convention: str | None = None, manifest: str | Path | None = None,
                 images: str | Path | None = None, *, hd95_definition: str = "brats",
                 overlays: bool = True, max_overlays: int = 200) -> dict[str, Any]:
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
        hd95_definition: ``"brats"`` (default) or ``"monai"``, see :mod:`brats_cnn.metrics`.
        overlays: draw the per-case FLAIR overlays when images are available; at most
            ``max_overlays`` of them (the report stays a reasonable size).

    Returns:
        The summary dictionary written to ``summary.json``.

    Raises:
        InputError: bad arguments or no case at all (nothing written); or, after writing the
            report, when one or more cases could not be scored (they are listed in it).
    """
    from brats_cnn import report

    out = Path(out)
    pred_convention = pred_convention or label_convention
    get_convention(label_convention), get_convention(pred_convention)  # fail early on a typo
    if hd95_definition not in HD95_DEFINITIONS:
        raise InputError(f"unknown HD95 definition '{hd95_definition}' (expected one of {list(HD95_DEFINITIONS)})")
    predictions, failures = find_predictions(pred)
    truths = find_ground_truth(gt, manifest)
    image_refs = _image_refs(images) if images is not None else {
        t.case_id: t.case_ref for t in truths if t.case_ref is not None}
    failed_ids = {f.case_id for f in failures}
    gt_ids = {t.case_id for t in truths}
    extra = sorted(set(predictions) - gt_ids)
    missing = sorted(t.case_id for t in truths if t.case_id not in predictions and t.case_id not in failed_ids)

    rows: list[dict[str, Any]] = []
    figures: dict[str, bytes] = {}
    seconds: dict[str, float] = {}
    for truth in truths:
        if truth.case_id in failed_ids:
            continue
        if truth.label_path is None:
            failures.append(CaseFailure(truth.case_id, f"case {truth.case_id}: no ground-truth label map"))
            continue
        start = time.perf_counter()
        try:
            case_rows, gt_labels, pred_labels = score_case(
                truth.case_id, truth.label_path, predictions.get(truth.case_id), label_convention=label_convention,
                pred_convention=pred_convention, hd95_definition=hd95_definition)
        except BratsCnnError as exc:
            message = str(exc) if truth.case_id in str(exc) else f"case {truth.case_id}: {exc}"
            log.error("%s", message)
            failures.append(CaseFailure(truth.case_id, message))
            continue
        seconds[truth.case_id] = time.perf_counter() - start
        rows += case_rows
        ref = image_refs.get(truth.case_id)
        if overlays and ref is not None and len(figures) < max_overlays:
            png = _overlay(truth.case_id, ref, gt_labels, pred_labels, label_convention, pred_convention, case_rows)
            if png is not None:
                figures[truth.case_id] = png
        log.info("%s scored in %.2f s", truth.case_id, seconds[truth.case_id])

    grades = {t.case_id: t.grade for t in truths}
    scored_ids = sorted({r["case_id"] for r in rows})
    summary: dict[str, Any] = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "version": __version__,
        "pred": str(pred), "gt": str(gt),
        "label_convention": label_convention, "pred_convention": pred_convention,
        "hd95_definition": hd95_definition, "hd95_definition_text": HD95_DEFINITIONS[hd95_definition],
        "hd95_unit": "mm", "volume_unit": "ml",
        "n_cases_scored": len(scored_ids),
        "missing_predictions": [c for c in missing if c in scored_ids],
        "extra_predictions": extra,
        "failures": [{"case_id": f.case_id, "error": f.error} for f in failures],
        "grades": {c: grades[c] for c in scored_ids},
        "statistics": report.summarise(rows, grades),
        "reference_pereira2016": report.PAPER_REFERENCE,
        "seconds_per_case": {c: round(s, 4) for c, s in seconds.items()},
    }
    report.write_metrics_csv(rows, out / "metrics.csv")
    report.write_summary_json(summary, out / "summary.json")
    boxplot = report.boxplot_png(rows, grades) if rows else None
    report.write_report_html(out / "report.html", summary, rows, boxplot=boxplot, overlays=figures)
    if failures:
        names = ", ".join(f.case_id for f in failures[:5]) + (", ..." if len(failures) > 5 else "")
        raise InputError(f"{len(failures)} case(s) could not be scored ({names}); the other "
                         f"{len(scored_ids)} are in the report, the failures are listed in summary.json and "
                         "report.html", out)
    return summary
