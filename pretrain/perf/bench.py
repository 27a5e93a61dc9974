"""The training-step benchmark behind `pretrain-bench`.

Each row trains one configuration for a few steps on synthetic tokens: the same shapes, weights
(one seed), batches, precision and AdamW settings in every row. Rows are cumulative: `plain` is
our model with every optimization off, and each following row adds one (its `parent` is the row
it extends), so the table shows what each buys; `hf` is transformers' model of the same family
and shapes, trained with a plain loop. Every row of ours steps the trainer's own train module
(`pretrain.train.module`): the figures are those of the code users train with.

The model's family (`arch`) sets the batch and the transformers baseline:
- decoder: next-token windows; `LlamaForCausalLM` holding our weights, our loss on its logits.
- encoder: masked-LM batches (random tokens, `MLM_RATE` of each row's positions predicted, the
  rest IGNORE_INDEX); `BertForMaskedLM` with its own random init and its own loss (labels).
  'chunked' rows apply the head to the predicted positions only.
- encoder_decoder: encoder inputs (B, seq_len), decoder inputs and targets (B, decoder_len),
  by default the lengths T5 span corruption gives (`span_target_length`: 114 for 512);
  `T5ForConditionalGeneration` with its own init and loss. Tokens count both inputs.

How a row is measured
- Time: `warmup` steps (compilation included) are excluded, then `steps` timed steps; the
  median is reported. A step is: take a batch (data), forward + loss + backward, clip + AdamW +
  zero_grad (optimizer). On CUDA the parts come from events read after the step, so measuring
  adds no host sync inside it. On CPU the rows are interleaved (one step of each row per round)
  so that load from other processes hits every row alike.
- MFU: tokens/s x `flops_per_token` (6 N_matmul + 12 L d T, see `pretrain.models.build`, per
  counted token: an encoder-decoder's FLOPs over its encoder + decoder tokens) over the
  device's bf16 peak: the data-sheet figure on GPU, the measured bf16 matmul rate on CPU (the
  best of samples taken before the rows, after every round of steps and at the end).
- Peak memory of a step: on CUDA `max_memory_allocated`. On CPU the allocations the step makes
  are recorded by the profiler (`profile_memory`): every tensor allocation and free through
  PyTorch's CPU allocator, compiled kernels' buffers included. Their running sum, at its
  highest, plus the bytes resident before the step (parameters, buffers, optimizer state) is
  the step's peak: the CPU analogue of `max_memory_allocated`. It is taken from one extra,
  untimed step.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from pretrain.config import ModelConfig, OptimConfig, ParallelConfig
from pretrain.data.loader import Batch
from pretrain.models import build
from pretrain.models.llama import SDPA_KERNELS, attention_backends
from pretrain.models.loss import IGNORE_INDEX, cross_entropy
from pretrain.parallel.dims import ParallelDims
from pretrain.parallel.parallelize import init_model_weights
from pretrain.train.host import tune_cpu_allocator
from pretrain.train.metrics import GPU_BF16_PEAK, gpu_peak_flops, measure_cpu_bf16_flops
from pretrain.train.module import (
    StepSettings,
    TrainModule,
    autocast_factory,
    build_train_module,
)
from pretrain.validate import validate_model

__all__ = [
    "DEFAULT_ROWS",
    "ROWS",
    "BenchSettings",
    "RowResult",
    "RowSpec",
    "default_rows",
    "format_table",
    "run_bench",
    "span_target_length",
]

_MIB = 2**20


@dataclass(frozen=True)
class RowSpec:
    """What one benchmark row trains."""

    impl: str
    """'ours' (pretrain's model of the family), 'hf' (transformers' model of the family), or
    'kernels' (`_KernelFloor`, decoder only: the step's matmuls and attention kernels alone)."""
    optimizer: str
    """AdamW implementation: 'for-loop', 'foreach' or 'fused'."""
    loss: str = "plain"
    """'plain' (full logits, fp32 cross-entropy) or 'chunked' (`linear_cross_entropy`)."""
    compile: bool = False
    """torch.compile every block (through `parallelize`)."""
    ac: str = "none"
    """Activation checkpointing: 'none', 'selective' or 'full'."""
    parent: str | None = None
    """The row this one adds one option to (for the 'vs parent' column)."""
    what: str = ""
    """One line for the table."""


ROWS: dict[str, RowSpec] = {
    "kernels": RowSpec("kernels", "none", what="only the step's GEMMs and attention (a floor)"),
    "hf": RowSpec("hf", "fused", what="transformers LlamaForCausalLM, plain loop, fused AdamW"),
    "plain": RowSpec("ours", "for-loop", what="ours, every optimization off"),
    "+foreach-adamw": RowSpec("ours", "foreach", parent="plain", what="+ foreach AdamW"),
    "+fused-adamw": RowSpec("ours", "fused", parent="plain", what="+ fused AdamW"),
    "+chunked-ce": RowSpec("ours", "fused", "chunked", parent="+fused-adamw",
                           what="+ chunked cross-entropy (no full logits): best eager"),
    "+compile": RowSpec("ours", "fused", "chunked", True, parent="+chunked-ce",
                        what="+ torch.compile of blocks and loss chunks: all on"),
    "+compile+ac-selective": RowSpec("ours", "fused", "chunked", True, "selective",
                                     parent="+compile", what="+ selective checkpointing"),
    "+compile+ac-full": RowSpec("ours", "fused", "chunked", True, "full", parent="+compile",
                                what="+ full checkpointing"),
}
DEFAULT_ROWS = ("kernels", "hf", "plain", "+fused-adamw", "+chunked-ce", "+compile",
                "+compile+ac-selective", "+compile+ac-full")
"""The decoder's default rows."""
FAMILY_ROWS = {"encoder": ("hf", "plain", "+fused-adamw", "+chunked-ce", "+compile"),
               "encoder_decoder": ("hf", "plain", "+fused-adamw", "+chunked-ce", "+compile")}
"""The other families' default rows (no kernel floor: it models a decoder's step)."""

# What a row does where the family changes it (else `RowSpec.what`).
_FAMILY_WHAT = {
    ("hf", "encoder"): "transformers BertForMaskedLM, its loss (labels), fused AdamW",
    ("+chunked-ce", "encoder"): "+ MLM head on the predicted positions only: best eager",
    ("hf", "encoder_decoder"): "transformers T5ForConditionalGeneration, its loss, fused AdamW",
}

MLM_RATE = 0.15
"""Encoder batches: the fraction of each row's positions that have a target (BERT's)."""


def default_rows(arch: str) -> tuple[str, ...]:
    """The rows a run of a model of family `arch` measures unless told."""
    return FAMILY_ROWS.get(arch, DEFAULT_ROWS)


def span_target_length(inputs_length: int, noise_density: float = 0.15,
                       mean_span_length: float = 3.0) -> int:
    """Decoder length of T5 span corruption for encoder inputs of `inputs_length` (T5's
    random_spans_helper, one EOS each): 114 for 512 (568 raw tokens)."""

    def lengths(raw: int) -> tuple[int, int]:
        noise = round(raw * noise_density)
        spans = round(noise / mean_span_length)
        return raw - noise + spans + 1, noise + spans + 1

    raw = inputs_length - 1
    while lengths(raw + 1)[0] <= inputs_length:
        raw += 1
    return lengths(raw)[1]



@dataclass
class BenchSettings:
    """One benchmark run: a model shape, a batch, a precision, the rows to compare."""

    model: ModelConfig
    seq_len: int = 512
    """Tokens per sequence (an encoder-decoder's encoder inputs)."""
    batch_size: int = 8
    precision: str = "bf16"
    """'bf16' (autocast, fp32 master weights) or 'fp32'."""
    rows: tuple[str, ...] | None = None
    """None: the family's defaults (`default_rows`)."""
    decoder_len: int | None = None
    """encoder_decoder: decoder tokens per sequence; None: `span_target_length(seq_len)`."""
    warmup: int = 2
    """Untimed steps first (they include compilation)."""
    steps: int = 5
    """Timed steps per row; the median is reported."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu' or 'cuda'."""
    sdpa: str = "auto"
    """Attention kernel: 'auto' (PyTorch picks) or one of flash, efficient, cudnn, math."""
    memory: bool = True
    """Measure each row's peak memory (one extra, untimed step)."""
    interleave: bool | None = None
    """Alternate rows step by step; None: on CPU only (a GPU then holds one row at a time)."""
    seed: int = 0
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(schedule="constant", warmup_steps=0))
    """AdamW settings; a constant learning rate, as the transformers row has."""


