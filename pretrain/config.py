"""The typed configuration schema: one dataclass per group, registered in Hydra's ConfigStore.

`conf/` holds only YAML presets that fill these dataclasses; `launch/train.py` converts the
composed config to `TrainConfig` once (`OmegaConf.to_object`) and calls `validate()` before any
process group, file or tensor is created. Builders receive the narrowest sub-config they need.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")
"""Names of the attention kernels `sdpa_backends` may list."""


ARCHS = ("decoder", "encoder", "encoder_decoder")
"""Model families: a causal decoder, a bidirectional encoder with a masked-LM head, and an
encoder-decoder whose decoder attends to the encoder output (T5)."""


@dataclass
class ModelConfig:
    """A transformer of one family (`arch`): a LLaMA-style decoder by default. The block
    options (`norm`, `norm_position`, `bias`, `mlp`, `position`, ...) default to LLaMA's and
    are set by the encoder and encoder-decoder presets to BERT's and T5's."""

    name: str = "cpu"
    """Preset name, used in run names and summaries."""
    arch: str = "decoder"
    """'decoder' (causal LM), 'encoder' (bidirectional, masked-LM head tied to the embeddings)
    or 'encoder_decoder' (T5: `n_layers` encoder blocks, `n_decoder_layers` decoder blocks
    with cross-attention, one shared embedding)."""
    n_decoder_layers: int | None = None
    """encoder_decoder: decoder blocks; None means n_layers."""
    norm: str = "rms"
    """'rms' (RMSNorm, no bias: LLaMA, T5) or 'layer' (LayerNorm with bias: BERT)."""
    norm_position: str = "pre"
    """'pre' (normalize each sub-layer's input) or 'post' (normalize after the residual add,
    BERT; no final norm). An encoder normalizes its embeddings either way; pre-norm, its first
    block then skips its attention norm (ModernBERT)."""
    bias: bool = False
    """Biases in the attention and MLP projections and in LayerNorm (BERT)."""
    mlp: str = "swiglu"
    """'swiglu' (w2(silu(w1 x) * w3 x)), 'geglu' (ModernBERT: exact GELU gate), 'gated_gelu'
    (T5 v1.1: tanh GELU gate), 'gelu' (BERT: w2(gelu(w1 x))) or 'relu' (T5 v1.0)."""
    position: str = "rope"
    """'rope' (rotary), 'learned' (absolute position and token-type embeddings, BERT) or
    'relative' (T5's bucketed relative attention bias, shared by the blocks of a stack)."""
    head_dim: int | None = None
    """Per-head size; None means dim // n_heads (T5 sets it: d_kv)."""
    scale_attention: bool = True
    """Divide attention scores by sqrt(head_dim); T5 folds the scale into its init instead."""
    relative_buckets: int = 32
    """position=relative: number of relative-position buckets."""
    relative_max_distance: int = 128
    """position=relative: distance beyond which positions share the last bucket."""
    type_vocab_size: int = 2
    """position=learned: token-type (segment) embeddings, BERT's 2 (we always use type 0)."""
    dim: int = 256
    """Hidden size."""
    n_layers: int = 6
    """Number of transformer blocks."""
    n_heads: int = 8
    """Attention (query) heads."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means n_heads (multi-head)."""
    vocab_size: int = 8192
    """Vocabulary size; must equal the tokenizer's."""
    multiple_of: int = 256
    """SwiGLU hidden size is rounded up to a multiple of this."""
    ffn_dim_multiplier: float | None = None
    """Optional multiplier on the SwiGLU hidden size (Llama-2 70B / Llama-3 style)."""
    ffn_hidden_dim: int | None = None
    """Explicit SwiGLU hidden size; overrides multiple_of / ffn_dim_multiplier when set."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    rope_scaling_factor: float | None = None
    """Llama-3.1 style rotary frequency scaling factor; None disables scaling."""
    rope_low_freq_factor: float = 1.0
    """Llama-3.1 rotary scaling: low-frequency factor."""
    rope_high_freq_factor: float = 4.0
    """Llama-3.1 rotary scaling: high-frequency factor."""
    rope_original_max_seq_len: int = 8192
    """Llama-3.1 rotary scaling: context length the base model was trained with."""
    max_seq_len: int = 2048
    """Longest sequence the rotary table covers."""
    tie_embeddings: bool = False
    """Share the token embedding and output projection weights."""
    init_std: float = 0.02
    """Standard deviation of the normal initialization of weight matrices."""
    depth_init: bool = True
    """Scale output projections (wo, w2) by 1/sqrt(2 * (layer_id + 1)); else by 1/sqrt(2*L)."""


@dataclass
class DataConfig:
    """Where training tokens come from and how they are cut into windows."""

    name: str = "builtin"
    """Dataset name, used for cache directories and summaries."""
    source: str = "builtin"
    """'builtin' (the running Python's standard library sources), a local path or glob of
    .txt/.jsonl/.parquet files, or 'hf:NAME[:CONFIG]' for a hub dataset streamed with datasets."""
    text_field: str = "text"
    """Field holding the document text in .jsonl/.parquet/hub records."""
    split: str = "train"
    """Split of a hub dataset."""
    dir: str | None = None
    """Prepared shard directory; None means a cache directory derived from name and tokenizer."""
    tokenizer: str | None = None
    """SentencePiece model file; None trains one on the corpus (cached) on first use."""
    cache_dir: str = "${oc.env:PRETRAIN_CACHE,${oc.env:HOME}/.cache/pretrain}"
    """Where trained tokenizers and prepared shards are cached."""
    max_bytes: int = 8_000_000
    """Cap on corpus bytes read when preparing the built-in corpus (0: no cap)."""
    tokenizer_sample_bytes: int = 3_000_000
    """Bytes of the corpus sampled to train a tokenizer."""
    val_fraction: float = 0.02
    """Fraction of documents held out for validation."""
    shard_tokens: int = 1_048_576
    """Tokens per shard file."""
    prepare_workers: int = 2
    """Worker processes for tokenization."""
    num_workers: int = 0
    """Loader prefetch threads (0: read each batch in the training loop when it is asked for).
    The windows and the resume position are the same for every value."""
    prefetch: int = 2
    """Batches each loader thread prepares ahead."""
    pin_memory: bool = True
    """Prefetched batches go to pinned memory (CUDA only) for non-blocking copies."""
    dedup: bool = False
    """Drop documents whose text exactly equals an earlier one when preparing (counted)."""
    # Typed Any, not dict: Hydra refuses `data.mix={...}` (new keys) on a typed, empty dict.
    mix: Any = None
    """Several datasets mixed by weight, instead of `source`/`dir`: a mapping name -> {dir:
    prepared directory, or source: corpus (prepared into the cache like `source`), weight: w,
    and optionally text_field, split, max_bytes}, e.g. data.mix='{web: {dir: /d/web, weight:
    0.7}, code: {dir: /d/code, weight: 0.3}}'. Weights are normalized and may change on resume
    (each source keeps its position)."""
    document_masking: bool = False
    """Attention stays within each document of a packed window (block-diagonal causal mask)."""
    restart_positions: bool = False
    """Rotary positions restart at 0 at each document start (needs document_masking)."""
    allow_data_change: bool = False
    """Resume even when the checkpoint's data (shards, tokenizer, sources, seq_len) differ from
    the configured data; the saved position is kept per source."""


OBJECTIVES = ("clm", "mlm", "span", "fim", "sft")


@dataclass
class ObjectiveConfig:
    """What the model learns to predict. Corruption (masks, spans, FIM splits) is drawn from
    (seed, global window index): resume is exact, batches do not depend on the layout, and a
    window read again in a later epoch is corrupted anew."""

    name: str = "clm"
    """'clm' (next token, decoder), 'mlm' (masked LM, encoder), 'span' (T5 span corruption,
    encoder_decoder), 'fim' (fill-in-the-middle, decoder) or 'sft' (instruction fine-tuning
    of a decoder on chat JSONL from data.source; see pretrain/data/sft.py)."""
    mask_rate: float = 0.15
    """mlm: fraction of each window's tokens chosen for prediction (exactly
    round(rate * seq_len) per window, as BERT's max_predictions; never EOS/BOS/pad)."""
    mask_token_fraction: float = 0.8
    """mlm: of the chosen tokens, the fraction replaced by <mask> (BERT's 80%)."""
    random_token_fraction: float = 0.1
    """mlm: the fraction replaced by a random token (BERT's 10%); the rest stay unchanged."""
    noise_density: float = 0.15
    """span: fraction of the tokens that are corrupted (dropped into the target)."""
    mean_span_length: float = 3.0
    """span: mean length of a corrupted span; spans and their lengths follow T5's
    random_spans_noise_mask, and `seq_len` is the encoder input length (T5's inputs_length):
    the raw window is sized so that nothing is padded or cut."""
    fim_rate: float = 0.5
    """fim: probability that a document is transformed (Bavarian et al. 2022 use 0.5 to 0.9)."""
    fim_spm_rate: float = 0.5
    """fim: of the transformed documents, the fraction in SPM order (suffix, prefix, middle);
    the rest are PSM (prefix, suffix, middle)."""
    eval_infill_docs: int = 32
    """fim: held-out documents whose middle is infilled greedily for the exact-match metric
    (0: skip it)."""
    eval_infill_max_tokens: int = 24
    """fim: longest middle (in tokens) the infill exact-match metric asks for."""
    sft_val_source: str | None = None
    """sft: validation chat JSONL (file, directory or glob); None holds out data.val_fraction
    of data.source's conversations (at least one)."""
    sft_strict: bool = False
    """sft: the first bad record (invalid JSON, unknown role, empty conversation, no assistant
    message, a message longer than seq_len) is an error naming file and line; else bad records
    are counted and skipped."""
    sft_truncate: bool = True
    """sft: a conversation longer than seq_len + 1 tokens is cut after its last assistant
    message that fits (later messages dropped); false makes it a bad record."""


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not norms, not embeddings)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    schedule: str = "cosine"
    """'cosine' (warmup then cosine), 'wsd' (warmup-stable-decay) or 'constant'."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    decay_fraction: float = 0.2
    """wsd: fraction of the steps spent in the final linear decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    implementation: str = "auto"
    """'fused', 'foreach', 'for-loop', or 'auto' (fused on CPU and GPU, else foreach)."""


