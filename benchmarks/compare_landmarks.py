"""Nyul landmarks before and after issue 13 (statistics over each sequence's data voxels only).

Old definition (brats-cnn before issue 13): percentiles of a sequence over the whole brain mask
(any sequence non-zero), zeros of that sequence included. New definition: over the brain voxels
where that sequence is non-zero (``nyul.image_landmarks``). Both are computed here from the
same N4-corrected image, the one kept by ``brats-cnn preprocess`` in ``<cache>/.percase/``, so
the comparison isolates the change of voxel set (N4 did not change).

Usage (after ``brats-cnn preprocess --data DATA --out CACHE --fit``):
    .venv/bin/python benchmarks/compare_landmarks.py --data ../shared/data/brats_sample --cache CACHE \
        --out benchmarks/results/landmarks_issue13.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from brats_cnn.config import load_config
from brats_cnn.errors import InputError
from brats_cnn.data.layouts import list_cases
from brats_cnn.data.io import load_case
from brats_cnn.preprocessing.normalise import brain_mask, sequence_coverage
from brats_cnn.preprocessing.nyul import image_landmarks, nyul_percentiles, standard_from_landmarks
from brats_cnn.preprocessing.bias import correct_bias


def _scaled(landmarks: np.ndarray, s1: float, s2: float) -> np.ndarray:
    """An image's landmarks mapped linearly so that [pc1, pc2] -> [s1, s2] (as in the Nyul fit)."""
    return s1 + (landmarks - landmarks[0]) * (s2 - s1) / (landmarks[-1] - landmarks[0])


def _summary_by_coverage(rows: list[dict]) -> dict:
    """Largest landmark change (0-100 standard scale) per group of (case, sequence) by its coverage."""
    groups = {"coverage 100 %": (1.0, 1.01), "coverage >= 99.9 %": (0.999, 1.0), "coverage < 99.9 %": (0.0, 0.999)}
    out = {}
    for label, (low, high) in groups.items():
        entries = [(r["case_id"], n, e) for r in rows for n, e in r["sequences"].items() if low <= e["coverage"] < high]
        valid = [e.get("max_change_on_standard_scale") for _, _, e in entries
                 if "max_change_on_standard_scale" in e]
        out[label] = {"case_sequences": len(entries), "cases": len({c for c, _, _ in entries}),
                      "max_change_on_standard_scale": max(valid, default=0.0),
                      "median_change_on_standard_scale": float(np.median(valid)) if valid else 0.0,
                      "old_definition_degenerate": [f"{c} {n}" for c, n, e in entries if e["old_definition_degenerate"]]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    config = load_config(args.cache / "config.yaml")
    pre = config.preprocess
    percentiles = nyul_percentiles(pre.nyul)
    order = tuple(config.data.channel_order)
    s1, s2 = float(pre.nyul.s1), float(pre.nyul.s2)
    rows, old_rows, new_rows = [], {n: [] for n in order}, {n: [] for n in order}
    for ref in list_cases(args.data):
        case = load_case(ref, load_label=False)
        mask = brain_mask(case.image)
        corrected = correct_bias(case.image, mask, pre.n4, spacing=case.spacing, channel_order=order,
                                 source=ref.image_paths[0])
        coverage = sequence_coverage(corrected, mask)
        row = {"case_id": ref.case_id, "grade": ref.grade, "brain_voxels": int(mask.sum()), "sequences": {}}
        for c, name in enumerate(order):
            old = np.percentile(corrected[c][mask].astype(np.float64), percentiles)
            new = image_landmarks(corrected[c], mask, percentiles)
            entry = {"coverage": round(float(coverage[c]), 6),
                     "old_landmarks": [round(float(v), 4) for v in old],
                     "new_landmarks": [round(float(v), 4) for v in new],
                     "max_abs_change": float(np.max(np.abs(new - old))),
                     "max_change_relative_to_range": float(np.max(np.abs(new - old)) / (new[-1] - new[0]))}
            old_valid = bool(np.all(np.diff(old) > 0))
            entry["old_definition_degenerate"] = not old_valid
            if old_valid:
                entry["max_change_on_standard_scale"] = float(np.max(np.abs(_scaled(new, s1, s2) - _scaled(old, s1, s2))))
                old_rows[name].append((ref.case_id, old))
            new_rows[name].append((ref.case_id, new))
            row["sequences"][name] = entry
        row["full_coverage"] = bool(np.all(coverage == 1.0))
        rows.append(row)
        print(ref.case_id, " ".join(f"{n}: cov {e['coverage']:.4f} d {e['max_change_relative_to_range']:.2e}"
                                    for n, e in row["sequences"].items()), flush=True)

    # the standard histograms fitted on the cases the old definition could use
    fitted = {}
    for name in order:
        usable = {cid for cid, _ in old_rows[name]}
        try:
            old_std = standard_from_landmarks([lm for _, lm in old_rows[name]], pre.nyul).landmarks
            new_same = standard_from_landmarks([lm for cid, lm in new_rows[name] if cid in usable], pre.nyul).landmarks
            new_all = standard_from_landmarks([lm for _, lm in new_rows[name]], pre.nyul).landmarks
        except InputError as exc:
            fitted[name] = {"error": str(exc)}
            continue
        fitted[name] = {"cases_old_definition_could_fit": len(usable),
                        "old": [round(v, 4) for v in old_std],
                        "new_same_cases": [round(v, 4) for v in new_same],
                        "new_all_cases": [round(v, 4) for v in new_all],
                        "max_change_same_cases": float(np.max(np.abs(np.subtract(new_same, old_std)))),
                        "max_change_all_cases": float(np.max(np.abs(np.subtract(new_all, old_std))))}

    full = [r for r in rows if r["full_coverage"]]
    partial = [r for r in rows if not r["full_coverage"]]
    result = {
        "what": "Nyul landmarks (percentiles pc1, 10..90, pc2 of the N4-corrected image) over the whole brain "
                "mask (old) vs over the brain voxels where the sequence is non-zero (new, issue 13)",
        "percentiles": list(percentiles), "standard_scale": [s1, s2],
        "cases": len(rows), "cases_with_full_coverage": len(full),
        "full_coverage_max_abs_change": max((e["max_abs_change"] for r in full for e in r["sequences"].values()),
                                            default=0.0),
        "summary_by_coverage": _summary_by_coverage(rows),
        "partial_coverage_cases": {r["case_id"]: {n: e["coverage"] for n, e in r["sequences"].items()
                                                  if e["coverage"] < 1.0} for r in partial},
        "partial_coverage_max_change_on_standard_scale": {
            r["case_id"]: {n: e.get("max_change_on_standard_scale", "old definition degenerate")
                           for n, e in r["sequences"].items() if e["coverage"] < 1.0} for r in partial},
        "fitted_standard_landmarks": fitted,
        "per_case": rows,
    }
    for row in rows:  # keep the file small: the landmark values only where they moved noticeably
        for entry in row["sequences"].values():
            if entry["coverage"] >= 0.999:
                del entry["old_landmarks"], entry["new_landmarks"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("per_case", "fitted_standard_landmarks")}, indent=1))
    print("standard landmarks, max change:", {n: (f.get("max_change_same_cases"), f.get("max_change_all_cases"))
                                              for n, f in fitted.items()})


if __name__ == "__main__":
    main()
