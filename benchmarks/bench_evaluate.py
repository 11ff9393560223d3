"""Time `brats-cnn evaluate` scoring on the real BraTS sample (10 cases, 240x240x155).

Predictions are perturbed ground truths written to a temporary folder: by turns shifted by two
voxels, dilated by two voxels (the ring becomes edema) and eroded by two voxels. For each case the
script times ``evaluate.score_case`` (read both label maps, validate, region masks, DSC/PPV/
sensitivity/specificity, HD95, volumes) and reports both HD95 definitions side by side. Then it
times the whole command with and without overlay figures.

Usage: .venv/bin/python benchmarks/bench_evaluate.py [--data ../shared/data/brats_sample]
Writes benchmarks/results/bench_evaluate.json and bench_evaluate.png.

``--vs-monai`` instead times the whole ``brats-cnn evaluate`` command (lesion-wise metrics on, the
default gli preset; cases scored in parallel on every usable CPU, and with ``--workers 1``) against
MONAI's Dice + HD95 of the same cases (``benchmarks/bench_lesionwise.py``'s pairs: real label maps
with seeded perturbations), best of ``--repeats`` (2) for each, and writes
``benchmarks/results/bench_evaluate_vs_monai.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from brats_cnn.evaluation import evaluate
from brats_cnn.evaluation import pairing
from brats_cnn.data import io

REPO = Path(__file__).resolve().parents[1]


def perturbed(labels: np.ndarray, kind: str) -> np.ndarray:
    """A plausible wrong segmentation of a brats2017 label map (uint8)."""
    from scipy import ndimage

    if kind == "shift":
        return np.roll(labels, 2, axis=0).astype(np.uint8)
    tumour = labels > 0
    if kind == "dilate":
        out = labels.astype(np.uint8)
        out[ndimage.binary_dilation(tumour, iterations=2) & ~tumour] = 2
        return out
    return np.where(ndimage.binary_erosion(tumour, iterations=2), labels, 0).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "brats_sample")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per case (the minimum is reported)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    truths = pairing.find_ground_truth(args.data)
    kinds = ("shift", "dilate", "erode")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        pred_dir = Path(tmp) / "pred"
        for k, truth in enumerate(truths):
            gt = io.load_label_map(truth.label_path)
            io.save_label_map(perturbed(gt.labels, kinds[k % 3]), gt, pred_dir / f"{truth.case_id}.nii.gz")
        for k, truth in enumerate(truths):
            pred_path = pred_dir / f"{truth.case_id}.nii.gz"
            times, hd95 = {}, {}
            for definition in ("brats", "monai"):
                runs = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    rows, _, _ = evaluate.score_case(truth.case_id, truth.label_path, pred_path,
                                                     label_convention="brats2017", pred_convention="brats2017",
                                                     hd95_definition=definition)
                    runs.append(time.perf_counter() - start)
                times[definition] = min(runs)
                hd95[definition] = {r["region"]: r["hd95"] for r in rows}
            load = os.getloadavg()
            results.append({"case_id": truth.case_id, "perturbation": kinds[k % 3],
                            "seconds": times["brats"], "seconds_monai": times["monai"],
                            "hd95_brats": hd95["brats"], "hd95_monai": hd95["monai"],
                            "dsc": {r["region"]: r["dsc"] for r in rows}, "loadavg_1min": load[0]})
            diff = max(abs(hd95["monai"][r] - hd95["brats"][r]) for r in hd95["brats"])
            print(f"{truth.case_id:24s} {kinds[k % 3]:6s} {times['brats']:.3f} s  "
                  f"max |HD95 monai - brats| {diff:.2f} mm  (load {load[0]:.2f})")
        whole = {}
        for overlays in (False, True):
            start = time.perf_counter()
            evaluate.run_evaluate(pred=pred_dir, gt=args.data, out=Path(tmp) / f"report_{overlays}",
                                  overlays=overlays)
            whole["with_overlays" if overlays else "without_overlays"] = time.perf_counter() - start
    seconds = np.array([r["seconds"] for r in results])
    diffs = np.array([abs(r["hd95_monai"][g] - r["hd95_brats"][g]) for r in results for g in r["hd95_brats"]])
    summary = {
        "what": "evaluate.score_case per 240x240x155 case (read 2 label maps + all metrics, BraTS HD95); "
                "minimum of repeats",
        "cases": results,
        "seconds_per_case": {"mean": float(seconds.mean()), "max": float(seconds.max()),
                             "median": float(np.median(seconds))},
        "whole_command_seconds": whole,
        "hd95_definition_difference_mm": {"mean": float(diffs.mean()), "max": float(diffs.max())},
        "loadavg_at_end": os.getloadavg(), "cpu_count": os.cpu_count(), "machine": platform.platform(),
    }
    print(f"per case: mean {seconds.mean():.3f} s, max {seconds.max():.3f} s; whole command "
          f"{whole['without_overlays']:.1f} s without overlays, {whole['with_overlays']:.1f} s with; "
          f"HD95 definitions differ by up to {diffs.max():.2f} mm; load {os.getloadavg()}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    names = [r["case_id"].replace("Brats18_", "") for r in results]
    ax.bar(names, seconds, color="#4a7ab5", label="BraTS HD95")
    ax.plot(names, [r["seconds_monai"] for r in results], "o", color="black", label="MONAI HD95")
    ax.axhline(1.0, color="#c0392b", lw=1, ls="--", label="1 s target")
    ax.set_ylabel("seconds per case")
    ax.set_title(f"evaluate: read + score one 240x240x155 case (load avg {summary['loadavg_at_end'][0]:.1f}, "
                 f"{os.cpu_count()} cores)", fontsize=10)
    ax.tick_params(axis="x", rotation=45, labelsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "bench_evaluate.png", dpi=100)
    (args.out / "bench_evaluate.json").write_text(json.dumps(summary, indent=2) + "\n")


def versus_monai(data: Path, n_cases: int, repeats: int, out: Path) -> None:
    """The whole command (lesion-wise on) against MONAI Dice + HD95 on the same pairs; best of ``repeats``."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("bench_lesionwise", REPO / "benchmarks" / "bench_lesionwise.py")
    lesionwise = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lesionwise)
    work = Path(tempfile.mkdtemp(prefix="bench_evaluate_monai_"))
    pairs = lesionwise.write_pairs(data, n_cases, work)
    lesionwise.monai_case(*pairs[0])  # warm-up: torch and MONAI imported once, as a long-lived process has them
    monai = min(sum(lesionwise.monai_case(gt, pred) for gt, pred in pairs) for _ in range(repeats))
    loads = [os.getloadavg()[0]]
    command = {}
    for name, extra in (("parallel", ()), ("one_process", ("--workers", "1"))):
        command[name] = min(lesionwise.command_seconds(work / "pred", work / "gt", work / f"out_{name}", *extra)
                            for _ in range(repeats))
        loads.append(os.getloadavg()[0])
    result = {"pairs": len(pairs), "repeats": repeats, "monai_dice_hd95_seconds": monai,
              "command_seconds": command, "ratio_to_monai": {k: v / monai for k, v in command.items()},
              "loadavg_1min": [round(x, 2) for x in loads], "cpu_count": os.cpu_count(), "machine": platform.platform(),
              "note": "whole brats-cnn evaluate command incl. process start-up and lesion-wise (gli) metrics; "
                      "MONAI compute_dice + compute_hausdorff_distance (percentile 95) of the 3 regions incl. "
                      "reading, after a warm-up call"}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{len(pairs)} cases: MONAI Dice+HD95 {monai:.1f} s; brats-cnn evaluate {command['parallel']:.1f} s "
          f"({command['parallel'] / monai:.2f}x), one process {command['one_process']:.1f} s "
          f"({command['one_process'] / monai:.2f}x); load {loads}", file=sys.stderr)


if __name__ == "__main__":
    import sys

    if "--vs-monai" in sys.argv:
        parser = argparse.ArgumentParser(description="whole evaluate command against MONAI Dice + HD95")
        parser.add_argument("--vs-monai", action="store_true")
        parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "brats_sample")
        parser.add_argument("--cases", type=int, default=4, help="sample cases (3 perturbed pairs each)")
        parser.add_argument("--repeats", type=int, default=2)
        parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_evaluate_vs_monai.json")
        args = parser.parse_args()
        versus_monai(args.data, args.cases, args.repeats, args.out)
    else:
        main()
