#!/usr/bin/env python
"""Issue 34 lever: the nested-regions decision (``segment.decision: regions``) against argmax, scored on
the saved out-of-fold probabilities of a cross-validation (``cross_validate.py run --out``), HGG cases,
TTA on, t_vol 0, keep-largest, over prior-correction exponents and edema weights. Needs the
probabilities (several GB, not committed), so it runs on the machine that ran the folds.

    .venv/bin/python pipelines/cv_decision_probe.py --out runs/cv --data ../shared/data/brats_sample \
        > benchmarks/results/cv4/decision_probe.txt
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cross_validate as cv  # noqa: E402

ALPHAS = (0.4, 0.6, 0.8, 1.0, 1.2)
EDEMA_BOOSTS = (1.0, 1.5)


def main(argv: list[str] | None = None) -> int:
    from brats_cnn.data.labels import classify, get_convention
    from brats_cnn.data.layouts import list_cases

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/cv"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data/brats_sample"))
    parser.add_argument("--split", type=Path, default=Path("pipelines/splits/brats_sample_cv4.json"))
    args = parser.parse_args(argv)
    folds = json.loads(args.split.read_text())["folds"]
    hgg = {case for fold in folds for case in fold["hgg"]}
    edema = get_convention("brats2017").tissues.index("edema")
    results: dict[tuple, dict[str, dict[str, float]]] = {}
    for ref in (r for r in list_cases(args.data) if r.case_id in hgg):
        start = time.time()
        case = cv._crop(cv._load_oof_case(ref, args.out, "brats2017"))
        for decision in ("argmax", "regions"):
            for alpha in ALPHAS:
                for boost in EDEMA_BOOSTS:
                    probabilities = cv.corrected(case["tta"], case["frequencies"], alpha, boost, edema)
                    counts = cv._counts(classify(probabilities, "brats2017", decision), case["truth"], "brats2017")
                    results.setdefault((decision, alpha, boost), {})[ref.case_id] = cv.rule_scores(
                        *counts, cv.Rule(True, alpha, boost, 0, True, False))
        print(f"# {ref.case_id} {time.time() - start:.0f} s", flush=True)
    print("decision alpha edema_weight | mean DSC complete/core/enhancing | worst complete | sens complete | <0.5 | mean")
    for (decision, alpha, boost), per_case in results.items():
        s = cv.summarise(per_case)
        print(f"{decision} {alpha:g} {boost:g} | {s['mean_dice_complete']:.3f}/{s['mean_dice_core']:.3f}/"
              f"{s['mean_dice_enhancing']:.3f} | {s['worst_dice_complete']:.3f} | {s['mean_sens_complete']:.3f} | "
              f"{s['cases_complete_below_0.5']} | {s['mean_dice']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
