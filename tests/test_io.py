"""Tests for brats_cnn.data.io: every layout, every bad input (exact messages), writing, real data."""

from __future__ import annotations

import csv
import gzip
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_cnn.data import io
from brats_cnn.data import layouts
from brats_cnn.errors import BratsCnnError, InputError
from brats_cnn.data.phantom import make_phantom, write_phantom_dataset

SHAPE = (16, 14, 8)


@pytest.fixture()
def phantom():
    return make_phantom(SHAPE, seed=3)


@pytest.fixture()
def case_dir(tmp_path, phantom) -> Path:
    """A phantom written in the BraTS 2017-21 layout: tmp/Phantom/Phantom_{t1,...}.nii.gz."""
    case = make_phantom(SHAPE, seed=3, case_id="Phantom")
    io.save_case(case, tmp_path, "brats2017")
    return tmp_path / "Phantom"


def _nii(folder: Path, tag: str) -> Path:
    return folder / f"Phantom_{tag}.nii.gz"


def _overwrite(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    """Replace a NIfTI file's data (and optionally its affine)."""
    nib.save(nib.Nifti1Image(data, nib.load(path).affine if affine is None else affine), path)


def _error(func, *args, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        func(*args, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Layouts: written from a phantom, found, loaded, identical arrays in CHANNELS order
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout,convention", [("brats2017", "brats2017"), ("brats2023", "brats2023"),
                                               ("nnunet", "brats2017"), ("msd", "msd"),
                                               ("brats2013", "brats2013")])
def test_every_layout_round_trips_the_phantom(tmp_path, layout, convention):
    source = make_phantom(SHAPE, seed=5, label_convention=convention, case_id="Phantom_005")
    ref = io.save_case(source, tmp_path, layout)
    assert ref.layout == layout and ref.case_id == "Phantom_005"
    case = io.load_case(ref, label_convention=convention)
    assert case.image.dtype == np.float32 and case.image.shape == (4,) + SHAPE
    np.testing.assert_array_equal(case.image, source.image)  # channel order T1, T1c, T2, FLAIR
    np.testing.assert_array_equal(case.label, source.label)
    assert case.label.dtype == np.int16 and case.label_convention == convention
    np.testing.assert_allclose(case.affine, source.affine, atol=1e-6)
    assert case.spacing == (1.0, 1.0, 1.0)
    # the channels really are different sequences in the right order (not a permutation)
    for index in range(4):
        assert not np.array_equal(case.image[index], source.image[(index + 1) % 4])


def test_brats2017_file_names_and_single_file_gives_the_case(case_dir):
    names = sorted(p.name for p in case_dir.iterdir())
    assert names == ["Phantom_flair.nii.gz", "Phantom_seg.nii.gz", "Phantom_t1.nii.gz",
                     "Phantom_t1ce.nii.gz", "Phantom_t2.nii.gz"]
    from_folder = layouts.find_case(case_dir)
    from_file = layouts.find_case(_nii(case_dir, "t2"))
    assert from_folder == from_file
    assert [p.name for p in from_folder.image_paths] == ["Phantom_t1.nii.gz", "Phantom_t1ce.nii.gz",
                                                         "Phantom_t2.nii.gz", "Phantom_flair.nii.gz"]
    assert from_folder.label_path == _nii(case_dir, "seg") and from_folder.source == case_dir


def test_brats2017_accepts_uncompressed_nii(tmp_path, phantom):
    folder = tmp_path / "C1"
    folder.mkdir()
    for tag, index in (("t1", 0), ("t1ce", 1), ("t2", 2), ("flair", 3)):
        nib.save(nib.Nifti1Image(phantom.image[index], phantom.affine), folder / f"C1_{tag}.nii")
    case = io.load_case(folder)
    np.testing.assert_array_equal(case.image, phantom.image)
    assert case.label is None and case.label_convention is None


def test_brats2023_names(tmp_path, phantom):
    ref = io.save_case(phantom, tmp_path, "brats2023")
    assert [p.name for p in ref.image_paths] == [f"phantom_003-{t}.nii.gz" for t in ("t1n", "t1c", "t2w", "t2f")]
    assert ref.label_path.name == "phantom_003-seg.nii.gz"
    assert layouts.find_case(ref.image_paths[3]) == ref


def test_nnunet_default_channel_map_is_t1_t1c_t2_flair(tmp_path, phantom):
    ref = io.save_case(phantom, tmp_path, "nnunet")
    assert [p.name for p in ref.image_paths] == [f"phantom_003_000{k}.nii.gz" for k in range(4)]
    assert ref.label_path == tmp_path / "labelsTr" / "phantom_003.nii.gz"
    assert layouts.DEFAULT_NNUNET_CHANNEL_MAP == {"t1": "0000", "t1c": "0001", "t2": "0002", "flair": "0003"}


@pytest.mark.parametrize("channel_map", [{"flair": "0000", "t1": "0001", "t1c": "0002", "t2": "0003"},
                                         ["flair", "t1", "t1c", "t2"],
                                         {"flair": 0, "t1": 1, "t1c": 2, "t2": 3}])
def test_nnunet_custom_channel_map(tmp_path, phantom, channel_map):
    io.save_case(phantom, tmp_path, "nnunet", channel_map=channel_map)
    # FLAIR really sits in _0000 on disk
    on_disk = np.asarray(nib.load(tmp_path / "imagesTr" / "phantom_003_0000.nii.gz").dataobj)
    np.testing.assert_array_equal(on_disk, phantom.image[3])
    case = io.load_case(tmp_path / "imagesTr" / "phantom_003_0002.nii.gz", channel_map=channel_map)
    np.testing.assert_array_equal(case.image, phantom.image)
    refs = layouts.list_cases(tmp_path, channel_map=channel_map)
    assert [r.case_id for r in refs] == ["phantom_003"]


def test_bad_channel_map_is_rejected(tmp_path):
    assert _error(layouts.find_case, tmp_path, channel_map=["t1", "t1c", "t2"]) == (
        "channel map {'t1': '0000', 't1c': '0001', 't2': '0002'} must give each of "
        "['t1', 't1c', 't2', 'flair'] its own file index")


def test_msd_file_has_flair_t1_t1gd_t2_order_on_disk(tmp_path, phantom):
    ref = io.save_case(phantom, tmp_path, "msd")
    data = np.asarray(nib.load(ref.image_paths[0]).dataobj)
    assert data.shape == SHAPE + (4,)
    np.testing.assert_array_equal(data[..., 0], phantom.image[3])  # FLAIR
    np.testing.assert_array_equal(data[..., 1], phantom.image[0])  # T1w
    np.testing.assert_array_equal(data[..., 2], phantom.image[1])  # T1gd
    np.testing.assert_array_equal(data[..., 3], phantom.image[2])  # T2w
    assert ref.label_path == tmp_path / "labelsTr" / "phantom_003.nii.gz"
    assert layouts.find_case(ref.image_paths[0]) == ref
    case = io.load_case(ref.image_paths[0], label_convention="brats2017")
    assert case.header.get_data_shape() == SHAPE + (4,)


def test_brats2013_mha_geometry_and_names(tmp_path):
    source = make_phantom(SHAPE, seed=2, label_convention="brats2013", spacing=(0.9, 0.9, 2.5))
    ref = io.save_case(source, tmp_path, "brats2013")
    assert [p.name for p in ref.image_paths] == ["VSD.Brain.XX.O.MR_T1.1.mha", "VSD.Brain.XX.O.MR_T1c.2.mha",
                                                 "VSD.Brain.XX.O.MR_T2.3.mha", "VSD.Brain.XX.O.MR_Flair.4.mha"]
    assert ref.label_path.name == "VSD.Brain_3more.XX.O.OT.5.mha"
    import SimpleITK as sitk

    itk = sitk.ReadImage(str(ref.image_paths[0]))
    assert itk.GetSize() == SHAPE  # ITK (x, y, z) size = our array shape
    np.testing.assert_allclose(itk.GetSpacing(), (0.9, 0.9, 2.5))
    # the phantom affine is LPS-stored in RAS terms (diag(-,-,+)), i.e. identity direction in ITK
    np.testing.assert_allclose(itk.GetDirection(), np.eye(3).ravel(), atol=1e-12)
    case = io.load_case(ref.label_path, label_convention="brats2013")  # any file of the case
    np.testing.assert_array_equal(case.image, source.image)
    np.testing.assert_allclose(case.affine, source.affine, atol=1e-9)
    assert case.spacing == pytest.approx((0.9, 0.9, 2.5))
    assert sorted(np.unique(case.label)) == [0, 1, 2, 3, 4]


def test_brats2013_tags_match_case_insensitively_in_a_flat_folder(tmp_path, phantom):
    import SimpleITK as sitk

    folder = tmp_path / "HG0001"
    folder.mkdir()
    for name, index in (("vsd.brain.xx.o.mr_flair.11", 3), ("VSD.Brain.XX.O.MR_T1C.12", 1),
                        ("VSD.Brain.XX.O.MR_t1.13", 0), ("VSD.Brain.XX.O.MR_T2.14", 2)):
        sitk.WriteImage(sitk.GetImageFromArray(phantom.image[index].transpose(2, 1, 0).copy()),
                        str(folder / f"{name}.mha"))
    ref = layouts.find_case(folder)
    assert ref.case_id == "HG0001" and ref.label_path is None
    np.testing.assert_array_equal(io.load_case(ref).image, phantom.image)


def test_label_conventions_round_trip_through_files(tmp_path):
    for convention in ("brats2013", "brats2017", "brats2023", "msd"):
        source = make_phantom(SHAPE, seed=4, label_convention=convention)
        path = io.save_label_map(source.label, source, tmp_path / f"{convention}.nii.gz")
        loaded = io.load_label_map(path, label_convention=convention)
        np.testing.assert_array_equal(loaded.labels, source.label)
        assert loaded.labels.dtype == np.int16 and loaded.label_convention == convention
        assert nib.load(path).get_data_dtype() == np.uint8


# ---------------------------------------------------------------------------------------------
# list_cases and manifests
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_list_cases_every_layout_with_manifest_grades(tmp_path, layout):
    written = write_phantom_dataset(tmp_path, 3, layout, seed=10, shape=SHAPE, grades=["LGG", "HGG", "LGG"])
    refs = layouts.list_cases(tmp_path)
    assert [r.case_id for r in refs] == ["Phantom_010", "Phantom_011", "Phantom_012"]
    assert [r.grade for r in refs] == ["LGG", "HGG", "LGG"]
    assert {r.layout for r in refs} == {layout}
    assert [r.image_paths for r in refs] == [w.image_paths for w in written]
    assert all(r.label_path is not None and r.label_path.is_file() for r in refs)


def test_list_cases_grade_folders_and_manifest_override(tmp_path):
    write_phantom_dataset(tmp_path, 3, "brats2017", shape=SHAPE, grade_folders=True, write_manifest=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["HGG", "LGG"]
    refs = layouts.list_cases(tmp_path)
    assert [(r.case_id, r.grade) for r in refs] == [("Phantom_000", "HGG"), ("Phantom_001", "LGG"),
                                                    ("Phantom_002", "HGG")]
    manifest = tmp_path / "other.csv"
    manifest.write_text("case_id,grade,notes\nPhantom_000,lgg,x\n")
    refs = layouts.list_cases(tmp_path, manifest=manifest)
    assert [r.grade for r in refs] == ["LGG", "LGG", "HGG"]


def test_list_cases_without_manifest_has_no_grades_and_accepts_image_folder(tmp_path):
    write_phantom_dataset(tmp_path, 2, "nnunet", shape=SHAPE, write_manifest=False)
    assert [r.grade for r in layouts.list_cases(tmp_path)] == [None, None]
    assert [r.case_id for r in layouts.list_cases(tmp_path / "imagesTr")] == ["Phantom_000", "Phantom_001"]


def test_list_cases_single_case_folder_and_file(case_dir):
    assert [r.case_id for r in layouts.list_cases(case_dir)] == ["Phantom"]
    assert [r.case_id for r in layouts.list_cases(_nii(case_dir, "flair"))] == ["Phantom"]


def test_list_cases_empty_folder(tmp_path):
    assert _error(layouts.list_cases, tmp_path) == f"{tmp_path}: no cases found; {layouts._UNKNOWN_LAYOUT}"


def test_read_manifest(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("case_id,grade,dataset\nA,HGG,x\nB, lgg ,y\n")
    assert layouts.read_manifest(path) == {"A": "HGG", "B": "LGG"}
    path.write_text("case_id,grade\nA,GBM\n")
    assert _error(layouts.read_manifest, path) == f"{path}: line 2: grade 'GBM' must be HGG or LGG"
    path.write_text("id,grade\nA,HGG\n")
    assert _error(layouts.read_manifest, path) == (
        f"{path}: manifest needs a header row with columns case_id,grade and at least one row")
    assert _error(layouts.read_manifest, tmp_path / "none.csv") == (
        f"{tmp_path / 'none.csv'}: cannot read manifest (No such file or directory)")


def test_manifest_of_the_real_sample(sample_dir):
    # expected counts come from the manifest itself (parsed with csv here), not from code: the sample grows
    with open(sample_dir / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    expected = {row["case_id"]: row["grade"] for row in rows}
    case_folders = sorted(p.name for p in sample_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(expected) == len(rows) > 0 and sorted(expected) == case_folders
    grades = layouts.read_manifest(sample_dir / "manifest.csv")
    assert grades == expected and sorted(set(grades.values())) == ["HGG", "LGG"]
    assert grades["Brats18_TCIA10_628_1"] == "LGG" and grades["Brats18_CBICA_ABM_1"] == "HGG"
    refs = layouts.list_cases(sample_dir)
    assert [r.case_id for r in refs] == case_folders
    assert {r.case_id: r.grade for r in refs} == expected
    assert [r.grade for r in refs].count("LGG") == list(expected.values()).count("LGG")
    assert all(r.layout == "brats2017" for r in refs)


# ---------------------------------------------------------------------------------------------
# Bad input: one test per problem, exact message
# ---------------------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    assert _error(io.load_case, tmp_path / "nope") == f"{tmp_path / 'nope'}: no such file or folder"


def test_missing_sequence_is_named(case_dir):
    _nii(case_dir, "flair").unlink()
    assert _error(io.load_case, case_dir) == (
        f"{case_dir}: case Phantom has no flair image (expected Phantom_flair.nii.gz)")


def test_missing_nnunet_channel_is_named(tmp_path, phantom):
    io.save_case(phantom, tmp_path, "nnunet")
    (tmp_path / "imagesTr" / "phantom_003_0001.nii.gz").unlink()
    assert _error(layouts.list_cases, tmp_path) == (
        f"{tmp_path / 'imagesTr'}: case phantom_003 has no t1c image (expected phantom_003_0001.nii.gz by the "
        "channel map {'t1': '0000', 't1c': '0001', 't2': '0002', 'flair': '0003'})")


def test_unknown_layout(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    expected = ("unknown layout: expected BraTS 2017-21 <ID>_t1/_t1ce/_t2/_flair.nii.gz, BraTS 2023 "
                "<ID>-t1n/-t1c/-t2w/-t2f.nii.gz, nnU-Net <ID>_0000..0003.nii.gz, a Decathlon 4-D NIfTI "
                "or BRATS 2013 .mha files")
    assert _error(layouts.find_case, tmp_path) == f"{tmp_path}: {expected}"
    assert _error(layouts.find_case, tmp_path / "notes.txt") == f"{tmp_path / 'notes.txt'}: {expected}"


def test_single_3d_file_is_not_a_case(tmp_path, phantom):
    path = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(phantom.image[0], phantom.affine), path)
    assert _error(layouts.find_case, path).startswith(f"{path}: unknown layout: expected BraTS 2017-21")


def test_shape_mismatch_between_sequences(case_dir, phantom):
    _overwrite(_nii(case_dir, "t2"), phantom.image[2][:, :, :7])
    assert _error(io.load_case, case_dir) == (
        f"{_nii(case_dir, 't2')}: shape (16, 14, 7) differs from (16, 14, 8) of Phantom_t1.nii.gz; "
        "all volumes of a case must share one voxel grid")


def test_affine_mismatch_beyond_tolerance(case_dir, phantom):
    shifted = phantom.affine.copy()
    shifted[0, 3] += 0.5
    _overwrite(_nii(case_dir, "t1ce"), phantom.image[1], shifted)
    assert _error(io.load_case, case_dir) == (
        f"{_nii(case_dir, 't1ce')}: affine differs from that of Phantom_t1.nii.gz (by 0.5 mm in origin/spacing, "
        "0 in direction cosines; tolerance 0.001 mm, 0.0001); all volumes of a case must share one voxel grid")


def test_affine_rotation_beyond_tolerance(case_dir, phantom):
    angle = 1e-3  # radians: direction cosines change by ~1e-3 > 1e-4
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    _overwrite(_nii(case_dir, "flair"), phantom.image[3], phantom.affine @ rotation)
    assert "differs from that of Phantom_t1.nii.gz" in _error(io.load_case, case_dir)


def test_affine_difference_within_tolerance_loads(case_dir, phantom):
    shifted = phantom.affine.copy()
    shifted[:3, 3] += 2e-4  # well inside 1e-3 mm (and float32 qform precision)
    _overwrite(_nii(case_dir, "t2"), phantom.image[2], shifted)
    np.testing.assert_array_equal(io.load_case(case_dir).image, phantom.image)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_voxels(case_dir, phantom, bad):
    data = phantom.image[0].copy()
    data[3, 4, 5] = bad
    data[0, 0, 0] = bad
    _overwrite(_nii(case_dir, "t1"), data)
    assert _error(io.load_case, case_dir) == (
        f"{_nii(case_dir, 't1')}: image has 2 NaN or infinite voxel(s); expected finite intensities")


def test_float64_overflowing_float32_is_rejected(case_dir, phantom):
    data = phantom.image[0].astype(np.float64)
    data[1, 1, 1] = 1e300
    _overwrite(_nii(case_dir, "t1"), data)
    assert "image has 1 NaN or infinite voxel(s)" in _error(io.load_case, case_dir)


def test_not_3d(case_dir, phantom):
    _overwrite(_nii(case_dir, "t2"), phantom.image[2][:, :, 0])
    assert _error(io.load_case, case_dir) == (
        f"{_nii(case_dir, 't2')}: image is 2-D with shape (16, 14); expected a 3-D volume")


def test_trailing_singleton_dimension_is_accepted(case_dir, phantom):
    _overwrite(_nii(case_dir, "t2"), phantom.image[2][..., None])
    np.testing.assert_array_equal(io.load_case(case_dir).image, phantom.image)


def test_4d_with_wrong_channel_count(tmp_path, phantom):
    path = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(np.stack(list(phantom.image[:3]), axis=-1), phantom.affine), path)
    assert _error(io.load_case, path) == (
        f"{path}: image has shape (16, 14, 8, 3); expected a 3-D volume or a 4-D (X, Y, Z, 4) image with "
        "channels FLAIR, T1w, T1gd, T2w (Decathlon Task01)")


def test_truncated_gzip(case_dir):
    path = _nii(case_dir, "t1ce")
    path.write_bytes(path.read_bytes()[:400])
    assert _error(io.load_case, case_dir) == f"{path}: file is truncated (the gzip stream ends early)"


def test_corrupt_gzip_crc(case_dir):
    path = _nii(case_dir, "t1ce")
    data = path.read_bytes()
    path.write_bytes(data[:-8] + bytes(4) + data[-4:])  # damage the CRC32 trailer only
    assert _error(io.load_case, case_dir) == f"{path}: corrupt gzip data (BadGzipFile: CRC check failed)"


def test_gzip_of_a_short_nifti(case_dir):
    path = _nii(case_dir, "t1ce")
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))  # valid gzip, image data 100 bytes short
    assert _error(io.load_case, case_dir) == (
        f"{path}: image data are truncated or unreadable (OSError: Expected {SHAPE[0] * SHAPE[1] * SHAPE[2] * 4} "
        f"bytes, got {SHAPE[0] * SHAPE[1] * SHAPE[2] * 4 - 100} bytes from object - could the file be damaged?)")


def test_gzip_of_garbage(case_dir):
    path = _nii(case_dir, "t2")
    path.write_bytes(gzip.compress(b"x" * 20))
    assert _error(io.load_case, case_dir) == (
        f"{path}: not a valid NIfTI-1 image (WrapStructError: Binary block is wrong size)")


def test_empty_file(case_dir):
    _nii(case_dir, "flair").write_bytes(b"")
    assert _error(io.load_case, case_dir) == f"{_nii(case_dir, 'flair')}: file is empty (0 bytes)"


def test_text_file_named_nii_gz(case_dir):
    _nii(case_dir, "flair").write_text("this is not an image\n")
    assert _error(io.load_case, case_dir) == (
        f"{_nii(case_dir, 'flair')}: not gzip-compressed although the name ends in .gz "
        "(a text file or an uncompressed image?)")


def test_text_file_named_nii(tmp_path):
    path = tmp_path / "x.nii"
    path.write_text("just text, long enough to be read as a header? no." * 10)
    assert _error(io.load_label_map, path).startswith(f"{path}: not a valid NIfTI image (")


def test_label_values_outside_the_convention(case_dir, phantom):
    labels = phantom.label.copy()
    labels[0, 0, 0] = 3
    _overwrite(_nii(case_dir, "seg"), labels.astype(np.uint8))
    assert _error(io.load_case, case_dir) == (
        f"{_nii(case_dir, 'seg')}: label values [3] are not in the brats2017 convention (expected [0, 1, 2, 4]); "
        "pass the right --label-convention")
    # the same file is fine as brats2013
    assert io.load_case(case_dir, label_convention="brats2013").label[0, 0, 0] == 3


def test_non_integer_labels(case_dir, phantom):
    labels = phantom.label.astype(np.float32)
    labels[1, 2, 3] = 1.5
    _overwrite(_nii(case_dir, "seg"), labels)
    assert _error(io.load_case, case_dir) == (
        f"{_nii(case_dir, 'seg')}: label map has non-integer values (e.g. 1.5); expected integer labels "
        "[0, 1, 2, 4] (brats2017)")


def test_float_labels_with_integer_values_are_accepted(case_dir, phantom):
    _overwrite(_nii(case_dir, "seg"), phantom.label.astype(np.float32))
    case = io.load_case(case_dir)
    assert case.label.dtype == np.int16
    np.testing.assert_array_equal(case.label, phantom.label)


def test_label_shape_differs_from_images(case_dir, phantom):
    _overwrite(_nii(case_dir, "seg"), phantom.label[:15].astype(np.uint8))
    assert _error(io.load_case, case_dir) == (
        f"{_nii(case_dir, 'seg')}: label map shape (15, 14, 8) differs from (16, 14, 8) of Phantom_t1.nii.gz; "
        "all volumes of a case must share one voxel grid")


def test_load_label_false_skips_a_bad_label(case_dir):
    _nii(case_dir, "seg").write_bytes(b"")
    case = io.load_case(case_dir, load_label=False)
    assert case.label is None and case.label_convention is None


def test_non_axial_third_axis_warns(tmp_path, phantom, caplog):
    swap = np.eye(4)[[0, 2, 1, 3]]  # third voxel axis along anterior-posterior
    ref = io.save_case(make_phantom(SHAPE, seed=3, case_id="Phantom"), tmp_path, "brats2017")
    for path, index in zip(ref.image_paths, range(4)):
        _overwrite(path, phantom.image[index], phantom.affine @ swap)
    _overwrite(ref.label_path, phantom.label.astype(np.uint8), phantom.affine @ swap)
    with caplog.at_level(logging.WARNING, logger="brats_cnn.data.io"):
        io.load_case(ref)
    assert "third voxel axis points P (orientation LSP)" in caplog.text


def test_brats_affine_has_no_warning(case_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="brats_cnn.data.io"):
        io.load_case(case_dir)
    assert caplog.text == ""


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def test_save_label_map_keeps_affine_and_codes(tmp_path, real_or_phantom_reference):
    reference, qform_code, sform_code = real_or_phantom_reference
    labels = np.zeros(reference.labels.shape if isinstance(reference, io.LabelMap) else reference.image.shape[1:],
                      dtype=np.int64)
    labels[2:4, 3:5, 1] = 4
    path = io.save_label_map(labels, reference, tmp_path / "out" / "pred.nii.gz")
    img = nib.load(path)
    assert img.get_data_dtype() == np.uint8
    assert int(img.header["qform_code"]) == qform_code and int(img.header["sform_code"]) == sform_code
    np.testing.assert_allclose(img.affine, reference.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(img.dataobj), labels)
    assert sorted(p.name for p in path.parent.iterdir()) == ["pred.nii.gz"]  # no temp files


@pytest.fixture(params=["phantom", "qform2"])
def real_or_phantom_reference(request, tmp_path):
    case = make_phantom(SHAPE, seed=1)
    if request.param == "phantom":
        return case, 1, 1
    header = case.header.copy()
    header.set_qform(case.affine, code=2)
    header.set_sform(case.affine, code=4)
    path = tmp_path / "ref.nii.gz"
    nib.save(nib.Nifti1Image(case.label.astype(np.uint8), case.affine, header), path)
    return io.load_label_map(path), 2, 4


def test_save_label_map_failure_leaves_existing_file_untouched(tmp_path, phantom, monkeypatch):
    path = tmp_path / "pred.nii.gz"
    io.save_label_map(phantom.label, phantom, path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", fail)
    with pytest.raises(BratsCnnError) as info:  # one line naming the output, not the hidden temp file
        io.save_label_map(np.zeros_like(phantom.label), phantom, path)
    assert str(info.value) == f"{path}: cannot write output (disk full)"
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["pred.nii.gz"]


def test_save_label_map_rejects_bad_labels(tmp_path, phantom):
    path = tmp_path / "p.nii.gz"
    assert _error(io.save_label_map, phantom.label[:3], phantom, path) == (
        f"{path}: label map shape (3, 14, 8) differs from the reference shape (16, 14, 8)")
    assert _error(io.save_label_map, np.full(SHAPE, 300), phantom, path) == (
        f"{path}: label values must be 0..255 for uint8, got 300..300")
    assert _error(io.save_label_map, np.full(SHAPE, 0.5), phantom, path) == (
        f"{path}: label map has non-integer values; expected integer labels")
    assert not path.exists()


def test_save_volume_writes_float_and_multichannel(tmp_path, phantom):
    path = io.save_volume(phantom.image[0], phantom, tmp_path / "t1.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), phantom.image[0])
    probabilities = np.random.default_rng(0).random(SHAPE + (4,)).astype(np.float32)
    path = io.save_volume(probabilities, phantom, tmp_path / "prob.nii.gz")
    loaded = nib.load(path)
    assert loaded.shape == SHAPE + (4,) and loaded.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(loaded.dataobj), probabilities)
    assert _error(io.save_volume, probabilities[:2], phantom, tmp_path / "x.nii.gz") == (
        f"{tmp_path / 'x.nii.gz'}: volume shape (2, 14, 8, 4) does not start with the reference shape (16, 14, 8)")


def test_save_case_unknown_layout(tmp_path, phantom):
    assert _error(io.save_case, phantom, tmp_path, "bids") == (
        f"{tmp_path}: unknown layout 'bids' (expected one of: brats2017, brats2023, nnunet, msd, brats2013)")


# ---------------------------------------------------------------------------------------------
# Real data (skipped when the sample is absent)
# ---------------------------------------------------------------------------------------------

def test_load_real_case(real_case_dir, tmp_path):
    case = io.load_case(real_case_dir)
    assert case.case_id == "Brats18_CBICA_ABM_1"
    assert case.image.shape == (4, 240, 240, 155) and case.image.dtype == np.float32
    assert sorted(np.unique(case.label).tolist()) == [0, 1, 2, 4]
    assert case.spacing == (1.0, 1.0, 1.0)
    assert nib.aff2axcodes(case.affine) == ("L", "P", "S")
    # T1c (channel 1) is the t1ce file, FLAIR (channel 3) the flair file
    flair = np.asarray(nib.load(real_case_dir / "Brats18_CBICA_ABM_1_flair.nii.gz").dataobj)
    np.testing.assert_array_equal(case.image[3], flair.astype(np.float32))
    path = io.save_label_map(case.label, case, tmp_path / "seg.nii.gz")
    original = nib.load(real_case_dir / "Brats18_CBICA_ABM_1_seg.nii.gz")
    written = nib.load(path)
    np.testing.assert_array_equal(written.affine, original.affine)
    assert int(written.header["qform_code"]) == int(case.header["qform_code"])
    assert int(written.header["sform_code"]) == int(case.header["sform_code"])
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(original.dataobj))


def test_manifest_from_a_spreadsheet_and_conflicting_duplicates(tmp_path):
    from brats_cnn.errors import InputError
    from brats_cnn.data.layouts import read_manifest

    saved = tmp_path / "excel.csv"
    saved.write_bytes("\ufeffcase_id,grade\r\nA,HGG\r\nB,lgg\r\nA,HGG\r\nC,unknown\r\n".encode("utf-8"))
    assert read_manifest(saved) == {"A": "HGG", "B": "LGG"}  # BOM + CRLF read; the same row twice is fine
    conflict = tmp_path / "conflict.csv"
    conflict.write_text("case_id,grade\nA,HGG\nB,LGG\nA,LGG\n")
    with pytest.raises(InputError, match=r"case 'A' is listed twice with different grades: line 2 \(HGG\) and "
                                         r"line 4 \(LGG\)"):
        read_manifest(conflict)