@dataclass
class ParallelConfig:
    """How the world is laid out (see pretrain/parallel)."""

    backend: str = "native"
    """'native' (torch.distributed: DDP/FSDP2/TP/PP) or 'deepspeed'."""
    dp_replicate: int = 1
    """Replicated data-parallel degree (DDP; with dp_shard > 1, HSDP)."""
    dp_shard: int = -1
    """Sharded data-parallel degree (FSDP2); -1 takes what the other degrees leave."""
    tp: int = 1
    """Tensor-parallel degree."""
    pp: int = 1
    """Pipeline-parallel degree."""
    sequence_parallel: bool = True
    """With tp > 1, shard norms and dropout activations along the sequence."""
    pp_schedule: str = "1F1B"
    """Pipeline schedule: GPipe, 1F1B, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble."""
    pp_microbatches: int | None = None
    """Pipeline micro-batches per step; None means the number of pipeline stages."""
    pp_virtual_stages: int = 1
    """Stages per pipeline rank (>1 for interleaved schedules)."""
    fsdp_reshard_after_forward: bool = True
    """FSDP2: free gathered parameters after forward (ZeRO-3) or keep them (ZeRO-2 like)."""
    fsdp_param_dtype: str = "bf16"
    """FSDP2 mixed precision: parameter dtype in compute ('bf16' or 'fp32')."""
    fsdp_reduce_dtype: str = "fp32"
    """FSDP2 mixed precision: gradient reduction dtype."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (1, 2 or 3) when backend is deepspeed."""
    deepspeed_extra: dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed config keys merged into the generated JSON."""
    timeout_s: int = 600
    """Collective timeout in seconds."""


@dataclass
class LoggingConfig:
    """Where metrics go."""

    wandb: bool = True
    """Log to Weights & Biases (offline unless the user has logged in)."""
    wandb_mode: str = "auto"
    """'auto' (online if an API key is configured, else offline), 'online', 'offline'."""
    project: str = "pretrain"
    """W&B project."""
    entity: str | None = None
    """W&B entity."""
    group: str | None = None
    """W&B group (sweeps set this)."""
    log_every: int = 10
    """Steps between console lines and metrics.jsonl records."""
    progress_bar: bool = True
    """Show a tqdm progress bar on rank 0."""


@dataclass
class LauncherConfig:
    """How `pretrain-launch` starts the per-rank entry (ignored by the entry itself)."""

    kind: str = "local"
    """'local' (one process, here), 'torchrun', 'deepspeed' or 'slurm'."""
    nproc_per_node: int = 1
    """Processes per node (GPUs per node)."""
    nnodes: int = 1
    """Number of nodes."""
    node_rank: int | None = None
    """This node's rank (static rendezvous); None uses the c10d rendezvous."""
    rdzv_endpoint: str = "localhost:29500"
    """host:port of the rendezvous (the first node) for multi-node torchrun."""
    rdzv_id: str = "pretrain"
    """Rendezvous id shared by every node of one job."""
    max_restarts: int = 0
    """torchrun: restart the whole job this many times after a rank fails."""
    hostfile: str | None = None
    """deepspeed: hostfile listing `host slots=N` lines."""
    include: str | None = None
    """deepspeed: hosts/devices to use, e.g. 'worker-0:0,1@worker-1'."""
    exclude: str | None = None
    """deepspeed: hosts/devices to skip."""
    master_port: int = 29500
    """deepspeed: port of the first host."""
    partition: str | None = None
    """slurm: partition."""
    account: str | None = None
    """slurm: account."""
    time: str = "24:00:00"
    """slurm: wall-time limit."""
    cpus_per_task: int = 8
    """slurm: CPUs per task (one task per node)."""
    gpus_per_node: int = 8
    """slurm: GPUs per node (--gpus-per-node)."""
    sbatch_extra: list[str] = field(default_factory=list)
    """slurm: extra `#SBATCH` lines, e.g. ['--qos=high']."""
    setup: list[str] = field(default_factory=list)
    """slurm: shell lines run before torchrun (module load, venv activation)."""
    dry_run: bool = False
    """Print the command (or sbatch script) instead of running it."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for the launched processes."""


