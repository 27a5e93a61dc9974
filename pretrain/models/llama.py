"""A LLaMA-style decoder as a plain single-device `nn.Module`, plus its parameter and FLOP counts.

Parallelism (FSDP2, tensor and pipeline parallel, DeepSpeed) is applied from outside; this file
imports nothing from `torch.distributed`. Module names are an API shared with pipeline stage
slicing, sharded checkpoints and the Hugging Face conversion (`pretrain/interop/hf.py`):

    tok_embeddings, layers.{i}.attention.{wq,wk,wv,wo}, layers.{i}.feed_forward.{w1,w2,w3},
    layers.{i}.attention_norm, layers.{i}.ffn_norm, norm, output

`layers` is an `nn.ModuleDict` keyed by `str(i)`. Pipeline parallelism deletes layers and sets
`tok_embeddings`, `norm` or `output` to None; `forward` then passes hidden states through.

Rotary convention: Hugging Face "rotate half" (the first and second halves of each head are the
two coordinates of a rotated pair), not Meta's interleaved pairs. Our wq/wk are therefore
exactly HF's q_proj/k_proj, with no permutation on conversion.

Lifecycle: build on the meta device (`build_model`), parallelize, `to_empty(device=...)`, then
`init_weights()` and `check_initialized()`. `init_weights` draws one base seed from the global
RNG (so it is reproducible under `torch.manual_seed`) and initializes every parameter from a
generator seeded by that base seed and the parameter's name, so a weight does not depend on
which other modules exist: a pipeline stage holding layers 4..7 gets the same weights as the
whole model does.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pretrain.config import ModelConfig
from pretrain.models.loss import linear_cross_entropy

__all__ = [
    "Attention",
    "FeedForward",
    "KVCache",
    "RMSNorm",
    "make_norm",
    "Transformer",
    "TransformerBlock",
    "apply_rotary",
    "build_model",
    "check_initialized",
    "count_params",
    "draw_init_seed",
    "ffn_hidden_dim",
    "flops_per_token",
    "rope_frequencies",
    "rope_table",
    "tie_output",
]


# ----------------------------------------------------------------------------------- shapes


def _kv_heads(cfg: ModelConfig) -> int:
    return cfg.n_kv_heads or cfg.n_heads


def _head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.dim // cfg.n_heads


GATED_MLPS = ("swiglu", "geglu", "gated_gelu")
"""MLP kinds with a gate matrix w3."""


def _gated(cfg: ModelConfig) -> bool:
    """Whether the MLP has a third (gate) matrix w3."""
    return cfg.mlp in GATED_MLPS


def ffn_hidden_dim(cfg: ModelConfig) -> int:
    """SwiGLU hidden size: the explicit `ffn_hidden_dim`, else Meta's LLaMA rule.

    The rule keeps the FFN's parameter count near a 4*dim MLP with three matrices instead of two
    (2/3 of 4*dim), optionally scaled by `ffn_dim_multiplier`, rounded up to `multiple_of`.
    """
    if cfg.ffn_hidden_dim is not None:
        return cfg.ffn_hidden_dim
    hidden = int(2 * 4 * cfg.dim / 3)
    if cfg.ffn_dim_multiplier is not None:
        hidden = int(cfg.ffn_dim_multiplier * hidden)
    return cfg.multiple_of * math.ceil(hidden / cfg.multiple_of)


def _block_matmul_params(cfg: ModelConfig) -> int:
    """Weights of the Linear layers of one block (wq, wk, wv, wo, w1, w2, w3)."""
    q_dim = cfg.n_heads * _head_dim(cfg)
    kv_dim = _kv_heads(cfg) * _head_dim(cfg)
    attention = cfg.dim * q_dim + 2 * cfg.dim * kv_dim + q_dim * cfg.dim
    return attention + (3 if _gated(cfg) else 2) * cfg.dim * ffn_hidden_dim(cfg)


def count_params(cfg: ModelConfig, *, exclude_embeddings: bool = False) -> int:
    """Exact parameter count of `Transformer(cfg)`, computed without building it.

    A tied embedding/output matrix is counted once. `exclude_embeddings=True` gives the
    Kaplan/Chinchilla "non-embedding" count: it drops the token embedding matrix (and with it
    the output matrix when they are tied); an untied output projection is a matmul that costs
    compute and stays in.
    """
    blocks = cfg.n_layers * (_block_matmul_params(cfg) + 2 * cfg.dim)  # + attention/ffn norms
    embedding = cfg.vocab_size * cfg.dim
    output = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    total = blocks + cfg.dim + output  # + final norm
    return total if exclude_embeddings else total + embedding


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) of one token at context length `seq_len`.

        flops = 6 * N_matmul + 12 * n_layers * dim * seq_len

    N_matmul counts every Linear weight, the output projection included (also when tied: the
    projection is a matmul even if its weight is shared); the embedding lookup is not a matmul
    and norms are negligible. 6 = 2 FLOPs per multiply-add times (1 forward + 2 backward). The
    attention term counts QK^T and AV (2 * 2 * n_layers * seq_len * dim per token forward, times
    3) without halving for the causal mask, the PaLM appendix-B convention used for MFU.
    """
    n_matmul = cfg.n_layers * _block_matmul_params(cfg) + cfg.vocab_size * cfg.dim
    return 6.0 * n_matmul + 12.0 * cfg.n_layers * cfg.dim * seq_len


