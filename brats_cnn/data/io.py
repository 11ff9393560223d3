"""Reading and writing cases: the only module that knows file names and layouts.

Supported layouts (see ``docs/data.md``):

* ``brats2017`` -- BraTS 2017-2021: ``<ID>/<ID>_{t1,t1ce,t2,flair,seg}.nii.gz`` (or ``.nii``).
* ``brats2023`` -- BraTS 2023+: ``<ID>/<ID>-{t1n,t1c,t2w,t2f,seg}.nii.gz``.
* ``nnunet`` -- ``imagesTr/<ID>_{0000..0003}.nii.gz`` with labels in ``labelsTr/<ID>.nii.gz``. The
  default channel map is the one nnU-Net's BraTS dataset conversions use (``Task043_BraTS19``,
  ``Dataset137_BraTS21``): ``0000`` = T1, ``0001`` = T1c, ``0002`` = T2, ``0003`` = FLAIR, i.e. the
  project's own channel order. Other maps are given as ``{"t1": "0001", ...}`` or as a list of
  sequence names in file order (``["flair", "t1", "t1c", "t2"]`` for a converted Decathlon set).
* ``msd`` -- Medical Segmentation Decathlon Task01: one 4-D NIfTI ``(X, Y, Z, 4)`` per case with the
  channels FLAIR, T1w, T1gd, T2w (reordered here to T1, T1c, T2, FLAIR); labels in
  ``../labelsTr/<name>``.
* ``brats2013`` -- BRATS 2012/2013 ``.mha`` files (read with SimpleITK), one case per folder, each
  file possibly in its own subfolder as in the release: ``VSD.Brain.XX.O.MR_T1.54512.mha``,
  ``..MR_T1c..``, ``..MR_T2..``, ``..MR_Flair..`` and the label ``..OT..``; the sequence tag is
  matched case-insensitively as a whole name token.

Arrays: images are ``(4, X, Y, Z)`` float32 in :data:`brats_cnn.CHANNELS` order and in the voxel
order of the file (SimpleITK's ``(z, y, x)`` arrays are transposed to ``(x, y, z)``); label maps are
``(X, Y, Z)`` int16 label values of a convention (:mod:`brats_cnn.data.labels`). Affines are 4x4 float64
voxel-to-RAS+ mm (NIfTI convention); ITK's LPS geometry is converted.
"""

from __future__ import annotations

import csv
import gzip
import logging
import re
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from brats_cnn import CHANNELS
from brats_cnn.errors import InputError
from brats_cnn.fsutil import atomic_path
from brats_cnn.data.labels import validate_labels

log = logging.getLogger(__name__)

LAYOUTS: tuple[str, ...] = ("brats2017", "brats2023", "nnunet", "msd", "brats2013")
GRADES: tuple[str, ...] = ("HGG", "LGG")
UNKNOWN_GRADES: tuple[str, ...] = ("", "UNKNOWN")  # manifest values for data without a grade (BraTS 2021+)

# Sequences of one case must share a voxel grid: origin and spacing within this many mm,
# direction cosines within this absolute difference.
AFFINE_TOLERANCE_MM = 1e-3
DIRECTION_TOLERANCE = 1e-4

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
_GZIP_MAGIC = b"\x1f\x8b"
# LPS (ITK) <-> RAS (NIfTI): negate the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


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


