#!/usr/bin/env python
"""Mean Dice over a grid of prior-correction exponents, from probabilities ``segment`` saved with the
correction off: how the ``--grade lgg`` exponent was chosen on the two dev LGG cases.

    .venv/bin/brats-cnn segment CASE... --model brats_cnn/weights/hgg.pt --out runs/lgg_dev \
        --save-probabilities --no-postprocess --set segment.prior_alpha=0 --set "segment.tta_rotations=[0]"
    .venv/bin/python pipelines/alpha_grid.py --model brats_cnn/weights/hgg.pt --probabilities runs/lgg_dev CASE...

Each alpha is applied with the model's training class frequencies, then its decision rule and the
paper's post-processing (the model's ``postprocess`` config, no keep-largest), as ``calibrate`` scores
its table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="+", type=Path, help="case folders with a _seg label map")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--probabilities", type=Path, required=True,
                        help="folder of <case>_probabilities.nii.gz written by segment at alpha 0")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    args = parser.parse_args()

    import nibabel as nib

    from brats_cnn.inference.calibrate import score_settings
    from brats_cnn.data.layouts import find_case
    from brats_cnn.data.io import load_case
    from brats_cnn.data.labels import to_class_indices
    from brats_cnn.network.checkpoint import load_checkpoint
    from brats_cnn.inference.members import prior_frequencies

    checkpoint = load_checkpoint(args.model)
    convention = checkpoint.label_convention
    probabilities, truths = [], []
    for folder in args.cases:
        ref = find_case(folder)
        path = args.probabilities / f"{ref.case_id}_probabilities.nii.gz"
        if not path.is_file():
            raise SystemExit(f"{path}: no saved probabilities for {ref.case_id} (run segment --save-probabilities)")
        truths.append(to_class_indices(load_case(ref, load_label=True).label, convention))
        probabilities.append(np.moveaxis(np.asarray(nib.load(path).dataobj, dtype=np.float32), -1, 0))
    masks = [np.ones(t.shape, dtype=bool) for t in truths]  # only the adapted prior (not tried) reads them
    choices = score_settings({"none": probabilities}, truths, masks, np.asarray(prior_frequencies(checkpoint, args.model)),
                             checkpoint.config.postprocess, convention, alphas=args.alphas,
                             decisions=(checkpoint.config.segment.decision,), adapts=(False,))
    for choice in (c for c in choices if not c.keep_largest):
        dice = choice.dice
        print(f"alpha {choice.alpha:.1f}: complete {dice['complete']:.3f} core {dice['core']:.3f} "
              f"enhancing {dice['enhancing']:.3f} mean {choice.score:.3f}")


if __name__ == "__main__":
    main()