# ------------------------------------------------------------------------------------- init


def _child_seed(seed: int | None, name: str) -> int | None:
    """A seed for the submodule or parameter `name`, stable across processes and Python runs
    (unlike `hash`), so weights depend only on the base seed and the name."""
    if seed is None:
        return None
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # manual_seed needs < 2**63


def draw_init_seed() -> int:
    """The base seed `Transformer.init_weights` draws from the global RNG when given none."""
    return int(torch.randint(0, 2**62, (1,)).item())


def _fill_normal_(t: Tensor, std: float, truncate: bool, generator: torch.Generator | None) -> None:
    if truncate:
        nn.init.trunc_normal_(t, 0.0, std, -3 * std, 3 * std, generator=generator)
    else:
        nn.init.normal_(t, 0.0, std, generator=generator)


def _normal_(weight: Tensor, std: float, seed: int | None, *, truncate: bool = False) -> None:
    """Fill `weight` from N(0, std^2) (cut at +-3 std if `truncate`): from the global RNG when
    `seed` is None, else from a CPU generator in fp32, so a seed gives the same weights on
    every device and in every parameter dtype (GPU generators draw other numbers)."""
    with torch.no_grad():
        if seed is None:
            _fill_normal_(weight, std, truncate, None)
            return
        generator = torch.Generator().manual_seed(seed)
        if weight.device.type == "cpu" and weight.dtype == torch.float32:
            _fill_normal_(weight, std, truncate, generator)
            return
        values = torch.empty(weight.shape, dtype=torch.float32)
        _fill_normal_(values, std, truncate, generator)
        weight.copy_(values)


# ------------------------------------------------------------------------------------- RoPE


def rope_frequencies(cfg: ModelConfig) -> Tensor:
    """Rotary inverse frequencies, (head_dim // 2,) fp32, with Llama-3.1 scaling when set.

    Llama-3.1 scaling keeps high frequencies (wavelength < original / high_freq_factor), divides
    low frequencies (wavelength > original / low_freq_factor) by the factor, and interpolates
    smoothly in between, so a model trained at `rope_original_max_seq_len` extends its context.
    """
    head_dim = _head_dim(cfg)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / cfg.rope_theta**exponents
    if cfg.rope_scaling_factor is None:
        return inv_freq
    factor, old_len = cfg.rope_scaling_factor, cfg.rope_original_max_seq_len
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, interpolated, scaled)