@dataclass(frozen=True)
class Case:
    """A loaded case.

    Attributes:
        image: ``(4, X, Y, Z)`` float32, CHANNELS order, finite.
        label: ``(X, Y, Z)`` int16 label values validated against ``label_convention``, or None.
        affine: ``(4, 4)`` float64 voxel -> RAS+ mm of the reference (first) image.
        header: ``nib.Nifti1Header`` of the reference image (qform/sform kept on write).
        spacing: voxel size in mm along X, Y, Z.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    header: Any
    spacing: tuple[float, float, float]
    label_convention: str | None
    grade: str | None
    source: Path


@dataclass(frozen=True)
class LabelMap:
    """A loaded label map: ``labels`` ``(X, Y, Z)`` int16 values of ``label_convention``."""

    labels: np.ndarray
    affine: np.ndarray
    header: Any
    spacing: tuple[float, float, float]
    label_convention: str
    source: Path


# ----------------------------------------------------------------------------------------------
# Finding cases
# ----------------------------------------------------------------------------------------------

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


def _nifti_ndim(path: Path) -> int:
    """Number of dimensions from a NIfTI header (reads only the header)."""
    import nibabel as nib

    _check_file(path)
    try:
        with _nibabel_messages(path):
            return len(nib.load(path).shape)
    except Exception as exc:  # nibabel raises many types on bad headers
        raise InputError(f"cannot read NIfTI header ({_describe(exc)})", path) from exc


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
            ndim = _nifti_ndim(path)
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
        if _NIFTI_RE.match(file.name) and not _NNUNET_RE.match(file.name) and _nifti_ndim(file) == 4:
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


# ----------------------------------------------------------------------------------------------
# Reading volumes
# ----------------------------------------------------------------------------------------------

def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


@contextmanager
def _nibabel_messages(path: Path) -> Iterator[None]:
    """Re-log nibabel's header messages as one line each, naming the file.

    nibabel reports header checks ("sizeof_hdr should be 348", "data code ... not recognized")
    through a logger of its own that prints them raw to stderr, without the file name. Inside this
    block they are collected and then logged as warnings of this module; a header that cannot be
    used still becomes our InputError.
    """
    from nibabel.imageglobals import logger as nibabel_logger

    records: list[logging.LogRecord] = []
    collector = logging.Handler()
    collector.emit = records.append  # type: ignore[method-assign]
    handlers, propagate = nibabel_logger.handlers[:], nibabel_logger.propagate
    nibabel_logger.handlers, nibabel_logger.propagate = [collector], False
    try:
        yield
    finally:
        nibabel_logger.handlers, nibabel_logger.propagate = handlers, propagate
        for record in records:
            log.warning("%s: nibabel: %s", path, " ".join(record.getMessage().split()))


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise InputError("file not found", path)
    size = path.stat().st_size
    if size == 0:
        raise InputError("file is empty (0 bytes)", path)
    if path.name.lower().endswith(".gz"):
        with open(path, "rb") as handle:
            if handle.read(2) != _GZIP_MAGIC:
                raise InputError("not gzip-compressed although the name ends in .gz "
                                 "(a text file or an uncompressed image?)", path)


def _read_nifti(path: Path) -> tuple[np.ndarray, Any]:
    """Read a NIfTI file fully, so that truncation and corruption are caught now.

    A ``.gz`` file is decompressed in one go with :func:`gzip.decompress`, which also verifies the
    gzip CRC and length (nibabel alone stops reading before the checksum). Returns
    ``(array in the file's dtype after scaling, nibabel image)``.
    """
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError
    from nibabel.wrapstruct import WrapStructError

    _check_file(path)
    raw = None
    if path.name.lower().endswith(".gz"):
        try:
            raw = gzip.decompress(path.read_bytes())
        except EOFError as exc:
            raise InputError("file is truncated (the gzip stream ends early)", path) from exc
        except (gzip.BadGzipFile, zlib.error) as exc:
            raise InputError(f"corrupt gzip data ({_describe(exc)})", path) from exc
        except OSError as exc:
            raise InputError(f"cannot read file ({exc.strerror})", path) from exc
        try:
            with _nibabel_messages(path):
                img = nib.Nifti1Image.from_bytes(raw)
        except (ImageFileError, HeaderDataError, WrapStructError, ValueError, EOFError, OSError) as exc:
            raise InputError(f"not a valid NIfTI-1 image ({_describe(exc)})", path) from exc
    else:
        try:
            with _nibabel_messages(path):
                img = nib.load(path, mmap=False)
        except (ImageFileError, HeaderDataError, WrapStructError, ValueError, EOFError, OSError) as exc:
            raise InputError(f"not a valid NIfTI image ({_describe(exc)})", path) from exc
    # a corrupt dim field can declare terabytes: compare with the bytes present before reading
    header = img.header
    shape = tuple(int(n) for n in header.get_data_shape())
    needed = int(header.get_data_offset()) + int(np.prod(shape, dtype=object)) * header.get_data_dtype().itemsize
    present = len(raw) if raw is not None else path.stat().st_size
    if needed > present:
        raise InputError(f"image data are truncated or unreadable (the header declares shape {shape} of "
                         f"{header.get_data_dtype()}, {needed} bytes, but the file holds {present})", path)
    try:
        data = np.asarray(img.dataobj)
    except (OSError, EOFError, ValueError, MemoryError, OverflowError) as exc:
        raise InputError(f"image data are truncated or unreadable ({_describe(exc)})", path) from exc
    return data, img


def _read_mha(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Read an ITK image: (array (x, y, z), RAS affine, spacing)."""
    import SimpleITK as sitk

    _check_file(path)
    try:
        image = sitk.ReadImage(str(path))
        data = sitk.GetArrayViewFromImage(image)
    except RuntimeError as exc:
        raise InputError(f"cannot read image ({' '.join(str(exc).split())[-200:]})", path) from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"image is {image.GetDimension()}-D with {image.GetNumberOfComponentsPerPixel()} "
                         "component(s); expected a 3-D scalar volume", path)
    spacing = tuple(float(s) for s in image.GetSpacing())
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction * np.asarray(spacing)
    affine_lps[:3, 3] = image.GetOrigin()
    return np.array(data).transpose(2, 1, 0), _LPS_TO_RAS @ affine_lps, spacing


