"""Resuming a run: which settings may change, where it stopped, and restoring its weights, optimiser and RNGs."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from brats_cnn.config import Config, config_to_dict, load_config
from brats_cnn.data.labels import get_convention
from brats_cnn.device import Compute
from brats_cnn.errors import CheckpointError, ConfigError
from brats_cnn.network.checkpoint import LAST_CHECKPOINT, load_checkpoint, unwrap_network
from brats_cnn.training.distributed import Distributed
from brats_cnn.training.validation import read_history, read_step_losses

log = logging.getLogger(__name__)


def rng_states(compute: Compute, dist: Distributed) -> list:
    """Every process's torch RNG state (CPU, and CUDA when used), gathered on all ranks."""
    state = {"cpu": torch.get_rng_state()}
    if compute.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(compute.device)
    if dist.world_size == 1:
        return [state]
    gathered: list = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def restore_rng(states: list, compute: Compute, dist: Distributed) -> None:
    if len(states) != dist.world_size:
        log.warning("the checkpoint was written by %d process(es), this run has %d: dropout draws of the rest of "
                    "this epoch will differ from an uninterrupted run", len(states), dist.world_size)
        return
    torch.set_rng_state(states[dist.rank]["cpu"])
    if compute.device.type == "cuda" and "cuda" in states[dist.rank]:
        torch.cuda.set_rng_state(states[dist.rank]["cuda"], compute.device)


def load_run_config(grade: str, out: Path, config: str | Path | None, overrides: Sequence[str],
                     resume: bool) -> tuple[Config, Any]:
    """The run's config, and the checkpoint to resume from (None for a new run)."""
    last_path = out / LAST_CHECKPOINT
    if resume:
        if not last_path.is_file():
            raise CheckpointError("nothing to resume: no last.pt in the run folder", last_path)
        resumed = load_checkpoint(last_path)
        if resumed.grade != grade:
            raise ConfigError(f"checkpoint is for grade '{resumed.grade}' but --grade {grade} was given", last_path)
        if not resumed.training_state or "optimiser" not in resumed.training_state:
            raise CheckpointError("holds no training state (a best.pt or a calibrated model copied over it?); "
                                  "--resume needs the last.pt that train wrote", last_path)
        resumed_config = load_config(None, overrides, base=config_to_dict(resumed.config))
        refuse_changed_settings(resumed.config, resumed_config, last_path)
        check_new_epochs(resumed, resumed_config.train.epochs, last_path)
        return resumed_config, resumed
    if last_path.is_file():
        raise ConfigError("run folder already holds last.pt; pass --resume or choose another --out", out)
    written = out / "config.yaml"
    if config is not None and Path(config).is_file() and written.is_file() and written.samefile(config):
        raise ConfigError(f"refusing to write over an input of this command (--config {config}); copy the config "
                          "elsewhere or choose another --out", written)
    return load_config(config or f"pereira_{grade}", overrides), None


# Settings that ``train --resume --set`` may change: they affect speed, memory or when last.pt and
# the validation rows are written, never the schedule, the data or the arithmetic of the run
# (docs/reliability.md lists them; validation draws no random number the training uses: tested).
RESUMABLE_KEYS: tuple[str, ...] = (
    "train.num_workers", "train.compile", "train.deterministic", "train.checkpoint_minutes",
    "train.checkpoint_every_steps", "train.validate_every_steps", "preprocess.workers", "compute.channels_last",
    "segment.batch_size", "segment.slices_per_batch", "segment.memory_fraction")


# ``train.epochs`` may change too (shorten or extend a run); the linear learning-rate decay then follows
# the new length from the resumed step on, and the log says so.
RESCHEDULABLE_KEYS: tuple[str, ...] = ("train.epochs",)


