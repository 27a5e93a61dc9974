"""Every cross-field check of a `TrainConfig`, run before any process group, file or allocation.

The schema (`pretrain/config.py`) is pure data; the checks that need the parallel code (layouts,
pipeline schedules, DeepSpeed's generated config) live here, above it.
"""

from __future__ import annotations

import os

import torch

from pretrain.config import (
    ARCHS,
    OBJECTIVES,
    SDPA_BACKENDS,
    ModelConfig,
    ObjectiveConfig,
    TrainConfig,
    output_whole_on_one_rank,
    uses_chunked_loss,
)
from pretrain.errors import ConfigError
from pretrain.models.lora import LORA_TARGETS
from pretrain.parallel.deepspeed_backend import deepspeed_config
from pretrain.parallel.dims import ParallelDims
from pretrain.parallel.pipeline import check_schedule
from pretrain.quant.training import FP8_RECIPES, QAT_SCHEMES, check_fp8


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


_CHOICES = {"arch": ARCHS, "norm": ("rms", "layer"), "norm_position": ("pre", "post"),
            "mlp": ("swiglu", "geglu", "gated_gelu", "gelu", "relu"),
            "position": ("rope", "learned", "relative")}


def validate_model(m: ModelConfig) -> None:
    """Checks of the model shape alone."""
    for name, allowed in _CHOICES.items():
        _require(getattr(m, name) in allowed,
                 f"model.{name}={getattr(m, name)!r}; use one of {', '.join(allowed)}")
    kv = m.n_kv_heads or m.n_heads
    _require(m.head_dim is not None or m.dim % m.n_heads == 0,
             f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}; "
             "choose n_heads that divides dim (or set model.head_dim)")
    _require(m.n_heads % kv == 0,
             f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={kv}; "
             "choose n_kv_heads that divides n_heads")
    head_dim = m.head_dim or m.dim // m.n_heads
    _require(m.position != "rope" or head_dim % 2 == 0,
             f"head dim {head_dim} (model.dim / model.n_heads) must be even for RoPE")
    _require(m.vocab_size > 0 and m.n_layers > 0, "model.vocab_size and model.n_layers must be > 0")
    _require(m.arch == "encoder_decoder" or m.position != "relative",
             "model.position=relative (T5's relative attention bias) is built for "
             "model.arch=encoder_decoder; use rope or learned positions")
    _require(m.arch != "encoder_decoder" or m.position == "relative",
             f"model.arch=encoder_decoder uses T5's relative attention bias; set "
             f"model.position=relative (got {m.position!r})")
    _require(m.arch != "decoder" or m.position != "learned",
             "model.position=learned is the encoder's (BERT); a decoder uses rope")
    _require(m.arch != "encoder" or m.tie_embeddings,
             "model.arch=encoder ties its masked-LM head to the embeddings; set "
             "model.tie_embeddings=true")
    _require(m.n_decoder_layers is None or m.n_decoder_layers > 0,
             "model.n_decoder_layers must be > 0 (or null: as many as n_layers)")


# Which family each objective trains, and the layouts each family is proven on.
_OBJECTIVE_ARCH = {"clm": "decoder", "fim": "decoder", "mlm": "encoder",
                   "span": "encoder_decoder", "sft": "decoder"}
_PRESET_HINT = {"decoder": "model=cpu (or any decoder preset)", "encoder": "model=cpu_encoder",
                "encoder_decoder": "model=cpu_t5"}