def rope_table(cfg: ModelConfig, device: torch.device | str | None = None) -> Tensor:
    """cos and sin of every position's rotation angles: (max_seq_len, head_dim) fp32, the first
    half holding cos and the second half sin (one buffer keeps sharding and `to_empty` simple)."""
    inv_freq = rope_frequencies(cfg).to(device)
    positions = torch.arange(cfg.max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)  # (max_seq_len, head_dim // 2)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def apply_rotary(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate query/key heads, HF "rotate half" convention.

    x: (B, T, n_heads, head_dim); rope: (B or 1, T, 1, head_dim) rows of `rope_table`.
    The pair (x[..., i], x[..., i + head_dim/2]) is rotated by angle i. Computed in fp32 and cast
    back (as Meta's reference does): bf16 products would blur the phase at long positions.
    """
    cos, sin = rope.float().chunk(2, dim=-1)  # (B|1, T, 1, head_dim // 2) each
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, T, H, head_dim // 2) each
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return rotated.type_as(x)


# --------------------------------------------------------------------------------- KV cache


class KVCache:
    """Pre-allocated keys and values of every layer for incremental decoding (batch of B).

    Keys are stored after rotation, with n_kv_heads (not repeated for GQA). Layers write at
    `length` during a forward; `Transformer.forward` advances `length` once all layers ran.
    A batch of left-padded prompts sets `key_mask`, so that no query attends a padding slot
    (their rotary positions come from `Transformer.forward`'s `positions`).
    """

    def __init__(
        self,
        *,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0
        self.key_mask: Tensor | None = None
        """(B, max_len) bool, False at padding slots; None: every slot holds a token."""

    @classmethod
    def for_model(cls, model: Transformer, batch_size: int, max_len: int | None = None) -> KVCache:
        """A cache matching `model`'s shape, device and parameter dtype."""
        cfg = model.config
        param = next(model.parameters())
        # An encoder-decoder caches its decoder's self-attention.
        stack = getattr(model, "decoder_layers", None) or model.layers
        return cls(
            n_layers=len(stack),
            batch_size=batch_size,
            n_kv_heads=_kv_heads(cfg),
            head_dim=_head_dim(cfg),
            max_len=max_len or cfg.max_seq_len,
            device=param.device,
            dtype=param.dtype,
        )

    def update(self, layer_id: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, n_kv_heads, T, head_dim) at the current length; return all keys and
        values so far, (B, n_kv_heads, length + T, head_dim)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache holds {self.max_len} positions; {end} requested")
        self.k[layer_id][:, :, self.length : end] = k
        self.v[layer_id][:, :, self.length : end] = v
        return self.k[layer_id][:, :, :end], self.v[layer_id][:, :, :end]

    def attn_mask(self, n_new: int, device: torch.device) -> Tensor | None:
        """Causal mask of `n_new` queries over all cached keys, (n_new, length + n_new) bool, or
        None for an empty cache (then the plain causal mask applies). SDPA's own is_causal would
        align the mask to the top-left corner, which is wrong once keys outnumber queries.
        With a `key_mask`: (B, 1, n_new, length + n_new), padding keys masked."""
        if self.length == 0 and self.key_mask is None:
            return None
        query_pos = torch.arange(n_new, device=device)[:, None] + self.length
        key_pos = torch.arange(self.length + n_new, device=device)[None, :]
        causal = key_pos <= query_pos
        if self.key_mask is None:
            return causal
        # A padding query still sees itself: a row with no key at all would make SDPA's
        # softmax NaN, and a NaN value times a zero weight poisons the real rows too.
        keys = self.key_mask[:, None, : self.length + n_new] | (key_pos == query_pos)[None]
        return (causal[None] & keys)[:, None]  # (B, 1, n_new, length + n_new)

    def keep_rows(self, rows: Tensor) -> None:
        """Keep only the batch rows `rows` (long indices): finished sequences drop out."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]
        if self.key_mask is not None:
            self.key_mask = self.key_mask[rows]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0


# ---------------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale and no bias."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # fp32 statistics: a bf16 mean of squares is too coarse for the residual stream.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.ones_(self.weight)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The block's normalization: RMSNorm (LLaMA, T5) or LayerNorm, with a bias when the
    projections have one (BERT) and without (ModernBERT)."""
    if cfg.norm == "layer":
        return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.bias)
    return RMSNorm(cfg.dim, cfg.norm_eps)


def _zero_bias_(linear: nn.Linear) -> None:
    if linear.bias is not None:
        with torch.no_grad():
            linear.bias.zero_()


class Attention(nn.Module):
    """Multi-head attention with grouped-query K/V heads, through PyTorch SDPA: causal
    (decoder) or bidirectional (encoder) self-attention, or cross-attention to an encoder's
    output (`memory`). Rotary positions apply to self-attention with position=rope; T5's
    relative bias arrives as an additive float `attn_mask`."""

    def __init__(self, cfg: ModelConfig, layer_id: int, *, causal: bool = True,
                 cross: bool = False) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = _head_dim(cfg)
        self.causal, self.cross = causal and not cross, cross
        self.rotary = cfg.position == "rope" and not cross
        # None: SDPA's 1/sqrt(head_dim); T5 does not scale (its init of wq does instead).
        self.scale = None if cfg.scale_attention else 1.0
        q_dim, kv_dim = cfg.n_heads * self.head_dim, _kv_heads(cfg) * self.head_dim
        self.wq = nn.Linear(cfg.dim, q_dim, bias=cfg.bias)
        self.wk = nn.Linear(cfg.dim, kv_dim, bias=cfg.bias)
        self.wv = nn.Linear(cfg.dim, kv_dim, bias=cfg.bias)
        self.wo = nn.Linear(q_dim, cfg.dim, bias=cfg.bias)

    def forward(
        self,
        x: Tensor,
        rope: Tensor | None,
        attn_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
        memory: Tensor | tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """x: (B, T, dim); attn_mask: bool (True = attend) or float (added to the scores),
        broadcastable to (B, H, T, S), or None for plain causal (decoder) or full (encoder,
        cross) attention. memory: cross-attention keys come from the encoder output (B, S, dim)
        or its precomputed (k, v) (`memory_kv`, reused at every decoding step)."""
        B, T, _ = x.shape
        # -1 heads: under tensor parallelism this module sees only its local heads.
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, n_heads, head_dim)
        if self.cross:
            assert memory is not None, "cross-attention needs the encoder output"
            k, v = memory if isinstance(memory, tuple) else self.memory_kv(memory)
            q = q.transpose(1, 2)  # (B, n_heads, T, head_dim)
        else:
            k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, n_kv_heads, head_dim)
            v = self.wv(x).view(B, T, -1, self.head_dim)  # (B, T, n_kv_heads, head_dim)
            if self.rotary:
                q, k = apply_rotary(q, rope), apply_rotary(k, rope)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
            if kv_cache is not None:
                k, v = kv_cache.update(self.layer_id, k, v)  # (B, n_kv_heads, S, head_dim)
        out = _sdpa(q, k, v, attn_mask, causal=self.causal, scale=self.scale)  # (B, H, T, hd)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def memory_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values of the encoder output memory (B, S, dim):
        (B, n_kv_heads, S, head_dim) each."""
        B, S, _ = memory.shape
        k = self.wk(memory).view(B, S, -1, self.head_dim).transpose(1, 2)
        v = self.wv(memory).view(B, S, -1, self.head_dim).transpose(1, 2)
        return k, v

    def init_weights(self, init_std: float, out_std: float, *, seed: int | None = None) -> None:
        # Without the 1/sqrt(head_dim) score scale, a smaller wq keeps the start's scores at
        # the same size (T5's "Mesh TensorFlow" initialization).
        q_std = init_std if self.scale is None else init_std / math.sqrt(self.head_dim)
        _normal_(self.wq.weight, q_std, _child_seed(seed, "wq"))
        for name in ("wk", "wv"):
            _normal_(getattr(self, name).weight, init_std, _child_seed(seed, name))
        _normal_(self.wo.weight, out_std, _child_seed(seed, "wo"))
        for linear in (self.wq, self.wk, self.wv, self.wo):
            _zero_bias_(linear)


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, n_kv_heads, S, head_dim) -> (B, n_kv_heads * n_rep, S, head_dim), each KV head
    serving n_rep consecutive query heads."""
    if n_rep == 1:
        return x
    B, H, S, D = x.shape
    return x[:, :, None].expand(B, H, n_rep, S, D).reshape(B, H * n_rep, S, D)


