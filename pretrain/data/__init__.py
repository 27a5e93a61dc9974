"""Corpus sources, the tokenizer, the token shard format, preparation and the window loader.

The loader (which needs torch) is imported on first use, so that tokenization worker processes,
which import this package, start without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# `prepare` (the function) is not re-exported: it would shadow the `pretrain.data.prepare`
# module for attribute lookups such as mock.patch("pretrain.data.prepare.write_shard").
from pretrain.data.prepare import ensure_prepared, is_val_document, train_tokenizer_from_source
from pretrain.data.shards import (
    DataError,
    Shard,
    read_manifest,
    read_shard,
    write_manifest,
    write_shard,
)
from pretrain.data.sources import describe_source, iter_documents
from pretrain.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, train_tokenizer

if TYPE_CHECKING:
    from pretrain.data.loader import ShardedWindowLoader

__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "UNK_ID", "DataError", "Shard", "ShardedWindowLoader",
    "Tokenizer", "describe_source", "ensure_prepared", "is_val_document", "iter_documents",
    "read_manifest", "read_shard", "train_tokenizer", "train_tokenizer_from_source",
    "write_manifest", "write_shard",
]


def __getattr__(name: str) -> Any:
    if name == "ShardedWindowLoader":
        from pretrain.data.loader import ShardedWindowLoader

        return ShardedWindowLoader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
