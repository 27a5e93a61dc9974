"""The measured side of the memory estimate: the peak resident-set growth of real training steps.

`measure_cpu_peak` builds the trainer's own train module (`pretrain.train.module`) from a
`TrainConfig` (its model, optimizer and parallel sub-configs and `StepSettings.of`) on one CPU
process, layout `ParallelDims(1, 1, 1, 1, 1)` without a mesh, and calls `train_step` `steps`
times, each on the config's global_batch_size / micro_batch_size micro-batches of synthetic
windows: the step users run (the loss the config picks, chunked by default; fused AdamW;
gradient accumulation; the config's precision and activation checkpointing), not a copy. It
reports the growth of the process's resident set from before the module is built to its
highest point (VmHWM), which the estimate of `pretrain.parallel.memory.estimate_memory` is
checked against (tests/unit/test_memory.py, the README's table,
`pretrain-estimate-memory --measure`).

Linux only. For figures that track live tensors rather than the C allocator's caching, run it in
a fresh process started with MALLOC_MMAP_THRESHOLD_=65536 (glibc then maps every large tensor
and unmaps it when freed): `measure_cpu_peak_in_subprocess` does so.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from pretrain.config import (
    LoraConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    QuantConfig,
    TrainConfig,
)
from pretrain.data.loader import Batch
from pretrain.parallel.dims import ParallelDims
from pretrain.train.host import trim_heap
from pretrain.train.module import StepSettings, build_train_module

_CPU = torch.device("cpu")

__all__ = ["measure_cpu_peak", "measure_cpu_peak_in_subprocess"]


def measure_cpu_peak(cfg: TrainConfig, *, steps: int = 2) -> int:
    """Peak resident-set growth in bytes over `steps` single-process CPU training steps of the
    train module `cfg` builds (see the module docstring); windows of cfg.seq_len tokens, in the
    config's precision (the estimate is checked in fp32: CPU autocast adds temporaries a GPU
    run does not have)."""
    return _measure(cfg.model, cfg.optim, cfg.parallel, StepSettings.of(cfg, _CPU),
                    seq_len=cfg.seq_len, steps=steps)


def _measure(model: ModelConfig, optim: OptimConfig, parallel: ParallelConfig,
             settings: StepSettings, *, seq_len: int, steps: int) -> int:
    if settings.global_batch_size % settings.micro_batch_size:
        raise ValueError(f"global_batch_size={settings.global_batch_size} is not a multiple of "
                         f"micro_batch_size={settings.micro_batch_size} (one process)")
    gen = torch.Generator().manual_seed(settings.seed)
    shape = (settings.micro_batch_size, seq_len)
    batch = Batch(torch.randint(0, model.vocab_size, shape, generator=gen),
                  torch.randint(0, model.vocab_size, shape, generator=gen))
    gc.collect()
    trim_heap()  # freed heap pages left resident by earlier work would hide the growth
    _reset_peak_rss()
    base = _proc_status_bytes("VmRSS")
    module = build_train_module(model=model, optim=optim, parallel=parallel, settings=settings,
                                dims=ParallelDims(1, 1, 1, 1, 1), mesh=None, device=_CPU,
                                total_steps=steps)
    for _ in range(steps):
        module.train_step([batch] * module.grad_accum)
    return _proc_status_bytes("VmHWM") - base


def measure_cpu_peak_in_subprocess(cfg: TrainConfig, *, steps: int = 2,
                                   timeout_s: float = 600) -> int:
    """`measure_cpu_peak` in a fresh Python process (one thread) that maps large tensors."""
    settings = StepSettings.of(cfg, _CPU)
    payload = {"model": asdict(cfg.model), "optim": asdict(cfg.optim),
               "parallel": asdict(cfg.parallel), "settings": asdict(settings),
               "seq_len": cfg.seq_len, "steps": steps}
    code = (
        "import json, sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from pretrain.perf.memory import _measure_json\n"
        "print(_measure_json(json.loads(sys.argv[1])))\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(payload)],
                          env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement failed:\n{proc.stderr[-3000:]}")
    return int(proc.stdout.split()[-1])


def _measure_json(payload: dict) -> int:
    """`_measure` of the sub-configs `measure_cpu_peak_in_subprocess` sent as JSON."""
    s = payload["settings"]
    # asdict made the nested configs dicts
    lora = LoraConfig(**s["lora"]) if s.get("lora") else None
    settings = StepSettings(**{**s, "sdpa_backends": tuple(s["sdpa_backends"]), "lora": lora,
                               "quant": QuantConfig(**s["quant"])})
    return _measure(ModelConfig(**payload["model"]), OptimConfig(**payload["optim"]),
                    ParallelConfig(**payload["parallel"]), settings,
                    seq_len=payload["seq_len"], steps=payload["steps"])


def _proc_status_bytes(field: str) -> int:
    """A `kB` field of /proc/self/status (Linux) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    """Start VmHWM afresh from the current RSS (Linux >= 4.0; harmless where refused)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
