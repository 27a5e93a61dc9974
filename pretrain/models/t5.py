"""An encoder-decoder (T5), built from the decoder's blocks.

The encoder's blocks are `TransformerBlock(causal=False)`, the decoder's
`TransformerBlock(cross=True)`: causal self-attention, cross-attention to the encoder output,
then the MLP, all pre-norm RMSNorm without biases. Positions are T5's bucketed relative
attention bias, one table per stack, computed once per forward and added to every block's
scores (`position=relative`); scores are not scaled (`scale_attention=false`). Module names:

    tok_embeddings (shared by both stacks), relative_bias, layers.{i}.*, norm,
    decoder_relative_bias, decoder_layers.{i}.* (with cross_attention.*), decoder_norm, output

With tied embeddings (T5 v1.0) the decoder output is scaled by dim**-0.5 before the shared
projection, as in T5; T5 v1.1 unties them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.config import ModelConfig
from pretrain.models.llama import (
    KVCache,
    TransformerBlock,
    _child_seed,
    _normal_,
    draw_init_seed,
    make_norm,
    tie_output,
)
from pretrain.models.loss import linear_cross_entropy


def relative_buckets(relative: Tensor, *, bidirectional: bool, n_buckets: int,
                     max_distance: int) -> Tensor:
    """T5's bucket of each relative position (key position - query position), int64.

    Half the buckets (all of them one-way) are exact distances 0..n/2-1; the rest grow
    logarithmically up to `max_distance`, beyond which distances share the last bucket. In
    both directions the first half is for keys before (or at) the query, the second half for
    keys after it; one-way (the decoder) only looks back.
    """
    bucket = torch.zeros_like(relative)
    if bidirectional:
        n_buckets //= 2
        bucket = bucket + (relative > 0).long() * n_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = n_buckets // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    far = exact + (log_ratio * (n_buckets - exact)).long()
    far = far.clamp(max=n_buckets - 1)
    return bucket + torch.where(distance < exact, distance, far)


EMBEDDING_STD = 1.0
"""T5 draws its shared embedding from N(0, 1): the tied output divides by sqrt(dim), so the
first logits have unit scale. At the decoder's 0.02 they start ~50x smaller and learn slowly:
the CPU main job (`objective=span model=cpu_t5`, lr 2e-3) stood at validation loss 5.90 after
400 steps, against 5.30 with N(0, 1)."""


class RelativeBias(nn.Module):
    """A learned scalar per (bucket, head), added to the attention scores."""

    def __init__(self, cfg: ModelConfig, *, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.n_buckets, self.max_distance = cfg.relative_buckets, cfg.relative_max_distance
        self.weight = nn.Parameter(torch.empty(cfg.relative_buckets, cfg.n_heads))

    def forward(self, n_queries: int, n_keys: int, *, start: int = 0) -> Tensor:
        """(1, n_heads, n_queries, n_keys) fp32 bias of queries at positions start.. over keys
        at 0..n_keys-1.

        The bias depends only on key - query, so it is looked up once per offset, (Q + K - 1,
        H), and the (Q, K) grid is a strided view of that: its backward sums Q + K - 1 rows
        instead of scattering Q x K of them (25 -> 1.5 ms a step for cpu_t5 at 512 tokens).
        """
        device = self.weight.device
        # Offsets key - query from the last query's view of key 0 to the first's of the last key.
        offsets = torch.arange(-(start + n_queries - 1), n_keys - start, device=device)
        buckets = relative_buckets(offsets, bidirectional=self.bidirectional,
                                   n_buckets=self.n_buckets, max_distance=self.max_distance)
        per_offset = F.embedding(buckets, self.weight.float()).t()  # (H, Q + K - 1)
        # Window i holds offsets i - (Q - 1) ..: query Q - 1 - i's row; flip to query order.
        return per_offset.unfold(1, n_keys, 1).flip(1)[None]  # (1, H, Q, K)

    def reset_parameters(self, std: float, seed: int | None) -> None:
        _normal_(self.weight, std, seed)


class EncoderDecoder(nn.Module):
    """Shared embeddings, an encoder stack, a decoder stack with cross-attention, an LM head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        n_dec = cfg.n_decoder_layers or cfg.n_layers
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.relative_bias = RelativeBias(cfg, bidirectional=True)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(cfg, i, causal=False) for i in range(cfg.n_layers)})
        self.norm = make_norm(cfg)
        self.decoder_relative_bias = RelativeBias(cfg, bidirectional=False)
        self.decoder_layers = nn.ModuleDict(
            {str(i): TransformerBlock(cfg, i, cross=True) for i in range(n_dec)})
        self.decoder_norm = make_norm(cfg)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.compile_loss = False
        """Run the chunked loss's element-wise work as compiled kernels (set with compile)."""

    @property
    def output_scale(self) -> float:
        """T5 scales the decoder output by dim**-0.5 when the projection is the embedding."""
        return self.config.dim**-0.5 if self.config.tie_embeddings else 1.0

    def encode(self, tokens: Tensor, *, attn_mask: Tensor | None = None) -> Tensor:
        """Encoder output (B, S, dim) of tokens (B, S); attn_mask (B, 1, 1, S) bool marks the
        keys to attend to (padding excluded), default all."""
        S = tokens.shape[1]
        bias = self.relative_bias(S, S)  # (1, H, S, S)
        if attn_mask is not None:
            bias = bias.masked_fill(~attn_mask, float("-inf"))
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, None, bias)
        return self.norm(h)

    def decode(self, decoder_inputs: Tensor, memory: Tensor | list[tuple[Tensor, Tensor]], *,
               memory_mask: Tensor | None = None, kv_cache: KVCache | None = None) -> Tensor:
        """Final decoder hidden states (B, T, dim), before the output scale.

        memory: the encoder output (B, S, dim), or each decoder block's cross-attention (k, v)
        from `memory_kv` (computed once for a whole generation). kv_cache: decode T new tokens
        after the cached ones and advance the cache.
        """
        T = decoder_inputs.shape[1]
        start = kv_cache.length if kv_cache is not None else 0
        bias = self.decoder_relative_bias(T, start + T, start=start)  # (1, H, T, start + T)
        queries = torch.arange(start, start + T, device=bias.device)[:, None]
        causal = torch.arange(start + T, device=bias.device)[None, :] <= queries
        bias = bias.masked_fill(~causal, float("-inf"))
        cross_mask = None
        if memory_mask is not None:  # (B, 1, 1, S) bool -> additive
            cross_mask = torch.zeros(memory_mask.shape, device=bias.device).masked_fill(
                ~memory_mask, float("-inf"))
        h = self.tok_embeddings(decoder_inputs)
        for i, layer in enumerate(self.decoder_layers.values()):
            mem = memory[i] if isinstance(memory, list) else memory
            h = layer(h, None, bias, kv_cache, mem, cross_mask)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.decoder_norm(h)

    def memory_kv(self, memory: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Each decoder block's cross-attention keys and values of the encoder output."""
        return [layer.cross_attention.memory_kv(memory) for layer in self.decoder_layers.values()]

    def forward(self, tokens: Tensor, *, decoder_inputs: Tensor, targets: Tensor | None = None,
                attn_mask: Tensor | None = None) -> Tensor:
        """Logits (B, T, vocab_size) of the decoder inputs given the encoder inputs `tokens`,
        or with `targets` (B, T) their mean cross-entropy, computed in chunks of tokens
        (`linear_cross_entropy`) so the full logits never exist."""
        memory = self.encode(tokens, attn_mask=attn_mask)
        h = self.decode(decoder_inputs, memory, memory_mask=attn_mask)
        if self.output_scale != 1.0:
            h = h * self.output_scale
        if targets is not None:
            return linear_cross_entropy(h, self.output.weight, targets, compile=self.compile_loss)
        return self.output(h)

    def init_weights(self, buffer_device: torch.device | None = None, *,
                     seed: int | None = None) -> None:
        """Embedding ~ N(0, 1) (T5), relative biases ~ N(0, init_std), blocks as the decoder's
        (wq scaled down by sqrt(head_dim): T5's unscaled attention), norms 1; an untied output
        ~ N(0, dim^-0.5) cut at +-3 std. Seeded per name."""
        cfg = self.config
        if seed is None:
            seed = draw_init_seed()
        self.tie_weights()
        if self.tok_embeddings is not None:
            _normal_(self.tok_embeddings.weight, EMBEDDING_STD, _child_seed(seed, "tok_embeddings"))
        for name in ("relative_bias", "decoder_relative_bias"):
            module = getattr(self, name)
            if module is not None:
                module.reset_parameters(cfg.init_std, _child_seed(seed, name))
        for name in ("norm", "decoder_norm"):
            module = getattr(self, name)
            if module is not None:
                module.reset_parameters()
        if self.output is not None and cfg.tie_embeddings and self.tok_embeddings is None:
            _normal_(self.output.weight, EMBEDDING_STD, _child_seed(seed, "tok_embeddings"))
        elif self.output is not None and not cfg.tie_embeddings:
            _normal_(self.output.weight, cfg.dim**-0.5, _child_seed(seed, "output"),
                     truncate=True)
        for stack in ("layers", "decoder_layers"):
            for name, layer in getattr(self, stack).items():
                layer.init_weights(seed=_child_seed(seed, f"{stack}.{name}"))

    def tie_weights(self) -> None:
        """Restore output.weight is tok_embeddings.weight (`to_empty` unties them)."""
        tie_output(self)


__all__ = ["EncoderDecoder", "RelativeBias", "relative_buckets"]