@dataclass
class RowResult:
    """The measurements of one row; times in seconds, memory in MiB."""

    row: str
    what: str
    spec: dict[str, Any]
    step_s: float
    """Median step time (what tokens/s and MFU use)."""
    best_step_s: float
    """Fastest step: on a shared machine, the closest to the step's own cost."""
    data_s: float
    fwd_bwd_s: float
    optim_s: float
    tokens_per_s: float
    mfu: float
    warmup_s: float
    final_loss: float
    peak_mem_mib: float | None = None
    static_mem_mib: float | None = None
    step_times: list[float] = field(default_factory=list)


# -------------------------------------------------------------------------------- settings


def check_settings(s: BenchSettings) -> None:
    """Fail before any work with a message naming the bad setting."""
    validate_model(s.model)
    rows = rows_of(s)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if s.model.arch != "decoder" and "kernels" in rows:
        raise ValueError(f"the kernels row models a decoder's step; model={s.model.name} is an "
                         f"{s.model.arch} (rows for it: {', '.join(default_rows(s.model.arch))})")
    if s.decoder_len is not None and (s.model.arch != "encoder_decoder" or s.decoder_len < 1):
        raise ValueError("decoder_len is for an encoder_decoder model and must be >= 1")
    if s.precision not in ("bf16", "fp32"):
        raise ValueError(f"precision={s.precision!r}; the benchmark runs bf16 or fp32")
    if s.sdpa != "auto" and s.sdpa not in SDPA_KERNELS:
        raise ValueError(f"sdpa={s.sdpa!r}; use auto or one of {', '.join(SDPA_KERNELS)}")
    if min(s.seq_len, s.batch_size, s.steps) < 1 or s.warmup < 0:
        raise ValueError("seq_len, batch_size and steps must be >= 1, warmup >= 0")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is visible; use --device cpu")
    return torch.device(name)


