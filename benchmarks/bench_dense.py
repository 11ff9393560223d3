"""Patch vs dense training: labelled voxels per second of one train step, and of the dense data pipeline.

Both steps are ``brats_cnn.training.train.train_step`` on the HGG network with the configured precision and
memory format (``device.compute_settings``): a patch batch labels one voxel per 33x33 patch, a dense
batch of ``--crops`` crops labels ``crop_size**2`` voxels each (``brats_cnn.network.dense.DenseNetwork``).

    .venv/bin/python benchmarks/bench_dense.py --device cpu --data runs/hgg_v3/cache

Writes ``benchmarks/results/bench_dense_<device>.json`` and ``.png``. Write the load average beside
the figures you quote. Benchmarks measure; tests check.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=128, help="patches per patch batch")
    parser.add_argument("--crops", type=int, default=4, help="crops per dense batch")
    parser.add_argument("--crop-size", type=int, default=65, help="labelled voxels per crop side")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--data", type=Path, default=None, help="preprocessed cache for the dense pipeline")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()

    import numpy as np
    import torch

    from brats_cnn.training.benchmark import time_batches
    from brats_cnn.config import load_config
    from brats_cnn.device import compute_settings, resolve_device
    from brats_cnn.fsutil import atomic_path, write_json_atomic
    from brats_cnn.network.dense import DenseNetwork
    from brats_cnn.network.model import build_network
    from brats_cnn.training.train import train_step

    config = load_config("pereira_hgg")
    compute = compute_settings(resolve_device(args.device), config.compute)
    side = args.crop_size + config.sampling.patch_size - 1
    patch = config.sampling.patch_size
    shapes = {"patch": ((args.batch_size, 4, patch, patch), (args.batch_size,)),
              "dense": ((args.crops, 4, side, side), (args.crops, args.crop_size, args.crop_size))}
    result = {"device": str(compute.device), "precision": compute.precision, "channels_last": compute.channels_last,
              "threads": torch.get_num_threads(), "load_average_before": os.getloadavg()}
    for mode, (input_shape, label_shape) in shapes.items():
        torch.manual_seed(0)
        network = build_network(config.model, 4, patch_size=patch)
        compute.network(network)
        model = DenseNetwork(network).train() if mode == "dense" else network.train()
        optimiser = torch.optim.SGD(network.parameters(), lr=1e-4, momentum=0.9, nesterov=True)
        inputs = compute.batch(torch.randn(input_shape))
        labels = compute.batch(torch.randint(0, 4, label_shape))
        seconds = time_batches(lambda: train_step(model, optimiser, inputs, labels, compute), args.iterations,
                               compute.device)
        labelled = int(np.prod(label_shape))
        result[mode] = {"seconds_per_step": float(seconds.mean()), "sd_s": float(seconds.std(ddof=1)),
                        "labelled_per_step": labelled, "labelled_per_s": labelled / float(seconds.mean())}
        print(f"{mode:5s}: {seconds.mean():.3f} s/step, {labelled} labels/step, "
              f"{labelled / seconds.mean():,.0f} labelled voxels/s")
    if args.data is not None:
        from brats_cnn.data.labels import get_convention
        from brats_cnn.preprocessing.cache import list_cached_cases
        from brats_cnn.training.sampling import CENTRE_STREAM, SlabBatches, make_rng, sample_balanced_centres
        from brats_cnn.preprocessing.cache import cases_label_mask

        folders = list_cached_cases(args.data)
        centres = sample_balanced_centres(cases_label_mask(folders), args.crops * args.iterations,
                                          get_convention(config.data.label_convention).num_classes,
                                          make_rng(0, CENTRE_STREAM))
        slabs = SlabBatches(folders, centres, crop_size=args.crop_size, batch_size=args.crops,
                            patch_size=33, background=config.preprocess.background_value,
                            rotation_angles=config.sampling.rotation_angles)
        batch = iter(range(len(slabs)))
        seconds = time_batches(lambda: slabs[next(batch) % len(slabs)], args.iterations - 1, compute.device,
                               warmup=1)
        result["dense_pipeline"] = {"seconds_per_batch": float(seconds.mean()),
                                    "share_of_step": float(seconds.mean()) / result["dense"]["seconds_per_step"]}
        print(f"dense data pipeline: {seconds.mean() * 1000:.0f} ms per batch of {args.crops} crops "
              f"({result['dense_pipeline']['share_of_step']:.1%} of the step, one worker)")
    result["load_average_after"] = os.getloadavg()
    result["dense_over_patch"] = result["dense"]["labelled_per_s"] / result["patch"]["labelled_per_s"]
    print(f"dense / patch labelled voxels per second: {result['dense_over_patch']:.1f}x "
          f"(load average {result['load_average_before'][0]:.2f} -> {result['load_average_after'][0]:.2f})")
    device = result["device"].split(":")[0]
    write_json_atomic(args.out_dir / f"bench_dense_{device}.json", result)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    bars = ax.bar(["patch (33x33)", f"dense ({args.crop_size}x{args.crop_size} crops)"],
                  [result["patch"]["labelled_per_s"], result["dense"]["labelled_per_s"]], color=["C0", "C2"])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("labelled voxels / s (train step)")
    ax.set_title(f"HGG network, {result['precision']}, {device}, load {result['load_average_before'][0]:.1f}")
    fig.tight_layout()
    with atomic_path(args.out_dir / f"bench_dense_{device}.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)


if __name__ == "__main__":
    main()
