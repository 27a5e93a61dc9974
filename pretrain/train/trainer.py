"""The training entry, top to bottom: distributed → layout → data → model on meta → parallelize
→ init → optimizer and schedule → resume → loop → close.

The loop body calls small named functions (`train_step`, `maybe_eval`, `maybe_checkpoint`,
`maybe_log`); optional behaviour lives in the metric sinks of `loggers.py`.

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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from pretrain.config import TrainConfig
from pretrain.data.loader import ShardedWindowLoader
from pretrain.data.prepare import ensure_prepared
from pretrain.data.tokenizer import Tokenizer
from pretrain.eval.generate import generate
from pretrain.eval.perplexity import cross_entropy, evaluate
from pretrain.models.llama import build_model, check_initialized, count_params, flops_per_token
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
from pretrain.train.loggers import Sink, build_sinks
from pretrain.train.metrics import device_peak_flops, peak_memory_gb
from pretrain.train.optim import build_optimizer, build_schedule


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient norm and the policy says halt."""


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

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.global_batch_size * self.cfg.seq_len


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


def prepare_data(cfg: TrainConfig, env: DistEnv) -> tuple[str, str]:
    """Rank 0 trains the tokenizer / prepares shards if needed; the others then find the cache."""
    if env.is_main:
        paths = ensure_prepared(cfg.data, vocab_size=cfg.model.vocab_size)
    if dist.is_initialized():
        dist.barrier()
    if not env.is_main:
        paths = ensure_prepared(cfg.data, vocab_size=cfg.model.vocab_size)
    return paths


def build_loaders(cfg: TrainConfig, data_dir: str, tokenizer: Tokenizer, dims: ParallelDims,
                  dp_rank: int) -> tuple[ShardedWindowLoader, ShardedWindowLoader]:
    common = dict(seq_len=cfg.seq_len, micro_batch_size=cfg.micro_batch_size,
                  dp_rank=dp_rank, dp_size=dims.dp, seed=cfg.seed,
                  vocab_size=cfg.model.vocab_size, tokenizer_fingerprint=tokenizer.fingerprint)
    return (ShardedWindowLoader(data_dir, "train", **common),
            ShardedWindowLoader(data_dir, "val", **common))


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
                    compile=cfg.compile, parallel=cfg.parallel, precision=cfg.precision)
    parts = [part for _, part in stages]
    init_model_weights(parts, cfg.model, cfg.seed, device)
    for part in parts:
        check_initialized(part)
        part.train()
    return (local_model(parts) if dims.pp_enabled else model), stages


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

    data_dir, tok_path = prepare_data(cfg, env)
    tokenizer = Tokenizer.load(tok_path)
    train_loader, val_loader = build_loaders(cfg, data_dir, tokenizer, dims, dp_rank)

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
    )