def rows_of(s: BenchSettings) -> tuple[str, ...]:
    return default_rows(s.model.arch) if s.rows is None else s.rows


def model_for(s: BenchSettings) -> ModelConfig:
    """The preset, with the rotary (or learned position) table stretched when seq_len exceeds
    its max_seq_len."""
    return replace(s.model, max_seq_len=max(s.model.max_seq_len, s.seq_len))


def decoder_len(s: BenchSettings) -> int | None:
    """Decoder tokens per sequence of an encoder-decoder, None for the other families."""
    if s.model.arch != "encoder_decoder":
        return None
    return s.decoder_len or span_target_length(s.seq_len)


def step_tokens(s: BenchSettings) -> int:
    """Tokens of one step: the inputs, plus an encoder-decoder's decoder inputs."""
    return s.batch_size * (s.seq_len + (decoder_len(s) or 0))


def flops_per_token(s: BenchSettings) -> float:
    """Training FLOPs per counted token (`step_tokens`)."""
    cfg, dec = model_for(s), decoder_len(s)
    if dec is None:
        return build.flops_per_token(cfg, s.seq_len)
    per_input = build.flops_per_token(cfg, s.seq_len, decoder_len=dec)
    return per_input * s.seq_len / (s.seq_len + dec)


def peak_flops(device: torch.device) -> tuple[float, str]:
    """(bf16 FLOP/s, its source) for MFU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name)
        if peak is None:
            return GPU_BF16_PEAK["H100"], f"{name}: not in the table, H100 peak assumed"
        return peak, f"{name} data sheet"
    return measure_cpu_bf16_flops(), "measured CPU bf16 matmul rate"


# ----------------------------------------------------------------------------- the models


def build_module(spec: RowSpec, s: BenchSettings, device: torch.device) -> TrainModule:
    """The trainer's own step for a row: the one-process train module with the row's options
    (built on meta, parallelized, materialized and initialized as in training)."""
    settings = StepSettings(global_batch_size=s.batch_size, micro_batch_size=s.batch_size,
                            precision=s.precision, activation_checkpointing=spec.ac,
                            compile=spec.compile, chunked_loss=spec.loss == "chunked",
                            sdpa_backends=() if s.sdpa == "auto" else (s.sdpa,), seed=s.seed)
    optim = replace(s.optim, implementation=spec.optimizer)
    return build_train_module(model=model_for(s), optim=optim, parallel=ParallelConfig(),
                              settings=settings, dims=ParallelDims(1, 1, 1, 1, 1), mesh=None,
                              device=device, total_steps=10**9)


def build_hf(cfg: ModelConfig, device: torch.device, seed: int) -> nn.Module:
    """transformers' model of the family (`pretrain.interop.hf.hf_class`): a decoder's
    LlamaForCausalLM holds the very weights our rows start from; the encoder's (BERT or
    ModernBERT) and the encoder-decoder's (T5) classes are built from the exported config of
    the same model, without dropout, with their own random init (speed does not depend on
    values). ModernBERT runs its own sparse prediction (the head on the targets only), as ours."""
    import transformers

    from pretrain.interop.hf import hf_class, to_hf_config, to_hf_state_dict

    config = to_hf_config(cfg)
    if cfg.arch in ("encoder", "encoder_decoder"):
        for name in _HF_DROPOUTS:
            if hasattr(config, name):
                setattr(config, name, 0.0)
        if hasattr(config, "sparse_prediction"):
            config.sparse_prediction = True
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            return getattr(transformers, hf_class(cfg))(config)
    reference = build.build_model(cfg, device="meta")
    init_model_weights(reference, cfg, seed, torch.device("cpu"))  # as the train module does
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(to_hf_state_dict(reference.state_dict(), cfg))
    return model


_HF_DROPOUTS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout_rate",
                "attention_dropout", "embedding_dropout", "mlp_dropout", "classifier_dropout")


def hf_mismatch(cfg: ModelConfig) -> str | None:
    """Why transformers has no class of `cfg`'s block options (the export's refusal), or
    None. A decoder: `to_hf_config` says what it cannot convert."""
    if cfg.arch == "decoder":
        return None
    from pretrain.interop.hf import check_exportable

    try:
        check_exportable(cfg)
    except ValueError as e:
        return str(e)
    return None


# Parameter names of HF's token embeddings (Llama, BERT, T5): not decayed, as ours are not.
_HF_EMBEDDINGS = ("embed_tokens", "word_embeddings", "shared")


def build_hf_adamw(model: nn.Module, spec: RowSpec, optim: OptimConfig) -> torch.optim.Optimizer:
    """Our AdamW settings and groups (matrices decayed, embeddings and norms not), keyed by
    HF's parameter names."""
    named = list(model.named_parameters())

    def embedding(name: str) -> bool:
        return any(e in name for e in _HF_EMBEDDINGS)

    decay = [p for n, p in named if p.ndim >= 2 and not embedding(n)]
    no_decay = [p for n, p in named if p.ndim < 2 or embedding(n)]
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2),
                             eps=optim.eps, fused=spec.optimizer == "fused",
                             foreach=spec.optimizer == "foreach")


