"""Turn a corpus into token shards: tokenizer training, preparation, and the trainer's cache.

`prepare` streams documents, tokenizes them in worker processes, appends EOS to each, sends each
document to the train or validation split by a hash of its index and text, and fills
fixed-size shards of each split; the manifest is written last. The output depends only on the
inputs, never on the number of workers.

`ensure_prepared` is the trainer's single call: it returns a prepared directory and tokenizer for
a `DataConfig`, training and preparing into a cache on first use, under a file lock so that
concurrent ranks or runs never race on the same cache entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import multiprocessing as mp
import os
import re
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from pretrain.data.shards import (
    FORMAT_VERSION,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    DataError,
    dtype_for_vocab,
    read_manifest,
    write_manifest,
    write_shard,
)
from pretrain.data.sources import describe_source, iter_documents
from pretrain.data.tokenizer import Tokenizer, train_tokenizer

if TYPE_CHECKING:  # importing the config pulls in Hydra, which spawned workers don't need
    from pretrain.config import DataConfig

SPLITS = ("train", "val")
TOKENIZER_FILE = "tokenizer.model"
# Bump when tokenizer training or preparation changes output, so stale caches are not reused.
_CACHE_VERSION = 1
_BATCH_BYTES = 1 << 18  # documents per worker task: enough work to amortize the round trip
_BATCH_DOCS = 1024
_SHARD_NAME = re.compile(r"^\d{6}\.bin$")

T = TypeVar("T")
R = TypeVar("R")


def train_tokenizer_from_source(
    source: str, out_path: str, *, vocab_size: int, sample_bytes: int,
    text_field: str = "text", split: str = "train",
) -> str:
    """Train a tokenizer on the first `sample_bytes` of a source (see `iter_documents`)."""
    docs = iter_documents(source, text_field=text_field, split=split, max_bytes=sample_bytes)
    return train_tokenizer(docs, out_path, vocab_size=vocab_size)


# ---------------------------------------------------------------------------------------------
# Tokenization in worker processes


@dataclass
class _Tokenized:
    """One batch of documents, tokenized and split; each document ends with EOS."""

    tokens: dict[str, np.ndarray]
    """split -> (n,) uint32 tokens of that split's documents, concatenated."""
    lengths: dict[str, np.ndarray]
    """split -> (n_docs,) int64 document lengths, EOS included."""


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(tokenizer_path)


def is_val_document(index: int, text: str, val_fraction: float) -> bool:
    """Whether document `index` goes to validation: a hash of index and text, below the fraction.

    Document 0 always does when val_fraction > 0, so a small corpus still has a validation split.
    """
    if val_fraction <= 0:
        return False
    if index == 0:
        return True
    digest = hashlib.blake2b(f"{index}\0{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < val_fraction


def _tokenize_batch(task: tuple[int, list[str], float]) -> _Tokenized:
    start, texts, val_fraction = task
    assert _worker_tokenizer is not None, "worker not initialized"
    eos = _worker_tokenizer.eos_id
    docs: dict[str, list[list[int]]] = {s: [] for s in SPLITS}
    for i, (text, ids) in enumerate(zip(texts, _worker_tokenizer.encode_batch(texts))):
        ids.append(eos)
        docs["val" if is_val_document(start + i, text, val_fraction) else "train"].append(ids)
    return _Tokenized(
        tokens={s: np.fromiter(itertools.chain.from_iterable(d), dtype=np.uint32)
                for s, d in docs.items()},
        lengths={s: np.array([len(ids) for ids in d], dtype=np.int64) for s, d in docs.items()},
    )


def _batches(docs: Iterable[str]) -> Iterator[tuple[int, list[str]]]:
    """(index of the first document, documents) in batches of about _BATCH_BYTES."""
    batch: list[str] = []
    size = start = 0
    for index, doc in enumerate(docs):
        batch.append(doc)
        size += len(doc)
        if size >= _BATCH_BYTES or len(batch) >= _BATCH_DOCS:
            yield start, batch
            batch, size, start = [], 0, index + 1
    if batch:
        yield start, batch


def _ordered_map(
    fn: Callable[[T], R], items: Iterable[T], *, workers: int,
    initializer: Callable[..., None], initargs: tuple[Any, ...],
) -> Iterator[R]:
    """fn over items in order, in `workers` processes, with a bounded number of tasks in flight.

    Pool.imap would read the whole input ahead of the workers (unbounded memory on a large
    corpus), so tasks are submitted through a window of 2 * workers. Workers are forked where
    the platform allows, as torch's DataLoader workers are: they touch neither torch nor CUDA,
    and unlike spawn, fork does not re-import the caller's main module (which fails for stdin
    or notebook code and costs a torch import per worker).
    """
    if workers <= 1:
        initializer(*initargs)
        yield from map(fn, items)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers, initializer, initargs) as pool:
        pending: deque[Any] = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---------------------------------------------------------------------------------------------
