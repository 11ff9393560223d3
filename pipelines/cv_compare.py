#!/usr/bin/env python
"""Issue 34: which lever wins, by the pre-registered choice (``cross_validate.choose``) over the rows of
several cross-validation grids pooled (each ``grid.csv`` scores the same out-of-fold cases).

    .venv/bin/python pipelines/cv_compare.py --population hgg benchmarks/results/cv4 \
        benchmarks/results/cv4_intensity benchmarks/results/cv4_natural benchmarks/results/cv4_ensemble
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cross_validate as cv  # noqa: E402

NUMERIC = ("mean_dice", "worst_dice_complete", "cases_complete_below_0.5")


def pooled_choice(grids: dict[str, list[dict]], population: str) -> dict:
    """The row ``choose`` picks among every grid's rows of ``population``; its ``lever`` names the grid."""
    rows = [{**row, "lever": lever, **{k: float(row[k]) for k in NUMERIC}}
            for lever, grid_rows in grids.items() for row in grid_rows if row["population"] == population]
    return cv.choose(rows, population)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grids", type=Path, nargs="+", help="folders holding a grid.csv")
    parser.add_argument("--population", default="hgg", choices=("hgg", "lgg", "all"))
    args = parser.parse_args(argv)
    grids = {}
    for folder in args.grids:
        path = folder / "grid.csv"
        if not path.is_file():
            raise SystemExit(f"{path}: no grid (run cross_validate.py grid first)")
        with open(path, newline="") as handle:
            grids[folder.name] = list(csv.DictReader(handle))
    for lever, rows in grids.items():
        best = pooled_choice({lever: rows}, args.population)
        print(f"{lever}: {best['rule']}: mean of 3 {best['mean_dice']:.4f}, worst complete "
              f"{best['worst_dice_complete']:.3f}, {best['cases_complete_below_0.5']:.0f} case(s) < 0.5")
    best = pooled_choice(grids, args.population)
    print(f"chosen: {best['lever']}: {best['rule']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
