"""Turn a corpus into token shards: tokenizer training, preparation, and the trainer's cache.

`prepare` streams documents, tokenizes them in worker processes, appends EOS to each, optionally
drops exact duplicates, sends each document to the train or validation split by a hash of its
index and text, and fills fixed-size shards of each split; the manifest is written last. The
output depends only on the inputs, never on the number of workers, and an interrupted
preparation resumes from its last finished shard (see `pretrain.data.shard_writer`). Every
file is written under a temporary name and renamed; the temporary files a killed preparation
leaves are removed by the next preparation of the same directory, which leaves none of its own.

`ensure_prepared` is the trainer's single call: it returns a prepared directory and tokenizer for
a `DataConfig`, training and preparing into a cache on first use, under a file lock so that
concurrent ranks or runs never race on the same cache entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import math
import multiprocessing as mp
import os
import re
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from pretrain.data.dedup import HashSet, doc_hashes
from pretrain.data.hf_tokenizer import HFTokenizer, tokenizer_files
from pretrain.data.shard_writer import (
    PROGRESS_NAME,
    SplitWriter,
    load_progress,
    remove_progress,
    save_progress,
)
from pretrain.data.shards import (
    FORMAT_VERSION,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    dtype_for_vocab,
    read_manifest,
    temporary_name_pattern,
    write_manifest,
)
from pretrain.data.sources import SourceStats, describe_source, iter_documents
from pretrain.data.tokenizer import TOKENIZER_FORMAT, Tokenizer, train_tokenizer
from pretrain.errors import DataError

if TYPE_CHECKING:  # importing the config pulls in Hydra, which spawned workers don't need
    from pretrain.config import DataConfig

SPLITS = ("train", "val")
TOKENIZER_FILE = "tokenizer.model"
HF_TOKENIZER_DIR = "hf_tokenizer"
"""Where a prepared directory keeps a copy of a transformers tokenizer's files."""
# Bump when tokenizer training or preparation changes output, so stale caches are not reused.
_CACHE_VERSION = 1
_BATCH_BYTES = 1 << 18  # documents per worker task: enough work to amortize the round trip
_BATCH_DOCS = 1024
_IN_FLIGHT = 8  # tasks in flight per worker
_SHARD_NAME = re.compile(r"^\d{6}\.bin$")
_SHARD_TMP = temporary_name_pattern(r"\d{6}\.bin")
_ROOT_TMP = temporary_name_pattern(f"{re.escape(MANIFEST_NAME)}|{re.escape(PROGRESS_NAME)}")

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
    """One batch of documents, tokenized; each document ends with EOS."""

    tokens: np.ndarray
    """(n,) the batch's tokens, concatenated, in the shard dtype (halves the transfer)."""
    lengths: np.ndarray
    """(n_docs,) int64 document lengths, EOS included."""
    is_val: np.ndarray
    """(n_docs,) bool: the document belongs to the validation split."""
    hashes: np.ndarray | None
    """(n_docs,) uint64 content hashes, when deduplicating."""


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


def _tokenize_batch(task: tuple[int, list[str], float, bool]) -> _Tokenized:
    start, texts, val_fraction, dedup = task
    tok = _worker_tokenizer
    assert tok is not None, "worker not initialized"
    ids = tok.encode_batch(texts, eos=True)
    return _Tokenized(
        tokens=np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype_for_vocab(
            tok.vocab_size)),
        lengths=np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)),
        is_val=np.fromiter((is_val_document(start + i, t, val_fraction)
                            for i, t in enumerate(texts)), dtype=bool, count=len(texts)),
        hashes=doc_hashes(texts) if dedup else None,
    )


def _batches(docs: Iterable[str], first: int) -> Iterator[tuple[int, list[str]]]:
    """(index of the first document, documents) in batches of about _BATCH_BYTES; the first
    document of `docs` has index `first`."""
    batch: list[str] = []
    size = 0
    start = first
    for index, doc in enumerate(docs, first):
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
    corpus), so tasks are submitted through a window of _IN_FLIGHT * workers: wide enough that
    one large task does not leave the other workers idle while its result is awaited. Workers
    are forked where the platform allows, as torch's DataLoader workers are: they touch neither
    torch nor CUDA, and unlike spawn, fork does not re-import the caller's main module (which
    fails for stdin or notebook code and costs a torch import per worker).
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
            if len(pending) >= _IN_FLIGHT * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _route(result: _Tokenized, start: int, writers: dict[str, SplitWriter],
           seen: HashSet | None) -> int:
    """Hand a tokenized batch's documents to the split writers; return duplicates dropped."""
    n = len(result.lengths)
    keep = np.ones(n, dtype=bool) if seen is None else ~seen.add(result.hashes)
    index = np.arange(start, start + n)
    for split, mask in (("train", keep & ~result.is_val), ("val", keep & result.is_val)):
        tokens = result.tokens if mask.all() else result.tokens[np.repeat(mask, result.lengths)]
        writers[split].add(index[mask], tokens, result.lengths[mask], upto=start + n)
    return int(n - keep.sum())


