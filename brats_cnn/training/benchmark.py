"""The ``brats-cnn benchmark`` command: training throughput of the network and of the data pipeline.

Timings, each after a warm-up, as mean +- sd seconds per batch:

* ``forward``: inference forward pass (eval mode, no autograd) on a batch already on the device;
* ``train_step``: forward + backward + SGD step on a batch already on the device (model-only rate);
  both for every precision (float32, bf16 where native) and memory format (NCHW, channels_last),
  so the speed-up of bf16 + channels_last is always measured side by side in one run;
* ``pipeline``: with the configured precision and layout (``compute``), the real training path: ``PatchBatches`` from a preprocessed cache through a
  ``DataLoader`` (workers, pinned memory), host-to-device copy, forward + backward + step.

``pipeline_ratio`` = pipeline patches/s / model-only train-step patches/s (target >= 0.9: the data
pipeline should not starve the device). Achieved GFLOP/s uses 357.5 MFLOP per HGG patch forward
(SPEC), the LGG figure computed from the layer shapes, and x3 for forward + backward.
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from brats_cnn.config import Config, check_grade, load_config
from brats_cnn.errors import ConfigError
from brats_cnn.network.model import build_network, input_side

log = logging.getLogger(__name__)

WARMUP_ITERATIONS = 3  # untimed batches before each measurement (allocator, cuDNN autotune, workers)
BACKWARD_FLOP_FACTOR = 3  # forward + backward ~ 3x the forward FLOPs (SPEC)
PHANTOM_SHAPE = (96, 96, 48)  # (X, Y, Z) of the phantom cases timed when no --data is given
PHANTOM_CASES = 2


def forward_flops(network: torch.nn.Module, patch_size: int | None = None) -> int:
    """FLOPs (multiply-adds x 2) of one patch's forward pass through the convolutions and FC layers
    (``patch_size``: default the network's own; 357,686,272 for the HGG network on 33x33, SPEC's
    "about 357.5 MFLOP").

    Counted from the layer shapes with forward hooks on one ``(1, C, P, P)`` patch; activations,
    pooling and biases are not counted.
    """
    patch_size = patch_size or getattr(network, "input_size", network.patch_size)
    total = 0

    def count(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += 2 * output.numel() * per_output
        else:
            total += 2 * module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in network.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    first = next(m for m in network.modules() if isinstance(m, torch.nn.Conv2d))
    was_training = network.training
    try:
        with torch.no_grad():
            network.eval()(torch.zeros(1, first.in_channels, patch_size, patch_size,
                                       device=next(network.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
        network.train(was_training)  # the caller's module is left as it was
    return total


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batches(run_batch: Callable[[], Any], iterations: int, device: torch.device,
                 warmup: int = WARMUP_ITERATIONS) -> np.ndarray:
    """``(iterations,)`` float64 seconds per call of ``run_batch`` (device-synchronised), after a warm-up."""
    for _ in range(warmup):
        run_batch()
    _synchronise(device)
    seconds = np.empty(iterations)
    for i in range(iterations):
        start = time.perf_counter()
        run_batch()
        _synchronise(device)
        seconds[i] = time.perf_counter() - start
    return seconds


def _summary(seconds: np.ndarray, batch_size: int, flops_per_batch: float) -> dict:
    mean = float(seconds.mean())
    return {"mean_s": mean, "sd_s": float(seconds.std(ddof=1)) if seconds.size > 1 else 0.0,
            "patches_per_s": batch_size / mean, "gflops_per_s": flops_per_batch / mean / 1e9,
            "iterations": int(seconds.size)}


def _phantom_cache(root: Path, config: Config) -> Path:
    """A small preprocessed cache of phantom cases (N4 off: it is not what is timed)."""
    from brats_cnn.config import config_from_dict, config_to_dict
    from brats_cnn.data.phantom import write_phantom_dataset
    from brats_cnn.preprocessing.preprocess import preprocess_dataset

    raw = root / "raw"
    write_phantom_dataset(raw, PHANTOM_CASES, grades=[config.grade.upper()] * PHANTOM_CASES, shape=PHANTOM_SHAPE)
    values = config_to_dict(config)
    values["preprocess"]["n4"]["sequences"] = []
    preprocess_dataset(raw, root / "cache", config=config_from_dict(values), fit=True)
    return root / "cache"


def _cache_of(data: Path, root: Path, config: Config) -> Path:
    """``data`` if it is a cache, else a raw dataset preprocessed into ``root/cache``."""
    from brats_cnn.preprocessing.cache import is_cache
    from brats_cnn.preprocessing.preprocess import preprocess_dataset

    if is_cache(data):
        return data
    preprocess_dataset(data, root / "cache", config=config, fit=True)
    return root / "cache"


def _pipeline_batches(cache: Path, config: Config, batch_size: int, batches: int):
    """A ``PatchBatches`` dataset of ``batches`` training batches drawn from every case of the cache."""
    from brats_cnn.data.labels import get_convention
    from brats_cnn.preprocessing.cache import cases_label_mask, list_cached_cases
    from brats_cnn.training.sampling import CENTRE_STREAM, PatchBatches, make_rng, sample_balanced_centres

    folders = list_cached_cases(cache)
    num_classes = get_convention(config.data.label_convention).num_classes
    centres = sample_balanced_centres(cases_label_mask(folders), batch_size * batches, num_classes,
                                      make_rng(config.train.seed, CENTRE_STREAM))
    return PatchBatches(folders, centres, batch_size=batch_size, patch_size=input_side(config),
                        background=config.preprocess.background_value,
                        rotation_angles=config.sampling.rotation_angles,
                        arbitrary_rotation=config.sampling.arbitrary_rotation, seed=config.train.seed)


def _variants(device: torch.device, configured: Any) -> dict[str, Any]:
    """The precision x memory-format combinations timed side by side (bf16 only where it is native)."""
    from brats_cnn.device import Compute, has_native_bf16

    bf16_ok = has_native_bf16(device)
    variants = {}
    for bf16 in (False, True):
        for channels_last in (False, True):
            if bf16 and not bf16_ok:
                continue
            name = f"{'bf16' if bf16 else 'float32'}_{'channels_last' if channels_last else 'nchw'}"
            variants[name] = Compute(device, bf16=bf16, channels_last=channels_last)
    variants["configured"] = configured
    return variants


def run_benchmark(grade: str = "hgg", device: str = "auto", batch_size: int = 128, iterations: int = 20,
                  data: Path | None = None, out: Path | None = None, config: Config | None = None,
                  compile_network: bool = False) -> dict:
    """Time the network in every precision and memory format, and the training pipeline; print a table.

    The forward pass and the train step (:func:`brats_cnn.training.train.train_step`) are timed for float32
    and bf16 (where native), NCHW and channels_last, each on a fresh copy of the same initial
    network; the full pipeline (``PatchBatches`` -> ``DataLoader`` -> train step) runs with the
    precision and layout the config selects (``compute``), which ``train`` uses too.

    Args:
        grade: ``hgg`` or ``lgg`` network (bundled ``pereira_<grade>`` config unless ``config``).
        device: ``auto``, ``cpu`` or ``cuda``.
        batch_size: patches per batch.
        iterations: timed batches per measurement (after :data:`WARMUP_ITERATIONS`).
        data: a preprocessed cache or raw dataset for the pipeline timing; default: phantom cases.
        out: JSON file to write.
        compile_network: also time the configured variant under ``torch.compile`` (variant
            ``configured_compiled``; the compilation happens in the warm-up batches and is reported
            as ``compile_seconds``), which ``train.compile`` would use.

    Returns:
        The results dict (also what the JSON holds): ``variants`` maps each variant name to its
        ``forward`` and ``train_step`` rows; top-level ``forward``/``train_step`` are the configured
        variant's; ``speedup_vs_float32_nchw`` compares train steps.
    """
    import copy

    from brats_cnn.data.labels import get_convention
    from brats_cnn.device import compute_settings, resolve_device
    from brats_cnn.training.train import build_optimiser, loader_workers, make_loader, train_step

    grade = check_grade(grade)
    if batch_size < 1 or iterations < 2:
        raise ConfigError(f"--batch-size must be >= 1 and --iterations >= 2, got {batch_size} and {iterations}")
    config = config or load_config(f"pereira_{grade}")
    device_ = resolve_device(device)
    configured = compute_settings(device_, config.compute)
    load_before = os.getloadavg()
    torch.manual_seed(config.train.seed)
    initial = build_network(config.model, get_convention(config.data.label_convention).num_classes,
                            patch_size=config.sampling.patch_size)
    side = input_side(config)  # the patches it reads (wider with a context pathway)
    flops = forward_flops(initial, side)
    flops_per_patch = float(flops)  # counted for this network and patch size (357.5 MFLOP: HGG, 33x33)
    host_patches = torch.randn(batch_size, 4, side, side)
    host_labels = torch.randint(0, initial.num_classes, (batch_size,))

    def setup(compute: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        network = compute.network(copy.deepcopy(initial))
        return network, build_optimiser(network, config.train)

    to_time = _variants(device_, configured)
    if compile_network:
        to_time["configured_compiled"] = configured
    variants: dict[str, dict] = {}
    for name, compute in to_time.items():
        network, optimiser = setup(compute)
        patches, labels = compute.batch(host_patches), compute.batch(host_labels)
        compile_seconds = None
        if name == "configured_compiled":
            network, started = torch.compile(network), time.perf_counter()
            train_step(network, optimiser, patches, labels, compute, config.train)  # compiles forward + backward
            network.eval()
            with torch.inference_mode(), compute.autocast():
                network(patches)  # and the inference graph
            compile_seconds = time.perf_counter() - started

        def forward() -> None:
            with torch.inference_mode(), compute.autocast():
                network(patches)

        network.eval()
        forward_s = time_batches(forward, iterations, device_)
        network.train()
        step_s = time_batches(lambda: train_step(network, optimiser, patches, labels, compute, config.train),
                              iterations, device_)
        variants[name] = {
            "precision": compute.precision, "channels_last": compute.channels_last,
            "forward": _summary(forward_s, batch_size, flops_per_patch * batch_size),
            "train_step": _summary(step_s, batch_size, BACKWARD_FLOP_FACTOR * flops_per_patch * batch_size)}
        if compile_seconds is not None:
            variants[name]["compile_seconds"] = round(compile_seconds, 1)

    network, optimiser = setup(configured)
    with tempfile.TemporaryDirectory(prefix="brats-cnn-bench-") as tmp:
        cache = _cache_of(Path(data), Path(tmp), config) if data else _phantom_cache(Path(tmp), config)
        dataset = _pipeline_batches(cache, config, batch_size, iterations + WARMUP_ITERATIONS)
        batches = iter(make_loader(dataset, config, device_, seed=config.train.seed))

        def pipeline_step() -> None:
            batch, target = next(batches)
            train_step(network, optimiser, configured.batch(batch), configured.batch(target), configured,
                       config.train)

        pipeline_s = time_batches(pipeline_step, len(dataset) - WARMUP_ITERATIONS, device_)

    baseline = variants["float32_nchw"]["train_step"]["patches_per_s"]
    results = {
        "grade": grade, "architecture": config.model.architecture, "device": str(device_),
        "device_name": torch.cuda.get_device_name(device_) if device_.type == "cuda" else platform.processor()
        or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "precision": configured.precision, "channels_last": configured.channels_last,
        "batch_size": batch_size, "num_workers": loader_workers(config.train.num_workers, device_),
        "flops_per_patch_forward": flops_per_patch, "flops_per_patch_forward_counted": flops,
        "variants": variants,
        "forward": variants["configured"]["forward"],
        "train_step": variants["configured"]["train_step"],
        "pipeline": _summary(pipeline_s, batch_size, BACKWARD_FLOP_FACTOR * flops_per_patch * batch_size),
        "speedup_vs_float32_nchw": {name: row["train_step"]["patches_per_s"] / baseline
                                    for name, row in variants.items()},
        "data": str(data) if data else f"phantom x{PHANTOM_CASES} {PHANTOM_SHAPE}",
        "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
    }
    results["pipeline_ratio"] = results["pipeline"]["patches_per_s"] / results["train_step"]["patches_per_s"]
    print(format_table(results))
    if out is not None:
        from brats_cnn.fsutil import write_json_atomic

        write_json_atomic(out, results)
    return results


def format_table(results: dict) -> str:
    """A plain-text table of :func:`run_benchmark` results."""
    lines = [f"brats-cnn benchmark: {results['grade'].upper()} network on {results['device']} "
             f"({results['device_name']}), batch {results['batch_size']}, {results['threads']} threads, "
             f"load {results['loadavg_before'][0]:.2f} -> {results['loadavg_after'][0]:.2f}",
             f"{'variant':<24}{'measurement':<12}{'ms/batch':>16}{'patches/s':>11}{'GFLOP/s':>9}{'vs fp32':>9}"]

    def row(variant: str, name: str, values: dict, speedup: str = "") -> str:
        return (f"{variant:<24}{name:<12}{values['mean_s'] * 1e3:>9.1f} +- {values['sd_s'] * 1e3:<5.1f}"
                f"{values['patches_per_s']:>10.0f}{values['gflops_per_s']:>9.1f}{speedup:>9}")

    for variant, values in results["variants"].items():
        label = f"configured ({results['precision']}{', CL' if results['channels_last'] else ''})" \
            if variant == "configured" else "configured, compiled" if variant == "configured_compiled" else variant
        lines.append(row(label, "forward", values["forward"]))
        lines.append(row("", "train_step", values["train_step"],
                         f"{results['speedup_vs_float32_nchw'][variant]:.2f}x"))
    lines.append(row("configured", "pipeline", results["pipeline"]))
    lines.append(f"pipeline / model-only rate: {results['pipeline_ratio']:.1%} (target >= 90%)")
    return "\n".join(lines)
