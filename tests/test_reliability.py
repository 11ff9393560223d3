"""Issue 14 (reliability, round two) through the real command line.

One test (or a few) per row of the issue's table: the exit code, the one ``brats-cnn: error:`` line
and what is (not) left on disk. Helpers and the phantom/checkpoint fixtures come from
``test_bad_inputs.py``. A full disk is simulated with ``RLIMIT_FSIZE`` in the child process (the
kernel then refuses writes past the limit with ``EFBIG``, "File too large"), which goes through the
same code paths as ``ENOSPC``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from brats_cnn.config import load_config
from brats_cnn.training.train import learning_rate

from test_bad_inputs import (AFFINE, BAD, SHAPE, assert_one_line_error, case_file, checkpoints,  # noqa: F401
                             dataset, leftovers, pristine, read_nifti, run_cli, save_nifti)

SEGMENT = ["--device", "cpu", "--mode", "fast"]
TINY_TRAIN = ["--device", "cpu", "--config", "smoke", "--set", "preprocess.n4.sequences=[]",
              "--set", "model.architecture=lgg", "--set", "sampling.total_patches=16", "--set", "train.batch_size=4",
              "--set", "train.epochs=1", "--set", "data.validation_cases=0", "--set", "train.num_workers=0"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli_limited(max_file_bytes: int, *args: str) -> subprocess.CompletedProcess:
    """The CLI with every file it writes limited to ``max_file_bytes`` (a disk that fills up)."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run([sys.executable, "-m", "brats_cnn.cli", "-q", *map(str, args)], capture_output=True,
                          text=True, timeout=300, preexec_fn=limit)


# ---- segment writing over its own input; foreign files at the output path ---------------------------

@pytest.mark.parametrize("tag", ["seg", "t1"])
def test_segment_refuses_to_write_over_an_input_of_the_case(tag, checkpoints, dataset):
    target = case_file(dataset, tag, "Phantom_000")
    before = digest(target)
    for extra in ([], ["--overwrite"]):
        result = run_cli("segment", dataset / "Phantom_000", "--model", checkpoints["good"], "--out", target,
                         *SEGMENT, *extra)
        line = assert_one_line_error(result, target, "refusing to write over an input of this command")
        assert str(target) in line.split("(", 1)[1]  # both paths: the output, then the input it would replace
        assert digest(target) == before  # byte-identical
    assert sorted(p.name for p in (dataset / "Phantom_000").iterdir()) == [
        f"Phantom_000_{t}.nii.gz" for t in ("flair", "seg", "t1", "t1ce", "t2")]


def test_segment_refuses_to_write_over_its_checkpoint(checkpoints, pristine, tmp_path):
    model = tmp_path / "model.nii.gz"  # a checkpoint with a NIfTI-like name, given as --out
    shutil.copy(checkpoints["good"], model)
    result = run_cli("segment", pristine / "Phantom_000", "--model", model, "--out", model, *SEGMENT)
    assert_one_line_error(result, model, "refusing to write over an input", str(model))
    assert digest(model) == digest(checkpoints["good"])


def test_segment_keeps_a_file_it_did_not_write_unless_overwrite(checkpoints, pristine, tmp_path):
    out = tmp_path / "seg"
    out.mkdir()
    foreign = save_nifti(out / "Phantom_000.nii.gz", np.full(SHAPE, 7, np.uint8))  # e.g. a manual segmentation
    before = digest(foreign)
    result = run_cli("segment", pristine / "Phantom_000", "--model", checkpoints["good"], "--out", out, *SEGMENT)
    assert_one_line_error(result, foreign, "exists and was not written by brats-cnn segment", "--overwrite")
    assert digest(foreign) == before and sorted(p.name for p in out.iterdir()) == ["Phantom_000.nii.gz"]
    result = run_cli("segment", pristine / "Phantom_000", "--model", checkpoints["good"], "--out", out, *SEGMENT,
                     "--overwrite")
    assert result.returncode == 0, result.stderr
    assert digest(foreign) != before and (out / "Phantom_000.json").is_file()
    # its own output (sidecar lost, as after a kill between the two writes) is redone without --overwrite
    (out / "Phantom_000.json").unlink()
    result = run_cli("segment", pristine / "Phantom_000", "--model", checkpoints["good"], "--out", out, *SEGMENT)
    assert result.returncode == 0, result.stderr
    assert (out / "Phantom_000.json").is_file() and leftovers(out) == []


