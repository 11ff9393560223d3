"""Which prediction goes with which ground truth: label files found by case id, whatever the names."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from brats_cnn.data import layouts
from brats_cnn.errors import BratsCnnError, InputError

log = logging.getLogger(__name__)


_LABEL_FILE_RE = re.compile(r"^(?P<id>.+?)(?:[_-]seg)?\.(?:nii\.gz|nii|mha)$", re.IGNORECASE)


_IMAGE_TAG_RE = re.compile(r"[_-](?:t1|t1ce|t2|flair|t1n|t1c|t2w|t2f|000[0-3]|probabilities)\.(?:nii\.gz|nii)$",
                           re.IGNORECASE)  # images, and segment's probability maps: never label maps


@dataclass(frozen=True)
class GroundTruth:
    """One ground-truth case: its label file, grade and, when known, the case's images."""

    case_id: str
    label_path: Path | None
    grade: str | None
    case_ref: layouts.CaseRef | None = None


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
        _refuse_non_label_map(pred)
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


def _refuse_non_label_map(path: Path) -> None:
    """InputError before any scoring when a prediction file is plainly not a label map: more than 3-D
    (segment's ``_probabilities`` maps are 4-D). Reads the header only."""
    import nibabel as nib

    try:
        header = nib.load(path).header
    except Exception:  # unreadable: load_label_map gives the precise one-line error when scoring
        return
    shape = tuple(int(n) for n in header.get_data_shape())
    if len([n for n in shape if n > 1]) > 3 or len(shape) > 4:
        raise InputError(f"is a {len(shape)}-D image {shape}, not a 3-D label map (a probability map? evaluate "
                         "takes the label map segment writes next to it)", path)


def find_ground_truth(gt: str | Path, manifest: str | Path | None = None) -> list[GroundTruth]:
    """Ground-truth cases of a dataset folder (any io layout), a folder of label files, or one file.

    Only the label maps are needed: when the folder cannot be listed as a dataset (a case with
    an image missing, say), its label maps are listed on their own (:func:`find_label_maps`) and
    the cases whose images are complete still give overlays. Grades come from ``manifest`` or
    ``<gt>/manifest.csv``; a grade that is empty or ``unknown`` leaves the case's grade None.

    Raises:
        InputError: ``gt`` does not exist or holds no case.
    """
    gt = Path(gt)
    if not gt.exists():
        raise InputError("no such ground-truth file or folder", gt)
    try:
        refs = layouts.list_cases(gt, manifest=manifest)
    except InputError as exc:
        cases = find_label_maps(gt, manifest)
        if not cases:
            raise
        if any(c.case_ref is None and c.label_path.parent.name == c.case_id for c in cases):
            log.warning("%s: not every case is complete (%s); scoring the %d label maps found", gt, exc, len(cases))
        return cases
    if refs and all(ref.label_path is None for ref in refs):
        raise InputError(f"none of the {len(refs)} cases has a label map; nothing to score against", gt)
    return [GroundTruth(ref.case_id, ref.label_path, ref.grade, ref) for ref in refs]


def find_label_maps(gt: str | Path, manifest: str | Path | None = None) -> list[GroundTruth]:
    """Label maps by case without reading any image: for folders that are not complete datasets.

    Looks at label files in ``gt`` itself, in ``labelsTr/``/``labelsTs/``, in case folders
    ``<ID>/`` (the file named after the folder, or its only label file) and in case folders under
    ``HGG/``/``LGG/`` (which give the grade). A case folder whose images are complete also gets its
    :class:`~brats_cnn.data.layouts.CaseRef` (for overlays). Empty list when nothing is found.
    """
    gt = Path(gt)
    if gt.is_file():
        case_id = label_file_case_id(gt.name)
        return [GroundTruth(case_id, gt, None)] if case_id else []
    manifest_path = Path(manifest) if manifest is not None else gt / "manifest.csv"
    grades = layouts.read_manifest(manifest_path) if manifest is not None or manifest_path.is_file() else {}
    cases: dict[str, GroundTruth] = {}

    def add(case_id: str, path: Path, grade: str | None, folder: Path | None) -> None:
        ref = None
        if folder is not None:
            try:
                ref = layouts.find_case(folder)
            except BratsCnnError:
                ref = None
        cases.setdefault(case_id, GroundTruth(case_id, path, grades.get(case_id, grade), ref))

    for folder in [gt] + [gt / name for name in ("labelsTr", "labelsTs") if (gt / name).is_dir()]:
        for path in _label_files(folder):
            add(label_file_case_id(path.name), path, None, None)
    subfolders = sorted(p for p in gt.iterdir() if p.is_dir() and not p.name.startswith("."))
    case_folders = [(p, None) for p in subfolders
                    if p.name.upper() not in layouts.GRADES and p.name not in ("labelsTr", "labelsTs", "imagesTr", "imagesTs")]
    for grade_folder in [p for p in subfolders if p.name.upper() in layouts.GRADES]:
        case_folders += [(p, grade_folder.name.upper()) for p in sorted(grade_folder.iterdir()) if p.is_dir()]
    for folder, grade in case_folders:
        files = _label_files(folder)
        named = [f for f in files if label_file_case_id(f.name) == folder.name]
        chosen = named or (files if len(files) == 1 else [])
        if len(chosen) == 1:
            add(folder.name, chosen[0], grade, folder)
    return [cases[k] for k in sorted(cases)]


def _image_refs(images: str | Path | None) -> dict[str, layouts.CaseRef]:
    """Cases with images for overlay figures, by case id (empty if the folder cannot be read)."""
    if images is None:
        return {}
    try:
        return {ref.case_id: ref for ref in layouts.list_cases(images)}
    except BratsCnnError as exc:
        log.warning("no overlay images: %s", exc)
        return {}


def _pair(pred: str | Path, predictions: dict[str, Path], failures: list[CaseFailure],
          truths: list[GroundTruth]) -> tuple[dict[str, Path], list[CaseFailure]]:
    """Predictions by ground-truth case id; InputError when none matches any ground-truth case.

    One prediction file with one ground-truth case is a pair whatever the two names say (the user
    named both). Otherwise names pair them, and a folder whose files match no case at all is an
    error listing what was found and what was expected -- never a report of empty predictions.
    """
    expected = [t.case_id for t in truths]
    if Path(pred).is_file() and len(truths) == 1 and expected[0] not in predictions:
        (path,) = predictions.values()
        log.info("pairing prediction %s with ground-truth case %s (one file each)", path.name, expected[0])
        return {expected[0]: path}, failures
    if not set(predictions) & set(expected) and not {f.case_id for f in failures} & set(expected):
        def listed(names: list[str]) -> str:
            return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")

        raise InputError(f"no prediction matches any ground-truth case: found {listed(sorted(predictions))}, "
                         f"expected {listed(sorted(expected))} (file names <ID>.nii.gz, <ID>_seg.nii.gz or "
                         "<ID>-seg.nii.gz)", pred)
    return predictions, failures


@dataclass(frozen=True)
class CaseFailure:
    case_id: str
    error: str
