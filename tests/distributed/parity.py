"""A tiny fp32 training run under any layout, for comparing layouts with one process.

`train(layout)` runs on every rank of a process group (or alone, without one): the same model,
initial weights, data and optimizer as every other layout. It returns the per-step losses and,
on the ranks that hold a full copy of some weights after gathering, those weights by name.
The loss is the trainer's: chunked (inside the model's forward) for one process and the data
parallel layouts, the full-logits one under tensor or pipeline parallelism.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from pretrain.config import ModelConfig, OptimConfig, ParallelConfig, output_whole_on_one_rank
from pretrain.models.llama import build_model
from pretrain.models.loss import cross_entropy
from pretrain.parallel.dims import ParallelDims
from pretrain.parallel.parallelize import (
    clip_grad_norm_,
    init_model_weights,
    parallelize,
    set_gradient_sync,
)
from pretrain.parallel.pipeline import build_pipeline, pipeline_split, pipeline_step
from pretrain.train.optim import build_optimizer

TINY = ModelConfig(name="tiny", dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=128,
                   multiple_of=32, max_seq_len=32)
SEED = 1234
STEPS = 10
SEQ = 16
GLOBAL_BATCH = 8
# Large enough that weights move well beyond the 1e-5 tolerance in 10 steps; the clip is
# exercised (the norm starts above it).
OPTIM = OptimConfig(lr=3e-3, eps=1e-6, warmup_steps=0, weight_decay=0.1, grad_clip=0.5,
                    implementation="foreach")


@dataclass(frozen=True)
class Layout:
    """One parallel layout under test."""

    name: str
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = True
    pp_schedule: str = "1F1B"
    pp_virtual_stages: int = 1
    pp_microbatches: int = 2
    micro_batch_size: int = 2
    zero_stage: int = 0
    ac_mode: str = "none"
    reshard_after_forward: bool = True

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    def parallel(self) -> ParallelConfig:
        return ParallelConfig(
            backend="deepspeed" if self.zero_stage else "native",
            dp_replicate=self.dp_replicate, dp_shard=self.dp_shard, tp=self.tp, pp=self.pp,
            sequence_parallel=self.sequence_parallel, pp_schedule=self.pp_schedule,
            pp_virtual_stages=self.pp_virtual_stages, pp_microbatches=self.pp_microbatches,
            fsdp_param_dtype="fp32", zero_stage=self.zero_stage,
            fsdp_reshard_after_forward=self.reshard_after_forward,
        )


SINGLE = Layout("single", micro_batch_size=4)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of `step`: (GLOBAL_BATCH, SEQ) inputs and shifted targets."""
    g = torch.Generator().manual_seed(SEED + step)
    windows = torch.randint(0, TINY.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return windows[:, :-1], windows[:, 1:]


def micro_batches(step: int, dp_rank: int, dp: int, micro: int):
    """This data-parallel rank's micro-batches of `step` (its contiguous slice of rows)."""
    inputs, targets = batch(step)
    per_rank = GLOBAL_BATCH // dp
    rows = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    inputs, targets = inputs[rows], targets[rows]
    for i in range(0, per_rank, micro):
        yield inputs[i:i + micro], targets[i:i + micro]


def _full_weights(parts: list[nn.Module]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        sd = get_model_state_dict(part, options=StateDictOptions(full_state_dict=True))
        out.update({k: v.detach().clone() for k, v in sd.items()})
    return out


def _dp_loss_mean(loss: torch.Tensor, mesh, dims: ParallelDims) -> float:
    if dims.dp > 1:
        dist.all_reduce(loss, group=mesh["dp"].get_group())
        loss = loss / dims.dp
    return float(loss)


def train(layout: Layout, steps: int = STEPS) -> dict:
    """Train `layout` for `steps`; returns {"losses": [...], "weights": {...}}."""
    if layout.zero_stage:
        from tests.distributed.parity_deepspeed import train_deepspeed

        return train_deepspeed(layout, steps)
    world = dist.get_world_size() if dist.is_initialized() else 1
    p = layout.parallel()
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, p.pp, world)
    mesh = dims.build_mesh("cpu")
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    grad_accum = GLOBAL_BATCH // (layout.micro_batch_size * dims.dp)
    model = build_model(TINY, device="meta")
    pipe = None
    if dims.pp_enabled:
        stages = pipeline_split(model, pp_rank=mesh["pp"].get_local_rank(), pp=dims.pp,
                                virtual_stages=p.pp_virtual_stages, schedule=p.pp_schedule)
        for _, part in stages:
            parallelize(part, dims, mesh, ac_mode=layout.ac_mode, parallel=p, precision="fp32")
        parts = [part for _, part in stages]
        pipe = build_pipeline(stages, pp_mesh=mesh["pp"], device=torch.device("cpu"),
                              schedule=p.pp_schedule, n_microbatches=p.pp_microbatches,
                              loss_fn=cross_entropy, grad_accum=grad_accum)
    else:
        parts = [parallelize(model, dims, mesh, ac_mode=layout.ac_mode, parallel=p,
                             precision="fp32")]
    init_model_weights(parts, TINY, SEED, torch.device("cpu"))
    initial = _full_weights(parts)
    optimizer = build_optimizer(nn.ModuleList(parts), OPTIM, torch.device("cpu"))
    params = [q for part in parts for q in part.parameters()]
    chunked = output_whole_on_one_rank(p)  # as loss=auto in the trainer
    losses, norms = [], []
    for step in range(steps):
        loss_sum = torch.zeros(())
        mbs = list(micro_batches(step, dp_rank, dims.dp, layout.micro_batch_size))
        for i, (x, y) in enumerate(mbs):
            set_gradient_sync(parts, i == len(mbs) - 1)
            if pipe is not None:
                loss_sum += pipeline_step(pipe, x, y) / grad_accum
            else:
                model = parts[0]
                loss = model(x, targets=y) if chunked else cross_entropy(model(x), y)
                loss = loss / grad_accum
                loss.backward()
                loss_sum += loss.detach()
        pp_mesh = mesh["pp"] if dims.pp_enabled else None
        norms.append(float(clip_grad_norm_(params, OPTIM.grad_clip, pp_mesh=pp_mesh)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(_dp_loss_mean(loss_sum, mesh, dims))
    return {"losses": losses, "grad_norms": norms, "weights": _full_weights(parts),
            "initial": initial, "rank": int(os.environ.get("RANK", 0))}


def train_many(layouts: list[Layout], steps: int = STEPS) -> dict[str, dict]:
    """Several layouts in one process group (spawning ranks costs more than tiny runs)."""
    return {layout.name: train(layout, steps) for layout in layouts}


def merge_weights(results: list[dict], key: str = "weights") -> dict[str, torch.Tensor]:
    """The union over ranks of gathered weights (pipeline stages each hold some)."""
    merged: dict[str, torch.Tensor] = {}
    for r in results:
        for k, v in r[key].items():
            merged.setdefault(k, v)
    return merged


def max_rel_loss_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
