#!/usr/bin/env python
"""Issue 34: two sets of out-of-fold count tables scored side by side on the cases they share, at a
few rules (each prior-correction exponent, with and without TTA, at the given post-processing).

Used for a test-time question asked of finished fold models, e.g. what one plane gives with the
three-plane models (their own tables against `cross_validate.py run --models-from ... --segment-set
"segment.views=[axial]"`'s):

    .venv/bin/python pipelines/cv_side_by_side.py --split pipelines/splits/brats_sample_cv4.json --fold 2 3 \
        --tables planes=benchmarks/results/cv4_intensity_planes/tables axial=benchmarks/results/cv4_planes_axial/tables \
        > benchmarks/results/cv4_planes_axial/folds23_axial_vs_planes.txt

Prints, per tables and rule, mean complete / core / enhancing Dice, worst complete, complete
sensitivity and the mean of the three regions over the HGG cases of the folds, then each case's
complete Dice at every set's best rule by that mean.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cross_validate as cv  # noqa: E402

POST = ((3000, False, False), (3000, False, True), (0, True, False), (1000, False, True))  # (t_vol, keep_largest, require_core): v10's rule, with require-core (since 2026-12-07), v9's, and v11's (since 2026-12-08)


def rules(alphas: tuple[float, ...]) -> list:
    return [cv.Rule(tta, alpha, 1.0, t_vol, keep, False, core)
            for tta in (False, True) for t_vol, keep, core in POST for alpha in alphas]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", type=Path, required=True)
    parser.add_argument("--fold", type=int, nargs="+", action="extend", required=True)
    parser.add_argument("--tables", nargs=2, required=True, metavar="NAME=DIR")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8])
    args = parser.parse_args(argv)
    folds = json.loads(args.split.read_text())["folds"]
    cases = sorted(c for f in args.fold for c in folds[f]["hgg"])
    sets = dict(item.split("=", 1) for item in args.tables)
    grid = rules(tuple(args.alphas))
    best = {}
    print(f"{len(cases)} HGG cases of fold(s) {', '.join(map(str, args.fold))}: {', '.join(cases)}")
    print(f"{'tables':8s} {'rule':64s} {'complete':>8s} {'core':>6s} {'enh.':>6s} {'worst':>6s} {'sens.':>6s} {'mean3':>6s}")
    for name, folder in sets.items():
        per_rule = cv.score_grid(Path(folder), cases, grid)
        summaries = {rule: cv.summarise(scores) for rule, scores in per_rule.items()}
        for rule, s in summaries.items():
            print(f"{name:8s} {rule.name():64s} {s['mean_dice_complete']:8.3f} {s['mean_dice_core']:6.3f} "
                  f"{s['mean_dice_enhancing']:6.3f} {s['worst_dice_complete']:6.3f} {s['mean_sens_complete']:6.3f} "
                  f"{s['mean_dice']:6.3f}")
        top = max(summaries, key=lambda r: summaries[r]["mean_dice"])
        best[name] = (top, per_rule[top])
    print("\nper case, complete / core / enhancing Dice at each set's best rule by the mean of three:")
    for name, (rule, _) in best.items():
        print(f"  {name}: {rule.name()}")
    print(f"{'case':24s} " + " ".join(f"{name:>20s}" for name in best))
    for case in cases:
        cells = [f"{s[case]['dice_complete']:.3f}/{s[case]['dice_core']:.3f}/{s[case]['dice_enhancing']:.3f}"
                 for _, s in best.values()]
        print(f"{case:24s} " + " ".join(f"{c:>20s}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
