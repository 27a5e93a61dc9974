"""The training entry, top to bottom: distributed → layout → data → train module (model on meta,
parallelize, initialize, optimizer and schedule) → resume → loop → close.

The step itself is the train module's (`pretrain/train/module.py`), the same one the parity
tests, the benchmark and the memory measurement call. The loop reads top to bottom: take the
step's batches, forward/backward, let the callbacks look (`after_backward`), optimizer step,
settle the numbers at log steps, then `after_step` (faults, stop flags, evaluation,
checkpoints; `pretrain/train/hooks.py`). A step leaves its loss, gradient norm and finite flag on
the device (`StepRecord`); `settle` reads the pending ones in one transfer at log steps and
checkpoints and runs the host-side checks on them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from pretrain.config import TrainConfig
from pretrain.data.build import PreparedData, build_loader, ensure_data, known_tokenizer
from pretrain.data.loader import Batch, ShardedWindowLoader
from pretrain.data.objectives import Objective, Span, build_objective, infill_split, window_keys
from pretrain.data.sft import SftLoader, build_sft_loaders, chat_template, ensure_sft_tokenizer
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import NonFiniteError
from pretrain.eval.generate import InfillDoc, generate, infill_exact_match
from pretrain.eval.scores import Scorer, build_scorer
from pretrain.models.build import count_params, flops_per_token
from pretrain.parallel.dims import DistEnv, ParallelDims, destroy_distributed, init_distributed
from pretrain.quant.export import quantize_model, write_quantized
from pretrain.train import checkpoint as ckpt
from pretrain.train.adapters import BASE_KEY, base_record
from pretrain.train.compat import resumable_checkpoint
from pretrain.train.consolidate import load_model_from_checkpoint
from pretrain.train.guards import PreemptionHandler, SpikeDetector, StepWatchdog
from pretrain.train.hooks import (
    Callback,
    Rollback,
    StepInProgress,
    StepRecord,
    call,
    default_callbacks,
    settle,
)
from pretrain.train.host import tune_cpu_allocator
from pretrain.train.initial import check_base_tokenizer
from pretrain.train.loggers import Sink, build_sinks
from pretrain.train.metrics import device_peak_flops, peak_memory_gb
from pretrain.train.module import StepSettings, TrainModule, build_train_module

__all__ = ["Counters", "Run", "setup", "train", "train_loop", "train_step", "settle"]


@dataclass
class Counters:
    """Step/token counters and run-level records, saved with every checkpoint."""

    step: int = 0
    tokens: int = 0
    skipped_total: int = 0
    skipped_in_row: int = 0
    best_val_loss: float = math.inf
    last_val_loss: float = math.nan
    last_train_loss: float = math.nan
    wandb_id: str | None = None
    rollbacks: int = 0
    evals: int = 0
    """Evaluations run so far (0: the validation figures do not exist yet)."""
    last_eval: dict[str, float] = field(default_factory=dict)
    """The last evaluation's metrics (val/loss and the objective's own, e.g. val/mlm_acc)."""
    skip_steps: list[int] = field(default_factory=list)
    """Steps whose batch is consumed without an update (spikes rolled back)."""
    last_downstream: dict[str, float] = field(default_factory=dict)
    """The last downstream evaluation's metrics (eval/<task>/<metric>, `evals.tasks`)."""

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        fresh = Counters()
        for f in dataclasses.fields(self):
            setattr(self, f.name, state.get(f.name, getattr(fresh, f.name)))


