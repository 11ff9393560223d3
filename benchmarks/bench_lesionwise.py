"""Time the whole ``brats-cnn evaluate`` command (lesion-wise metrics on) against MONAI's Dice + HD95.

The cases and predictions are those of ``crosscheck_lesionwise.py`` (the first ``--cases`` real
sample cases, four perturbations each, brats2023 labels), so the organisers' reference timing
recorded there (``reference_get_LesionWiseResults``, same pairs) can be set beside these numbers.

* brats-cnn: the installed command in a fresh process (start-up, matching, every metric of three
  regions, lesion-wise DSC/HD95 with the GLI preset, metrics.csv, summary.json, report.html with
  box plots; no overlays: the ground-truth folder holds label maps only), divided by the number of
  cases; also with ``--lesion-wise none``.
* MONAI: per case, read both label maps (nibabel), one-hot the three regions and call
  ``compute_dice`` and ``compute_hausdorff_distance(percentile=95, spacing=...)``; nothing written.

Every timing is stored with the 1-minute load average at that moment (this machine has 2 cores
and the benchmark was run beside a training run that uses both).

Usage: .venv/bin/python benchmarks/bench_lesionwise.py --data ../shared/data/brats_sample --cases 4
Writes benchmarks/results/bench_lesionwise.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _crosscheck_module():
    spec = importlib.util.spec_from_file_location("crosscheck_lesionwise", REPO / "benchmarks" / "crosscheck_lesionwise.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_pairs(data: Path, n_cases: int, work: Path) -> list[tuple[Path, Path]]:
    """Ground truth and predictions as in the cross-check (same seeds): ``[(gt, pred), ...]``."""
    crosscheck = _crosscheck_module()
    pairs = []
    for index, case_dir in enumerate(sorted(p for p in data.iterdir() if p.is_dir())[:n_cases]):
        seg = nib.load(case_dir / f"{case_dir.name}_seg.nii.gz")
        labels = np.asarray(seg.dataobj).astype(np.int16)
        labels[labels == 4] = 3
        for k, kind in enumerate(crosscheck.PERTURBATIONS):
            case_id = f"{case_dir.name}_{kind}"  # one ground-truth copy per pair: one "case" each
            gt_path, pred_path = work / "gt" / f"{case_id}.nii.gz", work / "pred" / f"{case_id}.nii.gz"
            for path in (gt_path, pred_path):
                path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(labels, seg.affine, seg.header), gt_path)
            nib.save(nib.Nifti1Image(crosscheck.perturb(labels, kind, seed=100 * index + k), seg.affine, seg.header), pred_path)
            pairs.append((gt_path, pred_path))
    return pairs


def monai_case(gt_path: Path, pred_path: Path) -> float:
    """Seconds for MONAI Dice + HD95 of the three regions of one case, reading included."""
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance

    start = time.perf_counter()
    gt_img, pred_img = nib.load(gt_path), nib.load(pred_path)
    gt, pred = np.asarray(gt_img.dataobj), np.asarray(pred_img.dataobj)

    def regions(labels):
        return torch.from_numpy(np.stack([labels > 0, (labels == 1) | (labels == 3), labels == 3])[None])

    y, y_pred = regions(gt), regions(pred)
    compute_dice(y_pred, y, include_background=True)
    compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95,
                               spacing=[float(s) for s in gt_img.header.get_zooms()[:3]])
    return time.perf_counter() - start


def command_seconds(pred: Path, gt: Path, out: Path, *extra: str) -> float:
    start = time.perf_counter()
    subprocess.run([str(REPO / ".venv" / "bin" / "brats-cnn"), "-q", "evaluate", "--pred", str(pred), "--gt", str(gt),
                    "--out", str(out), "--label-convention", "brats2023", *extra], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "brats_sample")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_lesionwise.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_lesionwise_"))
    pairs = write_pairs(args.data, args.cases, work)
    n = len(pairs)
    monai_case(*pairs[0])  # warm-up: imports torch and MONAI once, as a long-lived process would have them
    monai = [(monai_case(gt, pred), os.getloadavg()[0]) for gt, pred in pairs]
    load_before = os.getloadavg()[0]
    with_lesion = command_seconds(work / "pred", work / "gt", work / "out_lesion")
    load_between = os.getloadavg()[0]
    without_lesion = command_seconds(work / "pred", work / "gt", work / "out_plain", "--lesion-wise", "none")
    load_after = os.getloadavg()[0]
    monai_mean = float(np.mean([s for s, _ in monai]))
    result = {
        "pairs": n, "cases": sorted(p.name for p in args.data.iterdir() if p.is_dir())[: args.cases],
        "brats_cnn_command_seconds_per_case": {"lesion_wise_gli": with_lesion / n, "no_lesion_wise": without_lesion / n},
        "brats_cnn_command_seconds_total": {"lesion_wise_gli": with_lesion, "no_lesion_wise": without_lesion},
        "monai_dice_hd95_seconds_per_case": {"mean": monai_mean, "per_case": [s for s, _ in monai]},
        "ratio_command_lesion_wise_to_monai": with_lesion / n / monai_mean,
        "loadavg_1min": {"during_monai": [round(l, 2) for _, l in monai], "before_command": load_before,
                         "between_commands": load_between, "after_commands": load_after},
        "note": "2 CPU cores shared with a CNN training run using both; MONAI timed after a warm-up call "
                "(its import is not counted), brats-cnn includes process start-up",
    }
    reference = REPO / "benchmarks" / "results" / "crosscheck_lesionwise_gli.json"
    if reference.is_file():
        recorded = json.loads(reference.read_text())["seconds_per_case"]
        result["reference_seconds_per_case_from_crosscheck"] = recorded["reference_get_LesionWiseResults"]
        result["ratio_command_lesion_wise_to_reference"] = with_lesion / n / recorded["reference_get_LesionWiseResults"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
