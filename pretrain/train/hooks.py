"""What plugs into the training loop: small callbacks with named hooks.

The loop (`pretrain/train/trainer.py::train_loop`) calls, in order of `default_callbacks`:

    before_loop(run)            once, when the loop starts (the time limit counts from here)
    after_backward(run, step)   after forward/backward, with this rank's loss: may change
                                `step.loss` (fault injection)
    before_update(run, step)    with the loss averaged over the data-parallel ranks, before the
                                optimizer step: may set `step.skip` (spike policy)
    on_log(run, metrics)        at log steps, with the settled numbers (metric sinks)
    after_step(run)             after the counters moved: faults, stop flags (preemption, time
                                limit), evaluation, downstream tasks, checkpoints
    on_end(run, status)         once the loop stopped: the final evaluation and checkpoint

A callback implements only the hooks it needs. Each reads its own part of the config.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from pretrain.data.loader import Batch, ShardedWindowLoader
from pretrain.errors import NonFiniteError

if TYPE_CHECKING:
    from pretrain.train.trainer import Run


@dataclass
class StepInProgress:
    """The step between backward and the optimizer step, as callbacks may change it."""

    step: int
    loss: Tensor
    """() mean loss over the step's micro-batches: this rank's in `after_backward`, the mean
    over the data-parallel ranks in `before_update`."""
    skip: bool = False
    """Drop this step's update (a spike policy decided so on the host)."""


class Rollback(Exception):
    """A loss spike under spike_policy=rollback: reload the last checkpoint, skip this step."""

    def __init__(self, step: int) -> None:
        super().__init__(f"loss spike at step {step}")
        self.step = step


class Callback:
    """Hooks the loop calls; each is a no-op unless overridden."""

    def before_loop(self, run: Run) -> None: ...

    def after_backward(self, run: Run, step: StepInProgress) -> None: ...

    def before_update(self, run: Run, step: StepInProgress) -> None: ...

    def on_log(self, run: Run, metrics: dict[str, float]) -> None: ...

    def after_step(self, run: Run) -> None: ...

    def on_end(self, run: Run, status: str) -> None: ...


def first_attempt(run: Run) -> bool:
    """Injected crashes fire only on a run's first attempt (not after a resume or restart)."""
    return run.start_step == 0 and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"


class FaultInjection(Callback):
    """`faults.*` (tests of the fault paths): a NaN loss and gradients on one rank, a loss 20×
    too high, a hard exit (like kill -9) or SIGTERM after a step."""

    def after_backward(self, run: Run, step: StepInProgress) -> None:
        f = run.cfg.faults
        if f.nan_at_step == step.step and run.env.rank == f.nan_rank:
            for p in run.module.model.parameters():
                if p.grad is not None:
                    p.grad.fill_(math.nan)
            step.loss = step.loss * math.nan
        elif f.spike_at_step == step.step:
            step.loss = step.loss * 20.0

    def after_step(self, run: Run) -> None:
        f, step = run.cfg.faults, run.counters.step
        if f.crash_at_step == step and run.env.rank == f.crash_rank and first_attempt(run):
            os._exit(1)
        if f.signal_at_step == step and run.start_step < step:
            os.kill(os.getpid(), signal.SIGTERM)


class SpikeGuard(Callback):
    """spike_policy=skip|rollback decides on the step itself, before the update (a host read of
    the loss); spike_policy=warn looks at settled losses instead (`trainer.settle`)."""

    def before_update(self, run: Run, step: StepInProgress) -> None:
        if run.cfg.spike_policy not in ("skip", "rollback"):
            return
        verdict = spike_verdict(run, step.step, float(step.loss))
        if verdict == "rollback":
            run.module.optimizer.zero_grad(set_to_none=True)
            raise Rollback(step.step)
        step.skip = verdict == "skip"


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


class StopFlags(Callback):
    """Preemption (SIGTERM/SIGUSR1 on any rank), the wall-time limit and the wall-time
    checkpoint interval, agreed by every rank in one collective (the clocks are rank 0's)."""

    def __init__(self) -> None:
        self.start = time.time()

    def before_loop(self, run: Run) -> None:
        self.start = time.time()

    def after_step(self, run: Run) -> None:
        cfg, now = run.cfg, time.time()
        clocks = run.env.is_main
        flags = torch.tensor([
            float(run.preempt.requested),
            float(clocks and cfg.time_limit_s > 0 and now - self.start > cfg.time_limit_s),
            float(clocks and cfg.ckpt_every_s > 0 and now - run.last_ckpt_time > cfg.ckpt_every_s),
        ])
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if bool(flags[0]):
            run.stop = "preempted"
        elif bool(flags[1]):
            run.stop = "time_limit"
        run.ckpt_due = bool(flags[2])


def _mid_run(run: Run) -> bool:
    """Periodic evaluation and checkpoints happen between steps, not after the last one or
    when stopping (the end does its own)."""
    return run.stop is None and run.counters.step < run.total_steps


class Evaluation(Callback):
    """Validation every `eval_every` steps and at the end (not when preempted: seconds left)."""

    def after_step(self, run: Run) -> None:
        every = run.cfg.eval_every
        if _mid_run(run) and every > 0 and run.counters.step % every == 0:
            evaluate(run)

    def on_end(self, run: Run, status: str) -> None:
        if status != "preempted":
            evaluate(run)