# ------------------------------------------------------------------------------ measuring


def synthetic_batch(cfg: ModelConfig, s: BenchSettings, g: torch.Generator) -> Batch:
    """One random batch of the family's shape (on the CPU).

    decoder: a window of seq_len + 1 tokens cut like the loader's (inputs, shifted targets).
    encoder: random tokens with round(MLM_RATE * seq_len) positions per row predicted (their
    input replaced by the last id, standing for <mask>), the rest IGNORE_INDEX.
    encoder_decoder: random encoder inputs; random targets of `decoder_len` tokens and the
    decoder inputs T5 feeds (the targets shifted right, id 0 first)."""
    B, S, V = s.batch_size, s.seq_len, cfg.vocab_size
    if cfg.arch == "encoder":
        tokens = torch.randint(0, V, (B, S), generator=g)
        n = max(1, round(MLM_RATE * S))
        picked = torch.rand(B, S, generator=g).argsort(dim=1)[:, :n]
        chosen = torch.zeros(B, S, dtype=torch.bool).scatter_(1, picked, True)
        return Batch(tokens.masked_fill(chosen, V - 1),
                     tokens.masked_fill(~chosen, IGNORE_INDEX))
    if cfg.arch == "encoder_decoder":
        targets = torch.randint(0, V, (B, decoder_len(s)), generator=g)
        decoder_inputs = torch.cat([torch.zeros(B, 1, dtype=targets.dtype), targets[:, :-1]], 1)
        return Batch(torch.randint(0, V, (B, S), generator=g), targets,
                     decoder_inputs=decoder_inputs)
    window = torch.randint(0, V, (B, S + 1), generator=g)
    return Batch(window[:, :-1], window[:, 1:])


def synthetic_batches(cfg: ModelConfig, s: BenchSettings, device: torch.device,
                      pool: int = 4) -> Iterator[Batch]:
    """Batches from a small fixed pool (`synthetic_batch`; pinned on a GPU host) so every row
    sees the same batches."""
    g = torch.Generator().manual_seed(s.seed)
    batches = [synthetic_batch(cfg, s, g) for _ in range(pool)]
    if device.type == "cuda":
        batches = [b.pin_memory() for b in batches]
    i = 0
    while True:
        yield batches[i % pool].to(device, non_blocking=True)
        i += 1


