"""Per-rank memory estimate: parameters, gradients, optimizer state, activations, transients.

The model of memory, per rank (the pipeline rank with the largest peak):

    peak = parameters + gradients + optimizer state + activations + transients

- Parameters are counted per tensor, exactly as the layouts of `parallelize.py` cut them: TP
  chunks (column-wise weights and both embedding matrices on dim 0, wo/w2 on dim 1; norms
  replicated), then FSDP chunks dim 0 over dp_shard; the figure is for the coordinate-0 rank,
  which holds the largest chunks. A pipeline rank holds its stages' layers (plus the embedding
  on the first stage, the final norm and output on the last).
- Native backend: fp32 master weights (4 B), fp32 gradients (4 B), AdamW moments (8 B), all
  sharded by FSDP. DeepSpeed: half-precision module weights (2 B) plus fp32 master weights when
  bf16/fp16, and ZeRO-1/2/3 partition optimizer state / + gradients / + weights over the world.
- Activations: the tensors autograd saves, counted per token from the model's forward
  (`_block_saved` lists them), times tokens per micro-batch, times the micro-batches a pipeline
  rank holds at once (all for GPipe/LoopedBFS, up to pp−rank for 1F1B, up to pp per virtual
  stage for the interleaved and zero-bubble schedules, an approximation). Full activation
  checkpointing keeps each block's input plus one block being recomputed; selective keeps the
  block input, attention's output and every other matmul output (the policy of
  `parallelize._selective_context`).
- The loss follows the config's choice (`loss`, resolved as the trainer does: 'auto' is chunked
  where one rank holds the whole output projection, `pretrain.config.output_whole_on_one_rank`).
  The full loss keeps the (N, V) logits and log-probabilities, and its backward adds two fp32
  logit-sized buffers. The chunked loss (`pretrain.models.loss.linear_cross_entropy`) never
  forms them: it saves the gradients it computes in forward (hidden states', in the matmul
  dtype, and the output weight's, fp32), and its transients are one chunk of fp32 logits
  (`default_chunk_tokens` rows), that chunk's gradient and the previous chunk's (still held
  while the next is computed), plus the matmul-dtype copies of the hidden states and the weight
  under autocast.
- Transients, besides the loss's: FSDP's gathered (unsharded) parameters and gradients of the
  blocks in flight; autocast's low-precision weight copies. The loss's buffers are freed before
  backward recomputes the first block under checkpointing, so only what exceeds that block
  (counted in the activations) is added.

The peak is the sum of the parts, as if they coexisted; they nearly do at the end of forward
(with gradient accumulation, the gradients of earlier micro-batches are there too), so with one
micro-batch per step it errs high by up to the gradients. Not modelled: allocator fragmentation
and caching, communication buffers (NCCL, DeepSpeed's reduce/allgather buckets), CUDA context,
code and kernels' workspaces. Checked on CPU against the measured resident-set growth of the
trainer's own train module (`pretrain.perf.memory`; tests/unit/test_memory.py, the README).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pretrain.config import ModelConfig, ParallelConfig, uses_chunked_loss
from pretrain.models.llama import ffn_hidden_dim
from pretrain.models.loss import default_chunk_tokens
from pretrain.parallel.dims import ParallelDims
from pretrain.parallel.pipeline import stage_ids, stage_layers

GIB = 2**30

# (LLaMA name, shape, the dim TP shards or None) of one parameter.
ParamSpec = tuple[str, tuple[int, ...], int | None]


def _head_dims(cfg: ModelConfig) -> tuple[int, int]:
    head_dim = cfg.dim // cfg.n_heads
    return cfg.n_heads * head_dim, (cfg.n_kv_heads or cfg.n_heads) * head_dim


def stage_param_specs(cfg: ModelConfig, stage: int, n_stages: int) -> list[ParamSpec]:
    """Every parameter of pipeline stage `stage` with its shape and the dim TP shards."""
    q_dim, kv_dim = _head_dims(cfg)
    hidden = ffn_hidden_dim(cfg)
    d, v = cfg.dim, cfg.vocab_size
    specs: list[ParamSpec] = []
    if stage == 0:
        specs.append(("tok_embeddings.weight", (v, d), 0))
    for i in stage_layers(cfg.n_layers, n_stages)[stage]:
        p = f"layers.{i}."
        specs += [
            (p + "attention.wq.weight", (q_dim, d), 0),
            (p + "attention.wk.weight", (kv_dim, d), 0),
            (p + "attention.wv.weight", (kv_dim, d), 0),
            (p + "attention.wo.weight", (d, q_dim), 1),
            (p + "feed_forward.w1.weight", (hidden, d), 0),
            (p + "feed_forward.w2.weight", (d, hidden), 1),
            (p + "feed_forward.w3.weight", (hidden, d), 0),
            (p + "attention_norm.weight", (d,), None),
            (p + "ffn_norm.weight", (d,), None),
        ]
    if stage == n_stages - 1:
        specs.append(("norm.weight", (d,), None))
        # A tied output shares the embedding's storage when both are on this stage.
        if not (cfg.tie_embeddings and stage == 0):
            specs.append(("output.weight", (v, d), 0))
    return specs


def _first_chunk(size: int, parts: int) -> int:
    """Size of the first (largest) of `parts` torch.chunk pieces of `size`."""
    return math.ceil(size / parts)


def local_numel(shape: tuple[int, ...], tp_dim: int | None, tp: int, dp_shard: int) -> int:
    """Elements the coordinate-0 rank holds: the TP chunk, then FSDP's dim-0 chunk of it."""
    local = list(shape)
    if tp_dim is not None and tp > 1:
        local[tp_dim] = _first_chunk(local[tp_dim], tp)
    if dp_shard > 1:
        local[0] = _first_chunk(local[0], dp_shard)
    return math.prod(local)


