#!/usr/bin/env python
"""Issue 34 probe: where a cross-validation's out-of-fold false positives and negatives lie, and what
the called tumour components hold, at one prior-correction exponent without post-processing.

    .venv/bin/python pipelines/cv_false_positive_probe.py runs/cv_intensity_planes 2,3 tta 0.4 \\
        > benchmarks/results/cv4_intensity_planes/false_positive_probe_folds23.txt

Arguments: the cross-validation's --out, the folds (comma-separated), ``plain`` or ``tta``, alpha.
Per case: the complete-tumour Dice, the reference and called volumes, the false positives and the
share of them within 2 and 5 voxels of the reference tumour (and beyond 10), the false negatives and
the share within 2 and 5 voxels of the called tumour. Then the six largest called components: size,
share inside the reference, mean tumour probability, share of tumour-core labels (necrosis /
non-enhancing / enhancing). What led to ``postprocess.require_core`` (docs/results.md).
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


def within(mask: np.ndarray, distance: np.ndarray, limit: float) -> float:
    """Share of ``mask``'s voxels whose ``distance`` is at most ``limit`` (nan for an empty mask)."""
    return float((distance[mask] <= limit).mean()) if mask.any() else float("nan")


def main(argv: list[str] | None = None) -> int:
    from scipy import ndimage

    from brats_cnn.data.labels import classify
    from brats_cnn.evaluation.metrics import dice
    from brats_cnn.inference.postprocess import component_sizes, core_of
    from brats_cnn.inference.prior import apply_class_prior

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the cross-validation's --out")
    parser.add_argument("folds", help="comma-separated fold numbers")
    parser.add_argument("name", choices=("plain", "tta"))
    parser.add_argument("alpha", type=float, help="the prior-correction exponent")
    args = parser.parse_args(argv)
    refs = cv.held_hgg_refs(DATA, SPLIT, [int(f) for f in args.folds.split(",")])
    print(f"{'case':22s} dice   truth  called     FP <=2  <=5  >10 |     FN <=2  <=5")
    components_lines = []
    for ref in refs:
        case = cv._load_oof_case(ref, args.out, CONVENTION)
        probabilities = apply_class_prior(case[args.name], np.asarray(case["frequencies"]), args.alpha)
        classes = classify(probabilities, CONVENTION)
        called, truth = classes > 0, case["truth"] > 0
        false_pos, false_neg = called & ~truth, truth & ~called
        to_truth = ndimage.distance_transform_edt(~truth)
        to_called = ndimage.distance_transform_edt(~called)
        print(f"{ref.case_id:22s} {dice(truth, called):.3f} {truth.sum():7d} {called.sum():7d} {false_pos.sum():6d} "
              f"{within(false_pos, to_truth, 2):.2f} {within(false_pos, to_truth, 5):.2f} "
              f"{1 - within(false_pos, to_truth, 10):.2f} | {false_neg.sum():6d} "
              f"{within(false_neg, to_called, 2):.2f} {within(false_neg, to_called, 5):.2f}", flush=True)
        components, sizes = component_sizes(called, 1)
        core = core_of(classes, CONVENTION)
        tumour_probability = 1 - probabilities[0]
        rows = []
        for index in np.argsort(-sizes[1:])[:6] + 1:
            member = components == index
            rows.append(f"{sizes[index]}: in-ref {truth[member].mean():.2f} p {tumour_probability[member].mean():.2f} "
                        f"core {core[member].mean():.2f}")
        components_lines.append(f"{ref.case_id:22s} {len(sizes) - 1:3d} components | " + "; ".join(rows))
    print("\nlargest called components (voxels: share inside the reference, mean tumour probability, share of core labels)")
    print("\n".join(components_lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
