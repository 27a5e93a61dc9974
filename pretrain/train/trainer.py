"""The training entry, top to bottom: distributed → layout → data → model on meta → parallelize
→ init → optimizer and schedule → resume → loop → close.

The loop body calls small named functions (`train_step`, `maybe_eval`, `maybe_checkpoint`,
`maybe_log`); optional behaviour lives in the metric sinks of `loggers.py`. A step leaves its
loss, gradient norm and finite flag on the device (`StepRecord`); `settle` reads the pending
ones in one transfer at log steps and checkpoints and runs the host-side checks on them.

Layouts (see pretrain/parallel): one process; FSDP2 / DDP / tensor parallel, applied to the
model by `parallelize`; pipeline parallel, where the model is split into stages and a schedule
runs forward and backward (`Run.pipe`); or a DeepSpeed engine (`Run.engine`, backend=deepspeed)
that runs backward and the optimizer step itself. `micro_batch` and `train_step` are where the
three differ; everything else sees `Run.model`, which under pipeline parallelism is the union of
this rank's stages with the whole model's parameter names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from pretrain.config import TrainConfig, output_whole_on_one_rank
from pretrain.data.build import PreparedData, build_loader, ensure_data
from pretrain.data.loader import Batch, ShardedWindowLoader
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import NonFiniteError
from pretrain.eval.generate import generate
from pretrain.eval.perplexity import evaluate
from pretrain.models.llama import (
    attention_backends,
    build_model,
    check_initialized,
    count_params,
    flops_per_token,
)
from pretrain.models.loss import cross_entropy
from pretrain.parallel import deepspeed_backend as ds
from pretrain.parallel.dims import DistEnv, ParallelDims, destroy_distributed, init_distributed
from pretrain.parallel.parallelize import (
    clip_grad_norm_,
    init_model_weights,
    parallelize,
    set_gradient_sync,
)
from pretrain.parallel.pipeline import (
    Pipeline,
    build_pipeline,
    evaluate_pipeline,
    local_model,
    pipeline_split,
    pipeline_step,
)
from pretrain.train import checkpoint as ckpt
from pretrain.train.guards import PreemptionHandler, SpikeDetector, StepWatchdog
from pretrain.train.loggers import Sink, build_sinks
from pretrain.train.metrics import device_peak_flops, peak_memory_gb
from pretrain.train.optim import build_optimizer, build_schedule


class Rollback(Exception):
    """A loss spike under spike_policy=rollback: reload the last checkpoint, skip this step."""

    def __init__(self, step: int) -> None:
        super().__init__(f"loss spike at step {step}")
        self.step = step


@dataclass
class Counters:
    """Step/token counters saved with every checkpoint."""

    step: int = 0
    tokens: int = 0
    skipped_total: int = 0
    skipped_in_row: int = 0
    best_val_loss: float = math.inf
    last_val_loss: float = math.nan
    last_train_loss: float = math.nan
    wandb_id: str | None = None
    rollbacks: int = 0
    skip_steps: list[int] = field(default_factory=list)
    """Steps whose batch is consumed without an update (spikes rolled back)."""


@dataclass
class Run:
    """Everything the loop needs, built once by `setup`."""

    cfg: TrainConfig
    run_dir: Path
    env: DistEnv
    device: torch.device
    dims: ParallelDims
    mesh: DeviceMesh | None
    model: nn.Module
    """This rank's whole model: what the optimizer, clipping and checkpoints see."""
    parts: list[nn.Module]
    """The modules that run forward: [model], or this rank's pipeline stages."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    train_loader: ShardedWindowLoader
    val_loader: ShardedWindowLoader
    tokenizer: Tokenizer
    total_steps: int
    grad_accum: int
    flops_per_token: float
    peak_flops: float
    pipe: Pipeline | None = None
    """Pipeline stages and schedule (parallel.pp > 1)."""
    engine: Any = None
    """The DeepSpeed engine around `model` (parallel.backend=deepspeed)."""
    counters: Counters = field(default_factory=Counters)
    sinks: list[Sink] = field(default_factory=list)
    checkpointer: ckpt.Checkpointer | None = None
    spike: SpikeDetector = field(default_factory=SpikeDetector)
    preempt: PreemptionHandler = field(default_factory=PreemptionHandler)
    start_step: int = 0
    """The step this process started (or resumed) at: injected faults fire on a first attempt."""
    pending: list[StepRecord] = field(default_factory=list)
    """Steps whose device numbers the host has not read yet (see `settle`)."""
    last_ckpt_time: float = field(default_factory=time.time)

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.global_batch_size * self.cfg.seq_len

    @property
    def chunked_loss(self) -> bool:
        """The model computes the loss itself, chunk by chunk (`TrainConfig.loss`)."""
        return uses_chunked_loss(self.cfg)

    def attention(self) -> contextlib.AbstractContextManager:
        """The SDPA kernel choice (`TrainConfig.sdpa_backends`), entered around forward and
        backward."""
        return attention_backends(self.cfg.sdpa_backends, self.device.type)

    @property
    def settle_each_step(self) -> bool:
        """The host must look at every step: the spike policy acts on the step itself, or the
        update cannot be skipped on the device."""
        return self.cfg.spike_policy in ("skip", "rollback") or not skips_on_device(self)


def pick_device(name: str, env: DistEnv) -> torch.device:
    if name == "auto":
        return env.device
    if name == "cuda":
        return torch.device("cuda", env.local_rank)
    return torch.device(name)


def autocast_factory(precision: str, device: torch.device) -> Callable[[], Any]:
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def total_steps_of(cfg: TrainConfig) -> int:
    """From flops_budget, else tokens, else steps; the schedule spans exactly these steps."""
    if cfg.flops_budget:
        tokens = cfg.flops_budget / flops_per_token(cfg.model, cfg.seq_len)
        return max(1, int(tokens // (cfg.global_batch_size * cfg.seq_len)))
    if cfg.tokens:
        return max(1, cfg.tokens // (cfg.global_batch_size * cfg.seq_len))
    return cfg.steps


def dp_sum(run: Run, t: torch.Tensor) -> torch.Tensor:
    """Sum over data-parallel ranks; the TP and PP ranks of one replica hold the same value."""
    if run.dims.dp > 1:
        dist.all_reduce(t, group=run.mesh["dp"].get_group())
    return t


def dp_mean(run: Run, t: torch.Tensor) -> torch.Tensor:
    return dp_sum(run, t) / run.dims.dp if run.dims.dp > 1 else t


def prepare_data(cfg: TrainConfig, env: DistEnv) -> PreparedData:
    """Rank 0 trains the tokenizer / prepares shards if needed; the others then find the cache."""
    if env.is_main:
        data = ensure_data(cfg.data, vocab_size=cfg.model.vocab_size)
    if dist.is_initialized():
        dist.barrier()
    if not env.is_main:
        data = ensure_data(cfg.data, vocab_size=cfg.model.vocab_size)
    return data


def build_loaders(cfg: TrainConfig, data: PreparedData, dims: ParallelDims,
                  dp_rank: int) -> tuple[ShardedWindowLoader, ShardedWindowLoader]:
    common = dict(seq_len=cfg.seq_len, micro_batch_size=cfg.micro_batch_size,
                  dp_rank=dp_rank, dp_size=dims.dp, seed=cfg.seed,
                  vocab_size=cfg.model.vocab_size)
    return (build_loader(cfg.data, data, "train", **common),
            build_loader(cfg.data, data, "val", **common))


def build_and_init_model(cfg: TrainConfig, dims: ParallelDims, mesh: DeviceMesh | None,
                         device: torch.device) -> tuple[nn.Module, list[tuple[int, nn.Module]]]:
    """Meta build → pipeline split → parallelize → materialize → layout-independent init.

    Returns this rank's model (under pipeline parallelism the union of its stages) and its
    (stage id, module) pairs that run forward.
    """
    model = build_model(cfg.model, device="meta")
    stages = [(0, model)]
    if dims.pp_enabled:
        p = cfg.parallel
        stages = pipeline_split(model, pp_rank=mesh["pp"].get_local_rank(), pp=dims.pp,
                                virtual_stages=p.pp_virtual_stages, schedule=p.pp_schedule)
    # DeepSpeed shards inside its engine: without a mesh, parallelize only checkpoints/compiles.
    layout_mesh = None if cfg.parallel.backend == "deepspeed" else mesh
    for _, part in stages:
        parallelize(part, dims, layout_mesh, ac_mode=cfg.activation_checkpointing,
                    compile=compile_enabled(cfg, device), parallel=cfg.parallel,
                    precision=cfg.precision)
    parts = [part for _, part in stages]
    init_model_weights(parts, cfg.model, cfg.seed, device)
    for part in parts:
        check_initialized(part)
        part.train()
    return (local_model(parts) if dims.pp_enabled else model), stages


def compile_enabled(cfg: TrainConfig, device: torch.device) -> bool:
    """compile=null: on with CUDA and the native backend (the DeepSpeed engine hooks inside
    the blocks); an explicit true/false wins."""
    if cfg.compile is not None:
        return cfg.compile
    return device.type == "cuda" and cfg.parallel.backend == "native"


def build_engine(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 world_size: int) -> Any:
    """The DeepSpeed engine around our model and AdamW, with the JSON config built from ours."""
    p = cfg.parallel
    config = ds.deepspeed_config(zero_stage=p.zero_stage, precision=cfg.precision,
                                 global_batch_size=cfg.global_batch_size,
                                 micro_batch_size=cfg.micro_batch_size, world_size=world_size,
                                 grad_clip=cfg.optim.grad_clip, extra=p.deepspeed_extra)
    return ds.initialize(model, optimizer, config)


def build_run_pipeline(cfg: TrainConfig, stages: list[tuple[int, nn.Module]], mesh: DeviceMesh,
                       device: torch.device, grad_accum: int) -> Pipeline:
    p = cfg.parallel
    return build_pipeline(stages, pp_mesh=mesh["pp"], device=device, schedule=p.pp_schedule,
                          n_microbatches=p.pp_microbatches or p.pp * p.pp_virtual_stages,
                          loss_fn=cross_entropy, grad_accum=grad_accum)


def setup(cfg: TrainConfig, run_dir: Path) -> Run:
    env = DistEnv.from_env()
    device = pick_device(cfg.device, env)
    init_distributed(env, device, cfg.parallel.timeout_s)
    p = cfg.parallel
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, p.pp, env.world_size)
    mesh = dims.build_mesh(device.type)
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0

    data = prepare_data(cfg, env)
    tokenizer = Tokenizer.load(data.tokenizer_path)
    train_loader, val_loader = build_loaders(cfg, data, dims, dp_rank)

    model, stages = build_and_init_model(cfg, dims, mesh, device)
    total = total_steps_of(cfg)
    grad_accum = cfg.global_batch_size // (cfg.micro_batch_size * dims.dp)
    optimizer = build_optimizer(model, cfg.optim, device)
    scheduler = build_schedule(optimizer, cfg.optim, total)
    pipe = build_run_pipeline(cfg, stages, mesh, device, grad_accum) if dims.pp_enabled else None
    deepspeed = p.backend == "deepspeed"
    engine = build_engine(cfg, model, optimizer, env.world_size) if deepspeed else None
    use_scaler = cfg.precision == "fp16" and not deepspeed  # DeepSpeed scales fp16 itself
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    peak, _ = device_peak_flops(device, cfg.data.cache_dir)
    return Run(
        cfg=cfg, run_dir=run_dir, env=env, device=device, dims=dims, mesh=mesh, model=model,
        parts=[part for _, part in stages], optimizer=optimizer, scheduler=scheduler,
        scaler=scaler, train_loader=train_loader, val_loader=val_loader, tokenizer=tokenizer,
        total_steps=total, grad_accum=grad_accum,
        flops_per_token=flops_per_token(cfg.model, cfg.seq_len), peak_flops=peak, pipe=pipe,
        engine=engine,
        checkpointer=ckpt.Checkpointer(run_dir / "checkpoints", keep=cfg.ckpt_keep,
                                       async_save=cfg.ckpt_async),
        spike=SpikeDetector(window=cfg.spike_window, threshold=cfg.spike_threshold),
    )


def uses_chunked_loss(cfg: TrainConfig) -> bool:
    """loss=auto: chunked where one rank holds the whole output projection (validate() has
    refused loss=chunked elsewhere)."""
    return cfg.loss == "chunked" or (cfg.loss == "auto" and output_whole_on_one_rank(cfg.parallel))


def trainer_state(run: Run) -> dict[str, Any]:
    return {
        "counters": dataclasses.asdict(run.counters),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "train_loader": run.train_loader.state_dict(),
        "spike": run.spike.state_dict(),
        "tokenizer_path": run.tokenizer.path,
        "config": dataclasses.asdict(run.cfg),
    }


def maybe_resume(run: Run) -> None:
    """resume=auto: newest good checkpoint in the run directory; or an explicit path."""
    mode = run.cfg.resume
    if mode == "none":
        return
    found = ckpt.find_resumable(run.ckpt_root) if mode == "auto" else ckpt.resolve_checkpoint(mode)
    if found is None:
        return
    load_state(run, found)
    run.start_step = run.counters.step
    if run.env.is_main:
        print(f"resumed from {found} at step {run.counters.step}", flush=True)
        for note in getattr(run.train_loader, "notes", []):
            print(f"data: {note}", flush=True)


def load_state(run: Run, found: Path) -> None:
    """Every stateful piece from checkpoint `found`."""
    ds.check_checkpoint_backend(found, deepspeed=run.engine is not None)
    if run.engine is not None:
        state = ds.load_checkpoint(found, run.engine)
    else:
        state = ckpt.load_checkpoint(found, run.model, run.optimizer)
    run.counters = Counters(**state["counters"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.train_loader.load_state_dict(state["train_loader"])
    if state.get("spike"):
        run.spike.load_state_dict(state["spike"])


@dataclass
class StepRecord:
    """One optimizer step as it left the device queue: loss, gradient norm and the all-rank
    finite flag stay device tensors until `settle` reads a batch of records in one transfer,
    so a step never waits for the device to tell the host a number."""

    step: int
    loss: torch.Tensor
    grad_norm: torch.Tensor
    finite: torch.Tensor
    """() float32: 1 when loss and gradient norm are finite on every rank."""
    lr: float
    data_wait: float
    skipped: bool = False
    """Skipped for a reason the host already knows (a replayed spike batch, spike_policy=skip)."""


def forward_backward(run: Run, autocast: Callable[[], Any]) -> tuple[torch.Tensor, float]:
    """All micro-batches of one step; returns (mean loss, seconds waiting for data)."""
    loss_sum = torch.zeros((), device=run.device)
    data_wait = 0.0
    with run.attention():  # backward too: checkpointing recomputes attention there
        for i in range(run.grad_accum):
            t = time.perf_counter()
            batch = run.train_loader.next_batch().to(run.device, non_blocking=True)
            data_wait += time.perf_counter() - t
            loss_sum += micro_batch(run, batch, autocast, last=i == run.grad_accum - 1)
    return loss_sum, data_wait


def micro_batch(run: Run, batch: Batch, autocast: Callable[[], Any], *,
                last: bool) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns its mean loss / grad_accum."""
    inputs, targets = batch
    if run.engine is not None:  # DeepSpeed handles precision, accumulation and the step
        return ds.micro_step(run.engine, inputs, targets, cross_entropy) / run.grad_accum
    # Data-parallel gradients are reduced once, after the last micro-batch.
    set_gradient_sync(run.parts, last)
    if run.pipe is not None:  # the schedule splits the batch further and runs backward
        with autocast():
            loss = pipeline_step(run.pipe, inputs, targets)
        return loss / run.grad_accum
    with autocast():
        if run.chunked_loss:  # the model applies `output` and the loss chunk by chunk
            loss = run.parts[0](inputs, targets=targets, **batch.model_kwargs())
        else:
            loss = cross_entropy(run.parts[0](inputs, **batch.model_kwargs()), targets)
    loss = loss / run.grad_accum
    (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
    return loss.detach()


def train_step(run: Run, autocast: Callable[[], Any]) -> StepRecord:
    """One optimizer step: forward/backward, clip, all-rank finite flag, step, schedule.

    Nothing here reads a device number on the host unless `run.settle_each_step` (a spike
    policy that acts on this step, a DeepSpeed engine, fp16 loss scaling, or an optimizer that
    cannot skip an update on the device); the checks then run in `settle`."""
    step = run.counters.step + 1
    lr = run.scheduler.get_last_lr()[0]
    if step in run.counters.skip_steps:
        return skip_batch(run, step, lr)
    loss, data_wait = forward_backward(run, autocast)
    loss = dp_mean(run, inject_loss_faults(run, step, loss))
    spike_skip = False
    if run.cfg.spike_policy in ("skip", "rollback"):  # decided before the update: a sync
        verdict = spike_verdict(run, step, float(loss))
        if verdict == "rollback":
            run.optimizer.zero_grad(set_to_none=True)
            raise Rollback(step)
        spike_skip = verdict == "skip"
    if run.engine is not None:
        # The engine clipped and stepped after the last micro-batch (its fp16 loss scaler skips
        # overflowing steps itself): a non-finite step is counted or halts, not undone.
        grad_norm = torch.tensor(ds.grad_norm(run.engine), device=run.device)
    else:
        grad_norm = clip_gradients(run)
    finite = all_ranks_finite(run, loss, grad_norm)
    if run.engine is None:
        optimizer_step(run, finite, skip=spike_skip)
    run.scheduler.step()
    return StepRecord(step, loss, grad_norm, finite, lr, data_wait, skipped=spike_skip)


def skip_batch(run: Run, step: int, lr: float) -> StepRecord:
    """Consume this step's batches without an update (the batch that caused a rolled-back
    spike), so the data order after it is the one an uninterrupted run would see."""
    for _ in range(run.grad_accum):
        run.train_loader.next_batch()
    run.counters.skipped_total += 1
    run.scheduler.step()
    nan = torch.full((), math.nan, device=run.device)
    return StepRecord(step, nan, nan, torch.ones((), device=run.device), lr, 0.0, skipped=True)


def inject_loss_faults(run: Run, step: int, loss: torch.Tensor) -> torch.Tensor:
    """faults.nan_at_step / spike_at_step (tests of the guards): a NaN loss and gradients on
    one rank, or a loss 20× too high."""
    f = run.cfg.faults
    if f.nan_at_step == step and run.env.rank == f.nan_rank:
        for p in run.model.parameters():
            if p.grad is not None:
                p.grad.fill_(math.nan)
        return loss * math.nan
    if f.spike_at_step == step:
        return loss * 20.0
    return loss


def spike_verdict(run: Run, step: int, loss: float) -> str:
    """'ok', 'skip' or 'rollback' for this step's (globally averaged) loss."""
    policy = run.cfg.spike_policy
    if policy == "none" or not math.isfinite(loss) or not run.spike.update(loss):
        return "ok"
    if run.env.is_main:
        mean = sum(run.spike.history) / len(run.spike.history)
        print(f"warning: loss spike at step {step}: {loss:.4f} vs recent mean {mean:.4f} "
              f"(policy {policy})", flush=True)
    if policy == "skip":
        run.counters.skipped_total += 1
    return policy if policy in ("skip", "rollback") else "ok"


def rollback(run: Run, step: int) -> None:
    """Reload the newest good checkpoint and mark `step`'s batch to be skipped on replay."""
    run.checkpointer.wait()
    found = ckpt.find_resumable(run.ckpt_root)
    if found is None:
        raise NonFiniteError(f"loss spike at step {step} and no checkpoint to roll back to; "
                             "set ckpt_every (or use spike_policy=skip)")
    skip_steps = sorted({*run.counters.skip_steps, step})
    rollbacks = run.counters.rollbacks + 1
    run.pending.clear()
    load_state(run, found)
    run.counters.skip_steps, run.counters.rollbacks = skip_steps, rollbacks
    if run.env.is_main:
        print(f"rolled back to {found.name} after a loss spike at step {step}; its batch will "
              "be skipped", flush=True)


def clip_gradients(run: Run) -> torch.Tensor:
    """Clip to optim.grad_clip (0: no clip); returns the global norm over every shard/stage."""
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    max_norm = run.cfg.optim.grad_clip if run.cfg.optim.grad_clip > 0 else math.inf
    pp_mesh = run.mesh["pp"] if run.dims.pp_enabled else None
    return clip_grad_norm_(run.model.parameters(), max_norm, pp_mesh=pp_mesh)


def all_ranks_finite(run: Run, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """() float32, 1 only if loss and gradient norm are finite on every rank: one rank's NaN
    stops the update everywhere, so replicas never diverge. A device-side all-reduce (gloo
    takes host tensors)."""
    ok = (torch.isfinite(loss) & torch.isfinite(grad_norm)).float().reshape(())
    if dist.is_initialized():
        on_host = dist.get_backend() == "gloo"
        ok = ok.cpu() if on_host else ok
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        ok = ok.to(run.device, non_blocking=True)
    return ok


def skips_on_device(run: Run) -> bool:
    """Fused AdamW takes a `found_inf` tensor and leaves parameters, moments and step count
    untouched when it is nonzero: a non-finite step is skipped without the host looking."""
    return run.scaler is None and run.engine is None and bool(run.optimizer.defaults.get("fused"))


def optimizer_step(run: Run, finite: torch.Tensor, *, skip: bool = False) -> None:
    if skip:
        pass
    elif skips_on_device(run):
        run.optimizer.found_inf = 1.0 - finite
        run.optimizer.step()
    elif bool(finite.item()):  # a host sync: this optimizer cannot skip on the device
        if run.scaler is not None:
            run.scaler.step(run.optimizer)
        else:
            run.optimizer.step()
    if run.scaler is not None:
        run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)


def settle(run: Run) -> dict[str, float]:
    """Read the pending steps' numbers in one transfer, apply the host-side checks to them in
    step order (non-finite counting and halting, spike warnings, the last loss), and return
    the newest step's metrics. The one host sync of the loop, at log steps and checkpoints."""
    records, run.pending = run.pending, []
    if not records:
        return {}
    values = torch.stack([
        torch.stack([r.loss.float().reshape(()), r.grad_norm.float().reshape(()),
                     r.finite.float().reshape(())]).to(run.device)
        for r in records
    ]).tolist()
    for r, (loss, _, finite) in zip(records, values, strict=True):
        run.counters.last_train_loss = loss
        if not finite:
            handle_nonfinite(run, r.step, loss)
            continue
        run.counters.skipped_in_row = 0
        if run.cfg.spike_policy == "warn" and not r.skipped:
            spike_verdict(run, r.step, loss)
    last, (loss, grad_norm, finite) = records[-1], values[-1]
    return {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": last.lr,
            "data/wait_s": last.data_wait, "train/skipped": float(not finite or last.skipped)}


def handle_nonfinite(run: Run, step: int, loss: float) -> None:
    c = run.counters
    c.skipped_total += 1
    c.skipped_in_row += 1
    if run.cfg.nonfinite_policy == "halt" or c.skipped_in_row > run.cfg.max_skips:
        raise NonFiniteError(
            f"non-finite loss/gradient norm at step {step} (loss={loss}); "
            f"policy={run.cfg.nonfinite_policy}, consecutive skips={c.skipped_in_row}. "
            "Lower optim.lr, raise warmup, or use precision=bf16/fp32; resume from the last "
            "checkpoint with resume=auto"
        )


def run_eval(run: Run, autocast: Callable[[], Any]) -> dict[str, float]:
    batches = run.val_loader.eval_batches(run.cfg.eval_batches)
    common = dict(device=run.device, autocast=autocast, all_reduce=lambda t: dp_sum(run, t))
    with run.attention():
        if run.pipe is not None:
            metrics = evaluate_pipeline(run.pipe, batches, **common)
        else:
            model = run.engine if run.engine is not None else run.parts[0]
            metrics = evaluate(model, batches, chunked=run.chunked_loss, **common)
    run.counters.last_val_loss = metrics["val/loss"]
    run.counters.best_val_loss = min(run.counters.best_val_loss, metrics["val/loss"])
    return metrics


def maybe_eval(run: Run, autocast: Callable[[], Any], *, force: bool = False) -> None:
    every = run.cfg.eval_every
    if force or (every > 0 and run.counters.step % every == 0):
        metrics = run_eval(run, autocast)
        for s in run.sinks:
            s.on_eval(run.counters.step, metrics)


def maybe_checkpoint(run: Run, *, force: bool = False, due: bool = False) -> None:
    """Every `ckpt_every` steps, when `due` (the wall-time interval), or when forced."""
    every = run.cfg.ckpt_every
    if not (force or due or (every > 0 and run.counters.step % every == 0)):
        return
    settle(run)  # the saved counters and spike history include every step so far
    step = run.counters.step
    run.last_ckpt_time = time.time()
    if run.engine is not None:
        ds.save_checkpoint(run.ckpt_root, step, run.engine, trainer_state(run),
                           keep=run.cfg.ckpt_keep)
    elif run.cfg.faults.crash_in_checkpoint_at_step == step and first_attempt(run):
        tmp, _ = ckpt._begin(run.ckpt_root, step, trainer_state(run))
        ckpt.dcp.save({"app": ckpt.ModelOptimState(run.model, run.optimizer)},
                      checkpoint_id=str(tmp))
        os._exit(1)  # the data is written but never finalized: a crash mid-checkpoint
    else:
        run.checkpointer.save(step, run.model, run.optimizer, trainer_state(run))


def is_log_step(run: Run, step: int) -> bool:
    return step % max(1, run.cfg.logging.log_every) == 0 or step in (1, run.total_steps)


def maybe_log(run: Run, metrics: dict[str, float], step_time: float, tokens: int) -> None:
    """The settled metrics of a log step, with throughput over the steps since the last."""
    step = run.counters.step
    if not is_log_step(run, step):
        return
    tps = tokens / max(step_time, 1e-9)
    metrics = {
        **metrics,
        "train/tokens": float(run.counters.tokens),
        "perf/tokens_per_sec": tps,
        "perf/mfu": tps * run.flops_per_token / (run.peak_flops * run.env.world_size),
        "perf/step_time_s": step_time * run.tokens_per_step / max(tokens, 1),  # mean per step
        "perf/memory_gb": peak_memory_gb(run.device),
        **run.train_loader.metrics(),
    }
    for s in run.sinks:
        s.on_step(step, metrics)


def first_attempt(run: Run) -> bool:
    """Injected crashes fire only on a run's first attempt (not after a resume or restart)."""
    return run.start_step == 0 and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"


def step_flags(run: Run, start: float) -> tuple[bool, bool, bool]:
    """(preempted, time limit reached, wall-time checkpoint due), agreed by every rank in one
    collective: a signal on any rank counts; the clocks are rank 0's."""
    cfg = run.cfg
    now = time.time()
    clocks = run.env.is_main
    flags = torch.tensor([
        float(run.preempt.requested),
        float(clocks and cfg.time_limit_s > 0 and now - start > cfg.time_limit_s),
        float(clocks and cfg.ckpt_every_s > 0 and now - run.last_ckpt_time > cfg.ckpt_every_s),
    ])
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0]), bool(flags[1]), bool(flags[2])