def rank_param_count(cfg: ModelConfig, dims: ParallelDims, *, pp_rank: int = 0,
                     virtual_stages: int = 1, schedule: str = "1F1B",
                     shard_params: bool = True) -> int:
    """Parameters held by the coordinate-0 rank of pipeline rank `pp_rank`."""
    n_stages = dims.pp * virtual_stages
    dp_shard = dims.dp_shard if shard_params else 1
    total = 0
    for stage in stage_ids(pp_rank, dims.pp, virtual_stages, schedule):
        for _, shape, tp_dim in stage_param_specs(cfg, stage, n_stages):
            total += local_numel(shape, tp_dim, dims.tp, dp_shard)
    return total


# ---------------------------------------------------------------------------- activations


def _block_saved(cfg: ModelConfig, *, half: bool, tp: int, sp: bool) -> list[tuple[float, int]]:
    """(elements per token, bytes per element) of what autograd saves in one block, from a
    census of the saved tensors of `TransformerBlock.forward`:

    per norm: the residual input and the normalized tensor (fp32, sequence-sharded under SP) and
    the norm output the linears read (gathered under SP; a half copy under autocast);
    attention: rotated q, k and v as SDPA reads them (in fp32 with GQA, k and v repeated to
    n_heads) and the attention output reshaped for wo; feed-forward: w1 out, silu out, w3 out and
    their product. Rotary saves only its cos/sin table; SDPA's log-sum-exp is negligible.
    """
    q, kv = _head_dims(cfg)
    hidden = ffn_hidden_dim(cfg)
    d = cfg.dim
    seq = tp if sp else 1  # residual-stream tensors are sequence-sharded under SP
    lin = 2 if half else 4
    kv_read = q if not half and kv != q else kv  # the fp32 SDPA path repeats GQA heads
    attention = [(q / tp, lin), (kv_read / tp, lin), (kv_read / tp, lin), (q / tp, lin)]
    norms = [(d / seq, 4), (d / seq, 4), (d, lin)] * 2
    ffn = [(hidden / tp, lin)] * 4
    return attention + norms + ffn


