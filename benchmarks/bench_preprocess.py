"""Benchmark of stages 1-3 on one real BraTS case: N4 (shrunk and full resolution), Nyul, z-score,
the whole ``brats-cnn preprocess`` of one case, and peak memory.

Prints a table and writes ``benchmarks/results/preprocess.json`` and ``preprocess.png``.
Full-resolution N4 takes minutes; it runs once and later runs reuse its numbers unless
``--full-n4`` is given. Every timing is stored with ``os.getloadavg()`` (2 shared cores here).

    .venv/bin/python benchmarks/bench_preprocess.py [--case Brats18_CBICA_ABM_1] [--full-n4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "brats_sample"
RESULTS = REPO / "benchmarks" / "results"
SHRUNK_N4_STEP = "N4 T1 only, shrink 4 (field at full res)"
FULL_N4_STEP = "N4 T1 only, full resolution (shrink 1)"
CROSS_CHECK_CASES = ("Brats18_CBICA_ABM_1", "Brats18_TCIA10_637_1", "Brats18_2013_3_1")


def timed(label: str, rows: list, function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    seconds = time.perf_counter() - started
    load = os.getloadavg()
    rows.append({"step": label, "seconds": round(seconds, 3), "loadavg_1_5_15": [round(v, 2) for v in load]})
    print(f"{label:<48} {seconds:9.2f} s   load {load[0]:.2f}", flush=True)
    return result


def n4_full_vs_shrunk(case, mask, config, rows: list) -> dict:
    """Full-resolution vs shrunk N4 on T1: times and the relative voxel difference inside the brain."""
    from brats_cnn.preprocessing.normalise import n4_correct

    t1 = case.image[0]
    shrunk = timed(SHRUNK_N4_STEP, rows, n4_correct, t1, mask, config.preprocess.n4, spacing=case.spacing)
    full = timed(FULL_N4_STEP, rows, n4_correct, t1, mask, config.preprocess.n4,
                 spacing=case.spacing, shrink_factor=1)
    inside = mask & (t1 > 0)
    relative = np.abs(shrunk[inside] - full[inside]) / full[inside]
    # N4 fixes the field only up to a global factor, which Nyul removes anyway: compare shapes too
    scaled_shrunk = shrunk[inside] / np.median(shrunk[inside])
    scaled_full = full[inside] / np.median(full[inside])
    relative_scaled = np.abs(scaled_shrunk - scaled_full) / scaled_full
    log_full, log_shrunk = np.log(t1[inside] / full[inside]), np.log(t1[inside] / shrunk[inside])
    field_full, field_shrunk = t1[inside] / full[inside], t1[inside] / shrunk[inside]
    z = int(np.argmax(inside.sum(axis=(0, 1))))
    slice_rel = np.zeros(t1.shape[:2], np.float32)
    on_slice = inside[:, :, z]
    a = shrunk[:, :, z][on_slice] / np.median(shrunk[inside])
    b = full[:, :, z][on_slice] / np.median(full[inside])
    slice_rel[on_slice] = np.abs(a - b) / b
    np.save(RESULTS / "n4_relative_difference_slice.npy", slice_rel)
    return {
        "sequence": "t1",
        "relative_difference_median": float(np.median(relative)),
        "relative_difference_p95": float(np.percentile(relative, 95)),
        "relative_difference_max": float(relative.max()),
        "scale_matched_relative_difference_median": float(np.median(relative_scaled)),
        "scale_matched_relative_difference_p95": float(np.percentile(relative_scaled, 95)),
        "scale_matched_relative_difference_max": float(relative_scaled.max()),
        "log_field_correlation": float(np.corrcoef(log_full, log_shrunk)[0, 1]),
        "field_range_full": [float(field_full.min()), float(field_full.max())],
        "field_range_shrunk": [float(field_shrunk.min()), float(field_shrunk.max())],
        "slice_z": z,
    }


def torchio_agreement() -> dict | None:
    """Our Nyul vs TorchIO's HistogramStandardization on T1 of three real cases (brain = T1 > 0)."""
    try:
        import torch
        import torchio as tio
    except ImportError:
        return None
    import nibabel as nib

    from brats_cnn.config import NyulConfig
    from brats_cnn.preprocessing.nyul import apply_nyul, fit_nyul

    paths = [SAMPLE / c / f"{c}_t1.nii.gz" for c in CROSS_CHECK_CASES]
    images = [np.asarray(nib.load(p).dataobj, dtype=np.float32) for p in paths]
    masks = [im > 0 for im in images]
    ours = fit_nyul(images, masks, NyulConfig())
    theirs = tio.HistogramStandardization.train(paths, cutoff=(0.01, 0.99), masking_function=lambda t: t > 0,
                                                progress=False)
    theirs_11 = theirs[[0, 1, 2, 4, 5, 6, 7, 8, 10, 11, 12]]
    out = {"landmarks_max_abs_difference": float(np.max(np.abs(np.array(ours.landmarks) - theirs_11))),
           "per_case": {}}
    transform = tio.HistogramStandardization({"t1": theirs}, masking_method=lambda t: t > 0)
    for case_id, image, mask in zip(CROSS_CHECK_CASES, images, masks):
        subject = tio.Subject(t1=tio.ScalarImage(tensor=torch.from_numpy(image)[None], affine=np.eye(4)))
        theirs_out = transform(subject)["t1"].data[0].numpy()
        difference = np.abs(apply_nyul(image, mask, ours)[mask] - theirs_out[mask])
        out["per_case"][case_id] = {"max_abs": float(difference.max()), "median_abs": float(np.median(difference)),
                                    "p99_abs": float(np.percentile(difference, 99))}
    return out


