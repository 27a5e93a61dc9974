"""Corpus sources: where documents come from, read as a stream of strings.

A source string is one of

- ``builtin``: the running Python's standard library (see `pretrain.data.builtin`);
- a local file, directory (searched recursively) or glob of ``.txt`` files (one document per
  file), ``.jsonl`` files (one record per line; also gzip ``.jsonl.gz`` and zstandard
  ``.jsonl.zst``, decompressed as a stream) or ``.parquet`` files (one record per row);
- ``hf:NAME[:CONFIG]``: a Hugging Face hub dataset streamed with `datasets` (nothing is
  downloaded up front; the hub cache and HF_HUB_OFFLINE work as usual).

Every reader yields documents in a deterministic order and holds at most one document (one
Parquet batch) in memory, so a corpus larger than RAM streams through. Documents that cannot be
used, empty ones and ones that are not valid UTF-8, are skipped and counted in a `SourceStats`
(preparation reports the counts); a file that cannot be read or a record without the text field
is a DataError naming it, since it usually means a wrong path or field name rather than one bad
document.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from pretrain.data.builtin import describe_builtin, iter_builtin_documents
from pretrain.errors import DataError

JSONL_EXTENSIONS = (".jsonl", ".jsonl.gz", ".jsonl.zst")
EXTENSIONS = (".txt", *JSONL_EXTENSIONS, ".parquet")
_HF_PREFIX = "hf:"
_GLOB_CHARS = "*?["
EMPTY = "empty"
NON_UTF8 = "non_utf8"


@dataclass
class SourceStats:
    """Documents a stream skipped, by reason, with the first place each reason occurred."""

    skipped: dict[str, int] = field(default_factory=dict)
    """reason ('empty', 'non_utf8') -> documents skipped for it."""
    first: dict[str, str] = field(default_factory=dict)
    """reason -> where it first happened (file:line, file, or record number)."""

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.first.setdefault(reason, where)

    def describe(self) -> str:
        """'3 empty (first at a.jsonl:4), 1 non_utf8 (first at b.txt)', or 'none'."""
        parts = [f"{n} {reason} (first at {self.first[reason]})"
                 for reason, n in sorted(self.skipped.items())]
        return ", ".join(parts) or "none"


def iter_documents(
    source: str, *, text_field: str = "text", split: str = "train", max_bytes: int = 0,
    stats: SourceStats | None = None,
) -> Iterator[str]:
    """Documents of `source`, stopping after `max_bytes` UTF-8 bytes (0: no cap).

    When the cap falls inside a document, that document is cut at the cap (on a character
    boundary), so the stream holds exactly min(max_bytes, corpus size) bytes. Skipped documents
    are counted in `stats` when given.
    """
    stats = stats if stats is not None else SourceStats()
    if source == "builtin":
        docs: Iterable[str | None] = iter_builtin_documents()
        where = "builtin"
    elif source.startswith(_HF_PREFIX):
        docs = _iter_hub(source, text_field=text_field, split=split)
        where = source
    else:
        docs = _iter_local(resolve_local_files(source), text_field, stats)
        where = source
    yield from _cap(_drop_empty(docs, stats, where), max_bytes)


def _drop_empty(docs: Iterable[str | None], stats: SourceStats, where: str) -> Iterator[str]:
    for i, doc in enumerate(docs):
        if doc:
            yield doc
        else:
            stats.skip(EMPTY, f"document {i} of {where}")


def _cap(docs: Iterable[str], max_bytes: int) -> Iterator[str]:
    if max_bytes <= 0:
        yield from docs
        return
    total = 0
    for doc in docs:
        raw = doc.encode("utf-8")
        if total + len(raw) >= max_bytes:
            last = raw[: max_bytes - total].decode("utf-8", errors="ignore")
            if last:
                yield last
            return
        total += len(raw)
        yield doc


def resolve_local_files(source: str) -> list[str]:
    """The sorted corpus files a local path, directory or glob names."""
    path = os.path.expanduser(source)
    if any(c in path for c in _GLOB_CHARS):
        files = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
        where = f"glob {source!r}"
    elif os.path.isdir(path):
        files = list(_walk_visible(path))
        where = f"directory {source}"
    elif os.path.isfile(path):
        if not path.endswith(EXTENSIONS):
            raise DataError(f"corpus file {source} has an unsupported type; use "
                            f"{', '.join(EXTENSIONS)} files")
        return [path]
    else:
        raise DataError(f"data source {source} does not exist; set data.source to 'builtin', "
                        "an existing file, directory or glob, or 'hf:NAME[:CONFIG]'")
    files = sorted(f for f in files if f.endswith(EXTENSIONS))
    if not files:
        raise DataError(f"{where} holds no {', '.join(EXTENSIONS)} files; point data.source "
                        "at the corpus files")
    return files


def _walk_visible(root: str) -> Iterator[str]:
    """Files under `root`, skipping hidden files and directories (.git, temporary files)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        yield from (os.path.join(dirpath, f) for f in filenames if not f.startswith("."))