def _as_3d(data: np.ndarray, path: Path) -> np.ndarray:
    if data.ndim == 4 and data.shape[3] == 1:
        return data[..., 0]
    if data.ndim != 3:
        raise InputError(f"image is {data.ndim}-D with shape {tuple(data.shape)}; expected a 3-D volume", path)
    return data


def affine_difference(affine: np.ndarray, ref_affine: np.ndarray) -> tuple[float, float, bool]:
    """How far two voxel grids' affines differ.

    Returns:
        ``(mm, direction, within_tolerance)``: the largest difference in origin or voxel spacing
        (mm), the largest difference of the direction cosines, and whether both are within
        :data:`AFFINE_TOLERANCE_MM` and :data:`DIRECTION_TOLERANCE`.
    """
    spacing, ref_spacing = np.linalg.norm(affine[:3, :3], axis=0), np.linalg.norm(ref_affine[:3, :3], axis=0)
    mm = float(max(np.abs(spacing - ref_spacing).max(), np.abs(affine[:3, 3] - ref_affine[:3, 3]).max()))
    direction = float(np.abs(affine[:3, :3] / spacing - ref_affine[:3, :3] / ref_spacing).max())
    return mm, direction, mm <= AFFINE_TOLERANCE_MM and direction <= DIRECTION_TOLERANCE


def _check_same_grid(shape: tuple, affine: np.ndarray, ref_shape: tuple, ref_affine: np.ndarray,
                     ref_path: Path, path: Path, what: str = "shape") -> None:
    if tuple(shape) != tuple(ref_shape):
        raise InputError(f"{what} {tuple(shape)} differs from {tuple(ref_shape)} of {ref_path.name}; "
                         "all volumes of a case must share one voxel grid", path)
    mm, direction, same = affine_difference(affine, ref_affine)
    if not same:
        raise InputError(f"affine differs from that of {ref_path.name} (by {mm:.3g} mm in origin/spacing, "
                         f"{direction:.3g} in direction cosines; tolerance {AFFINE_TOLERANCE_MM:g} mm, "
                         f"{DIRECTION_TOLERANCE:g}); all volumes of a case must share one voxel grid", path)