def validate_objective(o: ObjectiveConfig, m: ModelConfig, seq_len: int) -> None:
    """The objective's fields, and that the model family can learn it."""
    _require(o.name in OBJECTIVES, f"objective={o.name!r}; use one of {', '.join(OBJECTIVES)}")
    arch = _OBJECTIVE_ARCH[o.name]
    _require(m.arch == arch,
             f"objective={o.name} trains a model.arch={arch}, but model={m.name} has "
             f"model.arch={m.arch}; use {_PRESET_HINT[arch]} with objective={o.name}")
    for name in ("mask_rate", "noise_density"):
        _require(0.0 < getattr(o, name) < 1.0, f"objective.{name} must be in (0, 1)")
    for name in ("mask_token_fraction", "random_token_fraction", "fim_rate", "fim_spm_rate"):
        _require(0.0 <= getattr(o, name) <= 1.0, f"objective.{name} must be in [0, 1]")
    _require(o.mask_token_fraction + o.random_token_fraction <= 1.0,
             "objective.mask_token_fraction + objective.random_token_fraction must be <= 1 "
             "(the rest of the chosen tokens stay unchanged)")
    _require(o.mean_span_length >= 1.0, "objective.mean_span_length must be >= 1")
    _require(o.name != "sft" or o.sft_val_source is None or bool(o.sft_val_source.strip()),
             "objective.sft_val_source is empty; name a chat JSONL file or glob, or null to "
             "hold out data.val_fraction")
    if o.name == "span":
        n_spans = round(round(seq_len / (1 - o.noise_density) * o.noise_density)
                        / o.mean_span_length)
        _require(n_spans < 100,
                 f"seq_len={seq_len} with objective.noise_density={o.noise_density} and "
                 f"mean_span_length={o.mean_span_length} gives ~{n_spans} corrupted spans per "
                 "window, more than the tokenizer's 100 sentinels <extra_id_N>; lower seq_len "
                 "or the noise density, or raise mean_span_length")


def validate(cfg: TrainConfig, world_size: int | None = None) -> None:
    """Every cross-field check, run before any process group, file or allocation.

    `world_size` defaults to WORLD_SIZE from the environment torchrun / deepspeed set (1 when
    started directly)."""
    validate_model(cfg.model)
    validate_objective(cfg.objective, cfg.model, cfg.seq_len)
    if cfg.objective.name == "sft":
        validate_sft(cfg)
    if cfg.evals.tasks:
        validate_evals(cfg)
    validate_parallel(cfg, int(os.environ.get("WORLD_SIZE", "1")) if world_size is None
                      else world_size)
    _require(cfg.precision in ("fp32", "bf16", "fp16", "fp8"),
             f"precision={cfg.precision!r}; use fp32, bf16, fp16 or fp8")
    validate_quant(cfg)
    _require(cfg.activation_checkpointing in ("none", "full", "selective"),
             f"activation_checkpointing={cfg.activation_checkpointing!r}; "
             "use none, full or selective")
    _require(cfg.optim.schedule in ("cosine", "wsd", "constant"),
             f"optim.schedule={cfg.optim.schedule!r}; use cosine, wsd or constant")
    _require(cfg.spike_policy in ("none", "warn", "skip", "rollback"),
             f"spike_policy={cfg.spike_policy!r}; use none, warn, skip or rollback")
    _require(cfg.spike_policy != "rollback" or cfg.ckpt_every > 0 or cfg.ckpt_every_s > 0,
             "spike_policy=rollback needs periodic checkpoints: set ckpt_every or ckpt_every_s")
    _require(cfg.nonfinite_policy in ("halt", "skip"),
             f"nonfinite_policy={cfg.nonfinite_policy!r}; use halt or skip")
    _require(cfg.loss in ("auto", "chunked", "full"),
             f"loss={cfg.loss!r}; use auto, chunked or full")
    unknown = sorted(set(cfg.sdpa_backends) - set(SDPA_BACKENDS))
    _require(not unknown, f"sdpa_backends has {unknown}; use any of {', '.join(SDPA_BACKENDS)}")
    _require(cfg.seq_len <= cfg.model.max_seq_len,
             f"seq_len={cfg.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; "
             "lower seq_len or raise model.max_seq_len")
    _require(cfg.global_batch_size % cfg.micro_batch_size == 0,
             f"global_batch_size={cfg.global_batch_size} is not divisible by "
             f"micro_batch_size={cfg.micro_batch_size}")
    _require(cfg.steps > 0 or (cfg.tokens or 0) > 0, "steps (or tokens) must be > 0")
    _require(0.0 <= cfg.data.val_fraction < 1.0, "data.val_fraction must be in [0, 1)")
    stride = cfg.eval.stride
    _require(stride is None or 0 < stride <= cfg.seq_len,
             f"eval.stride={stride} must be in [1, seq_len={cfg.seq_len}]; unset it for "
             "non-overlapping windows")
    _require(stride is None or cfg.objective.name == "clm",
             f"eval.stride scores next-token prediction of a decoder (objective=clm), not "
             f"objective={cfg.objective.name}; unset eval.stride")
    validate_lora(cfg)