def whole_preprocess(case_dir: Path, rows: list) -> dict:
    """``brats-cnn preprocess --fit`` and ``--normaliser`` of one case in a fresh process (peak RSS)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("fit", "apply"):
            args = ["--fit"] if mode == "fit" else ["--normaliser", str(Path(tmp) / "fit" / "normaliser.json")]
            command = [sys.executable, "-c",
                       "import resource, sys; from brats_cnn.cli import main; code = main(sys.argv[1:]); "
                       "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)",
                       "preprocess", "--data", str(case_dir), "--out", str(Path(tmp) / mode), "--workers", "1",
                       *args]
            started = time.perf_counter()
            done = timed(f"whole preprocess, one case ({mode}, new process)", rows, subprocess.run, command,
                         capture_output=True, text=True, cwd=REPO)
            if done.returncode != 0:
                raise SystemExit(f"preprocess failed: {done.stderr.strip()}")
            wall = time.perf_counter() - started
            summary = json.loads((Path(tmp) / mode / "preprocess.json").read_text())
            meta = json.loads((Path(tmp) / mode / case_dir.name / "meta.json").read_text())
            rss_kb = int(done.stdout.split("MAXRSS_KB")[1].split()[0])
            out[mode] = {"process_wall_seconds": round(wall, 2), "preprocess_seconds": summary["seconds"],
                         "write_pass_seconds": meta["seconds"], "peak_rss_mb": round(rss_kb / 1024, 1),
                         "cache_mb": round(sum(f.stat().st_size for f in (Path(tmp) / mode / case_dir.name).iterdir())
                                           / 2**20, 1)}
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["timings"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.6, 1]})
    labels = [r["step"] for r in rows]
    axes[0].barh(labels, [r["seconds"] for r in rows], color="tab:blue")
    axes[0].set_xscale("log")
    axes[0].invert_yaxis()
    axes[0].set_xlabel("seconds (log scale)")
    axes[0].set_title(f"Preprocessing one BraTS case ({results['case']}), 2 shared CPU cores")
    for i, r in enumerate(rows):
        axes[0].text(r["seconds"], i, f" {r['seconds']:.2f}", va="center", fontsize=8)
    slice_file = RESULTS / "n4_relative_difference_slice.npy"
    if slice_file.is_file():
        image = axes[1].imshow(np.load(slice_file).T, cmap="magma", origin="lower", vmin=0, vmax=0.05)
        fig.colorbar(image, ax=axes[1], label="|shrunk - full| / full, each scaled by its brain median")
        n4 = results.get("n4_full_vs_shrunk", {})
        median = n4.get("scale_matched_relative_difference_median", n4.get("relative_difference_median", 0))
        axes[1].set_title(f"N4 shrink 4 vs full res (T1)\nscale-matched, median {median:.2%}", fontsize=9)
        axes[1].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="Brats18_CBICA_ABM_1")
    parser.add_argument("--full-n4", action="store_true", help="rerun full-resolution N4 (minutes)")
    parser.add_argument("--full-n4-only", action="store_true",
                        help="only rerun the full vs shrunk N4 comparison; keep the other numbers")
    args = parser.parse_args()

    from brats_cnn.config import default_config
    from brats_cnn.data.io import load_case
    from brats_cnn.preprocessing.nyul import apply_nyul
    from brats_cnn.preprocessing.normalise import brain_mask, case_statistics, standardise_image, state_from_statistics, zscore
    from brats_cnn.preprocessing.bias import correct_bias

    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / "preprocess.json"
    previous = json.loads(json_path.read_text()) if json_path.is_file() else {}
    config = default_config("hgg")
    case_dir = SAMPLE / args.case
    rows: list = []
    print(f"{'step':<48} {'time':>11}", flush=True)

    case = timed("load case (4 NIfTI + label)", rows, load_case, case_dir)
    mask = timed("brain mask", rows, brain_mask, case.image)
    if args.full_n4_only:
        n4_rows: list = []
        previous["n4_full_vs_shrunk"] = n4_full_vs_shrunk(case, mask, config, n4_rows)
        previous["timings"] = [r for r in previous["timings"] if r["step"] not in (FULL_N4_STEP, SHRUNK_N4_STEP)]
        previous["timings"] += n4_rows
        json_path.write_text(json.dumps(previous, indent=2) + "\n")
        plot(previous, RESULTS / "preprocess.png")
        print(json.dumps(previous["n4_full_vs_shrunk"], indent=2))
        return
    timed("N4 T1 + T1c (shrink 4, full-res field)", rows, correct_bias, case.image, mask, config.preprocess.n4,
          spacing=case.spacing)
    stats = timed("fit statistics of one case (N4 + landmarks)", rows, case_statistics, case, config.preprocess)
    state = state_from_statistics([stats], config.preprocess)
    corrected = correct_bias(case.image, mask, config.preprocess.n4, spacing=case.spacing)
    standardised = timed("Nyul apply_nyul, 4 sequences, whole volume", rows, lambda: [
        apply_nyul(corrected[c], mask, state.nyul_standard(n)) for c, n in enumerate(state.channel_order)])
    timed("z-score, 4 sequences", rows, lambda: [
        zscore(standardised[c], mask, state.mean[n], state.std[n]) for c, n in enumerate(state.channel_order)])
    timed("Nyul + z-score as in the pipeline (brain voxels)", rows, standardise_image, corrected, mask, state,
          config.preprocess.background_value)

    if args.full_n4 or "n4_full_vs_shrunk" not in previous:
        n4 = n4_full_vs_shrunk(case, mask, config, rows)
    else:
        n4 = previous["n4_full_vs_shrunk"]
        rows += [r for r in previous["timings"] if r["step"] in (FULL_N4_STEP, SHRUNK_N4_STEP)]
        print("(full-resolution N4 numbers reused from the previous run; --full-n4 reruns it)")

    whole = whole_preprocess(case_dir, rows)
    agreement = torchio_agreement()
    results = {
        "case": args.case, "shape": list(case.image.shape), "brain_voxels": int(mask.sum()),
        "cpu_count": os.cpu_count(), "n4": {"iterations": list(config.preprocess.n4.iterations),
                                            "shrink_factor": config.preprocess.n4.shrink_factor},
        "timings": rows, "n4_full_vs_shrunk": n4, "whole_preprocess": whole,
        "peak_rss_benchmark_process_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torchio_nyul_agreement": agreement,
    }
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / "preprocess.png")
    print(json.dumps({k: results[k] for k in ("n4_full_vs_shrunk", "whole_preprocess", "torchio_nyul_agreement")},
                     indent=2))
    print(f"wrote {json_path} and {RESULTS / 'preprocess.png'}")


if __name__ == "__main__":
    main()