def inject_process_faults(run: Run) -> None:
    """faults.crash_at_step (a hard exit, like kill -9) and faults.signal_at_step (SIGTERM)."""
    f, step = run.cfg.faults, run.counters.step
    if f.crash_at_step == step and run.env.rank == f.crash_rank and first_attempt(run):
        os._exit(1)
    if f.signal_at_step == step and run.start_step < step:
        os.kill(os.getpid(), signal.SIGTERM)


def train_loop(run: Run, autocast: Callable[[], Any]) -> str:
    """Steps until the budget or the time limit; returns the final status."""
    start = time.time()
    recent_tokens, recent_time = 0, 0.0
    watchdog = StepWatchdog(run.cfg.parallel.timeout_s)
    while run.counters.step < run.total_steps:
        t = time.perf_counter()
        watchdog.arm()
        try:
            record = train_step(run, autocast)
            run.pending.append(record)
            log_now = is_log_step(run, record.step)
            # Reading the numbers waits for the device: inside the timed step, watched.
            metrics = settle(run) if log_now or run.settle_each_step else {}
        except Rollback as spike:
            watchdog.disarm()
            rollback(run, spike.step)
            continue
        finally:  # a halt raised here must not leave the watchdog's exit timer armed
            watchdog.disarm()
        run.counters.step += 1
        run.counters.tokens += run.tokens_per_step
        recent_tokens += run.tokens_per_step
        recent_time += time.perf_counter() - t
        if log_now:
            maybe_log(run, metrics, recent_time, recent_tokens)
            recent_tokens, recent_time = 0, 0.0
            run.checkpointer.poll()
        inject_process_faults(run)
        preempted, time_up, ckpt_due = step_flags(run, start)
        if preempted:
            return "preempted"
        if time_up:
            return "time_limit"
        if run.counters.step < run.total_steps:
            maybe_eval(run, autocast)
            maybe_checkpoint(run, due=ckpt_due)
    return "completed"


