"""The train modules: the one training step, per backend, called by everyone.

    NativeTrainModule    one process, DDP, FSDP2, HSDP, tensor (+ sequence) parallel, any mix
    PipelineTrainModule  torch.distributed.pipelining stages and schedules (with the above inside)
    DeepSpeedTrainModule a DeepSpeed engine (ZeRO 1-3) around the same model and AdamW

Each has the same small interface, and the trainer, the layout-parity tests, every row of ours
in `pretrain-bench` and the memory measurement all call it, so what is proven and measured is
what users run:

    forward_backward(batches) -> loss      the step's micro-batches; this rank's mean loss over
                                           them, left on the device (`dp_mean` averages it)
    optimizer_step(loss, skip=False)       clip, the all-rank finite flag, AdamW (a non-finite
                                           step is skipped on the device), the LR schedule
    train_step(batches) -> StepStats       both
    evaluate(batches) -> {val/loss, ...}   token-weighted over every rank's windows
    state_dict() / load_state_dict()       model + optimizer (DCP-stateful, keyed by name)
    write_checkpoint(dir) / read_checkpoint(dir)

A module is built from narrow sub-configs (`build_train_module`): the model, the optimizer, the
parallel layout, and `StepSettings` (precision, checkpointing, compile, loss, batch sizes). It
needs no Hydra, no data preparation and, on one process, no process group.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from pretrain.config import (
    LoraConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    QuantConfig,
    TrainConfig,
    uses_chunked_loss,
)
from pretrain.data.loader import Batch
from pretrain.errors import CheckpointError, ConfigError
from pretrain.eval.scores import Scorer
from pretrain.models.build import build_model
from pretrain.models.llama import attention_backends, check_initialized
from pretrain.models.lora import apply_lora
from pretrain.models.loss import IGNORE_INDEX, cross_entropy
from pretrain.parallel import deepspeed_backend as ds
from pretrain.parallel.dims import ParallelDims
from pretrain.parallel.parallelize import (
    clip_grad_norm_,
    init_model_weights,
    parallelize,
    set_gradient_sync,
)
from pretrain.parallel.pipeline import (
    build_pipeline,
    local_model,
    pipeline_eval_sum,
    pipeline_split,
    pipeline_step,
)
from pretrain.quant.training import apply_training_quant
from pretrain.train.checkpoint import ModelOptimState
from pretrain.train.initial import load_initial_weights
from pretrain.train.optim import build_optimizer, build_schedule


@dataclass(frozen=True)
class StepSettings:
    """The training options a step needs, besides the model, optimizer and layout configs."""

    global_batch_size: int
    """Sequences per optimizer step over all data-parallel ranks."""
    micro_batch_size: int
    """Sequences per forward/backward on one rank."""
    precision: str = "bf16"
    """'fp32', 'bf16' (autocast), 'fp16' (autocast + loss scaler) or 'fp8' (float8 linears,
    bf16 autocast for the rest)."""
    activation_checkpointing: str = "none"
    """'none', 'full' or 'selective'."""
    compile: bool = False
    """torch.compile each block and the loss chunks."""
    chunked_loss: bool = True
    """The model computes the loss chunk by chunk (needs the whole output projection)."""
    sdpa_backends: tuple[str, ...] = ()
    """Attention kernels in priority order (empty: PyTorch's choice / the CUDA default)."""
    seed: int = 0
    """Seed of the layout-independent initialization."""
    lora: LoraConfig | None = None
    """Low-rank adapters on a frozen base (None: the whole model trains)."""
    init_from: str | None = None
    """Weights loaded over the initialization (`pretrain.train.initial`); None: random."""
    quant: QuantConfig = field(default_factory=QuantConfig)
    """fp8 recipe (precision=fp8) and quantization-aware training."""

    @classmethod
    def of(cls, cfg: TrainConfig, device: torch.device) -> StepSettings:
        """The settings a `TrainConfig` gives on `device` (the defaults resolved)."""
        return cls(global_batch_size=cfg.global_batch_size,
                   micro_batch_size=cfg.micro_batch_size, precision=cfg.precision,
                   activation_checkpointing=cfg.activation_checkpointing,
                   compile=compile_enabled(cfg, device),
                   chunked_loss=uses_chunked_loss(cfg.loss, cfg.parallel),
                   sdpa_backends=tuple(cfg.sdpa_backends), seed=cfg.seed,
                   lora=cfg.lora if cfg.lora.rank > 0 else None,
                   init_from=cfg.init_from, quant=cfg.quant)


def compile_enabled(cfg: TrainConfig, device: torch.device) -> bool:
    """compile=null: on with CUDA and the native backend (the DeepSpeed engine hooks inside
    the blocks); an explicit true/false wins."""
    if cfg.compile is not None:
        return cfg.compile
    return device.type == "cuda" and cfg.parallel.backend == "native"


def autocast_factory(precision: str, device: torch.device) -> Callable[[], Any]:
    if precision == "fp32":
        return contextlib.nullcontext
    # fp8: the float8 linears cast their own operands; everything else runs in bf16.
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return lambda: torch.autocast(device.type, dtype=dtype)


@dataclass
class StepStats:
    """One optimizer step's numbers, left on the device (reading them waits for it)."""

    loss: Tensor
    """() mean loss over the step's micro-batches and data-parallel ranks."""
    grad_norm: Tensor
    """() global gradient norm before clipping."""
    finite: Tensor
    """() float32: 1 when loss and gradient norm are finite on every rank."""


class TrainModule:
    """What every backend shares; a subclass provides `_micro_batch` and the model build."""

    model: nn.Module
    """This rank's whole model: what the optimizer, clipping and checkpoints see."""
    parts: list[nn.Module]
    """The modules that run forward: [model], or this rank's pipeline stages."""

    def __init__(self, *, model: ModelConfig, optim: OptimConfig, parallel: ParallelConfig,
                 settings: StepSettings, dims: ParallelDims, mesh: DeviceMesh | None,
                 device: torch.device, total_steps: int) -> None:
        self.model_cfg, self.optim_cfg, self.parallel = model, optim, parallel
        self.settings, self.dims, self.mesh, self.device = settings, dims, mesh, device
        per_step = settings.micro_batch_size * dims.dp
        if settings.global_batch_size % per_step or settings.global_batch_size < per_step:
            raise ConfigError(f"global_batch_size={settings.global_batch_size} is not a positive "
                              f"multiple of micro_batch_size={settings.micro_batch_size} × "
                              f"data-parallel degree {dims.dp}; change one of them")
        self.grad_accum = settings.global_batch_size // per_step
        self.autocast = autocast_factory(settings.precision, device)
        self._build()
        self.optimizer = build_optimizer(self.model, optim, device)
        self.scheduler = build_schedule(self.optimizer, optim, total_steps)
        self.scaler: torch.amp.GradScaler | None = None
        self._after_optimizer()

    # -- construction, per backend
    def _build(self) -> None:
        raise NotImplementedError

    def _after_optimizer(self) -> None:
        if self.settings.precision == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type)

    def _build_parts(self, stages: list[tuple[int, nn.Module]], mesh: DeviceMesh | None) -> None:
        s = self.settings
        for _, part in stages:
            if s.lora is not None:  # on meta, before parallelism wraps the layers
                apply_lora(part, rank=s.lora.rank, alpha=s.lora.alpha, dropout=s.lora.dropout,
                           targets=s.lora.targets)
            # fp8 / QAT swap linears for torchao's; before parallelize, as torchtitan does.
            apply_training_quant(part, precision=s.precision, quant=s.quant, device=self.device)
            parallelize(part, self.dims, mesh, ac_mode=s.activation_checkpointing,
                        compile=s.compile, parallel=self.parallel, precision=s.precision)
        self.parts = [part for _, part in stages]
        init_model_weights(self.parts, self.model_cfg, s.seed, self.device)
        if s.init_from is not None:
            load_initial_weights(self.parts, s.init_from, self.model_cfg)
        for part in self.parts:
            check_initialized(part)
            part.train()

    # -- the step
    def attention(self) -> contextlib.AbstractContextManager:
        """The SDPA kernel choice, entered around forward and backward (checkpoint recompute
        runs in backward and must use the same kernel)."""
        return attention_backends(list(self.settings.sdpa_backends), self.device.type)

    def forward_backward(self, batches: Iterable[Batch]) -> Tensor:
        """Forward and backward of the step's `grad_accum` micro-batches (a lazy iterable is
        read one micro-batch at a time); returns this rank's mean loss over them (`dp_mean`
        averages it over the ranks). Data-parallel gradients are reduced once, after the last
        micro-batch."""
        loss_sum = torch.zeros((), device=self.device)
        n = 0
        with self.attention():
            for batch in batches:
                n += 1
                set_gradient_sync(self.parts, n == self.grad_accum)
                loss_sum += self._micro_batch(batch.to(self.device, non_blocking=True))
        if n != self.grad_accum:
            raise ValueError(f"a step takes {self.grad_accum} micro-batches, got {n}")
        return loss_sum / self.grad_accum

    def _micro_batch(self, batch: Batch) -> Tensor:
        """Forward and backward of one micro-batch; returns its mean loss (detached)."""
        raise NotImplementedError

    def optimizer_step(self, loss: Tensor, *, skip: bool = False) -> StepStats:
        """`loss`: the step's mean over the data-parallel ranks. Clip, agree on finiteness over
        all ranks, step AdamW and the schedule. A non-finite step leaves weights and moments
        untouched; `skip` drops the update (a spike policy). Nothing is read on the host unless
        the optimizer cannot skip on the device."""
        grad_norm = self.clip()
        finite = self.all_ranks_finite(loss, grad_norm)
        if skip:
            pass
        elif self.skips_on_device:
            self.optimizer.found_inf = 1.0 - finite
            self.optimizer.step()
        elif bool(finite.item()):  # a host sync: this optimizer cannot skip on the device
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return StepStats(loss, grad_norm, finite)

    def train_step(self, batches: Iterable[Batch]) -> StepStats:
        """One optimizer step on the step's micro-batches."""
        return self.optimizer_step(self.dp_mean(self.forward_backward(batches)))

    def clip(self) -> Tensor:
        """Clip to optim.grad_clip (0: no clip); the global norm over every shard and stage."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else math.inf
        pp_mesh = self.mesh["pp"] if self.dims.pp_enabled else None
        return clip_grad_norm_(self.model.parameters(), max_norm, pp_mesh=pp_mesh)

    @property
    def skips_on_device(self) -> bool:
        """Fused AdamW takes a `found_inf` tensor and leaves parameters, moments and step count
        untouched when it is nonzero: a non-finite step is skipped without the host looking."""
        return self.scaler is None and bool(self.optimizer.defaults.get("fused"))

    def all_ranks_finite(self, loss: Tensor, grad_norm: Tensor) -> Tensor:
        """() float32, 1 only if loss and gradient norm are finite on every rank: one rank's NaN
        stops the update everywhere, so replicas never diverge. A device-side all-reduce (gloo
        takes host tensors)."""
        ok = (torch.isfinite(loss) & torch.isfinite(grad_norm)).float().reshape(())
        if dist.is_initialized():
            on_host = dist.get_backend() == "gloo"
            ok = ok.cpu() if on_host else ok
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            ok = ok.to(self.device, non_blocking=True)
        return ok

    def dp_sum(self, t: Tensor) -> Tensor:
        """Sum over data-parallel ranks; the TP and PP ranks of one replica hold the same value."""
        if self.dims.dp > 1:
            dist.all_reduce(t, group=self.mesh["dp"].get_group())
        return t

    def dp_mean(self, t: Tensor) -> Tensor:
        return self.dp_sum(t) / self.dims.dp if self.dims.dp > 1 else t

    # -- evaluation
    def _eval_sum(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(summed loss over the batch's targets that are not IGNORE_INDEX, their count)."""
        raise NotImplementedError

    def _logits(self, batch: Batch) -> Tensor | None:
        """The batch's full logits, for a scorer; None where this rank does not have them."""
        return None

    def evaluate(self, batches: Iterable[Batch], scorer: Scorer | None = None) -> dict[str, float]:
        """Token-weighted mean loss over every rank's batches (padding rows carry IGNORE_INDEX
        targets), so a fixed global set of windows gives the same loss on any layout; with a
        `scorer`, also the objective's metrics (from the full logits), summed the same way.
        Batches that name their `source` also count toward `val/loss/<source>` (and ppl);
        `val/loss` stays the mean over all of them."""
        names: list[str] = []
        sums: list[Tensor] = []
        for part in self.parts:
            part.eval()
        try:
            with self.attention(), torch.no_grad():
                for batch in batches:
                    batch = batch.to(self.device)
                    logits = self._logits(batch) if scorer is not None else None
                    if logits is not None:
                        counted = batch.targets != IGNORE_INDEX
                        loss_sum = F.cross_entropy(
                            logits.flatten(0, 1).float(), batch.targets.flatten(),
                            ignore_index=IGNORE_INDEX, reduction="sum")
                        pairs = {"val/loss": (loss_sum.double(), counted.sum().double()),
                                 **scorer.sums(logits, batch)}
                    else:
                        loss_sum, count = self._eval_sum(batch)
                        pairs = {"val/loss": (loss_sum.double(), count.double())}
                        for name, targets in (scorer.loss_targets(batch) if scorer else {}).items():
                            part_sum, part_count = self._eval_sum(replace(batch, targets=targets))
                            pairs[name] = (part_sum.double(), part_count.double())
                    if batch.source is not None:  # validation by source: batches of one
                        pairs[f"val/loss/{batch.source}"] = pairs["val/loss"]
                    for name, pair in pairs.items():
                        # Every rank reads the same sources in the same order, so the names
                        # (and the sums reduced below) line up across ranks.
                        if name not in names:
                            names.append(name)
                            sums.append(torch.zeros(2, dtype=torch.float64, device=self.device))
                        sums[names.index(name)] += torch.stack(pair)
        finally:
            for part in self.parts:
                part.train()
        total = self.dp_sum(torch.stack(sums)).tolist()  # (metrics, 2)
        out = {name: num / max(den, 1.0) for name, (num, den) in zip(names, total)}
        out["val/ppl"] = math.exp(min(out["val/loss"], 50.0))
        for name in [n for n in names if n.startswith("val/loss/")]:
            out[f"val/ppl/{name.removeprefix('val/loss/')}"] = math.exp(min(out[name], 50.0))
        return out

    # -- state
    def state_dict(self) -> dict[str, Any]:
        return ModelOptimState(self.model, self.optimizer).state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ModelOptimState(self.model, self.optimizer).load_state_dict(state)

    def write_checkpoint(self, path: Path, *, background: bool = False) -> Future | None:
        """Write model and optimizer into checkpoint directory `path` (collective). With
        `background`, stage to host memory and write in a thread; returns its future."""
        return ModelOptimState(self.model, self.optimizer).write_checkpoint(
            path, background=background)

    def read_checkpoint(self, path: Path) -> None:
        self._check_kind(path)
        ModelOptimState(self.model, self.optimizer).read_checkpoint(path)

    deepspeed = False
    """Whether this module's checkpoints are the DeepSpeed engine's files."""

    def _check_kind(self, path: Path) -> None:
        """Refuse a checkpoint written by the other backend (their formats differ)."""
        if ds.is_deepspeed_checkpoint(path) != self.deepspeed:
            writer, other = ("native", "deepspeed") if self.deepspeed else ("deepspeed", "native")
            raise CheckpointError(
                f"checkpoint {path} was written by parallel.backend={writer}; resume it with "
                f"parallel.backend={writer}, not {other}, or start without it (resume=none)")

    @property
    def generation_model(self) -> nn.Module | None:
        """The plain model for sampling, on a one-process layout; else None."""
        return None


