"""Apply parallelism from outside, in a fixed order: tensor/sequence parallel → activation
checkpointing → compile → FSDP2 or DDP. The model itself stays a plain single-device module.

Also here, because they must agree with the layouts applied above:

- `init_model_weights`: materialize and initialize a parallelized model so that it holds exactly
  the weights a single process would (layout-independent initialization);
- `clip_grad_norm_`: the global gradient norm over DTensor and plain gradients, and over the
  pipeline stages;
- `set_gradient_sync`: skip data-parallel gradient reduction on accumulation micro-batches.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    checkpoint_wrapper,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from pretrain.config import ModelConfig, ParallelConfig
from pretrain.models.build import block_stacks, build_model
from pretrain.models.llama import draw_init_seed
from pretrain.models.lora import is_lora_name, lora_init_
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

# Wrappers that insert a path component into parameter names; checkpoints and the reference
# model use the plain LLaMA names.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------- tensor parallel


class ReplicateParallel(ParallelStyle):
    """Replicate a module's parameters as DTensors and run it on replicated local inputs.

    For the norms under tensor parallelism without sequence parallelism: every parameter then
    is a DTensor on the TP mesh, because the optimizer's foreach kernels and FSDP cannot mix
    DTensors with plain tensors. Gradients need no reduction: each TP rank sees the full input.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def partition(_: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            for name, param in list(mod.named_parameters(recurse=False)):
                dt = DTensor.from_local(param, mesh, [Replicate()], run_check=False)
                mod.register_parameter(name, nn.Parameter(dt, param.requires_grad))

        def to_dtensor(_: nn.Module, inputs: tuple[Any, ...], mesh: DeviceMesh) -> tuple:
            return tuple(
                DTensor.from_local(t, mesh, [Replicate()], run_check=False)
                if isinstance(t, torch.Tensor) and not isinstance(t, DTensor) else t
                for t in inputs
            )

        def to_local(_: nn.Module, output: Any, mesh: DeviceMesh) -> Any:
            return output.to_local() if isinstance(output, DTensor) else output

        return distribute_module(module, device_mesh, partition, to_dtensor, to_local)


def root_tp_plan(sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Embedding row-wise (vocab-sharded), output column-wise (vocab-sharded, gathered logits).

    With sequence parallelism the residual stream between blocks is sharded on the sequence
    dimension (B, T/tp, dim); without it, it is replicated.
    """
    between = Shard(1) if sequence_parallel else Replicate()
    return {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=between),
        "norm": SequenceParallel() if sequence_parallel else ReplicateParallel(),
        "output": ColwiseParallel(input_layouts=between, output_layouts=Replicate()),
    }


def block_tp_plan(sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Megatron-style: wq/wk/wv/w1/w3 column-wise (heads / hidden units sharded), wo/w2
    row-wise. With sequence parallelism the norms run on sequence shards and the attention and
    feed-forward inputs are all-gathered first; wo/w2 then reduce-scatter back to shards."""
    plan: dict[str, ParallelStyle] = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
    }
    if not sequence_parallel:
        return plan | {
            "attention_norm": ReplicateParallel(),
            "ffn_norm": ReplicateParallel(),
            "attention.wo": RowwiseParallel(),
            "feed_forward.w2": RowwiseParallel(),
        }
    # Attention is called as attention(x, rope, attn_mask, kv_cache): only x is laid out.
    return plan | {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(
            input_layouts=(Shard(1), None, None, None),
            desired_input_layouts=(Replicate(), None, None, None),
            use_local_output=True,
        ),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
            use_local_output=True,
        ),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
    }


