"""Corpus sources, the tokenizer, the token shard format, preparation, mixtures and the loader.

The loader, the trainer's factory and the masking helpers (which need torch) are imported on
first use, so that tokenization worker processes, which import this package, start without
importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pretrain.data.mixture import MixEntry, data_config_errors, normalize_weights, parse_mix

# `prepare` (the function) is not re-exported: it would shadow the `pretrain.data.prepare`
# module for attribute lookups such as mock.patch("pretrain.data.prepare.write_shard").
from pretrain.data.prepare import ensure_prepared, is_val_document, train_tokenizer_from_source
from pretrain.data.shards import Shard, read_manifest, read_shard, write_manifest, write_shard
from pretrain.data.sources import SourceStats, describe_source, iter_documents
from pretrain.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, train_tokenizer
from pretrain.errors import DataError

if TYPE_CHECKING:
    from pretrain.data.build import PreparedData, build_loader, ensure_data
    from pretrain.data.loader import Batch, ShardedWindowLoader
    from pretrain.data.masking import block_causal_mask, document_positions

_LAZY = {
    "Batch": "pretrain.data.loader",
    "ShardedWindowLoader": "pretrain.data.loader",
    "PreparedData": "pretrain.data.build",
    "build_loader": "pretrain.data.build",
    "ensure_data": "pretrain.data.build",
    "block_causal_mask": "pretrain.data.masking",
    "document_positions": "pretrain.data.masking",
}

__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "UNK_ID", "Batch", "DataError", "MixEntry", "PreparedData",
    "Shard", "ShardedWindowLoader", "SourceStats", "Tokenizer", "block_causal_mask",
    "build_loader", "data_config_errors", "describe_source", "document_positions",
    "ensure_data", "ensure_prepared", "is_val_document", "iter_documents", "normalize_weights",
    "parse_mix", "read_manifest", "read_shard", "train_tokenizer", "train_tokenizer_from_source",
    "write_manifest", "write_shard",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
