"""Command-line pieces several tools share."""

from __future__ import annotations

import argparse


def add_corpus_arguments(p: argparse.ArgumentParser) -> None:
    """--source, --text-field, --split: a corpus as `pretrain.data` reads it."""
    p.add_argument("--source", default="builtin",
                   help="'builtin', a .txt/.jsonl[.gz|.zst]/.parquet file, directory or glob, "
                        "or hf:NAME[:CONFIG] (default: builtin)")
    p.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet/hub data")
    p.add_argument("--split", default="train", help="split of a hub dataset")
