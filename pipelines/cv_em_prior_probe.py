#!/usr/bin/env python
"""Issue 34 probe: each held-out case's own class prior by EM (Saerens et al. 2002, the estimate
``segment.prior_adapt`` uses, ``prior.estimate_case_prior`` at alpha 1) from a cross-validation's saved out-of-fold probabilities, against the
training prior at each exponent; complete-tumour Dice without post-processing, per case and mean.

    .venv/bin/python pipelines/cv_em_prior_probe.py runs/cv_intensity_planes 2,3 tta \\
        > benchmarks/results/cv4_intensity_planes/em_prior_probe_folds23.txt

Arguments: the cross-validation's --out, the folds (comma-separated), ``plain`` or ``tta``. The EM
runs over the brain voxels (any sequence non-zero) from the fold model's training frequencies; both
priors are applied by ``prior.apply_class_prior`` (``pi ** gamma``, like the training prior's ``alpha``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cross_validate as cv  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats_sample"
SPLIT = Path(__file__).resolve().parent / "splits" / "brats_sample_cv4.json"
GAMMAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def complete_dice(probabilities: np.ndarray, truth: np.ndarray) -> float:
    """Complete-tumour Dice of the argmax labels of ``(C, ...)`` probabilities against class indices."""
    from brats_cnn.data.labels import classify
    from brats_cnn.evaluation.metrics import dice

    return dice(truth > 0, classify(probabilities, "brats2017") > 0)


def main(argv: list[str] | None = None) -> int:
    from brats_cnn.data.io import load_case
    from brats_cnn.inference.prior import apply_class_prior, estimate_case_prior

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the cross-validation's --out")
    parser.add_argument("folds", help="comma-separated fold numbers")
    parser.add_argument("name", choices=("plain", "tta"))
    args = parser.parse_args(argv)
    out, folds, name = args.out, [int(f) for f in args.folds.split(",")], args.name
    rows = {}
    for ref in cv.held_hgg_refs(DATA, SPLIT, folds):
        case = cv._load_oof_case(ref, out, "brats2017")
        brain = (load_case(ref).image != 0).any(axis=0)
        probabilities, truth, frequencies = case[name], case["truth"], np.asarray(case["frequencies"])
        prior = estimate_case_prior(probabilities, brain, frequencies, alpha=1.0)  # Saerens et al.'s estimate
        true_prior = np.bincount(truth[brain].astype(int), minlength=len(frequencies)) / brain.sum()
        row = {f"em{g:g}": complete_dice(apply_class_prior(probabilities, prior, g), truth) for g in GAMMAS}
        row.update({f"a{a:g}": complete_dice(apply_class_prior(probabilities, frequencies, a), truth) for a in cv.ALPHAS})
        rows[ref.case_id] = row
        print(f"{ref.case_id:24s} tumour share: training {1 - frequencies[0]:.3f}, EM {1 - prior[0]:.3f}, "
              f"true {1 - true_prior[0]:.3f} | " + " ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    print("mean" + " " * 21 + " ".join(f"{k} {np.mean([r[k] for r in rows.values()]):.3f}" for k in next(iter(rows.values()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