def model_loss(model: Any, batch: Batch, *, chunked: bool) -> Tensor:
    """The mean loss of `model` (any family, or an engine wrapping it) on `batch`: computed by
    the model from the targets (chunked: the full logits never exist; an encoder applies its
    head to the predicted positions only), or from the full logits."""
    kwargs = batch.model_kwargs()
    if chunked:
        return model(batch.inputs, targets=batch.targets, **kwargs)
    return cross_entropy(model(batch.inputs, **kwargs), batch.targets)


def _mean_times_count(mean: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    count = (targets != IGNORE_INDEX).sum()
    # A batch of padding rows only has a NaN mean (0/0): it adds nothing.
    return torch.where(count > 0, mean.float() * count, torch.zeros_like(mean.float())), count


class NativeTrainModule(TrainModule):
    """One process, DDP, FSDP2, HSDP and tensor parallel, applied by `parallelize`."""

    def _build(self) -> None:
        model = build_model(self.model_cfg, device="meta")
        self._build_parts([(0, model)], self.mesh)
        self.model = model

    def _loss(self, batch: Batch) -> Tensor:
        with self.autocast():
            return model_loss(self.model, batch, chunked=self.settings.chunked_loss)

    def _micro_batch(self, batch: Batch) -> Tensor:
        loss = self._loss(batch)
        scaled = loss / self.grad_accum
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss.detach()

    @torch.no_grad()
    def _eval_sum(self, batch: Batch) -> tuple[Tensor, Tensor]:
        return _mean_times_count(self._loss(batch), batch.targets)

    def _logits(self, batch: Batch) -> Tensor | None:
        with self.autocast():
            return self.model(batch.inputs, **batch.model_kwargs())

    @property
    def generation_model(self) -> nn.Module | None:
        return self.model if self.dims.world_size == 1 else None


class PipelineTrainModule(TrainModule):
    """Pipeline stages (each parallelized like a whole model) driven by a schedule."""

    def _build(self) -> None:
        p = self.parallel
        model = build_model(self.model_cfg, device="meta")
        stages = pipeline_split(model, pp_rank=self.mesh["pp"].get_local_rank(), pp=self.dims.pp,
                                virtual_stages=p.pp_virtual_stages, schedule=p.pp_schedule)
        self._build_parts(stages, self.mesh)
        self.model = local_model(self.parts)
        self.pipe = build_pipeline(
            stages, pp_mesh=self.mesh["pp"], device=self.device, schedule=p.pp_schedule,
            n_microbatches=p.pp_microbatches or p.pp * p.pp_virtual_stages,
            loss_fn=cross_entropy, grad_accum=self.grad_accum)

    def _after_optimizer(self) -> None:
        pass  # validation refuses fp16 with pipelining (the schedules run backward themselves)

    def _micro_batch(self, batch: Batch) -> Tensor:
        inputs, targets = batch
        with self.autocast():  # the schedule splits the batch further and runs backward
            return pipeline_step(self.pipe, inputs, targets)

    def _eval_sum(self, batch: Batch) -> tuple[Tensor, Tensor]:
        inputs, targets = batch
        # evaluate() runs under no_grad, but a V schedule evaluates by a full step with
        # backward; pipeline_eval_sum turns no_grad on itself for the other schedules.
        with self.autocast(), torch.enable_grad():
            loss_sum = pipeline_eval_sum(self.pipe, inputs, targets)
        return loss_sum, (targets != IGNORE_INDEX).sum()


class DeepSpeedTrainModule(TrainModule):
    """The same model and AdamW under a DeepSpeed engine, which handles precision, gradient
    accumulation, ZeRO partitioning, clipping and the optimizer step itself."""

    deepspeed = True

    def _build(self) -> None:
        # DeepSpeed shards inside its engine: without a mesh, parallelize only checkpoints and
        # compiles the blocks.
        model = build_model(self.model_cfg, device="meta")
        self._build_parts([(0, model)], None)
        self.model = model

    def _after_optimizer(self) -> None:
        s, p = self.settings, self.parallel
        config = ds.deepspeed_config(zero_stage=p.zero_stage, precision=s.precision,
                                     global_batch_size=s.global_batch_size,
                                     micro_batch_size=s.micro_batch_size,
                                     world_size=self.dims.world_size,
                                     grad_clip=self.optim_cfg.grad_clip,
                                     extra=p.deepspeed_extra)
        self.engine = ds.initialize(self.model, self.optimizer, config)

    @property
    def skips_on_device(self) -> bool:
        return False

    def _micro_batch(self, batch: Batch) -> Tensor:
        return ds.micro_step(self.engine, lambda engine: model_loss(engine, batch, chunked=False))

    def optimizer_step(self, loss: Tensor, *, skip: bool = False) -> StepStats:
        """The engine clipped and stepped after the last micro-batch (its fp16 loss scaler skips
        overflowing steps itself): a non-finite step is counted or halts, not undone."""
        grad_norm = torch.tensor(ds.grad_norm(self.engine), device=self.device)
        finite = self.all_ranks_finite(loss, grad_norm)
        self.scheduler.step()
        return StepStats(loss, grad_norm, finite)

    @torch.no_grad()
    def _eval_sum(self, batch: Batch) -> tuple[Tensor, Tensor]:
        return _mean_times_count(model_loss(self.engine, batch, chunked=False), batch.targets)

    def _logits(self, batch: Batch) -> Tensor | None:
        return self.engine(batch.inputs, **batch.model_kwargs())

    def evaluate(self, batches: Iterable[Batch], scorer: Scorer | None = None) -> dict[str, float]:
        self.engine.eval()
        try:
            return super().evaluate(batches, scorer)
        finally:
            self.engine.train()

    def write_checkpoint(self, path: Path, *, background: bool = False) -> Future | None:
        ds.save_engine(self.engine, path)  # collective; DeepSpeed writes synchronously
        return None

    def read_checkpoint(self, path: Path) -> None:
        self._check_kind(path)
        ds.load_engine(self.engine, path)

    def full_state_dict(self) -> dict[str, Tensor]:
        return ds.full_state_dict(self.engine)


def build_train_module(*, model: ModelConfig, optim: OptimConfig, parallel: ParallelConfig,
                       settings: StepSettings, dims: ParallelDims, mesh: DeviceMesh | None,
                       device: torch.device, total_steps: int) -> TrainModule:
    """The train module of the layout: DeepSpeed, pipeline, or native."""
    if parallel.backend == "deepspeed":
        cls: type[TrainModule] = DeepSpeedTrainModule
    elif dims.pp_enabled:
        cls = PipelineTrainModule
    else:
        cls = NativeTrainModule
    return cls(model=model, optim=optim, parallel=parallel, settings=settings, dims=dims,
               mesh=mesh, device=device, total_steps=total_steps)