SDPA_KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
CUDA_SDPA_DEFAULT = ("flash", "efficient", "cudnn", "math")
"""Flash for causal attention (the training case), memory-efficient where flash cannot run
(document masks, fp32, GQA with repeated heads), then cuDNN; the math kernel, which holds the
(T, T) scores, only where no fused kernel takes the shape (a head dim that is not a multiple
of 8). List `sdpa_backends` without math to make that case an error instead."""


def attention_backends(names: Sequence[str], device_type: str) -> AbstractContextManager:
    """Restrict SDPA to `names` in that priority order (an error, not a silent fallback, if
    none can run). Empty: `CUDA_SDPA_DEFAULT` on CUDA, PyTorch's own choice elsewhere (the
    CPU has one fused kernel, flash, and math). Wrap backward too: activation checkpointing
    recomputes attention there and must pick the kernel the forward used."""
    if not names:
        if device_type != "cuda":
            return nullcontext()
        names = CUDA_SDPA_DEFAULT
    return sdpa_kernel([SDPA_KERNELS[n] for n in names], set_priority=True)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, *, causal: bool = True,
          scale: float | None = None) -> Tensor:
    """Attention of q (B, H, T, D) over k, v (B, H_kv, S, D); causal when attn_mask is None
    and `causal` (a decoder), over every key when not (an encoder, cross-attention).

    SDPA's enable_gqa avoids materializing repeated K/V, but on CUDA only the flash and math
    kernels support it; flash needs half precision and no explicit mask, so other cases
    (fp32, document masks, decoding) repeat the KV heads and keep the efficient kernels. The
    CPU flash kernel takes enable_gqa in every dtype (fp32 attention ~10% faster than with
    repeated heads, bench15m shapes).
    """
    n_rep = q.shape[1] // k.shape[1]
    gqa_ok = q.device.type == "cpu" or q.dtype in (torch.float16, torch.bfloat16)
    if attn_mask is None and (n_rep == 1 or gqa_ok):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=n_rep > 1,
                                              scale=scale)
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    if attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    if attn_mask.is_floating_point() and attn_mask.requires_grad:
        return _biased_attention(q, k, v, attn_mask, scale)
    if attn_mask.is_floating_point():
        attn_mask = attn_mask.to(q.dtype)  # SDPA wants the query's dtype (autocast: bf16)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False,
                                          scale=scale)


