"""Device selection and mixed precision, shared by training, segmentation and the benchmark.

torch is imported inside the functions so that importing this module stays cheap for the CLI.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from brats_cnn.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


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


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: "torch.device", amp: bool, cpu_bf16: bool = False) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``amp``; on the CPU only when ``cpu_bf16`` and bf16 is native."""
    import torch

    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    if cpu_bf16 and device.type == "cpu" and cpu_has_native_bf16():
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