def stage_boundary_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    """Sequence parallelism on a pipeline stage: hidden states cross stage boundaries whole.

    `Transformer.forward` takes the sequence length for RoPE from its input, so a stage must
    receive (B, T, dim), not its sequence shard. The first block of a stage without the
    embedding takes its shard locally (no communication); the last block of a stage without
    the final norm all-gathers before the send. A one-block stage does both.
    """
    names = list(model.layers.keys())
    if not names:
        return {}
    split = dict(input_layouts=(Replicate(), None, None, None),
                 desired_input_layouts=(Shard(1), None, None, None))
    gather = dict(output_layouts=Shard(1), desired_output_layouts=Replicate(),
                  use_local_output=True)
    first, last = f"layers.{names[0]}", f"layers.{names[-1]}"
    needs_split, needs_gather = model.tok_embeddings is None, model.norm is None
    if needs_split and needs_gather and first == last:
        return {first: PrepareModuleInputOutput(**split, use_local_input=True, **gather)}
    plan: dict[str, ParallelStyle] = {}
    if needs_split:
        plan[first] = PrepareModuleInput(**split, use_local_output=True)
    if needs_gather:
        plan[last] = PrepareModuleOutput(**gather)
    return plan


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool) -> None:
    """Shard `model` (a whole model or a pipeline stage) over the TP mesh, in place."""
    plan = {k: v for k, v in root_tp_plan(sequence_parallel).items()
            if getattr(model, k, None) is not None}
    if sequence_parallel:
        plan |= stage_boundary_plan(model)
    parallelize_module(model, tp_mesh, plan)
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_tp_plan(sequence_parallel))


# ------------------------------------------------------------- checkpointing and compile


def _selective_context() -> Any:
    """Keep attention and every other matmul output; recompute the rest. Saving every matmul
    saves little memory, since most saved activations are matmul outputs (measured: -18% peak
    memory vs -31% with every other one, for +7% vs +5% step time)."""
    counts: dict[str, int] = defaultdict(int)

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        mode = "recompute" if ctx.is_recompute else "forward"
        if op == torch.ops.aten.mm.default:
            counts[mode] += 1
        every_other_mm = op == torch.ops.aten.mm.default and counts[mode] % 2 == 0
        save = op in _SAVE_OPS and not every_other_mm
        return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Wrap every block: 'full' recomputes the block, 'selective' keeps matmul outputs."""
    if mode == "none":
        return
    for _, stack in block_stacks(model):
        for name, block in list(stack.named_children()):
            if mode == "full":
                wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
            else:
                wrapped = checkpoint_wrapper(block, preserve_rng_state=False,
                                             context_fn=_selective_context)
            stack.register_module(name, wrapped)


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place (names unchanged); every layer shares one compiled graph.
    The chunked loss compiles its per-chunk element-wise work (`Transformer.compile_loss`)."""
    for block in _blocks(model):
        block.compile(fullgraph=True)
    if hasattr(model, "compile_loss"):
        model.compile_loss = True


def _blocks(model: nn.Module) -> list[nn.Module]:
    """Every block of every stack (an encoder-decoder has two)."""
    return [block for _, stack in block_stacks(model) for block in stack.values()]


# ---------------------------------------------------------------------- data parallel


def mixed_precision_policy(parallel: ParallelConfig, precision: str) -> MixedPrecisionPolicy:
    """FSDP2/replicate compute and reduction dtypes; `precision=fp32` keeps everything fp32
    (so an fp32 run is exact whatever `fsdp_param_dtype` says)."""
    if precision == "fp32":
        return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy(param_dtype=_DTYPES[parallel.fsdp_param_dtype],
                                reduce_dtype=_DTYPES[parallel.fsdp_reduce_dtype])


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, *, mp_policy: MixedPrecisionPolicy,
               reshard_after_forward: bool) -> None:
    """FSDP2 per block, then the root (embeddings, final norm, output): one all-gather per
    block in forward and backward, one reduce-scatter per block in backward. A 2-D mesh
    (dp_replicate, dp_shard) gives HSDP: sharded within a group, replicated across groups."""
    for block in _blocks(model):
        fully_shard(block, mesh=dp_mesh, mp_policy=mp_policy,
                    reshard_after_forward=reshard_after_forward)
    # The root's parameters are needed again right at the start of backward (output layer).
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=False)


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh, *, mp_policy: MixedPrecisionPolicy) -> None:
    """Replicated data parallel with FSDP2's engine (`replicate`): one all-reduce per block,
    overlapped with backward; unlike nn.parallel.DistributedDataParallel it composes with
    DTensor (TP) parameters and pipeline stages, and shares FSDP2's no-sync switch. (Imported
    from torch.distributed._composable: not exported publicly yet; torchtitan uses it too.)"""
    for block in _blocks(model):
        replicate(block, mesh=dp_mesh, mp_policy=mp_policy)
    replicate(model, mesh=dp_mesh, mp_policy=mp_policy)


