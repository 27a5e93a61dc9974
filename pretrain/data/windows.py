"""The windows of one split of one prepared dataset, and the seeded order they are read in.

The token stream of a split is its shards concatenated in manifest order. Window `w` is tokens
``[w * seq_len, w * seq_len + seq_len + 1)`` of that stream (inputs and the targets shifted by
one); windows may cross shard boundaries and document boundaries (documents end with EOS).
There are ``(n_tokens - 1) // seq_len`` windows per epoch; the last few tokens that do not fill a
window are not trained on.

A source is read in an endless order: its k-th window is ``perm_epoch(k % windows_per_epoch)``
in epoch ``k // windows_per_epoch``, where ``perm_epoch`` is a pseudo-random permutation keyed by
(seed, source name, epoch) alone.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from pretrain.data.shards import PREPARE_HINT, Shard, read_manifest, read_shard
from pretrain.errors import DataError

_ROUNDS = 4
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a cheap, well-mixed hash of uint64 values (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def permute(positions: np.ndarray, n: int, *, seed: int | str, epoch: int) -> np.ndarray:
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
            left, right = right, left ^ (mix64(right ^ key) & mask)
        return (left << half) | right

    out = encrypt(positions.astype(np.uint64))
    while (outside := out >= np.uint64(n)).any():
        out[outside] = encrypt(out[outside])
    return out.astype(np.int64)


class WindowSource:
    """One split of one prepared dataset, cut into windows of seq_len + 1 tokens."""

    def __init__(
        self, name: str, data_dir: str, split: str, *, seq_len: int, vocab_size: int,
        tokenizer_fingerprint: str | None = None, verify: bool = True,
    ):
        self.name, self.data_dir, self.split, self.seq_len = name, data_dir, split, seq_len
        manifest = read_manifest(data_dir)
        _check_manifest(manifest, data_dir, split, tokenizer_fingerprint)
        _check_vocab(manifest, data_dir, vocab_size)
        entries = manifest["splits"][split]["shards"]
        self.shards = [_open_shard(data_dir, e, vocab_size, verify) for e in entries]
        # Plain ndarray views of the maps: slicing np.memmap costs several times more per call.
        self._tokens = [np.asarray(s.tokens) for s in self.shards]
        self._doc_ends = [np.asarray(s.doc_ends).astype(np.int64, copy=False)
                          if s.n_docs else np.zeros(0, dtype=np.int64) for s in self.shards]
        self.tokenizer_fingerprint: str = manifest["tokenizer"]["fingerprint"]
        self.starts = np.cumsum([0] + [s.n_tokens for s in self.shards])
        """(n_shards + 1,) offset of each shard in the split's stream, and the total."""
        self.n_tokens = int(self.starts[-1])
        self.windows_per_epoch = max(0, (self.n_tokens - 1) // seq_len)
        if self.windows_per_epoch == 0:
            raise DataError(f"the {split} split of {data_dir} ({name}) holds {self.n_tokens} "
                            f"tokens, fewer than one window of seq_len + 1 = {seq_len + 1}; "
                            "lower seq_len, prepare more data (or a larger "
                            "data.val_fraction), or drop the source")
        self.fingerprint = _fingerprint(split, entries, self.tokenizer_fingerprint)
        """Digest of the shard names, sizes and checksums and of the tokenizer."""

    @property
    def tokens_per_epoch(self) -> int:
        """Target tokens trained on per epoch (each window predicts seq_len tokens)."""
        return self.windows_per_epoch * self.seq_len

    def windows_at_stride(self, stride: int) -> int:
        """Windows of seq_len + 1 tokens that start every `stride` tokens and fit the split
        (``windows_per_epoch`` when stride is seq_len)."""
        return (self.n_tokens - 1 - self.seq_len) // stride + 1

    def window_ids(self, k: np.ndarray, seed: int) -> np.ndarray:
        """Window ids of the source's k-th windows in its seeded order (any epochs)."""
        epochs, offsets = np.divmod(np.asarray(k, dtype=np.int64), self.windows_per_epoch)
        out = np.empty_like(offsets)
        for epoch in np.unique(epochs):
            at = epochs == epoch
            out[at] = permute(offsets[at], self.windows_per_epoch, seed=f"{seed}:{self.name}",
                              epoch=int(epoch))
        return out

    def read(self, w: int, out: np.ndarray) -> None:
        """Copy the seq_len + 1 tokens of window `w` into `out`, across shards if need be."""
        self.read_at(w * self.seq_len, out)

    def read_at(self, start: int, out: np.ndarray) -> None:
        """Copy the len(out) tokens from stream offset `start` into `out` (sliding-window
        validation reads windows that start anywhere)."""
        stop = start + len(out)
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while start < stop:
            base, end = int(self.starts[i]), int(self.starts[i + 1])
            take = min(stop, end)
            out[done:done + take - start] = self._tokens[i][start - base:take - base]
            done += take - start
            start, i = take, i + 1

    def window(self, w: int) -> np.ndarray:
        """The seq_len + 1 tokens of window `w`, as int64."""
        out = np.empty(self.seq_len + 1, dtype=np.int64)
        self.read(w, out)
        return out

    def document_ids(self, windows: np.ndarray, length: int | None = None) -> np.ndarray:
        """(n, length) document index of each of the first `length` tokens of `windows` (default
        seq_len: the input tokens; up to seq_len + 1, the whole window), counted from 0 at each
        window's first token: the token after a document's end (its EOS) starts the next one."""
        return self.document_ids_at(np.asarray(windows, dtype=np.int64) * self.seq_len, length)

    def document_ids_at(self, starts: np.ndarray, length: int | None = None) -> np.ndarray:
        """`document_ids` of the windows that begin at stream offsets `starts`."""
        length = self.seq_len if length is None else length
        if not 0 < length <= self.seq_len + 1:
            raise ValueError(f"a window has {self.seq_len + 1} tokens; asked for {length}")
        starts = np.asarray(starts, dtype=np.int64)
        starts_new = np.zeros((len(starts), length), dtype=np.int64)
        for row, start in enumerate(starts.tolist()):
            # An end offset e in (start, start + length) makes token e - start a start.
            ends = self.doc_ends_between(start, start + length - 1)
            starts_new[row, ends - start] = 1
        return np.cumsum(starts_new, axis=1)

    def doc_ends_between(self, start: int, stop: int) -> np.ndarray:
        """Stream offsets in (start, stop] where a document ends (exclusive end offsets), read
        from the few shards the range spans rather than from one array of all documents."""
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        last = int(np.searchsorted(self.starts, stop, side="left"))
        parts = []
        for i in range(max(first, 0), min(last, len(self.shards))):
            base = int(self.starts[i])
            ends = self._doc_ends[i]
            lo, hi = np.searchsorted(ends, [max(start - base, 0), stop - base], side="right")
            parts.append(ends[lo:hi] + base)
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


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


def _fingerprint(split: str, entries: list[dict[str, Any]], tokenizer: str) -> str:
    h = hashlib.sha256(f"{split}\0{tokenizer}".encode())
    for e in entries:
        h.update(f"\0{e['name']}\0{e['n_tokens']}\0{e['checksum']}".encode())
    return h.hexdigest()[:32]