_ACTIVATIONS = {
    "swiglu": F.silu,
    "geglu": F.gelu,  # ModernBERT's exact (erf) GELU gate
    "gated_gelu": lambda x: F.gelu(x, approximate="tanh"),  # T5 v1.1's gelu_new
    "gelu": F.gelu,  # BERT's exact (erf) GELU
    "relu": F.relu,
}


def _biased_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor,
                      scale: float | None) -> Tensor:
    """softmax(q k^T * scale + bias) v with a learned additive bias (T5's relative positions),
    written out: no fused kernel takes a bias that needs a gradient, and SDPA's fallback on the
    CPU upcasts q, k and v to fp32, so its matmuls ran ~2x slower than these (bf16 under
    autocast). q (B, H, T, D), k and v (B, H, S, D), bias broadcastable to (B, H, T, S)."""
    scores = q @ k.transpose(-1, -2)  # (B, H, T, S)
    if scale is None:
        scores = scores * q.shape[-1] ** -0.5
    elif scale != 1.0:
        scores = scores * scale
    return torch.softmax(scores + bias.to(scores.dtype), dim=-1).to(v.dtype) @ v


class FeedForward(nn.Module):
    """The MLP: gated w2(act(w1 x) * w3 x) (SwiGLU, T5 v1.1's gated GELU), or plain
    w2(act(w1 x)) (BERT's GELU, T5 v1.0's ReLU), with or without biases."""

    def __init__(self, dim: int, hidden_dim: int, *, kind: str = "swiglu",
                 bias: bool = False) -> None:
        super().__init__()
        self.act = _ACTIVATIONS[kind]
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias) if kind in GATED_MLPS else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.w1(x))
        return self.w2(h * self.w3(x) if self.w3 is not None else h)

    def init_weights(self, init_std: float, out_std: float, *, seed: int | None = None) -> None:
        _normal_(self.w1.weight, init_std, _child_seed(seed, "w1"))
        if self.w3 is not None:
            _normal_(self.w3.weight, init_std, _child_seed(seed, "w3"))
        _normal_(self.w2.weight, out_std, _child_seed(seed, "w2"))
        for linear in (self.w1, self.w2, self.w3):
            if linear is not None:
                _zero_bias_(linear)