@dataclass
class FaultInjectionConfig:
    """Deliberate faults for testing the fault-handling paths; all off by default."""

    crash_at_step: int | None = None
    """Hard-exit (like kill -9) right after this step, on the first attempt only."""
    crash_rank: int = 0
    """Rank that crashes."""
    crash_in_checkpoint_at_step: int | None = None
    """Hard-exit halfway through writing this step's checkpoint (first attempt only)."""
    nan_at_step: int | None = None
    """Make this step's loss NaN on `nan_rank`."""
    nan_rank: int = 0
    """Rank whose loss becomes NaN."""
    spike_at_step: int | None = None
    """Multiply this step's loss by 20 (a loss spike)."""
    signal_at_step: int | None = None
    """Send SIGTERM to this process after this step (first attempt only)."""


@dataclass
class LoraConfig:
    """Low-rank adapters (Hu et al. 2021) on chosen linear layers: W x + (alpha / rank) B A x,
    with the base weights frozen (no gradients, no optimizer state)."""

    rank: int = 0
    """Adapter rank r (0: no LoRA, the whole model trains)."""
    alpha: float = 16.0
    """Scale numerator: the adapter's output is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only)."""
    targets: list[str] = field(default_factory=lambda: ["wq", "wv"])
    """Linear layers that get adapters, by their module name: any of wq, wk, wv, wo, w1, w2, w3."""