def samples(run: Run) -> list[dict[str, str]]:
    """A few sampled continuations, on a single-process layout only (generation runs the plain
    model; a sharded or pipelined one would need every rank in lockstep)."""
    if run.env.world_size > 1 or not run.cfg.sample_prompts:
        return []
    out = []
    gen = torch.Generator(device=run.device).manual_seed(run.cfg.seed)
    for prompt in run.cfg.sample_prompts:
        ids = run.tokenizer.encode(prompt, bos=True)
        new = generate(run.model, ids, max_new_tokens=run.cfg.sample_tokens, temperature=0.8,
                       top_k=50, eos_id=run.tokenizer.eos_id, generator=gen)
        out.append({"prompt": prompt, "completion": run.tokenizer.decode(new)})
    return out


def build_summary(run: Run, status: str, wall_time: float) -> dict[str, Any]:
    m = run.cfg.model
    return {
        "run_name": run.cfg.run_name,
        "model": m.name,
        "params": count_params(m),
        "non_embedding_params": count_params(m, exclude_embeddings=True),
        "tokens": run.counters.tokens,
        "flops": run.flops_per_token * run.counters.tokens,
        "flops_per_token": run.flops_per_token,
        "steps": run.counters.step,
        "seq_len": run.cfg.seq_len,
        "final_train_loss": run.counters.last_train_loss,
        "final_val_loss": run.counters.last_val_loss,
        "best_val_loss": run.counters.best_val_loss,
        "final_val_ppl": math.exp(min(run.counters.last_val_loss, 50.0)),
        "wall_time_s": wall_time,
        "tokens_per_sec": run.counters.tokens / max(wall_time, 1e-9),
        "skipped_steps": run.counters.skipped_total,
        "rollbacks": run.counters.rollbacks,
        "world_size": run.env.world_size,
        "status": status,
        "sweep": run.cfg.tags or None,
    }


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def train(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """Run (or resume) one training job; returns the summary (rank 0 writes summary.json)."""
    t0 = time.time()
    run = setup(cfg, run_dir)
    try:
        maybe_resume(run)
        autocast = autocast_factory(cfg.precision, run.device)
        if run.env.is_main:
            run.sinks = build_sinks(cfg.logging, run_dir=run_dir, run_name=cfg.run_name,
                                    config=dataclasses.asdict(cfg), total_steps=run.total_steps,
                                    start_step=run.counters.step,
                                    wandb_id=run.counters.wandb_id)
            run.counters.wandb_id = getattr(getattr(run.sinks[-1], "run", None), "id", None)
            announce(run)
        run.preempt.install()
        status = train_loop(run, autocast)
        settle(run)
        if status != "preempted":  # a preempted job has seconds left: checkpoint only
            maybe_eval(run, autocast, force=True)
        maybe_checkpoint(run, force=True)
        run.checkpointer.wait()
        summary = build_summary(run, status, time.time() - t0)
        if run.env.is_main:
            summary["samples"] = samples(run) if status != "preempted" else []
            for s in summary["samples"]:
                run.sinks[0].on_text(f"--- sample {s['prompt']!r}\n{s['prompt']}{s['completion']}")
            write_json(run_dir / "summary.json", summary)
            for s in run.sinks:
                s.on_end(summary)
        return summary
    finally:
        run.preempt.uninstall()
        destroy_distributed()


def announce(run: Run) -> None:
    m = run.cfg.model
    run.sinks[0].on_text(
        f"run dir {run.run_dir}\nmodel {m.name}: {count_params(m) / 1e6:.2f}M params "
        f"({count_params(m, exclude_embeddings=True) / 1e6:.2f}M non-embedding), "
        f"{run.flops_per_token / 1e6:.1f} MFLOP/token | world {run.env.world_size} "
        f"(dp {run.dims.dp}, tp {run.dims.tp}, pp {run.dims.pp}) | device {run.device} | "
        f"{run.total_steps} steps × {run.tokens_per_step} tokens | "
        f"train {run.train_loader.tokens_per_epoch / 1e6:.2f}M tokens/epoch | "
        f"peak {run.peak_flops / 1e12:.2f} TFLOP/s"
    )
