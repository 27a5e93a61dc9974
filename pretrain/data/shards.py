"""The on-disk token shard format and the manifest of a prepared dataset.

A shard file is a 64-byte header, the tokens, zero padding to an 8-byte boundary, and the
document end offsets::

    offset 0   magic        8s   b"PTSHARD1"
           8   version      u32  FORMAT_VERSION
          12   dtype code   u32  1 = uint16, 2 = uint32 (uint16 when vocab_size <= 65536)
          16   vocab_size   u32  vocabulary the tokens were written for
          20   max token id u32  largest id in the shard (checked against the model cheaply)
          24   n_tokens     u64
          32   n_docs       u64  documents that *end* in this shard
          40   checksum     16s  blake2b-128 of header bytes [0, 40) + everything after byte 64
          56   reserved     8x
    64         tokens       n_tokens x dtype
               padding      to a multiple of 8 bytes
               doc_ends     n_docs x uint64, exclusive end offsets within the shard

Shards have a fixed number of tokens, so a document may start in one shard and end in the next;
every document ends with EOS, and `doc_ends` marks the position just after it. Files are written
to a temporary name in the same directory, fsynced and renamed, so a shard under its final name
is always whole.

A prepared dataset is a directory holding `train/` and `val/` shard directories and one
`manifest.json`, written last: a directory without a manifest is not a prepared dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from pretrain.errors import DataError

MAGIC = b"PTSHARD1"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIIIQQ16s8x")
HEADER_SIZE = HEADER.size  # 64
_CHECKSUM_AT = 40  # the checksum covers header bytes before this offset
_DTYPES = {1: np.dtype(np.uint16), 2: np.dtype(np.uint32)}
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "pretrain-shards"
PREPARE_HINT = "run `pretrain-prepare-data` (tools/prepare_data.py) to prepare it"


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest token dtype that holds every id of a vocabulary."""
    return _DTYPES[1] if vocab_size <= 1 << 16 else _DTYPES[2]


def _dtype_code(dtype: np.dtype) -> int:
    return next(code for code, d in _DTYPES.items() if d == dtype)


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


@dataclass
class Shard:
    """One opened shard; `tokens` and `doc_ends` are read-only memory maps of the file."""

    path: str
    tokens: np.ndarray
    """(n_tokens,) uint16 or uint32 token ids."""
    doc_ends: np.ndarray
    """(n_docs,) uint64 exclusive end offsets of the documents that end in this shard."""
    vocab_size: int
    max_token_id: int
    checksum: str
    """Hex blake2b-128 digest stored in the header."""

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_docs(self) -> int:
        return int(self.doc_ends.shape[0])