def validate_lora(cfg: TrainConfig) -> None:
    """LoRA's fields, and the layouts and precisions it is built and proven for."""
    lo, p = cfg.lora, cfg.parallel
    _require(lo.rank >= 0, f"lora.rank={lo.rank}; use 0 (off) or a positive adapter rank")
    if lo.rank == 0:
        return
    unknown = sorted(set(lo.targets) - set(LORA_TARGETS))
    _require(not unknown, f"lora.targets has {unknown}; use any of {', '.join(LORA_TARGETS)}")
    _require(bool(lo.targets), f"lora.targets is empty; name any of {', '.join(LORA_TARGETS)}")
    _require(0.0 <= lo.dropout < 1.0, f"lora.dropout={lo.dropout} must be in [0, 1)")
    _require(lo.alpha > 0, f"lora.alpha={lo.alpha} must be > 0")
    _require(lo.dropout == 0.0 or cfg.activation_checkpointing == "none",
             f"lora.dropout={lo.dropout} with activation_checkpointing="
             f"{cfg.activation_checkpointing}: the recomputation would draw other dropout masks "
             "(blocks are checkpointed without saving the RNG state); set lora.dropout=0 or "
             "activation_checkpointing=none")
    _require(cfg.model.arch == "decoder",
             f"lora.rank > 0 is built for model.arch=decoder, not {cfg.model.arch}; use a "
             "decoder model or set lora.rank=0")
    _require(p.backend == "native" and p.tp == 1 and p.pp == 1,
             "lora.rank > 0 runs on one process, DDP, FSDP or HSDP (parallel.backend=native, "
             "parallel.tp=1, parallel.pp=1); change the layout or set lora.rank=0")
    _require(cfg.precision != "fp8" and not cfg.quant.qat,
             "lora.rank > 0 trains adapters on a frozen base in fp32/bf16/fp16; it does not "
             "combine with precision=fp8 or quant.qat: turn one of them off")


def validate_evals(cfg: TrainConfig) -> None:
    """evals.tasks: known tasks whose files exist, scored by a decoder on a layout where each
    rank runs the whole model's forward (one process, DDP, FSDP)."""
    from pretrain.errors import DataError
    from pretrain.eval.tasks import parse_tasks, task_files

    e, p = cfg.evals, cfg.parallel
    try:
        for name in parse_tasks(e.tasks):
            if e.data_dir is not None:
                task_files(name, e.data_dir)
    except DataError as err:
        raise ConfigError(f"evals.tasks: {err}") from None
    _require(cfg.model.arch == "decoder" and cfg.objective.name not in ("mlm", "span"),
             f"evals.tasks scores a decoder's log-likelihoods; this run trains "
             f"model.arch={cfg.model.arch} objective={cfg.objective.name}: set evals.tasks=[]")
    _require(p.backend == "native" and p.tp == 1 and p.pp == 1,
             "evals.tasks needs every rank to run the whole model (one process, DDP or FSDP); "
             f"parallel.tp={p.tp} pp={p.pp} backend={p.backend} does not: set evals.tasks=[] "
             "and score the checkpoint with pretrain-eval")
    _require(e.every >= 0, f"evals.every={e.every}; use 0 (only at the end) or a step count")
    _require(e.batch_size >= 1, f"evals.batch_size={e.batch_size}; use a positive integer")
    _require(e.limit is None or e.limit >= 1, f"evals.limit={e.limit}; use a positive integer "
             "or null (all items)")
    _require(e.window is None or e.window >= 2, f"evals.window={e.window}; use >= 2 or null")


def validate_sft(cfg: TrainConfig) -> None:
    """objective=sft: chat JSONL from a local data.source, on a layout with document masking."""
    p, source = cfg.parallel, cfg.data.source
    _require(p.backend == "native" and p.pp == 1,
             "objective=sft packs conversations with document masking, which needs the native "
             "backend without pipeline parallelism; set parallel.pp=1 and "
             "parallel.backend=native")
    _require(not cfg.data.mix and source != "builtin" and not source.startswith("hf:"),
             f"objective=sft reads chat JSONL from a local file or glob, not data.source="
             f"{source!r}{' or data.mix' if cfg.data.mix else ''}; set data.source=PATH (lines "
             '{"messages": [{"role": ..., "content": ...}]})')


