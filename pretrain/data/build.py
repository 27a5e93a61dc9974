"""The trainer's two data calls: make sure every configured dataset is prepared, then build the
train and validation loaders for one rank, for one source or a weighted mixture alike.

    data = ensure_data(cfg.data, vocab_size=cfg.model.vocab_size)   # rank 0 first, then others
    objective = build_objective(cfg.objective, Tokenizer.load(data.tokenizer_path),
                                vocab_size=cfg.model.vocab_size)    # pretrain.data.objectives
    train = build_loader(cfg.data, data, "train", seq_len=..., micro_batch_size=...,
                         dp_rank=..., dp_size=..., seed=..., vocab_size=...,
                         objective=objective)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pretrain.data.loader import ShardedWindowLoader
from pretrain.data.mixture import MixEntry, data_config_errors, parse_mix
from pretrain.data.objectives import Objective
from pretrain.data.prepare import ensure_prepared
from pretrain.data.shards import read_manifest
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import DataError

if TYPE_CHECKING:
    from pretrain.config import DataConfig


@dataclass(frozen=True)
class PreparedData:
    """Prepared datasets by source name, and the one tokenizer they share."""

    dirs: dict[str, str]
    tokenizer_path: str


def ensure_data(cfg: DataConfig, *, vocab_size: int) -> PreparedData:
    """Every dataset `cfg` names, prepared (into the cache when given as a corpus) and checked
    against the tokenizer and `vocab_size`. Without `cfg.mix`, the one source is named
    `cfg.name`."""
    _raise_config_errors(cfg)
    if not cfg.mix:
        data_dir, tokenizer = ensure_prepared(cfg, vocab_size=vocab_size)
        return PreparedData({cfg.name: data_dir}, tokenizer)
    entries = parse_mix(cfg.mix)
    tokenizer = cfg.tokenizer or _mixture_tokenizer(entries)
    dirs = {}
    for entry in entries:
        sub = dataclasses.replace(
            cfg, name=entry.name, mix=None, dir=entry.dir, source=entry.source or cfg.source,
            tokenizer=tokenizer, text_field=entry.text_field or cfg.text_field,
            split=entry.split or cfg.split,
            max_bytes=cfg.max_bytes if entry.max_bytes is None else entry.max_bytes)
        dirs[entry.name], _ = ensure_prepared(sub, vocab_size=vocab_size)
    return PreparedData(dirs, tokenizer)


def known_tokenizer(cfg: DataConfig) -> str | None:
    """The tokenizer a run will use when it is already on disk: `data.tokenizer`, or a
    mixture's shared one from its first prepared directory; None when it is yet to be trained
    (then it is ours and holds every special piece)."""
    if cfg.tokenizer is not None or not cfg.mix:
        return cfg.tokenizer
    if not any(e.dir is not None for e in parse_mix(cfg.mix)):
        return None
    return _mixture_tokenizer(parse_mix(cfg.mix))


def _mixture_tokenizer(entries: list[MixEntry]) -> str:
    """Without data.tokenizer: the tokenizer of the first prepared directory (by name); the
    other datasets must have been prepared with it (ensure_prepared checks)."""
    for entry in entries:
        if entry.dir is not None:
            manifest = read_manifest(entry.dir)
            return f"{entry.dir.rstrip('/')}/{manifest['tokenizer']['file']}"
    raise DataError("a mixture of corpora (data.mix entries with `source`) needs one shared "
                    "tokenizer: set data.tokenizer (train one on a sample of the corpora with "
                    "`pretrain-train-tokenizer`) or include a prepared `dir` entry")


def build_loader(
    cfg: DataConfig, data: PreparedData, split: str, *, seq_len: int, micro_batch_size: int,
    dp_rank: int, dp_size: int, seed: int, vocab_size: int, objective: Objective | None = None,
) -> ShardedWindowLoader:
    """The loader of `split` for one data-parallel rank. The validation loader reads in the
    calling thread (its batches are fixed); the training loader prefetches per `cfg`.
    `objective` (from `pretrain.data.objectives.build_objective`; default next-token
    prediction) sets the window length and what the batches hold; `seq_len` is the model's
    input length (the encoder's for span corruption)."""
    _raise_config_errors(cfg)
    weights = {e.name: e.weight for e in parse_mix(cfg.mix)} if cfg.mix else None
    return ShardedWindowLoader(
        data.dirs, split, seq_len=seq_len, micro_batch_size=micro_batch_size, dp_rank=dp_rank,
        dp_size=dp_size, seed=seed, vocab_size=vocab_size,
        tokenizer_fingerprint=Tokenizer.load(data.tokenizer_path).fingerprint, weights=weights,
        document_masking=cfg.document_masking, restart_positions=cfg.restart_positions,
        num_workers=cfg.num_workers if split == "train" else 0, prefetch=cfg.prefetch,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        allow_data_change=cfg.allow_data_change, objective=objective,
    )


def _raise_config_errors(cfg: DataConfig) -> None:
    errors = data_config_errors(cfg)
    if errors:
        raise DataError(errors[0])
