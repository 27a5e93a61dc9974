"""Every cross-field check of a `TrainConfig`, run before any process group, file or allocation.

The schema (`pretrain/config.py`) is pure data; the checks that need the parallel code (layouts,
pipeline schedules, DeepSpeed's generated config) live here, above it.
"""

from __future__ import annotations

import os

from pretrain.config import SDPA_BACKENDS, ModelConfig, TrainConfig, output_whole_on_one_rank
from pretrain.errors import ConfigError
from pretrain.parallel.deepspeed_backend import deepspeed_config
from pretrain.parallel.dims import ParallelDims
from pretrain.parallel.pipeline import check_schedule


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_model(m: ModelConfig) -> None:
    """Checks of the model shape alone."""
    kv = m.n_kv_heads or m.n_heads
    _require(m.dim % m.n_heads == 0,
             f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}; "
             "choose n_heads that divides dim")
    _require(m.n_heads % kv == 0,
             f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={kv}; "
             "choose n_kv_heads that divides n_heads")
    _require((m.dim // m.n_heads) % 2 == 0,
             f"head dim {m.dim // m.n_heads} (model.dim / model.n_heads) must be even for RoPE")
    _require(m.vocab_size > 0 and m.n_layers > 0, "model.vocab_size and model.n_layers must be > 0")


def validate(cfg: TrainConfig, world_size: int | None = None) -> None:
    """Every cross-field check, run before any process group, file or allocation.

    `world_size` defaults to WORLD_SIZE from the environment torchrun / deepspeed set (1 when
    started directly)."""
    validate_model(cfg.model)
    validate_parallel(cfg, int(os.environ.get("WORLD_SIZE", "1")) if world_size is None
                      else world_size)
    _require(cfg.precision in ("fp32", "bf16", "fp16"),
             f"precision={cfg.precision!r}; use fp32, bf16 or fp16")
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


def validate_parallel(cfg: TrainConfig, world_size: int) -> None:
    """Checks of the parallel layout against the world size, the model and the batch."""
    p, m = cfg.parallel, cfg.model
    _require(p.backend in ("native", "deepspeed"),
             f"parallel.backend={p.backend!r}; use native or deepspeed")
    _require(p.pp_virtual_stages >= 1, "parallel.pp_virtual_stages must be >= 1")
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, p.pp, world_size)
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
