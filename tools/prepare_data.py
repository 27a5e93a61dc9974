"""Tokenize a corpus into train/val token shards with a manifest (a prepared dataset directory).

    pretrain-prepare-data --source 'data/*.jsonl.zst' --tokenizer tok.model \\
        --out data/prepared --workers 16 --val-fraction 0.01 --dedup

Run the same command again after an interruption and it continues from the last finished shard
(the result is byte-identical to an uninterrupted run, and the speed printed counts only the
tokens this run wrote); --overwrite starts afresh. Train with it
by setting data.dir=data/prepared (its tokenizer.model is used by default).

    pretrain-prepare-data --source 'data/*.jsonl' --tokenizer hf:models/llama --out data/llama

tokenizes with the Hugging Face tokenizer of that directory (transformers' AutoTokenizer,
local files only); the manifest records the sha256 of its files, and the directory keeps a
copy of them (hf_tokenizer/).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from pretrain.data.prepare import PrepareStats, prepare
from pretrain.errors import DataError
from tools.common import add_corpus_arguments


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_corpus_arguments(p)
    p.add_argument("--tokenizer", required=True,
                   help="SentencePiece .model file, or hf:DIR (a transformers tokenizer directory)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="tokenizer processes (default: all CPUs)")
    p.add_argument("--shard-tokens", type=int, default=1 << 20, help="tokens per shard file")
    p.add_argument("--val-fraction", type=float, default=0.02,
                   help="fraction of documents held out for validation")
    p.add_argument("--max-bytes", type=int, default=0, help="cap on corpus bytes (0: none)")
    p.add_argument("--dedup", action="store_true",
                   help="drop documents whose text equals an earlier document's")
    p.add_argument("--overwrite", action="store_true",
                   help="prepare from scratch instead of resuming an unfinished preparation")
    args = p.parse_args(argv)
    stats = PrepareStats()
    try:
        manifest = prepare(args.source, args.tokenizer, args.out, num_workers=args.workers,
                           shard_tokens=args.shard_tokens, val_fraction=args.val_fraction,
                           text_field=args.text_field, split=args.split,
                           max_bytes=args.max_bytes, dedup=args.dedup,
                           resume=not args.overwrite, log=print, stats=stats)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(manifest, args.out, stats)
    return 0


def report(manifest: dict[str, Any], out: str, stats: PrepareStats) -> None:
    for name, split in manifest["splits"].items():
        print(f"{name}: {split['n_tokens']:,} tokens, {split['n_docs']:,} documents, "
              f"{len(split['shards'])} shards")
    docs = manifest.get("documents", {})
    skipped = ", ".join(f"{n:,} {why}" for why, n in sorted(docs.get("skipped", {}).items()))
    dedup = f"{docs.get('duplicates', 0):,} duplicates removed" if manifest.get("dedup") else (
        "no deduplication")
    print(f"documents: {docs.get('read', 0):,} read, {dedup}, skipped: {skipped or 'none'}")
    total = f"{out}: {manifest['n_tokens']:,} tokens ({manifest['dtype']})"
    if stats.already_prepared:
        print(f"{total}, already prepared: nothing to do")
    elif stats.resumed:
        print(f"{total}; this run: {stats.tokens:,} new tokens in {stats.seconds:.1f}s, "
              f"{stats.tokens_per_s:,.0f} tokens/s (resumed after {stats.tokens_before:,})")
    else:
        print(f"{total} in {stats.seconds:.1f}s, {stats.tokens_per_s:,.0f} tokens/s")


if __name__ == "__main__":
    sys.exit(main())
