"""The training loss (SPEC stage 5): cross-entropy or focal loss over labelled voxels, with class weights."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from brats_cnn.errors import ConfigError
from brats_cnn.training.sampling import IGNORE_LABEL

LOSSES = ("cross_entropy", "focal")


def loss_function(logits: torch.Tensor, labels: torch.Tensor, config: Any = None,
                  weight: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss of ``train.loss``, a mean over the batch, computed in float32 (also under bf16).

    ``cross_entropy`` (the paper's; default, also when ``config`` is None) or ``focal``
    (Lin et al. 2017: ``-(1 - p_t) ** gamma * log p_t`` with ``gamma = train.focal_gamma``; gamma 0 is
    cross-entropy). ``config`` is a ``TrainConfig``.

    Args:
        logits: ``(B, C)`` network outputs, or ``(B, C, S, S)`` of dense training.
        labels: ``(B,)`` int64 class indices, or ``(B, S, S)`` with :data:`IGNORE_LABEL` for voxels
            that count for nothing.
        weight: ``(C,)`` class weights (dense training); the mean is then weighted, as torch's.
    """
    if logits.dim() > 2:  # dense: every labelled voxel is one sample
        logits = logits.movedim(1, -1).reshape(-1, logits.shape[1])
        labels = labels.reshape(-1)
        labelled = labels != IGNORE_LABEL
        logits, labels = logits[labelled], labels[labelled]
    kind = getattr(config, "loss", "cross_entropy")
    if kind == "cross_entropy":
        return F.cross_entropy(logits.float(), labels, weight=weight)
    if kind == "focal":
        log_p = F.log_softmax(logits.float(), dim=1).gather(1, labels[:, None])[:, 0]
        terms = -((1 - log_p.exp()) ** config.focal_gamma * log_p)
        return terms.mean() if weight is None else (terms * weight[labels]).sum() / weight[labels].sum()
    raise ConfigError(f"train.loss must be one of {list(LOSSES)}, got '{kind}'")


def dense_class_weights(frequencies: Sequence[float], power: float) -> torch.Tensor:
    """``(C,)`` float32 loss weights ``pi_c ** -power`` of dense training, mean 1 (classes absent: weight 0)."""
    pi = torch.tensor(frequencies, dtype=torch.float64)
    weight = torch.where(pi > 0, pi.clamp_min(1e-12) ** -power, torch.zeros_like(pi))
    return (weight * (pi > 0).sum() / weight.sum()).float()
