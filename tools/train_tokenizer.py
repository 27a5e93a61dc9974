"""Train a SentencePiece BPE tokenizer (byte fallback, fixed special ids) on a corpus sample.

    pretrain-train-tokenizer --source 'data/*.jsonl' --out tok.model --vocab-size 32000
"""

from __future__ import annotations

import argparse
import sys
import time

from pretrain.data.prepare import train_tokenizer_from_source
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import DataError
from tools.common import add_corpus_arguments


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_corpus_arguments(p)
    p.add_argument("--out", required=True, help="where to write the .model file")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--sample-bytes", type=int, default=3_000_000,
                   help="corpus bytes to train on, from the start of the source (0: all)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        path = train_tokenizer_from_source(args.source, args.out, vocab_size=args.vocab_size,
                                           sample_bytes=args.sample_bytes,
                                           text_field=args.text_field, split=args.split)
        tok = Tokenizer.load(path)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"tokenizer {path}: vocabulary {tok.vocab_size}, fingerprint {tok.fingerprint[:16]}, "
          f"trained in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
