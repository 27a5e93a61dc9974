"""Count tokens and documents per source and split, with a document length histogram (PNG).

Prepared datasets are counted from their shards (headers and document ends; nothing is
re-tokenized):

    pretrain-count-tokens web=data/web code=data/code --hist lengths.png

A corpus without shards is tokenized (in worker processes) and counted:

    pretrain-count-tokens --source 'data/raw/*.jsonl.zst' --tokenizer tok.model --workers 16
"""

from __future__ import annotations

import argparse
import os
import sys

from pretrain.data.stats import SplitCount, count_corpus, count_prepared, plot_lengths
from pretrain.errors import DataError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data", nargs="*", metavar="[NAME=]DIR", help="prepared dataset directories")
    p.add_argument("--source", help="a corpus to tokenize and count instead (see "
                                    "pretrain-prepare-data --source)")
    p.add_argument("--tokenizer", help="SentencePiece .model file (with --source)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="tokenizer processes (with --source)")
    p.add_argument("--text-field", default="text", help="text field (with --source)")
    p.add_argument("--max-bytes", type=int, default=0, help="cap on corpus bytes (0: none)")
    p.add_argument("--hist", help="write the document length histogram to this PNG")
    args = p.parse_args(argv)
    if bool(args.data) == bool(args.source) or (args.source and not args.tokenizer):
        p.error("give prepared directories, or --source with --tokenizer")
    try:
        counts = _count(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(counts))
    if args.hist:
        plot_lengths(counts, args.hist)
        print(f"document length histogram: {args.hist}")
    return 0


def _count(args: argparse.Namespace) -> list[SplitCount]:
    if args.source:
        return [count_corpus("corpus", args.source, args.tokenizer, num_workers=args.workers,
                             text_field=args.text_field, max_bytes=args.max_bytes)]
    counts = []
    for spec in args.data:
        name, _, path = spec.rpartition("=")
        counts += count_prepared(name or os.path.basename(os.path.normpath(path)), path)
    return counts


def format_table(counts: list[SplitCount]) -> str:
    """A plain-text table, one line per (source, split), and a total line."""
    header = (f"{'source':<16} {'split':<6} {'tokens':>15} {'documents':>12} {'shards':>7} "
              f"{'mean len':>9} {'p50':>8} {'p99':>8} {'max':>9}")
    lines = [header, "-" * len(header)]
    for c in counts:
        h = c.lengths
        lines.append(f"{c.source:<16} {c.split:<6} {c.n_tokens:>15,} {c.n_docs:>12,} "
                     f"{c.n_shards:>7,} {h.mean:>9,.0f} {h.quantile(0.5):>8,.0f} "
                     f"{h.quantile(0.99):>8,.0f} {h.longest:>9,}")
    lines.append(f"{'total':<23} {sum(c.n_tokens for c in counts):>15,} "
                 f"{sum(c.n_docs for c in counts):>12,}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
