"""AdamW with decay / no-decay parameter groups, and the learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from pretrain.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms, biases and embeddings are not decayed (GPT-3/LLaMA practice).
    Frozen parameters (a LoRA base) are left out: no optimizer state, and empty groups are
    dropped (LoRA trains matrices only)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or "tok_embeddings" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]] or groups[:1]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    impl = cfg.implementation
    if impl == "auto":
        # Fused AdamW has CPU kernels too (6 ms vs 42 ms foreach per step on the bench model).
        impl = "fused" if device.type in ("cuda", "cpu") else "foreach"
    flags = {"fused": impl == "fused", "foreach": impl == "foreach"}
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        **flags,
    )


def lr_lambda(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate after `step` optimizer steps.

    cosine: linear warmup over `warmup_steps`, then cosine from 1 to `min_lr_ratio`.
    wsd:    linear warmup, constant, then a linear decay to `min_lr_ratio` over the last
            `decay_fraction` of the steps (Hu et al. 2024, "MiniCPM").
    constant: linear warmup, then 1.
    """
    warmup = max(0, min(cfg.warmup_steps, total_steps - 1))
    floor = cfg.min_lr_ratio

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        decay_steps = max(1, int(total_steps * cfg.decay_fraction))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        return 1.0 - (1.0 - floor) * min(1.0, (step - decay_start) / decay_steps)

    return fn


def build_schedule(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