# Shard writing


class _SplitWriter:
    """Cuts one split's token stream into shards of exactly `shard_tokens` (the last partial)."""

    def __init__(self, data_dir: str, split: str, shard_tokens: int, vocab_size: int):
        self.data_dir, self.split = data_dir, split
        self.shard_tokens, self.vocab_size = shard_tokens, vocab_size
        self.chunks: list[np.ndarray] = []
        self.ends: list[np.ndarray] = []  # document end offsets relative to the pending tokens
        self.pending = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if not tokens.size:
            return
        self.chunks.append(tokens)
        self.ends.append(self.pending + np.cumsum(lengths))
        self.pending += tokens.size
        while self.pending >= self.shard_tokens:
            self._write(self.shard_tokens)

    def close(self) -> dict[str, Any]:
        """Write the partial last shard; return this split's manifest entry."""
        if self.pending:
            self._write(self.pending)
        return {"n_tokens": sum(s["n_tokens"] for s in self.shards),
                "n_docs": sum(s["n_docs"] for s in self.shards),
                "shards": self.shards}

    def _write(self, n: int) -> None:
        tokens = np.concatenate(self.chunks)
        ends = np.concatenate(self.ends)
        inside = ends <= n
        name = f"{self.split}/{len(self.shards):06d}.bin"
        checksum = write_shard(os.path.join(self.data_dir, name), tokens[:n], ends[inside],
                               vocab_size=self.vocab_size)
        self.shards.append({"name": name, "n_tokens": n, "n_docs": int(inside.sum()),
                            "checksum": checksum})
        self.chunks, self.ends = [tokens[n:]], [ends[~inside] - n]
        self.pending -= n


def _clear_previous(out_dir: str) -> None:
    """Unmark `out_dir` as prepared (manifest first), then remove shards an earlier run left."""
    manifest = os.path.join(out_dir, MANIFEST_NAME)
    if os.path.exists(manifest):
        os.unlink(manifest)
    for split in SPLITS:
        split_dir = os.path.join(out_dir, split)
        if os.path.isdir(split_dir):
            for name in os.listdir(split_dir):
                if _SHARD_NAME.match(name) or name.endswith(".tmp"):
                    os.unlink(os.path.join(split_dir, name))


# ---------------------------------------------------------------------------------------------
# prepare


def prepare(
    source: str, tokenizer_path: str, out_dir: str, *, num_workers: int = 1,
    shard_tokens: int = 1 << 20, val_fraction: float = 0.0, text_field: str = "text",
    split: str = "train", max_bytes: int = 0,
) -> dict[str, Any]:
    """Tokenize `source` into train/val shards under `out_dir`; return the manifest.

    The tokenizer is copied into `out_dir` (as tokenizer.model), so the directory is
    self-contained. The manifest is written last; until then `out_dir` is not a dataset.
    """
    if shard_tokens <= 0 or not 0.0 <= val_fraction < 1.0:
        raise DataError(f"shard_tokens={shard_tokens} must be > 0 and val_fraction="
                        f"{val_fraction} in [0, 1)")
    tok = Tokenizer.load(tokenizer_path)
    description = describe_source(source, text_field=text_field, split=split)
    os.makedirs(out_dir, exist_ok=True)
    _clear_previous(out_dir)
    writers = {s: _SplitWriter(out_dir, s, shard_tokens, tok.vocab_size) for s in SPLITS}
    docs = iter_documents(source, text_field=text_field, split=split, max_bytes=max_bytes)
    tasks = ((start, texts, val_fraction) for start, texts in _batches(docs))
    for result in _ordered_map(_tokenize_batch, tasks, workers=num_workers,
                               initializer=_init_worker, initargs=(tokenizer_path,)):
        for s in SPLITS:
            writers[s].add(result.tokens[s], result.lengths[s])
    splits = {s: w.close() for s, w in writers.items()}
    if not splits["train"]["n_docs"]:
        raise DataError(f"source {source} yielded no training documents for {out_dir}; check "
                        "the source and text field, or lower val_fraction")
    _copy_tokenizer(tokenizer_path, out_dir)
    manifest = _manifest(tok, splits, val_fraction=val_fraction, shard_tokens=shard_tokens,
                         source={"source": source, "description": description,
                                 "text_field": text_field, "split": split,
                                 "max_bytes": max_bytes})
    write_manifest(out_dir, manifest)
    return manifest


def _copy_tokenizer(tokenizer_path: str, out_dir: str) -> None:
    target = os.path.join(out_dir, TOKENIZER_FILE)
    if not (os.path.exists(target) and os.path.samefile(tokenizer_path, target)):
        shutil.copyfile(tokenizer_path, target)


