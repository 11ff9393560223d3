"""Reading and writing volumes: a case's images and label map, checked, in the project's conventions.

Where the files of a case are (layouts, names, manifests) is :mod:`brats_cnn.data.layouts`; this module
reads what it finds (NIfTI with nibabel, BRATS 2013 ``.mha`` with SimpleITK) and writes label maps,
volumes and whole cases atomically.

Arrays: images are ``(4, X, Y, Z)`` float32 in :data:`brats_cnn.CHANNELS` order and in the voxel
order of the file (SimpleITK's ``(z, y, x)`` arrays are transposed to ``(x, y, z)``); label maps are
``(X, Y, Z)`` int16 label values of a convention (:mod:`brats_cnn.data.labels`). Affines are 4x4 float64
voxel-to-RAS+ mm (NIfTI convention); ITK's LPS geometry is converted.
"""

from __future__ import annotations

import gzip
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from brats_cnn import CHANNELS
from brats_cnn.data.files import check_file, describe_error, nibabel_messages
from brats_cnn.data.labels import validate_labels
from brats_cnn.data.layouts import (
    BRATS2013_WRITE_NAMES,
    BRATS2017_NAMES,
    BRATS2023_NAMES,
    LAYOUTS,
    MSD_CHANNELS,
    CaseRef,
    _normalise_channel_map,
    find_case,
)
from brats_cnn.errors import InputError
from brats_cnn.fsutil import atomic_path

log = logging.getLogger(__name__)


# Sequences of one case must share a voxel grid: origin and spacing within this many mm,
# direction cosines within this absolute difference.
AFFINE_TOLERANCE_MM = 1e-3
DIRECTION_TOLERANCE = 1e-4


# LPS (ITK) <-> RAS (NIfTI): negate the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


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
# Reading
# ----------------------------------------------------------------------------------------------

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

    check_file(path)
    raw = None
    if path.name.lower().endswith(".gz"):
        try:
            raw = gzip.decompress(path.read_bytes())
        except EOFError as exc:
            raise InputError("file is truncated (the gzip stream ends early)", path) from exc
        except (gzip.BadGzipFile, zlib.error) as exc:
            raise InputError(f"corrupt gzip data ({describe_error(exc)})", path) from exc
        except OSError as exc:
            raise InputError(f"cannot read file ({exc.strerror})", path) from exc
        try:
            with nibabel_messages(path):
                img = nib.Nifti1Image.from_bytes(raw)
        except (ImageFileError, HeaderDataError, WrapStructError, ValueError, EOFError, OSError) as exc:
            raise InputError(f"not a valid NIfTI-1 image ({describe_error(exc)})", path) from exc
    else:
        try:
            with nibabel_messages(path):
                img = nib.load(path, mmap=False)
        except (ImageFileError, HeaderDataError, WrapStructError, ValueError, EOFError, OSError) as exc:
            raise InputError(f"not a valid NIfTI image ({describe_error(exc)})", path) from exc
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
        raise InputError(f"image data are truncated or unreadable ({describe_error(exc)})", path) from exc
    return data, img


def _read_mha(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Read an ITK image: (array (x, y, z), RAS affine, spacing)."""
    import SimpleITK as sitk

    check_file(path)
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
