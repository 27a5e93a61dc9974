"""Run a function on N gloo ranks (spawned processes on a free port) and collect the results.

    results = run_distributed(fn, 2, arg1, arg2)   # [fn(arg1, arg2) on rank 0, ... on rank 1]

`fn` must be importable (a module-level function) because ranks are started with the spawn
method. Results travel back serialized with torch.save, so tensors are copied, not shared. A
failure on any rank raises in the caller with that rank's traceback; the other ranks are killed.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple,
            env: dict[str, str], results: Any) -> None:
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size))
    import torch.distributed as dist

    # Two cores are shared by all ranks: more threads per rank only adds contention.
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(*args)
        results.put((rank, True, _dumps(out)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any,
                    timeout: float = 300.0, env: dict[str, str] | None = None) -> list[Any]:
    """fn(*args) on `world_size` gloo ranks; returns the results ordered by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, env, results),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size:
            try:
                rank, ok, payload = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(out))} did not "
                                   f"finish within {timeout:.0f}s") from None
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            out[rank] = _loads(payload)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(world_size)]


def torchrun_cmd(nproc: int, *module_args: str) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node N -m ...`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", *module_args]
