"""The ``brats-cnn`` command: a thin shell over the library.

Each subcommand parses its options, imports its stage lazily (so ``brats-cnn --help`` stays fast)
and calls one function. Known errors (:class:`~brats_cnn.errors.BratsCnnError`) are printed as one
line on stderr with exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

from brats_cnn import __version__

app = typer.Typer(
    name="brats-cnn",
    help="Brain tumour segmentation with the CNN of Pereira et al. (IEEE TMI 2016), and BraTS-style scoring.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain click help: flags shown as flags, not as "<bool>"
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}
EXIT_USER_ERROR = 2

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file or bundled name (pereira_hgg, pereira_lgg, smoke).")
SetOpt = typer.Option(None, "--set", help="Override a config value, e.g. --set train.epochs=3 (repeatable).")
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA if available), cpu or cuda.")
ManifestOpt = typer.Option(None, "--manifest", help="CSV with columns case_id,grade (default: <data>/manifest.csv if present).")
StrictOpt = typer.Option(False, "--strict", help="Stop when a case cannot be used (unreadable, bad labels, too little coverage) instead of skipping it with a warning.")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"brats-cnn {__version__}")
        raise typer.Exit()


class _PrintableFormatter(logging.Formatter):
    """Log lines with non-printable characters escaped (brats_cnn.outward.printable); tracebacks as they are."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        from brats_cnn.outward import printable

        return printable(super().formatMessage(record))


