"""Device, precision and memory format (brats_cnn.device) and the torchrun environment."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from brats_cnn import device
from brats_cnn.config import ComputeConfig
from brats_cnn.device import Compute, TorchrunEnvironment, compute_settings, resolve_device, torchrun_environment
from brats_cnn.errors import ConfigError

CPU = torch.device("cpu")


@pytest.mark.parametrize(("native_bf16", "expected"), [(True, True), (False, False)])
def test_auto_precision_follows_the_cpu(monkeypatch, native_bf16, expected):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native_bf16)
    compute = compute_settings(CPU, ComputeConfig(precision="auto", channels_last=False))
    assert (compute.bf16, compute.precision, compute.channels_last) == (expected, "bf16" if expected else "float32",
                                                                        False)


@pytest.mark.parametrize(("precision", "bf16"), [("float32", False), ("bf16", True)])
def test_forced_precision_ignores_the_hardware(monkeypatch, precision, bf16):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: not bf16)
    compute = compute_settings(CPU, ComputeConfig(precision=precision, channels_last=True))
    assert compute.bf16 is bf16 and compute.channels_last is True and compute.device == CPU


def test_defaults_without_a_config_and_unknown_precision():
    compute = compute_settings(CPU)
    assert compute.channels_last is True and compute.precision in ("bf16", "float32")
    with pytest.raises(ConfigError, match=r"compute.precision must be one of \['auto', 'bf16', 'float32'\], got 'fp16'"):
        compute_settings(CPU, ComputeConfig(precision="fp16"))


def test_batch_puts_4d_tensors_in_the_memory_format_and_only_moves_others():
    batch = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    labels = torch.tensor([1, 2])
    nhwc = Compute(CPU, bf16=False, channels_last=True)
    out = nhwc.batch(batch)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert out.stride() == (60, 1, 15, 3)
    assert torch.equal(out, batch)  # same values, other layout
    assert batch.is_contiguous()  # the argument is untouched
    moved = nhwc.batch(labels)
    assert torch.equal(moved, labels) and moved.stride() == (1,) and moved.device == CPU
    nchw = Compute(CPU, bf16=False, channels_last=False)
    assert nchw.batch(batch).stride() == (60, 20, 5, 1)
    assert nchw.memory_format == torch.contiguous_format and nhwc.memory_format == torch.channels_last


def test_autocast_lowers_matmuls_only_under_bf16():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with Compute(CPU, bf16=True, channels_last=False).autocast():
        assert (a @ b).dtype == torch.bfloat16
    with Compute(CPU, bf16=False, channels_last=False).autocast():
        assert (a @ b).dtype == torch.float32


def test_network_moves_weights_to_the_memory_format():
    net = torch.nn.Conv2d(3, 8, 3)
    Compute(CPU, bf16=False, channels_last=True).network(net)
    assert net.weight.is_contiguous(memory_format=torch.channels_last) and net.weight.dtype == torch.float32


def test_resolve_device_names_and_errors(monkeypatch):
    assert resolve_device("cpu") == CPU and resolve_device("CPU") == CPU
    with pytest.raises(ConfigError, match="--device must be auto, cpu or cuda, got 'gpu'"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=f"--device {name} asked for, but CUDA is not available"):
            resolve_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda:3")
    assert resolve_device("cuda:1", local_rank=3) == torch.device("cuda:1")
    assert resolve_device("auto", local_rank=2) == torch.device("cuda:2")


def test_torchrun_environment(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_environment() == TorchrunEnvironment(0, 0, 1)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert torchrun_environment() == TorchrunEnvironment(rank=3, local_rank=1, world_size=4)
    monkeypatch.setenv("WORLD_SIZE", "1")  # a one-process torchrun is a plain run
    assert torchrun_environment() == TorchrunEnvironment(0, 0, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"^environment variable RANK=3 is outside \[0, WORLD_SIZE=2\)$"):
        torchrun_environment()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ConfigError, match="^environment variable RANK must be an integer, got 'one'$"):
        torchrun_environment()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_stops_large_blocks_faulting_in_again():
    # in a fresh process: a 200 MB array allocated, filled and freed 5 times faults its pages in every
    # time by default (glibc maps blocks over 32 MB afresh), and about once after keep_freed_memory()
    # (numpy's transparent-huge-page advice is turned off so that faults count 4 KB pages)
    script = """
import resource, sys
import numpy as np
try:
    np._core.multiarray._set_madvise_hugepage(False)
except AttributeError:
    np.core.multiarray._set_madvise_hugepage(False)
if sys.argv[1] == "keep":
    from brats_cnn.device import keep_freed_memory
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
before = faults()
for _ in range(5):
    a = np.empty(50_000_000, dtype=np.float32); a.fill(1.0); del a
print(faults() - before)
"""
    pages = 200e6 / 4096
    counts = {}
    for mode in ("default", "keep"):
        result = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        counts[mode] = int(result.stdout)
    assert counts["default"] > 4 * pages
    assert counts["keep"] < 1.5 * pages
