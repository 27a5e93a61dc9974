"""Sample from a run's checkpoint (either backend, any layout) with a KV cache, on one process.

    pretrain-generate runs/NAME --prompt "def " --max-new-tokens 64 --temperature 0.8 --top-k 50
"""

from __future__ import annotations

import argparse
import sys

import torch

from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import CheckpointError, DataError
from pretrain.eval.generate import generate
from pretrain.train.consolidate import load_model_from_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", help="run directory, checkpoints/ directory or one checkpoint")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="SentencePiece model (default: the run's)")
    p.add_argument("--no-cache", action="store_true", help="recompute the prefix every step")
    args = p.parse_args(argv)
    try:
        model, state = load_model_from_checkpoint(args.checkpoint)
        tokenizer = Tokenizer.load(args.tokenizer or state["tokenizer_path"])
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.eval()
    gen = torch.Generator().manual_seed(args.seed)
    for prompt in args.prompt or ["def "]:
        new = generate(model, tokenizer.encode(prompt, bos=True),
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, eos_id=tokenizer.eos_id,
                       use_cache=not args.no_cache, generator=gen)
        print(f"--- {prompt!r}\n{prompt}{tokenizer.decode(new)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
