"""Score a checkpoint on downstream tasks, as lm-eval-harness scores them (zero-shot).

    pretrain-eval runs/NAME --tasks hellaswag,arc_easy,piqa,lambada --data-dir DIR
    pretrain-eval out/hf-model --tasks winogrande --data-dir DIR --limit 500 --out results.json

CKPT: one of our runs (run directory or checkpoints/step_*) or a Hugging Face LLaMA directory
(exported by pretrain-export-hf, or any pretrain-import-hf reads). Task files: DIR/<task>/
<split>.jsonl or .parquet in the hub's format (see pretrain/eval/tasks.py); without --data-dir
the tasks are read from the hub through `datasets`. Prints task, metric, value, stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from pretrain.errors import PretrainError
from pretrain.eval.downstream import describe, evaluate_tasks, load_for_eval, model_forward
from pretrain.eval.tasks import TASKS, load_task, parse_tasks


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", help="run directory, checkpoints/step_* or a Hugging Face "
                                      "LLaMA directory")
    p.add_argument("--tasks", required=True, help=f"comma-separated, of: {', '.join(TASKS)}")
    p.add_argument("--data-dir", type=Path, help="task files DIR/<task>/<split>.jsonl|.parquet "
                                                 "(default: the hub through `datasets`)")
    p.add_argument("--limit", type=int, help="first N items of each task (default: all)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="requests per forward pass (default 64; the logits are batch × context "
                        "× vocab: lower it for long contexts or large vocabularies)")
    p.add_argument("--tokenizer", help="tokenizer (default: the run's, or the HF directory's)")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit {args.limit}; use a positive integer")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size}; use a positive integer")
        names = parse_tasks(args.tasks)
        tasks = {n: load_task(n, args.data_dir, limit=args.limit) for n in names}
        model, tok, window = load_for_eval(args.checkpoint, args.tokenizer)
        start = time.perf_counter()
        results = evaluate_tasks(model_forward(model), tok, tasks, max_len=window,
                                 batch_size=args.batch_size)
        seconds = time.perf_counter() - start
    except (PretrainError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = describe(results)
    print("| task | metric | value | stderr |\n|---|---|---:|---:|")
    for r in rows:
        stderr = "" if r["stderr"] is None else f"{r['stderr']:.4f}"
        print(f"| {r['task']} | {r['metric']} | {r['value']:.4f} | {stderr} |")
    n_items = sum(map(len, tasks.values()))
    print(f"{n_items} items in {seconds:.1f} s (window {window}, batch size {args.batch_size}, "
          f"{torch.get_num_threads()} threads)", file=sys.stderr)
    if args.out is not None:
        args.out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "results": rows,
                                        "items": {n: len(v) for n, v in tasks.items()}},
                                       indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
