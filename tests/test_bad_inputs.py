"""Bad input through the real command line: one line on stderr naming the file, exit code 2.

Every case runs ``python -m brats_cnn.cli`` in a subprocess on tiny phantoms (40x40x12) and checks:

* exit code 2 (a known error), no traceback;
* exactly one ``brats-cnn: error: <file>: <problem>`` line naming the offending file and the
  problem (the exact key phrases below, which docs/troubleshooting.md lists);
* every other stderr line is a one-line log record (``WARNING``/``ERROR``);
* no partial output: no temporary file (``*.tmp*``) anywhere in the output folder, and no
  output under a final name for the input that failed.

``preprocess`` and ``train`` skip an unusable case with one warning line and go on; the tests of
their one-line error pass ``--strict``, and ``test_preprocess_skips_a_bad_case_with_one_warning``
checks the default.

Unrelated files (notes, READMEs, other folders) next to the cases are ignored with a warning,
not an error; "empty ground truth" and "empty prediction" are valid BraTS cases and are scored
(1.0 / 0.0 as SPEC.md fixes), not refused.

Output folders that cannot be created: the tests run as root, for whom ``chmod`` does not stop a
write, so they put the output folder under a regular *file* (``<file>/sub``), which fails for
every user (``Not a directory``).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_cnn.data.phantom import phantom_affine, write_phantom_dataset

SHAPE = (40, 40, 12)
AFFINE = phantom_affine(SHAPE, (1.0, 1.0, 1.0))
BAD = "Phantom_001"  # the second case of the dataset is the one made bad
FAST_PREPROCESS = ["--config", "smoke", "--set", "preprocess.n4.sequences=[]", "--set", "preprocess.workers=1"]


# ---------------------------------------------------------------------------------------------
# helpers


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the real CLI (``-q``: warnings and errors only) in a subprocess."""
    return subprocess.run([sys.executable, "-m", "brats_cnn.cli", "-q", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


def assert_one_line_error(result: subprocess.CompletedProcess, path: Path | str, *phrases: str) -> str:
    """Exit code 2, no traceback, one ``brats-cnn: error:`` line naming ``path`` and holding ``phrases``."""
    stderr = result.stderr
    assert result.returncode == 2, f"exit code {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if not PROGRESS_BAR.search(line)]  # see test_quiet_*
    errors = [line for line in lines if line.startswith("brats-cnn: error: ")]
    assert len(errors) == 1, stderr
    others = [line for line in lines if not line.startswith("brats-cnn: error: ") and line.strip()]
    assert all(line.startswith(("WARNING ", "ERROR ")) for line in others), stderr
    line = errors[0]
    assert str(path) in line, f"{path} not named in: {line}"
    for phrase in phrases:
        assert phrase in line, f"{phrase!r} not in: {line}"
    return line


PROGRESS_BAR = re.compile(r"\d+%\|.*\|")  # a tqdm bar: " 35%|███▌      | 2.13k/6.02k"


def leftovers(folder: Path) -> list[Path]:
    """Temporary/partial files anywhere under ``folder`` (atomic writers name them ``*.tmp*``)."""
    if not folder.exists():
        return []
    return [p for p in folder.rglob("*") if ".tmp" in p.name or p.name.endswith(".part")]


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), path)
    return path


