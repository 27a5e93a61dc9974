"""Downstream tasks as lm-eval-harness frames them, read from local files in each task's
published format (the hub datasets' field names), or from the hub through `datasets`.

    task            split        fields (as the hub stores them)                  metrics
    hellaswag       validation   ctx_a ctx_b activity_label endings label         acc acc_norm
    arc_easy        test         question choices{text,label} answerKey           acc acc_norm
    arc_challenge   test         question choices{text,label} answerKey           acc acc_norm
    piqa            validation   goal sol1 sol2 label                             acc acc_norm
    winogrande      validation   sentence option1 option2 answer ("1"/"2")        acc
    lambada         test         text  (lm-eval's lambada_openai)                 acc perplexity

Files live under a data directory, one folder per task, named for the split lm-eval scores:
`DIR/hellaswag/validation.jsonl`, `DIR/arc_easy/test.parquet`, or the hub's shard names
(`DIR/piqa/validation-00000-of-00001.parquet`). Each task becomes `Item`s: the (context,
continuation) strings lm-eval would request for it, with zero few-shot examples and the target
delimiter " " (HellaSwag's text cleaning, Winogrande's partial scoring: the context varies and
the continuation after the blank is scored).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.errors import DataError

__all__ = ["TASKS", "Item", "TaskSpec", "load_task", "parse_tasks", "task_files"]

TARGET_DELIMITER = " "
"""What lm-eval puts between a multiple-choice context and each choice."""


@dataclass
class Item:
    """One scored document: its requests, and how they turn into metrics."""

    requests: list[tuple[str, str]]
    """(context, continuation) strings whose log-likelihood is asked for."""
    gold: int
    """The right request's index (multiple choice); 0 for a loglikelihood task."""
    choices: list[str]
    """The texts whose character lengths normalize acc_norm (lm-eval's `doc_to_choice`)."""


class RecordError(ValueError):
    """A record lacks a field or holds a value of the wrong kind (the reader adds file:line)."""


@dataclass(frozen=True)
class TaskSpec:
    """How one task is read and framed."""

    split: str
    """The split lm-eval scores (and the file name under DIR/<task>/)."""
    hub: tuple[str, str | None]
    """(dataset path, config name) on the Hugging Face hub, as lm-eval's task config."""
    to_item: Callable[[dict[str, Any]], Item]
    metrics: tuple[str, ...]
    """'acc', 'acc_norm' (multiple choice) or 'acc', 'perplexity' (loglikelihood)."""

    @property
    def multiple_choice(self) -> bool:
        return "perplexity" not in self.metrics


