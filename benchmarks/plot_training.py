"""Plot training runs' loss curves (steps.csv) and validation figures (metrics.csv) into one PNG.

    .venv/bin/python benchmarks/plot_training.py benchmarks/results/train_hgg_v3 runs/hgg_v3
    .venv/bin/python benchmarks/plot_training.py benchmarks/results/precision runs/bf16 runs/fp32

Writes ``<prefix>_loss.png`` and, for one run, copies ``metrics.csv``/``steps.csv`` to
``<prefix>_metrics.csv`` / ``<prefix>_steps.csv``. Several runs are drawn on the same axes (e.g. the
same data and seed in bf16 and in float32). The batch loss is smoothed with a running mean.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np

SMOOTHING = 50  # iterations in the running mean of the batch loss


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
    if values.size < width:
        return values
    return np.convolve(values, np.ones(width) / width, mode="valid")


def main(prefix: Path, runs: list[Path]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brats_cnn.fsutil import atomic_path

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for index, run in enumerate(runs):
        colour = f"C{index}"
        steps = list(csv.DictReader((run / "steps.csv").open()))
        rows = list(csv.DictReader((run / "metrics.csv").open())) if (run / "metrics.csv").is_file() else []
        x = np.array([int(r["step"]) for r in steps])
        loss = np.array([float(r["loss"]) for r in steps])
        smooth = _smooth(loss, SMOOTHING)
        left.plot(x[len(x) - len(smooth):], smooth, lw=1, color=colour, label=f"{run.name}: batch loss ({SMOOTHING}-step mean)")
        if rows and rows[0]["val_loss"]:
            left.plot([int(r["step"]) for r in rows], [float(r["val_loss"]) for r in rows], "s--", color=colour,
                      label=f"{run.name}: validation patch loss")
        for style, column in zip(("o-", "^-", "v-"), ("dice_complete", "dice_core", "dice_enhancing")):
            values = [r[column] for r in rows]
            if values and all(values):
                right.plot([int(r["step"]) for r in rows], [float(v) for v in values], style, color=colour,
                           label=f"{run.name}: {column}")
    left.set_xlabel("iteration")
    left.set_ylabel("cross-entropy")
    left.legend(fontsize=7)
    if right.lines:
        right.set_xlabel("iteration")
        right.set_ylabel("validation Dice (whole volumes, no calibration)")
        right.set_ylim(0, 1)
        right.legend(fontsize=7)
    else:  # runs without validation cases (v8, v9, the folds): the loss panel alone
        fig.delaxes(right)
    fig.suptitle(", ".join(run.name for run in runs), fontsize=10)
    fig.tight_layout()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(f"{prefix}_loss.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    if len(runs) == 1:
        for name in ("metrics.csv", "steps.csv"):
            if (runs[0] / name).is_file():
                shutil.copyfile(runs[0] / name, f"{prefix}_{name}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefix", type=Path, help="output prefix: <prefix>_loss.png (and _metrics.csv, _steps.csv)")
    parser.add_argument("runs", type=Path, nargs="+", help="train run folders (steps.csv, metrics.csv)")
    args = parser.parse_args()
    main(args.prefix, args.runs)