def _selective_saved(cfg: ModelConfig, *, half: bool, tp: int, sp: bool) -> list[tuple[float, int]]:
    """Selective checkpointing keeps the block input, SDPA's output and every other matmul
    output: of wq, wk, wv, wo, w1, w3, w2 (in the order they run) those of wq, wv, w1 and w2."""
    q, kv = _head_dims(cfg)
    hidden = ffn_hidden_dim(cfg)
    lin = 2 if half else 4
    seq = tp if sp else 1
    return [(cfg.dim / seq, 4), (q / tp, lin), (kv / tp, lin), (q / tp, lin),
            (hidden / tp, lin), (cfg.dim, lin)]


def _bytes_per_token(items: list[tuple[float, int]]) -> float:
    return sum(n * b for n, b in items)


def block_activation_bytes(cfg: ModelConfig, tokens: int, *, half: bool, tp: int, sp: bool,
                           n_blocks: int, ac_mode: str) -> float:
    """Saved activations of `n_blocks` blocks for one micro-batch of `tokens` tokens."""
    full = _bytes_per_token(_block_saved(cfg, half=half, tp=tp, sp=sp)) * tokens
    if ac_mode == "none":
        return n_blocks * full
    block_input = cfg.dim / (tp if sp else 1) * 4 * tokens
    if ac_mode == "full":
        return n_blocks * block_input + (full if n_blocks else 0)  # + one block recomputing
    kept = _bytes_per_token(_selective_saved(cfg, half=half, tp=tp, sp=sp)) * tokens
    return n_blocks * kept + (full if n_blocks else 0)


def output_activation_bytes(cfg: ModelConfig, tokens: int, *, half: bool, tp: int,
                            sp: bool, chunked: bool = False) -> float:
    """What the last stage saves after the blocks: the final norm's tensors, then with the full
    loss the logits (kept by the caller) and log-probabilities (saved by the loss), with the
    chunked loss the gradients it computed in forward (see `chunked_loss_bytes`)."""
    seq = tp if sp else 1
    v = cfg.vocab_size
    norm = tokens * ((2 * cfg.dim / seq) * 4 + cfg.dim * (2 if half else 4))
    if chunked:
        return norm + chunked_loss_bytes(cfg, tokens, half=half)[0]
    logits = v * (2 + 4 if half else 4)  # under autocast: half logits and their fp32 copy
    return norm + tokens * (logits + v * 4)


def loss_transient_bytes(cfg: ModelConfig, tokens: int, *, half: bool, chunked: bool) -> float:
    """The loss's short-lived buffers: the full loss's backward holds two fp32 (N, V) buffers;
    the chunked loss's are in `chunked_loss_bytes`."""
    if chunked:
        return chunked_loss_bytes(cfg, tokens, half=half)[1]
    return 2 * tokens * cfg.vocab_size * 4


def chunked_loss_bytes(cfg: ModelConfig, tokens: int, *, half: bool) -> tuple[float, float]:
    """(saved, transient) bytes of `linear_cross_entropy` over `tokens` tokens (the output
    projection whole on this rank). Saved for backward: d/dhidden (N, D) in the matmul dtype and
    d/dweight (V, D) in fp32. Transient, at its highest while a chunk's logits are formed: the
    chunk's fp32 logits and its gradient in the matmul dtype, the previous chunk's gradient
    (still referenced), and under autocast the matmul-dtype copies of hidden and weight."""
    v, d = cfg.vocab_size, cfg.dim
    mm = 2 if half else 4
    chunk = min(default_chunk_tokens(v), tokens)
    grads_held = 2 if tokens > chunk else 1
    saved = tokens * d * mm + v * d * 4
    transient = chunk * v * (4 + grads_held * mm) + ((v + tokens) * d * 2 if half else 0)
    return saved, transient


