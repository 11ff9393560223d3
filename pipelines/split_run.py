#!/usr/bin/env python
"""Train on, and test on, the parts of a split fixed before training (``pipelines/splits/*.json``).

    # the training data of a grade: links to its train + validation cases, with a manifest
    .venv/bin/python pipelines/split_run.py link --data ../shared/data/brats_sample \
        --split pipelines/splits/brats_sample_v3.json --grade hgg --out runs/data_hgg
    .venv/bin/brats-cnn train --grade hgg --data runs/data_hgg --out runs/hgg_v3 --config training/configs/bundled_hgg_v3.yaml
    .venv/bin/brats-cnn calibrate --run runs/hgg_v3

    # segment the test cases of a grade with a model, score them, print the table
    .venv/bin/python pipelines/split_run.py test --data ../shared/data/brats_sample \
        --split pipelines/splits/brats_sample_v3.json --grade hgg --model runs/hgg_v3/calibrated.pt \
        --out runs/test_hgg_v3

``test`` accepts ``--set key=value`` (e.g. ``segment.prior_alpha=0``) and ``--no-postprocess`` to
measure one lever at a time on the same cases. Test cases are never linked into training data.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_brats import link_cases  # noqa: E402


def _refs(data: Path, split: dict, grades: list[str], parts: list[str]) -> list:
    from brats_cnn.data.layouts import list_cases

    wanted = {case_id: grade for grade in grades for part in parts for case_id in split[grade].get(part, [])}
    refs = [replace(r, grade=wanted[r.case_id].upper()) for r in list_cases(data) if r.case_id in wanted]
    missing = sorted(set(wanted) - {r.case_id for r in refs})
    if missing:
        raise SystemExit(f"{data}: case(s) of the split not found: {', '.join(missing)}")
    return refs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("link", "test"))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", type=Path, required=True)
    parser.add_argument("--grade", nargs="+", choices=("hgg", "lgg"), required=True)
    parser.add_argument("--part", nargs="+", default=None, help="default: train validation (link), test (test)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, nargs="+", help="checkpoint to test (several: their ensemble)")
    parser.add_argument("--mode", default="fast")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--no-postprocess", action="store_true")
    args = parser.parse_args(argv)

    split = json.loads(args.split.read_text())
    parts = args.part or (["train", "validation"] if args.action == "link" else ["test"])
    refs = _refs(args.data, split, args.grade, parts)
    if args.action == "link":
        link_cases(refs, args.out)
        print(f"{len(refs)} case(s) linked into {args.out}")
        return 0
    if args.model is None:
        parser.error("test needs --model")
    from brats_cnn.evaluation.evaluate import run_evaluate
    from brats_cnn.inference.segment import run_segment

    cases = link_cases(refs, args.out / "cases")
    run_segment(inputs=[cases / r.case_id for r in refs], model=args.model, out=args.out / "segmentations",
                mode=args.mode, device=args.device, postprocess=not args.no_postprocess, overrides=args.overrides)
    summary = run_evaluate(pred=args.out / "segmentations", gt=cases, out=args.out / "report")
    statistics = summary["statistics"]["all"]
    print(f"{'region':<10} {'DSC':>6} {'PPV':>6} {'sens.':>6} {'HD95':>7}  (means over {summary['n_cases_scored']} cases)")
    for region, metrics in statistics.items():
        print(f"{region:<10} " + " ".join(f"{metrics[m]['mean']:>6.3f}" for m in ("dsc", "ppv", "sensitivity"))
              + f" {metrics['hd95']['mean']:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
