"""The DeepSpeed backend: the same model, optimizer and schedule under a DeepSpeed engine.

`deepspeed_config` generates DeepSpeed's JSON config from ours (batch sizes, accumulation,
clipping, precision, ZeRO stage) and merges `parallel.deepspeed_extra` into it; an extra key that
contradicts a generated one is a ConfigError naming both. The optimizer is our torch AdamW with
its decay groups and the learning-rate schedule stays ours (stepped once per optimizer step), so
both backends follow the same curve. Activation checkpointing is applied to the blocks by
`pretrain.parallel.parallelize.apply_activation_checkpointing`, as on the native backend.

Checkpoints use the engine's own `save_checkpoint`/`load_checkpoint` (each rank writes its ZeRO
partition) inside our checkpoint layout: `checkpoints/step_N/deepspeed/` plus
`trainer_state.json`, per-rank RNG states and the integrity manifest, written atomically as in
`pretrain/train/checkpoint.py`.

On a machine without GPUs, set DS_ACCELERATOR=cpu; the process group (gloo) is ours.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pretrain.errors import ConfigError
from pretrain.train import checkpoint as ckpt

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


def micro_step(engine: Any, inputs: torch.Tensor, targets: torch.Tensor,
               loss_fn: Any) -> torch.Tensor:
    """Forward and backward of one micro-batch; the engine steps the optimizer (with clipping)
    itself once the accumulation boundary is reached. Returns the micro-batch's mean loss."""
    loss = loss_fn(engine(inputs), targets)
    engine.backward(loss)  # scales by 1 / gradient_accumulation_steps
    engine.step()
    return loss.detach()


def grad_norm(engine: Any) -> float:
    """The global gradient norm of the last optimizer step (before clipping)."""
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(root: Path, step: int, engine: Any, trainer_state: dict[str, Any], *,
                    keep: int) -> Path:
    """Write checkpoint `step` (collective) with the engine's API, atomically: everything goes
    into `step_N.tmp/` and the directory is renamed once the integrity manifest is written."""
    final = root / ckpt.step_dir_name(step)
    tmp = root / (final.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
    torch.save(ckpt.rng_state(), tmp / f"rng_rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        (tmp / ckpt.TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
        ckpt.write_integrity(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        (root / ckpt.LATEST).write_text(json.dumps({"checkpoint": final.name, "step": step}))
        ckpt.prune(root, keep)
    _barrier()
    return final


def is_deepspeed_checkpoint(path: Path) -> bool:
    return (path / DS_TAG).is_dir()


def check_checkpoint_backend(path: Path, *, deepspeed: bool) -> None:
    """Raise CheckpointError when `path` was written by the other backend (their formats
    differ: DeepSpeed's per-rank ZeRO partitions vs DCP's resharding-friendly files)."""
    if is_deepspeed_checkpoint(path) != deepspeed:
        writer, other = ("native", "deepspeed") if deepspeed else ("deepspeed", "native")
        raise ckpt.CheckpointError(
            f"checkpoint {path} was written by parallel.backend={writer}; resume it with "
            f"parallel.backend={writer}, not {other}, or start without it (resume=none)")


def load_checkpoint(path: Path, engine: Any) -> dict[str, Any]:
    """Load the engine's model/optimizer state and this rank's RNG; return the trainer state."""
    ckpt.verify_integrity(path)
    check_checkpoint_backend(path, deepspeed=True)
    loaded, _ = engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
    if loaded is None:
        raise ckpt.CheckpointError(f"DeepSpeed could not load {path / DS_TAG}")
    rng_path = path / f"rng_rank{_rank()}.pt"
    if rng_path.is_file():
        ckpt.set_rng_state(torch.load(rng_path, weights_only=False))
    return ckpt.load_trainer_state(path)


def full_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The whole model's weights on every rank (ZeRO-3 partitions gathered), fp32 on CPU."""
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None,
                                           enabled=engine.zero_optimization_stage() == 3):
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