class _Clock:
    """Timestamps inside a step: host time on CPU, CUDA events on GPU (read once the step is
    done, so they add no sync inside it)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        marks, self.marks = self.marks, []
        if self.cuda:
            return [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
        return [b - a for a, b in zip(marks, marks[1:])]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of distinct storages held between steps: weights, buffers, grads, AdamW state."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [t for state in optimizer.state.values() for t in state.values()
                if isinstance(t, Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def cpu_allocation_high_water(fn: Callable[[], Any]) -> int:
    """Highest running sum of the CPU allocator's allocations minus frees while `fn` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The raw profiler events keep each allocation's signed size and time; the aggregated
    # tables do not keep the order needed for a running sum.
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    running = high = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        high = max(high, running)
    return high


class _Row:
    """What every row shares: its name and spec, the timing of its steps, its result. A
    subclass provides `step()` (returning the loss, left on the device) and `peak_memory()`."""

    def __init__(self, name: str, s: BenchSettings, device: torch.device) -> None:
        self.name, self.spec, self.device = name, ROWS[name], device
        self.arch = s.model.arch
        self.tokens = step_tokens(s)
        # The kernel choice applies to our attention; HF's may pass masks flash cannot take.
        self.sdpa = s.sdpa if self.spec.impl != "hf" else "auto"
        self.clock = _Clock(device)
        self.times: list[list[float]] = []
        self.warmup_s = 0.0
        self.last_loss = torch.zeros(())

    def step(self) -> Tensor:
        raise NotImplementedError

    def peak_memory(self) -> tuple[float | None, float | None]:
        raise NotImplementedError

    def attention(self) -> AbstractContextManager:
        return attention_backends([] if self.sdpa == "auto" else [self.sdpa], self.device.type)

    def warm_up(self, steps: int) -> None:
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        _sync(self.device)
        self.clock.intervals()
        self.warmup_s = time.perf_counter() - start

    def timed_step(self) -> None:
        _sync(self.device)
        start = time.perf_counter()
        self.last_loss = self.step()
        _sync(self.device)
        total = time.perf_counter() - start
        self.times.append([total, *self.clock.intervals()])

    def result(self, memory: bool) -> RowResult:
        """The row's figures; `mfu` is left for `run_bench`, which knows the final peak."""
        total, data, fwd_bwd, optim = (statistics.median(col) for col in zip(*self.times))
        static, peak = self.peak_memory() if memory else (None, None)
        self.clock.intervals()
        what = _FAMILY_WHAT.get((self.name, self.arch), self.spec.what)
        return RowResult(
            row=self.name, what=what, spec=asdict(self.spec), step_s=total,
            best_step_s=min(t[0] for t in self.times),
            data_s=data, fwd_bwd_s=fwd_bwd, optim_s=optim, tokens_per_s=self.tokens / total,
            mfu=0.0, warmup_s=self.warmup_s,
            final_loss=float(self.last_loss),
            peak_mem_mib=None if peak is None else peak / _MIB,
            static_mem_mib=None if static is None else static / _MIB,
            step_times=[t[0] for t in self.times],
        )


class _Trainee(_Row):
    """A row of ours: the trainer's train module, stepped exactly as the trainer steps it
    (`forward_backward` on the step's batch, then `optimizer_step`)."""

    def __init__(self, name: str, s: BenchSettings, device: torch.device) -> None:
        super().__init__(name, s, device)
        self.module = build_module(self.spec, s, device)
        self.batches = synthetic_batches(model_for(s), s, device)

    def step(self) -> Tensor:
        """One training step; the loss stays on the device (no sync to read it)."""
        self.clock.mark()
        batch = next(self.batches)
        self.clock.mark()
        loss = self.module.dp_mean(self.module.forward_backward([batch]))
        self.clock.mark()
        self.module.optimizer_step(loss)
        self.clock.mark()
        return loss

    def peak_memory(self) -> tuple[float, float]:
        return _peak_memory(self, self.module.model, self.module.optimizer)


