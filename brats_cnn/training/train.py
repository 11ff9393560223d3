"""Training (SPEC step 7): the ``brats-cnn train`` command and one readable training loop.

:func:`run_training` reads top to bottom: :func:`setup_run` resolves the config, device and precision
(``device.compute_settings``), joins the DDP process group when launched by torchrun, prepares the
data (preprocess a raw dataset into ``<out>/cache`` with a normaliser fitted on the training cases
only, or use an existing cache), splits off whole validation cases, builds the network and the SGD +
Nesterov optimiser and restores a checkpoint when resuming; then :func:`train_epoch` runs every
remaining epoch: :func:`train_step` per batch with a learning rate decayed linearly per iteration,
:func:`record_validation` at the end of each epoch and every ``train.validate_every_steps`` steps,
:func:`save_last` after each validation and at least every ``train.checkpoint_minutes``.

Run folder::

    <out>/config.yaml      resolved config
    <out>/cache/           preprocessed cache (only when --data is a raw dataset)
    <out>/metrics.csv      one row per validation (also metrics.json)
    <out>/steps.csv        training loss of every iteration (rank 0's batch slice under DDP)
    <out>/last.pt          checkpoint with the resume state (also in the middle of an epoch)
    <out>/best.pt          checkpoint of the best validation score so far

``train.mode: dense`` trains the same network through :class:`brats_cnn.network.dense.DenseNetwork` on
axial crops (:class:`brats_cnn.training.sampling.SlabBatches`, every brain voxel of a crop labelled, class
weights ``dense.class_weight_power``); everything else above is shared with patch training.
``train.init_weights`` starts a new run from a checkpoint's weights.

Determinism: every random draw is derived from ``(train.seed, stream, epoch, ...)``: centres,
the per-epoch order, the augmentation of every batch, and the torch RNG (dropout) reseeded at the
start of each epoch and saved in every checkpoint. A run resumed from ``last.pt``, also from the
middle of an epoch, therefore reproduces the uninterrupted run exactly on the CPU, whatever
``train.num_workers`` is (see docs/training.md for the GPU).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from brats_cnn import progress_wanted
from brats_cnn.config import Config, check_grade, save_config
from brats_cnn.data.labels import REGIONS, get_convention
from brats_cnn.device import Compute, compute_settings, resolve_device
from brats_cnn.errors import BratsCnnError, ConfigError, InputError
from brats_cnn.inference.calibrate import region_mean
from brats_cnn.inference.prior import class_frequencies
from brats_cnn.network.checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT, save_checkpoint, unwrap_network
from brats_cnn.network.dense import DenseNetwork
from brats_cnn.network.model import build_network, check_patch_size, freeze_for, input_side
from brats_cnn.preprocessing.cache import cases_label_mask
from brats_cnn.training.distributed import Distributed, all_ranks_agree, init_distributed
from brats_cnn.training.loss import dense_class_weights, loss_function
from brats_cnn.training.resume import RunState, initial_weights, load_run_config, restore_rng, restore_state, rng_states
from brats_cnn.training.sampling import (
    CENTRE_SAMPLERS,
    CENTRE_STREAM,
    IGNORE_LABEL,
    VALIDATION_STREAM,
    PatchBatches,
    SlabBatches,
    make_rng,
    sample_balanced_centres,
)
from brats_cnn.training.validation import (
    evaluate_patches,
    json_float,
    mean_dice,
    validation_dice,
    write_metrics,
    write_step_losses,
)

log = logging.getLogger(__name__)

SPLIT_STREAM = 11   # random streams of this module (see sampling.make_rng)
TORCH_STREAM = 12
PROGRESS_INTERVAL = 20  # iterations between progress-bar updates (each one syncs the device)
PREFETCH_BATCHES = 4  # batches each DataLoader worker prepares ahead (keeps a GPU fed)
CUDA_LOADER_WORKERS = 4  # DataLoader workers of ``train.num_workers: null`` on CUDA (at most the core count)


# ---- small pure helpers --------------------------------------------------------------------------

def learning_rate(step: int, total_steps: int, start: float, end: float) -> float:
    """Linear decay per iteration: ``start`` at step 0, ``end`` at the last step ``total_steps - 1``."""
    if total_steps <= 1:
        return start
    return start + (end - start) * min(step, total_steps - 1) / (total_steps - 1)


def split_cases(case_ids: Sequence[str], n_validation: int, seed: int) -> tuple[list[str], list[str]]:
    """Hold out ``n_validation`` whole cases, chosen by ``seed``; returns sorted (train, validation) ids."""
    ids = sorted(case_ids)
    if n_validation < 0 or n_validation >= len(ids):
        raise ConfigError(f"data.validation_cases={n_validation} leaves no training case "
                          f"({len(ids)} case(s) of this grade)")
    held = set(make_rng(seed, SPLIT_STREAM).permutation(ids)[:n_validation].tolist())
    return [c for c in ids if c not in held], [c for c in ids if c in held]


def torch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the torch RNG (dropout) for one epoch of one process."""
    return int(make_rng(seed, TORCH_STREAM, epoch, rank).integers(2**62))


