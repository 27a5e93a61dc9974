"""Gather a sharded checkpoint (saved on any number of ranks, by the native backend or by
DeepSpeed with ZeRO stage 1, 2 or 3) into one file on one process, without GPUs.

    pretrain-consolidate runs/NAME model.pt      # then: pretrain-export-hf model.pt hf/NAME
"""

from __future__ import annotations

import argparse
import sys

from pretrain.errors import CheckpointError
from pretrain.train.consolidate import consolidate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", help="run directory, checkpoints/ directory or one checkpoint")
    p.add_argument("out_file", help="the single .pt file to write")
    args = p.parse_args(argv)
    try:
        out = consolidate(args.checkpoint, args.out_file)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