def _replay_hashes(docs: Iterator[str], n: int, seen: HashSet) -> int:
    """Consume the first `n` documents, adding their hashes; return the duplicates among them.

    A resumed preparation does this for the documents before its restart point, so that it
    drops exactly the duplicates an uninterrupted run would.
    """
    duplicates = 0
    while n > 0:
        batch = list(itertools.islice(docs, min(n, _BATCH_DOCS)))
        if not batch:
            break
        duplicates += int(seen.add(doc_hashes(batch)).sum())
        n -= len(batch)
    return duplicates


def _clear_previous(out_dir: str) -> None:
    """Unmark `out_dir` as prepared (manifest first), then remove what an earlier run left."""
    manifest = os.path.join(out_dir, MANIFEST_NAME)
    if os.path.exists(manifest):
        os.unlink(manifest)
    remove_progress(out_dir)
    _remove_temporary(out_dir)
    _remove_shards(out_dir, keep=set())


def _remove_shards(out_dir: str, keep: set[str]) -> None:
    """Remove the shards of `out_dir` whose names ('train/000003.bin') are not in `keep`."""
    for split, split_dir in _split_dirs(out_dir):
        for name in os.listdir(split_dir):
            if _SHARD_NAME.match(name) and f"{split}/{name}" not in keep:
                os.unlink(os.path.join(split_dir, name))


def _remove_temporary(out_dir: str) -> None:
    """Remove the temporary files that killed writes left in `out_dir`, by our names only:
    `.manifest.json.*.tmp` and `.prepare.progress.json[.*].tmp` in it, `.000003.bin.*.tmp` in
    its split directories."""
    places = [(out_dir, _ROOT_TMP)] + [(d, _SHARD_TMP) for _, d in _split_dirs(out_dir)]
    for directory, pattern in places:
        for name in os.listdir(directory):
            if pattern.match(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))


def _split_dirs(out_dir: str) -> list[tuple[str, str]]:
    return [(s, os.path.join(out_dir, s)) for s in SPLITS
            if os.path.isdir(os.path.join(out_dir, s))]


# ---------------------------------------------------------------------------------------------
# prepare


@dataclass
class _Run:
    """What one preparation needs besides its arguments."""

    key: str
    writers: dict[str, SplitWriter]
    restart: int
    """Corpus index of the first document to tokenize (0 unless resuming)."""
    resumed: bool
    """Continuing an interrupted preparation."""
    tokens_before: int
    """Tokens in the shards the interrupted run finished (0 unless resuming)."""