# ---- data ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainingData:
    """The cache folders of the split and the normaliser that made them."""

    cache: Path
    train_dirs: tuple[Path, ...]
    validation_dirs: tuple[Path, ...]
    normaliser: Any


def _grade_of(folder: Path, grades: dict[str, str]) -> str | None:
    from brats_cnn.preprocessing.cache import load_cached_case

    return grades.get(folder.name) or load_cached_case(folder).grade


def _keep_grade(ids_and_grades: list[tuple[str, str | None]], grade: str, source: Path) -> list[str]:
    """Case ids of ``grade`` when grades are known; all ids (logged) when none is."""
    if all(g is None for _, g in ids_and_grades):
        log.warning("no grades known for %s (no manifest); training on all %d case(s)", source, len(ids_and_grades))
        return [c for c, _ in ids_and_grades]
    kept = [c for c, g in ids_and_grades if g is not None and g.lower() == grade]
    if not kept:
        raise InputError(f"no {grade.upper()} case found (grades come from the manifest)", source)
    return kept


def prepare_data(data: Path, out: Path, config: Config, grade: str, manifest: Path | None,
                 dist: Distributed) -> TrainingData:
    """Use ``data`` as a cache, or preprocess the raw dataset into ``<out>/cache`` (rank 0 only).

    With a raw dataset the normaliser is fitted on the training cases only; the validation cases are
    written with it. An existing ``<out>/cache`` is reused when up to date (``--resume``). Cases that
    preprocessing skips as unusable are left out of both splits (one warning line lists them).
    """
    from brats_cnn.data.layouts import list_cases, read_manifest
    from brats_cnn.preprocessing import preprocess
    from brats_cnn.preprocessing.cache import NORMALISER_FILE, is_cache, list_cached_cases
    from brats_cnn.preprocessing.normalise import load_normaliser

    data = Path(data)
    if not data.exists():
        raise InputError("training data folder not found", data)
    if is_cache(data):
        cache = data
        grades = read_manifest(manifest) if manifest else {}
        folders = {p.name: p for p in list_cached_cases(cache)}
        ids = _keep_grade([(name, _grade_of(p, grades)) for name, p in folders.items()], grade, data)
        train_ids, val_ids = split_cases(ids, config.data.validation_cases, config.train.seed)
    else:
        cache = out / "cache"
        refs = list_cases(data, manifest=manifest)
        ids = _keep_grade([(r.case_id, r.grade) for r in refs], grade, data)
        train_ids, val_ids = split_cases(ids, config.data.validation_cases, config.train.seed)
        if dist.is_main:  # skips unusable cases with a warning each (or stops: preprocess.strict / --strict)
            kept = [r for r in refs if r.case_id in set(ids)]
            preprocess.preprocess_dataset(kept, cache, config=config, fit=True, fit_case_ids=train_ids)
        dist.barrier()
        written = {p.name for p in list_cached_cases(cache)}
        unusable = [c for c in ids if c not in written]
        if unusable:
            log.warning("training without %d unusable case(s): %s", len(unusable), ", ".join(unusable))
        train_ids, val_ids = [c for c in train_ids if c in written], [c for c in val_ids if c in written]
        if not train_ids:
            raise InputError("no usable training case left (see the warnings above)", data)
    log.info("training cases: %s; validation cases: %s", ", ".join(train_ids), ", ".join(val_ids) or "none")
    return TrainingData(cache, tuple(cache / c for c in train_ids), tuple(cache / c for c in val_ids),
                        load_normaliser(cache / NORMALISER_FILE))