def in_flight_microbatches(schedule: str, pp: int, pp_rank: int, n_micro: int) -> int:
    """Micro-batches whose activations one stage of pipeline rank `pp_rank` holds at once."""
    if pp == 1:
        return 1
    if schedule in ("GPipe", "LoopedBFS"):
        return n_micro
    if schedule == "1F1B":
        return min(n_micro, pp - pp_rank)
    return min(n_micro, pp)


# ---------------------------------------------------------------------------------- total


@dataclass
class MemoryEstimate:
    """Estimated bytes on one rank: the coordinate-0 rank of pipeline rank `pp_rank`."""

    pp_rank: int
    stages: list[int]
    local_params: int
    params: float
    grads: float
    optimizer: float
    activations: float
    transients: float

    @property
    def peak(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.transients

    def rows(self) -> list[tuple[str, float]]:
        return [("parameters", self.params), ("gradients", self.grads),
                ("optimizer state", self.optimizer), ("activations", self.activations),
                ("transients", self.transients), ("peak", self.peak)]

    def format(self) -> str:
        head = (f"pipeline rank {self.pp_rank} (stages {self.stages}): "
                f"{self.local_params:,} parameters per rank")
        lines = [f"  {name:<16} {value / GIB:10.3f} GiB" for name, value in self.rows()]
        return "\n".join([head, *lines])


@dataclass
class _Bytes:
    params: float
    grads: float
    optimizer: float
    transients: float


def _native_bytes(cfg: ModelConfig, dims: ParallelDims, parallel: ParallelConfig, n_local: int,
                  precision: str, stages: list[int], n_stages: int) -> _Bytes:
    """fp32 master weights, gradients and AdamW moments (FSDP-sharded), plus what FSDP gathers
    and what autocast copies."""
    half_compute = precision != "fp32"
    pbytes = 2 if half_compute and parallel.fsdp_param_dtype != "fp32" else 4
    transients = 0.0
    unsharded = [_unsharded_stage_params(cfg, dims, s, n_stages) for s in stages]
    block = max((b for _, b in unsharded), default=0)
    stage_total = sum(t for t, _ in unsharded)
    if dims.fsdp_enabled:
        gathered = (2 * block if parallel.fsdp_reshard_after_forward else stage_total) * pbytes
        transients += gathered + block * 4  # + one block's unsharded fp32 gradients
    elif half_compute:
        transients += stage_total * 2  # autocast caches half copies of the weights
    return _Bytes(params=4 * n_local, grads=4 * n_local, optimizer=8 * n_local,
                  transients=transients)


def _unsharded_stage_params(cfg: ModelConfig, dims: ParallelDims, stage: int,
                            n_stages: int) -> tuple[int, int]:
    """(all parameters, largest block's parameters) of a stage after TP, before FSDP."""
    specs = stage_param_specs(cfg, stage, n_stages)
    total = sum(local_numel(shape, tp_dim, dims.tp, 1) for _, shape, tp_dim in specs)
    per_layer: dict[str, int] = {}
    for name, shape, tp_dim in specs:
        if name.startswith("layers."):
            key = name.split(".")[1]
            per_layer[key] = per_layer.get(key, 0) + local_numel(shape, tp_dim, dims.tp, 1)
    return total, max(per_layer.values(), default=0)


def _deepspeed_bytes(n_full: int, world: int, zero_stage: int, precision: str) -> _Bytes:
    """ZeRO: stage ≥1 partitions optimizer state (and fp32 master weights), ≥2 gradients, 3
    the weights themselves, over all `world` data-parallel ranks."""
    half = precision != "fp32"
    part = n_full / world
    weights = n_full if zero_stage < 3 else part
    opt = part if zero_stage >= 1 else n_full
    grads = part if zero_stage >= 2 else n_full
    params = weights * (2 if half else 4)
    # fp32 master copy: separate from half weights; ZeRO also keeps flat fp32 partitions.
    master = opt * 4 if (half or zero_stage >= 1) else 0
    return _Bytes(params=params + master, grads=grads * (2 if half else 4), optimizer=8 * opt,
                  transients=0.0)


def estimate_memory(
    cfg: ModelConfig,
    parallel: ParallelConfig,
    *,
    world_size: int,
    micro_batch_size: int,
    seq_len: int,
    precision: str = "bf16",
    activation_checkpointing: str = "none",
    loss: str = "auto",
    pp_rank: int | None = None,
) -> MemoryEstimate:
    """The estimate for pipeline rank `pp_rank`, or for the one with the largest peak. `loss` is
    the config's: 'full', 'chunked', or 'auto' (chunked where one rank holds the whole output
    projection, as the trainer resolves it)."""
    dims = ParallelDims(parallel.dp_replicate, parallel.dp_shard, parallel.tp, parallel.pp,
                        world_size)
    chunked = uses_chunked_loss(loss, parallel)
    ranks = range(dims.pp) if pp_rank is None else [pp_rank]
    estimates = [_estimate_rank(cfg, parallel, dims, r, micro_batch_size=micro_batch_size,
                                seq_len=seq_len, precision=precision,
                                ac_mode=activation_checkpointing, chunked=chunked)
                 for r in ranks]
    return max(estimates, key=lambda e: e.peak)


def _estimate_rank(cfg: ModelConfig, parallel: ParallelConfig, dims: ParallelDims, pp_rank: int,
                   *, micro_batch_size: int, seq_len: int, precision: str,
                   ac_mode: str, chunked: bool) -> MemoryEstimate:
    v = parallel.pp_virtual_stages if dims.pp_enabled else 1
    schedule = parallel.pp_schedule
    n_stages = dims.pp * v
    stages = stage_ids(pp_rank, dims.pp, v, schedule if dims.pp_enabled else "1F1B")
    deepspeed = parallel.backend == "deepspeed"
    n_local = rank_param_count(cfg, dims, pp_rank=pp_rank, virtual_stages=v, schedule=schedule,
                               shard_params=not deepspeed)
    if deepspeed:
        b = _deepspeed_bytes(n_local, dims.world_size, parallel.zero_stage, precision)
        n_local = int(n_local / dims.world_size) if parallel.zero_stage == 3 else n_local
    else:
        b = _native_bytes(cfg, dims, parallel, n_local, precision, stages, n_stages)

    n_micro = parallel.pp_microbatches or n_stages
    tokens = (micro_batch_size // n_micro if dims.pp_enabled else micro_batch_size) * seq_len
    in_flight = in_flight_microbatches(schedule, dims.pp, pp_rank, n_micro)
    half = precision != "fp32"
    sp = parallel.sequence_parallel and dims.tp_enabled
    acts = 0.0
    for stage in stages:
        n_blocks = len(stage_layers(cfg.n_layers, n_stages)[stage])
        per_mb = block_activation_bytes(cfg, tokens, half=half, tp=dims.tp, sp=sp,
                                        n_blocks=n_blocks, ac_mode=ac_mode)
        if stage == n_stages - 1:
            per_mb += output_activation_bytes(cfg, tokens, half=half, tp=dims.tp, sp=sp,
                                              chunked=chunked)
            # The loss's buffers are gone before backward recomputes a block (counted in the
            # activations under checkpointing): only what exceeds that block adds to the peak.
            recomputed = block_activation_bytes(cfg, tokens, half=half, tp=dims.tp, sp=sp,
                                                n_blocks=min(n_blocks, 1), ac_mode="none")
            loss = loss_transient_bytes(cfg, tokens, half=half, chunked=chunked)
            b.transients += max(0.0, loss - (recomputed if ac_mode != "none" else 0.0))
        acts += per_mb * in_flight
    return MemoryEstimate(pp_rank=pp_rank, stages=stages, local_params=n_local,
                          params=b.params, grads=b.grads, optimizer=b.optimizer,
                          activations=acts, transients=b.transients)