def _warn_axial(affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    codes = nib.aff2axcodes(affine)
    if codes[2] not in ("S", "I"):
        log.warning("%s: third voxel axis points %s (orientation %s), not superior/inferior; axial patches "
                    "assume the third axis is the slice axis (not reoriented)", path, codes[2], "".join(codes))


def header_from_affine(affine: np.ndarray, shape: tuple) -> Any:
    """A NIfTI header (qform and sform code 1, scanner) for a non-NIfTI source."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm")
    return header


def _store_channel(out: np.ndarray, index: int, data: np.ndarray, path: Path) -> None:
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is reported just below
        out[index] = data  # casts to float32 without an extra copy
    if not np.isfinite(out[index]).all():
        bad = int(np.count_nonzero(~np.isfinite(out[index])))
        raise InputError(f"image has {bad} NaN or infinite voxel(s); expected finite intensities", path)


def _unscaled_background(data: np.ndarray, img: Any, path: Path) -> np.ndarray:
    """Voxels stored as 0 stay 0 after the header's ``scl_slope``/``scl_inter`` scaling.

    nibabel applies ``value = stored * scl_slope + scl_inter``; with an intercept the stored 0 of
    the skull-stripped background becomes ``scl_inter``, and the brain mask (any sequence non-zero)
    would then cover the whole volume. Intensities inside the brain keep the scaling (Nyul and the
    z-score are invariant to it); the background is put back to 0.
    """
    inter = getattr(img.dataobj, "inter", 0.0)  # nibabel moves the header's scaling to the data proxy
    if inter is None or not np.isfinite(inter) or inter == 0:
        return data
    stored = np.asarray(img.dataobj.get_unscaled())
    log.debug("%s: scl_inter %g: the %d voxels stored as 0 are background (0)", path, inter,
              int(np.count_nonzero(stored == 0)))
    return np.where(stored == 0, np.zeros((), data.dtype), data)


def _load_images(ref: CaseRef) -> tuple[np.ndarray, np.ndarray, Any, tuple[float, float, float]]:
    """Read the four images of a case: (image (4,X,Y,Z) float32, affine, header, spacing)."""
    if ref.layout == "msd":
        path = ref.image_paths[0]
        data, img = _read_nifti(path)
        data = _unscaled_background(data, img, path)
        if data.ndim != 4 or data.shape[3] != len(MSD_CHANNELS):
            raise InputError(f"image has shape {tuple(data.shape)}; expected a 3-D volume or a 4-D (X, Y, Z, 4) "
                             "image with channels FLAIR, T1w, T1gd, T2w (Decathlon Task01)", path)
        image = np.empty((len(CHANNELS),) + data.shape[:3], dtype=np.float32)
        for index, seq in enumerate(CHANNELS):
            _store_channel(image, index, data[..., MSD_CHANNELS.index(seq)], path)
        header = img.header
        return image, img.affine, header, tuple(float(z) for z in header.get_zooms()[:3])
    image = None
    for index, path in enumerate(ref.image_paths):
        if ref.layout == "brats2013":
            data, affine, spacing = _read_mha(path)
            header = None
        else:
            data, img = _read_nifti(path)
            data = _unscaled_background(data, img, path)
            affine, header = img.affine, img.header
            spacing = tuple(float(z) for z in header.get_zooms()[:3])
        data = _as_3d(data, path)
        if image is None:
            image = np.empty((len(CHANNELS),) + data.shape, dtype=np.float32)
            ref_path, ref_affine, ref_spacing = path, affine, spacing
            ref_header = header if header is not None else header_from_affine(affine, data.shape)
        else:
            _check_same_grid(data.shape, affine, image.shape[1:], ref_affine, ref_path, path)
        _store_channel(image, index, data, path)
    return image, ref_affine, ref_header, ref_spacing


def _read_label_volume(path: Path) -> tuple[np.ndarray, np.ndarray, Any, tuple[float, float, float]]:
    if path.name.lower().endswith(".mha"):
        data, affine, spacing = _read_mha(path)
        return data, affine, header_from_affine(affine, data.shape), spacing
    data, img = _read_nifti(path)
    data = _as_3d(data, path)
    return data, img.affine, img.header, tuple(float(z) for z in img.header.get_zooms()[:3])


def load_label_map(path: str | Path, *, label_convention: str = "brats2017") -> LabelMap:
    """Read a label map (NIfTI or .mha) and validate it against ``label_convention``.

    Returns:
        :class:`LabelMap` with ``labels`` ``(X, Y, Z)`` int16.

    Raises:
        InputError: unreadable file, not 3-D, non-integer values or values outside the convention.
    """
    path = Path(path)
    data, affine, header, spacing = _read_label_volume(path)
    labels = validate_labels(data, label_convention, path)
    return LabelMap(labels, affine, header, spacing, label_convention, path)


def load_case(path_or_ref: str | Path | CaseRef, *, label_convention: str = "brats2017", load_label: bool = True,
              channel_map: Mapping[str, str | int] | Sequence[str] | None = None) -> Case:
    """Load a case: four images as one ``(4, X, Y, Z)`` float32 array plus the label map.

    Args:
        path_or_ref: a :class:`CaseRef`, a case folder, one of its files, or a 4-D NIfTI.
        label_convention: convention of the label values in the file (checked, not converted).
        load_label: read the label map when the case has one.
        channel_map: nnU-Net channel map when ``path_or_ref`` is a path.

    Raises:
        InputError: naming the file, for every problem listed in ``docs/data.md``.
    """
    ref = path_or_ref if isinstance(path_or_ref, CaseRef) else find_case(path_or_ref, channel_map=channel_map)
    image, affine, header, spacing = _load_images(ref)
    _warn_axial(affine, ref.image_paths[0])
    label = None
    if load_label and ref.label_path is not None:
        data, label_affine, _, _ = _read_label_volume(ref.label_path)
        _check_same_grid(data.shape, label_affine, image.shape[1:], affine, ref.image_paths[0], ref.label_path,
                         what="label map shape")
        label = validate_labels(data, label_convention, ref.label_path)
    return Case(ref.case_id, image, label, np.asarray(affine, dtype=np.float64), header, spacing,
                label_convention if label is not None else None, ref.grade,
                ref.source if ref.source is not None else ref.image_paths[0].parent)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

def _reference_geometry(reference: Case | LabelMap) -> tuple[np.ndarray, Any, tuple[int, ...]]:
    if isinstance(reference, Case):
        return reference.affine, reference.header, tuple(reference.image.shape[1:])
    return reference.affine, reference.header, tuple(reference.labels.shape)


def _write_nifti(array: np.ndarray, affine: np.ndarray, header: Any, path: Path, dtype: Any,
                 description: str | None = None) -> Path:
    """Write atomically, keeping the reference header's qform/sform codes (``descrip`` if given)."""
    import nibabel as nib

    header = header.copy() if header is not None else header_from_affine(affine, array.shape[:3])
    qform_code, sform_code = int(header["qform_code"]), int(header["sform_code"])
    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine, header)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.set_qform(affine, code=qform_code)
    img.set_sform(affine, code=sform_code)
    if description is not None:
        img.header["descrip"] = description.encode()[:79]
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return Path(path)


