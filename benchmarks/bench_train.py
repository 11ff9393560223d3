"""Training-throughput benchmark: calls ``brats_cnn.training.benchmark.run_benchmark`` per network and saves
JSON + a bar chart (patches/s of forward, train step and the full data pipeline).

    .venv/bin/python benchmarks/bench_train.py --device cpu --batch-size 32 --iterations 5
    .venv/bin/python benchmarks/bench_train.py --device cuda --batch-size 128 --iterations 50

Writes ``benchmarks/results/bench_train_<device>.json`` and ``.png``. Benchmarks measure; tests check.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--grades", nargs="+", default=["hgg", "lgg"])
    parser.add_argument("--data", type=Path, default=None, help="preprocessed cache (default: phantom cases)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()

    from brats_cnn.training.benchmark import run_benchmark
    from brats_cnn.fsutil import atomic_path, write_json_atomic

    runs = [run_benchmark(grade, args.device, args.batch_size, args.iterations, args.data)
            for grade in args.grades]
    device = runs[0]["device"].split(":")[0]
    write_json_atomic(args.out_dir / f"bench_train_{device}.json", runs)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ("forward", "train_step", "pipeline")
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        rates = [run[n]["patches_per_s"] for n in names]
        errors = [run[n]["patches_per_s"] * run[n]["sd_s"] / run[n]["mean_s"] for n in names]
        bars = ax.bar([k + i * width for k in range(len(names))], rates, width, yerr=errors, capsize=3,
                      label=f"{run['grade'].upper()} (pipeline/model {run['pipeline_ratio']:.0%})")
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([k + width * (len(runs) - 1) / 2 for k in range(len(names))],
                  ["forward", "forward+backward+step", "DataLoader + step"])
    ax.set_ylabel("patches / s")
    ax.set_title(f"{runs[0]['device']} ({runs[0]['device_name']}), batch {runs[0]['batch_size']}, "
                 f"load {runs[0]['loadavg_before'][0]:.1f}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(args.out_dir / f"bench_train_{device}.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    print(json.dumps({r["grade"]: round(r["pipeline_ratio"], 3) for r in runs}))


if __name__ == "__main__":
    main()
