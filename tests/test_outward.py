"""What leaves the program: CSV cells, JSON files and terminal lines (issue 39 items 5-7)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_cnn.evaluation import evaluate
from brats_cnn.outward import csv_cell, printable, strict_json


def _strict_load(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_csv_cells_that_start_like_formulas_are_neutralised_and_numbers_are_not():
    for text in ("=1+2", "+SUM(A1)", "-cmd", "@x", "\tTAB", "\rCR"):
        assert csv_cell(text) == "'" + text
    for value in ("Brats18_X", "a=b", -0.5, 3, None):
        assert csv_cell(value) == value


def test_json_is_strict_non_finite_becomes_null():
    data = {"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": np.float32(2.5), "d": np.int64(3),
            "e": (np.nan, True), "f": np.array([1.0, np.nan])}
    loaded = _strict_load(strict_json(data))
    assert loaded == {"a": None, "b": [None, None, 1.5], "c": 2.5, "d": 3, "e": [None, True], "f": [1.0, None]}


def test_terminal_text_escapes_control_characters_and_keeps_unicode():
    assert printable("case\x1b]0;owned\x07\x1b[2J") == "case\\x1b]0;owned\\x07\\x1b[2J"
    assert printable("line\nforged") == "line\\nforged"
    assert printable("Müller_Ω_病例") == "Müller_Ω_病例"


def _save(labels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), np.eye(4)), path)


def test_evaluate_neutralises_formula_case_ids_in_csv_and_keeps_them_raw_in_json(tmp_path):
    labels = np.zeros((12, 12, 12), dtype=np.uint8)
    labels[3:8, 3:8, 3:8] = 2
    labels[4:6, 4:6, 4:6] = 4
    for name in ("=HYPERLINK(1)", "-2+3", "@cmd"):
        _save(labels, tmp_path / "gt" / f"{name}.nii.gz")
        _save(labels, tmp_path / "pred" / f"{name}.nii.gz")
    _save(labels, tmp_path / "pred2" / "=HYPERLINK(1).nii.gz")
    evaluate.run_evaluate(pred=tmp_path / "pred", gt=tmp_path / "gt", out=tmp_path / "out", workers=1)
    with open(tmp_path / "out" / "metrics.csv", newline="") as handle:
        ids = {row["case_id"] for row in csv.DictReader(handle)}
    assert ids == {"'=HYPERLINK(1)", "'-2+3", "'@cmd"}
    summary = _strict_load((tmp_path / "out" / "summary.json").read_text())
    assert "=HYPERLINK(1)" in json.dumps(summary)  # JSON keeps the raw id
    # a comparison over one case: its bootstrap intervals are undefined (NaN) -> null, standard JSON
    evaluate.run_compare([tmp_path / "pred", tmp_path / "pred2"], tmp_path / "gt", tmp_path / "cmp",
                         only_predicted=True, workers=1)
    comparison = _strict_load((tmp_path / "cmp" / "comparison.json").read_text())
    assert any(value is None for interval in comparison["intervals"] for value in interval.values())
    with open(tmp_path / "cmp" / "differences.csv", newline="") as handle:
        assert all(not row["case_id"].startswith("=") for row in csv.DictReader(handle))


def test_cli_numeric_options_share_the_set_validation(tmp_path):
    for value in ("nan", "inf", "1e309", "-1"):
        result = subprocess.run([sys.executable, "-m", "brats_cnn.cli", "evaluate", "--pred", str(tmp_path),
                                 "--gt", str(tmp_path), "--lesion-min-volume", value], capture_output=True, text=True)
        assert result.returncode == 2
        assert ("brats-cnn: error: --lesion-min-volume: key 'evaluate.lesion_wise.min_volume_mm3' must be >= 0, got "
                in result.stderr), result.stderr


def test_control_characters_in_a_path_reach_the_terminal_escaped(tmp_path):
    evil = tmp_path / "case\x1b[2Jx.nii.gz"
    result = subprocess.run([sys.executable, "-m", "brats_cnn.cli", "evaluate", "--pred", str(evil),
                             "--gt", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "\x1b" not in result.stderr and "case\\x1b[2Jx.nii.gz" in result.stderr