def save_label_map(labels: np.ndarray, reference: Case | LabelMap, path: str | Path,
                   description: str | None = None) -> Path:
    """Write ``labels`` ``(X, Y, Z)`` integer values 0..255 as uint8 NIfTI, atomically.

    The reference's affine and header (qform/sform codes) are kept; ``description`` goes to the
    header's ``descrip`` field (``segment`` marks its outputs so that it knows them again).
    """
    path = Path(path)
    affine, header, shape = _reference_geometry(reference)
    labels = np.asarray(labels)
    if labels.shape != shape:
        raise InputError(f"label map shape {labels.shape} differs from the reference shape {shape}", path)
    if not np.issubdtype(labels.dtype, np.integer) and not np.array_equal(labels, np.round(labels)):
        raise InputError("label map has non-integer values; expected integer labels", path)
    if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.uint8).max):
        raise InputError(f"label values must be 0..255 for uint8, got {labels.min()}..{labels.max()}", path)
    return _write_nifti(labels, affine, header, path, np.uint8, description)


def save_volume(array: np.ndarray, reference: Case | LabelMap, path: str | Path, dtype: Any = np.float32,
                description: str | None = None) -> Path:
    """Write any ``(X, Y, Z)`` or ``(X, Y, Z, C)`` array as NIfTI on the reference's grid, atomically."""
    path = Path(path)
    affine, header, shape = _reference_geometry(reference)
    array = np.asarray(array)
    if tuple(array.shape[:3]) != shape:
        raise InputError(f"volume shape {array.shape} does not start with the reference shape {shape}", path)
    return _write_nifti(array, affine, header, path, dtype, description)


