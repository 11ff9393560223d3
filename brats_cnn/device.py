"""Device, precision and memory format, chosen in one place for training, segmentation and the benchmark.

:func:`compute_settings` turns a device and the config's ``compute`` section into a
:class:`Compute`: whether to run bf16 autocast and whether to use the channels_last memory format.
``compute.precision: auto`` means bf16 autocast on CUDA and on CPUs with native bf16 kernels
(AVX512-BF16 or AMX), float32 elsewhere; ``float32`` forces float32 everywhere; ``bf16`` forces bf16
autocast (emulated, hence slow, on CPUs without native bf16). Weights, optimiser state and the loss
stay float32 in every case (autocast only lowers the convolutions and matrix products).

torch is imported inside the functions so that importing this module stays cheap for the CLI.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from brats_cnn.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")
PRECISION_CHOICES = ("auto", "bf16", "float32")


def resolve_device(name: str, local_rank: int = 0) -> "torch.device":
    """``auto`` (CUDA if available), ``cpu``, ``cuda`` or ``cuda:N``; ``cuda`` means ``cuda:local_rank``.

    Raises:
        ConfigError: an unknown name, or CUDA asked for where it is not available.
    """
    import torch

    name = str(name).lower()
    if name not in DEVICE_CHOICES and not name.startswith("cuda:"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got '{name}'")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for, but CUDA is not available (torch {torch.__version__})")
    return torch.device(name if ":" in name else f"cuda:{local_rank}")


@dataclass(frozen=True)
class TorchrunEnvironment:
    """This process's place among the processes launched by torchrun (``world_size == 1``: not launched)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1


def torchrun_environment() -> TorchrunEnvironment:
    """``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` as torchrun sets them; rank 0 of 1 when ``WORLD_SIZE <= 1``.

    Raises:
        ConfigError: a variable that is not an integer, or a rank outside ``[0, WORLD_SIZE)``.
    """
    values = {}
    for name, default in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        text = os.environ.get(name, default)
        try:
            values[name] = int(text)
        except ValueError:
            raise ConfigError(f"environment variable {name} must be an integer, got '{text}'") from None
    if values["WORLD_SIZE"] <= 1:
        return TorchrunEnvironment()
    if not 0 <= values["RANK"] < values["WORLD_SIZE"]:
        raise ConfigError(f"environment variable RANK={values['RANK']} is outside [0, WORLD_SIZE="
                          f"{values['WORLD_SIZE']})")
    return TorchrunEnvironment(values["RANK"], values["LOCAL_RANK"], values["WORLD_SIZE"])


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class Compute:
    """How a network runs on one device.

    Attributes:
        device: the torch device.
        bf16: run convolutions and linear layers under bf16 autocast (weights stay float32).
        channels_last: keep the network's weights and its 4-D inputs in channels_last (NHWC) layout.
    """

    device: "torch.device"
    bf16: bool
    channels_last: bool

    @property
    def memory_format(self) -> "torch.memory_format":
        import torch

        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def precision(self) -> str:
        """``"bf16"`` or ``"float32"`` (what sidecars, metrics and benchmark tables report)."""
        return "bf16" if self.bf16 else "float32"

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on this device when :attr:`bf16`, else a no-op context."""
        import torch

        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def network(self, network: "torch.nn.Module") -> "torch.nn.Module":
        """``network`` moved to the device (in place, as ``Module.to``) in this memory format."""
        return network.to(self.device).to(memory_format=self.memory_format)

    def batch(self, tensor: "torch.Tensor") -> "torch.Tensor":
        """A 4-D batch on the device in this memory format (other tensors are only moved)."""
        tensor = tensor.to(self.device, non_blocking=True)
        if tensor.dim() == 4:
            return tensor.contiguous(memory_format=self.memory_format)
        return tensor


def has_native_bf16(device: "torch.device") -> bool:
    """Whether ``device`` runs bf16 natively: a CUDA GPU with bf16, or a CPU with native bf16 kernels."""
    import torch

    return ((device.type == "cuda" and torch.cuda.is_bf16_supported())
            or (device.type == "cpu" and cpu_has_native_bf16()))


def compute_settings(device: "torch.device", config: Any = None) -> Compute:
    """The :class:`Compute` for ``device`` from a ``ComputeConfig`` (defaults when None).

    Raises:
        ConfigError: an unknown ``compute.precision``.
    """
    precision = getattr(config, "precision", "auto")
    channels_last = bool(getattr(config, "channels_last", True))
    if precision not in PRECISION_CHOICES:
        raise ConfigError(f"compute.precision must be one of {list(PRECISION_CHOICES)}, got '{precision}'")
    if precision == "auto":
        bf16 = has_native_bf16(device)
    else:
        bf16 = precision == "bf16"
    return Compute(device=device, bf16=bf16, channels_last=channels_last)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Let glibc's malloc serve and keep large blocks from its heap instead of mapping fresh pages each time.

    By default every allocation over 32 MB is a new ``mmap`` whose pages fault in one by one and go
    back to the kernel when freed; inference allocates such activations and volumes hundreds of times
    per case (benchmarks/bench_segment.py: up to 20 % of the CPU time in the kernel). Raising the
    mmap and trim thresholds to 1 GB reuses the freed pages, as the jemalloc/tcmalloc preload that
    PyTorch's CPU performance guide recommends does, without a preload. No-op (False) where glibc's
    ``mallopt`` is not available (macOS, Windows, musl).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not os.uname().sysname == "Linux":
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
    except (OSError, AttributeError):
        return False
