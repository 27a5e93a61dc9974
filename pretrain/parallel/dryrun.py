"""Validate a large layout on one CPU process, without GPUs, before booking the cluster.

For every pipeline rank, the process joins a fake process group (no communication; collectives
return immediately) as the first global rank of that pipeline rank, builds the DeviceMesh,
builds the model on the meta device, splits off its stages and applies the real
`parallelize()` (TP/SP plans, activation checkpointing, FSDP2/replicate). The parameters each
rank would hold are read off the resulting DTensors, so the figures come from the same code a
real run executes, not from a formula; the memory estimate of `memory.py` is printed next to
them. Nothing is allocated (meta device), so Llama-2 70B on 512 ranks takes seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from pretrain.config import ModelConfig, ParallelConfig
from pretrain.models.build import build_model
from pretrain.parallel.dims import ParallelDims
from pretrain.parallel.memory import GIB, MemoryEstimate, estimate_memory
from pretrain.parallel.parallelize import parallelize
from pretrain.parallel.pipeline import pipeline_split, stage_layers


@dataclass
class StageReport:
    """What one pipeline rank holds (its coordinate-0 rank; other ranks hold equal or smaller
    shards)."""

    pp_rank: int
    global_rank: int
    stages: list[int]
    layers: list[list[int]]
    modules: list[list[str]]
    local_params: int
    memory: MemoryEstimate


@dataclass
class DryRunReport:
    mesh: str
    world_size: int
    n_stages: int
    layers_per_stage: list[int]
    ranks: list[StageReport]

    def format(self) -> str:
        lines = [f"mesh: {self.mesh}", f"world size: {self.world_size} (fake process group)",
                 f"pipeline stages: {self.n_stages}, layers per stage: {self.layers_per_stage}"]
        for r in self.ranks:
            parts = []
            for stage, layers, mods in zip(r.stages, r.layers, r.modules, strict=True):
                span = f"layers {layers[0]}-{layers[-1]}" if layers else "no layers"
                extra = f" + {', '.join(mods)}" if mods else ""
                parts.append(f"stage {stage}: {span}{extra}")
            lines.append(f"pp rank {r.pp_rank} (global rank {r.global_rank}): " + "; ".join(parts))
            lines.append(f"  parameters per rank: {r.local_params:,} "
                         f"({r.local_params * 4 / GIB:.2f} GiB in fp32)")
            lines += ["  " + line for line in r.memory.format().splitlines()[1:]]
        return "\n".join(lines)


def _local_numel(module: nn.Module) -> int:
    return sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel()
               for p in module.parameters())


def _rank_report(model_cfg: ModelConfig, parallel: ParallelConfig, dims: ParallelDims,
                 pp_rank: int, *, ac_mode: str, precision: str,
                 memory: MemoryEstimate) -> tuple[StageReport, str]:
    """Join the fake group as the first rank of pipeline rank `pp_rank` and parallelize; returns
    the report and the mesh as text."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # test utility

    global_rank = pp_rank * (dims.world_size // dims.pp)  # pp is the outermost mesh dim
    dist.init_process_group("fake", store=FakeStore(), rank=global_rank,
                            world_size=dims.world_size)
    try:
        mesh = dims.build_mesh("cpu")
        model = build_model(model_cfg, device="meta")
        if dims.pp_enabled:
            stages = pipeline_split(model, pp_rank=pp_rank, pp=dims.pp,
                                    virtual_stages=parallel.pp_virtual_stages,
                                    schedule=parallel.pp_schedule)
        else:
            stages = [(0, model)]
        # DeepSpeed partitions inside deepspeed.initialize: its counts come from the estimate.
        deepspeed = parallel.backend == "deepspeed"
        for _, part in stages:
            parallelize(part, dims, None if deepspeed else mesh, ac_mode=ac_mode,
                        parallel=parallel, precision=precision)
        local = (memory.local_params if deepspeed
                 else sum(_local_numel(part) for _, part in stages))
        report = StageReport(
            pp_rank=pp_rank, global_rank=global_rank, stages=[s for s, _ in stages],
            layers=[[int(k) for k in part.layers.keys()] for _, part in stages],
            modules=[[n for n in ("tok_embeddings", "norm", "output")
                      if getattr(part, n) is not None] for _, part in stages],
            local_params=local, memory=memory)
        return report, str(mesh)
    finally:
        dist.destroy_process_group()


def dry_run(model_cfg: ModelConfig, parallel: ParallelConfig, *, world_size: int,
            micro_batch_size: int, seq_len: int, precision: str = "bf16",
            activation_checkpointing: str = "none", loss: str = "auto") -> DryRunReport:
    """Parallelize the meta model as each pipeline rank would; see the module docstring.
    `loss` is the config's ('auto', 'chunked' or 'full'), for the memory estimate."""
    if dist.is_initialized():
        raise RuntimeError("dry_run needs a process without a process group (it creates fake "
                           "ones)")
    dims = ParallelDims(parallel.dp_replicate, parallel.dp_shard, parallel.tp, parallel.pp,
                        world_size)
    v = parallel.pp_virtual_stages if dims.pp_enabled else 1
    n_stages = dims.pp * v
    reports, mesh = [], ""
    for pp_rank in range(dims.pp):
        memory = estimate_memory(model_cfg, parallel, world_size=world_size,
                                 micro_batch_size=micro_batch_size, seq_len=seq_len,
                                 precision=precision,
                                 activation_checkpointing=activation_checkpointing,
                                 loss=loss, pp_rank=pp_rank)
        report, mesh = _rank_report(model_cfg, parallel, dims, pp_rank,
                                    ac_mode=activation_checkpointing, precision=precision,
                                    memory=memory)
        reports.append(report)
    return DryRunReport(mesh=mesh, world_size=world_size, n_stages=n_stages,
                        layers_per_stage=[len(x) for x in stage_layers(model_cfg.n_layers,
                                                                       n_stages)],
                        ranks=reports)
