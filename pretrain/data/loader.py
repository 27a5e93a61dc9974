"""The training data loader: one global, seeded order of windows over one or several sources,
sliced per data-parallel rank, with exact resume, document masking and background prefetch.

Training reads an endless sequence of positions. Position ``g`` (the global cursor counts them)
reads from the source `pretrain.data.mixture.assign_sources` gives it (always the one source
when there is one), and takes that source's next window in the source's own seeded order (see
`pretrain.data.windows`). Each call to `next_batch` consumes ``micro_batch_size * dp_size``
positions and rank ``r`` takes positions ``[cursor + r * mb, cursor + (r + 1) * mb)``, so the
windows of an optimizer step depend on the global batch only, not on how it is split between
ranks and accumulation steps; the state (the cursor and each source's count of windows
consumed) is the same on every rank and survives a change of dp_size on resume.

With ``num_workers > 0``, background threads plan and read the next batches (see
`pretrain.data.prefetch`). What a batch holds is decided when it is planned (a pure function of
the state), and the state advances only when a batch is handed out, so the windows and the saved
position are the same for any number of workers. Threads rather than processes: reading a batch
is copying tokens out of memory-mapped shards, which numpy does without holding the GIL, so
threads overlap it with the training step without pickling every batch through a pipe.

Validation (`eval_windows`) reads a fixed set, the first ``n`` windows of the split in stream
order, whatever the layout: ranks pad their last batch with rows whose targets are all
IGNORE_INDEX, so every rank runs the same number of full batches.

An objective (`pretrain.data.objectives`; next-token prediction by default) sets how many tokens
a window holds and turns the windows into inputs and targets. Its random choices (masks, spans,
FIM cuts) come from a generator per row keyed by (seed, stream, position): in training the
row's global position ``g``, which no other row of the run shares and which does not depend on
the layout or the workers, so resume is exact and a window read in a later epoch is corrupted
anew; in validation the eval position, so the validation set is corrupted the same way in every
evaluation and on every layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from pretrain.data.masking import block_causal_mask, document_positions
from pretrain.data.mixture import assign_sources, mix_offset, normalize_weights, slice_bounds
from pretrain.data.objectives import Clm, Corrupted, Objective, window_keys
from pretrain.data.prefetch import Prefetcher
from pretrain.data.windows import WindowSource
from pretrain.errors import DataError
from pretrain.models.loss import IGNORE_INDEX

STATE_VERSION = 2
_DATA_CHANGE_HINT = ("resume with the data and seq_len it was saved with, or set "
                     "data.allow_data_change=true to continue on this data (each source keeps "
                     "its position)")


@dataclass
class Batch:
    """One rank's micro-batch. Unpacks as ``inputs, targets = batch``."""

    inputs: torch.Tensor
    """(B, T) int64 token ids."""
    targets: torch.Tensor
    """(B, T) int64 next-token ids."""
    doc_ids: torch.Tensor | None = None
    """(B, T) int64 document index of each input token within its window (document masking)."""
    positions: torch.Tensor | None = None
    """(B, T) int64 rotary positions restarting at each document (restart_positions)."""
    decoder_inputs: torch.Tensor | None = None
    """(B, T_dec) int64 decoder input ids of an encoder-decoder (targets shifted right, the
    pad id first); `inputs` are then the encoder's and `targets` are (B, T_dec)."""
    middle_mask: torch.Tensor | None = None
    """(B, T) bool, fim: the target is a token of a FIM middle (for the loss on the middles);
    not a model input."""
    source: str | None = None
    """Validation by source: the one source every row of the batch comes from."""

    @classmethod
    def from_numpy(cls, c: Corrupted) -> Batch:
        """A batch sharing the memory of an objective's arrays."""
        def tensor(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else torch.from_numpy(a)

        return cls(torch.from_numpy(c.inputs), torch.from_numpy(c.targets),
                   decoder_inputs=tensor(c.decoder_inputs), middle_mask=tensor(c.middle_mask))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.inputs, self.targets))

    def _map(self, f: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        return Batch(**{x.name: f(t) if isinstance(t := getattr(self, x.name), torch.Tensor)
                        else t for x in fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        """On `device`; non-blocking copies overlap the transfer when the batch is pinned."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        return self._map(lambda t: t.pin_memory())

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of the model's forward besides the tokens: `attn_mask` (built here,
        on the batch's device) with document masking, and `positions` when they restart."""
        kwargs = {}
        if self.doc_ids is not None:
            kwargs["attn_mask"] = block_causal_mask(self.doc_ids)
        if self.decoder_inputs is not None:
            kwargs["decoder_inputs"] = self.decoder_inputs
        if self.positions is not None:
            kwargs["positions"] = self.positions
        return kwargs


@dataclass(frozen=True)
class Plan:
    """What one batch holds, as the state decides it: row i is the `k[i]`-th window of source
    `sources[i]` in that source's seeded order, at global position `positions[i]`."""

    sources: np.ndarray
    k: np.ndarray
    positions: np.ndarray


@dataclass(frozen=True)
class Rows:
    """What one batch holds, resolved: row i is window `windows[i]` of source `sources[i]`, at
    position `positions[i]` of its stream (which keys its corruption)."""

    sources: np.ndarray
    windows: np.ndarray
    positions: np.ndarray
    starts: np.ndarray | None = None
    """Stream offset of each row's first token, for windows that overlap (sliding-window
    validation); None: window w starts at w * (window_len - 1)."""


class ShardedWindowLoader:
    """Batches of windows of one split of one or several prepared datasets, for one rank.

    `data_dir` is one prepared directory (a source named "data") or a mapping of source names
    to directories, mixed by `weights` (default: in proportion to their tokens, as if they were
    concatenated). `objective` (default next-token prediction) sets the tokens per window,
    ``objective.window_len(seq_len)``, and what a batch holds.
    """

    def __init__(
        self, data_dir: str | Mapping[str, str], split: str = "train", *, seq_len: int,
        micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
        vocab_size: int, tokenizer_fingerprint: str | None = None, verify: bool = True,
        weights: Mapping[str, float] | None = None, document_masking: bool = False,
        restart_positions: bool = False, num_workers: int = 0, prefetch: int = 2,
        pin_memory: bool = False, allow_data_change: bool = False,
        objective: Objective | None = None,
    ):
        if seq_len <= 0 or micro_batch_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need seq_len > 0, micro_batch_size > 0 and 0 <= dp_rank < "
                             f"dp_size; got {seq_len}, {micro_batch_size}, {dp_rank}, {dp_size}")
        dirs = {"data": data_dir} if isinstance(data_dir, str) else dict(data_dir)
        self.split, self.seq_len, self.micro_batch_size = split, seq_len, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.objective = objective if objective is not None else Clm()
        self.window_len = self.objective.window_len(seq_len)
        """Tokens read per window; consecutive windows share one token (stride window_len - 1)."""
        self.sources = [WindowSource(name, dirs[name], split, seq_len=self.window_len - 1,
                                     vocab_size=vocab_size, verify=verify,
                                     tokenizer_fingerprint=tokenizer_fingerprint)
                        for name in sorted(dirs)]
        _check_same_tokenizer(self.sources)
        self.names = [s.name for s in self.sources]
        self.set_weights(weights)
        self.document_masking = document_masking or restart_positions
        self.restart_positions = restart_positions
        self.num_workers, self.prefetch = num_workers, max(1, prefetch)
        self.pin_memory, self.allow_data_change = pin_memory, allow_data_change
        self.cursor = 0
        """Positions consumed by all ranks together since the start of training."""
        self.consumed = np.zeros(len(self.sources), dtype=np.int64)
        """Windows each source has given all ranks together: its position in its own order."""
        self.last_rows = Rows(*(np.zeros(0, dtype=np.int64) for _ in range(3)))
        """The rows of this rank's most recent batch."""
        self.notes: list[str] = []
        """What `load_state_dict` found changed and carried on with (for the run's log)."""
        self._ahead: Prefetcher[Plan, tuple[Batch, Rows]] | None = None

    # -- the order -----------------------------------------------------------------------------

    def set_weights(self, weights: Mapping[str, float] | None) -> None:
        """Mix the sources by `weights` from the next planned batch on."""
        if weights is None:
            weights = {s.name: float(s.n_tokens) for s in self.sources}
        missing = set(self.names) ^ set(weights)
        if missing:
            raise DataError(f"mixture weights name {sorted(weights)} but the sources are "
                            f"{self.names}; give one weight per source")
        self.weights = normalize_weights({n: weights[n] for n in self.names})
        self._bounds = slice_bounds([self.weights[n] for n in self.names])
        self._reset_prefetch()

    @property
    def global_batch_windows(self) -> int:
        return self.micro_batch_size * self.dp_size

    def plan(self, cursor: int, consumed: np.ndarray) -> tuple[Plan, np.ndarray]:
        """This rank's rows of the batch at `cursor`, and each source's count after the whole
        global batch. Every rank computes the same global assignment and takes its slice. Cheap:
        the windows themselves are resolved (`resolve`) where the batch is read."""
        n = self.global_batch_windows
        sources = assign_sources(np.arange(cursor, cursor + n), self._bounds,
                                 mix_offset(self.seed))
        k = np.empty(n, dtype=np.int64)  # each position's index in its source's order
        after = consumed.copy()
        for s in range(len(self.sources)):
            at = sources == s
            k[at] = consumed[s] + np.arange(int(at.sum()))
            after[s] += int(at.sum())
        mine = slice(self.dp_rank * self.micro_batch_size,
                     (self.dp_rank + 1) * self.micro_batch_size)
        positions = np.arange(cursor, cursor + n, dtype=np.int64)
        return Plan(sources[mine], k[mine], positions[mine]), after

    def resolve(self, plan: Plan) -> Rows:
        """The window ids of a plan's rows (each source's seeded permutation)."""
        windows = np.empty_like(plan.k)
        for s in np.unique(plan.sources):
            at = plan.sources == s
            windows[at] = self.sources[s].window_ids(plan.k[at], self.seed)
        return Rows(plan.sources, windows, plan.positions)

    def skip(self, positions: int) -> None:
        """Advance the state by `positions` global positions without reading them, exactly as
        if they had been consumed (to look at a later step; chunked, so any distance works)."""
        while positions > 0:
            n = min(positions, 1 << 20)
            sources = assign_sources(np.arange(self.cursor, self.cursor + n), self._bounds,
                                     mix_offset(self.seed))
            self.consumed = self.consumed + np.bincount(sources, minlength=len(self.sources))
            self.cursor += n
            positions -= n
        self._reset_prefetch()

    # -- batches -------------------------------------------------------------------------------

    def next_batch(self) -> Batch:
        """This rank's next batch: inputs and targets (micro_batch_size, seq_len), and document
        ids / positions when masking is on."""
        if self.num_workers <= 0:
            plan, after = self.plan(self.cursor, self.consumed)
            batch, rows = self._fetch(plan)
        else:
            if self._ahead is None:
                self._ahead = Prefetcher(
                    self.plan, self._fetch, cursor=self.cursor, consumed=self.consumed,
                    step=self.global_batch_windows, num_workers=self.num_workers,
                    depth=self.num_workers * self.prefetch)
            ahead = self._ahead.get()
            after = ahead.consumed
            batch, rows = ahead.future.result()
        self.cursor += self.global_batch_windows
        self.consumed, self.last_rows = after, rows
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def _fetch(self, plan: Plan) -> tuple[Batch, Rows]:
        rows = self.resolve(plan)
        return self.read(rows), rows

    def read(self, rows: Rows, stream: str | None = None) -> Batch:
        """Read the windows `rows` names into a batch, corrupted by the objective with the keys
        of their positions in `stream` (default: the split; thread-safe: the shards are
        read-only)."""
        tokens = np.empty((len(rows.windows), self.window_len), dtype=np.int64)  # (B, W)
        if rows.starts is None:
            for out, s, w in zip(tokens, rows.sources, rows.windows):
                self.sources[s].read(int(w), out)
        else:
            for out, s, start in zip(tokens, rows.sources, rows.starts.tolist()):
                self.sources[s].read_at(start, out)
        masking = self.document_masking and self.objective.aligned
        # Document ids of every window token when the objective needs them, else of the inputs.
        length = self.window_len if self.objective.needs_doc_ids else self.seq_len
        ids = self._document_ids(rows, length) if masking or self.objective.needs_doc_ids else None
        keys = window_keys(self.seed, stream or self.split, rows.positions)
        batch = Batch.from_numpy(self.objective.corrupt(tokens, keys, ids))
        if masking:
            assert ids is not None
            ids = np.ascontiguousarray(ids[:, :self.seq_len])  # (B, T)
            batch.doc_ids = torch.from_numpy(ids)
            if self.restart_positions:
                batch.positions = torch.from_numpy(document_positions(ids))
        return batch.pin_memory() if self.pin_memory else batch

    def _document_ids(self, rows: Rows, length: int) -> np.ndarray:
        ids = np.empty((len(rows.windows), length), dtype=np.int64)  # (B, length)
        starts = self._starts(rows)
        for s in np.unique(rows.sources):
            at = rows.sources == s
            ids[at] = self.sources[s].document_ids_at(starts[at], length)
        return ids

    def _starts(self, rows: Rows) -> np.ndarray:
        """Stream offset of each row's first token."""
        return rows.windows * (self.window_len - 1) if rows.starts is None else rows.starts

    def _reset_prefetch(self) -> None:
        """Drop batches read ahead under a state that no longer holds."""
        if getattr(self, "_ahead", None) is not None:
            assert self._ahead is not None
            self._ahead.close()
            self._ahead = None

    def close(self) -> None:
        """Stop the prefetch threads."""
        self._reset_prefetch()

    def eval_windows(self, n_windows: int, source: str | None = None, *,
                     stride: int | None = None, by_source: bool = False) -> Iterator[Batch]:
        """This rank's micro-batches of the first `n_windows` validation windows, the same set
        in every run and on every layout: each source's windows in stream order from window 0
        (wrapping around a small split), mixed by weight (or only `source`'s).

        Eval position ``p < n_windows`` is a real window; batch ``i`` of rank ``r`` holds
        positions ``[i * g + r * mb, i * g + (r + 1) * mb)`` with ``g = mb * dp_size``. Every
        rank yields ``ceil(n_windows / g)`` full batches, because sharded and replicated models
        run collectives in forward and no rank may skip one: positions past `n_windows` are
        padding rows, which repeat a real window (doc ids and positions included) with every
        target IGNORE_INDEX. A loss summed over the targets that are not IGNORE_INDEX, across
        ranks, is therefore the same for any dp_size and micro-batch size. The objective's
        corruption is keyed by the eval position (a padding row repeats its real row's), so it
        is the same in every evaluation. The training position is untouched.

        `by_source`: the same windows (and keys), batched one source at a time, each batch
        naming its `source`, so a loss can be told apart by source on any layout (each source
        pads its own last batch). `stride` (next-token prediction): window ``j`` of a source
        starts at token ``j * stride`` rather than ``j * seq_len``; window 0 scores all its
        targets and every later one only its last `stride` (the others, already scored with
        less context, become IGNORE_INDEX context), so each token of the stream is scored once,
        with ``seq_len - stride + 1`` to ``seq_len`` tokens of context (the transformers perplexity
        guide's method). `stride=seq_len` is the plain set.
        """
        if n_windows <= 0:
            raise ValueError(f"need n_windows > 0; got {n_windows}")
        seq_len = self.window_len - 1
        if stride is not None and not (0 < stride <= seq_len and self.objective.name == "clm"):
            raise ValueError(f"stride={stride} needs objective clm and 0 < stride <= "
                             f"seq_len={seq_len}")
        g, mb = self.global_batch_windows, self.micro_batch_size
        positions = np.arange(n_windows)
        if source is None:
            sources = assign_sources(positions, self._bounds, np.uint64(0))
        else:
            sources = np.full(n_windows, self._index(source))
        windows = np.empty_like(positions)
        for s, src in enumerate(self.sources):
            at = sources == s
            per_epoch = src.windows_per_epoch if stride is None else src.windows_at_stride(stride)
            windows[at] = np.arange(int(at.sum())) % per_epoch
        starts = None if stride is None else windows * stride
        stream = f"eval:{self.split}" + ("" if source is None else f":{source}")
        groups = ([(self.names[s], positions[sources == s]) for s in np.unique(sources)]
                  if by_source else [(None, positions)])
        for name, real in groups:
            for i in range(-(-len(real) // g)):
                at = i * g + self.dp_rank * mb + np.arange(mb)
                padding = at >= len(real)
                rows = real[at % len(real)]  # a padding row reads some real window
                batch = self.read(Rows(sources[rows], windows[rows], rows,
                                      None if starts is None else starts[rows]), stream)
                if stride is not None:  # later windows score only their last `stride` targets
                    later = torch.from_numpy(windows[rows] > 0)
                    batch.targets[later, :seq_len - stride] = IGNORE_INDEX
                batch.targets[torch.from_numpy(padding)] = IGNORE_INDEX
                if batch.middle_mask is not None:
                    batch.middle_mask[torch.from_numpy(padding)] = False
                batch.source = name
                yield batch

    def _index(self, name: str) -> int:
        if name not in self.names:
            raise DataError(f"no source named {name!r}; the sources are {self.names}")
        return self.names.index(name)

    # -- accounting ----------------------------------------------------------------------------

    @property
    def windows_per_epoch(self) -> int:
        return sum(s.windows_per_epoch for s in self.sources)

    @property
    def tokens_per_epoch(self) -> int:
        """Tokens in one pass over every source, counted as the windows' seq_len inputs (each
        predicts seq_len tokens; for span corruption, seq_len is the encoder's input)."""
        return self.windows_per_epoch * self.seq_len

    def tokens_consumed(self) -> dict[str, int]:
        """Target tokens each source has given all ranks together since the start of training."""
        return {n: int(c) * self.seq_len for n, c in zip(self.names, self.consumed)}

    def metrics(self) -> dict[str, float]:
        """Per-source tokens consumed and epochs (passes over the source), for the run's log."""
        out: dict[str, float] = {}
        for s, c in zip(self.sources, self.consumed):
            out[f"data/tokens/{s.name}"] = float(c * self.seq_len)
            out[f"data/epoch/{s.name}"] = float(c) / s.windows_per_epoch
        return out

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The global position and each source's, with what identifies the data; JSON-ready and
        identical on every rank."""
        return {
            "version": STATE_VERSION, "cursor": self.cursor, "seed": self.seed,
            "seq_len": self.seq_len,
            "sources": {s.name: {"consumed": int(c), "fingerprint": s.fingerprint,
                                 "weight": self.weights[s.name],
                                 "windows_per_epoch": s.windows_per_epoch}
                        for s, c in zip(self.sources, self.consumed)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly after the saved position (with the saved seed), for any dp_size and
        number of workers. Different data (shards, tokenizer, set of sources, seq_len) is a
        DataError unless `allow_data_change`; new weights are simply used from here on."""
        saved = _saved_sources(state)
        changes = _data_changes(state, saved, self.sources, self.seq_len)
        if changes and not self.allow_data_change:
            raise DataError(f"the checkpoint's data position belongs to other data: "
                            f"{'; '.join(changes)}; {_DATA_CHANGE_HINT}")
        # With an allowed seq_len change, keep the tokens consumed rather than the windows.
        scale = int(state["seq_len"]) / self.seq_len
        self.cursor = int(int(state["cursor"]) * scale)
        self.consumed = np.array([int(saved[n]["consumed"] * scale) if n in saved else 0
                                  for n in self.names], dtype=np.int64)
        self.seed = int(state["seed"])
        self.notes = [f"continuing on changed data: {c}" for c in changes]
        old = {n: saved[n].get("weight") for n in self.names if n in saved}
        if any(w is None or abs(w - self.weights[n]) > 1e-9 for n, w in old.items()):
            self.notes.append(f"mixture weights changed from {old} to {self.weights}; each "
                              "source continues from its own position")
        self._reset_prefetch()

    def __del__(self) -> None:
        self._reset_prefetch()


def _check_same_tokenizer(sources: list[WindowSource]) -> None:
    fingerprints = {s.tokenizer_fingerprint for s in sources}
    if len(fingerprints) > 1:
        by = {s.name: s.tokenizer_fingerprint[:12] for s in sources}
        raise DataError(f"the mixed datasets were prepared with different tokenizers ({by}); "
                        "prepare every source with the same tokenizer")


def _saved_sources(state: dict[str, Any]) -> dict[str, Any]:
    if state.get("version") != STATE_VERSION or not isinstance(state.get("sources"), dict):
        raise DataError(f"the checkpoint's data position has format version "
                        f"{state.get('version')}; this pretrain reads version {STATE_VERSION}; "
                        "start a new run")
    return state["sources"]


def _data_changes(state: dict[str, Any], saved: dict[str, Any], sources: list[WindowSource],
                  seq_len: int) -> list[str]:
    """How the configured data differs from the data the position was saved on."""
    changes = []
    if int(state["seq_len"]) != seq_len:
        changes.append(f"seq_len was {state['seq_len']}, now {seq_len}")
    names = {s.name for s in sources}
    if set(saved) - names:
        changes.append(f"sources {sorted(set(saved) - names)} are no longer configured")
    if names - set(saved):
        changes.append(f"sources {sorted(names - set(saved))} are new")
    for s in sources:
        if s.name in saved and saved[s.name]["fingerprint"] != s.fingerprint:
            changes.append(f"source {s.name!r} ({s.data_dir}) holds other shards or another "
                           "tokenizer than when the position was saved")
    return changes