def loader_workers(num_workers: int | None, device: torch.device) -> int:
    """DataLoader workers for ``train.num_workers``: the number itself, or for None (auto) 0 on the CPU and
    ``min(CUDA_LOADER_WORKERS, cores)`` on CUDA.

    On the CPU, extraction and augmentation cost about 1 ms per batch against hundreds of milliseconds
    of compute, and worker processes only take cores from the training threads (2-core CPU, HGG, bf16:
    the full pipeline ran at 88% of the model-only step with 2 workers, at 94-113% with 0;
    docs/training.md). On a GPU the workers keep the device fed.
    """
    if num_workers is not None:
        return num_workers
    return min(CUDA_LOADER_WORKERS, os.cpu_count() or 1) if device.type == "cuda" else 0


def make_loader(dataset: PatchBatches, config: Config, device: torch.device, seed: int,
                start: int = 0) -> torch.utils.data.DataLoader:
    """Batches ``start, start + 1, ...`` of ``dataset``, whole; workers only run extraction/augmentation.

    ``start > 0`` continues an epoch after a mid-epoch checkpoint (the batches are the same as in the
    uninterrupted run: each is a pure function of its index).
    """
    workers = loader_workers(config.train.num_workers, device)
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(start, len(dataset)), num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False, prefetch_factor=PREFETCH_BATCHES if workers else None,
        generator=torch.Generator().manual_seed(seed))  # leaves the global RNG alone


# ---- one training step (also timed by ``brats-cnn benchmark``) ----------------------------------