@app.callback()
def _main_options(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More log output (-vv for debug logs)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    _state["debug"] = debug
    level = logging.WARNING if quiet else (logging.DEBUG if verbose >= 2 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:  # the terminal handler, not a test harness's capture
        if type(handler) is logging.StreamHandler and handler.stream is sys.stderr:
            handler.setFormatter(_PrintableFormatter("%(levelname)s %(name)s: %(message)s"))


@app.command()
def preprocess(
    data: Path = typer.Option(..., "--data", help="Dataset folder (any supported layout)."),
    out: Path = typer.Option(..., "--out", help="Output folder for the preprocessed cache."),
    fit: bool = typer.Option(False, "--fit", help="Fit the normaliser (Nyul + z-score) on these cases."),
    normaliser: Optional[Path] = typer.Option(None, "--normaliser", help="Apply a saved normaliser JSON instead of fitting."),
    config: Optional[str] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    manifest: Optional[Path] = ManifestOpt,
    workers: Optional[int] = typer.Option(None, "--workers", help="Cases processed in parallel (default from config)."),
    strict: bool = StrictOpt,
) -> None:
    """N4 bias correction, Nyul standardisation and z-scoring into a memory-mappable cache."""
    from brats_cnn.preprocessing.preprocess import run_preprocess

    run_preprocess(data=data, out=out, fit=fit, normaliser=normaliser, config=config,
                   overrides=set_ or [], manifest=manifest, workers=workers, strict=strict)


@app.command()
def train(
    grade: str = typer.Option(..., "--grade", help="hgg or lgg: which of the paper's models to train."),
    data: Path = typer.Option(..., "--data", help="Raw dataset folder, or a preprocessed cache folder."),
    out: Path = typer.Option(Path("runs/train"), "--out", help="Run folder (checkpoints, metrics, config)."),
    config: Optional[str] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    device: str = DeviceOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's last checkpoint."),
    manifest: Optional[Path] = ManifestOpt,
    strict: bool = StrictOpt,
) -> None:
    """Train the HGG or LGG network (resumable; CPU or CUDA; torchrun for several GPUs)."""
    from brats_cnn.training.train import run_training

    overrides = list(set_ or []) + (["preprocess.strict=true"] if strict else [])
    run_training(grade=grade, data=data, out=out, config=config, overrides=overrides,
                 device=device, resume=resume, manifest=manifest)


@app.command()
def segment(
    inputs: List[Path] = typer.Argument(..., metavar="CASE", help="Case(s): a 4-D case.nii.gz, a case folder, one of a case's files, or a dataset folder."),
    model: Optional[List[Path]] = typer.Option(None, "--model", "-m", help="Checkpoint file. Repeat it to average the calibrated probabilities of several models (an ensemble; the first one's decision rule and post-processing apply)."),
    grade: Optional[str] = typer.Option(None, "--grade", help="hgg or lgg: use the bundled model of that grade (with --model: the grade the checkpoint must have)."),
    out: Path = typer.Option(Path("segmentations"), "--out", "-o", help="Output file (one case) or folder."),
    mode: Optional[str] = typer.Option(None, "--mode", help="exact, fast or auto (exact on CUDA, fast on CPU)."),
    device: str = DeviceOpt,
    save_probabilities: bool = typer.Option(False, "--save-probabilities", help="Also write per-class probabilities (float32 NIfTI)."),
    label_convention: Optional[str] = typer.Option(None, "--label-convention", help="Convention of the written labels (default: the checkpoint's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Recompute cases whose output exists."),
    no_postprocess: bool = typer.Option(False, "--no-postprocess", help="Skip small-component removal."),
    no_prior_correction: bool = typer.Option(False, "--no-prior-correction", help="Use the network's class-balanced probabilities as they are (same as --set segment.prior_alpha=0)."),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="Average over the model's calibrated rotations (test-time augmentation), or not. Default (segment.tta auto): on CUDA only; on a CPU it costs 4x the time for about +0.006 Dice."),
    shard: Optional[str] = typer.Option(None, "--shard", help="K/N: segment only every N-th case from the K-th (0-based), e.g. --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; under torchrun each rank takes every WORLD_SIZE-th case by itself."),
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Segment cases with a trained model and write label-map NIfTIs."""
    from brats_cnn.inference.segment import run_segment

    overrides = list(set_ or []) + (["segment.prior_alpha=0"] if no_prior_correction else [])
    overrides += [] if tta is None else [f"segment.tta={'always' if tta else 'never'}"]
    run_segment(inputs=inputs, model=list(model) if model else None, grade=grade, out=out, mode=mode, device=device,
                save_probabilities=save_probabilities, label_convention=label_convention,
                overwrite=overwrite, postprocess=not no_postprocess, overrides=overrides, shard=shard)


@app.command()
def calibrate(
    run: Path = typer.Option(..., "--run", help="A train run folder (its last.pt lists the training and validation cases)."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Checkpoint to calibrate (default: <run>/best.pt)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Calibrated checkpoint (default: <run>/calibrated.pt; the table goes to <out>.json)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Preprocessed cache of the run's cases (default: <run>/cache)."),
    device: str = DeviceOpt,
    no_tta: bool = typer.Option(False, "--no-tta", help="Do not try test-time augmentation (4x faster)."),
    fixed: Optional[List[str]] = typer.Option(None, "--fixed", help="KEY=VALUE: write these calibration settings (segment.prior_alpha, segment.tta_rotations, segment.tta, segment.class_weights, postprocess.min_component_voxels, postprocess.keep_largest, postprocess.require_core, ...: docs/segmentation.md) into --model without a search; for a model trained without validation cases. Repeatable."),
) -> None:
    """Choose the class-prior correction, test-time augmentation and post-processing on validation cases."""
    from brats_cnn.inference.calibrate import CALIBRATED_NAME, run_calibrate, write_fixed_calibration
    from brats_cnn.network.checkpoint import LAST_CHECKPOINT

    if fixed:
        write_fixed_calibration(run, model or run / LAST_CHECKPOINT, out or run / CALIBRATED_NAME, fixed)
        return
    run_calibrate(run=run, model=model, out=out, cache=cache, device=device, tta=not no_tta)


@app.command()
def evaluate(
    pred: List[Path] = typer.Option(..., "--pred", help="Prediction file or folder; repeat it (--pred A --pred B) to compare several."),
    gt: Path = typer.Option(..., "--gt", help="Ground-truth file or dataset folder."),
    out: Path = typer.Option(Path("evaluation"), "--out", help="Report folder (metrics.csv, summary.json, report.html)."),
    label_convention: str = typer.Option("brats2017", "--label-convention", help="Convention of the ground truth."),
    pred_convention: Optional[str] = typer.Option(None, "--pred-convention", help="Convention of the predictions (default: same as ground truth)."),
    manifest: Optional[Path] = ManifestOpt,
    images: Optional[Path] = typer.Option(None, "--images", help="Folder with the cases' images for overlay figures (default: --gt)."),
    hd95: str = typer.Option("brats", "--hd95", help="HD95 definition: brats (pooled distances, as BraTS/MedPy), monai (max of the two one-way percentiles) or surfel (area-weighted surface elements, as the BraTS 2023 lesion-wise code)."),
    lesion_wise: Optional[str] = typer.Option(None, "--lesion-wise", help="Lesion-wise metrics (BraTS 2023+) with a challenge preset: gli, ssa, ped, men, met, or none (default: evaluate.lesion_wise.preset of the config, gli)."),
    lesion_dilation: Optional[int] = typer.Option(None, "--lesion-dilation", help="Override the preset's ground-truth dilation (voxels; default: evaluate.lesion_wise.dilation of the config)."),
    lesion_min_volume: Optional[float] = typer.Option(None, "--lesion-min-volume", help="Override the preset's lesion volume threshold (mm^3; lesions at or below it are ignored; default: evaluate.lesion_wise.min_volume_mm3 of the config)."),
    only_predicted: bool = typer.Option(False, "--only-predicted", help="Score only the cases that have a prediction (default: a missing one is scored as empty, as BraTS does)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config file or bundled name; its evaluate section is used (the --lesion-* flags win over it)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a config value, e.g. --set evaluate.lesion_wise.preset=met (repeatable)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Processes scoring cases in parallel (default: one per usable CPU; 1: none)."),
) -> None:
    """Score segmentations as BraTS does (DSC, PPV, sensitivity, specificity, HD95, volumes, lesion-wise DSC/HD95); compare several with repeated --pred."""
    from brats_cnn.evaluation import report
    from brats_cnn.evaluation.evaluate import run_compare, run_evaluate

    options = dict(gt=gt, out=out, label_convention=label_convention, pred_convention=pred_convention,
                   manifest=manifest, images=images, hd95_definition=hd95, lesion_wise=lesion_wise,
                   lesion_dilation=lesion_dilation, lesion_min_volume=lesion_min_volume, only_predicted=only_predicted,
                   config=config, overrides=list(set_ or []), workers=workers)
    if len(pred) > 1:
        typer.echo(report.terminal_comparison(run_compare(preds=pred, **options)))
    else:
        typer.echo(report.terminal_table(run_evaluate(pred=pred[0], **options)))
    typer.echo(f"report: {out / 'report.html'}")


@app.command()
def average(
    checkpoints: List[Path] = typer.Argument(..., metavar="CHECKPOINT", help="Two or more checkpoints of one run, e.g. copies of last.pt from the end of training."),
    out: Path = typer.Option(..., "--out", "-o", help="The averaged checkpoint (no training state or calibration: calibrate it next)."),
) -> None:
    """Average the weights of checkpoints of one run (stochastic weight averaging)."""
    from brats_cnn.network.checkpoint import run_average

    written = run_average(checkpoints, out)
    typer.echo(f"averaged {len(checkpoints)} checkpoints: {written}")


@app.command()
def benchmark(
    grade: str = typer.Option("hgg", "--grade", help="Network to time: hgg or lgg."),
    device: str = DeviceOpt,
    batch_size: int = typer.Option(128, "--batch-size", help="Patches per batch."),
    iterations: int = typer.Option(20, "--iterations", help="Timed batches (after warm-up)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Preprocessed cache (or raw dataset) to time the data pipeline too."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write results JSON here."),
    compile_network: bool = typer.Option(False, "--compile", help="Also time the configured variant under torch.compile (compiles for minutes on a CPU)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config file or bundled name (default: pereira_<grade>)."),
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Time forward and forward+backward per batch, and the training data pipeline."""
    from brats_cnn.config import load_config
    from brats_cnn.training.benchmark import run_benchmark

    settings = load_config(config or f"pereira_{grade.lower()}", list(set_ or [])) if (config or set_) else None
    run_benchmark(grade=grade, device=device, batch_size=batch_size, iterations=iterations,
                  data=data, out=out, config=settings, compile_network=compile_network)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_output"), "--out", help="Folder for everything the demo makes."),
    device: str = DeviceOpt,
    quick: bool = typer.Option(False, "--quick", help="Tiny phantoms and a few training batches: checks that every stage runs (seconds); scores mean nothing."),
) -> None:
    """Generate phantom cases, train the smoke config, segment a held-out case and write a report."""
    from brats_cnn.demo import run_demo

    run_demo(out=out, device=device, quick=quick)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app and map known errors to one line and exit code 2."""
    from brats_cnn.errors import BratsCnnError
    from brats_cnn.outward import printable

    try:
        app(args=argv, prog_name="brats-cnn")  # typer reports its own usage errors (exit 2)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BratsCnnError as exc:
        if _state["debug"]:
            raise
        print(f"brats-cnn: error: {printable(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # an output folder under a file, a full disk, no permission...
        if _state["debug"]:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"brats-cnn: error: {printable(f'{where}{exc.strerror or exc}')}", file=sys.stderr)
        return EXIT_USER_ERROR
    except MemoryError:
        if _state["debug"]:
            raise
        print("brats-cnn: error: out of memory; a whole case needs about 2.5 GB (fast mode, bf16) -- check the "
              "memory limit (ulimit -v), or lower segment.batch_size / segment.slices_per_batch", file=sys.stderr)
        return EXIT_USER_ERROR
    except ImportError as exc:  # a native library (SimpleITK, torch) that cannot be loaded, e.g. under ulimit -v
        if _state["debug"]:
            raise
        name = getattr(exc, "name", None) or "a module"
        print(f"brats-cnn: error: cannot load {name} ({printable(str(exc).splitlines()[0] if str(exc) else exc)}); "
              "a native library failed to load: check the memory limit (ulimit -v) and the installation "
              "(pip install -e .)", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("brats-cnn: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