class _HFTrainee(_Row):
    """transformers' model of the family and shapes (`build_hf`), with a plain loop: a
    decoder's logits through our loss, BERT and T5 with their own loss from `labels`."""

    def __init__(self, name: str, s: BenchSettings, device: torch.device) -> None:
        super().__init__(name, s, device)
        cfg = model_for(s)
        self.model = build_hf(cfg, device, s.seed)
        self.model.train()
        self.optimizer = build_hf_adamw(self.model, self.spec, s.optim)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.max_norm = s.optim.grad_clip if s.optim.grad_clip > 0 else float("inf")
        self.batches = synthetic_batches(cfg, s, device)
        self.autocast = autocast_factory(s.precision, device)

    def loss(self, batch: Batch) -> Tensor:
        if self.arch == "encoder":
            return self.model(input_ids=batch.inputs, labels=batch.targets).loss
        if self.arch == "encoder_decoder":
            return self.model(input_ids=batch.inputs, decoder_input_ids=batch.decoder_inputs,
                              labels=batch.targets, use_cache=False).loss
        logits = self.model(input_ids=batch.inputs, use_cache=False).logits
        return cross_entropy(logits, batch.targets)

    def step(self) -> Tensor:
        self.clock.mark()
        batch = next(self.batches)
        self.clock.mark()
        with self.attention():
            with self.autocast():
                loss = self.loss(batch)
            loss.backward()
        self.clock.mark()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.clock.mark()
        return loss.detach()

    def peak_memory(self) -> tuple[float, float]:
        return _peak_memory(self, self.model, self.optimizer)


def _peak_memory(row: _Row, model: nn.Module,
                 optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """(bytes resident before a step, peak bytes during it), from one more step."""
    if row.device.type == "cuda":
        _sync(row.device)
        torch.cuda.reset_peak_memory_stats(row.device)
        static = torch.cuda.memory_allocated(row.device)
        row.step()
        _sync(row.device)
        return static, torch.cuda.max_memory_allocated(row.device)
    static = _resident_bytes(model, optimizer)
    return static, static + cpu_allocation_high_water(row.step)


class _KernelFloor(_Row):
    """A step that runs only the kernels a LLaMA step cannot avoid, on the step's shapes in the
    compute dtype: per block, each projection's forward GEMM and its two backward GEMMs
    (input and weight gradients) and causal SDPA forward + backward; then the output
    projection's three GEMMs. No norms, RoPE, activations, loss, residuals, casts or optimizer.
    Its time bounds from below the step of any implementation built on these kernels (ours,
    transformers'), which makes it the ceiling of "ours / transformers" on this machine."""

    def __init__(self, name: str, s: BenchSettings, device: torch.device) -> None:
        super().__init__(name, s, device)
        cfg = model_for(s)
        dtype = torch.float32 if s.precision == "fp32" else torch.bfloat16
        model = build.build_model(cfg, device="meta")
        block = model.layers["0"]
        shapes = [tuple(m.weight.shape) for m in block.modules() if isinstance(m, nn.Linear)]
        g = torch.Generator(device=device).manual_seed(s.seed)

        def randn(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=g, device=device, dtype=dtype)

        # (input, weight, output gradient) of each projection: (N, in), (out, in), (N, out).
        self.block_gemms = [(randn(self.tokens, i), randn(o, i), randn(self.tokens, o))
                            for o, i in shapes]
        self.output_gemm = (randn(self.tokens, cfg.dim), randn(cfg.vocab_size, cfg.dim),
                            randn(self.tokens, cfg.vocab_size))
        self.n_layers = cfg.n_layers
        hd, kv = cfg.dim // cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
        q_shape = (s.batch_size, cfg.n_heads, s.seq_len, hd)
        kv_shape = (s.batch_size, kv, s.seq_len, hd)
        self.qkv = [randn(*q_shape), randn(*kv_shape), randn(*kv_shape)]
        for t in self.qkv:
            t.requires_grad_(True)
        self.attn_grad = randn(*q_shape)
        self.last_loss = torch.full((), math.nan)  # nothing is trained

    def step(self) -> Tensor:
        self.clock.mark()
        self.clock.mark()  # no data
        with self.attention():
            for _ in range(self.n_layers):
                for x, w, g in self.block_gemms:
                    x @ w.t(), g @ w, g.t() @ x
                for t in self.qkv:
                    t.grad = None
                q, k, v = self.qkv
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                     enable_gqa=q.shape[1] != k.shape[1])
                out.backward(self.attn_grad)
            x, w, g = self.output_gemm
            x @ w.t(), g @ w, g.t() @ x
        self.clock.mark()
        self.clock.mark()  # no optimizer
        return self.last_loss

    def peak_memory(self) -> tuple[None, None]:
        return None, None  # not a training step: its memory means nothing