def validate_quant(cfg: TrainConfig) -> None:
    """fp8 and QAT: known recipe and scheme, a layout they are wired for, fp8 hardware (or the
    test-only emulation) on the device the run will use."""
    q, p = cfg.quant, cfg.parallel
    _require(q.fp8_recipe in FP8_RECIPES,
             f"quant.fp8_recipe={q.fp8_recipe!r}; use one of {', '.join(FP8_RECIPES)}")
    _require(q.qat is None or q.qat in QAT_SCHEMES,
             f"quant.qat={q.qat!r}; use one of {', '.join(QAT_SCHEMES)} (or null)")
    _require(not q.qat or (q.group_size > 0 and cfg.model.dim % q.group_size == 0),
             f"quant.group_size={q.group_size} must divide model.dim={cfg.model.dim}; "
             "use 32, 64 or 128")
    for name, on in (("precision=fp8", cfg.precision == "fp8"), ("quant.qat", bool(q.qat))):
        if not on:
            continue
        _require(p.backend == "native",
                 f"{name} swaps the model's linears for torchao's, which the DeepSpeed engine "
                 "does not know; use parallel.backend=native")
        _require(p.tp == 1, f"{name} is not wired for tensor parallelism (torchao's "
                 "float8 / fake-quantized linears need their own parallel styles); use "
                 "parallel.tp=1")
        _require(cfg.model.arch == "decoder",
                 f"{name} is built and tested for the decoder; use model.arch=decoder")
    _require(not q.include_output or bool(q.qat),
             "quant.include_output=true quantizes the output projection for QAT; set quant.qat "
             "(PTQ: pretrain-quantize --include-output)")
    _require(not q.include_output or not uses_chunked_loss(cfg.loss, p),
             "quant.include_output=true: the chunked loss multiplies by output.weight itself, "
             "past the fake-quantized output projection; set loss=full")
    _require(not q.include_output or not cfg.model.tie_embeddings,
             "quant.include_output=true with model.tie_embeddings=true would quantize the shared "
             "embedding; use model.tie_embeddings=false or drop quant.include_output")
    _require(cfg.precision != "fp8" or not q.qat,
             "precision=fp8 and quant.qat both swap the linears; choose one")
    if cfg.precision == "fp8":
        cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        check_fp8(torch.device("cuda" if cuda else "cpu"), q)


