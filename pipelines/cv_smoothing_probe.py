#!/usr/bin/env python
"""Issue 34 probe: does smoothing the corrected probabilities in 3D before the decision help out of fold?

    .venv/bin/python pipelines/cv_smoothing_probe.py runs/cv_context 0,1 \\
        > benchmarks/results/cv4_context/smoothing_probe_folds01.txt

Arguments: the cross-validation's --out and the folds (comma-separated). On each held-out HGG case's
TTA probabilities, at v10's rule (alpha 0.4, t_vol 3,000, require-core), each class channel is
filtered with an isotropic Gaussian of sigma 0 (the control: equals the count tables' scores), 1 and
2 voxels before the argmax, a cheap stand-in for the 3D smoothing a CRF gives a 2D patch model.
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
CONVENTION = "brats2017"
SIGMAS = (0.0, 1.0, 2.0)
RULE = cv.Rule(tta=True, alpha=0.4, edema_boost=1.0, t_vol=3000, keep_largest=False, never_empty=False,
               require_core=True)


def main(argv: list[str] | None = None) -> int:
    from scipy import ndimage

    from brats_cnn.data.labels import REGIONS, classify, get_convention

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the cross-validation's --out")
    parser.add_argument("folds", help="comma-separated fold numbers")
    args = parser.parse_args(argv)
    edema = get_convention(CONVENTION).tissues.index("edema")
    print(f"{RULE.name()}; complete / core / enhancing Dice per Gaussian sigma (voxels)")
    scores = []
    for ref in cv.held_hgg_refs(DATA, SPLIT, [int(f) for f in args.folds.split(",")]):
        case = cv._crop(cv._load_oof_case(ref, args.out, CONVENTION))
        corrected = cv.corrected(case["tta"], case["frequencies"], RULE.alpha, RULE.edema_boost, edema)
        row = []
        for sigma in SIGMAS:
            smoothed = np.stack([ndimage.gaussian_filter(c, sigma) for c in corrected]) if sigma else corrected
            counts = cv._counts(classify(smoothed, CONVENTION), case["truth"], CONVENTION)
            result = cv.rule_scores(*counts, RULE)
            row.append([result[f"dice_{region}"] for region in REGIONS])
        scores.append(row)
        print(f"{ref.case_id:22s} " + "  ".join(f"s{s:g} " + "/".join(f"{v:.3f}" for v in r) for s, r in zip(SIGMAS, row)),
              flush=True)
    for sigma, mean in zip(SIGMAS, np.mean(scores, axis=0)):
        print(f"mean, sigma {sigma:g}: " + " / ".join(f"{v:.3f}" for v in mean) + f"   mean of three {mean.mean():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
