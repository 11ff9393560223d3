#!/usr/bin/env python
"""The full BraTS run: split -> (preprocess +) train HGG and LGG -> segment held-out cases with
the model of their grade -> post-process -> evaluate -> report.

Usage (from the repository root, after ``make install``):

    .venv/bin/python pipelines/run_brats.py --data ../shared/data/brats_sample --out runs/brats \
        --test-cases Brats18_2013_3_1 Brats18_CBICA_AOP_1 Brats18_TCIA10_639_1 \
        --set train.epochs=4 --set sampling.total_patches=60000

The data folder needs a manifest (``case_id,grade``) so that each case goes to the model of its
grade. Training cases are linked (not copied) into ``<out>/splits/<grade>/``; each model's own
validation case(s) come out of those (``data.validation_cases``). Test cases are never seen in
training or normaliser fitting. Re-running resumes training from ``last.pt`` and skips finished
segmentations.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path


def link_cases(refs, folder: Path) -> Path:
    """Make ``folder`` a dataset of symbolic links to the case folders of ``refs``, with a manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    for ref in refs:
        source = Path(ref.image_paths[0]).resolve().parent
        link = folder / ref.case_id
        if not link.exists():
            link.symlink_to(source, target_is_directory=True)
    with open(folder / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case_id", "grade"])
        writer.writerows([ref.case_id, ref.grade] for ref in refs)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="BraTS dataset folder with manifest.csv")
    parser.add_argument("--out", type=Path, default=Path("runs/brats"))
    parser.add_argument("--test-cases", nargs="+", required=True, help="case ids held out for testing")
    parser.add_argument("--grades", nargs="+", default=["hgg", "lgg"])
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override for both grades, e.g. train.epochs=4")
    parser.add_argument("--set-hgg", action="append", default=[], help="override for the HGG model only")
    parser.add_argument("--set-lgg", action="append", default=[], help="override for the LGG model only")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--mode", default=None, help="segmentation mode: exact, fast or auto")
    args = parser.parse_args(argv)

    from brats_cnn.evaluation.evaluate import run_evaluate
    from brats_cnn.data.layouts import list_cases
    from brats_cnn.inference.segment import run_segment
    from brats_cnn.training.train import run_training

    start = time.perf_counter()
    refs = list_cases(args.data)
    unknown = sorted(set(args.test_cases) - {r.case_id for r in refs})
    if unknown:
        parser.error(f"test cases not in {args.data}: {unknown}")
    test = [r for r in refs if r.case_id in args.test_cases]
    timings: dict[str, float] = {}
    for grade in args.grades:
        train_refs = [r for r in refs if r.case_id not in args.test_cases and (r.grade or "").lower() == grade]
        test_refs = [r for r in test if (r.grade or "").lower() == grade]
        if not train_refs:
            print(f"no {grade.upper()} training cases; skipping that model", file=sys.stderr)
            continue
        run_dir = args.out / f"model_{grade}"
        print(f"== {grade.upper()}: training on {len(train_refs)} cases -> {run_dir}")
        t0 = time.perf_counter()
        run_training(grade=grade, data=link_cases(train_refs, args.out / "splits" / grade), out=run_dir,
                     overrides=args.overrides + getattr(args, f"set_{grade}"), device=args.device,
                     resume=(run_dir / "last.pt").is_file())
        timings[f"train_{grade}_s"] = time.perf_counter() - t0
        if test_refs:
            print(f"== {grade.upper()}: segmenting {len(test_refs)} held-out cases")
            t0 = time.perf_counter()
            run_segment(inputs=[Path(r.image_paths[0]).parent for r in test_refs], model=run_dir / "best.pt",
                        grade=None, out=args.out / "segmentations", mode=args.mode, device=args.device,
                        save_probabilities=False, label_convention=None, overwrite=False, postprocess=True,
                        overrides=[])
            timings[f"segment_{grade}_s"] = time.perf_counter() - t0

    print("== evaluating the held-out cases")
    summary = run_evaluate(pred=args.out / "segmentations", gt=link_cases(test, args.out / "splits" / "test"),
                           out=args.out / "report")
    timings["total_s"] = time.perf_counter() - start
    (args.out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    statistics = summary["statistics"]["all"]
    print(f"{'region':<10} {'DSC':>6} {'PPV':>6} {'sens.':>6} {'HD95':>7}  (means over {summary['n_cases_scored']} cases)")
    for region, metrics in statistics.items():
        print(f"{region:<10} " + " ".join(f"{metrics[m]['mean']:>6.3f}" for m in ("dsc", "ppv", "sensitivity"))
              + f" {metrics['hd95']['mean']:>7.2f}")
    print(f"report: {args.out / 'report' / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
