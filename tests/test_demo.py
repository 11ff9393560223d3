"""The demo (brats_cnn.demo): every stage of the pipeline on phantoms, in its --quick setting."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np

from brats_cnn.cli import main
from brats_cnn.demo import DEMO_TRAIN_CASES, QUICK_SHAPE
from brats_cnn.network.checkpoint import load_checkpoint


def test_quick_demo_runs_every_stage_through_the_cli(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "[4/4] scoring against the ground truth" in printed and str(out / "report" / "report.html") in printed
    assert len(list((out / "data" / "train").glob("Phantom_*"))) == DEMO_TRAIN_CASES
    ckpt = load_checkpoint(out / "run" / "best.pt")
    assert ckpt.grade == "hgg" and ckpt.network.architecture == "lgg" and ckpt.epoch == 1
    assert ckpt.normaliser.n4_sequences == ()  # --quick leaves N4 out
    (segmentation,) = (out / "segmentations").glob("*.nii.gz")
    labels = np.asarray(nib.load(segmentation).dataobj)
    assert labels.shape == QUICK_SHAPE and set(np.unique(labels)) <= {0, 1, 2, 4}
    rows = list(csv.DictReader((out / "report" / "metrics.csv").open()))
    assert [r["region"] for r in rows] == ["complete", "core", "enhancing"]
    assert all(0.0 <= float(r["dsc"]) <= 1.0 for r in rows)
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["statistics"]["all"]["complete"]["dsc"]["n"] == 1
    assert (out / "report" / "report.html").read_text().count("data:image/png;base64,") >= 2
