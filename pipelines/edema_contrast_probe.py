#!/usr/bin/env python
"""Issue 34 diagnosis: how bright each case's edema is after preprocessing (N4 + Nyul + z-score), per
sequence, against the normal brain, read from a training run's preprocessing cache. Cases whose edema
is only faintly hyperintense on FLAIR are the ones the network under-calls out of fold.

    .venv/bin/python pipelines/edema_contrast_probe.py runs/cv_intensity_full/fold1/run/cache \
        > benchmarks/results/cv4_intensity_full/edema_contrast_fold1cache.txt
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path, help="a train run's cache folder (one <case>/ with image/label/mask.npy each)")
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main())
