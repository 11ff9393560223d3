"""Training under torchrun: the process group (NCCL on CUDA, gloo on the CPU) and rank-0 decisions.

Where a process stands (rank, local rank, world size) is read once, by :func:`brats_cnn.device.torchrun_environment`,
for training and segmentation alike; :class:`Distributed` is that place once its process group is joined.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from brats_cnn.device import TorchrunEnvironment, torchrun_environment


@dataclass(frozen=True)
class Distributed(TorchrunEnvironment):
    """A :class:`TorchrunEnvironment` whose process group is joined; ``world_size == 1`` when not launched by torchrun."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def init_distributed(device_name: str) -> Distributed:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (NCCL on CUDA, gloo on the CPU)."""
    env = torchrun_environment()
    if env.world_size <= 1:
        return Distributed()
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return Distributed(env.rank, env.local_rank, env.world_size)


def all_ranks_agree(flag: bool, dist: Distributed, device: torch.device) -> bool:
    """Rank 0's decision, shared with every process (time-based decisions differ between ranks)."""
    if dist.world_size == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    torch.distributed.broadcast(value, 0)
    return bool(value.item())