class TransformerBlock(nn.Module):
    """Residual block: self-attention, cross-attention to an encoder's output (`cross`, the
    decoder of an encoder-decoder), then the MLP; each sub-layer pre-norm (LLaMA, T5:
    x + f(norm(x))) or post-norm (BERT: norm(x + f(x)))."""

    def __init__(self, cfg: ModelConfig, layer_id: int, *, causal: bool = True,
                 cross: bool = False) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.post_norm = cfg.norm_position == "post"
        self.attention = Attention(cfg, layer_id, causal=causal)
        if cross:
            self.cross_attention = Attention(cfg, layer_id, cross=True)
            self.cross_attention_norm = make_norm(cfg)
        else:
            self.cross_attention, self.cross_attention_norm = None, None
        self.feed_forward = FeedForward(cfg.dim, ffn_hidden_dim(cfg), kind=cfg.mlp, bias=cfg.bias)
        self.attention_norm = make_norm(cfg)
        self.ffn_norm = make_norm(cfg)
        self.init_std = cfg.init_std
        # Output projections add into the residual stream once per block; shrinking them keeps
        # the stream's variance from growing with depth (GPT-2 / torchtitan).
        depth = 2 * (layer_id + 1) if cfg.depth_init else 2 * cfg.n_layers
        self.out_std = cfg.init_std / math.sqrt(depth)

    def forward(
        self,
        x: Tensor,
        rope: Tensor | None,
        attn_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
        memory: Tensor | tuple[Tensor, Tensor] | None = None,
        memory_mask: Tensor | None = None,
    ) -> Tensor:
        """memory / memory_mask: the encoder output (or this block's precomputed cross K/V)
        and its mask, for a block with cross-attention."""
        if self.post_norm:
            h = self.attention_norm(x + self.attention(x, rope, attn_mask, kv_cache))
            if self.cross_attention is not None:
                h = self.cross_attention_norm(
                    h + self.cross_attention(h, None, memory_mask, memory=memory))
            return self.ffn_norm(h + self.feed_forward(h))
        h = x + self.attention(self.attention_norm(x), rope, attn_mask, kv_cache)
        if self.cross_attention is not None:
            h = h + self.cross_attention(self.cross_attention_norm(h), None, memory_mask,
                                         memory=memory)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self, *, seed: int | None = None) -> None:
        """wq/wk/wv/w1/w3 ~ N(0, init_std); wo/w2 ~ N(0, out_std); biases 0; norms = 1."""
        std, out_std = self.init_std, self.out_std
        self.attention.init_weights(std, out_std, seed=_child_seed(seed, "attention"))
        if self.cross_attention is not None:
            self.cross_attention.init_weights(std, out_std,
                                              seed=_child_seed(seed, "cross_attention"))
            self.cross_attention_norm.reset_parameters()
        self.feed_forward.init_weights(std, out_std, seed=_child_seed(seed, "feed_forward"))
        if not isinstance(self.attention_norm, nn.Identity):  # an encoder's first block
            self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()