@dataclass
class PrepareStats:
    """What one call of `prepare` did, for its report (the manifest describes the dataset)."""

    tokens: int = 0
    """Tokens this call wrote into shards: for a resumed call, only those past the shards an
    earlier, interrupted call had finished; 0 when the directory was already prepared."""
    tokens_before: int = 0
    """Tokens in shards an earlier call had finished (all of them when already prepared)."""
    seconds: float = 0.0
    """Wall time of this call."""
    resumed: bool = False
    """This call continued an interrupted preparation."""
    already_prepared: bool = False
    """The directory held a finished preparation of these inputs; nothing was done."""

    @property
    def tokens_per_s(self) -> float:
        """This call's speed: the tokens it wrote over its own wall time."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def prepare(
    source: str, tokenizer_path: str, out_dir: str, *, num_workers: int = 1,
    shard_tokens: int = 1 << 20, val_fraction: float = 0.0, text_field: str = "text",
    split: str = "train", max_bytes: int = 0, dedup: bool = False, resume: bool = True,
    log: Callable[[str], None] = lambda message: None, stats: PrepareStats | None = None,
) -> dict[str, Any]:
    """Tokenize `source` into train/val shards under `out_dir`; return the manifest.

    With `resume`, a finished preparation of the same inputs is returned as is, and an
    unfinished one continues where it stopped, producing the files an uninterrupted run would;
    without it, `out_dir` is prepared from scratch. With `dedup`, documents whose text equals an
    earlier document's are dropped (counted in the manifest). The tokenizer is copied into
    `out_dir` (as tokenizer.model), so the directory is self-contained. The manifest is written
    last; until then `out_dir` is not a dataset. `stats`, when given, is filled with what this
    call did (tokens written and wall time, so a resumed call's speed counts its own work only).
    """
    start_time = time.perf_counter()
    stats = stats if stats is not None else PrepareStats()
    if shard_tokens <= 0 or not 0.0 <= val_fraction < 1.0:
        raise DataError(f"shard_tokens={shard_tokens} must be > 0 and val_fraction="
                        f"{val_fraction} in [0, 1)")
    tok = Tokenizer.load(tokenizer_path)
    description = describe_source(source, text_field=text_field, split=split)
    params = {"source": source, "description": description, "text_field": text_field,
              "split": split, "max_bytes": max_bytes}
    key = _cache_key(description, tok.fingerprint, shard_tokens, val_fraction, max_bytes,
                     text_field, split, dedup)
    if resume and (done := _finished(out_dir, key)) is not None:
        remove_progress(out_dir)  # what a run killed right after its manifest left
        _remove_temporary(out_dir)
        log(f"{out_dir} is already prepared from these inputs")
        stats.already_prepared, stats.tokens_before = True, int(done["n_tokens"])
        stats.seconds = time.perf_counter() - start_time
        return done
    run = _start(out_dir, key, resume, shard_tokens, val_fraction, tok.vocab_size, log)
    stats.resumed, stats.tokens_before = run.resumed, run.tokens_before
    read_stats = SourceStats()
    docs = iter_documents(source, text_field=text_field, split=split, max_bytes=max_bytes,
                          stats=read_stats)
    splits, counts = _tokenize_into_shards(run, docs, tokenizer_path, val_fraction, dedup,
                                           num_workers)
    counts["skipped"] = read_stats.skipped
    if not splits["train"]["n_docs"]:
        _clear_previous(out_dir)
        raise DataError(f"source {source} yielded no training documents for {out_dir} "
                        f"({counts['read']} read, {counts['duplicates']} duplicates, skipped: "
                        f"{read_stats.describe()}); check the source and text field, or lower "
                        "val_fraction")
    _copy_tokenizer(tok, out_dir)
    manifest = _manifest(tok, splits, val_fraction=val_fraction, shard_tokens=shard_tokens,
                         val_shard_tokens=_val_shard_tokens(shard_tokens, val_fraction),
                         dedup=dedup, documents=counts, prepare_key=key, source=params)
    write_manifest(out_dir, manifest)
    remove_progress(out_dir)
    _remove_temporary(out_dir)
    stats.tokens = int(manifest["n_tokens"]) - run.tokens_before
    stats.seconds = time.perf_counter() - start_time
    return manifest


def _finished(out_dir: str, key: str) -> dict[str, Any] | None:
    if not os.path.isfile(os.path.join(out_dir, MANIFEST_NAME)):
        return None
    try:
        manifest = read_manifest(out_dir)
    except DataError:
        return None
    return manifest if manifest.get("prepare_key") == key else None


def _start(out_dir: str, key: str, resume: bool, shard_tokens: int, val_fraction: float,
           vocab_size: int, log: Callable[[str], None]) -> _Run:
    """The split writers, fresh or at the saved resume points of an unfinished run."""
    os.makedirs(out_dir, exist_ok=True)
    saved = load_progress(out_dir, key) if resume else None
    if saved is None:
        _clear_previous(out_dir)
    else:
        manifest = os.path.join(out_dir, MANIFEST_NAME)
        if os.path.exists(manifest):
            os.unlink(manifest)
        _remove_temporary(out_dir)
        _remove_shards(out_dir, keep={e["name"] for s in saved.values() for e in s["shards"]})
    writers: dict[str, SplitWriter] = {}
    sizes = {"train": shard_tokens, "val": _val_shard_tokens(shard_tokens, val_fraction)}
    for s in SPLITS:
        writers[s] = SplitWriter(out_dir, s, sizes[s], vocab_size,
                                 resume=saved[s] if saved else None,
                                 on_shard=lambda: save_progress(out_dir, key, writers))
    restart = min(w.next_doc for w in writers.values())
    before = sum(e["n_tokens"] for w in writers.values() for e in w.shards)
    if saved is not None:
        done = sum(len(w.shards) for w in writers.values())
        log(f"resuming the preparation of {out_dir}: {done} shards done ({before:,} tokens), "
            f"continuing at document {restart}")
    return _Run(key, writers, restart, saved is not None, before)


def _val_shard_tokens(shard_tokens: int, val_fraction: float) -> int:
    """Validation shards fill about as fast as training shards (in corpus documents), so a
    restarted preparation never re-tokenizes much more than one training shard's worth."""
    return max(min(shard_tokens, 4096), math.ceil(shard_tokens * val_fraction))


def _tokenize_into_shards(
    run: _Run, docs: Iterator[str], tokenizer_path: str, val_fraction: float, dedup: bool,
    num_workers: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tokenize `docs` from the restart point into the writers; (splits, document counts)."""
    seen = HashSet() if dedup else None
    duplicates = 0
    if seen is not None:
        duplicates = _replay_hashes(docs, run.restart, seen)
    else:
        _skip(docs, run.restart)
    read = run.restart
    tasks = ((start, texts, val_fraction, dedup) for start, texts in _batches(docs, run.restart))
    for result in _ordered_map(_tokenize_batch, tasks, workers=num_workers,
                               initializer=_init_worker, initargs=(tokenizer_path,)):
        duplicates += _route(result, read, run.writers, seen)
        read += len(result.lengths)
    splits = {s: w.close() for s, w in run.writers.items()}
    return splits, {"read": read, "duplicates": duplicates}


def _skip(docs: Iterator[str], n: int) -> None:
    for _ in itertools.islice(docs, n):
        pass


def _document_lengths(texts: list[str]) -> np.ndarray:
    tok = _worker_tokenizer
    assert tok is not None, "worker not initialized"
    return np.fromiter(map(len, tok.encode_batch(texts, eos=True)), dtype=np.int64,
                       count=len(texts))


def count_document_tokens(
    source: str, tokenizer_path: str, *, num_workers: int = 1, text_field: str = "text",
    split: str = "train", max_bytes: int = 0,
) -> Iterator[np.ndarray]:
    """Token counts (EOS included) of the documents of `source`, a batch at a time, tokenized
    in worker processes as `prepare` would and then discarded."""
    docs = iter_documents(source, text_field=text_field, split=split, max_bytes=max_bytes)
    yield from _ordered_map(_document_lengths, (texts for _, texts in _batches(docs, 0)),
                            workers=num_workers, initializer=_init_worker,
                            initargs=(tokenizer_path,))


def _tokenizer_file(tok: Tokenizer) -> str:
    """The tokenizer's name inside a prepared directory: a SentencePiece model file, or a
    directory with a transformers tokenizer's files."""
    return HF_TOKENIZER_DIR if isinstance(tok, HFTokenizer) else TOKENIZER_FILE


def _copy_tokenizer(tok: Tokenizer, out_dir: str) -> None:
    target = os.path.join(out_dir, _tokenizer_file(tok))
    if isinstance(tok, HFTokenizer):
        if os.path.abspath(tok.directory) != os.path.abspath(target):
            os.makedirs(target, exist_ok=True)
            for path in tokenizer_files(tok.directory):
                shutil.copyfile(path, os.path.join(target, path.name))
        return
    if not (os.path.exists(target) and os.path.samefile(tok.path, target)):
        shutil.copyfile(tok.path, target)


def _manifest(tok: Tokenizer, splits: dict[str, Any], **params: Any) -> dict[str, Any]:
    return {
        **params,
        "format": MANIFEST_FORMAT,
        "version": FORMAT_VERSION,
        "vocab_size": tok.vocab_size,
        "dtype": dtype_for_vocab(tok.vocab_size).name,
        "eos_id": tok.eos_id,
        "n_tokens": sum(s["n_tokens"] for s in splits.values()),
        "tokenizer": {"file": _tokenizer_file(tok), "fingerprint": tok.fingerprint,
                      "source_path": tok.path if isinstance(tok, HFTokenizer)
                      else os.path.abspath(tok.path)},
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
    # dedup joins the key only when on, so caches made before the option existed stay valid.
    key = _cache_key(description, cfg.max_bytes, tok.fingerprint, cfg.val_fraction,
                     cfg.shard_tokens, *(["dedup"] if cfg.dedup else []))
    data_dir = os.path.join(cache_dir, "data", f"{_safe(cfg.name)}-{key}")
    with file_lock(data_dir + ".lock"):
        if not os.path.isfile(os.path.join(data_dir, MANIFEST_NAME)):
            # An unfinished preparation (a killed run) resumes where it stopped.
            prepare(cfg.source, tokenizer_path, data_dir, num_workers=cfg.prepare_workers,
                    shard_tokens=cfg.shard_tokens, val_fraction=cfg.val_fraction,
                    text_field=cfg.text_field, split=cfg.split, max_bytes=cfg.max_bytes,
                    dedup=cfg.dedup, log=print)
    return data_dir, tokenizer_path


def _cached_tokenizer(cfg: DataConfig, cache_dir: str, description: str, vocab_size: int) -> str:
    sample = min(cfg.tokenizer_sample_bytes, cfg.max_bytes or cfg.tokenizer_sample_bytes)
    # The tokenizer format keys it too: one an older pretrain cached lacks pieces this one needs.
    key = _cache_key(cfg.name, description, cfg.max_bytes, vocab_size, sample,
                     f"tokenizer-format-{TOKENIZER_FORMAT}")
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
    """DataError unless the tokenizer's vocabulary is the model's (a transformers tokenizer's
    may be smaller: models pad their embedding matrix)."""
    if tok.vocab_size > vocab_size or (tok.vocab_size < vocab_size
                                       and not isinstance(tok, HFTokenizer)):
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
