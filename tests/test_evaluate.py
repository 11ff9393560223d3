"""run_evaluate on tiny NIfTIs: matching, missing/extra predictions, bad inputs, outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_cnn.evaluation import evaluate
from brats_cnn.evaluation import pairing
from brats_cnn.errors import BratsCnnError, InputError
from brats_cnn.evaluation.metrics import HD95_ONE_EMPTY

SHAPE = (12, 10, 8)
SPACING = (1.0, 2.0, 2.5)  # voxel volume 5 mm^3


def _affine(spacing=SPACING, origin=(0.0, 0.0, 0.0)):
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def _labels() -> np.ndarray:
    """brats2017 map: 48 edema voxels, 8 core voxels, 2 of them enhancing."""
    lab = np.zeros(SHAPE, dtype=np.uint8)
    lab[2:6, 2:5, 2:6] = 2   # 4*3*4 = 48
    lab[3:5, 3:5, 3:5] = 1   # 8 (inside the edema block)
    lab[3, 3, 3:5] = 4       # 2
    return lab


def _save(array, path: Path, affine=None, dtype=np.uint8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=dtype), _affine() if affine is None else affine), path)
    return path


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture()
def label_folders(tmp_path):
    """gt/ with three label files (mixed names), pred/ with two matching predictions and one extra."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    lab = _labels()
    _save(lab, gt / "A_seg.nii.gz")
    _save(lab, gt / "B.nii.gz")
    _save(lab, gt / "C-seg.nii.gz")
    _save(lab, pred / "A.nii.gz")                    # perfect
    shifted = np.roll(lab, 1, axis=0)                # shifted by 1 voxel (1 mm) along x
    _save(shifted, pred / "B" / "B_seg.nii.gz")      # a case folder
    _save(lab, pred / "Z-seg.nii.gz")                # no ground truth
    (gt / "manifest.csv").write_text("case_id,grade\nA,HGG\nB,HGG\nC,LGG\n")
    return gt, pred


def test_matching_missing_and_extra(label_folders, tmp_path):
    gt, pred = label_folders
    out = tmp_path / "out"
    summary = evaluate.run_evaluate(pred=pred, gt=gt, out=out, label_convention="brats2017",
                                    pred_convention=None, manifest=None, images=None)
    rows = _read_csv(out / "metrics.csv")
    assert list(rows[0]) == ["case_id", "region", "dsc", "ppv", "sensitivity", "specificity", "hd95",
                             "vol_pred_ml", "vol_gt_ml", "missing_prediction", "lesion_dsc", "lesion_hd95",
                             "gt_lesions", "detected_lesions", "missed_lesions", "fp_lesions"]
    assert [(r["case_id"], r["region"]) for r in rows] == [
        (c, r) for c in "ABC" for r in ("complete", "core", "enhancing")]
    by = {(r["case_id"], r["region"]): r for r in rows}
    assert float(by["A", "complete"]["dsc"]) == 1.0 and float(by["A", "complete"]["hd95"]) == 0.0
    assert float(by["A", "complete"]["vol_gt_ml"]) == pytest.approx(48 * 5 / 1000)
    assert float(by["A", "enhancing"]["vol_gt_ml"]) == pytest.approx(2 * 5 / 1000)
    # B: a 4x3x4 block shifted by one voxel along x: TP = 3*3*4 = 36, FP = FN = 12
    assert float(by["B", "complete"]["dsc"]) == pytest.approx(72 / 96)
    assert float(by["B", "complete"]["ppv"]) == pytest.approx(36 / 48)
    assert float(by["B", "complete"]["specificity"]) == pytest.approx((960 - 60) / (960 - 48))
    assert float(by["B", "complete"]["hd95"]) == pytest.approx(1.0)
    # C: missing prediction -> scored as empty, flagged
    assert by["C", "complete"]["missing_prediction"] == "1" and by["A", "complete"]["missing_prediction"] == "0"
    assert float(by["C", "core"]["dsc"]) == 0.0 and float(by["C", "core"]["hd95"]) == HD95_ONE_EMPTY

    saved = json.loads((out / "summary.json").read_text())
    assert saved["missing_predictions"] == ["C"] and saved["extra_predictions"] == ["Z"]
    assert saved["failures"] == [] and saved["n_cases_scored"] == 3
    assert saved["hd95_definition"] == "brats"
    stats = saved["statistics"]
    assert list(stats) == ["all", "HGG", "LGG"]
    dsc_all = stats["all"]["complete"]["dsc"]
    assert dsc_all["mean"] == pytest.approx((1 + 0.75 + 0) / 3)
    assert dsc_all["median"] == pytest.approx(0.75)
    assert dsc_all["q25"] == pytest.approx(0.375) and dsc_all["q75"] == pytest.approx(0.875)
    assert stats["HGG"]["complete"]["dsc"]["n"] == 2 and stats["LGG"]["complete"]["dsc"]["mean"] == 0.0
    assert saved["reference_pereira2016"]["challenge"]["dsc"]["complete"] == 0.88
    assert summary["statistics"] == stats

    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "Missing predictions" in page and "brats" in page
    assert "http://" not in page and "https://" not in page  # self-contained