class Transformer(nn.Module):
    """The decoder: embeddings, `n_layers` blocks, final norm, output projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i) for i in range(cfg.n_layers)})
        self.norm: nn.Module | None = make_norm(cfg)
        self.output: nn.Linear | None = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.compile_loss = False
        """Run the chunked loss's element-wise work as compiled kernels (set with compile)."""
        # Not persistent: it is a function of the config, recomputed by init_weights.
        self.register_buffer("rope_cache", rope_table(cfg), persistent=False)

    def forward(
        self,
        tokens: Tensor,
        *,
        positions: Tensor | None = None,
        attn_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_hidden: bool = False,
        targets: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, T, vocab_size), or hidden states (B, T, dim) on a pipeline stage
        without `output` or with `return_hidden`, or with `targets` the mean loss.

        tokens: (B, T) ids, or (B, T, dim) hidden states on a stage without `tok_embeddings`.
        positions: (B, T) or (T,) rotary positions; default 0..T-1 (after the cache's length
            with a cache). Restarting them per document goes with a block-diagonal attn_mask.
        attn_mask: (B, 1, T, T) bool, True = attend; replaces the causal mask (then it must be
            causal itself). Not supported together with a cache.
        kv_cache: decode incrementally: T new tokens attend to the cached ones, and the cache
            advances by T.
        return_hidden: stop after the final norm, for a loss that applies `output` itself
            without materializing the logits (`pretrain.models.loss.linear_cross_entropy`).
        targets: (B, T) next-token ids: return their mean cross-entropy (fp32 scalar), computed
            by `linear_cross_entropy` in chunks of tokens, so the full logits never exist. It
            runs inside this forward so that a wrapper that gathers `output.weight` around the
            forward (FSDP) has it whole here.
        """
        T = tokens.shape[1]
        start = 0
        if kv_cache is not None:
            if attn_mask is not None:
                raise ValueError("attn_mask and kv_cache cannot be combined")
            start = kv_cache.length
            attn_mask = kv_cache.attn_mask(T, tokens.device)
        rope = self._rope(positions, start, T)
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values():
            h = layer(h, rope, attn_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        h = self.norm(h) if self.norm is not None else h
        if targets is not None:
            return linear_cross_entropy(h, self.output.weight, targets,
                                        compile=self.compile_loss)
        return self.output(h) if self.output is not None and not return_hidden else h

    def _rope(self, positions: Tensor | None, start: int, T: int) -> Tensor:
        """Rows of the rotary table for the given positions, (B or 1, T, 1, head_dim)."""
        if positions is None:
            if start + T > self.rope_cache.shape[0]:
                raise ValueError(
                    f"sequence of {start + T} positions exceeds model.max_seq_len="
                    f"{self.rope_cache.shape[0]}; raise max_seq_len or shorten the input"
                )
            return self.rope_cache[start : start + T][None, :, None, :]
        rope = self.rope_cache[positions]  # (T, head_dim) or (B, T, head_dim)
        return rope[None, :, None, :] if positions.dim() == 1 else rope[:, :, None, :]

    def init_weights(
        self, buffer_device: torch.device | None = None, *, seed: int | None = None
    ) -> None:
        """Initialize every parameter and the rotary table, in place.

        tok_embeddings ~ N(0, init_std); block weights as in `TransformerBlock.init_weights`;
        norms = 1; an untied output ~ N(0, dim^-0.5) cut at +-3 std (torchtitan), which starts
        the logits at unit scale (the final norm gives unit-RMS features). A tied output is the
        embedding matrix. `seed` None draws the base seed from the global RNG, so the result is
        fixed by `torch.manual_seed`. `buffer_device` places the rotary table (e.g. on the
        GPU when parameters stay on the CPU for offloading); default: where it already is.
        """
        cfg = self.config
        if seed is None:
            seed = draw_init_seed()
        device = buffer_device or self.rope_cache.device
        self.rope_cache = rope_table(cfg, device=device)
        self.tie_weights()
        if self.tok_embeddings is not None:
            _normal_(self.tok_embeddings.weight, cfg.init_std, _child_seed(seed, "tok_embeddings"))
        for name, layer in self.layers.items():
            layer.init_weights(seed=_child_seed(seed, f"layers.{name}"))
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None and cfg.tie_embeddings and self.tok_embeddings is None:
            # A last pipeline stage holds the shared matrix alone: give it the embedding's values.
            _normal_(self.output.weight, cfg.init_std, _child_seed(seed, "tok_embeddings"))
        elif self.output is not None and not cfg.tie_embeddings:
            std = cfg.dim**-0.5
            _normal_(self.output.weight, std, _child_seed(seed, "output"), truncate=True)

    def tie_weights(self) -> None:
        """`to_empty` from the meta device allocates each module's parameters separately and so
        unties shared weights; restore the tie (before initializing, or before copying
        weights in)."""
        tie_output(self)


def tie_output(model: nn.Module) -> None:
    """Make `model.output.weight` `model.tok_embeddings.weight` again when the config ties
    them and the part holds both (every family: `to_empty` allocates them separately)."""
    embeddings, output = model.tok_embeddings, model.output
    if model.config.tie_embeddings and embeddings is not None and output is not None:
        if output.weight is not embeddings.weight:
            output.weight = embeddings.weight


def check_initialized(model: nn.Module) -> None:
    """Raise if any parameter or buffer is on the meta device or holds NaN/inf (what
    `to_empty` leaves behind when an `init_weights` misses something), or if a tied model lost
    its tie."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            if tensor.is_meta:
                raise RuntimeError(f"{kind} {name} is still on the meta device")
            if not torch.isfinite(tensor).all():
                raise RuntimeError(f"{kind} {name} holds NaN/inf: it was not initialized")
    if isinstance(model, Transformer) and model.config.tie_embeddings:
        if model.tok_embeddings is not None and model.output is not None:
            if model.output.weight is not model.tok_embeddings.weight:
                raise RuntimeError("output.weight is no longer tok_embeddings.weight; "
                                   "call init_weights() after to_empty()")


def build_model(cfg: ModelConfig, *, device: str | torch.device = "meta") -> Transformer:
    """Build `Transformer(cfg)` on `device`. On the meta device (the default) nothing is
    allocated: parallelize, `to_empty`, then `init_weights`. On a real device the model comes
    back initialized (`init_weights()` with the global RNG)."""
    with torch.device(device):
        model = Transformer(cfg)
    if torch.device(device).type != "meta":
        model.init_weights()
    return model
