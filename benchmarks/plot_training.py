"""Plot a training run's loss curve (steps.csv) and validation figures (metrics.csv) into one PNG.

    .venv/bin/python benchmarks/plot_training.py runs/smoke benchmarks/results/train_smoke_real

Writes ``<prefix>_loss.png`` and copies ``metrics.csv``/``steps.csv`` to ``<prefix>_metrics.csv`` /
``<prefix>_steps.csv``.
"""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path


def main(run: Path, prefix: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brats_cnn.fsutil import atomic_path

    steps = list(csv.DictReader((run / "steps.csv").open()))
    epochs = list(csv.DictReader((run / "metrics.csv").open()))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([int(r["step"]) for r in steps], [float(r["loss"]) for r in steps], lw=0.8, label="batch loss")
    left.plot([int(r["step"]) for r in epochs], [float(r["train_loss"]) for r in epochs], "o-", label="epoch mean")
    if epochs and epochs[0]["val_loss"]:
        left.plot([int(r["step"]) for r in epochs], [float(r["val_loss"]) for r in epochs], "s-",
                  label="validation (held-out case)")
    left.set_xlabel("iteration")
    left.set_ylabel("cross-entropy")
    left.legend(fontsize=8)
    for column in ("train_accuracy", "val_accuracy", "dice_complete", "dice_core", "dice_enhancing"):
        values = [r[column] for r in epochs]
        if all(values):
            right.plot([int(r["epoch"]) for r in epochs], [float(v) for v in values], "o-", label=column)
    right.set_xlabel("epoch")
    right.set_ylim(0, 1)
    right.legend(fontsize=8)
    fig.suptitle(f"{run.name}: {len(steps)} iterations", fontsize=10)
    fig.tight_layout()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(f"{prefix}_loss.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    shutil.copyfile(run / "metrics.csv", f"{prefix}_metrics.csv")
    shutil.copyfile(run / "steps.csv", f"{prefix}_steps.csv")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