def _trainee(name: str, s: BenchSettings, device: torch.device) -> _Row:
    cls = {"kernels": _KernelFloor, "hf": _HFTrainee, "ours": _Trainee}[ROWS[name].impl]
    return cls(name, s, device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _hf_missing() -> str | None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "transformers is not installed"
    return None


def _run_rows(names: list[str], s: BenchSettings, device: torch.device,
              sample_peak: Callable[[], Any], interleave: bool,
              on_row: Callable[[list[RowResult]], None]) -> list[RowResult]:
    """Measure the rows: all alive and stepped in turns, or one after another (then `on_row`
    sees the results so far after each); the peak rate is sampled after every round (or row)."""
    if interleave:
        trainees = [_trainee(n, s, device) for n in names]
        for t in trainees:
            t.warm_up(s.warmup)
        for _ in range(s.steps):
            for t in trainees:
                t.timed_step()
            sample_peak()
        return [t.result(s.memory) for t in trainees]
    results = []
    for n in names:
        t = _trainee(n, s, device)
        t.warm_up(s.warmup)
        for _ in range(s.steps):
            t.timed_step()
        sample_peak()
        results.append(t.result(s.memory))
        on_row(results)
        del t
        _release(device)
    return results


def run_bench(s: BenchSettings,
              on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the rows of `s`; returns the report (settings, machine, rows) as a JSON-ready dict.
    `on_update` receives the partial report after each row when rows run one after another
    (a long GPU run that is cut short keeps what it measured)."""
    check_settings(s)
    device = resolve_device(s.device)
    if device.type == "cpu":  # as the trainer does: every row, transformers' too, gains
        tune_cpu_allocator()
    cfg = model_for(s)
    interleave = device.type == "cpu" if s.interleave is None else s.interleave
    rows = rows_of(s)
    reason = (_hf_missing() or hf_mismatch(cfg)) if "hf" in rows else None
    skipped = {"hf": reason} if reason else {}
    names = [r for r in rows if r not in skipped]
    fpt = flops_per_token(s)
    load_before = os.getloadavg()
    first_peak, source = peak_flops(device)
    peaks = [first_peak]

    def sample_peak() -> None:
        # On CPU the rate is measured again: other processes slow some samples down, the
        # fastest is the machine's.
        if device.type == "cpu":
            peaks.append(peak_flops(device)[0])

    def report(rows: list[RowResult]) -> dict[str, Any]:
        for r in rows:
            r.mfu = r.tokens_per_s * fpt / max(peaks)
        return {
            "model": cfg.name, "arch": cfg.arch, "params": build.count_params(cfg),
            "flops_per_token": fpt, "seq_len": s.seq_len, "decoder_len": decoder_len(s),
            "predicted": (max(1, round(MLM_RATE * s.seq_len)) if cfg.arch == "encoder"
                          else None),
            "batch_size": s.batch_size, "precision": s.precision, "sdpa": s.sdpa,
            "device": _device_name(device), "peak_flops": max(peaks), "peak_source": source,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "warmup": s.warmup, "steps": s.steps, "interleaved": interleave,
            "memory_method": _MEMORY_METHOD[device.type] if s.memory else None,
            "load_before": list(load_before), "load_after": list(os.getloadavg()),
            "skipped": skipped, "rows": [asdict(r) for r in rows],
        }

    def row_done(so_far: list[RowResult]) -> None:
        if on_update is not None:
            on_update(report(so_far))

    torch.manual_seed(s.seed)
    return report(_run_rows(names, s, device, sample_peak, interleave, row_done))


_MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated over one step",
    "cpu": "resident weights+grads+optimizer state + high-water of the CPU allocator's "
           "allocations during one step (torch profiler, profile_memory)",
}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------------- output


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def _row_cells(row: dict[str, Any], by_name: dict[str, dict[str, Any]]) -> list[str]:
    hf = by_name.get("hf")
    parent = by_name.get(row["spec"]["parent"] or "")
    mem = row["peak_mem_mib"]
    return [
        row["row"],
        f"{row['tokens_per_s']:,.0f}",
        f"{100 * row['mfu']:.1f}%",
        f"{row['step_s']:.3f}",
        f"{row['best_step_s']:.3f}",
        f"{1e3 * row['data_s']:.1f}",
        f"{row['fwd_bwd_s']:.3f}",
        f"{row['optim_s']:.3f}",
        "-" if mem is None else f"{mem:,.0f}",
        _ratio(row["tokens_per_s"], hf and hf["tokens_per_s"]),
        _ratio(row["tokens_per_s"], parent and parent["tokens_per_s"]),
        _ratio(mem, parent and parent["peak_mem_mib"]),
        f"{row['final_loss']:.4f}",
    ]


_HEADER = ["row", "tok/s", "MFU", "step s", "best s", "data ms", "fwd+bwd s", "optim s", "peak MiB",
           "vs hf", "speed vs parent", "mem vs parent", "loss"]


def _tokens_note(report: dict[str, Any]) -> str:
    """What a token is in the tok/s column, for the families where that needs saying."""
    arch = report.get("arch", "decoder")
    if arch == "encoder":
        return (f"\n  encoder (masked LM): tok/s counts input tokens; {report['predicted']} of "
                f"{report['seq_len']} positions per sequence have a target")
    if arch == "encoder_decoder":
        S, T = report["seq_len"], report["decoder_len"]
        return (f"\n  encoder-decoder: tok/s counts encoder + decoder tokens ({S} + {T} per "
                "sequence, T5 span corruption's lengths); FLOPs/token over both")
    return ""


def _describe(report: dict[str, Any]) -> str:
    load = "/".join(f"{x:.2f}" for x in report["load_before"])
    load_after = "/".join(f"{x:.2f}" for x in report["load_after"])
    return (
        f"{report['model']} ({report['params'] / 1e6:.1f}M params) seq {report['seq_len']} "
        f"x batch {report['batch_size']}, {report['precision']}, sdpa {report['sdpa']}, on "
        f"{report['device']}, torch {report['torch']}"
        f"{_tokens_note(report)}\n"
        f"  FLOPs/token {report['flops_per_token'] / 1e6:.1f}M (6*N_matmul + 12*L*d*T); "
        f"peak {report['peak_flops'] / 1e12:.3f} TFLOP/s ({report['peak_source']}); "
        f"median of {report['steps']} steps after {report['warmup']} warm-up"
        f"{', rows interleaved' if report['interleaved'] else ''}\n"
        f"  load average (1/5/15 min) before {load}, after {load_after}"
        + "".join(f"\n  skipped {k}: {v}" for k, v in report["skipped"].items())
    )


def _render(header: list[str], lines: list[list[str]], n_text: int) -> str:
    """Columns padded to their widest cell; the first `n_text` left-aligned, numbers right."""
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(f"{c:<{w}}" if i < n_text else f"{c:>{w}}"
                         for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines)])


def _setting(report: dict[str, Any]) -> str:
    dec = report.get("decoder_len")
    seq = f"{report['seq_len']}+{dec}" if dec else f"{report['seq_len']}"
    return f"{report['model']} T={seq} B={report['batch_size']}"


def format_table(reports: list[dict[str, Any]]) -> str:
    """One table for one or more reports (several: a leading column names the setting)."""
    multi = len(reports) > 1
    header = (["setting"] if multi else []) + _HEADER
    lines = []
    for report in reports:
        by_name = {r["row"]: r for r in report["rows"]}
        for row in report["rows"]:
            lines.append(([_setting(report)] if multi else []) + _row_cells(row, by_name))
    described = "\n".join(_describe(r) for r in reports)
    table = _render(header, lines, 2 if multi else 1)
    return f"{described}\n\n{table}\n{_summary(reports)}"


def _summary(reports: list[dict[str, Any]]) -> str:
    """The comparisons the benchmark exists for, one line each."""
    out = []
    for report in reports:
        by_name = {r["row"]: r for r in report["rows"]}
        best = by_name.get("+compile") or by_name.get("+chunked-ce")
        prefix = f"{_setting(report)}: " if len(reports) > 1 else ""
        if best and "hf" in by_name:
            hf = by_name["hf"]
            out.append(f"{prefix}ours ({best['row']}) / transformers tokens/s = "
                       f"{best['tokens_per_s'] / hf['tokens_per_s']:.2f}x "
                       f"(fastest steps: {hf['best_step_s'] / best['best_step_s']:.2f}x)")
        floor = by_name.get("kernels")
        if floor and "hf" in by_name:
            out.append(f"{prefix}kernels only / transformers tokens/s = "
                       f"{floor['tokens_per_s'] / by_name['hf']['tokens_per_s']:.2f}x: the most "
                       "any implementation of these kernels could gain over transformers here")
        for row in report["rows"]:
            parent = by_name.get(row["spec"]["parent"] or "")
            if row["spec"]["ac"] != "none" and parent and row["peak_mem_mib"] is not None:
                cut = 1 - row["peak_mem_mib"] / parent["peak_mem_mib"]
                cost = row["step_s"] / parent["step_s"] - 1
                best = row["best_step_s"] / parent["best_step_s"] - 1
                out.append(f"{prefix}{row['spec']['ac']} checkpointing: peak memory "
                           f"-{100 * cut:.0f}%, step time {100 * cost:+.0f}% "
                           f"(fastest steps: {100 * best:+.0f}%)")
    return "\n".join(out)
