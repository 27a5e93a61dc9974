"""Pipeline parallelism with `torch.distributed.pipelining`.

The model (on the meta device) is split by layers into `pp × pp_virtual_stages` stages. A stage
is a copy of the whole `Transformer` with the modules it does not own deleted: blocks removed
from `layers`, `tok_embeddings` / `norm` / `output` set to None. Names of what remains are those
of the whole model (`layers.7.attention.wq.weight` stays so on any stage), so checkpoints are
layout independent. Each stage is then parallelized (TP, FSDP) on the pp-rank's sub-mesh like a
whole model would be.

Stage placement: "loop" (stage s on pp rank s mod pp) for all schedules but the V-shaped ones
(ZBVZeroBubble, DualPipeV), where pp rank r holds stages r and 2·pp−1−r, so the first and the
last stage share rank 0.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleSingle,
    _PipelineSchedule,
    get_schedule_class,
)

from pretrain.errors import ConfigError
from pretrain.models.loss import IGNORE_INDEX

# Schedules that run one stage per rank; every other one runs `pp_virtual_stages` per rank.
SINGLE_STAGE_SCHEDULES = ("GPipe", "1F1B")
# Multi-stage schedules with the V-shaped placement; they need exactly two stages per rank.
V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")
MULTI_STAGE_SCHEDULES = ("Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", *V_SCHEDULES)
SCHEDULES = (*SINGLE_STAGE_SCHEDULES, *MULTI_STAGE_SCHEDULES)


def check_schedule(name: str, virtual_stages: int) -> None:
    """Raise ConfigError when `name` is unknown or cannot run `virtual_stages` stages per rank."""
    if name not in SCHEDULES:
        raise ConfigError(f"parallel.pp_schedule={name!r}; use one of {', '.join(SCHEDULES)}")
    if name in SINGLE_STAGE_SCHEDULES and virtual_stages != 1:
        raise ConfigError(
            f"parallel.pp_schedule={name} runs one stage per rank but "
            f"parallel.pp_virtual_stages={virtual_stages}; set it to 1 or use Interleaved1F1B"
        )
    if name in V_SCHEDULES and virtual_stages != 2:
        raise ConfigError(
            f"parallel.pp_schedule={name} needs parallel.pp_virtual_stages=2 "
            f"(got {virtual_stages})"
        )


def stage_layers(n_layers: int, n_stages: int) -> list[list[int]]:
    """Consecutive layer ids per stage, as even as possible; the first stages take the extra
    layers because the last one also runs the output projection and the loss."""
    if n_stages > n_layers:
        raise ConfigError(f"{n_stages} pipeline stages need at least {n_stages} layers, the model "
                          f"has {n_layers}; lower parallel.pp or parallel.pp_virtual_stages")
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def stage_ids(pp_rank: int, pp: int, virtual_stages: int, schedule: str) -> list[int]:
    """The stages pipeline rank `pp_rank` runs, in order."""
    if schedule in V_SCHEDULES:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + v * pp for v in range(virtual_stages)]


def split_stage(model: nn.Module, stage: int, n_stages: int) -> nn.Module:
    """A copy of the meta-device `model` holding only stage `stage` (names unchanged)."""
    keep = {str(i) for i in stage_layers(len(model.layers), n_stages)[stage]}
    part = copy.deepcopy(model)
    for name in list(part.layers.keys()):
        if name not in keep:
            del part.layers[name]
    if stage != 0:
        part.tok_embeddings = None
    if stage != n_stages - 1:
        part.norm = None
        part.output = None
    return part


def pipeline_split(model: nn.Module, *, pp_rank: int, pp: int, virtual_stages: int,
                   schedule: str) -> list[tuple[int, nn.Module]]:
    """(stage id, stage module) for every stage this rank runs."""
    check_schedule(schedule, virtual_stages)
    n_stages = pp * virtual_stages
    return [(s, split_stage(model, s, n_stages))
            for s in stage_ids(pp_rank, pp, virtual_stages, schedule)]


@dataclass
class Pipeline:
    """The stages of one pipeline rank and the schedule that drives them."""

    schedule: _PipelineSchedule
    stages: list[PipelineStage]
    parts: list[nn.Module]
    pp_mesh: DeviceMesh
    n_microbatches: int
    schedule_name: str
    grad_accum: int
    """The accumulation steps the schedule's loss is scaled for (see `build_pipeline`)."""
    loss_mode: dict[str, bool]
    """{"sum": True} while `pipeline_eval_sum` runs: the loss is then summed over tokens."""

    @property
    def has_first(self) -> bool:
        return any(s.is_first for s in self.stages)

    @property
    def has_last(self) -> bool:
        return any(s.is_last for s in self.stages)


