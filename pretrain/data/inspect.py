"""What the model saw: the windows of a given training step and rank, decoded, with document
boundaries marked (for `tools/inspect_data.py`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pretrain.data.loader import ShardedWindowLoader
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import DataError

BOUNDARY = "─" * 24 + " document boundary " + "─" * 24
EOS_MARK = "</s>"


@dataclass
class WindowView:
    """One row of one micro-batch of a step, as text."""

    step: int
    micro_step: int
    row: int
    source: str
    window: int
    epoch: int
    continues: bool
    """The first document began before this window."""
    documents: list[str]
    """The decoded documents (pieces) of the window's seq_len input tokens, in order."""


def views_at_step(
    loader: ShardedWindowLoader, tokenizer: Tokenizer, step: int, grad_accum: int,
) -> Iterator[WindowView]:
    """The windows this loader's rank reads in optimizer step `step` (1-based, as logged):
    `grad_accum` micro-batches. The loader must be at or before that step's start; it is moved
    there (without reading what lies between) and then reads the step."""
    per_step = grad_accum * loader.global_batch_windows
    start = (step - 1) * per_step
    if step < 1 or start < loader.cursor:
        raise DataError(f"step {step} starts at position {start}, before the loader's position "
                        f"{loader.cursor}; give a later step or an earlier saved state")
    loader.skip(start - loader.cursor)
    for micro in range(grad_accum):
        epochs_before = loader.consumed.copy()
        batch = loader.next_batch()
        assert batch.doc_ids is not None, "the loader must have document_masking on"
        rows = loader.last_rows
        for row in range(len(rows.windows)):
            s, w = int(rows.sources[row]), int(rows.windows[row])
            source = loader.sources[s]
            ids = batch.doc_ids[row].numpy()
            pieces = np.split(batch.inputs[row].numpy(), np.flatnonzero(np.diff(ids)) + 1)
            yield WindowView(step, micro, row, source.name, w,
                             int(epochs_before[s] // source.windows_per_epoch),
                             _continues(loader, s, w),
                             [_decode(tokenizer, p) for p in pieces])


def _continues(loader: ShardedWindowLoader, s: int, w: int) -> bool:
    start = w * loader.sources[s].seq_len  # the source's window stride
    return start > 0 and not len(loader.sources[s].doc_ends_between(start - 1, start))


def _decode(tokenizer: Tokenizer, ids: np.ndarray) -> str:
    text = tokenizer.decode(ids)
    return text + EOS_MARK if len(ids) and ids[-1] == tokenizer.eos_id else text


def render(view: WindowView, *, rank: int, dp_size: int, grad_accum: int,
           max_chars: int = 0) -> str:
    """The view as text: a header line, then the documents separated by boundary lines."""
    head = (f"== step {view.step} | rank {rank}/{dp_size} | micro-batch "
            f"{view.micro_step + 1}/{grad_accum} | row {view.row} | source {view.source} | "
            f"window {view.window} (epoch {view.epoch}) ==")
    docs = [_shorten(d, max_chars) for d in view.documents]
    if view.continues:
        docs[0] = "[... continues a document from before this window]\n" + docs[0]
    return "\n".join([head, f"\n{BOUNDARY}\n".join(docs)])


def _shorten(text: str, max_chars: int) -> str:
    if max_chars <= 0 or len(text) <= max_chars + 40:  # cutting a few characters hides nothing
        return text
    half = max_chars // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters ...]\n{text[-half:]}"
