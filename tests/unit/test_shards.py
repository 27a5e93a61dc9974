"""The shard format: round trips, every kind of damage named, and atomic writes."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from pretrain.data import DataError, read_manifest, read_shard, write_manifest, write_shard
from pretrain.data import shards as shards_mod
from pretrain.data.shards import HEADER_SIZE


def _shard(tmp_path: Path, vocab_size: int = 1000, n: int = 101) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab_size, size=n)
    path = tmp_path / "s.bin"
    write_shard(str(path), tokens, np.array([10, 50, n]), vocab_size=vocab_size)
    return path, tokens


@pytest.mark.parametrize("vocab_size,dtype", [(1000, np.uint16), (65536, np.uint16),
                                              (70_000, np.uint32)])
def test_round_trip(tmp_path: Path, vocab_size: int, dtype: type) -> None:
    tokens = np.array([0, 5, vocab_size - 1, 7, 3], dtype=np.int64)
    ends = np.array([2, 5], dtype=np.uint64)
    checksum = write_shard(str(tmp_path / "s.bin"), tokens, ends, vocab_size=vocab_size)
    shard = read_shard(str(tmp_path / "s.bin"), verify=True)
    assert shard.tokens.dtype == dtype and shard.doc_ends.dtype == np.uint64
    np.testing.assert_array_equal(shard.tokens, tokens)
    np.testing.assert_array_equal(shard.doc_ends, ends)
    assert (shard.n_tokens, shard.n_docs, shard.vocab_size) == (5, 2, vocab_size)
    assert shard.max_token_id == vocab_size - 1 and shard.checksum == checksum


def test_odd_token_count_keeps_doc_ends_aligned(tmp_path: Path) -> None:
    path, tokens = _shard(tmp_path, n=101)  # 202 token bytes: padded to 208
    shard = read_shard(str(path))
    assert os.path.getsize(path) == HEADER_SIZE + 208 + 3 * 8
    np.testing.assert_array_equal(shard.tokens, tokens)
    assert list(shard.doc_ends) == [10, 50, 101]


def test_write_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        write_shard(str(tmp_path / "s.bin"), np.array([1, 10]), np.array([2]), vocab_size=10)
    with pytest.raises(ValueError, match="strictly increasing"):
        write_shard(str(tmp_path / "s.bin"), np.array([1, 2]), np.array([2, 2]), vocab_size=10)
    assert not (tmp_path / "s.bin").exists()


def test_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.bin does not exist"):
        read_shard(str(tmp_path / "nope.bin"))


def test_truncated(tmp_path: Path) -> None:
    path, _ = _shard(tmp_path)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match=r"s\.bin is truncated"):
        read_shard(str(path), verify=False)


def test_bad_magic(tmp_path: Path) -> None:
    path, _ = _shard(tmp_path)
    path.write_bytes(b"NOTSHARD" + path.read_bytes()[8:])
    with pytest.raises(DataError, match=r"s\.bin is not a token shard"):
        read_shard(str(path))
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="not a token shard"):
        read_shard(str(empty))


def test_unsupported_version(tmp_path: Path) -> None:
    path, _ = _shard(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[8:12] = struct.pack("<I", 99)
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="format version 99"):
        read_shard(str(path), verify=False)


@pytest.mark.parametrize("where", ["token", "doc_end", "header"])
def test_flipped_byte_fails_the_checksum(tmp_path: Path, where: str) -> None:
    path, _ = _shard(tmp_path)
    raw = bytearray(path.read_bytes())
    at = {"token": HEADER_SIZE + 7, "doc_end": len(raw) - 20, "header": 20}[where]  # max token id
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="fails its checksum"):
        read_shard(str(path), verify=True)


def test_crash_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(fd: int) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(shards_mod.os, "fsync", crash)  # after the bytes, before the rename
    with pytest.raises(OSError, match="disk gone"):
        write_shard(str(tmp_path / "s.bin"), np.arange(10), np.array([10]), vocab_size=16)
    with pytest.raises(OSError, match="disk gone"):
        write_manifest(str(tmp_path), {"format": "pretrain-shards"})
    assert os.listdir(tmp_path) == []


def test_rewrite_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "s.bin"
    write_shard(str(path), np.arange(100), np.array([100]), vocab_size=128)
    write_shard(str(path), np.arange(5), np.array([5]), vocab_size=128)
    assert read_shard(str(path)).n_tokens == 5
    assert os.listdir(tmp_path) == ["s.bin"]


def test_manifest_errors_name_the_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nodir does not exist.*pretrain-prepare-data"):
        read_manifest(str(tmp_path / "nodir"))
    with pytest.raises(DataError, match=r"is not a prepared dataset.*pretrain-prepare-data"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(DataError, match="manifest.json is unreadable"):
        read_manifest(str(tmp_path))
    write_manifest(str(tmp_path), {"format": "pretrain-shards", "version": 1, "splits": {}})
    assert read_manifest(str(tmp_path))["splits"] == {}
