"""A bidirectional encoder with a masked-LM head (BERT, ModernBERT), built from the decoder's
blocks.

The blocks are `pretrain.models.llama.TransformerBlock` with `causal=False`; each recipe is a
choice of their options, so initialization by name, activation checkpointing, compile and FSDP
apply as they do to the decoder:

    BERT       norm=layer norm_position=post bias=true  mlp=gelu  position=learned
    ModernBERT norm=layer norm_position=pre  bias=false mlp=geglu position=rope
               (every layer global attention)

Module names (an API, like the decoder's):

    tok_embeddings, pos_embeddings, type_embeddings, embed_norm,
    layers.{i}.attention.{wq,wk,wv,wo}, layers.{i}.feed_forward.{w1,w2}, layers.{i}.*_norm,
    norm (pre-norm only), head_dense, head_norm, output (tied to tok_embeddings, with a bias)

The masked-LM head (dense, activation, norm, then the tied output projection plus a bias) runs
only on the positions that have a target: ~15% of them, so the output projection, the
largest matmul of a small model, costs ~15% of what it does on every position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.config import ModelConfig
from pretrain.models.llama import (
    TransformerBlock,
    _child_seed,
    _normal_,
    draw_init_seed,
    make_norm,
    rope_table,
    tie_output,
)
from pretrain.models.loss import IGNORE_INDEX


class Encoder(nn.Module):
    """Embeddings, `n_layers` bidirectional blocks, the masked-LM head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        learned = cfg.position == "learned"
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.dim) if learned else None
        self.type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.dim) if learned else None
        post = cfg.norm_position == "post"
        # The embeddings are normalized (BERT, ModernBERT). Post-norm blocks end normalized;
        # pre-norm ones need a final norm, and the first of them would normalize the
        # normalized embeddings again, so it does not (ModernBERT).
        self.embed_norm = make_norm(cfg)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(cfg, i, causal=False) for i in range(cfg.n_layers)})
        if not post and cfg.n_layers:
            self.layers["0"].attention_norm = nn.Identity()
        self.norm = None if post else make_norm(cfg)
        self.head_dense = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)
        self.head_norm = make_norm(cfg)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=True)
        self.output.weight = self.tok_embeddings.weight
        self.act = (lambda x: F.gelu(x, approximate="tanh")) if cfg.mlp == "gated_gelu" else F.gelu
        self.register_buffer("rope_cache", rope_table(cfg), persistent=False)

    def encode(self, tokens: Tensor, *, attn_mask: Tensor | None = None,
               positions: Tensor | None = None) -> Tensor:
        """Final hidden states (B, T, dim) of tokens (B, T); attn_mask: (B, 1, T, T) bool or
        (B, 1, 1, T) key padding mask, True = attend (default: every position)."""
        B, T = tokens.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds model.max_seq_len="
                             f"{self.config.max_seq_len}")
        h = self.tok_embeddings(tokens)
        rope = None
        if self.pos_embeddings is not None:
            pos = torch.arange(T, device=tokens.device) if positions is None else positions
            h = h + self.pos_embeddings(pos) + self.type_embeddings.weight[0]
        else:
            rope = (self.rope_cache[:T][None, :, None, :] if positions is None
                    else self.rope_cache[positions][:, :, None, :])
        if self.embed_norm is not None:
            h = self.embed_norm(h)
        for layer in self.layers.values():
            h = layer(h, rope, attn_mask)
        return self.norm(h) if self.norm is not None else h

    def head(self, h: Tensor) -> Tensor:
        """Masked-LM logits of hidden states (..., dim) -> (..., vocab_size)."""
        return self.output(self.head_norm(self.act(self.head_dense(h))))

    def forward(self, tokens: Tensor, *, targets: Tensor | None = None,
                attn_mask: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """Logits (B, T, vocab_size), or with `targets` (B, T) (the original id at predicted
        positions, IGNORE_INDEX elsewhere) the mean cross-entropy over the predicted
        positions (fp32 scalar; 0 for a batch without any)."""
        h = self.encode(tokens, attn_mask=attn_mask, positions=positions)
        if targets is None:
            return self.head(h)
        chosen = targets != IGNORE_INDEX  # (B, T)
        logits = self.head(h[chosen])  # (N, vocab_size): only the predicted positions
        losses = F.cross_entropy(logits.float(), targets[chosen], reduction="sum")
        return losses / chosen.sum().clamp(min=1)

    def init_weights(self, buffer_device: torch.device | None = None, *,
                     seed: int | None = None) -> None:
        """Embeddings and head ~ N(0, init_std), blocks as the decoder's, biases 0, norms 1;
        seeded per name, so a part of the model gets the values the whole model has."""
        cfg = self.config
        if seed is None:
            seed = draw_init_seed()
        device = buffer_device or self.rope_cache.device
        self.rope_cache = rope_table(cfg, device=device)
        self.tie_weights()
        for name in ("tok_embeddings", "pos_embeddings", "type_embeddings", "head_dense"):
            module = getattr(self, name)
            if module is not None:
                _normal_(module.weight, cfg.init_std, _child_seed(seed, name))
        if self.head_dense is not None and self.head_dense.bias is not None:
            with torch.no_grad():
                self.head_dense.bias.zero_()
        for name in ("embed_norm", "norm", "head_norm"):
            module = getattr(self, name)
            if module is not None:
                module.reset_parameters()
        if self.output is not None:
            if self.tok_embeddings is None:  # a part without the shared matrix: its values
                _normal_(self.output.weight, cfg.init_std, _child_seed(seed, "tok_embeddings"))
            with torch.no_grad():
                self.output.bias.zero_()
        for name, layer in self.layers.items():
            layer.init_weights(seed=_child_seed(seed, f"layers.{name}"))

    def tie_weights(self) -> None:
        """Restore output.weight is tok_embeddings.weight (`to_empty` unties them)."""
        tie_output(self)

