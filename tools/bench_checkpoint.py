"""Checkpoint save/load times for a model preset with a full AdamW state, on this machine.

    pretrain-bench-checkpoint model=cpu model=125m --out /tmp/ckpt-bench

Sync save, async save (time until training may continue, and until the checkpoint is final),
and load, each the median of --repeats; a table and, with --json, JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from launch.common import config_dir
from pretrain.config import ModelConfig, OptimConfig
from pretrain.models.llama import build_model, count_params
from pretrain.train import checkpoint as ckpt
from pretrain.train.optim import build_optimizer


def _model_and_optimizer(preset: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    conf = Path(config_dir()) / "model" / f"{preset}.yaml"
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                              OmegaConf.load(conf)))
    model = build_model(cfg, device="cpu")
    opt = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    for p in model.parameters():  # a real optimizer state: exp_avg and exp_avg_sq everywhere
        p.grad = torch.zeros_like(p)
    opt.step()
    return model, opt


def bench(preset: str, out: Path, repeats: int) -> dict[str, float]:
    model, opt = _model_and_optimizer(preset)
    state = {"app": ckpt.ModelOptimState(model, opt), "counters": ckpt.Record({"step": 1})}
    sync, async_return, async_final, load = [], [], [], []
    for i in range(repeats):
        root = out / preset / str(i)
        t = time.perf_counter()
        path = ckpt.save_checkpoint(root / "sync", 1, state, keep=0)
        sync.append(time.perf_counter() - t)
        saver = ckpt.Checkpointer(root / "async", keep=0, async_save=True)
        t = time.perf_counter()
        saver.save(1, state)
        async_return.append(time.perf_counter() - t)
        saver.wait()
        async_final.append(time.perf_counter() - t)
        t = time.perf_counter()
        ckpt.load_checkpoint(path, model, opt)
        load.append(time.perf_counter() - t)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        shutil.rmtree(root)
    return {"preset": preset, "params": count_params(model.config), "size_mb": size / 2**20,
            "save_sync_s": statistics.median(sync),
            "save_async_return_s": statistics.median(async_return),
            "save_async_final_s": statistics.median(async_final),
            "load_s": statistics.median(load)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("presets", nargs="*", default=["cpu", "125m"], help="model presets")
    p.add_argument("--out", default="/tmp/pretrain-ckpt-bench", help="scratch directory")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    rows = [bench(name.removeprefix("model="), Path(args.out), args.repeats)
            for name in args.presets]
    print(f"{'preset':>8} {'params':>8} {'size MB':>8} {'sync save':>10} {'async ret':>10} "
          f"{'async done':>10} {'load':>8}")
    for r in rows:
        print(f"{r['preset']:>8} {r['params'] / 1e6:>7.1f}M {r['size_mb']:>8.0f} "
              f"{r['save_sync_s']:>9.2f}s {r['save_async_return_s']:>9.2f}s "
              f"{r['save_async_final_s']:>9.2f}s {r['load_s']:>7.2f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
