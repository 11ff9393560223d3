"""Fast vs exact mode: Dice against the ground truth on the same axial slices of real cases.

Exact mode (every brain voxel classified from its own 33x33 patch, as in training) takes about
38 min per volume on a 2-core CPU with native bf16, so it runs here on every ``--every``-th axial
slice of the brain (offset 0, chosen without looking at the labels or predictions); fast mode
runs on the whole volume and is scored on the same slices and on the whole volume. Both use the
checkpoint's prior correction; TTA and post-processing are off (post-processing removes 3-D
components, which a slice sample cannot judge), so the figures compare the two modes, not the
bundled setting. The network is 2-D (axial patches), so a slice's exact-mode output does not
depend on the other slices: the sample gives each mode's Dice over those slices exactly.

Per case and on the mean: Dice complete / core / enhancing of each mode on the sample (from the
summed overlap counts of the sampled slices), the voxel agreement of the two, seconds, and the
machine load; and a simulated refinement (fast mode, then exact mode only where fast mode's top-2
probability margin is below a threshold), computed on the sample from the two modes' outputs.
Writes ``<out>.json`` and ``<out>.png``.

Usage:
    .venv/bin/python benchmarks/fast_vs_exact.py --model brats_cnn/weights/hgg.pt \\
        --every 10 ../shared/data/brats_sample/Brats18_CBICA_ABM_1 ...
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
RESULTS = REPO / "benchmarks" / "results"
REGIONS = ("complete", "core", "enhancing")
# fast-mode top-2 margins below which the refinement simulation takes exact mode's label
REFINE_MARGINS = (0.05, 0.1, 0.2, 0.3, 0.5)


def sampled_slices(mask: np.ndarray, every: int) -> np.ndarray:
    """Every ``every``-th axial slice that holds brain, as a boolean mask of the volume's shape."""
    brain_slices = np.flatnonzero(mask.any(axis=(0, 1)))[::every]
    chosen = np.zeros(mask.shape, dtype=bool)
    chosen[:, :, brain_slices] = True
    return chosen & mask


def region_dice(labels: np.ndarray, truth: np.ndarray, where: np.ndarray, convention: str) -> dict:
    """Dice per region over the voxels ``where`` (labels and truth in ``convention``'s values)."""
    from brats_cnn.data.labels import region_masks
    from brats_cnn.evaluation.metrics import dice

    predicted, reference = region_masks(labels, convention), region_masks(truth, convention)
    return {region: float(dice(reference[region] & where, predicted[region] & where)) for region in REGIONS}


def corrected(probabilities: np.ndarray, mask: np.ndarray, checkpoint, config) -> np.ndarray:
    """The probabilities after the checkpoint's prior correction."""
    from brats_cnn.inference.prior import correct_class_prior
    from brats_cnn.inference.members import prior_frequencies

    if config.segment.prior_alpha > 0:
        probabilities, _ = correct_class_prior(probabilities, mask, prior_frequencies(checkpoint, "the checkpoint"),
                                               config.segment.prior_alpha, config.segment.prior_adapt)
    return probabilities


def labels_of(probabilities: np.ndarray, checkpoint, config) -> np.ndarray:
    """Label values (the checkpoint's convention) of prior-corrected probabilities."""
    from brats_cnn.data.labels import classify, from_class_indices

    return from_class_indices(classify(probabilities, checkpoint.label_convention, config.segment.decision),
                              checkpoint.label_convention)


def top2_margin(probabilities: np.ndarray) -> np.ndarray:
    """Per voxel, the most probable class's probability minus the second's (0: a tie)."""
    top = np.sort(probabilities, axis=0)[-2:]
    return top[1] - top[0]


def refined(labels: dict, margin: np.ndarray, truth: np.ndarray, sample: np.ndarray, convention: str) -> list[dict]:
    """A fast pass refined by exact mode where fast mode is unsure, simulated on the sample: exact mode's
    label where the fast top-2 margin is below each threshold, fast mode's elsewhere."""
    rows = []
    for threshold in REFINE_MARGINS:
        pick = sample & (margin < threshold)
        hybrid = np.where(pick, labels["exact"], labels["fast"])
        rows.append({"margin": threshold, "refined_pct": float(100 * pick.sum() / sample.sum()),
                     "dice_on_sample": region_dice(hybrid, truth, sample, convention)})
    return rows


