"""The analysis scripts behind docs/results.md: ``pipelines/alpha_grid.py`` and ``benchmarks/fast_vs_exact.py``."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

SHAPE = (36, 36, 6)


def _script(path: str):
    spec = importlib.util.spec_from_file_location(path.replace("/", "_").removesuffix(".py"), REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def calibrated_phantom(tmp_path_factory, phantom_model):
    """A small calibrated checkpoint and one phantom case."""
    root = tmp_path_factory.mktemp("alpha_grid")
    (ref,), model = phantom_model(root, 1, SHAPE, seed=3, torch_seed=1,
                                  calibration={"class_frequencies": [0.85, 0.05, 0.07, 0.03]})
    return root, ref, model


def _dice_of_written(path, ref) -> tuple[float, ...]:
    from brats_cnn.inference.calibrate import region_dice
    from brats_cnn.data.io import load_case
    from brats_cnn.data.labels import REGIONS, to_class_indices

    labels = np.asarray(nib.load(path).dataobj).astype(np.int64)
    truth = load_case(ref, load_label=True).label
    dice = region_dice(to_class_indices(labels, "brats2017"), to_class_indices(truth, "brats2017"), "brats2017")
    return tuple(dice[region] for region in REGIONS)


def test_alpha_grid_on_saved_probabilities_equals_segment_run_with_that_alpha(calibrated_phantom):
    from brats_cnn.inference.segment import run_segment

    root, ref, model = calibrated_phantom
    case = ref.image_paths[0].parent
    run_segment([case], model=model, out=root / "alpha0", device="cpu", save_probabilities=True,
                postprocess=False, overrides=["segment.prior_alpha=0"])
    expected = {}
    for alpha in (0.0, 1.0):  # what segment writes with that alpha and the paper's post-processing
        out = root / f"segment_alpha{alpha}"
        run_segment([case], model=model, out=out, device="cpu", overrides=[f"segment.prior_alpha={alpha}"])
        expected[alpha] = _dice_of_written(out / f"{ref.case_id}.nii.gz", ref)
    assert expected[0.0] != expected[1.0]  # the correction changes this model's labels: the test can fail

    result = subprocess.run([sys.executable, str(REPO / "pipelines" / "alpha_grid.py"), str(case), "--model", str(model),
                             "--probabilities", str(root / "alpha0"), "--alphas", "0", "1"],
                            capture_output=True, text=True, check=True)
    rows = re.findall(r"alpha (\S+): complete (\S+) core (\S+) enhancing (\S+) mean (\S+)", result.stdout)
    assert [float(row[0]) for row in rows] == [0.0, 1.0]
    for row in rows:
        dice = tuple(float(value) for value in row[1:4])
        np.testing.assert_allclose(dice, expected[float(row[0])], atol=5e-4 + 1e-9)
        assert float(row[4]) == pytest.approx(np.mean(expected[float(row[0])]), abs=5e-4 + 1e-9)


def test_alpha_grid_names_a_missing_probability_file(calibrated_phantom, tmp_path):
    root, ref, model = calibrated_phantom
    result = subprocess.run([sys.executable, str(REPO / "pipelines" / "alpha_grid.py"), "--model", str(model),
                             "--probabilities", str(tmp_path), str(ref.image_paths[0].parent)],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert f"{ref.case_id}_probabilities.nii.gz: no saved probabilities" in result.stderr


def test_fast_vs_exact_samples_every_nth_brain_slice_and_scores_only_there():
    fast_vs_exact = _script("benchmarks/fast_vs_exact.py")
    mask = np.zeros((4, 4, 30), dtype=bool)
    mask[1:3, 1:3, 5:26] = True  # brain on slices 5..25
    chosen = fast_vs_exact.sampled_slices(mask, 10)
    assert np.flatnonzero(chosen.any(axis=(0, 1))).tolist() == [5, 15, 25]
    assert chosen.sum() == 3 * 4 and not (chosen & ~mask).any()

    truth = np.zeros(mask.shape, dtype=np.int64)
    truth[1:3, 1:3, 5:26] = 2  # edema everywhere in the brain
    labels = truth.copy()
    labels[1, 1, 15] = 0  # one miss on a sampled slice
    labels[:, :, 6] = 0  # misses on an unsampled slice do not count
    dice = fast_vs_exact.region_dice(labels, truth, chosen, "brats2017")
    assert dice["complete"] == pytest.approx(2 * 11 / (12 + 11))


def test_fast_vs_exact_refinement_takes_exact_labels_only_below_the_margin():
    fast_vs_exact = _script("benchmarks/fast_vs_exact.py")
    probabilities = np.array([[0.6, 0.3, 0.1, 0.0], [0.1, 0.1, 0.8, 0.0], [0.26, 0.25, 0.25, 0.24]],
                             dtype=np.float32).T.reshape(4, 3, 1, 1)  # (C, X, Y, Z): 3 voxels
    margin = fast_vs_exact.top2_margin(probabilities)
    np.testing.assert_allclose(margin.ravel(), [0.3, 0.7, 0.01], atol=1e-6)

    sample = np.ones((3, 1, 1), dtype=bool)
    truth = np.array([2, 2, 2]).reshape(3, 1, 1)
    labels = {"fast": np.array([0, 2, 0]).reshape(3, 1, 1), "exact": np.array([2, 0, 2]).reshape(3, 1, 1)}
    rows = {row["margin"]: row for row in fast_vs_exact.refined(labels, margin, truth, sample, "brats2017")}
    # below 0.05 only the near-tie voxel 2 takes exact's (right) label; below 0.5 voxel 0 as well
    assert rows[0.05]["refined_pct"] == pytest.approx(100 / 3)
    assert rows[0.05]["dice_on_sample"]["complete"] == pytest.approx(2 * 2 / (3 + 2))
    assert rows[0.5]["refined_pct"] == pytest.approx(200 / 3)
    assert rows[0.5]["dice_on_sample"]["complete"] == pytest.approx(1.0)


@pytest.mark.parametrize("script", sorted(str(p.relative_to(REPO)) for folder in ("benchmarks", "pipelines")
                                          for p in (REPO / folder).glob("*.py")))
def test_every_benchmark_and_pipeline_script_imports_and_answers_help(script):
    # a module moved or renamed in the package must not leave a script behind (issue 36)
    result = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-800:]
    assert "usage:" in result.stdout.lower()


def test_edema_contrast_probe_prints_each_sequences_brain_and_edema_medians(tmp_path, capsys):
    import json

    probe = _script("pipelines/edema_contrast_probe.py")
    case = tmp_path / "Brats18_X_1"
    case.mkdir()
    label = np.zeros((2, 4, 4), np.uint8)
    label[0, :2] = 2  # 8 edema voxels
    mask = np.ones_like(label, bool)
    mask[1, 3] = False  # outside the brain: never counted as brain
    image = np.zeros((2, 2, 4, 4), np.float16)  # ZCXY
    image[:, 0] = 1.0
    image[0, 0, :2] = 3.0
    image[:, 1] = -0.5
    image[0, 1, :2] = 0.25
    image[1, :, 3] = 99.0  # outside the brain
    np.save(case / "image.npy", image)
    np.save(case / "label.npy", label)
    np.save(case / "mask.npy", mask)
    (case / "meta.json").write_text(json.dumps({"case_id": "Brats18_X_1", "array_layout": "ZCXY",
                                                "channel_order": ["t2", "flair"]}))
    (tmp_path / "config.yaml").write_text("data: {label_convention: brats2017}\n")  # edema is class 2
    assert probe.main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("case  edema_voxels  t2:brain/edema  flair:brain/edema")
    assert lines[1].split() == ["Brats18_X_1", "8", "1.00/", "3.00", "-0.50/", "0.25"]
    (tmp_path / "config.yaml").write_text("data: {label_convention: msd}\n")  # edema is class 1: none here
    assert probe.edema_class(tmp_path) == 1
    with pytest.raises(SystemExit, match="no cached cases"):
        probe.main([str(tmp_path / "Brats18_X_1")])


def test_edema_contrast_probe_separability_auc_and_the_left_right_mirror():
    probe = _script("pipelines/edema_contrast_probe.py")
    assert probe.auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert probe.auc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert probe.auc(np.array([1.0]), np.array([1.0])) == 0.5  # a tie counts half
    mask = np.zeros((2, 10, 3), bool)
    mask[:, 2:7] = True  # brain at X 2..6: its centre is 4
    np.testing.assert_array_equal(probe.mirror_index(mask), [8, 7, 6, 5, 4, 3, 2, 1, 0, 0])


def test_views_probe_compare_puts_the_probes_column_beside_the_axial_models_and_checks_it_is_the_same_model(capsys):
    probe = _script("pipelines/views_probe_compare.py")
    tables = REPO / "benchmarks" / "results"
    # the axial tables against themselves: the probe's row is the 4-rotation row
    assert probe.main(["--fold", "3", "--alphas", "0.6", "--axial", str(tables / "cv4_intensity_strong" / "tables"),
                       "--probe", str(tables / "cv4_intensity_strong" / "tables")]) == 0
    rows = {line.split("  ")[1].strip(): line.split("  ")[-2:] for line in capsys.readouterr().out.splitlines()
            if line.startswith("  ")}
    assert rows["axial 4 rotations (4 passes)"] == rows["probe (its tta column)"]
    assert rows["axial (1 pass)"] != rows["probe (its tta column)"]
    # another cross-validation's tables hold another fold model's plain prediction: refused
    with pytest.raises(SystemExit, match="not the same fold model's prediction"):
        probe.main(["--fold", "3", "--alphas", "0.6", "--axial", str(tables / "cv4_intensity_strong" / "tables"),
                    "--probe", str(tables / "cv4_intensity" / "tables")])