@dataclass
class Run:
    """Everything the loop needs, built once by `setup`."""

    cfg: TrainConfig
    run_dir: Path
    env: DistEnv
    device: torch.device
    dims: ParallelDims
    mesh: DeviceMesh | None
    module: TrainModule
    """The step: model, optimizer, schedule (and the engine or pipeline) of this rank."""
    train_loader: ShardedWindowLoader | SftLoader
    val_loader: ShardedWindowLoader | SftLoader
    tokenizer: Tokenizer
    total_steps: int
    flops_per_token: float
    peak_flops: float
    counters: Counters = field(default_factory=Counters)
    sinks: list[Sink] = field(default_factory=list)
    checkpointer: ckpt.Checkpointer | None = None
    spike: SpikeDetector = field(default_factory=SpikeDetector)
    preempt: PreemptionHandler = field(default_factory=PreemptionHandler)
    callbacks: list[Callback] = field(default_factory=default_callbacks)
    start_step: int = 0
    """The step this process started (or resumed) at: injected faults fire on a first attempt."""
    pending: list[StepRecord] = field(default_factory=list)
    """Steps whose device numbers the host has not read yet (see `settle`)."""
    last_ckpt_time: float = field(default_factory=time.time)
    stop: str | None = None
    """Why the loop stops early ('preempted', 'time_limit'), set by a callback."""
    ckpt_due: bool = False
    """The wall-time checkpoint interval has passed (set by a callback)."""
    scorer: Scorer | None = None
    """The objective's validation metrics besides the loss (None for clm)."""
    infill_docs: list[InfillDoc] = field(default_factory=list)
    """fim: held-out (prefix, middle, suffix) documents for the infill exact match."""
    lora_base: dict[str, Any] | None = None
    """LoRA: the frozen base the adapters need (`pretrain.train.adapters.base_record`)."""

    def extra_eval(self) -> dict[str, float]:
        """Metrics that generate rather than score a batch: the FIM infill exact match, on a
        one-process layout (generation needs the whole model; see `samples`)."""
        model = self.module.generation_model
        if not self.infill_docs or model is None:
            return {}
        fim = self.tokenizer.fim_ids
        with torch.compiler.set_stance("force_eager"):
            em = infill_exact_match(model, self.infill_docs, fim_ids=fim,
                                    eos_id=self.tokenizer.eos_id,
                                    max_new_tokens=self.cfg.objective.eval_infill_max_tokens)
        return {"val/infill_em": em}

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.global_batch_size * self.cfg.seq_len

    @property
    def settle_each_step(self) -> bool:
        """The host must look at every step: the spike policy acts on the step itself, or the
        update cannot be skipped on the device."""
        return self.cfg.spike_policy in ("skip", "rollback") or not self.module.skips_on_device

    def state(self) -> dict[str, Any]:
        """Everything resumable, as stateful objects under fixed keys: the one dict that
        checkpoints save and load. `config` and `tokenizer_path` are recorded for tools and
        resume checks, not restored."""
        state: dict[str, Any] = {
            "train_module": self.module,
            "counters": self.counters,
            "scheduler": self.module.scheduler,
            "train_loader": self.train_loader,
            "spike": self.spike,
            "scaler": ckpt.MaybeStateful(self.module.scaler),
            "config": ckpt.Record(dataclasses.asdict(self.cfg)),
            "tokenizer_path": ckpt.Record(self.tokenizer.path),
        }
        if self.lora_base is not None:  # LoRA checkpoints lack the base: name it
            state[BASE_KEY] = ckpt.Record(self.lora_base)
        return state


def pick_device(name: str, env: DistEnv) -> torch.device:
    if name == "auto":
        return env.device
    if name == "cuda":
        return torch.device("cuda", env.local_rank)
    return torch.device(name)