def atomic_write(path: str, write: Callable[[IO[bytes]], None], *,
                 fixed_tmp: bool = False) -> None:
    """Call `write` on a temporary file next to `path`, fsync it, then rename it to `path`.

    The rename is atomic within a filesystem, so readers see either the old file or the whole
    new one; if `write` raises, the temporary file is removed and `path` is untouched. A process
    killed mid-write leaves its temporary file (named as `temporary_name_pattern` matches).
    The temporary name is unique per call, unless `fixed_tmp` (for a file with a single
    writer, rewritten often): then it is always `.{name}.tmp`, and the next write replaces what
    a killed one left.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    unique = "" if fixed_tmp else f".{secrets.token_hex(6)}"
    tmp = os.path.join(directory, f".{os.path.basename(path)}{unique}.tmp")
    # os.open with mode 0o666 (not mkstemp's 0o600) so the umask decides, as for any new file:
    # shared caches must stay readable by the group.
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if fixed_tmp else os.O_EXCL)
    fd = os.open(tmp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def temporary_name_pattern(target: str) -> re.Pattern[str]:
    """The names of `atomic_write`'s temporary files for the files whose names match the regular
    expression `target` (e.g. ``r"\\d{6}\\.bin"``): what a write killed half-way leaves."""
    return re.compile(rf"^\.(?:{target})(?:\.[0-9a-f]{{12}})?\.tmp$")


def _fsync_dir(directory: str) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_shard_input(tokens: np.ndarray, doc_ends: np.ndarray, vocab_size: int) -> None:
    if tokens.ndim != 1 or doc_ends.ndim != 1:
        raise ValueError("tokens and doc_ends must be 1-D arrays")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}); got "
                         f"[{int(tokens.min())}, {int(tokens.max())}]")
    ends = doc_ends.astype(np.int64)
    if ends.size and (ends[0] <= 0 or ends[-1] > tokens.size or np.any(np.diff(ends) <= 0)):
        raise ValueError("doc_ends must be strictly increasing offsets in (0, len(tokens)]")


def write_shard(path: str, tokens: np.ndarray, doc_ends: np.ndarray, *, vocab_size: int) -> str:
    """Write one shard atomically and return its checksum (hex).

    `tokens` are ids in [0, vocab_size); `doc_ends` are the exclusive end offsets, within these
    tokens, of the documents that end in this shard.
    """
    _check_shard_input(tokens, doc_ends, vocab_size)
    dtype = dtype_for_vocab(vocab_size)
    body = _body_bytes(tokens.astype(dtype, copy=False), doc_ends.astype(np.uint64, copy=False))
    max_id = int(tokens.max()) if tokens.size else 0
    head = HEADER.pack(MAGIC, FORMAT_VERSION, _dtype_code(dtype), vocab_size, max_id,
                       tokens.size, doc_ends.size, b"\0" * 16)
    digest = _digest(head[:_CHECKSUM_AT], body)
    head = head[:_CHECKSUM_AT] + digest + head[_CHECKSUM_AT + 16:]

    def write(f: IO[bytes]) -> None:
        f.write(head)
        f.write(body)

    atomic_write(path, write)
    return digest.hex()


def _body_bytes(tokens: np.ndarray, doc_ends: np.ndarray) -> bytes:
    pad = _align8(tokens.nbytes) - tokens.nbytes
    return b"".join((tokens.tobytes(), b"\0" * pad, doc_ends.tobytes()))


def _digest(head: bytes, body: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(head, digest_size=16)
    h.update(body)
    return h.digest()


def read_shard(path: str, *, verify: bool = True) -> Shard:
    """Open a shard as memory maps; with `verify`, recompute its checksum and max token id.

    Raises DataError naming the file when it is missing, not a shard, of an unsupported
    version, truncated, or (with `verify`) corrupted.
    """
    if not os.path.isfile(path):
        raise DataError(f"shard {path} does not exist; re-prepare the dataset ({PREPARE_HINT})")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
    fields = _parse_header(path, head)
    code, vocab_size, max_id, n_tokens, n_docs, checksum = fields
    dtype = _DTYPES[code]
    ends_at = HEADER_SIZE + _align8(n_tokens * dtype.itemsize)
    expected = ends_at + 8 * n_docs
    if size != expected:
        raise DataError(f"shard {path} is truncated or damaged: {size} bytes, header says "
                        f"{expected}; delete it and re-prepare the dataset ({PREPARE_HINT})")
    tokens = _memmap(path, dtype, HEADER_SIZE, n_tokens)
    doc_ends = _memmap(path, np.dtype(np.uint64), ends_at, n_docs)
    shard = Shard(path, tokens, doc_ends, vocab_size, max_id, checksum.hex())
    if verify:
        _verify(shard, head)
    return shard


def _parse_header(path: str, head: bytes) -> tuple[int, int, int, int, int, bytes]:
    if len(head) < HEADER_SIZE or head[:8] != MAGIC:
        raise DataError(f"{path} is not a token shard (bad magic); point data.dir at a "
                        f"directory made by `pretrain-prepare-data`, or {PREPARE_HINT}")
    magic, version, code, vocab_size, max_id, n_tokens, n_docs, checksum = HEADER.unpack(head)
    if version != FORMAT_VERSION or code not in _DTYPES:
        raise DataError(f"shard {path} has format version {version} (dtype code {code}); this "
                        f"pretrain reads version {FORMAT_VERSION}; re-prepare the dataset "
                        f"({PREPARE_HINT})")
    return code, vocab_size, max_id, n_tokens, n_docs, checksum


def _memmap(path: str, dtype: np.dtype, offset: int, count: int) -> np.ndarray:
    if count == 0:  # np.memmap refuses empty maps
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


def _verify(shard: Shard, head: bytes) -> None:
    h = hashlib.blake2b(head[:_CHECKSUM_AT], digest_size=16)
    with open(shard.path, "rb") as f:
        f.seek(HEADER_SIZE)
        # Chunked so that verifying a large shard needs little memory.
        while chunk := f.read(1 << 24):
            h.update(chunk)
    if h.hexdigest() != shard.checksum:
        raise DataError(f"shard {shard.path} fails its checksum (the file is corrupted); "
                        f"delete the dataset directory and re-prepare it ({PREPARE_HINT})")
    actual_max = int(shard.tokens.max()) if shard.n_tokens else 0
    if actual_max != shard.max_token_id:
        raise DataError(f"shard {shard.path}: header max token id {shard.max_token_id} but the "
                        f"tokens hold {actual_max}; re-prepare the dataset ({PREPARE_HINT})")


def write_manifest(data_dir: str, manifest: dict[str, Any]) -> None:
    """Write `manifest.json` atomically; call it last, after every shard is in place."""
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    atomic_write(os.path.join(data_dir, MANIFEST_NAME), lambda f: f.write(text.encode()))


def read_manifest(data_dir: str) -> dict[str, Any]:
    """Read and sanity-check the manifest of a prepared dataset directory."""
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir} does not exist; {PREPARE_HINT}, or set "
                        "data.dir=null to prepare the configured source automatically")
    path = os.path.join(data_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise DataError(f"{data_dir} is not a prepared dataset (no {MANIFEST_NAME}; preparation "
                        f"may have been interrupted); {PREPARE_HINT}")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is unreadable ({e}); {PREPARE_HINT}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path} is not a pretrain dataset manifest; {PREPARE_HINT}")
    if manifest.get("version") != FORMAT_VERSION:
        raise DataError(f"{path} has format version {manifest.get('version')}; this pretrain "
                        f"reads version {FORMAT_VERSION}; {PREPARE_HINT}")
    return manifest
