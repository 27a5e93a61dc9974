"""The DeepSpeed backend: the same model, optimizer and schedule under a DeepSpeed engine.

`deepspeed_config` generates DeepSpeed's JSON config from ours (batch sizes, accumulation,
clipping, precision, ZeRO stage) and merges `parallel.deepspeed_extra` into it; an extra key that
contradicts a generated one is a ConfigError naming both. The optimizer is our torch AdamW with
its decay groups and the learning-rate schedule stays ours (stepped once per optimizer step), so
both backends follow the same curve. Activation checkpointing is applied to the blocks by
`pretrain.parallel.parallelize.apply_activation_checkpointing`, as on the native backend.

Checkpoints use the engine's own `save_checkpoint`/`load_checkpoint` (each rank writes its ZeRO
partition) into `checkpoints/step_N/deepspeed/`; everything else about a checkpoint (the atomic
`.tmp` directory, `trainer_state.json`, per-rank RNG states, the integrity manifest, `latest`,
retention) is `pretrain/train/checkpoint.py`'s, the same code as for native checkpoints.

On a machine without GPUs, set DS_ACCELERATOR=cpu; the process group (gloo) is ours.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.errors import CheckpointError, ConfigError

DS_TAG = "deepspeed"

# Where each generated DeepSpeed key comes from, for error messages.
_SOURCES = {
    "train_batch_size": "global_batch_size",
    "train_micro_batch_size_per_gpu": "micro_batch_size",
    "gradient_accumulation_steps": "global_batch_size / (micro_batch_size × world size)",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "parallel.zero_stage",
    "bf16.enabled": "precision",
    "fp16.enabled": "precision",
}
# Sections we own outright: the optimizer is our AdamW, the schedule is ours.
_OWNED = {"optimizer": "optim.* (pretrain builds the AdamW optimizer)",
          "scheduler": "optim.schedule (pretrain steps the learning-rate schedule)"}


def generated_config(*, zero_stage: int, precision: str, global_batch_size: int,
                     micro_batch_size: int, world_size: int, grad_clip: float) -> dict[str, Any]:
    """DeepSpeed's config from our values, before `deepspeed_extra` is merged."""
    if global_batch_size % (micro_batch_size * world_size):
        raise ConfigError(
            f"global_batch_size={global_batch_size} is not divisible by micro_batch_size="
            f"{micro_batch_size} × world size {world_size}; change one of them")
    cfg: dict[str, Any] = {
        "train_batch_size": global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": global_batch_size // (micro_batch_size * world_size),
        "gradient_clipping": float(grad_clip),
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # Our torch AdamW is not on DeepSpeed's list of ZeRO-tested optimizers; it works.
        "zero_allow_untested_optimizer": True,
        # Our loggers report; DeepSpeed's own periodic prints would interleave with them.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision == "fp16":
        cfg["fp16"] |= {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000}
    return cfg


def merge_extra(base: dict[str, Any], extra: Mapping[str, Any], path: str = "") -> dict[str, Any]:
    """`base` with `extra` merged in; raise ConfigError when `extra` changes a value that our
    config determines (equal values are fine)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        dotted = f"{path}{key}"
        if not path and key in _OWNED:
            raise ConfigError(f"parallel.deepspeed_extra.{key} is not allowed: it is set by "
                              f"{_OWNED[key]}")
        if key not in out:
            out[key] = copy.deepcopy(value)
        elif isinstance(out[key], dict) and isinstance(value, Mapping):
            out[key] = merge_extra(out[key], value, f"{dotted}.")
        elif out[key] != value:
            source = _SOURCES.get(dotted, dotted)
            raise ConfigError(
                f"parallel.deepspeed_extra.{dotted}={value!r} contradicts {source} "
                f"(which gives {dotted}={out[key]!r}); change {source} instead, or drop the "
                "extra key")
    return out


def deepspeed_config(*, zero_stage: int, precision: str, global_batch_size: int,
                     micro_batch_size: int, world_size: int, grad_clip: float,
                     extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The full DeepSpeed config: generated keys plus `parallel.deepspeed_extra`."""
    base = generated_config(zero_stage=zero_stage, precision=precision,
                            global_batch_size=global_batch_size,
                            micro_batch_size=micro_batch_size, world_size=world_size,
                            grad_clip=grad_clip)
    return merge_extra(base, extra or {})


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer,
               config: dict[str, Any]) -> Any:
    """Wrap `model` and our `optimizer` in a DeepSpeed engine (the process group exists)."""
    import deepspeed  # heavy, and only needed on this backend

    # The engine's optimizer keeps our param groups, so our LambdaLR keeps driving their lr.
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                           dist_init_required=False)
    return engine


def micro_step(engine: Any, loss_of: Any) -> torch.Tensor:
    """Forward and backward of one micro-batch, whose mean loss `loss_of(engine)` computes
    (calling the engine as the model); the engine steps the optimizer (with clipping) itself
    once the accumulation boundary is reached. Returns the micro-batch's mean loss."""
    loss = loss_of(engine)
    engine.backward(loss)  # scales by 1 / gradient_accumulation_steps
    engine.step()
    return loss.detach()


def grad_norm(engine: Any) -> float:
    """The global gradient norm of the last optimizer step (before clipping)."""
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def save_engine(engine: Any, path: Path) -> None:
    """The engine's model and optimizer state (each rank its ZeRO partition) into checkpoint
    directory `path`, under `deepspeed/` (collective). The atomic write, integrity manifest,
    RNG states and retention are the checkpointer's, as for native checkpoints."""
    engine.save_checkpoint(str(path), tag=DS_TAG, save_latest=False)


def load_engine(engine: Any, path: Path) -> None:
    """Load what `save_engine` wrote (collective)."""
    loaded, _ = engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load {path / DS_TAG}")


def is_deepspeed_checkpoint(path: Path) -> bool:
    return (path / DS_TAG).is_dir()


def full_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The whole model's weights on every rank (ZeRO-3 partitions gathered), fp32 on CPU."""
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None,
                                           enabled=engine.zero_optimization_stage() == 3):
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
