"""Cutting a split's token stream into shards, and the progress file that makes it resumable.

Shard ``i`` of a split holds tokens ``[i * shard_tokens, (i + 1) * shard_tokens)`` of that split's
stream (documents in corpus order, each ending with EOS), so where shards end depends on the
stream alone. A restarted preparation therefore needs only, per split, the finished shards and
the *resume point*: the first document not wholly inside them and how many of its tokens they
already hold. It re-reads the corpus up to the earliest resume point without tokenizing, then
tokenizes from there; each writer drops what its finished shards already hold, and the shards
it writes next are byte for byte those an uninterrupted run would have written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from pretrain.data.shards import atomic_write, read_shard, write_shard
from pretrain.errors import DataError

PROGRESS_NAME = "prepare.progress.json"


class SplitWriter:
    """Writes one split's shards of exactly `shard_tokens` tokens (the last one partial)."""

    def __init__(
        self, data_dir: str, split: str, shard_tokens: int, vocab_size: int, *,
        resume: dict[str, Any] | None = None, on_shard: Callable[[], None] = lambda: None,
    ):
        self.data_dir, self.split = data_dir, split
        self.shard_tokens, self.vocab_size = shard_tokens, vocab_size
        self.on_shard = on_shard
        resume = resume or {"shards": [], "next_doc": 0, "skip_tokens": 0}
        self.shards: list[dict[str, Any]] = list(resume["shards"])
        self.next_doc: int = resume["next_doc"]
        """Documents before this one are in finished shards (resume point)."""
        self.skip_tokens: int = resume["skip_tokens"]
        """Leading tokens of document `next_doc` that finished shards already hold."""
        self.seen = self.next_doc  # index just past the last document routed to any split
        self.pending = 0
        self.chunks: list[np.ndarray] = []
        self.ends: list[np.ndarray] = []  # document end offsets relative to the pending tokens
        self.index: list[np.ndarray] = []  # corpus index of each pending document
        self.lengths: list[np.ndarray] = []  # full token count of each pending document

    def add(self, index: np.ndarray, tokens: np.ndarray, lengths: np.ndarray, upto: int) -> None:
        """Append documents `index` (ascending corpus indices; `tokens` concatenated, `lengths`
        each) of a batch that ends before document `upto`."""
        self.seen = upto
        index, tokens, trimmed = self._drop_finished(index, tokens, lengths)
        lengths = lengths[len(lengths) - len(index):]
        if not len(index):
            return
        self.chunks.append(tokens)
        self.ends.append(self.pending + np.cumsum(lengths) - trimmed)
        self.index.append(index)
        self.lengths.append(lengths)
        self.pending += tokens.size
        while self.pending >= self.shard_tokens:
            self._write(self.shard_tokens)

    def _drop_finished(
        self, index: np.ndarray, tokens: np.ndarray, lengths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Without what finished shards hold: (index, tokens, tokens trimmed off the first)."""
        if not len(index) or index[0] > self.next_doc or (index[0] == self.next_doc
                                                            and not self.skip_tokens):
            return index, tokens, 0
        cut = int(np.searchsorted(index, self.next_doc))
        trimmed = self.skip_tokens if cut < len(index) and index[cut] == self.next_doc else 0
        return index[cut:], tokens[int(lengths[:cut].sum()) + trimmed:], trimmed

    def close(self) -> dict[str, Any]:
        """Write the partial last shard; return this split's manifest entry."""
        if self.pending:
            self._write(self.pending)
        return {"n_tokens": sum(s["n_tokens"] for s in self.shards),
                "n_docs": sum(s["n_docs"] for s in self.shards),
                "shards": self.shards}

    def resume_point(self) -> dict[str, Any]:
        """This split's finished shards and where a restarted preparation continues it."""
        if not self.pending:
            return {"shards": self.shards, "next_doc": self.seen, "skip_tokens": 0}
        first_end = int(self.ends[0][0])
        first_length = int(self.lengths[0][0])
        return {"shards": self.shards, "next_doc": int(self.index[0][0]),
                "skip_tokens": first_length - first_end}

    def _write(self, n: int) -> None:
        tokens = np.concatenate(self.chunks)
        ends, index = np.concatenate(self.ends), np.concatenate(self.index)
        lengths = np.concatenate(self.lengths)
        inside = ends <= n
        name = f"{self.split}/{len(self.shards):06d}.bin"
        checksum = write_shard(os.path.join(self.data_dir, name), tokens[:n], ends[inside],
                               vocab_size=self.vocab_size)
        self.shards.append({"name": name, "n_tokens": n, "n_docs": int(inside.sum()),
                            "checksum": checksum})
        self.chunks, self.ends = [tokens[n:]], [ends[~inside] - n]
        self.index, self.lengths = [index[~inside]], [lengths[~inside]]
        self.pending -= n
        self.on_shard()


def save_progress(data_dir: str, key: str, writers: dict[str, SplitWriter]) -> None:
    """Record every split's resume point; called after each shard is in place. One temporary
    name, so a preparation killed while writing it leaves at most one `.prepare.progress.json.tmp`,
    which the next write replaces (and `prepare` removes)."""
    state = {"key": key, "splits": {s: w.resume_point() for s, w in writers.items()}}
    text = json.dumps(state, sort_keys=True)
    atomic_write(os.path.join(data_dir, PROGRESS_NAME), lambda f: f.write(text.encode()),
                 fixed_tmp=True)


def load_progress(data_dir: str, key: str) -> dict[str, Any] | None:
    """The saved resume points of an unfinished preparation of the same inputs, or None when
    there is none, it is of other inputs, or a shard it lists is missing or changed."""
    path = os.path.join(data_dir, PROGRESS_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        return None
    for split in state["splits"].values():
        if not all(_shard_intact(data_dir, entry) for entry in split["shards"]):
            return None
    return state["splits"]


def _shard_intact(data_dir: str, entry: dict[str, Any]) -> bool:
    # The header's checksum and the file size (checked by read_shard) are enough here: the
    # loader verifies every byte when it opens the dataset.
    try:
        shard = read_shard(os.path.join(data_dir, entry["name"]), verify=False)
    except DataError:
        return False
    return shard.checksum == entry["checksum"] and shard.n_tokens == entry["n_tokens"]


def remove_progress(data_dir: str) -> None:
    path = os.path.join(data_dir, PROGRESS_NAME)
    if os.path.exists(path):
        os.unlink(path)
