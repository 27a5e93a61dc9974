"""Throughput, MFU and memory: the numbers every step reports."""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' data sheets.
GPU_BF16_PEAK = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16: the V100 has no bf16
}


def gpu_peak_flops(name: str) -> float | None:
    for key in sorted(GPU_BF16_PEAK, key=len, reverse=True):
        if key.lower() in name.lower():
            return GPU_BF16_PEAK[key]
    return None


def measure_cpu_bf16_flops(n: int = 2048, repeats: int = 4) -> float:
    """The machine's bf16 matmul rate with all intra-op threads: the CPU's practical peak."""
    a = torch.randn(n, n, dtype=torch.bfloat16)
    b = torch.randn(n, n, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def cpu_peak_flops(cache_dir: str | None = None) -> float:
    """The best bf16 matmul rate this machine has shown (per thread count and torch version).

    Each call measures again (~1 s) and keeps the maximum in the cache: a measurement taken
    while other processes load the CPU can only underestimate the peak, never overstate it.
    """
    key = f"{os.uname().nodename}-{torch.get_num_threads()}-{torch.__version__}"
    path = Path(cache_dir) / "cpu_peak_flops.json" if cache_dir else None
    best = measure_cpu_bf16_flops()
    if path is not None:
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            cached = {}
        if cached.get("key") == key:
            best = max(best, float(cached["flops"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "flops": best}))
    return best


def device_peak_flops(device: torch.device, cache_dir: str | None = None) -> tuple[float, str]:
    """(peak bf16 FLOP/s, where the figure comes from) for MFU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name)
        if peak is not None:
            return peak, f"{name} data sheet"
        return 989e12, f"{name} unknown: H100 peak assumed"
    return cpu_peak_flops(cache_dir), "measured CPU bf16 matmul rate"


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak RSS on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