@dataclass
class QuantConfig:
    """Quantization-aware training (torchao): fake-quantized linears while training, converted
    to the real quantized layers at the end."""

    qat: str | None = None
    """None (off) or a torchao QAT scheme: 'int8_dynamic_act_int4_weight' (int8 per-token
    dynamic activations, int4 weights in groups). The run writes the converted model to
    runs/NAME/quantized/ at the end."""
    group_size: int = 32
    """Weight quantization group size (int4 schemes)."""
    include_output: bool = False
    """QAT: fake-quantize (and convert) the output projection too, as torchao's Llama QAT
    recipes do; needs loss=full (the chunked loss multiplies by `output.weight` itself) and
    untied embeddings. Off: the output projection stays high precision (as in torchtitan)."""
    fp8_recipe: str = "tensorwise"
    """precision=fp8: torchao's float8 scaling, 'tensorwise' or 'rowwise'."""
    fp8_emulate: bool = False
    """precision=fp8 without fp8 hardware (CPU, GPUs below compute capability 8.9): torchao's
    emulation in high precision. For tests only: slower than bf16 and saves nothing."""


@dataclass
class EvalConfig:
    """How validation loss is computed."""

    stride: int | None = None
    """Sliding-window validation: windows of seq_len tokens that advance by `stride`, each
    token scored once with the most context it can have (the transformers perplexity guide's
    method). None: non-overlapping windows."""


