"""Interrupted work: SIGKILL in the middle of ``train`` and of a batch ``segment``, then rerun.

* ``train`` killed mid-epoch and rerun with ``--resume`` ends with exactly the weights of an
  uninterrupted run (same seed, CPU; ``torch.equal`` on every tensor of the state dict).
* A batch ``segment`` killed after its first case leaves only complete outputs under final names
  (every ``.nii.gz`` there reads fully and is identical to an uninterrupted run's); a rerun
  skips the finished cases and does the rest.

SIGKILL gives the process no chance to clean up, so what is checked here is the atomic-write
design (temp file + rename): a temp file may stay behind, hidden (``.<name>.*.tmp*``), but never a
partial file under a final name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from brats_cnn.network.checkpoint import load_checkpoint
from brats_cnn.data.phantom import write_phantom_dataset

# LGG network (cheapest), no validation cases, no N4; 2 epochs of 8 batches of 4 patches
# (about 1 s per epoch on one free core; a batch of 4 LGG patches costs ~2.4 GFLOP forward+backward).
EPOCHS = 2
TINY_TRAIN = ["preprocess.n4.sequences=[]", "model.architecture=lgg", "sampling.total_patches=32",
              "train.batch_size=4", "train.validate_dice=false", "data.validation_cases=0",
              "train.num_workers=0", f"train.epochs={EPOCHS}"]
SHAPE = (40, 40, 12)


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "brats_cnn.cli", "-q", *map(str, args)]


def kill_when(proc: subprocess.Popen, ready, delay: float = 0.0, timeout: float = 120.0,
              allow_exit: bool = False) -> bool:
    """SIGKILL ``proc`` ``delay`` seconds after ``ready()`` first returns True; True if it was killed.

    With ``allow_exit`` a process that finishes successfully before the kill is accepted (False).
    """
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            if allow_exit and proc.returncode == 0:
                return False
            out, err = proc.communicate()
            pytest.fail(f"process ended (code {proc.returncode}) before it could be killed:\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the process")
        time.sleep(0.005)
    time.sleep(delay)
    if allow_exit and proc.poll() == 0:
        proc.communicate()
        return False
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it ended between the poll and the kill
        pass
    proc.communicate(timeout=30)
    if allow_exit and proc.returncode == 0:  # it finished just before the kill landed: not killed
        return False
    assert proc.returncode == -signal.SIGKILL
    return True


def final_outputs(folder: Path) -> list[str]:
    """Names of the label maps under final names (temp files ``.x.*.tmp.nii.gz`` are hidden)."""
    return sorted(p.name for p in folder.glob("*.nii.gz") if not p.name.startswith("."))


def hidden_temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


def assert_no_partial_under_final_names(folder: Path) -> None:
    """Any temp file left by SIGKILL is a hidden ``.name.*.tmp*``; never a final name."""
    for temp in hidden_temps(folder):
        assert temp.name.startswith("."), temp


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    from brats_cnn.config import load_config
    from brats_cnn.preprocessing.preprocess import preprocess_dataset

    raw = tmp_path_factory.mktemp("raw")
    write_phantom_dataset(raw, 2, grades=["HGG", "HGG"], shape=SHAPE)
    out = tmp_path_factory.mktemp("cache")
    preprocess_dataset(raw, out, config=load_config("smoke", TINY_TRAIN), fit=True)
    return out


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).network.state_dict()


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _train(cache: Path, out: Path, *extra: str) -> subprocess.Popen:
    sets = [x for s in TINY_TRAIN for x in ("--set", s)]
    return subprocess.Popen(cli("train", "--grade", "hgg", "--data", cache, "--out", out, "--config", "smoke",
                                "--device", "cpu", *sets, *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _resume(cache: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cli("train", "--grade", "hgg", "--data", cache, "--out", out, "--device", "cpu",
                              "--resume"), capture_output=True, text=True, timeout=300)


def _epoch_of(path: Path) -> int:
    return load_checkpoint(path).epoch


def test_train_killed_mid_epoch_resumes_to_the_same_weights(cache, tmp_path):
    from brats_cnn.training.train import run_training

    # the uninterrupted run in this process (same code, same thread count, same seed)
    straight = run_training("hgg", cache, tmp_path / "straight", config="smoke", overrides=TINY_TRAIN,
                            device="cpu")
    epoch_seconds = min(row["epoch_seconds"] for row in straight.history)

    # last.pt appears at the end of epoch 1; a quarter of an epoch later the run is inside epoch 2.
    # Epoch times vary with the machine's load: if the run got to the end anyway, retry at once.
    # A kill that lands after the last epoch's checkpoint (a loaded machine) is another attempt, not a failure.
    for attempt, delay in enumerate((epoch_seconds / 4, epoch_seconds / 8, 0.0)):
        run = tmp_path / f"killed{attempt}"
        proc = _train(cache, run)
        if kill_when(proc, lambda: (run / "last.pt").is_file(), delay=delay, allow_exit=True) \
                and 1 <= _epoch_of(run / "last.pt") < EPOCHS:
            break
    else:
        pytest.fail("the training run finished before it could be killed")
    assert_no_partial_under_final_names(run)
    killed_at = _epoch_of(run / "last.pt")
    assert 1 <= killed_at < EPOCHS, "the kill came after the last epoch"
    result = _resume(cache, run)
    assert result.returncode == 0, result.stderr
    assert _epoch_of(run / "last.pt") == EPOCHS
    _assert_same_weights(_state(tmp_path / "straight" / "last.pt"), _state(run / "last.pt"))
    resumed_history = json.loads((run / "metrics.json").read_text())
    assert [r["train_loss"] for r in resumed_history] == [r["train_loss"] for r in straight.history]


def test_train_killed_after_a_mid_epoch_checkpoint_resumes_to_the_same_weights(cache, tmp_path):
    from brats_cnn.training.train import run_training

    mid = TINY_TRAIN + ["train.checkpoint_every_steps=3"]  # 8 batches per epoch: last.pt at step 3, 6, 8, ...
    straight = run_training("hgg", cache, tmp_path / "straight", config="smoke", overrides=mid, device="cpu")
    step_seconds = min(row["epoch_seconds"] for row in straight.history) / 8
    for attempt, delay in enumerate((step_seconds, 0.0)):  # about a step after the first (mid-epoch) last.pt
        run = tmp_path / f"killed{attempt}"
        proc = _train(cache, run, "--set", "train.checkpoint_every_steps=3")
        if kill_when(proc, lambda: (run / "last.pt").is_file(), delay=delay, allow_exit=True):
            break
    else:
        pytest.fail("the training run finished before it could be killed")
    assert_no_partial_under_final_names(run)
    state = load_checkpoint(run / "last.pt").training_state
    assert state["step"] < EPOCHS * 8, "the kill came after the last step"
    result = _resume(cache, run)
    assert result.returncode == 0, result.stderr
    _assert_same_weights(_state(tmp_path / "straight" / "last.pt"), _state(run / "last.pt"))
    assert (run / "steps.csv").read_text() == (tmp_path / "straight" / "steps.csv").read_text()


@pytest.mark.slow
def test_train_killed_twice_at_random_points_still_matches(cache, tmp_path):
    """Two kills at seeded random points (in the run, then in its resumed run), 4 epochs."""
    longer = ("--set", "train.epochs=4")
    straight = tmp_path / "straight"
    proc = _train(cache, straight, *longer)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    epoch_seconds = min(row["epoch_seconds"] for row in json.loads((straight / "metrics.json").read_text()))
    rng = np.random.default_rng(1)
    run = tmp_path / "killed"
    proc = _train(cache, run, *longer)
    kill_when(proc, lambda: (run / "last.pt").is_file(), delay=float(rng.uniform(0, 1)) * epoch_seconds,
              allow_exit=True)
    if _epoch_of(run / "last.pt") < 4:
        stamp = _mtime(run / "last.pt")
        proc = subprocess.Popen(cli("train", "--grade", "hgg", "--data", cache, "--out", run, "--device", "cpu",
                                    "--resume"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # the resumed run rewrites last.pt after its first epoch; kill somewhere in the next one
        kill_when(proc, lambda: _mtime(run / "last.pt") > stamp, delay=float(rng.uniform(0, 1)) * epoch_seconds,
                  allow_exit=True)
    assert_no_partial_under_final_names(run)
    if _epoch_of(run / "last.pt") < 4:
        result = _resume(cache, run)
        assert result.returncode == 0, result.stderr
    _assert_same_weights(_state(straight / "last.pt"), _state(run / "last.pt"))


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


# ---------------------------------------------------------------------------------------------
# segment


@pytest.fixture(scope="module")
def model_and_cases(tmp_path_factory) -> tuple[Path, Path]:
    """A random-weight checkpoint (normaliser fitted on the phantoms) and 4 phantom cases."""
    from brats_cnn.config import load_config
    from brats_cnn.data.layouts import list_cases
    from brats_cnn.data.io import load_case
    from brats_cnn.network.model import build_network
    from brats_cnn.network.checkpoint import save_checkpoint
    from brats_cnn.preprocessing.normalise import fit_normaliser

    root = tmp_path_factory.mktemp("segment")
    data = root / "cases"
    write_phantom_dataset(data, 4, shape=SHAPE, grades=["HGG"] * 4)
    config = load_config("smoke", ["preprocess.n4.sequences=[]", "model.architecture=lgg",
                                   "postprocess.min_component_voxels=1"])
    normaliser = fit_normaliser([load_case(ref) for ref in list_cases(data)[:2]], config)
    torch.manual_seed(0)
    network = build_network(config.model, 4, patch_size=config.sampling.patch_size)
    model = save_checkpoint(root / "model.pt", network=network, config=config, normaliser=normaliser,
                            label_convention="brats2017")
    return model, data


def _segment(model: Path, data: Path, out: Path) -> list[str]:
    return cli("segment", data, "--model", model, "--out", out, "--device", "cpu", "--mode", "fast")


@pytest.fixture(scope="module")
def reference(model_and_cases, tmp_path_factory) -> Path:
    """The uninterrupted batch segmentation of the 4 cases."""
    model, data = model_and_cases
    out = tmp_path_factory.mktemp("reference")
    result = subprocess.run(_segment(model, data, out), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(final_outputs(out)) == 4
    return out


def test_segment_batch_killed_leaves_only_complete_outputs_and_a_rerun_finishes(model_and_cases, reference,
                                                                                tmp_path):
    model, data = model_and_cases
    expected = final_outputs(reference)

    out = tmp_path / "killed"
    proc = subprocess.Popen(_segment(model, data, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_when(proc, lambda: bool(final_outputs(out)))
    assert_no_partial_under_final_names(out)
    done = final_outputs(out)
    assert 1 <= len(done) < 4, done
    for name in done:  # complete: reads fully and equals the uninterrupted output
        assert np.array_equal(np.asarray(nib.load(out / name).dataobj), np.asarray(nib.load(reference / name).dataobj))
    # finished = label map and sidecar (written last); a kill between the two leaves a case to redo
    finished = [name for name in done if (out / name.replace(".nii.gz", ".json")).is_file()]
    before = {name: (out / name).stat().st_mtime_ns for name in finished}

    result = subprocess.run(_segment(model, data, out), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert final_outputs(out) == expected
    for name in expected:
        assert np.array_equal(np.asarray(nib.load(out / name).dataobj), np.asarray(nib.load(reference / name).dataobj))
    for name, mtime in before.items():  # finished cases were skipped, not redone
        assert (out / name).stat().st_mtime_ns == mtime
    assert all((out / name.replace(".nii.gz", ".json")).is_file() for name in expected)


def test_segment_rerun_completes_a_case_killed_between_label_map_and_sidecar(model_and_cases, reference, tmp_path):
    """The label map is written before the sidecar; a kill in between must not leave the case half done."""
    import shutil

    from brats_cnn.inference.segment import run_segment

    model, data = model_and_cases
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "Phantom_002.json").unlink()  # the state after a SIGKILL between the two writes
    run_segment([data], model=model, out=out, device="cpu", mode="fast")
    assert (out / "Phantom_002.json").is_file()


def test_stale_temp_files_from_a_killed_run_are_never_read(model_and_cases, reference, tmp_path):
    """Hidden ``.name.*.tmp.nii.gz`` left by SIGKILL are not taken for sequences or predictions."""
    import shutil

    from brats_cnn.evaluation.pairing import find_predictions
    from brats_cnn.data.layouts import find_case, list_cases

    _, data = model_and_cases
    cases = tmp_path / "cases"
    shutil.copytree(data, cases)
    stale = cases / "Phantom_000" / ".Phantom_000_t1.x1y2z3.tmp.nii.gz"
    stale.write_bytes(b"\x1f\x8b half a gzip")
    assert find_case(cases / "Phantom_000").image_paths[0].name == "Phantom_000_t1.nii.gz"
    assert [r.case_id for r in list_cases(cases)] == [f"Phantom_{i:03d}" for i in range(4)]
    preds = tmp_path / "preds"
    shutil.copytree(reference, preds)
    (preds / ".Phantom_001.k9j8.tmp.nii.gz").write_bytes(b"\x1f\x8b half a gzip")
    found, failures = find_predictions(preds)
    assert sorted(found) == [f"Phantom_{i:03d}" for i in range(4)] and failures == []
    assert found["Phantom_001"].name == "Phantom_001.nii.gz"