def read_nifti(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def case_file(root: Path, tag: str, case_id: str = BAD) -> Path:
    return root / case_id / f"{case_id}_{tag}.nii.gz"


# ---------------------------------------------------------------------------------------------
# fixtures: one phantom dataset written once, copied per test


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """Two HGG phantoms in the BraTS 2017-21 layout, with manifest.csv."""
    root = tmp_path_factory.mktemp("pristine")
    write_phantom_dataset(root, 2, shape=SHAPE, grades=["HGG", "HGG"])
    return root


@pytest.fixture
def dataset(pristine, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(pristine, root)
    return root


# ---------------------------------------------------------------------------------------------
# preprocess: every load check of io.py, through the command


def _missing_sequence(root: Path) -> tuple[Path, tuple[str, ...]]:
    case_file(root, "flair").unlink()
    return root / BAD, (f"case {BAD} has no flair image", f"{BAD}_flair.nii.gz")


def _shape_mismatch(root: Path) -> tuple[Path, tuple[str, ...]]:
    path = case_file(root, "t2")
    save_nifti(path, read_nifti(path)[:, :, :11])
    return path, ("shape (40, 40, 11) differs from (40, 40, 12)", f"{BAD}_t1.nii.gz", "one voxel grid")


def _affine_mismatch(root: Path) -> tuple[Path, tuple[str, ...]]:
    path = case_file(root, "t2")
    shifted = AFFINE.copy()
    shifted[2, 3] += 2.0
    save_nifti(path, read_nifti(path), shifted)
    return path, (f"affine differs from that of {BAD}_t1.nii.gz", "by 2 mm")


def _nan_voxel(root: Path) -> tuple[Path, tuple[str, ...]]:
    path = case_file(root, "t1ce")
    data = read_nifti(path).astype(np.float32)
    data[20, 20, 6] = np.nan
    save_nifti(path, data)
    return path, ("image has 1 NaN or infinite voxel(s)", "expected finite intensities")


def _inf_voxels(root: Path) -> tuple[Path, tuple[str, ...]]:
    path = case_file(root, "flair")
    data = read_nifti(path).astype(np.float32)
    data[0, 0, :3] = np.inf
    save_nifti(path, data)
    return path, ("image has 3 NaN or infinite voxel(s)",)


def _image_2d(root: Path) -> tuple[Path, tuple[str, ...]]:
    path = case_file(root, "t1")
    save_nifti(path, read_nifti(path)[:, :, 6])
    return path, ("image is 2-D with shape (40, 40)", "expected a 3-D volume")


def _sequence_4d(root: Path) -> tuple[Path, tuple[str, ...]]:
    path = case_file(root, "t2")
    save_nifti(path, np.stack([read_nifti(path)] * 3, axis=-1))
    return path, ("image is 4-D with shape (40, 40, 12, 3)", "expected a 3-D volume")


def _decathlon_3_channels(root: Path) -> tuple[Path, tuple[str, ...]]:
    shutil.rmtree(root / BAD)
    image = np.stack([read_nifti(case_file(root, tag, "Phantom_000")) for tag in ("flair", "t1", "t1ce")], axis=-1)
    shutil.rmtree(root / "Phantom_000")
    (root / "manifest.csv").unlink()
    path = save_nifti(root / "imagesTr" / "BRATS_001.nii.gz", image)
    return path, ("image has shape (40, 40, 12, 3)", "4-D (X, Y, Z, 4)", "FLAIR, T1w, T1gd, T2w")


def _truncated_gz(root: Path) -> tuple[Path, tuple[str, ...]]:
    path = case_file(root, "t2")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path, ("file is truncated (the gzip stream ends early)",)


def _corrupt_gz(root: Path) -> tuple[Path, tuple[str, ...]]:
    path = case_file(root, "t2")
    raw = bytearray(path.read_bytes())
    raw[-8] ^= 0xFF  # first byte of the CRC32 trailer
    path.write_bytes(bytes(raw))
    return path, ("corrupt gzip data", "CRC")


def _zero_bytes(root: Path) -> tuple[Path, tuple[str, ...]]:
    path = case_file(root, "t1")
    path.write_bytes(b"")
    return path, ("file is empty (0 bytes)",)


def _text_named_gz(root: Path) -> tuple[Path, tuple[str, ...]]:
    path = case_file(root, "t1ce")
    path.write_text("this is not an image\n")
    return path, ("not gzip-compressed although the name ends in .gz",)


def _gzip_of_text(root: Path) -> tuple[Path, tuple[str, ...]]:
    path = case_file(root, "t1ce")
    path.write_bytes(gzip.compress(b"hello, not a NIfTI header at all\n" * 20))
    return path, ("not a valid NIfTI-1 image",)


def _label_value_3(root: Path) -> tuple[Path, tuple[str, ...]]:
    path = case_file(root, "seg")
    labels = read_nifti(path).astype(np.uint8)
    labels[labels == 1] = 3
    save_nifti(path, labels)
    return path, ("label values [3] are not in the brats2017 convention", "expected [0, 1, 2, 4]",
                  "--label-convention")


def _float_labels(root: Path) -> tuple[Path, tuple[str, ...]]:
    path = case_file(root, "seg")
    labels = read_nifti(path).astype(np.float32)
    labels[labels == 2] = 1.5
    save_nifti(path, labels)
    return path, ("label map has non-integer values (e.g. 1.5)", "expected integer labels [0, 1, 2, 4]")


def _label_shape(root: Path) -> tuple[Path, tuple[str, ...]]:
    path = case_file(root, "seg")
    save_nifti(path, read_nifti(path)[:39])
    return path, ("label map shape (39, 40, 12) differs from (40, 40, 12)",)


def _two_cases_in_one_folder(root: Path) -> tuple[Path, tuple[str, ...]]:
    shutil.copy(case_file(root, "t1"), root / BAD / "backup_t1.nii.gz")  # looks like case "backup"
    return root / BAD, (f"folder holds 2 brats2017 cases ({BAD}, backup)", "rename or remove the others")


PREPROCESS_CASES = {
    "files-of-two-cases-in-one-folder": _two_cases_in_one_folder,
    "missing-sequence": _missing_sequence,
    "shape-mismatch": _shape_mismatch,
    "affine-mismatch": _affine_mismatch,
    "nan-voxel": _nan_voxel,
    "inf-voxels": _inf_voxels,
    "2d-image": _image_2d,
    "4d-sequence": _sequence_4d,
    "4d-decathlon-3-channels": _decathlon_3_channels,
    "truncated-gz": _truncated_gz,
    "corrupt-gz-crc": _corrupt_gz,
    "zero-byte-file": _zero_bytes,
    "text-named-nii-gz": _text_named_gz,
    "gzip-not-nifti": _gzip_of_text,
    "label-value-3-brats2017": _label_value_3,
    "float-label-map": _float_labels,
    "label-map-shape": _label_shape,
}


@pytest.mark.parametrize("kind", list(PREPROCESS_CASES))
def test_preprocess_strict_refuses_bad_input(kind, dataset, tmp_path):
    bad_path, phrases = PREPROCESS_CASES[kind](dataset)
    out = tmp_path / "cache"
    result = run_cli("preprocess", "--data", dataset, "--out", out, "--fit", "--strict", *FAST_PREPROCESS)
    assert_one_line_error(result, bad_path, *phrases)
    assert leftovers(out) == []
    # --strict stops after the check, before any case is written
    assert not (out / BAD / "meta.json").exists()
    assert not (out / "Phantom_000" / "meta.json").exists()


@pytest.mark.parametrize("kind", ["truncated-gz", "nan-voxel", "label-value-3-brats2017", "label-map-shape"])
def test_preprocess_skips_a_bad_case_with_one_warning(kind, dataset, tmp_path):
    bad_path, phrases = PREPROCESS_CASES[kind](dataset)
    out = tmp_path / "cache"
    result = run_cli("preprocess", "--data", dataset, "--out", out, "--fit", *FAST_PREPROCESS)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and warnings[0].startswith(f"WARNING brats_cnn.preprocessing.preprocess: skipping case {BAD}: "), \
        result.stderr
    assert str(bad_path) in warnings[0] and all(phrase in warnings[0] for phrase in phrases), warnings[0]
    assert f"1 skipped as unusable ({BAD})" in result.stdout
    assert not (out / BAD / "meta.json").exists() and (out / "Phantom_000" / "meta.json").is_file()
    assert leftovers(out) == []


def test_preprocess_with_parallel_workers_reports_the_bad_file(dataset, tmp_path):
    """The error raised in a worker process reaches the CLI as the same one line."""
    bad_path, phrases = _nan_voxel(dataset)
    out = tmp_path / "cache"
    result = run_cli("preprocess", "--data", dataset, "--out", out, "--fit", "--config", "smoke",
                     "--set", "preprocess.n4.sequences=[]", "--workers", "2", "--strict")
    assert_one_line_error(result, bad_path, *phrases)
    assert leftovers(out) == []


def test_unrelated_files_are_ignored_with_a_warning(dataset, tmp_path):
    """Notes, READMEs and foreign folders beside the cases do not stop preprocessing."""
    (dataset / BAD / "notes.txt").write_text("scanned twice\n")
    (dataset / BAD / f"{BAD}_t1_old.nii.gz").write_bytes(b"not even gzip")
    (dataset / "README.md").write_text("# my data\n")
    (dataset / "scratch").mkdir()
    (dataset / "scratch" / "plot.png").write_bytes(b"\x89PNG")
    out = tmp_path / "cache"
    result = run_cli("preprocess", "--data", dataset, "--out", out, "--fit", *FAST_PREPROCESS)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert any("notes.txt" in line and f"{BAD}_t1_old.nii.gz" in line and "ignor" in line for line in warnings), \
        result.stderr
    assert (out / BAD / "meta.json").is_file() and (out / "Phantom_000" / "meta.json").is_file()
    assert leftovers(out) == []


# ---------------------------------------------------------------------------------------------
# config errors (through preprocess, the command that does not import torch)


def test_config_with_an_unknown_key(dataset, tmp_path):
    config = tmp_path / "my.yaml"
    config.write_text("train:\n  epochz: 3\n")
    out = tmp_path / "cache"
    result = run_cli("preprocess", "--data", dataset, "--out", out, "--fit", "--config", config)
    assert_one_line_error(result, config, "unknown config key 'train.epochz'", "epochs")
    assert not out.exists()


def test_set_with_a_wrong_type(dataset, tmp_path):
    out = tmp_path / "cache"
    result = run_cli("preprocess", "--data", dataset, "--out", out, "--fit", "--set", "train.epochs=three")
    assert_one_line_error(result, "--set", "key 'train.epochs' must be int, got str 'three'")
    assert not out.exists()


def test_output_folder_that_cannot_be_created_preprocess(dataset, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("I am a file, not a folder\n")
    out = blocker / "cache"
    result = run_cli("preprocess", "--data", dataset, "--out", out, "--fit", *FAST_PREPROCESS)
    line = assert_one_line_error(result, out)
    assert "cannot create" in line and "Not a directory" in line
    assert blocker.read_text() == "I am a file, not a folder\n"


# ---------------------------------------------------------------------------------------------
# evaluate


@pytest.fixture
def gt_and_pred(pristine, tmp_path) -> tuple[Path, Path]:
    """Ground truth: the phantom's own seg; prediction folder: a copy of it as <ID>.nii.gz."""
    gt = tmp_path / "gt"
    shutil.copytree(pristine / "Phantom_000", gt / "Phantom_000")
    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copy(gt / "Phantom_000" / "Phantom_000_seg.nii.gz", pred / "Phantom_000.nii.gz")
    return gt, pred


def _scores(out: Path) -> dict[str, dict[str, float]]:
    import csv

    with open(out / "metrics.csv", newline="") as handle:
        return {row["region"]: {k: float(row[k]) for k in ("dsc", "ppv", "sensitivity", "hd95")}
                for row in csv.DictReader(handle)}


def test_evaluate_empty_ground_truth_is_scored_not_refused(gt_and_pred, tmp_path):
    gt, pred = gt_and_pred
    seg = gt / "Phantom_000" / "Phantom_000_seg.nii.gz"
    save_nifti(seg, np.zeros(SHAPE, np.uint8))
    out = tmp_path / "eval"
    result = run_cli("evaluate", "--pred", pred, "--gt", gt, "--out", out)
    assert result.returncode == 0, result.stderr
    scores = _scores(out)
    for region in ("complete", "core", "enhancing"):  # truth empty, prediction not: all 0, HD95 373.13
        assert scores[region] == {"dsc": 0.0, "ppv": 0.0, "sensitivity": 0.0, "hd95": 373.13}
    assert leftovers(out) == []


def test_evaluate_empty_prediction_and_empty_truth(gt_and_pred, tmp_path):
    gt, pred = gt_and_pred
    save_nifti(pred / "Phantom_000.nii.gz", np.zeros(SHAPE, np.uint8))
    out = tmp_path / "eval"
    result = run_cli("evaluate", "--pred", pred, "--gt", gt, "--out", out)
    assert result.returncode == 0, result.stderr
    for region, values in _scores(out).items():
        assert values == {"dsc": 0.0, "ppv": 0.0, "sensitivity": 0.0, "hd95": 373.13}, region
    # both empty: everything is perfect
    save_nifti(gt / "Phantom_000" / "Phantom_000_seg.nii.gz", np.zeros(SHAPE, np.uint8))
    result = run_cli("evaluate", "--pred", pred, "--gt", gt, "--out", out)
    assert result.returncode == 0, result.stderr
    for region, values in _scores(out).items():
        assert values == {"dsc": 1.0, "ppv": 1.0, "sensitivity": 1.0, "hd95": 0.0}, region


def test_evaluate_prediction_of_another_shape(gt_and_pred, tmp_path):
    gt, pred = gt_and_pred
    path = save_nifti(pred / "Phantom_000.nii.gz", np.zeros((40, 40, 11), np.uint8))
    out = tmp_path / "eval"
    result = run_cli("evaluate", "--pred", pred, "--gt", gt, "--out", out)
    # the failure is logged (one ERROR line naming the prediction) and the command fails at the end
    assert_one_line_error(result, out, "1 case(s) could not be scored (Phantom_000)")
    logged = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(logged) == 1 and str(path) in logged[0] and "prediction shape (40, 40, 11) differs" in logged[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases_scored"] == 0 and "prediction shape" in summary["failures"][0]["error"]
    assert leftovers(out) == []


def test_evaluate_prediction_with_labels_outside_the_convention(gt_and_pred, tmp_path):
    gt, pred = gt_and_pred
    labels = read_nifti(pred / "Phantom_000.nii.gz").astype(np.uint8)
    labels[labels == 4] = 3
    path = save_nifti(pred / "Phantom_000.nii.gz", labels)
    out = tmp_path / "eval"
    result = run_cli("evaluate", "--pred", pred, "--gt", gt, "--out", out)
    assert_one_line_error(result, out, "could not be scored")
    logged = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert str(path) in logged[0] and "label values [3] are not in the brats2017 convention" in logged[0]


def test_evaluate_missing_prediction_folder(gt_and_pred, tmp_path):
    gt, _ = gt_and_pred
    missing = tmp_path / "nowhere"
    out = tmp_path / "eval"
    result = run_cli("evaluate", "--pred", missing, "--gt", gt, "--out", out)
    assert_one_line_error(result, missing, "no such prediction file or folder")
    assert not out.exists()


def test_output_folder_that_cannot_be_created_evaluate(gt_and_pred, tmp_path):
    gt, pred = gt_and_pred
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "eval"
    result = run_cli("evaluate", "--pred", pred, "--gt", gt, "--out", out)
    line = assert_one_line_error(result, out)
    assert "cannot create" in line and "Not a directory" in line


# ---------------------------------------------------------------------------------------------
# checkpoints: segment --model and train --resume


class _RunsCodeWhenUnpickled:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def checkpoints(pristine, tmp_path_factory) -> dict[str, Path]:
    """A tiny valid HGG checkpoint (random weights, normaliser fitted on the 2 phantoms) and bad ones."""
    import pickle

    import torch

    from brats_cnn.config import load_config
    from brats_cnn.data.layouts import list_cases
    from brats_cnn.data.io import load_case
    from brats_cnn.data.labels import get_convention
    from brats_cnn.network.model import build_network
    from brats_cnn.network.checkpoint import save_checkpoint
    from brats_cnn.preprocessing.normalise import fit_normaliser

    folder = tmp_path_factory.mktemp("checkpoints")
    config = load_config("smoke", ["preprocess.n4.sequences=[]"])
    normaliser = fit_normaliser([load_case(ref) for ref in list_cases(pristine)], config)
    torch.manual_seed(0)
    network = build_network(config.model, get_convention("brats2017").num_classes,
                            patch_size=config.sampling.patch_size)
    good = save_checkpoint(folder / "hgg.pt", network=network, config=config, normaliser=normaliser,
                           label_convention="brats2017", epoch=1)
    payload = torch.load(good, weights_only=True)
    paths = {"good": good, "marker": folder / "PWNED"}

    newer = dict(payload, format_version=payload["format_version"] + 1)
    torch.save(newer, folder / "newer.pt")
    paths["newer"] = folder / "newer.pt"

    torch.save(network.state_dict(), folder / "state_dict.pt")  # weights only: a common mix-up
    paths["state_dict"] = folder / "state_dict.pt"

    raw = good.read_bytes()
    (folder / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    paths["truncated"] = folder / "truncated.pt"
    (folder / "empty.pt").write_bytes(b"")
    paths["empty"] = folder / "empty.pt"
    (folder / "notes.pt").write_text("# training notes, saved under the wrong name\n")  # not a torch file at all
    paths["text"] = folder / "notes.pt"

    # a checkpoint-shaped dict with one object that runs code when unpickled, in torch's zip format
    # and as a plain (legacy) pickle; the marker file proves whether the code ran
    evil = dict(payload, training_state={"note": _RunsCodeWhenUnpickled(paths["marker"])})
    torch.save(evil, folder / "evil.pt")
    (folder / "evil_legacy.pt").write_bytes(pickle.dumps(evil, protocol=2))
    paths["evil"], paths["evil_legacy"] = folder / "evil.pt", folder / "evil_legacy.pt"
    return paths


def test_the_malicious_pickle_really_runs_code_when_loaded_unsafely(checkpoints, tmp_path):
    """Check the test payload itself: an unrestricted unpickler does create the marker."""
    import torch

    marker = tmp_path / "unsafe_marker"
    torch.save({"x": _RunsCodeWhenUnpickled(marker)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert marker.exists()


@pytest.fixture
def run_folder(tmp_path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("kind, phrases", [
    ("evil_legacy", ("refused to load", "objects other than tensors and plain data")),
    ("truncated", ("corrupt or truncated checkpoint",)),
])
def test_train_resume_refuses_a_bad_last_checkpoint(kind, phrases, checkpoints, pristine, run_folder):
    last = run_folder / "last.pt"
    shutil.copy(checkpoints[kind], last)
    result = run_cli("train", "--grade", "hgg", "--data", pristine, "--out", run_folder, "--resume",
                     "--device", "cpu")
    assert_one_line_error(result, last, *phrases)
    assert not checkpoints["marker"].exists(), "unpickling ran code"
    assert sorted(p.name for p in run_folder.iterdir()) == ["last.pt"]  # nothing written


def test_train_resume_with_a_checkpoint_of_the_other_grade(checkpoints, pristine, run_folder):
    last = run_folder / "last.pt"
    shutil.copy(checkpoints["good"], last)
    result = run_cli("train", "--grade", "lgg", "--data", pristine, "--out", run_folder, "--resume",
                     "--device", "cpu")
    assert_one_line_error(result, last, "checkpoint is for grade 'hgg' but --grade lgg was given")
    assert sorted(p.name for p in run_folder.iterdir()) == ["last.pt"]


def test_train_with_a_bad_case_in_the_data(dataset, tmp_path):
    bad, phrases = _nan_voxel(dataset)
    out = tmp_path / "run"
    result = run_cli("train", "--grade", "hgg", "--data", dataset, "--out", out, "--device", "cpu", "--strict",
                     "--config", "smoke", "--set", "preprocess.n4.sequences=[]", "--set", "data.validation_cases=0")
    assert_one_line_error(result, bad, *phrases)
    assert leftovers(out) == [] and not (out / "last.pt").exists()


def test_train_set_with_a_wrong_type(pristine, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--grade", "hgg", "--data", pristine, "--out", out, "--device", "cpu",
                     "--set", "train.batch_size=1.5")
    assert_one_line_error(result, "--set", "key 'train.batch_size' must be int, got float 1.5")
    assert not out.exists()


def test_output_folder_that_cannot_be_created_train(pristine, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "run"
    result = run_cli("train", "--grade", "hgg", "--data", pristine, "--out", out, "--device", "cpu",
                     "--config", "smoke")
    line = assert_one_line_error(result, out)
    assert "cannot create" in line and "Not a directory" in line


SEGMENT = ["--device", "cpu", "--mode", "fast"]


@pytest.mark.parametrize("kind, phrases", [
    ("evil", ("refused to load", "objects other than tensors and plain data")),
    ("newer", ("checkpoint format version 3 is not supported", "expected one of [1, 2]")),
    ("truncated", ("corrupt or truncated checkpoint",)),
    ("state_dict", ("not a brats-cnn checkpoint (no 'format' marker)",)),
    ("empty", ("corrupt or truncated checkpoint",)),
    ("text", ("not a checkpoint: neither a zip archive (torch.save) nor a pickle",)),
])
def test_segment_refuses_a_bad_checkpoint(kind, phrases, checkpoints, pristine, tmp_path):
    out = tmp_path / "seg"
    result = run_cli("segment", pristine / "Phantom_000", "--model", checkpoints[kind], "--out", out, *SEGMENT)
    assert_one_line_error(result, checkpoints[kind], *phrases)
    assert not checkpoints["marker"].exists(), "unpickling ran code"
    assert not out.exists()


def test_segment_with_a_checkpoint_of_the_other_grade(checkpoints, pristine, tmp_path):
    """--grade lgg with an HGG checkpoint is a mismatch: refused, naming the checkpoint."""
    out = tmp_path / "seg"
    result = run_cli("segment", pristine / "Phantom_000", "--model", checkpoints["good"], "--grade", "lgg",
                     "--out", out, *SEGMENT)
    assert_one_line_error(result, checkpoints["good"], "checkpoint is for grade 'hgg' but --grade lgg was given")
    assert not out.exists()
    # the matching grade is accepted
    result = run_cli("segment", pristine / "Phantom_000", "--model", checkpoints["good"], "--grade", "hgg",
                     "--out", out, *SEGMENT)
    assert result.returncode == 0, result.stderr
    assert (out / "Phantom_000.nii.gz").is_file()


def test_segment_a_bad_case_among_good_ones(checkpoints, dataset, tmp_path):
    """A batch goes on past a bad case, writes the good ones, and fails at the end naming the bad one."""
    bad, phrases = _truncated_gz(dataset)
    out = tmp_path / "seg"
    result = run_cli("segment", dataset, "--model", checkpoints["good"], "--out", out, *SEGMENT)
    line = assert_one_line_error(result, out, "1 of 2 case(s) failed", BAD)
    assert str(bad) in line and phrases[0] in line
    assert sorted(p.name for p in out.iterdir()) == ["Phantom_000.json", "Phantom_000.nii.gz"]


def test_segment_a_missing_input(checkpoints, tmp_path):
    missing = tmp_path / "no_such_case"
    out = tmp_path / "seg"
    result = run_cli("segment", missing, "--model", checkpoints["good"], "--out", out, *SEGMENT)
    assert_one_line_error(result, missing, "no such file or folder")
    assert not out.exists()


def test_output_folder_that_cannot_be_created_segment(checkpoints, pristine, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "seg"
    result = run_cli("segment", pristine / "Phantom_000", "--model", checkpoints["good"], "--out", out, *SEGMENT)
    line = assert_one_line_error(result, out)
    assert "cannot create" in line and "Not a directory" in line


@pytest.mark.parametrize("command", ["segment", "train"])
def test_quiet_commands_print_no_progress_bars(command, checkpoints, pristine, tmp_path):
    if command == "segment":
        args = ["segment", pristine / "Phantom_000", "--model", checkpoints["good"], "--out", tmp_path / "seg",
                *SEGMENT]
    else:
        args = ["train", "--grade", "hgg", "--data", pristine, "--out", tmp_path / "run", "--device", "cpu",
                "--config", "smoke", "--set", "preprocess.n4.sequences=[]", "--set", "model.architecture=lgg",
                "--set", "sampling.total_patches=8", "--set", "train.batch_size=4", "--set", "train.epochs=1",
                "--set", "data.validation_cases=0", "--set", "train.num_workers=0"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert not PROGRESS_BAR.search(result.stderr), result.stderr