@dataclass
class DownstreamEvalConfig:
    """Downstream tasks (multiple choice by log-likelihood, LAMBADA by greedy last word),
    scored during training on every rank's share, with one global result."""

    tasks: list[str] = field(default_factory=list)
    """Task names, e.g. [hellaswag, arc_easy, piqa, lambada] (empty: none)."""
    every: int = 0
    """Steps between downstream evaluations (0: only at the end of the run; a run also
    evaluates at its end unless preempted)."""
    data_dir: str | None = None
    """Directory holding the task files (see the README); None: hub names through `datasets`."""
    limit: int | None = None
    """Items per task (None: all)."""
    batch_size: int = 64
    """Choices scored per forward pass (whole items per row when they share a context; 64 was
    the fastest of 16/64/256 on the CPU main job). The logits are batch × context × vocab, so
    lower it for long contexts or large vocabularies."""
    window: int | None = None
    """Context window in tokens (longer contexts lose tokens on the left); None: seq_len."""


@dataclass
class TrainConfig:
    """The root config of one training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    evals: DownstreamEvalConfig = field(default_factory=DownstreamEvalConfig)

    run_name: str = "${default_run_name:}"
    """Run directory name under output_root; resume=auto looks for checkpoints there. The
    default is the torchrun run id when there is one (the same on every rank and restart),
    else the start time."""
    output_root: str = "runs"
    """Parent directory of run directories."""
    seed: int = 1234
    """Seed of model initialization, data order and sampling."""
    steps: int = 300
    """Optimizer steps."""
    tokens: int | None = None
    """Token budget; when set, steps = tokens // (global_batch_size * seq_len)."""
    flops_budget: float | None = None
    """Training FLOP budget C; when set, tokens = C / flops_per_token(model, seq_len) and steps
    follow as for `tokens` (IsoFLOP sweeps). Takes precedence over `tokens` and `steps`."""
    seq_len: int = 256
    """Training sequence length (tokens per window, excluding the shifted target)."""
    global_batch_size: int = 16
    """Sequences per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 16
    """Sequences per forward/backward on one rank; accumulation makes up the rest."""
    precision: str = "bf16"
    """'fp32', 'bf16' (autocast), 'fp16' (autocast with a loss scaler; GPU only) or 'fp8'
    (torchao float8 linears, `quant.fp8_recipe`, with bf16 autocast for the rest; GPUs of
    compute capability 8.9+)."""
    activation_checkpointing: str = "none"
    """'none', 'full' (recompute every block) or 'selective' (keep matmul outputs)."""
    compile: bool | None = None
    """torch.compile each transformer block. Default (null): on with CUDA and the native
    backend; off on CPU, where the main job ran slower compiled (4,182 vs 4,686 tokens/s;
    138 s vs 102 s wall with the cold compilation)."""
    loss: str = "auto"
    """Cross-entropy: 'chunked' (`linear_cross_entropy`: the output projection and the loss
    in chunks of tokens, never the full fp32 logits), 'full' (logits, then cross-entropy), or
    'auto': chunked where the output projection is whole on the rank that computes the loss
    (not with tensor or pipeline parallelism or the DeepSpeed backend), else full."""
    sdpa_backends: list[str] = field(default_factory=list)
    """Attention kernels SDPA may use, in priority order: flash, cudnn, efficient, math (an
    error at the first step if none of them takes the shape). Empty: on CUDA [flash,
    efficient, cudnn, math], math only where no fused kernel runs; on CPU PyTorch's choice."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu' or 'cuda'."""
    eval_every: int = 100
    """Steps between validation passes (0: only at the end)."""
    eval_windows: int = 64
    """Validation windows per evaluation, over all ranks: the first `eval_windows` windows of
    the validation split, the same set on every layout, so the validation loss of the same
    weights does not depend on the number of ranks or the micro-batch size."""
    ckpt_every: int = 100
    """Steps between checkpoints (0: only at the end)."""
    ckpt_keep: int = 2
    """Checkpoints to keep (the newest; 0 keeps all); `latest` is never deleted."""
    ckpt_every_s: float = 0.0
    """Also checkpoint when this many seconds passed since the last one (0: off)."""
    ckpt_async: bool = False
    """Write checkpoints in a background thread; training continues meanwhile."""
    init_from: str | None = None
    """Start from these weights instead of a random initialization: a local Hugging Face
    LLaMA directory (config.json, safetensors, tokenizer) or a checkpoint of ours. The model
    config comes from it; the optimizer and schedule start fresh. A resumable checkpoint in the
    run directory wins (the run resumes as any other)."""
    resume: str = "auto"
    """'auto' (latest good checkpoint in the run directory), 'none', or a checkpoint path."""
    time_limit_s: float = 0.0
    """Wall-time limit; when reached, checkpoint and stop (0: none)."""
    nonfinite_policy: str = "halt"
    """On a non-finite loss or gradient norm: 'halt' or 'skip' the step."""
    max_skips: int = 5
    """With nonfinite_policy=skip (or spike_policy=skip): halt after this many in a row."""
    spike_policy: str = "warn"
    """On a loss spike: 'none', 'warn', 'skip' the update, or 'rollback' to the last checkpoint
    and skip the batch that caused it."""
    spike_window: int = 50
    """Steps of loss history the spike detector compares against."""
    spike_threshold: float = 6.0
    """Standard deviations above the window mean that make a spike."""
    sample_prompts: list[str] = field(
        default_factory=lambda: ["def ", "import ", "class "]
    )
    """Prompts sampled from at the end of the run (empty: none)."""
    sample_tokens: int = 48
    """Tokens generated per sample."""
    faults: FaultInjectionConfig = field(default_factory=FaultInjectionConfig)
    """Fault injection (tests only)."""
    tags: dict[str, Any] = field(default_factory=dict)
    """Free-form key/values recorded in summary.json as `sweep` (sweeps set these)."""


def output_whole_on_one_rank(p: ParallelConfig) -> bool:
    """Whether the rank that computes the loss holds the whole output projection, which the
    chunked loss needs: not under tensor or pipeline parallelism or the DeepSpeed backend."""
    return p.tp == 1 and p.pp == 1 and p.backend == "native"


def uses_chunked_loss(loss: str, p: ParallelConfig) -> bool:
    """Whether `loss` ('auto', 'chunked', 'full') computes the chunked cross-entropy on layout
    `p`: 'auto' chooses it where one rank holds the whole output projection (validation has
    refused loss=chunked elsewhere)."""
    return loss == "chunked" or (loss == "auto" and output_whole_on_one_rank(p))


def default_run_name() -> str:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id != "none":
        return f"run-{run_id}"
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def register_configs() -> None:
    """Register the schema so `conf/train.yaml` and every preset are type-checked by Hydra."""
    if not OmegaConf.has_resolver("default_run_name"):
        OmegaConf.register_new_resolver("default_run_name", default_run_name, use_cache=True)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