def trainer_state(run: Run) -> dict[str, Any]:
    return {
        "counters": dataclasses.asdict(run.counters),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "train_loader": run.train_loader.state_dict(),
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
    if run.env.is_main:
        print(f"resumed from {found} at step {run.counters.step}", flush=True)


def forward_backward(run: Run, autocast: Callable[[], Any]) -> tuple[torch.Tensor, float]:
    """All micro-batches of one step; returns (mean loss, seconds waiting for data)."""
    loss_sum = torch.zeros((), device=run.device)
    data_wait = 0.0
    for i in range(run.grad_accum):
        t = time.perf_counter()
        inputs, targets = run.train_loader.next_batch()
        inputs = inputs.to(run.device, non_blocking=True)
        targets = targets.to(run.device, non_blocking=True)
        data_wait += time.perf_counter() - t
        loss_sum += micro_batch(run, inputs, targets, autocast, last=i == run.grad_accum - 1)
    return loss_sum, data_wait


def micro_batch(run: Run, inputs: torch.Tensor, targets: torch.Tensor,
                autocast: Callable[[], Any], *, last: bool) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns its mean loss / grad_accum."""
    if run.engine is not None:  # DeepSpeed handles precision, accumulation and the step
        return ds.micro_step(run.engine, inputs, targets, cross_entropy) / run.grad_accum
    # Data-parallel gradients are reduced once, after the last micro-batch.
    set_gradient_sync(run.parts, last)
    if run.pipe is not None:  # the schedule splits the batch further and runs backward
        with autocast():
            loss = pipeline_step(run.pipe, inputs, targets)
        return loss / run.grad_accum
    with autocast():
        logits = run.parts[0](inputs)
    loss = cross_entropy(logits, targets) / run.grad_accum
    (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
    return loss.detach()


def train_step(run: Run, autocast: Callable[[], Any]) -> dict[str, float]:
    """One optimizer step: forward/backward, clip, finite check, step, schedule."""
    loss, data_wait = forward_backward(run, autocast)
    loss = dp_mean(run, loss)
    if run.engine is not None:
        # The engine clipped and stepped after the last micro-batch (its fp16 loss scaler skips
        # overflowing steps itself): a non-finite step is counted or halts, not undone.
        grad_norm = torch.tensor(ds.grad_norm(run.engine))
        finite = check_finite(run, loss, grad_norm)
    else:
        grad_norm = clip_gradients(run)
        finite = check_finite(run, loss, grad_norm)
        optimizer_step(run, finite)
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    return {"train/loss": float(loss), "train/grad_norm": float(grad_norm), "train/lr": lr,
            "data/wait_s": data_wait, "train/skipped": float(not finite)}


def clip_gradients(run: Run) -> torch.Tensor:
    """Clip to optim.grad_clip (0: no clip); returns the global norm over every shard/stage."""
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    max_norm = run.cfg.optim.grad_clip if run.cfg.optim.grad_clip > 0 else math.inf
    pp_mesh = run.mesh["pp"] if run.dims.pp_enabled else None
    return clip_grad_norm_(run.model.parameters(), max_norm, pp_mesh=pp_mesh)


def check_finite(run: Run, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
    finite = bool(torch.isfinite(loss) & torch.isfinite(grad_norm))
    if finite:
        run.counters.skipped_in_row = 0
    else:
        handle_nonfinite(run, float(loss))
    return finite


def optimizer_step(run: Run, finite: bool) -> None:
    if finite:
        if run.scaler is not None:
            run.scaler.step(run.optimizer)
        else:
            run.optimizer.step()
    if run.scaler is not None:
        run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)


def handle_nonfinite(run: Run, loss: float) -> None:
    c = run.counters
    c.skipped_total += 1
    c.skipped_in_row += 1
    if run.cfg.nonfinite_policy == "halt" or c.skipped_in_row > run.cfg.max_skips:
        raise NonFiniteError(
            f"non-finite loss/gradient norm at step {c.step + 1} (loss={loss}); "
            f"policy={run.cfg.nonfinite_policy}, consecutive skips={c.skipped_in_row}. "
            "Lower optim.lr, raise warmup, or use precision=bf16/fp32; resume from the last "
            "checkpoint with resume=auto"
        )


def run_eval(run: Run, autocast: Callable[[], Any]) -> dict[str, float]:
    batches = run.val_loader.eval_batches(run.cfg.eval_batches)
    common = dict(device=run.device, autocast=autocast, all_reduce=lambda t: dp_sum(run, t))
    if run.pipe is not None:
        metrics = evaluate_pipeline(run.pipe, batches, **common)
    else:
        model = run.engine if run.engine is not None else run.parts[0]
        metrics = evaluate(model, batches, **common)
    run.counters.last_val_loss = metrics["val/loss"]
    run.counters.best_val_loss = min(run.counters.best_val_loss, metrics["val/loss"])
    return metrics


def maybe_eval(run: Run, autocast: Callable[[], Any], *, force: bool = False) -> None:
    every = run.cfg.eval_every
    if force or (every > 0 and run.counters.step % every == 0):
        metrics = run_eval(run, autocast)
        for s in run.sinks:
            s.on_eval(run.counters.step, metrics)


def maybe_checkpoint(run: Run, *, force: bool = False) -> None:
    every = run.cfg.ckpt_every
    if not (force or (every > 0 and run.counters.step % every == 0)):
        return
    if run.engine is not None:
        ds.save_checkpoint(run.ckpt_root, run.counters.step, run.engine, trainer_state(run),
                           keep=run.cfg.ckpt_keep)
    else:
        ckpt.save_checkpoint(run.ckpt_root, run.counters.step, run.model, run.optimizer,
                             trainer_state(run), keep=run.cfg.ckpt_keep)


def maybe_log(run: Run, metrics: dict[str, float], step_time: float, tokens: int) -> None:
    every = max(1, run.cfg.logging.log_every)
    step = run.counters.step
    if step % every and step != run.total_steps and step != 1:
        return
    tps = tokens / max(step_time, 1e-9)
    metrics = {
        **metrics,
        "train/tokens": float(run.counters.tokens),
        "perf/tokens_per_sec": tps,
        "perf/mfu": tps * run.flops_per_token / (run.peak_flops * run.env.world_size),
        "perf/step_time_s": step_time,
        "perf/memory_gb": peak_memory_gb(run.device),
    }
    for s in run.sinks:
        s.on_step(step, metrics)


def time_is_up(cfg: TrainConfig, start: float) -> bool:
    """Every rank must agree, so rank 0's clock decides."""
    up = torch.tensor(float(cfg.time_limit_s > 0 and time.time() - start > cfg.time_limit_s))
    if dist.is_initialized():
        dist.broadcast(up, src=0)
    return bool(up)


def train_loop(run: Run, autocast: Callable[[], Any]) -> str:
    """Steps until the budget or the time limit; returns the final status."""
    start = time.time()
    recent_tokens, recent_time = 0, 0.0
    while run.counters.step < run.total_steps:
        t = time.perf_counter()
        metrics = train_step(run, autocast)
        run.counters.last_train_loss = metrics["train/loss"]
        run.counters.step += 1
        run.counters.tokens += run.tokens_per_step
        recent_tokens += run.tokens_per_step
        recent_time += time.perf_counter() - t
        if run.counters.step % max(1, run.cfg.logging.log_every) == 0 or run.counters.step in (
                1, run.total_steps):
            maybe_log(run, metrics, recent_time, recent_tokens)
            recent_tokens, recent_time = 0, 0.0
        if run.counters.step < run.total_steps:
            maybe_eval(run, autocast)
            maybe_checkpoint(run)
        if time_is_up(run.cfg, start):
            return "time_limit"
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
        status = train_loop(run, autocast)
        maybe_eval(run, autocast, force=True)
        maybe_checkpoint(run, force=True)
        summary = build_summary(run, status, time.time() - t0)
        if run.env.is_main:
            summary["samples"] = samples(run)
            for s in summary["samples"]:
                run.sinks[0].on_text(f"--- sample {s['prompt']!r}\n{s['prompt']}{s['completion']}")
            write_json(run_dir / "summary.json", summary)
            for s in run.sinks:
                s.on_end(summary)
        return summary
    finally:
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