def build_pipeline(
    parts: list[tuple[int, nn.Module]],
    *,
    pp_mesh: DeviceMesh,
    device: torch.device,
    schedule: str,
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    grad_accum: int = 1,
) -> Pipeline:
    """Stages and schedule for the (already parallelized) stage modules `parts`.

    `loss_fn` is the plain mean loss of one micro-batch. The schedule's loss divides it by
    `n_microbatches * grad_accum`, so that gradients accumulated over the micro-batches of one
    schedule step and over `grad_accum` steps are those of the mean loss over all of them (the
    schedule's own `scale_grads` would rescale gradients already accumulated by earlier steps).
    """
    n_stages = pp_mesh.size() * len(parts)
    group = pp_mesh.get_group()
    stages = [PipelineStage(module, stage_index=sid, num_stages=n_stages, device=device,
                            group=group) for sid, module in parts]
    scale = 1.0 / (n_microbatches * grad_accum)
    mode = {"sum": False}

    def scaled_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(output, target)
        if mode["sum"]:  # evaluation: summed over the targets that count (padding rows do not)
            count = (target != IGNORE_INDEX).sum()
            return torch.where(count > 0, loss * count, torch.zeros_like(loss))
        return loss * scale

    cls = get_schedule_class(schedule)
    if issubclass(cls, PipelineScheduleSingle):
        sched = cls(stages[0], n_microbatches=n_microbatches, loss_fn=scaled_loss,
                    scale_grads=False)
    else:
        sched = cls(stages, n_microbatches=n_microbatches, loss_fn=scaled_loss,
                    scale_grads=False)
    return Pipeline(schedule=sched, stages=stages, parts=[m for _, m in parts], pp_mesh=pp_mesh,
                    n_microbatches=n_microbatches, schedule_name=schedule, grad_accum=grad_accum,
                    loss_mode=mode)


def _run(pipe: Pipeline, inputs: torch.Tensor, targets: torch.Tensor, *,
         train: bool, unscale: float) -> torch.Tensor:
    losses: list[torch.Tensor] = []
    args = (inputs,) if pipe.has_first else ()
    target = targets if pipe.has_last else None
    run = pipe.schedule.step if train else pipe.schedule.eval
    run(*args, target=target, losses=losses if pipe.has_last else None)
    if losses:
        loss = torch.stack([x.detach().float() for x in losses]).sum() * unscale
    else:
        loss = torch.zeros((), device=inputs.device)
    loss = loss.reshape(()).to(inputs.device)
    # Only the last stage has the loss; every rank returns it (ranks of other stages add 0).
    dist.all_reduce(loss, group=pipe.pp_mesh.get_group())
    return loss


def pipeline_step(pipe: Pipeline, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Forward and backward of one batch (split into micro-batches) through the pipeline;
    gradients (scaled for `pipe.grad_accum` accumulation steps) accumulate in the stage
    modules. Returns the batch's mean loss on every rank."""
    # Undoing the schedule's loss scaling gives the mean loss of this batch.
    return _run(pipe, inputs, targets, train=True, unscale=pipe.grad_accum)


def pipeline_eval_sum(pipe: Pipeline, inputs: torch.Tensor,
                      targets: torch.Tensor) -> torch.Tensor:
    """Forward only; the batch's loss summed over its targets that are not IGNORE_INDEX, on
    every rank.

    The V-shaped schedules (ZBVZeroBubble, DualPipeV) cannot run forward-only in PyTorch (their
    action lists always contain the split backward), so there evaluation runs a full step and
    discards the gradients; call it only between optimizer steps (gradients are None then).
    """
    pipe.loss_mode["sum"] = True
    for part in pipe.parts:
        part.eval()
    try:
        if pipe.schedule_name in V_SCHEDULES:
            loss = _run(pipe, inputs, targets, train=True, unscale=1.0)
            for part in pipe.parts:
                part.zero_grad(set_to_none=True)
            return loss
        with torch.no_grad():
            return _run(pipe, inputs, targets, train=False, unscale=1.0)
    finally:
        pipe.loss_mode["sum"] = False
        for part in pipe.parts:
            part.train()


def local_model(parts: list[nn.Module]) -> nn.Module:
    """One module over this rank's stage modules whose parameter names are the whole model's
    (`layers.7...`, `tok_embeddings...`): what the optimizer, gradient clipping and checkpoints
    see under pipeline parallelism. It shares the stages' modules (no copy) and has no forward:
    the schedule runs the stages."""
    model = nn.Module()
    model.layers = nn.ModuleDict()
    for part in parts:
        for name, block in part.layers.items():
            model.layers[name] = block
        for name in ("tok_embeddings", "norm", "output"):
            if getattr(part, name) is not None:
                setattr(model, name, getattr(part, name))
    return model