def evaluate(run: Run) -> dict[str, float]:
    metrics = run.module.evaluate(validation_batches(run), run.scorer)
    metrics |= run.extra_eval()
    run.counters.evals += 1
    run.counters.last_eval = dict(metrics)
    run.counters.last_val_loss = metrics["val/loss"]
    run.counters.best_val_loss = min(run.counters.best_val_loss, metrics["val/loss"])
    for s in run.sinks:
        s.on_eval(run.counters.step, metrics)
    return metrics


class DownstreamEvaluation(Callback):
    """`evals.tasks` every `evals.every` steps and at the end (not when preempted): each
    data-parallel rank scores its share of the items, the sums are added over the ranks
    (`pretrain.eval.downstream`); the metrics go to the sinks as eval/<task>/<metric>."""

    def __init__(self) -> None:
        self.items: dict[str, Any] | None = None

    def before_loop(self, run: Run) -> None:
        if run.cfg.evals.tasks:
            from pretrain.eval.tasks import load_task

            e = run.cfg.evals
            self.items = {n: load_task(n, e.data_dir, limit=e.limit) for n in e.tasks}

    def after_step(self, run: Run) -> None:
        every = run.cfg.evals.every
        if self.items and _mid_run(run) and every > 0 and run.counters.step % every == 0:
            evaluate_downstream(run, self.items)

    def on_end(self, run: Run, status: str) -> None:
        if self.items and status != "preempted":
            evaluate_downstream(run, self.items)


def evaluate_downstream(run: Run, items: dict[str, Any]) -> dict[str, float]:
    from pretrain.eval.downstream import Collectives, evaluate_tasks, flat_metrics

    module, dims = run.module, run.dims
    model = getattr(module, "model", None)
    group = run.mesh["dp"].get_group() if dims.dp > 1 and run.mesh is not None else None

    def dp_max(n: int) -> int:
        t = torch.tensor([n], dtype=torch.long, device=run.device)
        if group is not None:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return int(t)

    def forward(tokens: Tensor, **kwargs: Tensor) -> Tensor:
        with module.autocast():
            return model(tokens, **kwargs)

    rank = run.mesh["dp"].get_local_rank() if group is not None else 0
    start = time.perf_counter()
    model.eval()
    try:
        with torch.compiler.set_stance("force_eager"), module.attention(), torch.no_grad():
            results = evaluate_tasks(
                forward, run.tokenizer, items, max_len=run.cfg.evals.window or run.cfg.seq_len,
                batch_size=run.cfg.evals.batch_size, device=run.device,
                collectives=Collectives(rank, dims.dp, module.dp_sum, dp_max),
                shared_context=True)
    finally:
        model.train()
    metrics = flat_metrics(results)
    metrics["eval/downstream_s"] = time.perf_counter() - start
    run.counters.last_downstream = dict(metrics)
    for s in run.sinks:
        s.on_eval(run.counters.step, metrics)
    return metrics


def validation_batches(run: Run) -> Iterator[Batch]:
    """The fixed validation set: with a mixture, one source per batch (so `evaluate` reports
    each source's loss); with `eval.stride`, sliding windows (`ShardedWindowLoader.eval_windows`).
    sft's packed conversations are one source, and validate() refuses eval.stride there."""
    loader = run.val_loader
    if not isinstance(loader, ShardedWindowLoader):
        return loader.eval_windows(run.cfg.eval_windows)
    return loader.eval_windows(run.cfg.eval_windows, stride=run.cfg.eval.stride,
                               by_source=len(loader.sources) > 1)


class Checkpointing(Callback):
    """Every `ckpt_every` steps, when the wall-time interval is due, and at the end; an async
    save is finalized at log steps once every rank has written."""

    def on_log(self, run: Run, metrics: dict[str, float]) -> None:
        run.checkpointer.poll()

    def after_step(self, run: Run) -> None:
        every = run.cfg.ckpt_every
        if _mid_run(run) and (run.ckpt_due or (every > 0 and run.counters.step % every == 0)):
            save(run)

    def on_end(self, run: Run, status: str) -> None:
        save(run)
        run.checkpointer.wait()


def save(run: Run) -> None:
    settle(run)  # the saved counters and spike history include every step so far
    step = run.counters.step
    run.last_ckpt_time = time.time()
    crash = run.cfg.faults.crash_in_checkpoint_at_step == step and first_attempt(run)
    run.checkpointer.save(step, run.state(), finalize=not crash)
    if crash:
        os._exit(1)  # the data is written but never finalized: a crash mid-checkpoint


class MetricSinks(Callback):
    """Console + progress bar, metrics.jsonl and W&B (rank 0 only has sinks)."""

    def on_log(self, run: Run, metrics: dict[str, float]) -> None:
        for s in run.sinks:
            s.on_step(run.counters.step, metrics)


@dataclass
class StepRecord:
    """One optimizer step as it left the device queue: loss, gradient norm and the all-rank
    finite flag stay device tensors until `settle` reads a batch of records in one transfer,
    so a step never waits for the device to tell the host a number."""

    step: int
    loss: Tensor
    grad_norm: Tensor
    finite: Tensor
    """() float32: 1 when loss and gradient norm are finite on every rank."""
    lr: float
    data_wait: float
    skipped: bool = False
    """Skipped for a reason the host already knows (a replayed spike batch, spike_policy=skip)."""


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


def default_callbacks() -> list[Callback]:
    """In the order they run: faults before the guards; stop flags before evaluation and
    checkpoints, which skip when the run is stopping."""
    return [FaultInjection(), SpikeGuard(), StopFlags(), MetricSinks(), Evaluation(),
            DownstreamEvaluation(), Checkpointing()]


def call(run: Run, hook: str, *args: Any) -> None:
    for cb in run.callbacks:
        getattr(cb, hook)(run, *args)
