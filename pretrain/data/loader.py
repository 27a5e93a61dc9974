"""The training data loader: one global, seeded order of windows, sliced per data-parallel rank.

The token stream of a split is its shards concatenated in manifest order. Window `w` is tokens
``[w * seq_len, w * seq_len + seq_len + 1)`` of that stream (inputs and the targets shifted by
one); windows may cross shard boundaries and document boundaries (documents are separated by
EOS). There are ``(n_tokens - 1) // seq_len`` windows per epoch; the last few tokens that do not
fill a window are not trained on.

Training reads an endless sequence of windows: position ``g`` (the global cursor) lies in epoch
``g // windows_per_epoch`` and maps to window ``perm_epoch(g % windows_per_epoch)``, where
``perm_epoch`` is a pseudo-random permutation keyed by (seed, epoch) alone. Each call to
`next_batch` consumes ``micro_batch_size * dp_size`` positions and rank ``r`` takes positions
``[cursor + r * mb, cursor + (r + 1) * mb)``, so the windows of an optimizer step depend on the
global batch only, not on how it is split between ranks and accumulation steps, and the state
(the cursor) is the same on every rank and survives a change of dp_size on resume.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pretrain.data.shards import PREPARE_HINT, DataError, Shard, read_manifest, read_shard

_ROUNDS = 4
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a cheap, well-mixed hash of uint64 values (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def permute(positions: np.ndarray, n: int, *, seed: int, epoch: int) -> np.ndarray:
    """The images of `positions` (all in [0, n)) under a permutation of [0, n) keyed by
    (seed, epoch).

    A balanced Feistel network permutes [0, 2^bits) for the smallest even `bits` covering n;
    cycle walking (re-applying it to images >= n) restricts it to [0, n). Any position is
    computed on its own in O(1) memory, so no array of n indices is ever built.
    """
    bits = max(2, (n - 1).bit_length())
    bits += bits % 2
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    digest = hashlib.blake2b(f"{seed}:{epoch}".encode(), digest_size=8 * _ROUNDS).digest()
    keys = np.frombuffer(digest, dtype=np.uint64)

    def encrypt(x: np.ndarray) -> np.ndarray:
        left, right = x >> half, x & mask
        for key in keys:
            left, right = right, left ^ (_mix(right ^ key) & mask)
        return (left << half) | right

    out = encrypt(positions.astype(np.uint64))
    while (outside := out >= np.uint64(n)).any():
        out[outside] = encrypt(out[outside])
    return out.astype(np.int64)


class ShardedWindowLoader:
    """Batches of (inputs, targets) windows of one split of a prepared dataset, for one rank."""

    def __init__(
        self, data_dir: str, split: str = "train", *, seq_len: int, micro_batch_size: int,
        dp_rank: int = 0, dp_size: int = 1, seed: int = 0, vocab_size: int,
        tokenizer_fingerprint: str | None = None, verify: bool = True,
    ):
        if seq_len <= 0 or micro_batch_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need seq_len > 0, micro_batch_size > 0 and 0 <= dp_rank < "
                             f"dp_size; got {seq_len}, {micro_batch_size}, {dp_rank}, {dp_size}")
        self.data_dir, self.split = data_dir, split
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        manifest = read_manifest(data_dir)
        _check_manifest(manifest, data_dir, split, tokenizer_fingerprint)
        entries = manifest["splits"][split]["shards"]
        self.shards = [_open_shard(data_dir, e, vocab_size, verify) for e in entries]
        _check_vocab(manifest, data_dir, vocab_size)
        self._starts = np.cumsum([0] + [s.n_tokens for s in self.shards])
        self.n_tokens = int(self._starts[-1])
        self.windows_per_epoch = max(0, (self.n_tokens - 1) // seq_len)
        if self.windows_per_epoch == 0:
            raise DataError(f"the {split} split of {data_dir} holds {self.n_tokens} tokens, "
                            f"fewer than one window of seq_len + 1 = {seq_len + 1}; lower "
                            "seq_len, or prepare more data (or a larger data.val_fraction)")
        self.dataset_fingerprint = _fingerprint(split, entries)
        self.cursor = 0
        """Windows consumed by all ranks together since the start of training."""
        self.last_windows = np.zeros(0, dtype=np.int64)
        """Window ids of this rank's most recent batch (see `document_ids`)."""
        self._doc_ends: np.ndarray | None = None

    @property
    def tokens_per_epoch(self) -> int:
        """Target tokens trained on per epoch (each window predicts seq_len tokens)."""
        return self.windows_per_epoch * self.seq_len

    @property
    def epoch(self) -> int:
        return self.cursor // self.windows_per_epoch

    @property
    def global_batch_windows(self) -> int:
        return self.micro_batch_size * self.dp_size

    def window_ids(self, positions: np.ndarray) -> np.ndarray:
        """Window ids at global positions of the training order (any epochs)."""
        positions = np.asarray(positions, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.windows_per_epoch)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            at = epochs == epoch
            out[at] = permute(offsets[at], self.windows_per_epoch, seed=self.seed,
                              epoch=int(epoch))
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (inputs, targets), each int64 (micro_batch_size, seq_len)."""
        first = self.cursor + self.dp_rank * self.micro_batch_size
        self.last_windows = self.window_ids(np.arange(first, first + self.micro_batch_size))
        self.cursor += self.global_batch_windows
        return self._batch(self.last_windows)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def eval_batches(self, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`n` fixed batches for evaluation: windows in stream order from window 0 (wrapping
        around a small split), sliced by rank like training batches; the cursor is untouched."""
        for i in range(n):
            first = i * self.global_batch_windows + self.dp_rank * self.micro_batch_size
            windows = np.arange(first, first + self.micro_batch_size) % self.windows_per_epoch
            yield self._batch(windows)

    def _batch(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self.window(int(w)) for w in windows]).astype(np.int64)
        inputs = torch.from_numpy(np.ascontiguousarray(rows[:, :-1]))  # (B, T)
        targets = torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))  # (B, T)
        return inputs, targets

    def window(self, w: int) -> np.ndarray:
        """The seq_len + 1 tokens of window `w`, gathered across shards when it crosses one."""
        start = w * self.seq_len
        return self._tokens(start, start + self.seq_len + 1)

    def _tokens(self, start: int, stop: int) -> np.ndarray:
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        parts = []
        while start < stop:
            base = int(self._starts[i])
            take = min(stop, int(self._starts[i + 1]))
            parts.append(self.shards[i].tokens[start - base:take - base])
            start, i = take, i + 1
        return np.concatenate(parts)

    @property
    def doc_ends(self) -> np.ndarray:
        """(n_docs,) exclusive end offsets of the documents in the split's token stream."""
        if self._doc_ends is None:
            ends = [s.doc_ends.astype(np.int64) + base
                    for s, base in zip(self.shards, self._starts[:-1])]
            self._doc_ends = np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64)
        return self._doc_ends

    def document_ids(self, windows: np.ndarray) -> np.ndarray:
        """(len(windows), seq_len) index of the document each input token belongs to, for
        document-masked attention: tokens may attend to each other only within one document."""
        positions = np.asarray(windows, dtype=np.int64)[:, None] * self.seq_len
        positions = positions + np.arange(self.seq_len)
        return np.searchsorted(self.doc_ends, positions, side="right")

    def state_dict(self) -> dict[str, Any]:
        """The global position in the data order; identical on every rank."""
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "seq_len": self.seq_len, "dataset": self.dataset_fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly after the saved position (with the saved seed), for any dp_size."""
        if state["dataset"] != self.dataset_fingerprint or state["seq_len"] != self.seq_len:
            raise DataError(f"the checkpoint's data position belongs to another dataset or "
                            f"seq_len (seq_len={state['seq_len']}, this loader reads "
                            f"{self.data_dir} with seq_len={self.seq_len}); resume with the data "
                            "and seq_len it was saved with, or start a new run")
        self.cursor = int(state["cursor"])
        self.seed = int(state["seed"])


def _check_manifest(manifest: dict[str, Any], data_dir: str, split: str,
                    tokenizer_fingerprint: str | None) -> None:
    if split not in manifest["splits"]:
        raise DataError(f"{data_dir} has no {split!r} split (it has "
                        f"{sorted(manifest['splits'])}); {PREPARE_HINT}")
    fingerprint = manifest["tokenizer"]["fingerprint"]
    if tokenizer_fingerprint is not None and tokenizer_fingerprint != fingerprint:
        raise DataError(f"{data_dir} was prepared with a different tokenizer than the one in "
                        "use; use the tokenizer it was prepared with (its tokenizer.model) or "
                        "re-prepare the data")


def _check_vocab(manifest: dict[str, Any], data_dir: str, vocab_size: int) -> None:
    # The shards may happen to use only low ids, but the tokenizer can emit any of its ids.
    if manifest["vocab_size"] > vocab_size:
        raise DataError(f"{data_dir} was tokenized with vocabulary {manifest['vocab_size']} but "
                        f"model.vocab_size={vocab_size}; set model.vocab_size="
                        f"{manifest['vocab_size']} or re-prepare with a matching tokenizer")


def _open_shard(data_dir: str, entry: dict[str, Any], vocab_size: int, verify: bool) -> Shard:
    shard = read_shard(os.path.join(data_dir, entry["name"]), verify=verify)
    if shard.checksum != entry["checksum"] or shard.n_tokens != entry["n_tokens"]:
        raise DataError(f"shard {shard.path} does not match {data_dir}'s manifest (replaced or "
                        f"from another preparation); {PREPARE_HINT}")
    if shard.max_token_id >= vocab_size:
        raise DataError(f"shard {shard.path} holds token id {shard.max_token_id}, outside the "
                        f"model's vocabulary of {vocab_size}: the data was tokenized with "
                        "another tokenizer; set model.vocab_size to the tokenizer's vocabulary "
                        "or re-prepare the data with the model's tokenizer")
    return shard


def _fingerprint(split: str, entries: list[dict[str, Any]]) -> str:
    h = hashlib.sha256(split.encode())
    for e in entries:
        h.update(f"\0{e['name']}\0{e['checksum']}".encode())
    return h.hexdigest()[:32]
