"""Synthetic task files in the published formats, made from the built-in corpus (the standard
library's sources), for trying the evaluator and timing it without downloading anything:

    python -m pretrain.eval.synthetic DIR [--items 500] [--seed 0]

writes DIR/hellaswag/validation.jsonl, DIR/arc_easy/test.jsonl, DIR/arc_challenge/test.jsonl,
DIR/piqa/validation.jsonl, DIR/winogrande/validation.jsonl and DIR/lambada/test.jsonl. Each item
asks for the true continuation of a source line against lines drawn from elsewhere in the
corpus (HellaSwag: the rest of the next line; LAMBADA: a line's last word). They measure how
well a model knows Python sources, not what the real benchmarks measure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path
from typing import Any

from pretrain.data.builtin import iter_builtin_documents

__all__ = ["corpus_lines", "synthetic_records", "write_synthetic"]


def corpus_lines(n: int, *, min_words: int = 6) -> list[tuple[str, str]]:
    """(line, next line) pairs of the built-in corpus with at least `min_words` words each and
    no brackets (HellaSwag's cleaning would drop bracketed text), in corpus order."""
    def ok(line: str) -> bool:
        return len(line.split()) >= min_words and "[" not in line and "_" not in line

    out: list[tuple[str, str]] = []
    for doc in iter_builtin_documents():
        lines = [ln.strip() for ln in doc.splitlines()]
        for a, b in itertools.pairwise(lines):
            if ok(a) and ok(b):
                out.append((a, b))
                if len(out) >= n:
                    return out
    return out


def synthetic_records(task: str, n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """`n` records of `task` in the hub's field names."""
    pairs = corpus_lines(4 * n + 8)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        (a, b), others = pairs[i], [p[1] for p in rng.sample(pairs[n:], 3)]
        words, cut = b.split(), len(b.split()) // 2
        head, tail = " ".join(words[:cut]), " ".join(words[cut:])
        distractors = [" ".join(o.split()[len(o.split()) // 2:]) for o in others]
        gold = rng.randrange(4)
        choices = distractors[:gold] + [tail] + distractors[gold:]
        if task == "hellaswag":
            records.append({"ind": i, "activity_label": "Python", "ctx_a": a, "ctx_b": head,
                            "ctx": f"{a} {head}", "endings": choices, "label": str(gold),
                            "split": "val", "split_type": "indomain", "source_id": "synthetic"})
        elif task in ("arc_easy", "arc_challenge"):
            labels = ["A", "B", "C", "D"]
            records.append({"id": f"synthetic-{i}", "question": f"{a} {head}",
                            "choices": {"text": choices, "label": labels},
                            "answerKey": labels[gold]})
        elif task == "piqa":
            label = gold % 2
            sols = [distractors[0], tail] if label else [tail, distractors[0]]
            records.append({"goal": f"{a} {head}", "sol1": sols[0], "sol2": sols[1],
                            "label": label})
        elif task == "winogrande":
            target = rng.randrange(len(words))
            wrong = rng.choice(others[0].split())
            sentence = " ".join(words[:target] + ["_"] + words[target + 1:])
            answer = rng.choice(["1", "2"])
            opts = [words[target], wrong] if answer == "1" else [wrong, words[target]]
            records.append({"sentence": sentence, "option1": opts[0], "option2": opts[1],
                            "answer": answer})
        elif task == "lambada":
            records.append({"text": f"{a} {b}"})
        else:
            raise ValueError(f"no synthetic form of task {task!r}")
    return records


_FILES = {"hellaswag": "validation", "arc_easy": "test", "arc_challenge": "test",
          "piqa": "validation", "winogrande": "validation", "lambada": "test"}


def write_synthetic(out_dir: str | Path, n: int, *, seed: int = 0,
                    tasks: list[str] | None = None) -> list[Path]:
    """Write `n` synthetic records of each task (default: all six) as DIR/<task>/<split>.jsonl."""
    written = []
    for task in tasks or list(_FILES):
        path = Path(out_dir) / task / f"{_FILES[task]}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n"
                                for r in synthetic_records(task, n, seed=seed)))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--items", type=int, default=500, help="records per task (default 500)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for path in write_synthetic(args.out_dir, args.items, seed=args.seed):
        print(f"wrote {path} ({args.items} synthetic records)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