# ---- config ranges through the commands --------------------------------------------------------------

@pytest.mark.parametrize("override, phrase", [
    ("segment.batch_size=-1", "key 'segment.batch_size' must be >= 1, got -1"),
    ("segment.slices_per_batch=-3", "key 'segment.slices_per_batch' must be >= 1, got -3"),
    ("segment.batch_size=0", "key 'segment.batch_size' must be >= 1, got 0"),
])
def test_segment_settings_out_of_range(override, phrase, checkpoints, pristine, tmp_path):
    out = tmp_path / "seg"
    result = run_cli("segment", pristine / "Phantom_000", "--model", checkpoints["good"], "--out", out, *SEGMENT,
                     "--set", override)
    assert_one_line_error(result, "--set", phrase)
    assert not out.exists()


@pytest.mark.parametrize("override, phrase", [
    ("train.batch_size=0", "key 'train.batch_size' must be >= 1, got 0"),
    ("train.batch_size=-64", "key 'train.batch_size' must be >= 1, got -64"),
    ("train.epochs=0", "key 'train.epochs' must be >= 1, got 0"),
    ("train.epochs=-1", "key 'train.epochs' must be >= 1, got -1"),
    ("train.lr_start=.nan", "key 'train.lr_start' must be finite and > 0, got nan"),
])
def test_train_settings_out_of_range(override, phrase, pristine, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--grade", "hgg", "--data", pristine, "--out", out, *TINY_TRAIN, "--set", override)
    assert_one_line_error(result, "--set", phrase)
    assert not out.exists()


# ---- a diverging run; non-finite and invalid checkpoints; a zero-std normaliser ----------------------

def test_train_stops_at_a_non_finite_loss_and_keeps_the_last_good_checkpoint(pristine, tmp_path):
    import torch

    from brats_cnn.network.checkpoint import load_checkpoint

    out = tmp_path / "run"
    result = run_cli("train", "--grade", "hgg", "--data", pristine, "--out", out, *TINY_TRAIN,
                     "--set", "sampling.total_patches=400", "--set", "train.lr_start=1e6",
                     "--set", "train.checkpoint_every_steps=1")
    line = assert_one_line_error(result, out, "training diverged: the loss is", "lower train.lr_start")
    step = int(line.split(" at step ")[1].split()[0])
    assert step >= 2  # the first steps were finite: their last.pt is kept
    last = load_checkpoint(out / "last.pt")  # loads: finite weights
    assert last.training_state["step"] == step - 1
    assert all(torch.isfinite(v).all() for v in last.network.state_dict().values())
    assert not (out / "best.pt").exists()  # no validation was due yet
    assert leftovers(out) == []


def _tampered(source: Path, path: Path, **changes) -> Path:
    import torch

    payload = torch.load(source, weights_only=True)
    payload.update(changes)
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("kind, phrases", [
    ("nan-weights", ("checkpoint has non-finite weights", "NaN/inf value(s)")),
    ("channel-order", ("checkpoint channel order ['t1', 't1', 't2', 'flair'] is not valid",)),
    ("grade", ("checkpoint grade 'xyz' is not valid",)),
])
def test_segment_refuses_a_non_finite_or_invalid_checkpoint(kind, phrases, checkpoints, pristine, tmp_path):
    import torch

    source = checkpoints["good"]
    path = tmp_path / f"{kind}.pt"
    if kind == "nan-weights":
        weights = torch.load(source, weights_only=True)["state_dict"]
        first = next(iter(weights))
        weights[first] = torch.full_like(weights[first], float("nan"))
        _tampered(source, path, state_dict=weights)
    elif kind == "channel-order":
        _tampered(source, path, channel_order=["t1", "t1", "t2", "flair"])
    else:
        _tampered(source, path, grade="xyz")
    out = tmp_path / "seg"
    result = run_cli("segment", pristine / "Phantom_000", "--model", path, "--out", out, *SEGMENT)
    assert_one_line_error(result, path, *phrases)
    assert not out.exists()


def test_preprocess_refuses_a_normaliser_with_zero_std(checkpoints, pristine, tmp_path):
    import torch

    state = torch.load(checkpoints["good"], weights_only=True)["normaliser"]
    state["std"]["t2"] = 0.0
    normaliser = tmp_path / "N.json"
    normaliser.write_text(json.dumps(state))
    out = tmp_path / "cache"
    result = run_cli("preprocess", "--data", pristine, "--out", out, "--normaliser", normaliser, "--config", "smoke",
                     "--set", "preprocess.n4.sequences=[]")
    assert_one_line_error(result, normaliser, "sequence 't2' has z-score mean", "std 0.0",
                          "expected a finite mean and a finite std > 0")
    assert not (out / "Phantom_000" / "meta.json").exists() and not (out / "normaliser.json").exists()


def test_preprocess_with_the_cache_s_own_normaliser_leaves_it_byte_identical(pristine, tmp_path):
    out = tmp_path / "cache"
    fast = ["--config", "smoke", "--set", "preprocess.n4.sequences=[]"]
    assert run_cli("preprocess", "--data", pristine, "--out", out, "--fit", *fast).returncode == 0
    before = digest(out / "normaliser.json")
    result = run_cli("preprocess", "--data", pristine, "--out", out, "--normaliser", out / "normaliser.json", *fast)
    assert result.returncode == 0, result.stderr
    assert digest(out / "normaliser.json") == before


# ---- a full disk -------------------------------------------------------------------------------------

def test_train_with_a_full_disk_writes_no_checkpoint_and_no_metrics_row(pristine, tmp_path):
    cache = tmp_path / "cache"
    assert run_cli("preprocess", "--data", pristine, "--out", cache, "--fit", "--config", "smoke",
                   "--set", "preprocess.n4.sequences=[]").returncode == 0
    out = tmp_path / "run"
    result = run_cli_limited(64_000, "train", "--grade", "hgg", "--data", cache, "--out", out, *TINY_TRAIN)
    # best.pt is the first checkpoint of the epoch; nothing after it is written, metrics.csv included
    line = assert_one_line_error(result, out / "best.pt", "cannot write checkpoint")
    assert ".tmp" not in line
    assert not any((out / name).exists() for name in ("best.pt", "last.pt", "metrics.csv", "metrics.json"))
    assert (out / "config.yaml").is_file()
    assert leftovers(out) == []


def test_segment_with_a_full_disk_leaves_nothing_of_the_failed_case(checkpoints, pristine, tmp_path):
    out = tmp_path / "seg"
    result = run_cli_limited(20_000, "segment", pristine / "Phantom_000", "--model", checkpoints["good"],
                             "--out", out, *SEGMENT, "--save-probabilities")
    probabilities = out / "Phantom_000_probabilities.nii.gz"
    assert_one_line_error(result, probabilities, "cannot write output (File too large)")
    assert sorted(p.name for p in out.iterdir()) == []  # no label map, no sidecar, no temp file


# ---- voxel spacing and intensity scaling -------------------------------------------------------------

def _downsample_case(source: Path, target: Path, factor: int = 2) -> Path:
    """The case on a grid of ``factor`` mm voxels (every factor-th voxel, the affine scaled to match)."""
    target.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        img = nib.load(file)
        data = np.asarray(img.dataobj)[::factor, ::factor, ::factor]
        affine = img.affine.copy()
        affine[:3, :3] *= factor
        nib.save(nib.Nifti1Image(data, affine), target / file.name.replace(source.name, target.name))
    return target


def test_segment_a_2mm_case_resamples_to_1mm_and_writes_on_the_input_grid(checkpoints, pristine, tmp_path):
    case = _downsample_case(pristine / "Phantom_000", tmp_path / "Coarse_000")
    out = tmp_path / "seg"
    result = subprocess.run([sys.executable, "-m", "brats_cnn.cli", "segment", case, "--model", checkpoints["good"],
                             "--out", out, *SEGMENT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "resampled to 1 mm" in line]
    assert len(notes) == 1 and "voxel spacing 2x2x2 mm" in notes[0] and "20x20x6 -> 40x40x12" in notes[0]
    written = nib.load(out / "Coarse_000.nii.gz")
    reference = nib.load(case / "Coarse_000_t1.nii.gz")
    assert written.shape == (20, 20, 6) and np.allclose(written.affine, reference.affine)
    assert json.loads((out / "Coarse_000.json").read_text())["resampled_to_1mm"] is True


def test_resampling_round_trip_of_labels_and_images():
    from brats_cnn.data.resample import isotropic_shape, needs_resampling, resample_volume

    assert not needs_resampling((1.0, 1.0, 1.0 + 1e-7)) and needs_resampling((1, 1, 5))
    assert isotropic_shape((20, 20, 6), (2, 2, 2)) == (40, 40, 12) and isotropic_shape((9, 9, 3), (1, 1, 5)) == (9, 9, 15)
    labels = np.zeros((10, 10, 4), np.uint8)
    labels[2:7, 3:8, 1:3] = 4
    fine = resample_volume(labels, (2, 2, 2), (20, 20, 8), (1, 1, 1), "nearest")
    assert fine.dtype == np.uint8 and set(np.unique(fine)) == {0, 4}
    assert np.array_equal(resample_volume(fine, (1, 1, 1), (10, 10, 4), (2, 2, 2), "nearest"), labels)
    ramp = np.arange(10, dtype=np.float32)[:, None, None] * np.ones((10, 3, 3), np.float32)
    fine = resample_volume(ramp, (2, 1, 1), (19, 3, 3), (1, 1, 1), "linear")  # 19 points cover 0..18 mm
    assert np.allclose(fine[:, 1, 1], np.arange(19) / 2, atol=1e-5)


def _with_scaling(path: Path, slope: float, inter: float) -> Path:
    """Store the integer image ``v`` of ``path`` as int16 ``v`` with header scaling ``slope``/``inter``.

    Readers then see ``v * slope + inter`` (``inter`` where ``v`` is 0: the background). nibabel
    recomputes the scaling when it saves, so the two header fields are patched in the bytes.
    """
    img = nib.load(path)
    stored = np.asarray(img.dataobj).astype(np.int16)
    raw = bytearray(nib.Nifti1Image(stored, img.affine).to_bytes())
    raw[112:120] = np.array([slope, inter], "<f4").tobytes()  # scl_slope, scl_inter of the NIfTI-1 header
    path.write_bytes(gzip.compress(bytes(raw)))
    check = nib.load(path)
    assert check.dataobj.slope == slope and check.dataobj.inter == inter
    assert np.array_equal(np.asarray(check.dataobj), stored * slope + inter)
    return path


def test_scl_slope_and_inter_keep_the_background_and_give_the_same_labels(checkpoints, pristine, tmp_path):
    case = tmp_path / "data" / "Phantom_000"
    shutil.copytree(pristine / "Phantom_000", case)
    for tag in ("t1", "t1ce", "t2", "flair"):  # integer intensities: stored exactly as int16
        path = case_file(tmp_path / "data", tag, "Phantom_000")
        values = np.round(read_nifti(path))
        assert values.min() >= 0 and values.max() < 2 ** 15
        save_nifti(path, values.astype(np.float32))
    plain = tmp_path / "plain"
    assert run_cli("segment", case, "--model", checkpoints["good"], "--out", plain, *SEGMENT).returncode == 0
    for tag in ("t1", "t1ce", "t2", "flair"):  # the same images as v * 2 + 100 inside, stored 0 (read 100) outside
        _with_scaling(case_file(tmp_path / "data", tag, "Phantom_000"), 2.0, 100.0)
    scaled = tmp_path / "scaled"
    result = run_cli("segment", case, "--model", checkpoints["good"], "--out", scaled, *SEGMENT)
    assert result.returncode == 0, result.stderr
    # Nyul and the z-score do not see an affine intensity change: the same labels, the same brain mask
    assert np.array_equal(read_nifti(scaled / "Phantom_000.nii.gz"), read_nifti(plain / "Phantom_000.nii.gz"))
    sidecars = [json.loads((folder / "Phantom_000.json").read_text()) for folder in (plain, scaled)]
    assert sidecars[0]["brain_voxels"] == sidecars[1]["brain_voxels"] < np.prod(SHAPE)


# ---- ambiguity ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("second", ["Phantom_001_t1.nii", "Phantom_001_T1.nii.gz"])
def test_two_files_for_one_sequence_are_an_error(second, dataset, tmp_path):
    nib.save(nib.load(case_file(dataset, "t1")), dataset / BAD / second)
    out = tmp_path / "cache"
    result = run_cli("preprocess", "--data", dataset, "--out", out, "--fit", "--strict", "--config", "smoke",
                     "--set", "preprocess.n4.sequences=[]")
    names = sorted([f"{BAD}_t1.nii.gz", second])
    assert_one_line_error(result, dataset / BAD, f"two files for t1 of case {BAD}", "keep one")
    assert all(name in result.stderr for name in names)
    assert not out.exists() or not any(out.rglob("meta.json"))


def test_resume_refuses_settings_that_change_the_run_and_accepts_workers(pristine, tmp_path):
    out = tmp_path / "run"
    assert run_cli("train", "--grade", "hgg", "--data", pristine, "--out", out, *TINY_TRAIN).returncode == 0
    before = {name: digest(out / name) for name in ("config.yaml", "last.pt")}
    for override, phrase in [("sampling.total_patches=32", "--resume cannot change sampling.total_patches "
                                                           "(the run has 16, --set gives 32)"),
                             ("train.batch_size=2", "--resume cannot change train.batch_size"),
                             ("train.lr_start=0.1", "--resume cannot change train.lr_start")]:
        result = run_cli("train", "--grade", "hgg", "--data", pristine, "--out", out, "--resume", "--device", "cpu",
                         "--set", override)
        assert_one_line_error(result, out / "last.pt", phrase, "train.num_workers")
        assert {name: digest(out / name) for name in before} == before
    result = run_cli("train", "--grade", "hgg", "--data", pristine, "--out", out, "--resume", "--device", "cpu",
                     "--set", "train.num_workers=1", "--set", "train.checkpoint_minutes=5")
    assert result.returncode == 0, result.stderr
    shutil.copyfile(out / "best.pt", out / "last.pt")  # a model without training state in last.pt's place
    before = digest(out / "last.pt")
    result = run_cli("train", "--grade", "hgg", "--data", pristine, "--out", out, "--resume", "--device", "cpu")
    assert_one_line_error(result, out / "last.pt", "holds no training state", "the last.pt that train wrote")
    assert digest(out / "last.pt") == before


def test_resume_may_extend_the_epochs_and_the_learning_rate_follows_the_new_length(pristine, tmp_path):
    out = tmp_path / "run"
    assert run_cli("train", "--grade", "hgg", "--data", pristine, "--out", out, *TINY_TRAIN).returncode == 0
    done = torch.load(out / "last.pt", map_location="cpu", weights_only=False)["training_state"]
    steps_per_epoch = int(done["step"])  # one epoch of 16 patches in batches of 4
    assert steps_per_epoch == 4
    result = run_cli("train", "--grade", "hgg", "--data", pristine, "--out", out, "--resume", "--device", "cpu",
                     "--set", "train.epochs=3")
    assert result.returncode == 0, result.stderr
    assert "changes train.epochs from 1 to 3" in result.stderr
    rows = [line.split(",") for line in (out / "steps.csv").read_text().splitlines()[1:]]
    assert [int(row[0]) for row in rows] == list(range(1, 3 * steps_per_epoch + 1))
    cfg = load_config("smoke")
    start, end = cfg.train.lr_start, cfg.train.lr_end
    for step, lr, _ in rows[steps_per_epoch:]:  # the resumed steps follow a 3-epoch decay, ending at lr_end
        assert float(lr) == pytest.approx(learning_rate(int(step) - 1, 3 * steps_per_epoch, start, end), rel=1e-6)
    assert float(rows[-1][1]) == pytest.approx(end, rel=1e-6)
    before = digest(out / "last.pt")
    result = run_cli("train", "--grade", "hgg", "--data", pristine, "--out", out, "--resume", "--device", "cpu",
                     "--set", "train.epochs=2")
    assert_one_line_error(result, out / "last.pt", "--resume cannot set train.epochs=2", "reached epoch 3")
    assert digest(out / "last.pt") == before


# ---- evaluate: a prediction that matches no case ----------------------------------------------------

def test_evaluate_warns_about_a_prediction_that_matches_no_case(pristine, tmp_path):
    gt = tmp_path / "gt"
    cases = sorted(p.name for p in pristine.iterdir() if p.is_dir())[:2]
    for case in cases:
        shutil.copytree(pristine / case, gt / case)
    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copy(gt / cases[0] / f"{cases[0]}_seg.nii.gz", pred / "Phantom_00.nii.gz")  # a typo
    shutil.copy(gt / cases[1] / f"{cases[1]}_seg.nii.gz", pred / f"{cases[1]}.nii.gz")
    out = tmp_path / "eval"
    result = run_cli("evaluate", "--pred", pred, "--gt", gt, "--out", out, "--lesion-wise", "none")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "match no ground-truth case" in line]
    assert len(warnings) == 1 and "Phantom_00.nii.gz" in warnings[0] and "unmatched" in warnings[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["extra_predictions"] == ["Phantom_00"] and summary["missing_predictions"] == [cases[0]]
    # round three (issue 39): when no prediction matches any case, nothing is scored: one line listing both
    (pred / f"{cases[1]}.nii.gz").unlink()
    for extra in ([], ["--only-predicted"]):
        again = run_cli("evaluate", "--pred", pred, "--gt", gt, "--out", tmp_path / "none", *extra)
        line = assert_one_line_error(again, pred, "no prediction matches any ground-truth case: found Phantom_00, "
                                                  f"expected {cases[0]}, {cases[1]}")
        assert line and not (tmp_path / "none").exists()


# ---- a one-case segment names the input file ---------------------------------------------------------

def test_one_case_segment_error_names_the_input_file(checkpoints, dataset, tmp_path):
    bad = case_file(dataset, "t2")
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    out = tmp_path / "seg.nii.gz"
    result = run_cli("segment", dataset / BAD, "--model", checkpoints["good"], "--out", out, *SEGMENT)
    line = assert_one_line_error(result, bad, "file is truncated")
    assert line.startswith(f"brats-cnn: error: {bad}: ") and not out.exists()
    assert leftovers(tmp_path) == []


def test_evaluate_pairs_one_prediction_file_with_one_ground_truth_file_whatever_their_names(pristine, tmp_path):
    case = sorted(p.name for p in pristine.iterdir() if p.is_dir())[0]
    truth = pristine / case / f"{case}_seg.nii.gz"
    pred = tmp_path / "some" / "pred.nii.gz"
    pred.parent.mkdir()
    shutil.copy(truth, pred)
    out = tmp_path / "eval"
    result = run_cli("evaluate", "--pred", pred, "--gt", truth, "--out", out, "--lesion-wise", "none")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases_scored"] == 1 and summary["missing_predictions"] == []
    assert summary["statistics"]["all"]["complete"]["dsc"]["mean"] == 1.0  # it was read: identical maps
    # a probability map (4-D) given as the prediction is refused, not scored as missing
    image = nib.load(truth)
    probabilities = tmp_path / "case_probabilities.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([np.asarray(image.dataobj, dtype=np.float32)] * 4, axis=-1), image.affine),
             probabilities)
    refused = run_cli("evaluate", "--pred", probabilities, "--gt", truth, "--out", tmp_path / "p")
    assert_one_line_error(refused, probabilities, "is a 4-D image", "not a 3-D label map (a probability map?")
    assert not (tmp_path / "p").exists()
