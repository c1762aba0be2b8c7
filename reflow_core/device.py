"""Where training runs and in which precision: devices, autocast, peak FLOP/s, the process group.

Imports only the configuration layer.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from reflow_core.config import ConfigError, TrainConfig

ENV_PEAK_FLOPS = "REFLOW_PEAK_FLOPS"  # peak FLOP/s of one device, for MFU where the table below has none

# Dense peak FLOP/s per GPU (NVIDIA's data sheets halved where they quote sparsity), matched as substrings of
# torch.cuda.get_device_name() in this order, so the PCIe and NVL parts match before the SXM entry of their name
# ("NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA H100 PCIe" and "NVIDIA H100 NVL" are not). float32 means TF32.
PEAK_FLOPS = {
    "H100 PCIe": {"bfloat16": 756e12, "float32": 378e12},
    "H100 NVL": {"bfloat16": 835e12, "float32": 417.5e12},
    "H100": {"bfloat16": 989.4e12, "float32": 494.7e12},  # SXM5
    "H200 NVL": {"bfloat16": 835e12, "float32": 417.5e12},
    "H200": {"bfloat16": 989.4e12, "float32": 494.7e12},  # SXM: the H100's tensor cores with more, faster memory
    "B200": {"bfloat16": 2250e12, "float32": 1100e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "L40S": {"bfloat16": 362e12, "float32": 183e12},
}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of one device for MFU: REFLOW_PEAK_FLOPS if set, else the table for known GPUs, else None."""
    env = os.environ.get(ENV_PEAK_FLOPS)
    if env:
        return float(env)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, by_dtype in PEAK_FLOPS.items():
        if key in name:
            return by_dtype["bfloat16" if dtype == torch.bfloat16 else "float32"]
    return None


@dataclass
class Dist:
    """Where this process sits in a (possibly one-process) job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # we called init_process_group, so we destroy it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(device_type: str) -> Dist:
    """Read torchrun's RANK/LOCAL_RANK/WORLD_SIZE; join the process group (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return Dist(dist.get_rank(), local_rank, dist.get_world_size(), owns_group=False)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    return Dist(rank, local_rank, world, owns_group=True)


def resolve_device(config: TrainConfig, d: Dist) -> torch.device:
    cuda = torch.cuda.is_available()
    if config.device == "cuda" and not cuda:
        raise ConfigError("train config field 'device' is 'cuda' but no CUDA device is available "
                          f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
    if config.device == "cpu" or not cuda:
        return torch.device("cpu")
    return torch.device("cuda", d.local_rank)


@functools.cache
def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 autocast pays: one measured CPU ran a
    2048×128×50304 head matmul 2.8× faster in bf16; an AVX2-only CPU emulates bf16 and ran it 7.5× slower."""
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except (AttributeError, RuntimeError):  # a torch build without oneDNN: read the CPU flags alone
        pass
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def auto_dtype(device: torch.device) -> torch.dtype:
    """bf16 autocast on a GPU that supports it and on a CPU that computes bf16 natively; float32 elsewhere."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def resolve_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "float32":
        return torch.float32
    if config.dtype == "bfloat16":
        return torch.bfloat16
    return auto_dtype(device)


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return t


@torch.no_grad()
def autocast_for(device_type: str, dtype: torch.dtype):
    """A factory of the forward pass's context: autocast to ``dtype``, or nothing at float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type, dtype=dtype)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` torch CPU threads (small matmuls train faster on one thread when the machine is shared);
    ``None`` leaves torch's setting."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
