"""Where a dataset's files are: the only module that knows file names and layouts.

Supported layouts (see ``docs/data.md``):

* ``brats2017`` -- BraTS 2017-2021: ``<ID>/<ID>_{t1,t1ce,t2,flair,seg}.nii.gz`` (or ``.nii``).
* ``brats2023`` -- BraTS 2023+: ``<ID>/<ID>-{t1n,t1c,t2w,t2f,seg}.nii.gz``.
* ``nnunet`` -- ``imagesTr/<ID>_{0000..0003}.nii.gz`` with labels in ``labelsTr/<ID>.nii.gz``. The
  default channel map is the one nnU-Net's BraTS dataset conversions use (``Task043_BraTS19``,
  ``Dataset137_BraTS21``): ``0000`` = T1, ``0001`` = T1c, ``0002`` = T2, ``0003`` = FLAIR, i.e. the
  project's own channel order. Other maps are given as ``{"t1": "0001", ...}`` or as a list of
  sequence names in file order (``["flair", "t1", "t1c", "t2"]`` for a converted Decathlon set).
* ``msd`` -- Medical Segmentation Decathlon Task01: one 4-D NIfTI ``(X, Y, Z, 4)`` per case with the
  channels FLAIR, T1w, T1gd, T2w (reordered to T1, T1c, T2, FLAIR when read); labels in
  ``../labelsTr/<name>``.
* ``brats2013`` -- BRATS 2012/2013 ``.mha`` files (read with SimpleITK), one case per folder, each
  file possibly in its own subfolder as in the release: ``VSD.Brain.XX.O.MR_T1.54512.mha``,
  ``..MR_T1c..``, ``..MR_T2..``, ``..MR_Flair..`` and the label ``..OT..``; the sequence tag is
  matched case-insensitively as a whole name token.

Reading and writing the volumes themselves is :mod:`brats_cnn.data.io`.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from brats_cnn import CHANNELS
from brats_cnn.data.files import nifti_ndim
from brats_cnn.errors import InputError

log = logging.getLogger(__name__)


LAYOUTS: tuple[str, ...] = ("brats2017", "brats2023", "nnunet", "msd", "brats2013")


GRADES: tuple[str, ...] = ("HGG", "LGG")


UNKNOWN_GRADES: tuple[str, ...] = ("", "UNKNOWN")  # manifest values for data without a grade (BraTS 2021+)


# File-name suffix of each sequence (and the label map) per layout.
BRATS2017_NAMES: dict[str, str] = {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair", "label": "seg"}


BRATS2023_NAMES: dict[str, str] = {"t1": "t1n", "t1c": "t1c", "t2": "t2w", "flair": "t2f", "label": "seg"}


# nnU-Net BraTS conversions (Task043_BraTS19, Dataset137_BraTS21): 0000 T1, 0001 T1ce, 0002 T2, 0003 FLAIR.
DEFAULT_NNUNET_CHANNEL_MAP: dict[str, str] = {"t1": "0000", "t1c": "0001", "t2": "0002", "flair": "0003"}


# Decathlon Task01 4-D files: channel k of the file holds MSD_CHANNELS[k].
MSD_CHANNELS: tuple[str, ...] = ("flair", "t1", "t1c", "t2")


# BRATS 2013 .mha names: accepted name tokens per sequence (matched case-insensitively).
BRATS2013_TAGS: dict[str, tuple[str, ...]] = {
    "t1": ("t1",), "t1c": ("t1c", "t1ce", "t1gd"), "t2": ("t2",), "flair": ("flair",), "label": ("ot",)}


# Names used when writing the BRATS 2013 layout (as in the release).
BRATS2013_WRITE_NAMES: dict[str, str] = {
    "t1": "VSD.Brain.XX.O.MR_T1", "t1c": "VSD.Brain.XX.O.MR_T1c", "t2": "VSD.Brain.XX.O.MR_T2",
    "flair": "VSD.Brain.XX.O.MR_Flair", "label": "VSD.Brain_3more.XX.O.OT"}


_NII = r"\.nii(?:\.gz)?"


_BRATS2017_RE = re.compile(rf"^(?P<id>.+)_(?P<tag>t1|t1ce|t2|flair|seg){_NII}$", re.IGNORECASE)


_BRATS2023_RE = re.compile(rf"^(?P<id>.+)-(?P<tag>t1n|t1c|t2w|t2f|seg){_NII}$", re.IGNORECASE)


_NNUNET_RE = re.compile(rf"^(?P<id>.+)_(?P<tag>\d{{4}}){_NII}$")


_NIFTI_RE = re.compile(rf"^(?P<id>.+){_NII}$", re.IGNORECASE)


@dataclass(frozen=True)
class CaseRef:
    """A case found on disk, not loaded.

    Attributes:
        case_id: the case's name (e.g. ``Brats18_CBICA_ABM_1``).
        layout: one of :data:`LAYOUTS`.
        image_paths: 4 files in :data:`~brats_cnn.CHANNELS` order, or 1 file (4-D msd NIfTI).
        label_path: the label map, or None when there is none.
        grade: ``"HGG"``/``"LGG"`` from a manifest or an ``HGG/``/``LGG/`` folder, else None.
        source: the case folder (or the 4-D file for msd).
    """

    case_id: str
    layout: str
    image_paths: tuple[Path, ...]
    label_path: Path | None
    grade: str | None = None
    source: Path | None = None


def _normalise_channel_map(channel_map: Mapping[str, str | int] | Sequence[str] | None) -> dict[str, str]:
    """Channel map as ``{sequence: "000k"}`` for all four sequences."""
    if channel_map is None:
        return dict(DEFAULT_NNUNET_CHANNEL_MAP)
    if isinstance(channel_map, Mapping):
        mapping = {str(k).lower(): (f"{v:04d}" if isinstance(v, int) else str(v)) for k, v in channel_map.items()}
    else:
        mapping = {str(name).lower(): f"{k:04d}" for k, name in enumerate(channel_map)}
    if sorted(mapping) != sorted(CHANNELS) or len(set(mapping.values())) != len(CHANNELS):
        raise InputError(f"channel map {dict(mapping)} must give each of {list(CHANNELS)} its own file index")
    return mapping


def _match_files(files: Sequence[Path], pattern: re.Pattern) -> dict[str, dict[str, Path]]:
    """``{case_id: {tag (lower case): path}}`` of the files whose names match ``pattern``."""
    found: dict[str, dict[str, Path]] = {}
    for file in files:
        match = pattern.match(file.name)
        if match:
            tagged = found.setdefault(match["id"], {})
            tag = match["tag"].lower()
            if tag in tagged:  # X_t1.nii.gz and X_t1.nii, or X_T1 and X_t1: which one is meant is unknown
                raise InputError(f"two files for {tag} of case {match['id']}: {tagged[tag].name} and {file.name}; "
                                 "keep one", file.parent)
            tagged[tag] = file
    return found


def _named_case(case_id: str, tagged: dict[str, Path], names: Mapping[str, str], layout: str,
                folder: Path, example: str) -> CaseRef:
    images = []
    for seq in CHANNELS:
        tag = names[seq].lower()
        if tag not in tagged:
            raise InputError(f"case {case_id} has no {seq} image (expected {example.format(id=case_id, tag=names[seq])})",
                             folder)
        images.append(tagged[tag])
    return CaseRef(case_id, layout, tuple(images), tagged.get(names["label"].lower()), source=folder)


def _nnunet_label_path(image_folder: Path, case_id: str) -> Path | None:
    """``labelsTr/<ID>.nii.gz`` beside ``imagesTr/`` (``imagesTs`` -> ``labelsTs``), if it exists."""
    if image_folder.name.lower().startswith("images"):
        label_folder = image_folder.parent / ("labels" + image_folder.name[len("images"):])
        for suffix in (".nii.gz", ".nii"):
            candidate = label_folder / f"{case_id}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _nnunet_case(case_id: str, tagged: dict[str, Path], channel_map: dict[str, str], folder: Path) -> CaseRef:
    images = []
    for seq in CHANNELS:
        if channel_map[seq] not in tagged:
            raise InputError(f"case {case_id} has no {seq} image (expected {case_id}_{channel_map[seq]}.nii.gz "
                             f"by the channel map {channel_map})", folder)
        images.append(tagged[channel_map[seq]])
    return CaseRef(case_id, "nnunet", tuple(images), _nnunet_label_path(folder, case_id), source=folder)


def _msd_case(path: Path) -> CaseRef:
    """A Decathlon 4-D file; its label is ``../labelsTr/<name>`` (or ``labelsTs``)."""
    case_id = _NIFTI_RE.match(path.name)["id"]
    label = None
    folder = path.parent
    if folder.name.lower().startswith("images"):
        candidate = folder.parent / ("labels" + folder.name[len("images"):]) / path.name
        label = candidate if candidate.is_file() else None
    return CaseRef(case_id, "msd", (path,), label, source=path)


def _tokens(name: str) -> set[str]:
    return set(re.split(r"[._\-\s]+", name.lower()))


def _brats2013_case(folder: Path, files: Sequence[Path]) -> CaseRef:
    found: dict[str, list[Path]] = {key: [] for key in BRATS2013_TAGS}
    for file in files:
        tokens = _tokens(file.name)
        for key, tags in BRATS2013_TAGS.items():
            if tokens & set(tags):
                found[key].append(file)
    for key, matches in found.items():
        if len(matches) > 1:
            raise InputError(f"several .mha files match {key}: {', '.join(p.name for p in matches)}", folder)
    for seq in CHANNELS:
        if not found[seq]:
            raise InputError(f"case {folder.name} has no {seq} image (expected a .mha file whose name contains "
                             f"{' or '.join(BRATS2013_TAGS[seq]).upper()} as a token, e.g. "
                             f"{BRATS2013_WRITE_NAMES[seq]}.mha)", folder)
    label = found["label"][0] if found["label"] else None
    return CaseRef(folder.name, "brats2013", tuple(found[seq][0] for seq in CHANNELS), label, source=folder)


def _single_case(found: dict[str, dict[str, Path]], folder: Path, layout: str) -> tuple[str, dict[str, Path]]:
    if len(found) > 1:
        names = sorted(found)
        raise InputError(f"folder holds {len(found)} {layout} cases ({', '.join(names[:3])}"
                         f"{', ...' if len(names) > 3 else ''}); a case folder holds the files of one case: "
                         "rename or remove the others, or give the dataset folder", folder)
    return next(iter(found.items()))


_UNKNOWN_LAYOUT = ("unknown layout: expected BraTS 2017-21 <ID>_t1/_t1ce/_t2/_flair.nii.gz, BraTS 2023 "
                   "<ID>-t1n/-t1c/-t2w/-t2f.nii.gz, nnU-Net <ID>_0000..0003.nii.gz, a Decathlon 4-D NIfTI "
                   "or BRATS 2013 .mha files")


def find_case(path: str | Path, *, channel_map: Mapping[str, str | int] | Sequence[str] | None = None) -> CaseRef:
    """Locate one case: a case folder, one of its files (siblings are found), or a 4-D NIfTI.

    Args:
        path: folder or file.
        channel_map: nnU-Net channel map (see the module docstring); default T1, T1c, T2, FLAIR.

    Raises:
        InputError: missing path, unknown layout, or a missing sequence (named).
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or folder", path)
    cmap = _normalise_channel_map(channel_map)
    if path.is_file():
        name = path.name
        if name.lower().endswith(".mha"):
            return _brats2013_case_of_file(path)
        for pattern, names, layout, example in _NAMED_LAYOUTS:
            match = pattern.match(name)
            if match:
                siblings = _files(path.parent)
                found = _match_files(siblings, pattern)
                ref = _named_case(match["id"], found[match["id"]], names, layout, path.parent, example)
                _warn_unrelated(path.parent, siblings, found)
                return ref
        match = _NNUNET_RE.match(name)
        if match:
            found = _match_files(_files(path.parent), _NNUNET_RE)
            return _nnunet_case(match["id"], found[match["id"]], cmap, path.parent)
        if _NIFTI_RE.match(name):
            ndim = nifti_ndim(path)
            if ndim == 4:
                return _msd_case(path)
        raise InputError(_UNKNOWN_LAYOUT, path)
    files = _files(path)
    for pattern, names, layout, example in _NAMED_LAYOUTS:
        found = _match_files(files, pattern)
        if found:
            case_id, tagged = _single_case(found, path, layout)
            ref = _named_case(case_id, tagged, names, layout, path, example)
            _warn_unrelated(path, files, found)
            return ref
    found = _match_files(files, _NNUNET_RE)
    if found:
        case_id, tagged = _single_case(found, path, "nnunet")
        return _nnunet_case(case_id, tagged, cmap, path)
    mha = _mha_files(path)
    if mha:
        return _brats2013_case(path, mha)
    raise InputError(_UNKNOWN_LAYOUT, path)


