#!/usr/bin/env python
"""Issue 34 diagnosis: how bright each case's edema is after preprocessing (N4 + Nyul + z-score), per
sequence, against the normal brain, read from a training run's preprocessing cache. Cases whose edema
is only faintly hyperintense on FLAIR are the ones the network under-calls out of fold.

    .venv/bin/python pipelines/edema_contrast_probe.py runs/cv_intensity_full/fold1/run/cache \
        > benchmarks/results/cv4_intensity_full/edema_contrast_fold1cache.txt

With ``--separability``: per case and sequence, how well one voxel's value separates edema from the
normal brain (the area under the ROC curve, 0.5 = not at all) for the value itself and for its
difference to the mirrored voxel of the other hemisphere (left-right about the brain's centre): would
a symmetry input (the contralateral difference) show faint edema better than the intensity does?

    .venv/bin/python pipelines/edema_contrast_probe.py --separability runs/cv_intensity_planes_full/fold0/run/cache \
        runs/cv_intensity_planes_full/fold1/run/cache > benchmarks/results/cv4_intensity_planes/edema_symmetry_auc.txt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def edema_class(cache: Path) -> int:
    """The class index of edema in the cache's label maps, from the label convention the cache was built with."""
    from brats_cnn.config import load_config
    from brats_cnn.data.labels import get_convention

    return get_convention(load_config(cache / "config.yaml").data.label_convention).tissues.index("edema")


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of ``positive`` against ``negative`` values (Mann-Whitney U, ties halved)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([positive, negative]))
    return float((ranks[:len(positive)].sum() - len(positive) * (len(positive) + 1) / 2) / (len(positive) * len(negative)))


def mirror_index(mask: np.ndarray) -> np.ndarray:
    """For each X index of ``(Z, X, Y)`` arrays, its mirror about the centre of the brain's X extent
    (clipped to the volume): the left-right mirror of BraTS volumes, whose X axis is left-right."""
    xs = np.flatnonzero(mask.any(axis=(0, 2)))
    return np.clip(xs[0] + xs[-1] - np.arange(mask.shape[1]), 0, mask.shape[1] - 1)


def separability(case: Path, edema_index: int, channels: int, rng: np.random.Generator, samples: int = 100_000) -> list[str]:
    """Per channel, "AUC of the value / AUC of the value minus its mirror" for edema against normal brain."""
    image = np.load(case / "image.npy", mmap_mode="r")
    label, mask = np.load(case / "label.npy"), np.load(case / "mask.npy")
    brain = np.flatnonzero((mask & (label == 0)).ravel())
    edema = np.flatnonzero((label == edema_index).ravel())
    brain = rng.choice(brain, min(len(brain), samples), replace=False)
    edema = rng.choice(edema, min(len(edema), samples // 2), replace=False)
    mirror = mirror_index(mask)
    out = []
    for channel in range(channels):
        values = np.asarray(image[:, channel], dtype=np.float32)
        contrast = (values - values[:, mirror, :]).ravel()
        values = values.ravel()
        out.append(f"{auc(values[edema], values[brain]):.3f}/{auc(contrast[edema], contrast[brain]):.3f}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path, nargs="+",
                        help="a train run's cache folder (one <case>/ with image/label/mask.npy each); with "
                             "--separability several, each case once")
    parser.add_argument("--separability", action="store_true",
                        help="AUC of each value and of its difference to the mirrored voxel, edema against normal brain")
    args = parser.parse_args(argv)
    if args.separability:
        return separability_table(args.cache)
    args.cache = args.cache[0]
    cases = sorted(p for p in args.cache.iterdir() if (p / "meta.json").is_file())
    if not cases:
        raise SystemExit(f"{args.cache}: no cached cases (<case>/meta.json)")
    edema_index = edema_class(args.cache)
    print("case  edema_voxels  " + "  ".join(f"{s}:brain/edema" for s in json.loads(
        (cases[0] / "meta.json").read_text())["channel_order"]) + "   (medians, standardised units)")
    for case in cases:
        meta = json.loads((case / "meta.json").read_text())
        if meta["array_layout"] != "ZCXY":
            raise SystemExit(f"{case / 'meta.json'}: array_layout {meta['array_layout']}, expected ZCXY")
        image = np.load(case / "image.npy", mmap_mode="r")
        label, mask = np.load(case / "label.npy"), np.load(case / "mask.npy")
        brain, edema = mask & (label == 0), label == edema_index
        medians = []
        for channel in range(image.shape[1]):
            values = np.asarray(image[:, channel], dtype=np.float32)
            medians.append(f"{np.median(values[brain]):5.2f}/{np.median(values[edema]):5.2f}")
        print(f"{meta['case_id']}  {int(edema.sum())}  " + "  ".join(medians))
    return 0


def separability_table(caches: list[Path]) -> int:
    seen, rng = set(), np.random.default_rng(0)
    header = None
    for cache in caches:
        edema_index = edema_class(cache)
        for case in sorted(p for p in cache.iterdir() if (p / "meta.json").is_file() and p.name not in seen):
            seen.add(case.name)
            meta = json.loads((case / "meta.json").read_text())
            if header is None:
                header = "case  " + "  ".join(f"{s}:value/mirror-difference" for s in meta["channel_order"])
                print(header + "   (AUC, edema against normal brain)")
            print(f"{meta['case_id']}  " + "  ".join(separability(case, edema_index, len(meta["channel_order"]), rng)),
                  flush=True)
    if not seen:
        raise SystemExit(f"{', '.join(map(str, caches))}: no cached cases (<case>/meta.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