def _manifest(tok: Tokenizer, splits: dict[str, Any], **params: Any) -> dict[str, Any]:
    return {
        **params,
        "format": MANIFEST_FORMAT,
        "version": FORMAT_VERSION,
        "vocab_size": tok.vocab_size,
        "dtype": dtype_for_vocab(tok.vocab_size).name,
        "eos_id": tok.eos_id,
        "n_tokens": sum(s["n_tokens"] for s in splits.values()),
        "tokenizer": {"file": TOKENIZER_FILE, "fingerprint": tok.fingerprint,
                      "source_path": os.path.abspath(tok.path)},
        "splits": splits,
    }


# ---------------------------------------------------------------------------------------------
# ensure_prepared: the trainer's entry


def ensure_prepared(cfg: DataConfig, *, vocab_size: int) -> tuple[str, str]:
    """(data_dir, tokenizer_path) for `cfg`, ready to load, checked against `vocab_size`.

    With `cfg.dir` set, the directory must be prepared already. Otherwise the tokenizer (when
    `cfg.tokenizer` is None) and the shards are made once into `cfg.cache_dir` and reused.
    """
    if cfg.dir is not None:
        return _check_prepared_dir(cfg, vocab_size)
    cache_dir = resolve_cache_dir(cfg.cache_dir)
    description = describe_source(cfg.source, text_field=cfg.text_field, split=cfg.split)
    tokenizer_path = cfg.tokenizer or _cached_tokenizer(cfg, cache_dir, description, vocab_size)
    tok = Tokenizer.load(tokenizer_path)
    check_vocab(tok, vocab_size)
    key = _cache_key(description, cfg.max_bytes, tok.fingerprint, cfg.val_fraction,
                     cfg.shard_tokens)
    data_dir = os.path.join(cache_dir, "data", f"{_safe(cfg.name)}-{key}")
    with file_lock(data_dir + ".lock"):
        if not os.path.isfile(os.path.join(data_dir, MANIFEST_NAME)):
            prepare(cfg.source, tokenizer_path, data_dir, num_workers=cfg.prepare_workers,
                    shard_tokens=cfg.shard_tokens, val_fraction=cfg.val_fraction,
                    text_field=cfg.text_field, split=cfg.split, max_bytes=cfg.max_bytes)
    return data_dir, tokenizer_path


def _cached_tokenizer(cfg: DataConfig, cache_dir: str, description: str, vocab_size: int) -> str:
    sample = min(cfg.tokenizer_sample_bytes, cfg.max_bytes or cfg.tokenizer_sample_bytes)
    key = _cache_key(cfg.name, description, cfg.max_bytes, vocab_size, sample)
    path = os.path.join(cache_dir, "tokenizers", f"{_safe(cfg.name)}-v{vocab_size}-{key}.model")
    with file_lock(path + ".lock"):
        if not os.path.isfile(path):
            train_tokenizer_from_source(cfg.source, path, vocab_size=vocab_size,
                                        sample_bytes=sample, text_field=cfg.text_field,
                                        split=cfg.split)
    return path


def _check_prepared_dir(cfg: DataConfig, vocab_size: int) -> tuple[str, str]:
    assert cfg.dir is not None
    manifest = read_manifest(cfg.dir)
    own = os.path.join(cfg.dir, manifest["tokenizer"]["file"])
    tokenizer_path = cfg.tokenizer or own
    tok = Tokenizer.load(tokenizer_path)
    if tok.fingerprint != manifest["tokenizer"]["fingerprint"]:
        raise DataError(f"data.dir {cfg.dir} was prepared with a different tokenizer than "
                        f"{tokenizer_path}; use the one it was prepared with ({own}, or "
                        "data.tokenizer=null) or re-prepare the data with this tokenizer")
    check_vocab(tok, vocab_size)
    return cfg.dir, tokenizer_path


def check_vocab(tok: Tokenizer, vocab_size: int) -> None:
    """DataError unless the tokenizer's vocabulary is the model's."""
    if tok.vocab_size != vocab_size:
        raise DataError(f"tokenizer {tok.path} has vocabulary {tok.vocab_size} but "
                        f"model.vocab_size={vocab_size}; set model.vocab_size={tok.vocab_size} "
                        "or use a matching tokenizer")


def resolve_cache_dir(cache_dir: str) -> str:
    """The cache directory, resolving the schema's `${oc.env:...}` default when a DataConfig
    was built in Python rather than composed by Hydra."""
    if "${" in cache_dir:
        from omegaconf import OmegaConf

        cache_dir = str(OmegaConf.create({"d": cache_dir}).d)
    return os.path.expanduser(cache_dir)


def _cache_key(*parts: object) -> str:
    text = "\0".join(map(str, (_CACHE_VERSION, *parts)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "data"


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if needed), held for the block.

    Ranks and concurrent runs that need the same cache entry wait here; the first one in makes
    it, the others find it made. The kernel drops the lock if the holder dies.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
