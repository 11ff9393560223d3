"""``brats-cnn demo``: the whole pipeline on synthetic phantoms, in a few minutes on a CPU.

1. write phantom cases (BraTS 2017-21 layout): training cases and one held-out case;
2. train the HGG network with the bundled ``smoke`` config (N4 + Nyul + z-score fitted on the
   training cases, class-balanced patches, rotation augmentation);
3. segment the held-out case with the trained checkpoint (post-processing included);
4. score it BraTS-style and write the HTML report.

Nothing here needs real data or a network connection; the same functions run the real pipeline
(see ``pipelines/run_brats.py``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_CONFIG = "smoke"
DEMO_SHAPE = (64, 64, 40)  # voxels of each phantom case (X, Y, Z)
DEMO_TRAIN_CASES = 4  # the last one is held out for validation by the training loop
DEMO_TEST_SEED = 1000  # seed of the held-out phantom (training cases use 0..n-1)
# --quick (the test suite's setting): small phantoms, no N4, the LGG network on a few batches. It
# checks that every stage runs and connects; its scores mean nothing.
QUICK_SHAPE = (40, 40, 12)
QUICK_OVERRIDES = ("preprocess.n4.sequences=[]", "model.architecture=lgg", "sampling.total_patches=256",
                   "sampling.validation_patches=64", "train.batch_size=32", "train.epochs=1", "train.dice_slices=2",
                   "postprocess.min_component_voxels=10")


@dataclass(frozen=True)
class DemoResult:
    data: Path
    run: Path
    segmentation: Path
    report: Path
    summary: dict
    seconds: float


def run_demo(out: Path = Path("demo_output"), device: str = "auto", quick: bool = False) -> DemoResult:
    """Run the demo into ``out`` and print where everything is.

    ``quick``: :data:`QUICK_SHAPE` phantoms and :data:`QUICK_OVERRIDES` (seconds instead of minutes).
    """
    from brats_cnn.data.phantom import write_phantom_dataset
    from brats_cnn.evaluation.evaluate import run_evaluate
    from brats_cnn.inference.segment import run_segment
    from brats_cnn.network.checkpoint import BEST_CHECKPOINT
    from brats_cnn.training.train import run_training

    start = time.perf_counter()
    out = Path(out)
    train_root, test_root = out / "data" / "train", out / "data" / "test"
    run_dir, seg_dir, report_dir = out / "run", out / "segmentations", out / "report"

    print(f"[1/4] writing {DEMO_TRAIN_CASES} training phantoms and 1 test phantom to {out / 'data'}")
    shape = QUICK_SHAPE if quick else DEMO_SHAPE
    write_phantom_dataset(train_root, DEMO_TRAIN_CASES, seed=0, shape=shape, grades=["HGG"] * DEMO_TRAIN_CASES)
    test_refs = write_phantom_dataset(test_root, 1, seed=DEMO_TEST_SEED, shape=shape, grades=["HGG"])

    print(f"[2/4] training the HGG network with the '{DEMO_CONFIG}' config into {run_dir}")
    run_training(grade="hgg", data=train_root, out=run_dir, config=DEMO_CONFIG, device=device,
                 overrides=QUICK_OVERRIDES if quick else (), resume=(run_dir / "last.pt").is_file())

    print(f"[3/4] segmenting the held-out case into {seg_dir}")
    run_segment(inputs=[test_root], model=run_dir / BEST_CHECKPOINT, grade=None, out=seg_dir, mode=None,
                device=device, save_probabilities=False, label_convention=None, overwrite=True,
                postprocess=True, overrides=[])

    print(f"[4/4] scoring against the ground truth into {report_dir}")
    summary = run_evaluate(pred=seg_dir, gt=test_root, out=report_dir)

    seconds = time.perf_counter() - start
    case_id = test_refs[0].case_id
    result = DemoResult(data=out / "data", run=run_dir, segmentation=seg_dir / f"{case_id}.nii.gz",
                        report=report_dir / "report.html", summary=summary, seconds=seconds)
    _print_result(result)
    return result


def _print_result(result: DemoResult) -> None:
    print(f"\nDemo finished in {result.seconds:.0f} s.")
    print(f"  training run (checkpoints, metrics.csv): {result.run}")
    print(f"  segmentation:                            {result.segmentation}")
    print(f"  report:                                  {result.report}")
    means = _mean_dsc(result.summary)
    if means:
        print("  DSC on the held-out phantom: " + ", ".join(f"{r} {v:.3f}" for r, v in means.items()))


def _mean_dsc(summary: dict) -> dict[str, float]:
    """Mean DSC per region over all scored cases, from an evaluation summary."""
    stats = summary.get("statistics", {}).get("all", {})
    return {region: float(stats[region]["dsc"]["mean"]) for region in ("complete", "core", "enhancing")
            if region in stats and stats[region]["dsc"].get("mean") is not None}