def one_case(folder: Path, checkpoint, config, device, every: int) -> dict:
    from brats_cnn.data.io import load_case
    from brats_cnn.data.labels import convert_labels
    from brats_cnn.preprocessing.normalise import normalise_case
    from brats_cnn.data.resample import needs_resampling
    from brats_cnn.inference.members import reorder_channels
    from brats_cnn.inference.predict import predict

    case = load_case(folder, load_label=True)
    if needs_resampling(case.spacing):
        raise SystemExit(f"{folder}: spacing {case.spacing} is not 1 mm; this benchmark scores on the input grid")
    image, mask = normalise_case(case, checkpoint.normaliser, config.preprocess)
    image = reorder_channels(image, checkpoint.channel_order)
    convention = checkpoint.label_convention
    truth = convert_labels(case.label, "brats2017", convention) if convention != "brats2017" else case.label
    sample = sampled_slices(mask, every)
    row = {"case": case.case_id, "brain_voxels": int(mask.sum()), "sampled_voxels": int(sample.sum()),
           "sampled_slices": int(sample.any(axis=(0, 1)).sum()), "loadavg_before": os.getloadavg()}
    labels = {}
    for mode, where in (("fast", mask), ("exact", sample)):
        start = time.perf_counter()
        probabilities = predict(checkpoint.network, image, where, mode, device, config)
        row[f"{mode}_seconds"] = time.perf_counter() - start
        probabilities = corrected(probabilities, where, checkpoint, config)
        labels[mode] = labels_of(probabilities, checkpoint, config)
        row[f"{mode}_dice_on_sample"] = region_dice(labels[mode], truth, sample, convention)
        if mode == "fast":
            margin = top2_margin(probabilities)
    row["fast_dice_whole_volume"] = region_dice(labels["fast"], truth, mask, convention)
    row["voxel_agreement_pct"] = float(100 * (labels["fast"][sample] == labels["exact"][sample]).mean())
    row["refined"] = refined(labels, margin, truth, sample, convention)
    row["loadavg_after"] = os.getloadavg()
    return row


def main(argv: list[str] | None = None) -> int:
    import torch

    from brats_cnn.config import config_to_dict, load_config
    from brats_cnn.device import compute_settings
    from brats_cnn.network.checkpoint import load_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", type=Path, nargs="+", help="case folders with a _seg label map")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--every", type=int, default=10, help="exact mode on every N-th brain slice")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "fast_vs_exact")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    checkpoint = load_checkpoint(args.model, map_location=device)
    config = load_config(None, ["segment.tta_rotations=[0]"], base=config_to_dict(checkpoint.config))
    rows = []
    for folder in args.cases:
        rows.append(one_case(folder, checkpoint, config, device, args.every))
        r = rows[-1]
        print(f"{r['case']}: {r['sampled_slices']} slices, {r['sampled_voxels']} voxels; exact "
              + " / ".join(f"{r['exact_dice_on_sample'][g]:.3f}" for g in REGIONS) + "  fast "
              + " / ".join(f"{r['fast_dice_on_sample'][g]:.3f}" for g in REGIONS)
              + f"  agreement {r['voxel_agreement_pct']:.2f}%  exact {r['exact_seconds']:.0f} s, "
              f"fast {r['fast_seconds']:.0f} s, load {r['loadavg_after'][0]:.1f}", flush=True)
    mean = {key: {g: float(np.mean([r[key][g] for r in rows])) for g in REGIONS}
            for key in ("exact_dice_on_sample", "fast_dice_on_sample", "fast_dice_whole_volume")}
    print("mean: exact " + " / ".join(f"{mean['exact_dice_on_sample'][g]:.3f}" for g in REGIONS)
          + "  fast " + " / ".join(f"{mean['fast_dice_on_sample'][g]:.3f}" for g in REGIONS)
          + "  fast, whole volume " + " / ".join(f"{mean['fast_dice_whole_volume'][g]:.3f}" for g in REGIONS))
    for index, threshold in enumerate(REFINE_MARGINS):
        share = np.mean([r["refined"][index]["refined_pct"] for r in rows])
        dice = {g: float(np.mean([r["refined"][index]["dice_on_sample"][g] for r in rows])) for g in REGIONS}
        mean.setdefault("refined", []).append({"margin": threshold, "refined_pct": float(share), "dice_on_sample": dice})
        print(f"fast refined by exact where the margin < {threshold}: {share:.1f} % of the sample, "
              + " / ".join(f"{dice[g]:.3f}" for g in REGIONS))
    results = {"model": str(args.model), "every": args.every, "device": str(device),
               "precision": compute_settings(device, config.compute).precision,
               "prior_alpha": config.segment.prior_alpha, "tta_rotations": [0], "postprocess": False,
               "torch_threads": torch.get_num_threads(), "cases": rows, "mean": mean,
               "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    x = np.arange(len(REGIONS))
    for offset, (key, name) in zip((-0.2, 0.2), (("exact_dice_on_sample", "exact"), ("fast_dice_on_sample", "fast"))):
        ax.bar(x + offset, [mean[key][g] for g in REGIONS], width=0.4, label=name)
    ax.set_xticks(x, REGIONS)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean Dice on sampled slices")
    ax.set_title(f"fast vs exact mode, {len(rows)} case(s), every {args.every}th slice")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
