"""The README's quantization table from one command: a bf16 run's checkpoint quantized with
every PTQ scheme, and a QAT run's converted model, measured side by side on CPU.

    python -m tools.quant_report --base runs/ft_bf16 --qat runs/ft_qat --group-size 128 \
        --include-output

The base is the bf16 control of the QAT run (the same start, steps and data), so that the
recovered fraction compares models that have seen the same tokens; --group-size and
--include-output must be the QAT run's quant.group_size and quant.include_output (checked).

Per row: validation loss on the base run's validation windows (its eval_windows), size of the
weights file, and greedy generation speed (KV cache, the same prompt and length for every
model) as a ratio to bf16, measured in interleaved rounds in this one process (the best round
per model), so machine noise hits every row alike; on one thread by default (`--threads`):
on a shared, busy machine two spinning threads that must meet at every small matmul of
decoding ran 25x slower than one. Then the targets: PTQ int8 within 1% of
bf16, and the fraction of PTQ's loss increase that QAT recovers.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import PretrainError
from pretrain.quant.export import SCHEMES
from pretrain.quant.ptq import (
    generation_speed,
    load_quantized,
    quantize_checkpoint,
    read_meta,
    size_on_disk,
    validation_batches,
    validation_loss,
)


@dataclass
class Row:
    name: str
    path: Path
    model: nn.Module
    loss: float = 0.0
    speed: float = 0.0


def build_rows(base: str, qat: str | None, out: Path, group_size: int,
               include_output: bool = False) -> list[Row]:
    """Write the base run's quantized models under `out` (the QAT run's own converted model
    is its run_dir/quantized) and load each as pretrain-generate does."""
    if qat is not None:  # before the PTQ work: the rows must quantize alike
        meta = read_meta(Path(qat) / "quantized")
        got = (meta["group_size"], meta.get("include_output", False))
        if got != (group_size, include_output):
            raise ValueError(f"{qat} trained with quant.group_size={got[0]} "
                             f"quant.include_output={got[1]}; pass --group-size {got[0]}"
                             f"{' --include-output' if got[1] else ''} to compare like with like")
    paths = []
    for scheme in SCHEMES:
        quantize_checkpoint(base, out / scheme, scheme=scheme, group_size=group_size,
                            include_output=include_output)
        paths.append((f"PTQ {scheme}" if scheme != "bf16" else "bf16", out / scheme))
    if qat is not None:
        quantize_checkpoint(qat, out / "qat_float", scheme="bf16")
        paths.append(("QAT run, float weights (bf16)", out / "qat_float"))
        paths.append(("QAT int8_dynamic_act_int4_weight", Path(qat) / "quantized"))
    return [Row(name, path, load_quantized(path)[0]) for name, path in paths]


def measure(rows: list[Row], state: dict, *, prompt: str, new_tokens: int, rounds: int) -> None:
    batches = validation_batches(state)
    for row in rows:
        row.loss = validation_loss(row.model, batches)
    ids = Tokenizer.load(state["tokenizer_path"]).encode(prompt, bos=True)
    for row in rows:  # warm-up
        generation_speed(row.model, ids, new_tokens=new_tokens, repeats=0)
    for _ in range(rounds):
        for row in rows:
            speed = generation_speed(row.model, ids, new_tokens=new_tokens, repeats=1,
                                     warmup=False)
            row.speed = max(row.speed, speed.tokens_per_s)


def table(rows: list[Row]) -> str:
    base = rows[0]
    lines = ["| model | val loss | vs bf16 | size (MB) | size vs bf16 | tokens/s vs bf16 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        size = size_on_disk(r.path)
        lines.append(f"| {r.name} | {r.loss:.5f} | {100 * (r.loss / base.loss - 1):+.3f}% | "
                     f"{size / 1e6:.2f} | {size / size_on_disk(base.path):.2f}x | "
                     f"{r.speed / base.speed:.2f}x |")
    return "\n".join(lines)


def targets(rows: list[Row]) -> str:
    by = {r.name: r.loss for r in rows}
    bf16 = by["bf16"]
    int8 = by["PTQ int8_weight_only"]
    out = [f"PTQ int8 vs bf16: {100 * (int8 / bf16 - 1):+.3f}% (target within 1%: "
           f"{'met' if abs(int8 / bf16 - 1) <= 0.01 else 'NOT met'})"]
    qat = by.get("QAT int8_dynamic_act_int4_weight")
    if qat is not None:
        for ptq_name in ("PTQ int8_dynamic_act_int4_weight", "PTQ int4_weight_only"):
            increase = by[ptq_name] - bf16
            if increase <= 0:
                out.append(f"QAT vs {ptq_name}: PTQ did not raise the loss ({increase:+.5f}), "
                           "so there is nothing to recover: the target cannot be judged")
                continue
            recovered = (by[ptq_name] - qat) / increase
            out.append(f"QAT recovers {recovered:.0%} of {ptq_name}'s loss increase "
                       f"({increase:+.5f}; QAT {qat - bf16:+.5f}) (target >= 50%: "
                       f"{'met' if recovered >= 0.5 else 'NOT met'})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", required=True, help="the bf16 run (directory or checkpoint)")
    p.add_argument("--qat", help="the QAT run directory (its quantized/ is the QAT row)")
    p.add_argument("--out", help="where the PTQ models go (default: BASE/quantized_ptq)")
    p.add_argument("--group-size", type=int, default=32, help="int4 weight group (default 32)")
    p.add_argument("--include-output", action="store_true",
                   help="quantize the output projection too (as the QAT run's "
                   "quant.include_output=true)")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        out = Path(args.out or Path(args.base) / "quantized_ptq")
        rows = build_rows(args.base, args.qat, out, args.group_size, args.include_output)
        state = load_quantized(rows[0].path)[1]["trainer_state"]
        measure(rows, state, prompt=args.prompt, new_tokens=args.new_tokens,
                rounds=args.rounds)
    except (PretrainError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(rows))
    print(targets(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