def _field(doc: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in doc:
        raise RecordError(f"no field {name!r}")
    value = doc[name]
    if not isinstance(value, kind):
        raise RecordError(f"field {name!r} is {type(value).__name__}, not "
                          f"{getattr(kind, '__name__', 'the expected type')}")
    return value


def _strings(doc: dict[str, Any], name: str, value: Any) -> list[str]:
    if not isinstance(value, list | tuple) or not value or \
            not all(isinstance(v, str) for v in value):
        raise RecordError(f"field {name!r} must be a non-empty list of strings")
    return list(value)


def _index(value: Any, n: int, name: str) -> int:
    try:
        i = int(value)
    except (TypeError, ValueError):
        raise RecordError(f"field {name!r}={value!r} is not an integer") from None
    if not 0 <= i < n:
        raise RecordError(f"field {name!r}={value!r} is outside the {n} choices")
    return i


def _multiple_choice(context: str, choices: list[str], gold: int) -> Item:
    return Item([(context, TARGET_DELIMITER + c) for c in choices], gold, choices)


def _hellaswag_clean(text: str) -> str:
    """lm-eval's hellaswag `preprocess` (WikiHow's bracket artifacts)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag(doc: dict[str, Any]) -> Item:
    ctx = _field(doc, "ctx_a", str) + " " + _field(doc, "ctx_b", str).capitalize()
    query = _hellaswag_clean(_field(doc, "activity_label", str) + ": " + ctx)
    endings = _strings(doc, "endings", _field(doc, "endings", (list, tuple)))
    choices = [_hellaswag_clean(e) for e in endings]
    return _multiple_choice(query, choices, _index(_field(doc, "label", (str, int)),
                                                   len(choices), "label"))


def arc(doc: dict[str, Any]) -> Item:
    question = _field(doc, "question", str)
    options = _field(doc, "choices", dict)
    texts = _strings(doc, "choices.text", options.get("text"))
    labels = _strings(doc, "choices.label", options.get("label"))
    key = _field(doc, "answerKey", str)
    if key not in labels or len(labels) != len(texts):
        raise RecordError(f"answerKey {key!r} is not one of choices.label {labels}")
    return _multiple_choice(f"Question: {question}\nAnswer:", texts, labels.index(key))


def piqa(doc: dict[str, Any]) -> Item:
    choices = [_field(doc, "sol1", str), _field(doc, "sol2", str)]
    return _multiple_choice(f"Question: {_field(doc, 'goal', str)}\nAnswer:", choices,
                            _index(_field(doc, "label", (int, str)), 2, "label"))


def winogrande(doc: dict[str, Any]) -> Item:
    """Partial scoring: the sentence up to the blank, filled with each option, is the
    context; the rest of the sentence is the continuation scored under each."""
    sentence = _field(doc, "sentence", str)
    if "_" not in sentence:
        raise RecordError("field 'sentence' has no blank '_'")
    blank = sentence.index("_")
    options = [_field(doc, "option1", str), _field(doc, "option2", str)]
    answer = _field(doc, "answer", (str, int))
    if str(answer) not in ("1", "2"):
        raise RecordError(f"field 'answer'={answer!r} is not '1' or '2'")
    contexts = [sentence[:blank] + o for o in options]
    rest = sentence[blank + 1:].strip()
    return Item([(c, TARGET_DELIMITER + rest) for c in contexts], int(answer) - 1, contexts)


def lambada(doc: dict[str, Any]) -> Item:
    words = _field(doc, "text", str).split(" ")
    if len(words) < 2:
        raise RecordError("field 'text' has fewer than two words")
    return Item([(" ".join(words[:-1]), " " + words[-1])], 0, [words[-1]])


_MC = ("acc", "acc_norm")
TASKS: dict[str, TaskSpec] = {
    "hellaswag": TaskSpec("validation", ("Rowan/hellaswag", None), hellaswag, _MC),
    "arc_easy": TaskSpec("test", ("allenai/ai2_arc", "ARC-Easy"), arc, _MC),
    "arc_challenge": TaskSpec("test", ("allenai/ai2_arc", "ARC-Challenge"), arc, _MC),
    "piqa": TaskSpec("validation", ("baber/piqa", None), piqa, _MC),
    "winogrande": TaskSpec("validation", ("allenai/winogrande", "winogrande_xl"), winogrande,
                           ("acc",)),
    "lambada": TaskSpec("test", ("EleutherAI/lambada_openai", "default"), lambada,
                        ("acc", "perplexity")),
}


def parse_tasks(names: str | list[str]) -> list[str]:
    """Task names from 'a,b' or a list; DataError naming an unknown one and the known ones."""
    tasks = [n.strip() for n in (names.split(",") if isinstance(names, str) else names)]
    tasks = [n for n in tasks if n]
    for name in tasks:
        if name not in TASKS:
            raise DataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    if not tasks:
        raise DataError(f"no tasks given; name some of {', '.join(TASKS)}")
    return tasks


def task_files(name: str, data_dir: str | Path) -> list[Path]:
    """The files of task `name` under `data_dir`; DataError naming where they were looked for."""
    folder = Path(data_dir) / name
    split = TASKS[name].split
    for pattern in (f"{split}.jsonl", f"{split}.parquet", f"{split}-*.parquet"):
        found = sorted(folder.glob(pattern))
        if found:
            return found
    raise DataError(f"task {name}: no {folder}/{split}.jsonl or {folder}/{split}.parquet; "
                    f"write the {split} split there in the hub's format (see pretrain/eval/"
                    "tasks.py), or drop --data-dir to read it from the hub")


def _records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for each record: 'FILE:LINE' for JSONL, 'FILE row N' for parquet."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises its own error kinds for a damaged file
            raise DataError(f"{path}: not a readable parquet file ({e})") from e
        for i, row in enumerate(rows):
            yield f"{path} row {i}", row
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not a JSON object ({e.msg}); each line of a "
                                "task file holds one record") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{n}: not a JSON object; each line of a task file "
                                "holds one record")
            yield f"{path}:{n}", record


def _hub_records(name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    from datasets import load_dataset

    spec = TASKS[name]
    path, config = spec.hub
    data = load_dataset(path, config, split=spec.split)
    for i, row in enumerate(data):
        yield f"{path}[{spec.split}] row {i}", dict(row)


def load_task(name: str, data_dir: str | Path | None, *, limit: int | None = None) -> list[Item]:
    """The first `limit` items (None: all) of task `name`, from `data_dir` or the hub.
    DataError naming the file and line of a malformed record."""
    spec = TASKS[parse_tasks([name])[0]]
    if data_dir is None:
        records: Iterator[tuple[str, dict[str, Any]]] = _hub_records(name)
    else:
        records = (r for path in task_files(name, data_dir) for r in _records(path))
    items: list[Item] = []
    for where, record in records:
        if limit is not None and len(items) >= limit:
            break
        try:
            items.append(spec.to_item(record))
        except RecordError as e:
            raise DataError(f"{where}: malformed {name} record: {e}") from None
    if not items:
        raise DataError(f"task {name}: no records in "
                        f"{data_dir if data_dir is not None else spec.hub[0]}")
    return items