def _write_mha(array: np.ndarray, affine: np.ndarray, path: Path, dtype: Any) -> Path:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array, dtype=dtype).transpose(2, 1, 0)))
    affine_lps = _LPS_TO_RAS @ affine
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in affine_lps[:3, 3]))
    image.SetDirection(tuple(float(d) for d in (affine_lps[:3, :3] / spacing).ravel()))
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return path


def save_case(case: Case, folder: str | Path, layout: str = "brats2017", *,
              channel_map: Mapping[str, str | int] | Sequence[str] | None = None,
              image_dtype: Any = np.float32) -> CaseRef:
    """Write a case in one of :data:`LAYOUTS` (labels are written as they are, in their convention).

    ``folder`` is the dataset root for ``nnunet`` and ``msd`` (files go to ``imagesTr``/``labelsTr``)
    and the parent of the case folder for the others. Returns the written case's :class:`CaseRef`.
    """
    folder = Path(folder)
    cid = case.case_id
    label = None if case.label is None else case.label.astype(np.uint8)
    if layout in ("brats2017", "brats2023"):
        names = BRATS2017_NAMES if layout == "brats2017" else BRATS2023_NAMES
        sep = "_" if layout == "brats2017" else "-"
        base = folder / cid
        for index, seq in enumerate(CHANNELS):
            save_volume(case.image[index], case, base / f"{cid}{sep}{names[seq]}.nii.gz", image_dtype)
        if label is not None:
            save_label_map(label, case, base / f"{cid}{sep}{names['label']}.nii.gz")
        return find_case(base)
    if layout == "nnunet":
        cmap = _normalise_channel_map(channel_map)
        for index, seq in enumerate(CHANNELS):
            save_volume(case.image[index], case, folder / "imagesTr" / f"{cid}_{cmap[seq]}.nii.gz", image_dtype)
        if label is not None:
            save_label_map(label, case, folder / "labelsTr" / f"{cid}.nii.gz")
        return find_case(folder / "imagesTr" / f"{cid}_0000.nii.gz", channel_map=cmap)
    if layout == "msd":
        stacked = np.stack([case.image[CHANNELS.index(seq)] for seq in MSD_CHANNELS], axis=-1)
        save_volume(stacked, case, folder / "imagesTr" / f"{cid}.nii.gz", image_dtype)
        if label is not None:
            save_label_map(label, case, folder / "labelsTr" / f"{cid}.nii.gz")
        return find_case(folder / "imagesTr" / f"{cid}.nii.gz")
    if layout == "brats2013":
        base = folder / cid
        for index, seq in enumerate(CHANNELS):
            name = f"{BRATS2013_WRITE_NAMES[seq]}.{index + 1}"
            _write_mha(case.image[index], case.affine, base / name / f"{name}.mha", image_dtype)
        if label is not None:
            name = f"{BRATS2013_WRITE_NAMES['label']}.{len(CHANNELS) + 1}"
            _write_mha(label, case.affine, base / name / f"{name}.mha", np.uint8)
        return find_case(base)
    raise InputError(f"unknown layout '{layout}' (expected one of: {', '.join(LAYOUTS)})", folder)