_NAMED_LAYOUTS = (
    (_BRATS2017_RE, BRATS2017_NAMES, "brats2017", "{id}_{tag}.nii.gz"),
    (_BRATS2023_RE, BRATS2023_NAMES, "brats2023", "{id}-{tag}.nii.gz"),
)


def _warn_unrelated(folder: Path, files: Sequence[Path], found: dict[str, dict[str, Path]]) -> None:
    """Log the files of a case folder that belong to no case (notes, backups...); they are ignored."""
    used = {p for tagged in found.values() for p in tagged.values()}
    unrelated = [p.name for p in files if p not in used]
    if unrelated:
        log.warning("%s: ignoring %d file(s) that are not part of the case: %s", folder, len(unrelated),
                    ", ".join(unrelated[:5]) + (", ..." if len(unrelated) > 5 else ""))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _brats2013_case_of_file(path: Path) -> CaseRef:
    """The case of one .mha file: its folder, or the folder above when each file has its own folder."""
    for folder in (path.parent, path.parent.parent):
        if _is_brats2013_case_folder(folder):
            return _brats2013_case(folder, _mha_files(folder))
    return _brats2013_case(path.parent, _mha_files(path.parent))


def read_manifest(path: str | Path) -> dict[str, str]:
    """Read a CSV with columns ``case_id,grade`` (others ignored) -> ``{case_id: "HGG"|"LGG"}``.

    A grade that is empty or ``unknown`` (any case) is accepted; such cases are left out of the
    result, so their grade stays None. Read as ``utf-8-sig`` with any newline (a spreadsheet's
    byte-order mark and CRLF lines are fine); a case listed twice with two different grades is an
    error naming both lines (the same grade twice is accepted).
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
            fields = rows[0].keys() if rows else []
    except OSError as exc:
        raise InputError(f"cannot read manifest ({exc.strerror})", path) from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise InputError(f"manifest is not a valid CSV ({exc})", path) from exc
    if not rows or "case_id" not in fields or "grade" not in fields:
        raise InputError("manifest needs a header row with columns case_id,grade and at least one row", path)
    grades: dict[str, str] = {}
    first_line: dict[str, tuple[int, str]] = {}
    for line, row in enumerate(rows, start=2):
        case_id = (row["case_id"] or "").strip()
        grade = (row["grade"] or "").strip().upper()
        if grade not in GRADES and grade not in UNKNOWN_GRADES:
            raise InputError(f"line {line}: grade '{row['grade']}' must be HGG or LGG", path)
        if case_id in first_line and first_line[case_id][1] != grade:
            earlier, earlier_grade = first_line[case_id]
            raise InputError(f"case '{case_id}' is listed twice with different grades: line {earlier} "
                             f"({earlier_grade or 'empty'}) and line {line} ({grade or 'empty'})", path)
        first_line.setdefault(case_id, (line, grade))
        if grade in GRADES:
            grades[case_id] = grade
    return grades


def _cases_in_folder(folder: Path, cmap: dict[str, str]) -> list[CaseRef]:
    """Cases whose files sit directly in ``folder`` (nnU-Net / Decathlon image folders)."""
    files = _files(folder)
    refs = [_nnunet_case(case_id, tagged, cmap, folder)
            for case_id, tagged in _match_files(files, _NNUNET_RE).items()]
    for file in files:
        if _NIFTI_RE.match(file.name) and not _NNUNET_RE.match(file.name) and nifti_ndim(file) == 4:
            refs.append(_msd_case(file))
    return refs


def _mha_files(folder: Path) -> list[Path]:
    """.mha files in ``folder`` or one level below (the release puts each file in its own folder)."""
    return sorted([*folder.glob("*.mha"), *folder.glob("*/*.mha")])


def _is_brats2013_case_folder(folder: Path) -> bool:
    """Exactly one FLAIR .mha within two levels: a case (a dataset root would hold several)."""
    flair_tags = set(BRATS2013_TAGS["flair"])
    return sum(1 for f in _mha_files(folder) if _tokens(f.name) & flair_tags) == 1


def _is_case_folder(folder: Path) -> bool:
    files = _files(folder)
    return any(p.match(f.name) for f in files for p in (_BRATS2017_RE, _BRATS2023_RE)) or \
        _is_brats2013_case_folder(folder)


def list_cases(root: str | Path, *, manifest: str | Path | None = None,
               channel_map: Mapping[str, str | int] | Sequence[str] | None = None) -> list[CaseRef]:
    """All cases of a dataset folder, sorted by case_id.

    ``root`` may be a folder of case folders, a BraTS root with ``HGG/`` and ``LGG/`` (the folder
    gives the grade), a Decathlon/nnU-Net root with ``imagesTr/`` (and ``imagesTs/``), an image
    folder itself, a single case folder, or a single file. Grades come from ``manifest`` (CSV
    ``case_id,grade``) or ``<root>/manifest.csv`` when present; the manifest wins over folders.
    """
    root = Path(root)
    if not root.exists():
        raise InputError("no such file or folder", root)
    cmap = _normalise_channel_map(channel_map)
    refs: list[CaseRef] = []
    if root.is_file() or _is_case_folder(root):
        refs = [find_case(root, channel_map=cmap)]
    else:
        subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        image_folders = [p for p in subfolders if p.name in ("imagesTr", "imagesTs")]
        for folder in image_folders:
            refs += _cases_in_folder(folder, cmap)
        refs += _cases_in_folder(root, cmap)
        for folder in subfolders:
            if folder in image_folders or folder.name.startswith("labels"):
                continue
            grade = folder.name.upper() if folder.name.upper() in GRADES else None
            if grade is not None and not _is_case_folder(folder):
                refs += [_with_grade(ref, grade) for ref in list_cases(folder, channel_map=cmap)]
            elif _is_case_folder(folder):
                refs.append(find_case(folder, channel_map=cmap))
    if not refs:
        raise InputError(f"no cases found; {_UNKNOWN_LAYOUT}", root)
    manifest_path = Path(manifest) if manifest is not None else root / "manifest.csv"
    if manifest is not None or (root.is_dir() and manifest_path.is_file()):
        grades = read_manifest(manifest_path)
        refs = [_with_grade(ref, grades[ref.case_id]) if ref.case_id in grades else ref for ref in refs]
    refs.sort(key=lambda ref: ref.case_id)
    ids = [ref.case_id for ref in refs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise InputError(f"case id {duplicates[0]} occurs more than once", root)
    return refs


def _with_grade(ref: CaseRef, grade: str) -> CaseRef:
    return CaseRef(ref.case_id, ref.layout, ref.image_paths, ref.label_path, grade, ref.source)
