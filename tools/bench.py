"""Benchmark a training step: ours (cumulative optimizations) against transformers' model of
the same family (Llama, BERT, T5; the preset's `arch` picks it).

    pretrain-bench --model bench15m --seq-len 512 --batch-size 8 --json bench.json
    pretrain-bench --model 1b --seq-len 4096 --batch-size 4 --rows hf,+chunked-ce,+compile \\
        --sdpa flash
    pretrain-bench --model cpu_encoder --seq-len 512 --batch-size 8   # vs BertForMaskedLM
    pretrain-bench --model cpu_t5 --seq-len 512 --batch-size 8        # vs T5, 512 + 114 tokens
    pretrain-bench --table a.json b.json      # one table from earlier --json outputs

Rows are listed below; each adds one option to its parent row.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from launch.common import config_dir
from pretrain.config import ModelConfig
from pretrain.perf.bench import (
    DEFAULT_ROWS,
    FAMILY_ROWS,
    ROWS,
    BenchSettings,
    check_settings,
    format_table,
    run_bench,
)

CONF_MODEL = Path(config_dir()) / "model"


def load_model_config(name: str) -> ModelConfig:
    """A preset name from conf/model, or a path to such a YAML file."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else CONF_MODEL / f"{name}.yaml"
    if not path.is_file():
        presets = ", ".join(sorted(p.stem for p in CONF_MODEL.glob("*.yaml")))
        raise ValueError(f"no model preset {name!r} ({path}); use one of {presets} "
                         "or a path to a model YAML file")
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    return OmegaConf.to_object(merged)


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    rows = "\n".join(f"  {name:<22} {spec.what}" for name, spec in ROWS.items())
    rows += ("\n  (hf is the family's transformers model: LlamaForCausalLM, BertForMaskedLM or "
             "T5ForConditionalGeneration)")
    p = argparse.ArgumentParser(description=__doc__, epilog=f"rows:\n{rows}",
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="bench15m", help="preset in conf/model or a YAML path")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    defaults = "; ".join([f"decoder {','.join(DEFAULT_ROWS)}",
                          *(f"{arch} {','.join(rows)}" for arch, rows in FAMILY_ROWS.items())])
    p.add_argument("--rows", help=f"comma-separated row names (default by family: {defaults})")
    p.add_argument("--decoder-len", type=int,
                   help="encoder-decoder: decoder tokens per sequence (default: T5 span "
                        "corruption's target length for --seq-len, 114 for 512)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation)")
    p.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--sdpa", default="auto", help="auto, flash, efficient, cudnn or math")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="alternate rows step by step (default: on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the report here")
    p.add_argument("--table", nargs="+", type=Path, metavar="JSON",
                   help="print one table from these reports and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        missing = [str(p) for p in args.table if not p.is_file()]
        if missing:
            print(f"error: no report at {', '.join(missing)}", file=sys.stderr)
            return 2
        print(format_table([json.loads(p.read_text()) for p in args.table]))
        return 0
    try:
        settings = BenchSettings(
            model=load_model_config(args.model), seq_len=args.seq_len,
            batch_size=args.batch_size, precision=args.precision,
            rows=None if args.rows is None else tuple(
                r.strip() for r in args.rows.split(",") if r.strip()),
            decoder_len=args.decoder_len,
            warmup=args.warmup, steps=args.steps, device=args.device, sdpa=args.sdpa,
            memory=not args.no_memory, interleave=args.interleave, seed=args.seed)
        check_settings(settings)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save = partial(write_report, args.json) if args.json else None
    report = run_bench(settings, on_update=save)  # a GPU run saves after every row
    if save is not None:
        save(report)
    print(format_table([report]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
