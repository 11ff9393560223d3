"""Tests for brats_cnn.inference.calibrate: the prior correction, the setting search and the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from brats_cnn.inference.calibrate import ALPHAS, CALIBRATION_KEYS, Choice, best_choice, region_mean, run_calibrate, score_settings
from brats_cnn.inference.prior import (PRIOR_EM_FLOOR, apply_class_prior, class_frequencies, correct_class_prior,
                             estimate_case_prior)
from brats_cnn.config import PostprocessConfig
from brats_cnn.errors import CheckpointError, ConfigError, InputError
from brats_cnn.inference.postprocess import keep_largest_component


def test_prior_correction_by_hand():
    probs = np.array([[0.5, 0.2], [0.5, 0.8]], dtype=np.float32)  # (C=2, 2 voxels)
    frequencies = [0.9, 0.1]
    np.testing.assert_array_equal(apply_class_prior(probs, frequencies, 0.0), probs)
    full = apply_class_prior(probs, frequencies, 1.0)
    np.testing.assert_allclose(full[:, 0], [0.9, 0.1], rtol=1e-6)  # flat posterior -> the prior itself
    np.testing.assert_allclose(full[:, 1], [0.18 / 0.26, 0.08 / 0.26], rtol=1e-6)
    half = apply_class_prior(probs, frequencies, 0.5)
    np.testing.assert_allclose(half[:, 0], [0.75, 0.25], rtol=1e-6)  # sqrt(.9) : sqrt(.1) = 3 : 1
    assert half.dtype == np.float32 and probs[0, 0] == 0.5  # input untouched
    with pytest.raises(ConfigError, match="class frequencies have 3 entries but the network has 2 classes"):
        apply_class_prior(probs, [0.5, 0.3, 0.2], 0.5)
    with pytest.raises(ConfigError, match="finite and > 0"):
        apply_class_prior(probs, [1.0, 0.0], 0.5)


def _balanced_posteriors(prior, n, seed=0):
    """(2, n) posteriors of a perfectly calibrated balanced-prior network on n voxels drawn with ``prior``:
    class c has intensity ~ N(c, 1), so p_b(1|x) = sigmoid(x - 0.5)."""
    rng = np.random.default_rng(seed)
    x = (rng.random(n) < prior[1]).astype(np.float64) + rng.standard_normal(n)
    p1 = 1 / (1 + np.exp(-(x - 0.5)))
    return np.stack([1 - p1, p1]).astype(np.float32)


def test_em_recovers_the_class_prior_of_a_case():
    # a case with 30 % tumour, a network trained balanced, training frequencies of 10 % tumour:
    # Saerens' EM (alpha 1) finds the case's own prior; the training prior would under-call the tumour
    probs = _balanced_posteriors([0.7, 0.3], 200_000).reshape(2, 200, 1000, 1)
    mask = np.ones((200, 1000, 1), bool)
    prior = estimate_case_prior(probs, mask, [0.9, 0.1], 1.0)
    np.testing.assert_allclose(prior, [0.7, 0.3], atol=0.01)
    assert prior.sum() == pytest.approx(1.0)
    corrected, used = correct_class_prior(probs, mask, [0.9, 0.1], 1.0, adapt=True)
    np.testing.assert_array_equal(used, prior)
    fixed, used_fixed = correct_class_prior(probs, mask, [0.9, 0.1], 1.0, adapt=False)
    np.testing.assert_array_equal(used_fixed, [0.9, 0.1])
    assert (corrected.argmax(0) == 1).mean() > (fixed.argmax(0) == 1).mean() + 0.1
    np.testing.assert_array_equal(fixed, apply_class_prior(probs, [0.9, 0.1], 1.0))


def test_em_prior_by_hand_counts_brain_voxels_only():
    # uninformative posteriors leave the training prior where it is (it is already the fixed point)
    flat = np.full((2, 4, 1, 1), 0.5, np.float32)
    mask = np.ones((4, 1, 1), bool)
    np.testing.assert_allclose(estimate_case_prior(flat, mask, [0.8, 0.2], 1.0), [0.8, 0.2])
    # certain posteriors: one step gives their share among the brain voxels; voxels outside are ignored
    certain = np.zeros((2, 4, 1, 1), np.float32)
    certain[0, :3], certain[1, 3:] = 1, 1   # 3 voxels of class 0, 1 of class 1 ...
    certain[:, 0, 0, 0] = [0, 1]            # ... but voxel 0 (class 1) is outside the brain
    brain = np.array([False, True, True, True]).reshape(4, 1, 1)
    np.testing.assert_allclose(estimate_case_prior(certain, brain, [0.5, 0.5], 1.0), [2 / 3, 1 / 3])
    # a class no brain voxel has falls to the floor, never to 0
    absent = np.zeros((2, 4, 1, 1), np.float32)
    absent[0] = 1
    prior = estimate_case_prior(absent, mask, [0.5, 0.5], 1.0)
    assert prior[1] == pytest.approx(PRIOR_EM_FLOOR, rel=1e-3) and prior.sum() == pytest.approx(1.0)
    # alpha 0 and an empty brain: the training frequencies, untouched
    np.testing.assert_array_equal(estimate_case_prior(certain, brain, [0.6, 0.4], 0.0), [0.6, 0.4])
    np.testing.assert_array_equal(estimate_case_prior(certain, np.zeros_like(brain), [0.6, 0.4], 1.0), [0.6, 0.4])
    with pytest.raises(InputError, match="does not match probabilities"):
        estimate_case_prior(certain, np.ones((3, 1, 1), bool), [0.6, 0.4], 1.0)


def test_class_frequencies_count_brain_voxels_only():
    label = np.array([[0, 0, 1, 2], [4 % 4, 3, 3, 0]], dtype=np.uint8)
    mask = np.array([[True, False, True, True], [True, True, True, False]])
    # brain voxels: 0, 1, 2, 0, 3, 3 -> class shares 2/6, 1/6, 1/6, 2/6, 0
    np.testing.assert_allclose(class_frequencies([(label, mask)], 5), [2 / 6, 1 / 6, 1 / 6, 2 / 6, 0])
    two = class_frequencies([(label, mask), (np.full((2, 2), 4, np.uint8), np.ones((2, 2), bool))], 5)
    np.testing.assert_allclose(two, [0.2, 0.1, 0.1, 0.2, 0.4])


def test_keep_largest_component():
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[0:2, 0:2, 0:2] = 2          # 8 voxels
    labels[5:8, 5:8, 5:8] = 1          # 27 voxels, part necrosis ...
    labels[5:8, 5:8, 8] = 4            # ... and enhancing, touching: 36 voxels
    out = keep_largest_component(labels)
    assert np.count_nonzero(out) == 36 and out[0, 0, 0] == 0 and out[6, 6, 8] == 4
    np.testing.assert_array_equal(keep_largest_component(np.zeros((3, 3, 3), np.uint8)), 0)
    assert labels[0, 0, 0] == 2  # input untouched


def test_score_settings_finds_the_alpha_that_removes_a_false_positive():
    # truth: a 3x3x3 tumour (class 2) in a 10^3 brain; the network also calls a far voxel class 2
    # with p = 0.55: the prior of class 2 (rare) removes it at alpha >= some value, keeping the tumour
    truth = np.zeros((10, 10, 10), np.uint8)
    truth[2:5, 2:5, 2:5] = 2
    probs = np.zeros((5, 10, 10, 10), np.float32)
    probs[0] = 0.9
    probs[2] = 0.1
    probs[0][truth == 2], probs[2][truth == 2] = 0.05, 0.95
    probs[0, 8, 8, 8], probs[2, 8, 8, 8] = 0.45, 0.55
    frequencies = np.array([0.9, 0.02, 0.05, 0.01, 0.02])
    choices = score_settings({"none": [probs]}, [truth], [np.ones_like(truth, bool)], frequencies,
                             PostprocessConfig(min_component_voxels=1), "brats2017", alphas=(0.0, 1.0),
                             decisions=("argmax",))
    assert len(choices) == 6  # (alpha 0 + alpha 1 with either prior) x keep-largest
    assert sum(c.prior_adapt for c in choices) == 2 and all(c.alpha == 1.0 for c in choices if c.prior_adapt)
    by_key = {(c.alpha, c.keep_largest): c for c in choices if not c.prior_adapt}
    assert by_key[(0.0, False)].dice["complete"] == pytest.approx(2 * 27 / (27 + 28))
    assert by_key[(1.0, False)].dice["complete"] == 1.0
    assert by_key[(0.0, True)].dice["complete"] == 1.0  # keep-largest removes it too
    chosen = best_choice(choices)
    assert (chosen.alpha, chosen.keep_largest) == (1.0, False)  # tie with (0.0, True): the plainer post-processing


def test_best_choice_tie_breaking():
    make = lambda alpha, tta, largest, score, decision="argmax": Choice(alpha, tta, largest, decision, {}, score)  # noqa: E731
    choices = [make(0.5, "rot90", False, 0.8), make(0.7, "none", False, 0.8), make(0.3, "none", True, 0.8),
               make(0.9, "none", False, 0.8), make(0.1, "none", False, 0.8, "regions")]
    assert best_choice(choices) == choices[1]
    assert best_choice(choices + [make(0.1, "rot90", True, 0.81)]).score == 0.81


def test_region_mean_averages_the_three_regions():
    assert region_mean({"complete": 0.9, "core": 0.6, "enhancing": 0.3}) == pytest.approx(0.6)
    with pytest.raises(KeyError):
        region_mean({"complete": 0.9, "core": 0.6})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from brats_cnn.data.phantom import write_phantom_dataset
    from brats_cnn.training.train import run_training

    root = tmp_path_factory.mktemp("calib")
    write_phantom_dataset(root / "raw", 3, grades=["HGG"] * 3, shape=(40, 40, 12))
    run_training("hgg", root / "raw", root / "run", config="smoke", device="cpu",
                 overrides=["preprocess.n4.sequences=[]", "model.architecture=lgg", "sampling.total_patches=64",
                            "train.batch_size=16", "train.epochs=1", "data.validation_cases=1",
                            "train.num_workers=0"])
    return root


def test_calibrate_command_writes_a_calibrated_checkpoint_that_segment_applies(tiny_run):
    from brats_cnn.network.checkpoint import load_checkpoint
    from brats_cnn.inference.segment import run_segment

    run = tiny_run / "run"
    best = load_checkpoint(run / "best.pt")
    frequencies = best.calibration["class_frequencies"]  # written by train
    assert len(frequencies) == 4 and sum(frequencies) == pytest.approx(1.0)
    summary = run_calibrate(run, device="cpu", tta=False)
    # keep-largest x decision rule x (alpha 0 + every other alpha with the training or the adapted prior)
    assert len(summary["table"]) == 2 * 2 * (2 * len(ALPHAS) - 1)
    calibrated = load_checkpoint(run / "calibrated.pt")
    assert calibrated.config.segment.prior_alpha == summary["chosen"]["alpha"]
    assert calibrated.config.segment.decision == summary["chosen"]["decision"]
    assert calibrated.config.segment.prior_adapt == summary["chosen"]["prior_adapt"]
    assert calibrated.config.postprocess.keep_largest == summary["chosen"]["keep_largest"]
    assert calibrated.calibration["class_frequencies"] == pytest.approx(frequencies)
    assert json.loads((run / "calibrated.json").read_text())["chosen"] == summary["chosen"]
    for a, b in zip(best.network.parameters(), calibrated.network.parameters()):
        assert torch.equal(a, b)
    case = next(p for p in (tiny_run / "raw").iterdir() if p.is_dir())
    out = tiny_run / "seg"
    run_segment([case], model=run / "calibrated.pt", out=out / "a.nii.gz", device="cpu",
                overrides=["segment.prior_alpha=0.5", "segment.decision=regions"])
    sidecar = json.loads((out / "a.json").read_text())
    assert sidecar["prior_alpha"] == 0.5 and sidecar["tta_rotations"] == [0] and sidecar["decision"] == "regions"
    assert sidecar["prior_adapt"] is False and sidecar["class_prior"] == pytest.approx(frequencies, abs=1e-6)
    run_segment([case], model=run / "calibrated.pt", out=out / "b.nii.gz", device="cpu",
                overrides=["segment.prior_alpha=1", "segment.prior_adapt=true"])
    adapted = json.loads((out / "b.json").read_text())
    assert adapted["prior_adapt"] is True and sum(adapted["class_prior"]) == pytest.approx(1.0, abs=1e-5)
    assert adapted["class_prior"] != pytest.approx(frequencies, abs=1e-3)  # this case's own prior
    before = (run / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match="--out would write over the checkpoint being calibrated"):
        run_calibrate(run, model=run / "best.pt", out=run / "best.pt", device="cpu", tta=False)
    with pytest.raises(ConfigError, match="--out would write over the run's last.pt"):
        run_calibrate(run, out=run / "last.pt", device="cpu", tta=False)
    assert (run / "last.pt").read_bytes() == before


def test_prior_correction_on_an_uncalibrated_checkpoint_is_refused_before_any_work(tiny_run, tmp_path):
    from brats_cnn.network.checkpoint import load_checkpoint, save_checkpoint
    from brats_cnn.inference.segment import run_segment

    best = load_checkpoint(tiny_run / "run" / "best.pt")
    uncalibrated = tmp_path / "uncalibrated.pt"  # as checkpoints written before the calibration existed
    save_checkpoint(uncalibrated, network=best.network, config=best.config, normaliser=best.normaliser,
                    label_convention=best.label_convention, epoch=best.epoch, training_state=None, calibration=None)
    case = next(p for p in (tiny_run / "raw").iterdir() if p.is_dir())
    with pytest.raises(ConfigError, match="needs a calibrated checkpoint"):
        run_segment([case], model=uncalibrated, out=tmp_path / "x.nii.gz", device="cpu",
                    overrides=["segment.prior_alpha=0.5"])
    assert not (tmp_path / "x.nii.gz").exists()


def test_calibrate_needs_validation_cases(tiny_run, tmp_path):
    import shutil

    from brats_cnn.network.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run, ignore=shutil.ignore_patterns("cache"))
    last = load_checkpoint(run / "last.pt")
    state = dict(last.training_state, validation_cases=[])
    save_checkpoint(run / "last.pt", network=last.network, config=last.config, normaliser=last.normaliser,
                    label_convention=last.label_convention, epoch=last.epoch, training_state=state)
    with pytest.raises(CheckpointError, match="no training or no validation cases"):
        run_calibrate(run, cache=tiny_run / "run" / "cache", device="cpu")


def test_fixed_calibration_writes_the_given_settings_without_a_search(tiny_run, tmp_path, capsys):
    from brats_cnn.cli import main
    from brats_cnn.network.checkpoint import load_checkpoint
    from brats_cnn.inference.segment import run_segment

    run = tiny_run / "run"
    out = tmp_path / "fixed.pt"
    base = ["-q", "calibrate", "--run", str(run), "--model", str(run / "last.pt")]
    assert main([*base, "--out", str(out), "--fixed", "segment.prior_alpha=0.8",
                 "--fixed", "segment.tta_rotations=[0,90,180,270]"]) == 0
    fixed, last = load_checkpoint(out), load_checkpoint(run / "last.pt")
    assert fixed.config.segment.prior_alpha == 0.8 and fixed.config.segment.tta_rotations == (0, 90, 180, 270)
    assert fixed.config.segment.decision == "argmax" and fixed.config.segment.prior_adapt is False
    assert fixed.calibration["class_frequencies"] == pytest.approx(last.calibration["class_frequencies"])
    assert fixed.calibration["fixed"] == ["segment.prior_alpha=0.8", "segment.tta_rotations=[0,90,180,270]"]
    assert fixed.training_state is None
    for a, b in zip(last.network.parameters(), fixed.network.parameters()):
        assert torch.equal(a, b)
    assert json.loads(out.with_suffix(".json").read_text())["fixed"] == fixed.calibration["fixed"]
    # the cross-validated decisions (pipelines/cross_validate.py) are calibration settings too
    cv = tmp_path / "cv.pt"
    assert main([*base, "--out", str(cv), "--fixed", "segment.class_weights=[1,1,1.5,1]",
                 "--fixed", "postprocess.min_component_voxels=3000", "--fixed", "postprocess.keep_largest=true",
                 "--fixed", "segment.tta=never"]) == 0
    chosen = load_checkpoint(cv).config
    assert chosen.segment.class_weights == (1.0, 1.0, 1.5, 1.0) and chosen.postprocess.min_component_voxels == 3000
    assert chosen.segment.tta == "never"  # a rule chosen without TTA: also on CUDA
    assert chosen.postprocess.keep_largest is True and chosen.segment.prior_alpha == last.config.segment.prior_alpha
    case = next(p for p in (tiny_run / "raw").iterdir() if p.is_dir())
    run_segment([case], model=out, out=tmp_path / "seg.nii.gz", device="cpu", overrides=["segment.tta=always"])
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert sidecar["prior_alpha"] == 0.8 and sidecar["tta_rotations"] == [0, 90, 180, 270]
    assert sidecar["tta"] == "always"
    # segment.tta auto (the default) on a CPU: the calibrated rotations are not used
    run_segment([case], model=out, out=tmp_path / "auto.nii.gz", device="cpu")
    sidecar = json.loads((tmp_path / "auto.json").read_text())
    assert sidecar["tta"] == "auto" and sidecar["tta_rotations"] == [0]
    # only calibration keys, and never over the input: one line, exit 2, nothing written
    before, best_before = (run / "last.pt").read_bytes(), (run / "best.pt").read_bytes()
    capsys.readouterr()
    for args, message in ((["--fixed", "train.epochs=3", "--out", str(tmp_path / "no.pt")],
                           f"--fixed: --fixed sets only {', '.join(CALIBRATION_KEYS)}; got 'train.epochs'"),
                          (["--fixed", "segment.prior_alpha=0.8", "--out", str(run / "last.pt")],
                           f"{run / 'last.pt'}: --out would write over the checkpoint being calibrated"),
                          (["--fixed", "segment.prior_alpha=0.8", "--out", str(run / "best.pt")],
                           f"{run / 'best.pt'}: --out would write over the run's best.pt")):
        assert main([*base, *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"brats-cnn: error: {message}") and err.count("\n") == 1, err
    assert (run / "last.pt").read_bytes() == before and not (tmp_path / "no.pt").exists()
    assert (run / "best.pt").read_bytes() == best_before