def test_single_files_and_pred_convention(tmp_path):
    lab = _labels()
    msd = np.select([lab == 2, lab == 1, lab == 4], [1, 2, 3], 0)  # the same tumour in msd labels
    gt = _save(lab, tmp_path / "case7_seg.nii.gz")
    pred = _save(msd, tmp_path / "p" / "case7.nii.gz")
    summary = evaluate.run_evaluate(pred=pred, gt=gt, out=tmp_path / "out", label_convention="brats2017",
                                    pred_convention="msd", manifest=None, images=None)
    stats = summary["statistics"]["all"]
    assert [stats[r]["dsc"]["mean"] for r in ("complete", "core", "enhancing")] == [1.0, 1.0, 1.0]


def test_monai_definition_is_named(label_folders, tmp_path):
    gt, pred = label_folders
    summary = evaluate.run_evaluate(pred=pred, gt=gt, out=tmp_path / "out", hd95_definition="monai")
    assert summary["hd95_definition"] == "monai"
    assert "MONAI" in (tmp_path / "out" / "report.html").read_text()


def _bad_cases(gt: Path, pred: Path) -> None:
    lab = _labels()
    _save(lab, gt / "good.nii.gz")
    _save(lab, pred / "good.nii.gz")
    for name in ("badvalue", "float", "shape", "affine", "corrupt", "gtbad"):
        _save(lab, gt / f"{name}.nii.gz")
    bad = lab.copy()
    bad[0, 0, 0] = 3                                                # 3 is not a brats2017 label
    _save(bad, pred / "badvalue.nii.gz")
    _save(lab.astype(np.float32) + 0.5, pred / "float.nii.gz", dtype=np.float32)
    _save(lab[:, :, :7], pred / "shape.nii.gz")
    _save(lab, pred / "affine.nii.gz", affine=_affine(origin=(0.0, 0.5, 0.0)))
    (pred / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    _save(lab, pred / "gtbad.nii.gz")
    _save(np.full(SHAPE, 7, np.uint8), gt / "gtbad.nii.gz")        # ground truth outside the convention


def test_bad_inputs_are_listed_and_the_rest_scored(tmp_path):
    gt, pred, out = tmp_path / "gt", tmp_path / "pred", tmp_path / "out"
    _bad_cases(gt, pred)
    with pytest.raises(InputError) as info:
        evaluate.run_evaluate(pred=pred, gt=gt, out=out)
    message = str(info.value)
    assert "\n" not in message and "6 case(s) could not be scored" in message
    rows = _read_csv(out / "metrics.csv")
    assert {r["case_id"] for r in rows} == {"good"}
    failures = {f["case_id"]: f["error"] for f in json.loads((out / "summary.json").read_text())["failures"]}
    assert set(failures) == {"badvalue", "float", "shape", "affine", "corrupt", "gtbad"}
    for case_id, error in failures.items():
        assert case_id in error and "\n" not in error
    assert "[3]" in failures["badvalue"] and "brats2017" in failures["badvalue"]
    assert "non-integer" in failures["float"]
    assert "shape (12, 10, 7) differs" in failures["shape"]
    assert "affine differs" in failures["affine"] and "0.5 mm" in failures["affine"]
    assert "corrupt.nii.gz" in failures["corrupt"]
    assert "[7]" in failures["gtbad"] and "gt" in failures["gtbad"]
    page = (out / "report.html").read_text()
    assert "Cases that could not be scored (6)" in page


def test_ambiguous_prediction_names_fail_that_case(tmp_path):
    lab = _labels()
    _save(lab, tmp_path / "gt" / "A.nii.gz")
    _save(lab, tmp_path / "gt" / "B.nii.gz")
    _save(lab, tmp_path / "pred" / "A.nii.gz")
    _save(lab, tmp_path / "pred" / "A_seg.nii.gz")
    _save(lab, tmp_path / "pred" / "B.nii.gz")
    with pytest.raises(InputError, match="1 case"):
        evaluate.run_evaluate(pred=tmp_path / "pred", gt=tmp_path / "gt", out=tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["failures"][0]["case_id"] == "A" and "several prediction files" in summary["failures"][0]["error"]
    assert summary["n_cases_scored"] == 1 and summary["missing_predictions"] == []


def test_nothing_to_evaluate_raises_before_writing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BratsCnnError, match="no prediction files"):
        evaluate.run_evaluate(pred=tmp_path / "empty", gt=tmp_path / "empty", out=tmp_path / "out")
    with pytest.raises(BratsCnnError, match="no such prediction"):
        evaluate.run_evaluate(pred=tmp_path / "nope", gt=tmp_path, out=tmp_path / "out")
    with pytest.raises(BratsCnnError, match="unknown label convention"):
        evaluate.run_evaluate(pred=tmp_path, gt=tmp_path, out=tmp_path / "out", label_convention="brats2099")
    assert not (tmp_path / "out").exists()


def test_label_file_case_id():
    assert pairing.label_file_case_id("Brats18_X_1_seg.nii.gz") == "Brats18_X_1"
    assert pairing.label_file_case_id("BraTS-GLI-00001-000-seg.nii.gz") == "BraTS-GLI-00001-000"
    assert pairing.label_file_case_id("BRATS_001.nii") == "BRATS_001"
    assert pairing.label_file_case_id("notes.txt") is None


def test_dataset_folder_with_images_gives_overlays(tmp_path):
    """Ground truth in the BraTS 2017-21 layout: overlays from its FLAIR, grades from its manifest."""
    lab = _labels()
    gt, pred = tmp_path / "data", tmp_path / "pred"
    rng = np.random.default_rng(0)
    for case_id in ("P1", "P2"):
        for seq in ("t1", "t1ce", "t2", "flair"):
            _save(rng.uniform(1, 100, SHAPE), gt / case_id / f"{case_id}_{seq}.nii.gz", dtype=np.float32)
        _save(lab, gt / case_id / f"{case_id}_seg.nii.gz")
        _save(lab, pred / f"{case_id}.nii.gz")
    (gt / "manifest.csv").write_text("case_id,grade\nP1,HGG\nP2,LGG\n")
    summary = evaluate.run_evaluate(pred=pred, gt=gt, out=tmp_path / "out")
    assert summary["grades"] == {"P1": "HGG", "P2": "LGG"}
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("<figure>") == 2 and "P2" in page


@pytest.mark.slow
def test_real_sample_perfect_prediction(sample_dir, tmp_path):
    """The real ground truth scored against itself: DSC 1 and HD95 0 everywhere."""
    case = sample_dir / "Brats18_CBICA_ABM_1"
    summary = evaluate.run_evaluate(pred=case / "Brats18_CBICA_ABM_1_seg.nii.gz", gt=case, out=tmp_path / "out")
    for region in ("complete", "core", "enhancing"):
        assert summary["statistics"]["all"][region]["dsc"]["mean"] == 1.0
        assert summary["statistics"]["all"][region]["hd95"]["mean"] == 0.0


def test_case_ids_ending_in_four_digits_are_predictions_not_channel_files(tmp_path):
    # "Phantom_1000.nii.gz" is a prediction; only _0000.._0003 are nnU-Net image channels.
    _save(_labels(), tmp_path / "pred" / "Phantom_1000.nii.gz")
    _save(_labels(), tmp_path / "pred" / "Case_0002.nii.gz")
    found, failures = pairing.find_predictions(tmp_path / "pred")
    assert sorted(found) == ["Phantom_1000"]
    assert failures == []


# ---------------------------------------------------------------- lesion-wise, comparison, missing cases, grades

def test_lesion_counts_in_every_output(label_folders, tmp_path):
    gt, pred = label_folders
    out = tmp_path / "out"
    summary = evaluate.run_evaluate(pred=pred, gt=gt, out=out)
    by = {(r["case_id"], r["region"]): r for r in _read_csv(out / "metrics.csv")}
    # complete: 48 voxels x 5 mm^3 = 240 mm^3 > 50, one lesion; core (40 mm^3) and enhancing (10 mm^3) are ignored
    assert [by["A", "complete"][k] for k in ("lesion_dsc", "lesion_hd95", "gt_lesions", "detected_lesions")] == \
        ["1", "0", "1", "1"]
    assert by["A", "enhancing"]["gt_lesions"] == "0" and by["A", "enhancing"]["lesion_dsc"] == "1"
    assert float(by["B", "complete"]["lesion_dsc"]) == pytest.approx(0.75)  # the shifted block, one lesion
    assert (by["C", "complete"]["missed_lesions"], by["C", "complete"]["lesion_hd95"]) == ("1", "374")
    assert summary["lesion_counts"]["complete"] == {"gt_lesions": 3, "detected_lesions": 2, "missed_lesions": 1,
                                                    "fp_lesions": 0}
    assert summary["lesion_wise"]["preset"] == "gli" and summary["lesion_wise"]["dilation"] == 3
    assert summary["statistics"]["all"]["complete"]["lesion_dsc"]["mean"] == pytest.approx((1 + 0.75 + 0) / 3)
    page = (out / "report.html").read_text()
    assert "Lesion-wise DSC" in page and "lesions GT/det/miss/FP" in page
    off = evaluate.run_evaluate(pred=pred, gt=gt, out=tmp_path / "off", lesion_wise="none")
    assert off["lesion_wise"] is None and "lesion_dsc" not in off["statistics"]["all"]["complete"]
    assert _read_csv(tmp_path / "off" / "metrics.csv")[0]["lesion_dsc"] == ""


def test_lesion_settings_are_checked(label_folders, tmp_path):
    gt, pred = label_folders
    with pytest.raises(InputError, match="unknown lesion-wise preset 'gbm'"):
        evaluate.run_evaluate(pred=pred, gt=gt, out=tmp_path / "out", lesion_wise="gbm")
    settings = evaluate.evaluate_settings(lesion_wise="met", lesion_min_volume=0)
    assert settings.lesion_params.dilation == 1 and settings.lesion_params.min_volume_mm3 == 0.0


def test_lesion_wise_values_from_the_config_change_the_result(label_folders, tmp_path):
    gt, pred = label_folders
    # core 40 mm^3, enhancing 10 mm^3: no lesion for gli (<= 50 mm^3 ignored), lesions for met (<= 2 mm^3)
    config = tmp_path / "met.yaml"
    config.write_text("evaluate:\n  lesion_wise:\n    preset: met\n")
    met = evaluate.run_evaluate(pred=pred, gt=gt, out=tmp_path / "met", config=config)
    assert (met["lesion_wise"]["preset"], met["lesion_wise"]["dilation"], met["lesion_wise"]["min_volume_mm3"]) == \
        ("met", 1, 2.0)
    assert met["lesion_counts"]["core"]["gt_lesions"] == 3 and met["lesion_counts"]["enhancing"]["gt_lesions"] == 3
    # --set over the file: a threshold of 39 mm^3 keeps the 40 mm^3 cores, 40 mm^3 leaves them out
    kept = evaluate.run_evaluate(pred=pred, gt=gt, out=tmp_path / "39", config=config,
                                 overrides=["evaluate.lesion_wise.min_volume_mm3=39"])
    left_out = evaluate.run_evaluate(pred=pred, gt=gt, out=tmp_path / "40", config=config,
                                     overrides=["evaluate.lesion_wise.min_volume_mm3=40"])
    assert kept["lesion_wise"]["preset"] == "met (changed)" and kept["lesion_counts"]["core"]["gt_lesions"] == 3
    assert left_out["lesion_counts"]["core"]["gt_lesions"] == 0
    assert left_out["statistics"]["all"]["core"]["lesion_dsc"]["mean"] == 1.0
    assert kept["statistics"]["all"]["core"]["lesion_dsc"]["mean"] < 1.0       # C's core lesion is missed
    # the arguments (the CLI's --lesion-* flags) win over the config; "none" switches lesion-wise off
    flag = evaluate.evaluate_settings(lesion_wise="gli", lesion_min_volume=5, config=config,
                                      overrides=["evaluate.lesion_wise.dilation=0"])
    assert (flag.lesion_preset, flag.lesion_params.dilation, flag.lesion_params.min_volume_mm3) == \
        ("gli (changed)", 0, 5.0)
    assert evaluate.evaluate_settings(overrides=["evaluate.lesion_wise.preset=none"]).lesion_params is None


def test_bad_lesion_wise_config_values_stop_the_command_with_one_line(label_folders, tmp_path, capsys):
    from brats_cnn.cli import main

    gt, pred = label_folders
    config = tmp_path / "bad.yaml"
    config.write_text("evaluate:\n  lesion_wise:\n    dilation: -3\n")
    for extra, message in [
        (["--config", str(config)], f"{config}: key 'evaluate.lesion_wise.dilation' must be >= 0, got -3"),
        (["--set", "evaluate.lesion_wise.preset=gbm"],
         "--set: key 'evaluate.lesion_wise.preset' must be one of ['gli', 'ssa', 'ped', 'men', 'met', 'none'], "
         "got 'gbm'"),
        (["--set", "evaluate.lesion_wise.min_volume_mm3=big"],
         "--set: key 'evaluate.lesion_wise.min_volume_mm3' must be float, got str 'big'")]:
        code = main(["-q", "evaluate", "--pred", str(pred), "--gt", str(gt), "--out", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and err == f"brats-cnn: error: {message}\n", err
    assert not (tmp_path / "out").exists()                                   # refused before anything is written
    assert main(["-q", "evaluate", "--pred", str(pred), "--gt", str(gt), "--out", str(tmp_path / "ok"),
                 "--set", "evaluate.lesion_wise.preset=men", "--lesion-dilation", "2"]) == 0
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert (summary["lesion_wise"]["preset"], summary["lesion_wise"]["dilation"]) == ("men (changed)", 2)

def test_missing_predictions_warn_once_and_only_predicted_leaves_them_out(label_folders, tmp_path, caplog):
    gt, pred = label_folders
    with caplog.at_level("INFO", logger="brats_cnn.evaluation.evaluate"):
        evaluate.run_evaluate(pred=pred, gt=gt, out=tmp_path / "all")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    # one line for the unmatched prediction Z (issue 14), one for the missing case C
    assert len(warnings) == 2 and "1 prediction file(s)" in warnings[0] and "(unmatched): Z-seg.nii.gz" in warnings[0]
    assert "1 of 3 ground-truth cases have no prediction" in warnings[1]
    assert "--only-predicted scores only the 2 predicted case(s)" in warnings[1]
    infos = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert any(m.startswith("C: no prediction, scored as an empty one") for m in infos)
    assert not any(m.startswith("C scored") for m in infos)
    summary = evaluate.run_evaluate(pred=pred, gt=gt, out=tmp_path / "only", only_predicted=True)
    assert summary["n_cases_scored"] == 2 and summary["missing_predictions"] == []
    assert summary["not_scored_without_prediction"] == ["C"]
    assert summary["statistics"]["all"]["complete"]["dsc"]["mean"] == pytest.approx((1 + 0.75) / 2)


def test_terminal_table_and_cli(label_folders, tmp_path):
    from typer.testing import CliRunner

    from brats_cnn.cli import app

    gt, pred = label_folders
    result = CliRunner().invoke(app, ["evaluate", "--pred", str(pred), "--gt", str(gt), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["mean", "over", "cases", "complete", "core", "enhancing"]
    assert lines[1].split()[:2] == ["DSC", "0.583"]                   # (1 + 0.75 + 0) / 3
    assert any(line.startswith("lesions GT/det/miss/FP") and "3/2/1/0" in line for line in lines)
    assert "3 case(s) scored (1 without prediction, scored as empty)" in result.stdout


def _perfect_folder(folder: Path) -> Path:
    for case_id in ("A", "B", "C"):
        _save(_labels(), folder / f"{case_id}.nii.gz")
    return folder


def test_compare_two_prediction_folders(label_folders, tmp_path):
    gt, pred = label_folders
    perfect = _perfect_folder(tmp_path / "perfect")
    out = tmp_path / "cmp"
    comparison = evaluate.run_compare([pred, perfect], gt, out)
    assert comparison["predictions"] == ["pred", "perfect"] and comparison["cases"] == ["A", "B", "C"]
    assert [(r["prediction"], r["rank"]) for r in comparison["ranking"]] == [("perfect", 1), ("pred", 2)]
    test = next(t for t in comparison["tests"] if (t["region"], t["metric"]) == ("complete", "dsc"))
    # differences pred - perfect: A 0, B -0.25, C -1 -> two non-zero, both negative: exact p = 0.5
    assert test["p_value"] == pytest.approx(0.5) and test["mean_difference"] == pytest.approx(-1.25 / 3)
    assert comparison["missing_predictions"] == {"pred": ["C"], "perfect": []}
    for name in ("comparison.json", "comparison.csv", "intervals.csv", "ranking.csv", "differences.csv",
                 "report.html", "pred/metrics.csv", "perfect/report.html"):
        assert (out / name).is_file(), name
    ranking = _read_csv(out / "ranking.csv")
    assert ranking[0]["prediction"] == "perfect" and ranking[0]["rank"] == "1"
    differences = _read_csv(out / "differences.csv")
    row = next(d for d in differences if (d["case_id"], d["region"], d["metric"]) == ("B", "complete", "dsc"))
    assert float(row["difference"]) == pytest.approx(-0.25)
    page = (out / "report.html").read_text()
    assert "Ranking" in page and "Paired plots" in page and page.count("data:image/png;base64,") == 4
    assert "perfect/report.html" in page
    from brats_cnn.evaluation import report

    assert report.terminal_comparison(comparison).splitlines()[1].split()[:2] == ["1", "perfect"]
    with pytest.raises(InputError, match="at least two"):
        evaluate.run_compare([pred], gt, out)


def test_prediction_names_are_unique(tmp_path):
    assert evaluate.prediction_names([tmp_path / "a" / "seg", tmp_path / "b" / "seg", tmp_path / "x y"]) == \
        ["seg", "seg-2", "x_y"]


def test_unknown_grades_in_the_manifest(label_folders, tmp_path):
    gt, pred = label_folders
    (gt / "manifest.csv").write_text("case_id,grade\nA,unknown\nB,\nC,HGG\n")
    summary = evaluate.run_evaluate(pred=pred, gt=gt, out=tmp_path / "out")
    assert summary["grades"] == {"A": None, "B": None, "C": "HGG"}
    assert list(summary["statistics"]) == ["all", "HGG", "unknown grade"]
    assert summary["statistics"]["unknown grade"]["complete"]["dsc"]["mean"] == pytest.approx((1 + 0.75) / 2)
    (gt / "manifest.csv").write_text("case_id,grade\nA,UNKNOWN\nB,unknown\nC,\n")  # BraTS 2021+: no grades
    assert list(evaluate.run_evaluate(pred=pred, gt=gt, out=tmp_path / "o2")["statistics"]) == ["all"]


def test_ground_truth_with_incomplete_images_needs_only_label_maps(tmp_path):
    lab = _labels()
    gt, pred = tmp_path / "data", tmp_path / "pred"
    rng = np.random.default_rng(0)
    for case_id in ("P1", "P2"):
        sequences = ("t1", "t1ce", "t2", "flair") if case_id == "P1" else ("t1", "t2")  # P2 lacks two images
        for seq in sequences:
            _save(rng.uniform(1, 100, SHAPE), gt / case_id / f"{case_id}_{seq}.nii.gz", dtype=np.float32)
        _save(lab, gt / case_id / f"{case_id}_seg.nii.gz")
        _save(lab, pred / f"{case_id}.nii.gz")
    (gt / "manifest.csv").write_text("case_id,grade\nP1,unknown\nP2,LGG\n")
    with pytest.raises(BratsCnnError):
        from brats_cnn.data import layouts

        layouts.list_cases(gt)
    summary = evaluate.run_evaluate(pred=pred, gt=gt, out=tmp_path / "out")
    assert summary["n_cases_scored"] == 2 and summary["failures"] == []
    assert summary["grades"] == {"P1": None, "P2": "LGG"}
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("<figure>") == 1                                     # the complete case only


def test_label_maps_only_in_grade_folders_and_labels_tr(tmp_path):
    lab = _labels()
    gt = tmp_path / "gt"
    _save(lab, gt / "HGG" / "P1" / "P1_seg.nii.gz")                     # no images at all
    _save(lab, gt / "LGG" / "P2" / "P2_seg.nii.gz")
    _save(lab, gt / "labelsTr" / "P3.nii.gz")
    found = pairing.find_ground_truth(gt)
    assert [(t.case_id, t.grade, t.case_ref) for t in found] == [("P1", "HGG", None), ("P2", "LGG", None),
                                                                 ("P3", None, None)]
    assert found[2].label_path == gt / "labelsTr" / "P3.nii.gz"


def test_cases_scored_in_parallel_give_the_same_report_in_the_same_order(label_folders, tmp_path, caplog):
    gt, pred = label_folders
    with caplog.at_level("INFO", logger="brats_cnn.evaluation.evaluate"):
        one = evaluate.run_evaluate(pred=pred, gt=gt, out=tmp_path / "one", workers=1)
        serial = [r.getMessage() for r in caplog.records if r.getMessage()[:2] in ("A ", "B ", "C:")]
        caplog.clear()
        two = evaluate.run_evaluate(pred=pred, gt=gt, out=tmp_path / "two", workers=2)
        parallel = [r.getMessage() for r in caplog.records if r.getMessage()[:2] in ("A ", "B ", "C:")]
    assert (tmp_path / "one" / "metrics.csv").read_text() == (tmp_path / "two" / "metrics.csv").read_text()
    assert one["statistics"] == two["statistics"] and one["n_cases_scored"] == two["n_cases_scored"] == 3
    # the workers' log lines reach this process once each, in case order
    assert [m.split(" ")[0] for m in serial] == [m.split(" ")[0] for m in parallel] == ["A", "B", "C:"]


def test_compare_outputs_stay_inside_out_even_for_a_path_ending_in_dot_dot(label_folders, tmp_path):
    gt, pred = label_folders
    (pred / "sub").mkdir()
    out = tmp_path / "work" / "cmp"
    (tmp_path / "work").mkdir()
    evaluate.run_compare([pred, pred / "sub" / ".."], gt, out)
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["cmp"]  # nothing beside --out
    assert (out / "pred" / "metrics.csv").is_file() and (out / "pred-2" / "metrics.csv").is_file()
    assert evaluate.prediction_names([tmp_path / ".hidden", pred / "..", Path("/")]) == [
        "hidden", tmp_path.name, "pred"]


def test_a_failed_evaluate_leaves_the_previous_report_whole(label_folders, tmp_path, monkeypatch):
    from brats_cnn.evaluation import report

    gt, pred = label_folders
    out = tmp_path / "out"
    evaluate.run_evaluate(pred=pred, gt=gt, out=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"metrics.csv", "summary.json", "report.html"}
    (pred / "A.nii.gz").unlink()  # the rerun would give other numbers

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_report_html", disk_full)
    with pytest.raises(OSError):
        evaluate.run_evaluate(pred=pred, gt=gt, out=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old set, whole
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no stage left
