"""One entry for every model family: build, count parameters, count FLOPs.

    decoder          pretrain.models.llama.Transformer   (causal LM, FIM)
    encoder          pretrain.models.encoder.Encoder      (masked LM)
    encoder_decoder  pretrain.models.t5.EncoderDecoder    (span corruption)

All three keep their blocks in `nn.ModuleDict`s named in `BLOCK_STACKS`, which is how
parallelization, activation checkpointing, compile and layout-independent initialization
find them.
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.config import ModelConfig
from pretrain.models import llama
from pretrain.models.encoder import Encoder
from pretrain.models.t5 import EncoderDecoder

BLOCK_STACKS = ("layers", "decoder_layers")
"""Attribute names of the block dicts a model may have (the decoder-only has `layers`)."""

_FAMILIES: dict[str, type[nn.Module]] = {
    "decoder": llama.Transformer,
    "encoder": Encoder,
    "encoder_decoder": EncoderDecoder,
}


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    return _FAMILIES[cfg.arch]


def build_model(cfg: ModelConfig, *, device: str | torch.device = "meta") -> nn.Module:
    """The model of `cfg.arch` on `device`: on the meta device nothing is allocated
    (parallelize, `to_empty`, then `init_weights`); on a real device it comes back initialized
    from the global RNG."""
    with torch.device(device):
        model = model_class(cfg)(cfg)
    if torch.device(device).type != "meta":
        model.init_weights()
    return model


def block_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleDict]]:
    """(name, blocks) of each block dict the model holds, encoder's first."""
    return [(name, getattr(model, name)) for name in BLOCK_STACKS
            if isinstance(getattr(model, name, None), nn.ModuleDict)]


_EMBEDDINGS = ("tok_embeddings", "pos_embeddings", "type_embeddings")


def count_params(cfg: ModelConfig, *, exclude_embeddings: bool = False) -> int:
    """Exact parameter count of the model `cfg` describes (a shared matrix counted once).

    `exclude_embeddings` drops the token (and learned position / type) embeddings, and with
    them a tied output projection: the Kaplan/Chinchilla non-embedding count. The decoder is
    counted by formula (`llama.count_params`); the other families on the meta device.
    """
    if cfg.arch == "decoder" and cfg.norm == "rms" and not cfg.bias:
        return llama.count_params(cfg, exclude_embeddings=exclude_embeddings)
    model = build_model(cfg, device="meta")
    seen: set[int] = set()
    skipped = {id(getattr(model, n).weight) for n in _EMBEDDINGS
               if exclude_embeddings and getattr(model, n, None) is not None}
    total = 0
    for p in model.parameters():  # parameters() yields a shared tensor once
        if id(p) not in seen and id(p) not in skipped:
            total += p.numel()
        seen.add(id(p))
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int, *, decoder_len: int | None = None) -> float:
    """Training FLOPs per input token, the decoder's convention (`llama.flops_per_token`):
    6 x every matmul weight (output projection included) + 12 x layers x dim x context for
    attention. An encoder-decoder's decoder stack and output projection run on `decoder_len`
    tokens per `seq_len` encoder tokens, so they count in that proportion, with their
    self-attention over `decoder_len` and cross-attention over `seq_len` keys."""
    block = llama._block_matmul_params(cfg)
    if cfg.arch != "encoder_decoder":
        extra = cfg.dim * cfg.dim if cfg.arch == "encoder" else 0  # the MLM head's dense
        return llama.flops_per_token(cfg, seq_len) + 6.0 * extra
    dec_len = decoder_len or seq_len
    ratio = dec_len / seq_len
    n_dec = cfg.n_decoder_layers or cfg.n_layers
    encoder = 6.0 * cfg.n_layers * block + 12.0 * cfg.n_layers * cfg.dim * seq_len
    cross = 2 * cfg.dim * cfg.dim  # wq and wo act per decoder token; wk, wv per memory token
    decoder = 6.0 * n_dec * (block + cross) + 6.0 * cfg.vocab_size * cfg.dim
    decoder_attention = 12.0 * n_dec * cfg.dim * (dec_len + seq_len)
    memory_kv = 6.0 * n_dec * 2 * cfg.dim * cfg.dim  # per encoder token
    return encoder + memory_kv + ratio * (decoder + decoder_attention)


__all__ = ["BLOCK_STACKS", "block_stacks", "build_model", "count_params", "flops_per_token",
           "model_class"]