def train_step(model: torch.nn.Module, optimiser: torch.optim.Optimizer, patches: torch.Tensor,
               labels: torch.Tensor, compute: Compute, config: Any = None,
               weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward and one optimiser step on a batch already on ``compute.device``.

    ``weight``: class weights of the loss (dense training), see :func:`loss_function`.

    Returns:
        ``(loss, logits)``, both detached (a 0-d float32 tensor and ``(B, C)``, dense ``(B, C, S, S)``).
    """
    with compute.autocast():
        logits = model(patches)
    loss = loss_function(logits, labels, config, weight)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    return loss.detach(), logits.detach()


# ---- optimiser -----------------------------------------------------------------------------------


def build_optimiser(network: torch.nn.Module, train_config: Any) -> torch.optim.Optimizer:
    """The paper's SGD with Nesterov momentum at ``train.lr_start`` (the schedule sets the rate per step);
    the one place it is built, for ``train`` and ``benchmark``."""
    return torch.optim.SGD(network.parameters(), lr=train_config.lr_start, momentum=train_config.momentum,
                           nesterov=True, weight_decay=train_config.weight_decay)


# ---- run state -----------------------------------------------------------------------------------


def _flush_step_losses(state: RunState) -> None:
    if state.pending:
        losses = torch.stack([loss for _, _, loss in state.pending]).tolist()  # one device sync
        state.step_rows += [(step, lr, loss) for (step, lr, _), loss in zip(state.pending, losses)]
        state.pending = []


# ---- the run -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainingResult:
    """What :func:`run_training` made; ``network`` is the trained (unwrapped) network on the CPU."""

    out: Path
    last_checkpoint: Path
    best_checkpoint: Path
    history: tuple[dict, ...]
    network: torch.nn.Module


@dataclass
class Run:
    """Everything the training loop works with, set up once by :func:`setup_run`.

    ``network`` is the plain module (what checkpoints hold); ``model`` is what the step calls (the
    same module, or its DDP / ``torch.compile`` wrapper).
    """

    out: Path
    config: Config
    compute: Compute
    dist: Distributed
    data: TrainingData
    calibration: dict
    train_pairs: list
    steps_per_epoch: int
    total_steps: int
    validation: PatchBatches | None
    network: torch.nn.Module
    model: torch.nn.Module
    optimiser: torch.optim.Optimizer
    state: RunState
    resumed_rng: list | None
    loss_weight: torch.Tensor | None = None  # class weights of the dense loss; None for patch training

    @property
    def last_path(self) -> Path:
        return self.out / LAST_CHECKPOINT

    @property
    def best_path(self) -> Path:
        return self.out / BEST_CHECKPOINT


def epoch_batches(run: Run, epoch: int) -> PatchBatches:
    """The training batches of one epoch: class-balanced centres, or natural ones (``sampling.centres``),
    per run or per epoch, this rank's part.

    Patches (``train.mode: patch``) or, for dense training, crops around ``dense.crops_per_epoch``
    class-balanced centres (:class:`SlabBatches`).
    """
    cfg = run.config
    dense = cfg.train.mode == "dense"
    keys = (epoch,) if cfg.sampling.resample_each_epoch else ()
    num_classes = get_convention(cfg.data.label_convention).num_classes
    centres = CENTRE_SAMPLERS[cfg.sampling.centres](run.train_pairs, cfg.dense.crops_per_epoch if dense else
                                                    cfg.sampling.total_patches, num_classes,
                                                    make_rng(cfg.train.seed, CENTRE_STREAM, *keys))
    common = dict(patch_size=input_side(cfg), background=cfg.preprocess.background_value,
                  rotation_angles=cfg.sampling.rotation_angles, arbitrary_rotation=cfg.sampling.arbitrary_rotation,
                  intensity_scale=cfg.sampling.intensity_scale, intensity_shift=cfg.sampling.intensity_shift,
                  gamma=cfg.sampling.gamma, planes=cfg.sampling.planes, seed=cfg.train.seed, epoch=epoch,
                  rank=run.dist.rank, world_size=run.dist.world_size)
    if dense:
        return SlabBatches(run.data.train_dirs, centres, crop_size=cfg.dense.crop_size,
                           batch_size=cfg.dense.batch_size, **common)
    return PatchBatches(run.data.train_dirs, centres, batch_size=cfg.train.batch_size, **common)


def setup_run(grade: str, data: Path, out: Path, config: str | Path | None, overrides: Sequence[str],
              device: str, resume: bool, manifest: Path | None) -> Run:
    """Config, device and precision, process group, data split, network, optimiser and resume state."""
    cfg, resumed = load_run_config(grade, out, config, overrides, resume)
    if cfg.grade != grade:
        raise ConfigError(f"config '{cfg.name}' is for grade '{cfg.grade}' but --grade {grade} was given")
    check_patch_size(cfg.model.architecture, cfg.sampling.patch_size)  # before any preprocessing
    if cfg.model.context > 1 and cfg.train.mode == "dense":
        raise ConfigError(f"model.context={cfg.model.context} (a context pathway) trains in train.mode: patch only, "
                          "not dense")
    initial = initial_weights(Path(cfg.train.init_weights), cfg) if cfg.train.init_weights and resumed is None else None
    dist = init_distributed(device)
    compute = compute_settings(resolve_device(device, dist.local_rank), cfg.compute)
    tc = cfg.train
    if tc.deterministic:  # cuBLAS needs this workspace setting for deterministic matmuls
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not tc.deterministic
    if dist.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create the run folder ({exc.strerror})", out) from exc
        save_config(cfg, out / "config.yaml")
    log.info("device %s, precision %s, channels_last %s", compute.device, compute.precision, compute.channels_last)

    data_ = prepare_data(data, out, cfg, grade, manifest, dist)
    num_classes = get_convention(cfg.data.label_convention).num_classes
    train_pairs = cases_label_mask(data_.train_dirs)
    # stored in every checkpoint: what `segment.prior_alpha` corrects towards (see brats_cnn.inference.calibrate)
    calibration = {"class_frequencies": class_frequencies(train_pairs, num_classes).tolist()}
    validation = None
    if data_.validation_dirs and dist.is_main:
        val_centres = sample_balanced_centres(cases_label_mask(data_.validation_dirs),
                                              cfg.sampling.validation_patches, num_classes,
                                              make_rng(tc.seed, VALIDATION_STREAM))
        validation = PatchBatches(data_.validation_dirs, val_centres, batch_size=tc.batch_size,
                                  patch_size=input_side(cfg), background=cfg.preprocess.background_value,
                                  shuffle=False)

    torch.manual_seed(tc.seed)
    network = build_network(cfg.model, num_classes, patch_size=cfg.sampling.patch_size)
    if tc.trainable != "all":
        log.info("trainable: %s layer only (%d parameters)", tc.trainable, freeze_for(network, tc.trainable))
    optimiser = build_optimiser(network, tc)
    state = RunState(interval=torch.zeros(3, dtype=torch.float64))
    if resumed is not None:
        restore_state(state, resumed, network, optimiser, out)
    elif initial is not None:
        network.load_state_dict(initial)
        log.info("initial weights from %s", tc.init_weights)
    compute.network(network)
    for slot in optimiser.state.values():  # momentum buffers follow the weights (device and layout)
        for key, value in slot.items():
            if torch.is_tensor(value) and value.dim() == 4:
                slot[key] = value.to(compute.device).contiguous(memory_format=compute.memory_format)
            elif torch.is_tensor(value):
                slot[key] = value.to(compute.device)
    state.interval = state.interval.to(compute.device)
    model = DenseNetwork(network) if tc.mode == "dense" else network  # shares network's parameters
    loss_weight = None
    if tc.mode == "dense":
        loss_weight = dense_class_weights(calibration["class_frequencies"], cfg.dense.class_weight_power)
        log.info("dense training: %dx%d labelled voxels per crop, class weights %s", cfg.dense.crop_size,
                 cfg.dense.crop_size, [round(w, 3) for w in loss_weight.tolist()])
        loss_weight = loss_weight.to(compute.device)
    if dist.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[compute.device.index] if compute.device.type == "cuda" else None)
    if tc.compile:
        model = torch.compile(model)
    run = Run(out=out, config=cfg, compute=compute, dist=dist, data=data_, calibration=calibration,
              train_pairs=train_pairs, steps_per_epoch=0, total_steps=0, validation=validation, network=network,
              model=model, optimiser=optimiser, state=state, loss_weight=loss_weight,
              resumed_rng=(resumed.training_state or {}).get("rng") if resumed is not None else None)
    first = epoch_batches(run, 0)
    log.info("training centres per class: %s", first.centres.class_counts(num_classes).tolist())
    run.steps_per_epoch = len(first)
    if run.steps_per_epoch == 0:
        raise ConfigError(f"sampling.total_patches={cfg.sampling.total_patches} gives no full batch of "
                          f"{tc.batch_size} patches")
    run.total_steps = tc.epochs * run.steps_per_epoch
    return run


def save_last(run: Run) -> None:
    """``last.pt`` with everything needed to continue at ``run.state``; also ``steps.csv`` (rank 0 writes)."""
    state = run.state
    rng = rng_states(run.compute, run.dist)
    _flush_step_losses(state)
    if not run.dist.is_main:
        return
    write_step_losses(run.out, state.step_rows)
    training_state = {"optimiser": run.optimiser.state_dict(), "step": state.step, "best_score": state.best_score,
                      "epoch_in_progress": state.epoch, "next_batch": state.batch,
                      "interval": state.interval.tolist(), "interval_seconds": state.interval_seconds,
                      "rng": rng, "world_size": run.dist.world_size,
                      "history": state.history,
                      "train_cases": [p.name for p in run.data.train_dirs],
                      "validation_cases": [p.name for p in run.data.validation_dirs]}
    save_checkpoint(run.last_path, network=run.network, config=run.config, normaliser=run.data.normaliser,
                    label_convention=run.config.data.label_convention, epoch=state.epoch,
                    training_state=training_state, calibration=run.calibration)


def record_validation(run: Run, epoch: int, lr: float) -> None:
    """One metrics row: the training interval since the last row, validation, and ``best.pt`` if better."""
    state, cfg = run.state, run.config
    totals = state.interval.clone()
    if run.dist.world_size > 1:
        torch.distributed.all_reduce(totals)
    seen = totals[2].item()
    train_loss = (totals[0] / totals[2]).item() if seen else math.nan
    train_accuracy = (totals[1] / totals[2]).item() if seen else math.nan
    if run.dist.is_main:
        val_loss, val_accuracy, dice, score_alpha, cases = math.nan, math.nan, None, None, {}
        if run.validation is not None:
            loader = make_loader(run.validation, cfg, run.compute.device, cfg.train.seed)
            val_loss, val_accuracy = evaluate_patches(run.network, loader, run.compute, cfg.train)
            if cfg.train.validate_dice:
                per_case = validation_dice(run.network, run.data.validation_dirs, cfg, run.compute,
                                           run.calibration["class_frequencies"])
                per_alpha = {alpha: mean_dice(dice_of_cases) for alpha, dice_of_cases in per_case.items()}
                dice = per_alpha[0.0]
                score_alpha = max(per_alpha, key=lambda a: (region_mean(per_alpha[a]), -a))
                # per case (metrics.json only): the network's own Dice, and the selection score's terms
                cases = {"case_dice": per_case[0.0],
                         "case_score": {case: region_mean(d) for case, d in per_case[score_alpha].items()}}
            run.network.train()
        score = (region_mean(per_alpha[score_alpha]) if dice else
                 val_accuracy if math.isfinite(val_accuracy) else -train_loss)
        state.history.append({
            "epoch": epoch + 1, "step": state.step, "lr": lr, "train_loss": train_loss,
            "train_accuracy": train_accuracy, "val_loss": json_float(val_loss),
            "val_accuracy": json_float(val_accuracy), **{f"dice_{r}": (dice or {}).get(r) for r in REGIONS},
            "score": score, "score_alpha": score_alpha, "epoch_seconds": round(state.interval_seconds, 3),
            "patches_per_second": round(seen / max(state.interval_seconds, 1e-9), 1), **cases})
        if score > state.best_score:
            state.best_score = score
            save_checkpoint(run.best_path, network=run.network, config=cfg, normaliser=run.data.normaliser,
                            label_convention=cfg.data.label_convention, epoch=state.epoch, training_state=None,
                            calibration=run.calibration)
        log.info("epoch %d, step %d: loss %.4f acc %.3f | val loss %s acc %s dice %s | score %.4f (alpha %s) | "
                 "%.0f patches/s", epoch + 1, state.step, train_loss, train_accuracy, f"{val_loss:.4f}",
                 f"{val_accuracy:.3f}", dice and {k: round(v, 3) for k, v in dice.items()}, score, score_alpha,
                 state.history[-1]["patches_per_second"])
    state.interval.zero_()
    state.interval_seconds = 0.0


def check_finite_losses(run: Run) -> None:
    """Stop the run at the first non-finite loss of the last :data:`PROGRESS_INTERVAL` steps.

    Called every ``PROGRESS_INTERVAL`` steps (where the progress bar syncs the device anyway) and
    before every checkpoint, so no checkpoint is written after the loss left the finite range:
    ``last.pt`` and ``best.pt`` keep the last good state. All processes stop together.
    """
    recent = run.state.pending[-PROGRESS_INTERVAL:]
    if not recent:
        return
    finite = torch.isfinite(torch.stack([loss.detach().float() for _, _, loss in recent]))
    all_finite = finite.all().to(torch.int32).reshape(1)
    if run.dist.world_size > 1:
        torch.distributed.all_reduce(all_finite, op=torch.distributed.ReduceOp.MIN)
    if bool(all_finite.item()):
        return
    first = int((~finite).nonzero()[0]) if not bool(finite.all()) else 0
    step, lr, loss = recent[first]
    raise BratsCnnError(f"training diverged: the loss is {float(loss)} at step {step} (lr {lr:.3g}); stopped "
                        f"without writing a checkpoint of this state (last.pt and best.pt, if any, are from "
                        f"before it); lower train.lr_start or check the data", run.out)


def train_epoch(run: Run, epoch: int) -> None:
    """Train one epoch from ``run.state.batch`` on; validate and checkpoint when due."""
    from tqdm import tqdm

    state, tc = run.state, run.config.train
    if state.batch == 0:
        torch.manual_seed(torch_seed(tc.seed, epoch, run.dist.rank))
    elif run.resumed_rng is not None:  # continuing inside the epoch a checkpoint was written in
        restore_rng(run.resumed_rng, run.compute, run.dist)
    loader = make_loader(epoch_batches(run, epoch), run.config, run.compute.device, seed=tc.seed * 1000 + epoch,
                         start=state.batch)
    run.model.train()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{tc.epochs}", unit="batch", initial=state.batch,
               total=run.steps_per_epoch, disable=not (run.dist.is_main and progress_wanted()), dynamic_ncols=True,
               leave=False)
    started = time.perf_counter()
    for patches, labels in bar:
        lr = learning_rate(state.step, run.total_steps, tc.lr_start, tc.lr_end)
        for group in run.optimiser.param_groups:
            group["lr"] = lr
        labels = run.compute.batch(labels)
        loss, logits = train_step(run.model, run.optimiser, run.compute.batch(patches), labels, run.compute, tc,
                                  run.loss_weight)
        state.step += 1
        state.batch += 1
        state.pending.append((state.step, lr, loss))
        labelled = (labels != IGNORE_LABEL).sum().double()  # every label of a patch batch; dense: brain voxels
        state.interval += torch.stack([loss.double() * labelled, (logits.argmax(1) == labels).sum().double(),
                                       labelled])
        end_of_epoch = state.batch == run.steps_per_epoch
        validate_now = end_of_epoch or (tc.validate_every_steps > 0 and state.step % tc.validate_every_steps == 0)
        checkpoint_now = validate_now or (tc.checkpoint_every_steps > 0 and state.step % tc.checkpoint_every_steps == 0)
        if state.step % PROGRESS_INTERVAL == 0:
            check_finite_losses(run)
            seen = max(state.interval[2].item(), 1.0)
            bar.set_postfix(loss=f"{state.interval[0].item() / seen:.4f}",
                            acc=f"{state.interval[1].item() / seen:.3f}", lr=f"{lr:.2e}")
            if not checkpoint_now and tc.checkpoint_minutes > 0:
                checkpoint_now = all_ranks_agree(time.monotonic() - state.last_saved >= 60 * tc.checkpoint_minutes,
                                                  run.dist, run.compute.device)
        if checkpoint_now:
            state.interval_seconds += time.perf_counter() - started
            if end_of_epoch:
                state.epoch, state.batch = epoch + 1, 0
            check_finite_losses(run)
            if validate_now:
                record_validation(run, epoch, lr)
            save_last(run)
            if validate_now and run.dist.is_main:  # after the checkpoints: metrics.csv never runs ahead of them
                write_metrics(run.out, state.history)
            run.dist.barrier()
            state.last_saved = time.monotonic()
            started = time.perf_counter()
    bar.close()
    state.epoch, state.batch = epoch + 1, 0


def run_training(grade: str, data: Path, out: Path, config: str | Path | None = None,
                 overrides: Sequence[str] = (), device: str = "auto", resume: bool = False,
                 manifest: Path | None = None) -> TrainingResult:
    """Train the HGG or LGG network (the ``brats-cnn train`` command).

    Reads top to bottom: :func:`setup_run` (config, device, data, network, resume state), then
    :func:`train_epoch` for every remaining epoch (which validates with :func:`record_validation` and
    checkpoints with :func:`save_last` when due).

    Args:
        grade: ``"hgg"`` or ``"lgg"``: the cases to train on and the bundled default config.
        data: a raw dataset folder (any layout) or a preprocessed cache.
        out: the run folder (see the module docstring).
        config: YAML path or bundled name; default ``pereira_<grade>``.
        overrides: ``key=value`` strings applied last.
        device: ``auto``, ``cpu`` or ``cuda``.
        resume: continue from ``<out>/last.pt`` (its stored config, then ``overrides``), also from the
            middle of an epoch.
        manifest: CSV ``case_id,grade`` (default ``<data>/manifest.csv`` when present).
    """
    grade = check_grade(grade)
    run = setup_run(grade, data, Path(out), config, overrides, device, resume, manifest)
    run.state.last_saved = time.monotonic()
    for epoch in range(run.state.epoch, run.config.train.epochs):
        train_epoch(run, epoch)
    if run.dist.world_size > 1:
        torch.distributed.destroy_process_group()
    return TrainingResult(run.out, run.last_path, run.best_path, tuple(run.state.history),
                          unwrap_network(run.network).cpu())