def dp_mesh_of(dims: ParallelDims, mesh: DeviceMesh) -> DeviceMesh | None:
    """The mesh FSDP2 / replicate runs on, or None without data parallelism."""
    if dims.dp_shard > 1 and dims.dp_replicate > 1:
        return mesh["dp_replicate", "dp_shard"]
    if dims.dp_shard > 1:
        return mesh["dp_shard"]
    if dims.dp_replicate > 1:
        return mesh["dp_replicate"]
    return None


def parallelize(
    model: nn.Module,
    dims: ParallelDims,
    mesh: DeviceMesh | None,
    *,
    ac_mode: str = "none",
    compile: bool = False,
    parallel: ParallelConfig | None = None,
    precision: str = "fp32",
) -> nn.Module:
    """Return `model` (a whole model or one pipeline stage, on the meta device) with TP/SP,
    activation checkpointing, compile and data parallelism applied, in that order.

    Without a mesh (one process, or the DeepSpeed backend, which shards inside its engine) only
    activation checkpointing and compile apply. `precision=fp32` keeps FSDP/replicate compute
    in fp32 whatever `parallel.fsdp_param_dtype` says.
    """
    parallel = parallel or ParallelConfig()
    if mesh is not None and dims.tp_enabled:
        apply_tp(model, mesh["tp"], sequence_parallel=parallel.sequence_parallel)
    apply_activation_checkpointing(model, ac_mode)
    if compile:
        apply_compile(model)
    dp_mesh = dp_mesh_of(dims, mesh) if mesh is not None else None
    if dp_mesh is not None:
        policy = mixed_precision_policy(parallel, precision)
        if dims.fsdp_enabled:
            apply_fsdp(model, dp_mesh, mp_policy=policy,
                       reshard_after_forward=parallel.fsdp_reshard_after_forward)
        else:
            apply_ddp(model, dp_mesh, mp_policy=policy)
    return model


# ---------------------------------------------------------------------- initialization


def clean_fqn(name: str) -> str:
    """The plain LLaMA name of a parameter of a wrapped (checkpointed, compiled) model."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def base_seed(seed: int) -> int:
    """The base seed `Transformer.init_weights` draws after `torch.manual_seed(seed)`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return draw_init_seed()


def _top_modules(model: nn.Module) -> list[str]:
    """Names of the model's direct children that are not block stacks (embeddings, norms,
    heads), present in this part."""
    stacks = {name for name, _ in block_stacks(model)}
    return [n for n, m in model.named_children() if n not in stacks and m is not None]


def _reference(cfg: ModelConfig, blocks: Sequence[str], top: Iterable[str], seed: int) -> nn.Module:
    """A full-size (unsharded) CPU copy of part of the model, initialized: the blocks named
    "stack.i" in `blocks` and the top-level modules in `top`. Parameters are seeded by name
    (see llama.py), so a part holds the same values as the whole model."""
    ref = build_model(cfg, device="meta")
    for stack_name, stack in block_stacks(ref):
        for name in list(stack.keys()):
            if f"{stack_name}.{name}" not in blocks:
                del stack[name]
    keep = set(top)
    for name in _top_modules(ref):
        if name not in keep:
            setattr(ref, name, None)
    ref.to_empty(device="cpu")
    with torch.no_grad():
        ref.init_weights(buffer_device=torch.device("cpu"), seed=seed)
    return ref


