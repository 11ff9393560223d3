"""Benchmark of `brats-cnn segment`: speed of fast and exact mode, and their agreement.

Measures on one real BraTS volume (240x240x155):
* fast mode over the whole volume, float32 and (on CPUs with native bf16) bf16 autocast:
  seconds, brain voxels/s, achieved GFLOP/s (FLOPs counted for the work actually done);
* exact mode on a subset of voxels (a 64x64 box around the tumour centre on its central axial
  slice, plus a random sample of brain voxels): seconds per voxel, extrapolated to the whole
  brain -- exact mode on a CPU takes hours, so it is never run on a full volume here;
* agreement of fast with exact on that subset: voxel agreement (%), and Dice between the two for
  the complete/core/enhancing regions;
* peak resident memory of the process (target <= 4 GiB) and the machine load (os.getloadavg).

Prints a table and writes ``benchmarks/results/bench_segment.json`` and ``.png``.

``--command CASE...`` instead times the whole ``brats-cnn segment`` command as a user runs it (its
defaults: bundled HGG model, ``segment.tta auto``), one case per process under ``/usr/bin/time -v``:
wall, user and system seconds, minor page faults, peak RSS, and the sidecar's stage timings, on this
CPU as it is (``native``) and with oneDNN and ATen held to AVX2 (``avx2``: ``ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2``, so no bf16 and no AVX-512: an estimate of an AVX2-only machine of the same
clock). Writes ``benchmarks/results/bench_segment_command.json`` and ``.png``.

Usage:
    .venv/bin/python benchmarks/bench_segment.py --model runs/train/best.pt [--case DIR]
    .venv/bin/python benchmarks/bench_segment.py --command CASE_DIR CASE_DIR CASE_DIR [--isa native avx2]
Without ``--model`` a randomly initialised HGG network is used (agreement numbers are then not
meaningful for a trained model; the output says so).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CASE = REPO.parent / "shared" / "data" / "brats_sample" / "Brats18_CBICA_ABM_1"
RESULTS = REPO / "benchmarks" / "results"
SUBSET_SLICE_OFFSETS = (0,)  # axial slices of the exact-mode subset, around the tumour centre
SUBSET_HALF_BOX = 32  # in-plane half size of the subset box around the tumour centre (CPU time)
RANDOM_BRAIN_VOXELS = 1500  # extra exact-mode voxels sampled over the whole brain


def conv_flops(network) -> tuple[float, float]:
    """(FLOPs per output pixel of the dense feature stack, FLOPs per voxel of the FC layers)."""
    import torch

    features = sum(2 * m.weight.numel() for m in network.features if isinstance(m, torch.nn.Conv2d))
    classifier = sum(2 * m.weight.numel() for m in network.classifier if isinstance(m, torch.nn.Linear))
    return float(features), float(classifier)


def fast_mode_flops(network, mask: np.ndarray, slices_per_batch: int) -> float:
    """FLOPs predict_fast spends: dense features on every crop, FC layers at brain voxels."""
    from brats_cnn.inference.predict import _slice_groups

    per_pixel, per_voxel = conv_flops(network)
    half = network.patch_size // 2
    pixels = sum(len(group) * (xr.stop - xr.start + 2 * half) * (yr.stop - yr.start + 2 * half)
                 for group, xr, yr in _slice_groups(mask, slices_per_batch))
    return pixels * per_pixel + int(mask.sum()) * per_voxel


def exact_subset(mask: np.ndarray, tumour: np.ndarray, seed: int = 0) -> np.ndarray:
    """Brain voxels in a box around the tumour centre on a few slices, plus a random brain sample."""
    subset = np.zeros_like(mask)
    xs, ys, zs = np.nonzero(tumour if tumour.any() else mask)
    cx, cy, centre = (int(np.median(a)) for a in (xs, ys, zs))
    x0, x1 = max(cx - SUBSET_HALF_BOX, 0), cx + SUBSET_HALF_BOX
    y0, y1 = max(cy - SUBSET_HALF_BOX, 0), cy + SUBSET_HALF_BOX
    for offset in SUBSET_SLICE_OFFSETS:
        z = int(np.clip(centre + offset, 0, mask.shape[2] - 1))
        subset[x0:x1, y0:y1, z] = mask[x0:x1, y0:y1, z]
    brain = np.flatnonzero(mask)
    rng = np.random.default_rng(seed)
    subset.flat[rng.choice(brain, size=min(RANDOM_BRAIN_VOXELS, brain.size), replace=False)] = True
    return subset


def agreement(fast: np.ndarray, exact: np.ndarray, where: np.ndarray, convention: str) -> dict:
    """Voxel agreement (%) and fast-vs-exact Dice per region over the voxels ``where``."""
    from brats_cnn.data.labels import from_class_indices, region_masks
    from brats_cnn.evaluation.metrics import dice

    a = from_class_indices(fast.argmax(0), convention)
    b = from_class_indices(exact.argmax(0), convention)
    result = {"voxels": int(where.sum()), "voxel_agreement_pct": float(100 * (a[where] == b[where]).mean())}
    ra, rb = region_masks(a, convention), region_masks(b, convention)
    for region in ra:
        result[f"dice_{region}"] = float(dice(rb[region] & where, ra[region] & where))
    result["max_abs_probability_difference"] = float(np.abs(fast[:, where] - exact[:, where]).max())
    return result


def main() -> None:
    import torch

    from brats_cnn.config import default_config
    from brats_cnn.data.io import load_case
    from brats_cnn.network.model import FLOPS_PER_HGG_PATCH, PereiraCNN
    from brats_cnn.network.checkpoint import load_checkpoint
    from brats_cnn.preprocessing.normalise import brain_mask
    from brats_cnn.device import Compute, cpu_has_native_bf16
    from brats_cnn.inference.predict import predict_exact, predict_fast

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: random HGG network)")
    parser.add_argument("--case", type=Path, default=DEFAULT_CASE)
    parser.add_argument("--skip-fp32", action="store_true", help="time fast mode in bf16 only")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_segment.json")
    args = parser.parse_args()

    threads = torch.get_num_threads()
    case = load_case(args.case, load_label=False)
    t0 = time.perf_counter()
    if args.model is not None:
        from brats_cnn.preprocessing.normalise import normalise_case

        checkpoint = load_checkpoint(args.model)
        network, config, convention = checkpoint.network, checkpoint.config, checkpoint.label_convention
        image, mask = normalise_case(case, checkpoint.normaliser, config.preprocess)
        model_note = f"checkpoint {args.model} (epoch {checkpoint.epoch})"
    else:  # per-sequence z-score only: enough for timing, not for meaningful agreement
        config, convention = default_config("hgg"), "brats2017"
        torch.manual_seed(0)
        network = PereiraCNN("hgg", 4).eval()
        mask = brain_mask(case.image)
        brain = case.image[:, mask]
        image = np.zeros_like(case.image)
        image[:, mask] = (brain - brain.mean(1, keepdims=True)) / brain.std(1, keepdims=True)
        model_note = "randomly initialised HGG network (agreement not representative of a trained model)"
    normalise_s = time.perf_counter() - t0
    background = config.preprocess.background_value
    from brats_cnn.config import SegmentConfig

    spb, batch = SegmentConfig().slices_per_batch, SegmentConfig().batch_size  # what segment runs (RUNTIME_KEYS)
    brain_voxels = int(mask.sum())
    rows = []
    results: dict = {"case": str(args.case), "shape": list(mask.shape), "brain_voxels": brain_voxels,
                     "model": model_note, "torch_threads": threads, "normalise_s": normalise_s,
                     "cpu_native_bf16": cpu_has_native_bf16(), "device": "cpu", "runs": {}}
    flops = fast_mode_flops(network, mask, spb)

    fast = {}
    for name, bf16 in (("fast_fp32", False), ("fast_bf16", True)):
        if (name == "fast_fp32" and args.skip_fp32) or (bf16 and not cpu_has_native_bf16()):
            continue
        load_before = os.getloadavg()
        start = time.perf_counter()
        compute = Compute(torch.device("cpu"), bf16=bf16, channels_last=True)
        fast[name] = predict_fast(network, image, mask, batch_size=batch, compute=compute,
                                  background_value=background, slices_per_batch=spb, progress=True)
        seconds = time.perf_counter() - start
        results["runs"][name] = {"seconds": seconds, "voxels_per_s": brain_voxels / seconds,
                                 "gflops_per_s": flops / seconds / 1e9, "flops": flops,
                                 "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
        rows.append((name, seconds, brain_voxels / seconds, flops / seconds / 1e9, "measured, whole volume"))

    reference = next(iter(fast.values()))
    tumour = reference.argmax(0) > 0
    subset = exact_subset(mask, tumour)
    exact_runs = {}
    for name, compute in (("exact_fp32", Compute(torch.device("cpu"), bf16=False, channels_last=False)),
                          ("exact_bf16_cl", Compute(torch.device("cpu"), bf16=True, channels_last=True))):
        if compute.bf16 and not cpu_has_native_bf16():
            continue
        load_before = os.getloadavg()
        start = time.perf_counter()
        exact_runs[name] = predict_exact(network, image, subset, batch_size=batch, compute=compute,
                                         background_value=background, progress=True)
        seconds = time.perf_counter() - start
        per_voxel = seconds / subset.sum()
        results["runs"][name] = {
            "subset_voxels": int(subset.sum()), "subset_seconds": seconds,
            "seconds_extrapolated_to_brain": per_voxel * brain_voxels, "voxels_per_s": 1 / per_voxel,
            "gflops_per_s": FLOPS_PER_HGG_PATCH / per_voxel / 1e9 if network.architecture == "hgg" else None,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
        rows.append((name, per_voxel * brain_voxels, 1 / per_voxel,
                     results["runs"][name]["gflops_per_s"] or float("nan"),
                     f"extrapolated from {int(subset.sum())} voxels"))
    exact = exact_runs["exact_fp32"]
    fast.update({name: p for name, p in exact_runs.items() if name != "exact_fp32"})
    results["agreement_with_exact"] = {name: agreement(p, exact, subset, convention) for name, p in fast.items()}
    results["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    results["loadavg_end"] = os.getloadavg()

    print(f"\ncase {args.case.name}: {brain_voxels} brain voxels; model: {model_note}; "
          f"{threads} torch threads; load {os.getloadavg()[0]:.1f}")
    print(f"{'mode':<12}{'s/volume':>12}{'voxels/s':>12}{'GFLOP/s':>10}  note")
    for name, sec, vps, gf, note in rows:
        print(f"{name:<12}{sec:>12.1f}{vps:>12.0f}{gf:>10.1f}  {note}")
    for name, agree in results["agreement_with_exact"].items():
        print(f"{name} vs exact on {agree['voxels']} voxels: agreement {agree['voxel_agreement_pct']:.2f}%, "
              f"Dice complete/core/enh {agree['dice_complete']:.4f}/{agree['dice_core']:.4f}/"
              f"{agree['dice_enhancing']:.4f}")
    print(f"peak RSS {results['peak_rss_gib']:.2f} GiB")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh([r[0] for r in rows], [r[1] for r in rows], color=["tab:red" if r[0].startswith("exact") else "tab:blue" for r in rows])
    ax.set_xscale("log")
    ax.set_xlabel(f"seconds per volume (CPU, {threads} threads, load {results['loadavg_end'][0]:.1f})")
    ax.set_title("brats-cnn segment: fast (measured) vs exact (extrapolated)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


ISA_ENV = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}


def _time_v(stderr: str) -> dict:
    """The fields of ``/usr/bin/time -v`` this benchmark reports."""
    fields = {"User time (seconds)": "user_s", "System time (seconds)": "system_s",
              "Minor (reclaiming a frame) page faults": "minor_faults", "Maximum resident set size (kbytes)": "rss_kb",
              "Elapsed (wall clock) time (h:mm:ss or m:ss)": "wall"}
    out = {}
    for line in stderr.splitlines():
        key, _, value = line.strip().rpartition(": ")
        if key in fields:
            out[fields[key]] = value
    minutes, _, seconds = out.pop("wall").rpartition(":")
    out["wall_s"] = float(seconds) + 60 * sum(float(p) * 60 ** i for i, p in enumerate(reversed(minutes.split(":"))) if p)
    for key in ("user_s", "system_s"):
        out[key] = float(out[key])
    out["minor_faults"], out["peak_rss_gb"] = int(out["minor_faults"]), int(out.pop("rss_kb")) / 1e6
    return out


def command_benchmark(cases: list[Path], isas: list[str], out: Path, extra: list[str]) -> None:
    """Time ``brats-cnn segment CASE`` (defaults) per case and CPU mode; table, JSON and PNG."""
    import os
    import platform
    import subprocess
    import sys
    import tempfile

    flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0] if Path("/proc/cpuinfo").exists() else ""
    kind = ("AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags
            else "AVX2" if "avx2" in flags else "other")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for isa in isas:
            for case in cases:
                target = Path(scratch) / f"{isa}_{case.name}.nii.gz"
                load = os.getloadavg()[0]
                result = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "brats_cnn.cli", "segment",
                                         str(case), "--out", str(target), "--device", "cpu", *extra],
                                        capture_output=True, text=True, env={**os.environ, **ISA_ENV[isa]})
                if result.returncode != 0:
                    raise SystemExit(f"segment failed on {case}: {result.stderr[-500:]}")
                sidecar = json.loads(target.with_name(target.name.replace(".nii.gz", ".json")).read_text())
                row = {"isa": isa, "case": case.name, "load_before": round(load, 2), **_time_v(result.stderr),
                       "precision": sidecar["precision"], "tta_rotations": sidecar["tta_rotations"],
                       "stages_s": sidecar["timings_s"]}
                row["system_share"] = row["system_s"] / row["user_s"]
                rows.append(row)
                print(f"{isa:6s} {case.name:24s} wall {row['wall_s']:6.1f} s  user {row['user_s']:6.1f}  "
                      f"sys {row['system_s']:5.1f} ({100 * row['system_share']:.0f} %)  faults {row['minor_faults']:>9,}  "
                      f"RSS {row['peak_rss_gb']:.2f} GB  {row['precision']}  predict {row['stages_s']['predict']:.1f} s  "
                      f"load {load:.2f}", flush=True)
    summary = {isa: {"mean_wall_s": float(np.mean([r["wall_s"] for r in rows if r["isa"] == isa])),
                     "max_wall_s": float(np.max([r["wall_s"] for r in rows if r["isa"] == isa])),
                     "mean_system_share": float(np.mean([r["system_share"] for r in rows if r["isa"] == isa]))}
               for isa in isas}
    for isa, figures in summary.items():
        print(f"{isa}: mean {figures['mean_wall_s']:.1f} s per case (max {figures['max_wall_s']:.1f} s), "
              f"system time {100 * figures['mean_system_share']:.0f} % of user time")
    document = {"cpu": platform.processor() or platform.machine(), "cpu_kind": kind, "threads": os.cpu_count(),
                "command": "brats-cnn segment CASE --out X --device cpu " + " ".join(extra), "rows": rows,
                "summary": summary}
    out.write_text(json.dumps(document, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    labels = [f"{r['isa']}\n{r['case'].replace('Brats18_', '')}" for r in rows]
    stages = ["load", "normalise", "predict", "postprocess", "write"]
    bottom = np.zeros(len(rows))
    for stage in stages:
        values = np.array([r["stages_s"].get(stage, 0.0) for r in rows])
        ax.bar(labels, values, bottom=bottom, label=stage)
        bottom += values
    ax.scatter(labels, [r["wall_s"] for r in rows], color="k", marker="_", s=300, label="whole command")
    ax.axhline(60, color="grey", ls="--", lw=0.8)
    ax.set_ylabel("seconds per case")
    ax.set_title(f"brats-cnn segment (defaults) on a 2-core {kind} CPU")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    import sys

    if "--command" in sys.argv:
        parser = argparse.ArgumentParser(description="time the whole segment command per case")
        parser.add_argument("--command", type=Path, nargs="+", required=True, metavar="CASE")
        parser.add_argument("--isa", nargs="+", choices=sorted(ISA_ENV), default=["native", "avx2"])
        parser.add_argument("--set", dest="extra", action="append", default=[], help="extra segment argument")
        parser.add_argument("--out", type=Path, default=RESULTS / "bench_segment_command.json")
        args = parser.parse_args()
        command_benchmark(args.command, args.isa, args.out, args.extra)
    else:
        main()
