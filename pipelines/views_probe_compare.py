#!/usr/bin/env python
"""Issue 34 probe: one fold's held-out cases scored at a few rules from two sets of count tables, the
axial model's own (``tta`` = 4 axial rotations) and a probe's whose ``tta`` column holds another
prediction (here the same model run over three slice planes, ``segment.views``), side by side per case.

    # the probe's "tta": the fold model over three planes; its "plain": the axial prediction of the fold's run
    .venv/bin/python pipelines/cross_validate.py run --data ../shared/data/brats_sample \
        --split pipelines/splits/brats_sample_cv4.json --models-from runs/cv_intensity_strong --fold 3 \
        --segment-set "segment.views=[axial,coronal,sagittal]" --out runs/cv_strong_views   # (its oof/plain)
    mkdir -p runs/views_probe/oof && cp -r runs/cv_intensity_strong/oof/plain runs/views_probe/oof/plain
    cp -r runs/cv_strong_views/oof/plain runs/views_probe/oof/tta
    .venv/bin/python pipelines/cross_validate.py tables --data ../shared/data/brats_sample \
        --split pipelines/splits/brats_sample_cv4.json --out runs/views_probe --fold 3 \
        --tables benchmarks/results/cv4_views_probe/tables
    .venv/bin/python pipelines/views_probe_compare.py --fold 3 --axial benchmarks/results/cv4_intensity_strong/tables \
        --probe benchmarks/results/cv4_views_probe/tables > benchmarks/results/cv4_views_probe/fold3_views_vs_rotations.txt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cross_validate as cv  # noqa: E402

KEYS = ("dice_complete", "dice_core", "dice_enhancing", "sens_complete")


def current_rule(rules: list, tta: bool, alpha: float):
    """The grid rule with the chosen HGG post-processing (t_vol 0, keep-largest, no edema weight) at ``alpha``."""
    return next(r for r in rules if r.tta == tta and r.alpha == alpha and r.edema_boost == 1 and r.t_vol == 0
                and r.keep_largest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", type=Path, default=Path("pipelines/splits/brats_sample_cv4.json"))
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("--axial", type=Path, required=True, help="the fold model's own count tables")
    parser.add_argument("--probe", type=Path, required=True, help="the probe's count tables (same plain column)")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.4, 0.6, 0.8])
    args = parser.parse_args(argv)
    cases = json.loads(args.split.read_text())["folds"][args.fold]["hgg"]
    rules = cv.grid_rules(cv.T_VOLS)
    axial, probe = cv.score_grid(args.axial, cases, rules), cv.score_grid(args.probe, cases, rules)
    for alpha in args.alphas:
        plain = current_rule(rules, False, alpha)
        if any(abs(probe[plain][c]["dice_complete"] - axial[plain][c]["dice_complete"]) > 1e-9 for c in cases):
            raise SystemExit(f"{args.probe}: its plain column is not {args.axial}'s: not the same fold model's prediction")
        print(f"alpha {alpha}: mean complete / core / enhancing, complete sensitivity, then complete per case")
        rows = {"axial (1 pass)": axial[plain], "axial 4 rotations (4 passes)": axial[current_rule(rules, True, alpha)],
                "probe (its tta column)": probe[current_rule(rules, True, alpha)]}
        for name, per in rows.items():
            m = {k: np.mean([per[c][k] for c in cases]) for k in KEYS}
            print(f"  {name:30s} {m['dice_complete']:.3f} / {m['dice_core']:.3f} / {m['dice_enhancing']:.3f}  "
                  f"sens {m['sens_complete']:.3f}  " + " ".join(f"{per[c]['dice_complete']:.3f}" for c in cases))
    print("cases:", ", ".join(cases))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