def total_steps_of(cfg: TrainConfig, flops_per_input_token: float) -> int:
    """From flops_budget, else tokens, else steps; the schedule spans exactly these steps."""
    if cfg.flops_budget:
        tokens = cfg.flops_budget / flops_per_input_token
        return max(1, int(tokens // (cfg.global_batch_size * cfg.seq_len)))
    if cfg.tokens:
        return max(1, cfg.tokens // (cfg.global_batch_size * cfg.seq_len))
    return cfg.steps


def prepare_data(cfg: TrainConfig, env: DistEnv) -> PreparedData:
    """Rank 0 trains the tokenizer / prepares shards if needed; the others then find the cache.
    A given tokenizer that lacks the objective's special pieces is refused before any data is
    prepared with it."""
    if cfg.objective.name == "sft":  # chat JSONL read by the loader: only the tokenizer
        d = cfg.data
        return _on_main_first(env, lambda: PreparedData({}, ensure_sft_tokenizer(
            d.source, d.tokenizer, d.cache_dir, vocab_size=cfg.model.vocab_size)))
    tokenizer = known_tokenizer(cfg.data)
    if tokenizer is not None:
        Tokenizer.load(tokenizer).require_specials(cfg.objective.name)
    if env.is_main:
        data = ensure_data(cfg.data, vocab_size=cfg.model.vocab_size)
    if dist.is_initialized():
        dist.barrier()
    if not env.is_main:
        data = ensure_data(cfg.data, vocab_size=cfg.model.vocab_size)
    return data


def _on_main_first(env: DistEnv, make: Callable[[], PreparedData]) -> PreparedData:
    """`make()` on rank 0 (which writes any cache), then on the others (which find it)."""
    data = make() if env.is_main else None
    if dist.is_initialized():
        dist.barrier()
    return data if data is not None else make()


def build_sft_loaders_of(cfg: TrainConfig, tokenizer: Tokenizer, dp_rank: int, dp_size: int,
                         log: bool) -> tuple[SftLoader, SftLoader]:
    """objective=sft: the packed-conversation loaders (`pretrain.data.sft`)."""
    o = cfg.objective
    return build_sft_loaders(
        cfg.data.source, o.sft_val_source, tokenizer, seq_len=cfg.seq_len,
        micro_batch_size=cfg.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=cfg.seed,
        vocab_size=cfg.model.vocab_size, val_fraction=cfg.data.val_fraction,
        strict=o.sft_strict, truncate=o.sft_truncate,
        allow_data_change=cfg.data.allow_data_change, log=log)


def build_loaders(cfg: TrainConfig, data: PreparedData, dims: ParallelDims, dp_rank: int,
                  objective: Objective) -> tuple[ShardedWindowLoader, ShardedWindowLoader]:
    common = dict(seq_len=cfg.seq_len, micro_batch_size=cfg.micro_batch_size,
                  dp_rank=dp_rank, dp_size=dims.dp, seed=cfg.seed,
                  vocab_size=cfg.model.vocab_size, objective=objective)
    return (build_loader(cfg.data, data, "train", **common),
            build_loader(cfg.data, data, "val", **common))


def setup(cfg: TrainConfig, run_dir: Path) -> Run:
    env = DistEnv.from_env()
    device = pick_device(cfg.device, env)
    if device.type == "cpu":
        tune_cpu_allocator()
    init_distributed(env, device, cfg.parallel.timeout_s,
                     always=cfg.parallel.backend == "deepspeed")
    p = cfg.parallel
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, p.pp, env.world_size)
    mesh = dims.build_mesh(device.type)
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0

    data = prepare_data(cfg, env)
    tokenizer = Tokenizer.load(data.tokenizer_path)
    # resume wins over init_from: the weights (and their tokenizer) come from the run's own
    # checkpoint; but for LoRA, whose checkpoints hold the adapters only, the frozen base is
    # read again (`check_resume` made sure it is the same)
    init_from = cfg.init_from
    if (init_from is not None and cfg.lora.rank == 0
            and resumable_checkpoint(cfg, run_dir) is not None):
        init_from = None
    if init_from is not None:
        check_base_tokenizer(init_from, tokenizer)
    name = cfg.objective.name
    if name == "sft":
        train_loader, val_loader = build_sft_loaders_of(cfg, tokenizer, dp_rank, dims.dp,
                                                        log=env.is_main)
        objective: Objective = train_loader.objective
    else:
        objective = build_objective(cfg.objective, tokenizer, vocab_size=cfg.model.vocab_size)
        train_loader, val_loader = build_loaders(cfg, data, dims, dp_rank, objective)
    scorer = build_scorer(name, sentinels=tokenizer.sentinel_ids if name == "span" else None)
    infill_docs = (infill_documents(val_loader, cfg, eos_id=tokenizer.eos_id)
                   if name == "fim" else [])

    fpt = run_flops_per_token(cfg, objective)
    total = total_steps_of(cfg, fpt)
    settings = dataclasses.replace(StepSettings.of(cfg, device), init_from=init_from)
    module = build_train_module(model=cfg.model, optim=cfg.optim, parallel=cfg.parallel,
                                settings=settings, dims=dims, mesh=mesh,
                                device=device, total_steps=total)
    peak, _ = device_peak_flops(device, cfg.data.cache_dir)
    return Run(
        cfg=cfg, run_dir=run_dir, env=env, device=device, dims=dims, mesh=mesh, module=module,
        train_loader=train_loader, val_loader=val_loader, tokenizer=tokenizer,
        total_steps=total, flops_per_token=fpt,
        peak_flops=peak,
        checkpointer=ckpt.Checkpointer(run_dir / "checkpoints", keep=cfg.ckpt_keep,
                                       async_save=cfg.ckpt_async),
        spike=SpikeDetector(window=cfg.spike_window, threshold=cfg.spike_threshold),
        scorer=scorer, infill_docs=infill_docs,
        lora_base=(base_record(cfg.init_from, cfg.model, cfg.seed) if cfg.lora.rank > 0
                   else None),
    )


def run_flops_per_token(cfg: TrainConfig, objective: Objective) -> float:
    """FLOPs per input token; span corruption's decoder runs on its target length."""
    decoder_len = objective.target_len(cfg.seq_len) if isinstance(objective, Span) else None
    return flops_per_token(cfg.model, cfg.seq_len, decoder_len=decoder_len)


def infill_documents(loader: ShardedWindowLoader, cfg: TrainConfig, *,
                     eos_id: int) -> list[InfillDoc]:
    """fim: the first `eval_infill_docs` held-out documents (of the first source) as (prefix,
    middle, suffix), each cut to fit the training window and split by a key of (seed, its
    index), so every evaluation and every layout asks for the same infills."""
    o = cfg.objective
    n, max_middle = o.eval_infill_docs, o.eval_infill_max_tokens
    max_len = cfg.seq_len - 4  # the three FIM pieces and one generated EOS fit the window
    docs: list[InfillDoc] = []
    for shard in loader.sources[0].shards:
        start = 0
        for end in np.asarray(shard.doc_ends, dtype=np.int64):
            doc = np.asarray(shard.tokens[start:end], dtype=np.int64)
            start = end
            doc = doc[doc != eos_id][:max_len]
            if len(doc) < 2:
                continue
            key = window_keys(cfg.seed, "infill", np.array([len(docs)]))[0]
            docs.append(tuple(part.tolist() for part in
                              infill_split(doc, key, max_middle=max_middle)))
            if len(docs) >= n:
                return docs
    return docs


def maybe_resume(run: Run) -> None:
    """resume=auto: newest good checkpoint in the run directory; or an explicit path."""
    mode = run.cfg.resume
    if mode == "none":
        return
    found = ckpt.find_resumable(run.ckpt_root) if mode == "auto" else ckpt.resolve_checkpoint(mode)
    if found is None:
        return
    ckpt.load_state(found, run.state())
    run.start_step = run.counters.step
    if run.env.is_main:
        print(f"resumed from {found} at step {run.counters.step}", flush=True)
        for note in getattr(run.train_loader, "notes", []):
            print(f"data: {note}", flush=True)


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
    ckpt.load_state(found, run.state())
    run.counters.skip_steps, run.counters.rollbacks = skip_steps, rollbacks
    if run.env.is_main:
        print(f"rolled back to {found.name} after a loss spike at step {step}; its batch will "
              "be skipped", flush=True)


class DataWait:
    """The step's micro-batches, read lazily from the loader, with the time spent waiting."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def batches(self, loader: ShardedWindowLoader | SftLoader, n: int) -> Iterator[Batch]:
        for _ in range(n):
            t = time.perf_counter()
            batch = loader.next_batch()
            self.seconds += time.perf_counter() - t
            yield batch


def train_step(run: Run) -> StepRecord:
    """One optimizer step through the train module, with the callbacks' say between backward
    and the update. Nothing here reads a device number on the host unless
    `run.settle_each_step`."""
    step = run.counters.step + 1
    lr = run.module.scheduler.get_last_lr()[0]
    if step in run.counters.skip_steps:
        return skip_batch(run, step, lr)
    wait = DataWait()
    loss = run.module.forward_backward(wait.batches(run.train_loader, run.module.grad_accum))
    pending = StepInProgress(step, loss)
    call(run, "after_backward", pending)  # this rank's loss
    pending.loss = run.module.dp_mean(pending.loss)
    call(run, "before_update", pending)  # the mean over the data-parallel ranks
    stats = run.module.optimizer_step(pending.loss, skip=pending.skip)
    return StepRecord(step, stats.loss, stats.grad_norm, stats.finite, lr, wait.seconds,
                      skipped=pending.skip)


def skip_batch(run: Run, step: int, lr: float) -> StepRecord:
    """Consume this step's batches without an update (the batch that caused a rolled-back
    spike), so the data order after it is the one an uninterrupted run would see."""
    for _ in range(run.module.grad_accum):
        run.train_loader.next_batch()
    run.counters.skipped_total += 1
    run.module.scheduler.step()
    nan = torch.full((), math.nan, device=run.device)
    return StepRecord(step, nan, nan, torch.ones((), device=run.device), lr, 0.0, skipped=True)


def is_log_step(run: Run, step: int) -> bool:
    return step % max(1, run.cfg.logging.log_every) == 0 or step in (1, run.total_steps)


def log_metrics(run: Run, metrics: dict[str, float], step_time: float,
                tokens: int) -> dict[str, float]:
    """The settled metrics of a log step, with throughput over the steps since the last."""
    tps = tokens / max(step_time, 1e-9)
    return {
        **metrics,
        "train/tokens": float(run.counters.tokens),
        "perf/tokens_per_sec": tps,
        "perf/mfu": tps * run.flops_per_token / (run.peak_flops * run.env.world_size),
        "perf/step_time_s": step_time * run.tokens_per_step / max(tokens, 1),  # mean per step
        "perf/memory_gb": peak_memory_gb(run.device),
        **run.train_loader.metrics(),
    }


def train_loop(run: Run) -> str:
    """Steps until the budget, or until a callback stops the run; returns the final status."""
    recent_tokens, recent_time = 0, 0.0
    watchdog = StepWatchdog(run.cfg.parallel.timeout_s)
    call(run, "before_loop")
    while run.counters.step < run.total_steps and run.stop is None:
        t = time.perf_counter()
        watchdog.arm()
        try:
            record = train_step(run)
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
            call(run, "on_log", log_metrics(run, metrics, recent_time, recent_tokens))
            recent_tokens, recent_time = 0, 0.0
        call(run, "after_step")
    return run.stop or "completed"


def samples(run: Run) -> list[dict[str, str]]:
    """A few sampled continuations, on a single-process layout only (a sharded or pipelined
    model would need every rank in lockstep). Generation runs eagerly: the compiled blocks
    were compiled for training shapes, and a KV cache changes the shape every token."""
    model = run.module.generation_model
    if model is None or not run.cfg.sample_prompts or run.cfg.model.arch != "decoder":
        return []  # encoders and encoder-decoders: `pretrain-generate` fills masks / spans
    out = []
    gen = torch.Generator(device=run.device).manual_seed(run.cfg.seed)
    # objective=sft: each prompt is a user message, rendered and stopped as the data was.
    template = chat_template(run.tokenizer) if run.cfg.objective.name == "sft" else None
    stop_ids = template.stop_ids() if template is not None else []
    with torch.compiler.set_stance("force_eager"):
        for prompt in run.cfg.sample_prompts:
            ids = (run.tokenizer.encode(prompt, bos=True) if template is None
                   else template.prompt([{"role": "user", "content": prompt}]))
            new = generate(model, ids, max_new_tokens=run.cfg.sample_tokens, temperature=0.8,
                           top_k=50, eos_id=run.tokenizer.eos_id, stop_ids=stop_ids,
                           generator=gen)
            out.append({"prompt": prompt, "completion": run.tokenizer.decode(new)})
    return out


def build_summary(run: Run, status: str, wall_time: float) -> dict[str, Any]:
    m, c = run.cfg.model, run.counters
    trained = c.step > 0
    return {
        "run_name": run.cfg.run_name,
        "model": m.name,
        "arch": m.arch,
        "objective": run.cfg.objective.name,
        "params": count_params(m),
        "non_embedding_params": count_params(m, exclude_embeddings=True),
        "tokens": run.counters.tokens,
        "flops": run.flops_per_token * run.counters.tokens,
        "flops_per_token": run.flops_per_token,
        "steps": run.counters.step,
        "seq_len": run.cfg.seq_len,
        # None: never measured (no step settled, no evaluation ran); a measured non-finite
        # value is kept, and written as a string ("nan"), so a sweep fit rejects the run.
        "final_train_loss": c.last_train_loss if trained else None,
        "final_val_loss": c.last_val_loss if c.evals else None,
        "best_val_loss": c.best_val_loss if c.evals else None,
        "final_val_ppl": math.exp(min(c.last_val_loss, 50.0)) if c.evals else None,
        "final_eval": dict(c.last_eval) if c.evals else None,
        "downstream": dict(c.last_downstream) or None,
        "wall_time_s": wall_time,
        "tokens_per_sec": run.counters.tokens / max(wall_time, 1e-9),
        "skipped_steps": run.counters.skipped_total,
        "rollbacks": run.counters.rollbacks,
        "world_size": run.env.world_size,
        "status": status,
        "sweep": run.cfg.tags or None,
    }


def strict_json(obj: Any) -> Any:
    """`obj` with every non-finite float as a string ("nan", "inf", "-inf"): JSON has no NaN or
    Infinity, and a reader that parses numbers from strings still sees what happened."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(strict_json(obj), indent=2, default=str, allow_nan=False))
    tmp.replace(path)


def train(cfg: TrainConfig, run_dir: Path, *,
          on_start: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run (or resume) one training job; returns the summary (rank 0 writes summary.json).

    `on_start` runs on rank 0 once the start is accepted (set up, resumed), before anything is
    written to the run directory: the entry saves the resolved config there."""
    t0 = time.time()
    run = setup(cfg, run_dir)
    try:
        maybe_resume(run)
        if run.env.is_main:
            if on_start is not None:
                on_start()
            run.sinks = build_sinks(cfg.logging, run_dir=run_dir, run_name=cfg.run_name,
                                    config=dataclasses.asdict(cfg), total_steps=run.total_steps,
                                    start_step=run.counters.step,
                                    wandb_id=run.counters.wandb_id)
            run.counters.wandb_id = getattr(getattr(run.sinks[-1], "run", None), "id", None)
            announce(run)
        run.preempt.install()
        status = train_loop(run)
        settle(run)
        call(run, "on_end", status)
        if cfg.quant.qat and status == "completed":
            write_qat_model(run)
        summary = build_summary(run, status, time.time() - t0)
        if run.env.is_main:
            finish(run, summary, status)
        return summary
    finally:
        run.preempt.uninstall()
        destroy_distributed()


def write_qat_model(run: Run) -> None:
    """quant.qat: the final checkpoint converted to the real quantized model (the scheme the
    run fake-quantized towards) in run_dir/quantized, for pretrain-generate and
    pretrain-quantize --eval. Read back from the checkpoint, so any layout converts the same."""
    run.checkpointer.wait()
    if dist.is_initialized():
        dist.barrier()
    q = run.cfg.quant
    source = ckpt.resolve_checkpoint(run.run_dir / "checkpoints")
    # Every rank: with a process group, reading a DCP checkpoint is collective (each rank
    # holds a whole CPU copy of the model for a moment).
    model, state = load_model_from_checkpoint(source)
    if not run.env.is_main:
        return
    names = quantize_model(model, q.qat, q.group_size, include_output=q.include_output)
    out = write_quantized(model, run.run_dir / "quantized",
                          {"scheme": q.qat, "group_size": q.group_size, "quantized": names,
                           "include_output": q.include_output,
                           "source": str(source), "trainer_state": state, "qat": True})
    run.sinks[0].on_text(f"quantized model ({q.qat}, {len(names)} linears) in {out}")


def finish(run: Run, summary: dict[str, Any], status: str) -> None:
    """Rank 0: samples (not when preempted: seconds left), summary.json, the sinks' end."""
    summary["samples"] = samples(run) if status != "preempted" else []
    for s in summary["samples"]:
        run.sinks[0].on_text(f"--- sample {s['prompt']!r}\n{s['prompt']}{s['completion']}")
    write_json(run.run_dir / "summary.json", summary)
    for s in run.sinks:
        s.on_end(strict_json(summary))


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
    if run.lora_base is not None:
        trainable = sum(p.numel() for p in run.module.model.parameters() if p.requires_grad)
        base = run.lora_base
        run.sinks[0].on_text(
            f"LoRA rank {run.cfg.lora.rank} on {','.join(run.cfg.lora.targets)}: "
            f"{trainable / 1e6:.3f}M trainable parameters | frozen base: "
            f"{base['path'] or 'random init, seed ' + str(base['seed'])}")