def validate_parallel(cfg: TrainConfig, world_size: int) -> None:
    """Checks of the parallel layout against the world size, the model and the batch."""
    p, m = cfg.parallel, cfg.model
    _require(p.backend in ("native", "deepspeed"),
             f"parallel.backend={p.backend!r}; use native or deepspeed")
    _require(p.pp_virtual_stages >= 1, "parallel.pp_virtual_stages must be >= 1")
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, p.pp, world_size)
    _require(m.arch == "decoder" or (p.tp == 1 and p.pp == 1),
             f"model.arch={m.arch} trains with data parallelism (DDP, FSDP, HSDP) or DeepSpeed "
             "ZeRO; tensor and pipeline parallelism are implemented for the decoder only: set "
             "parallel.tp=1 and parallel.pp=1")
    kv = m.n_kv_heads or m.n_heads
    _require(m.n_heads % p.tp == 0 and kv % p.tp == 0,
             f"model.n_heads={m.n_heads} and model.n_kv_heads={kv} must both be divisible by "
             f"parallel.tp={p.tp} (each tensor-parallel rank holds whole heads); lower tp")
    _require(not (p.tp > 1 and p.sequence_parallel) or cfg.seq_len % p.tp == 0,
             f"seq_len={cfg.seq_len} is not divisible by parallel.tp={p.tp}, which sequence "
             "parallelism needs; change seq_len or set parallel.sequence_parallel=false")
    _require(not (m.tie_embeddings and (p.tp > 1 or p.pp > 1)),
             "model.tie_embeddings=true is not supported with parallel.tp > 1 or parallel.pp > 1 "
             "(the shared matrix would be split two ways or live on two stages); untie it")
    _require(cfg.global_batch_size % (cfg.micro_batch_size * dims.dp) == 0,
             f"global_batch_size={cfg.global_batch_size} is not divisible by micro_batch_size="
             f"{cfg.micro_batch_size} × data-parallel degree {dims.dp}; change one of them")
    for name in ("fsdp_param_dtype", "fsdp_reduce_dtype"):
        _require(getattr(p, name) in ("bf16", "fp16", "fp32"),
                 f"parallel.{name}={getattr(p, name)!r}; use bf16, fp16 or fp32")
    if p.pp > 1:
        _validate_pipeline(cfg)
    _require(cfg.loss != "chunked" or output_whole_on_one_rank(p),
             "loss=chunked needs the whole output projection on the rank that computes the "
             "loss, which tensor/pipeline parallelism and the DeepSpeed backend do not give; "
             "use loss=auto (chunked where it applies) or loss=full")
    masking = cfg.data.document_masking or cfg.data.restart_positions
    _require(not masking or (p.backend == "native" and p.pp == 1),
             "data.document_masking / data.restart_positions need the native backend without "
             "pipeline parallelism (the DeepSpeed engine and the pipeline schedules run the "
             "model without the attention mask); set parallel.pp=1 and parallel.backend=native, "
             "or turn document masking off")
    _require(not (p.backend == "deepspeed" and cfg.spike_policy == "skip"),
             "spike_policy=skip cannot drop an update under parallel.backend=deepspeed (the "
             "engine steps inside backward); use spike_policy=rollback or warn")
    _require(m.arch == "decoder" or not masking,
             f"data.document_masking / data.restart_positions are for decoders; model.arch="
             f"{m.arch} attends across the packed window (as BERT and T5 pre-training do): turn "
             "them off")
    if p.backend == "deepspeed":
        _validate_deepspeed(cfg, world_size)
    else:
        _require(p.zero_stage == 0,
                 f"parallel.zero_stage={p.zero_stage} needs parallel.backend=deepspeed (the "
                 "native backend shards with FSDP2: parallel.dp_shard)")


def _validate_pipeline(cfg: TrainConfig) -> None:
    p = cfg.parallel
    n_stages = p.pp * p.pp_virtual_stages
    _require(cfg.model.n_layers >= n_stages,
             f"model.n_layers={cfg.model.n_layers} is fewer than parallel.pp × "
             f"parallel.pp_virtual_stages = {n_stages} pipeline stages; lower pp or the virtual "
             "stages")
    check_schedule(p.pp_schedule, p.pp_virtual_stages)
    _require(cfg.precision != "fp16",
             "precision=fp16 needs a loss scaler, which the pipeline schedules (they run "
             "backward themselves) do not apply; use precision=bf16 with parallel.pp > 1")
    n_micro = p.pp_microbatches or n_stages
    _require(cfg.micro_batch_size % n_micro == 0,
             f"micro_batch_size={cfg.micro_batch_size} is not divisible by the "
             f"{n_micro} pipeline micro-batches (parallel.pp_microbatches, default pp × virtual "
             "stages); every pipeline micro-batch needs whole sequences")
    _require(p.pp_schedule != "DualPipeV" or n_micro >= n_stages,
             f"parallel.pp_schedule=DualPipeV needs at least {n_stages} micro-batches "
             f"(parallel.pp_microbatches={n_micro})")


def _validate_deepspeed(cfg: TrainConfig, world_size: int) -> None:
    p = cfg.parallel
    _require(p.tp == 1 and p.pp == 1 and p.dp_replicate == 1,
             "parallel.backend=deepspeed is data parallel over all ranks (ZeRO): set "
             "parallel.tp=1, parallel.pp=1 and parallel.dp_replicate=1, or use backend=native")
    _require(p.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage={p.zero_stage}; use 0, 1, 2 or 3")
    deepspeed_config(zero_stage=p.zero_stage, precision=cfg.precision,
                     global_batch_size=cfg.global_batch_size,
                     micro_batch_size=cfg.micro_batch_size, world_size=world_size,
                     grad_clip=cfg.optim.grad_clip, extra=p.deepspeed_extra)