def refuse_changed_settings(stored: Config, requested: Config, last_path: Path) -> None:
    """ConfigError naming the first setting outside :data:`RESUMABLE_KEYS` that ``--set`` changes."""
    def leaves(values: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in values.items():
            out.update(leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
        return out

    before, after = leaves(config_to_dict(stored)), leaves(config_to_dict(requested))
    allowed = RESUMABLE_KEYS + RESCHEDULABLE_KEYS
    changed = [key for key in before if before[key] != after[key] and key not in allowed]
    if changed:
        key = changed[0]
        raise ConfigError(f"--resume cannot change {key} (the run has {before[key]!r}, --set gives {after[key]!r}): "
                          f"it would change the schedule or the data of the run; with --resume only "
                          f"{', '.join(allowed)} may change; start a new run in another --out", last_path)


def saved_position(resumed: Any) -> tuple[int, int]:
    """``(epoch in progress (0-based), next batch)`` of a ``last.pt``; the epoch is done when the batch is 0."""
    saved = resumed.training_state
    return int(saved.get("epoch_in_progress", resumed.epoch)), int(saved.get("next_batch", 0))


def check_new_epochs(resumed: Any, epochs: int, last_path: Path) -> None:
    """Refuse an ``--set train.epochs`` that ends before the epoch the run has reached; warn about any other."""
    stored = resumed.config.train.epochs
    if epochs == stored:
        return
    in_progress, next_batch = saved_position(resumed)
    reached = in_progress + (1 if next_batch > 0 else 0)
    if epochs < reached:
        raise ConfigError(f"--resume cannot set train.epochs={epochs}: the run has reached epoch {reached}; "
                          f"give at least {reached}", last_path)
    log.warning("--resume changes train.epochs from %d to %d: from step %d on, the learning rate decays "
                "linearly to lr_end over the new length", stored, epochs, int(resumed.training_state["step"]))


def restore_state(state: RunState, resumed: Any, network: torch.nn.Module, optimiser: torch.optim.Optimizer,
             out: Path) -> None:
    """Weights, optimiser and :class:`RunState` from the ``last.pt`` being resumed."""
    saved = resumed.training_state
    network.load_state_dict(resumed.network.state_dict())
    optimiser.load_state_dict(saved["optimiser"])
    state.step = int(saved["step"])
    state.epoch, state.batch = saved_position(resumed)
    state.best_score = float(saved["best_score"])
    state.interval = torch.tensor(saved.get("interval", [0.0, 0.0, 0.0]), dtype=torch.float64)
    state.interval_seconds = float(saved.get("interval_seconds", 0.0))  # older checkpoints: rate of one row too high
    state.history = list(saved["history"]) if "history" in saved else read_history(out, state.step)
    state.step_rows = read_step_losses(out, state.step)
    log.info("resuming at epoch %d, batch %d (step %d) from %s", state.epoch + 1, state.batch, state.step,
             out / LAST_CHECKPOINT)


def initial_weights(path: Path, cfg: Config) -> dict:
    """The state dict of checkpoint ``path`` (``train.init_weights``), checked against the run's network.

    Called before any preprocessing, so a wrong or unreadable file stops the run before any work.
    """
    source = load_checkpoint(path)  # CheckpointError names the file when it cannot be read
    plain = unwrap_network(source.network)
    wanted = (cfg.model.architecture, get_convention(cfg.data.label_convention).num_classes, cfg.sampling.patch_size)
    if (plain.architecture, plain.num_classes, plain.patch_size) != wanted or \
            getattr(plain, "context", 1) != cfg.model.context:
        raise ConfigError(f"train.init_weights holds a {plain.architecture.upper()} network with {plain.num_classes} "
                          f"classes for {plain.patch_size}x{plain.patch_size} patches (context "
                          f"{getattr(plain, 'context', 1)}); this run trains a {wanted[0].upper()} network with "
                          f"{wanted[1]} classes for {wanted[2]}x{wanted[2]} patches (context {cfg.model.context})", path)
    return plain.state_dict()


@dataclass
class RunState:
    """Where a run is; everything :func:`run_training` needs to continue exactly from a checkpoint.

    ``epoch`` is the epoch in progress (0-based) and ``batch`` the next batch of it, so an
    end-of-epoch checkpoint holds ``(epoch + 1, 0)``. ``interval`` sums (loss, correct, patches)
    since the last metrics row and ``interval_seconds`` the training time they took (both kept in
    ``last.pt``, so the patches/s of a row that spans a resume counts only time spent training);
    ``pending`` holds the (step, lr, loss tensor) not yet in steps.csv.
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best_score: float = -math.inf
    history: list = field(default_factory=list)
    step_rows: list = field(default_factory=list)
    interval: Any = None
    interval_seconds: float = 0.0
    pending: list = field(default_factory=list)
    last_saved: float = 0.0
