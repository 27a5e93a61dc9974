"""Post-training quantization (torchao) of a decoder run's checkpoint into a quantized model
directory that `pretrain-generate` loads; optionally its validation loss on the run's
validation windows.

    pretrain-quantize runs/NAME --scheme int8_weight_only --out runs/NAME/int8 [--eval]
    pretrain-quantize runs/NAME --scheme int4_weight_only --out runs/NAME/int4 --group-size 32
    pretrain-quantize runs/QAT/quantized --eval      # a directory written before (or by QAT)
    pretrain-generate runs/NAME/int8 --prompt "def "

Schemes: int8_weight_only (int8 per-channel weights), int4_weight_only (int4 weights in
groups), int8_dynamic_act_int4_weight (int8 dynamic activations, int4 weights: what
quant.qat=int8_dynamic_act_int4_weight trains for), bf16 (no quantization: the baseline).
The blocks' linears are quantized; embeddings, norms and the output projection stay bf16
(--include-output quantizes the output projection too, as torchao's Llama QAT recipes do).
"""

from __future__ import annotations

import argparse
import sys

from pretrain.errors import PretrainError
from pretrain.quant.export import SCHEMES
from pretrain.quant.ptq import (
    is_quantized_dir,
    load_quantized,
    quantize_checkpoint,
    size_on_disk,
    validation_batches,
    validation_loss,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", help="run directory, checkpoints/ directory or one checkpoint; "
                   "with --eval alone, a quantized model directory")
    p.add_argument("--scheme", help=f"one of {', '.join(SCHEMES)}")
    p.add_argument("--out", help="quantized model directory to write")
    p.add_argument("--group-size", type=int, default=32, help="int4 weight group (default 32)")
    p.add_argument("--include-output", action="store_true",
                   help="quantize the output projection too (untied embeddings only)")
    p.add_argument("--eval", action="store_true",
                   help="print the quantized model's validation loss (the run's eval_windows)")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="validation windows (default: the run's eval_windows)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.scheme is None and args.out is None and is_quantized_dir(args.checkpoint):
            if not args.eval:
                raise ValueError(f"{args.checkpoint} is quantized already; add --eval to "
                                 "measure it, or pass a run's checkpoint with --scheme and --out")
            out = args.checkpoint
            model, meta = load_quantized(out)
        else:
            if args.scheme is None or args.out is None:
                raise ValueError("give --scheme and --out (e.g. --scheme int8_weight_only "
                                 "--out runs/NAME/int8)")
            quantize_checkpoint(args.checkpoint, args.out, scheme=args.scheme,
                                group_size=args.group_size,
                                include_output=args.include_output)
            out = args.out
            model, meta = load_quantized(out)  # what pretrain-generate will load
            print(f"wrote {out} ({meta['scheme']}, {len(meta['quantized'])} linears quantized, "
                  f"{size_on_disk(out) / 1e6:.2f} MB)")
        if args.eval:
            batches = validation_batches(meta["trainer_state"], args.eval_windows)
            loss = validation_loss(model, batches)
            print(f"val/loss {loss:.4f} ({meta['scheme']}, {len(batches)} batches)")
    except (PretrainError, ValueError) as e:  # user errors: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