def _copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Write this rank's piece of `full` into `target` (a DTensor of any placement, FSDP's
    strided shards included, or a plain tensor). No communication: every rank has `full`."""
    full = full.to(device=target.device, dtype=target.dtype)
    if isinstance(target, DTensor):
        shape, offset = compute_local_shape_and_global_offset(
            full.shape, target.device_mesh, target.placements)
        index = tuple(slice(o, o + s) for s, o in zip(shape, offset, strict=True))
        target.to_local().copy_(full[index])
    else:
        target.copy_(full)


def _init_part(part: nn.Module, cfg: ModelConfig, seed: int) -> None:
    params = {clean_fqn(n): p for n, p in part.named_parameters()}
    top = _top_modules(part)
    # One reference at a time (the non-block modules, then each block): host memory stays at
    # the largest piece, not the whole model.
    groups: list[tuple[list[str], list[str]]] = [([], top)]
    groups += [([f"{stack_name}.{name}"], []) for stack_name, stack in block_stacks(part)
               for name in stack.keys()]
    done: set[str] = set()
    for blocks, top_names in groups:
        ref = _reference(cfg, blocks, top_names, seed)
        for name, full in ref.named_parameters():
            if name in params and name not in done:
                _copy_full_into(params[name], full.detach())
                done.add(name)
        for name, buf in part.named_buffers():
            ref_buf = dict(ref.named_buffers()).get(clean_fqn(name))
            if ref_buf is not None:
                buf.copy_(ref_buf)
    for name in sorted(set(params) - done):
        if is_lora_name(name):  # adapters: not in the reference model, seeded by name too
            full = torch.empty(params[name].shape, dtype=torch.float32)
            lora_init_(name, full, seed)
            _copy_full_into(params[name], full)
            done.add(name)
    missing = sorted(set(params) - done)
    if missing:
        raise RuntimeError(f"init_model_weights left parameters uninitialized: {missing[:5]}")


def init_model_weights(parts: nn.Module | Sequence[nn.Module], cfg: ModelConfig, seed: int,
                       device: torch.device) -> None:
    """Materialize parallelized meta-device model parts on `device` and give every rank its
    piece of the weights a single process initializes with `seed`.

    Each rank builds the full-size weights of one block at a time on the CPU (from per-name
    seeds, so in any order) and copies its own shard. This needs host memory for the largest
    block or the embedding matrices, not for the whole model, and no communication; it is
    independent of the layout, the device type and the number of processes. DTensor's own
    random initialization is not (its RNG offsets depend on the mesh).
    """
    parts = [parts] if isinstance(parts, nn.Module) else list(parts)
    seed = base_seed(seed)
    with torch.no_grad():
        for part in parts:
            part.to_empty(device=device)
            if hasattr(part, "tie_weights"):  # to_empty unties output from tok_embeddings
                part.tie_weights()
            _init_part(part, cfg, seed)


# ----------------------------------------------------------------------- step helpers


def set_gradient_sync(parts: nn.Module | Sequence[nn.Module], enabled: bool) -> None:
    """Turn data-parallel gradient reduction on or off (off on all but the last micro-batch
    of gradient accumulation: gradients then accumulate locally and are reduced once)."""
    for part in [parts] if isinstance(parts, nn.Module) else parts:
        if isinstance(part, FSDPModule):
            part.set_requires_gradient_sync(enabled)


def _mesh_key(t: torch.Tensor) -> Any:
    return t.device_mesh if isinstance(t, DTensor) else None


def clip_grad_norm_(
    parameters: Iterable[torch.Tensor],
    max_norm: float,
    *,
    pp_mesh: DeviceMesh | None = None,
    foreach: bool | None = None,
) -> torch.Tensor:
    """Clip gradients to a global 2-norm and return that norm (before clipping).

    Works for any mix of plain and DTensor gradients (FSDP shards, TP shards, replicas): the
    norm of each group of DTensors on one mesh is reduced over that mesh, groups combine by
    squares, and with pipeline parallelism the squares are summed over the stages.
    """
    params = [p for p in parameters if p.grad is not None]
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault(_mesh_key(p.grad), []).append(p)
    squares = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], 2.0, foreach=foreach)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float() ** 2)
    device = params[0].grad.device if params else torch.device("cpu")
    total_sq = torch.stack(squares).sum() if squares else torch.zeros((), device=device)
    if pp_mesh is not None and pp_mesh.size() > 1:
        dist.all_reduce(total_sq, group=pp_mesh.get_group())
    total = total_sq.sqrt()
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=foreach)
    return total