def _iter_local(files: list[str], text_field: str, stats: SourceStats) -> Iterator[str | None]:
    for path in files:
        if path.endswith(".txt"):
            text = _read_txt(path, stats)
            if text is not None:
                yield text
        elif path.endswith(JSONL_EXTENSIONS):
            yield from _iter_jsonl(path, text_field, stats)
        else:
            yield from _iter_parquet(path, text_field)


def _read_txt(path: str, stats: SourceStats) -> str | None:
    """The file's text; None (counted) when it is not UTF-8."""
    with _reading(path), open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.skip(NON_UTF8, path)
        return None


def _read_errors() -> tuple[type[BaseException], ...]:
    # gzip.BadGzipFile is an OSError; EOFError is a truncated gzip stream.
    try:
        import zstandard
    except ImportError:
        return (OSError, EOFError)
    return (OSError, EOFError, zstandard.ZstdError)


@contextlib.contextmanager
def _reading(path: str) -> Iterator[None]:
    """Turn the ways reading a file fails (permissions, I/O, damaged compression) into one
    DataError naming the file."""
    try:
        yield
    except _read_errors() as e:
        raise DataError(f"cannot read corpus file {path} ({e}); fix the file (or its "
                        "permissions) or remove it from the source") from e


def _open_binary(path: str) -> IO[bytes]:
    """The file's decompressed bytes, as a stream (never read whole into memory)."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError as e:
            raise DataError(f"{path} is zstandard-compressed; `pip install zstandard` to read "
                            "it") from e
        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def _iter_jsonl(path: str, text_field: str, stats: SourceStats) -> Iterator[str | None]:
    with _reading(path), _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                stats.skip(NON_UTF8, where)
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{where} is not valid JSON ({e}); fix or remove the line") from e
            text = _text_of(record, text_field, where)
            # A \ud800-\udfff escape can decode to a lone surrogate, which is not UTF-8 and which
            # the tokenizer cannot encode; only lines holding such an escape pay for the check.
            if text and (b"\\ud" in raw or b"\\uD" in raw) and _has_surrogate(text):
                stats.skip(NON_UTF8, where)
                continue
            yield text


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _text_of(record: Any, text_field: str, where: str) -> str | None:
    """The record's text; None (an empty document) when the field is null."""
    if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"record {where} has no field {text_field!r} (it has {keys}); set "
                        "data.text_field (--text-field) to the field that holds the text")
    text = record[text_field]
    if text is not None and not isinstance(text, str):
        raise DataError(f"field {text_field!r} of record {where} is a "
                        f"{type(text).__name__}, not text; set data.text_field to a text field")
    return text


def _iter_parquet(path: str, text_field: str) -> Iterator[str | None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:  # Arrow validates UTF-8 of string columns
        raise DataError(f"{path} is not a readable Parquet file ({e}); re-export it") from e
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path} has no column {text_field!r} (it has {names}); set "
                        "data.text_field (--text-field) to the column that holds the text")
    row = 0
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise DataError(f"column {text_field!r} of {path} holds "
                                f"{type(text).__name__} values (row {row}), not text; set "
                                "data.text_field to a text column")
            row += 1
            yield text


def parse_hub_source(source: str) -> tuple[str, str | None]:
    """'hf:NAME[:CONFIG]' -> (NAME, CONFIG or None)."""
    name, _, config = source[len(_HF_PREFIX):].partition(":")
    if not name:
        raise DataError(f"data source {source!r} names no dataset; use hf:NAME or "
                        "hf:NAME:CONFIG, e.g. hf:roneneldan/TinyStories")
    return name, config or None


def _iter_hub(source: str, *, text_field: str, split: str) -> Iterator[str | None]:
    import datasets

    name, config = parse_hub_source(source)
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # datasets raises many types; all mean "cannot open it"
        raise DataError(f"cannot open hub dataset {name!r} (config {config}, split {split!r}): "
                        f"{e}; check the name, config and split, and network access (or a "
                        "local copy with HF_HUB_OFFLINE=1)") from e
    for i, record in enumerate(stream):
        yield _text_of(record, text_field, f"{i} of {source} (split {split!r})")


def describe_source(source: str, *, text_field: str = "text", split: str = "train") -> str:
    """A stable description of what `source` holds now, used in manifests and cache keys.

    Local sources include a digest of each file's path, size and modification time, so an
    edited corpus does not reuse a stale cache.
    """
    if source == "builtin":
        return describe_builtin()
    if source.startswith(_HF_PREFIX):
        return f"{source} split={split} field={text_field}"
    h = hashlib.sha256()
    for path in resolve_local_files(source):
        st = os.stat(path)
        h.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"{source} field={text_field} files={h.hexdigest()[:16]}"
