"""Sources, preparation into shards, and the trainer's cached `ensure_prepared`."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pretrain.config import DataConfig
from pretrain.data import (
    DataError,
    SourceStats,
    Tokenizer,
    describe_source,
    ensure_prepared,
    is_val_document,
    iter_documents,
    read_manifest,
    read_shard,
    train_tokenizer,
)
from pretrain.data import prepare as prepare_mod
from pretrain.data import shard_writer as writer_mod
from pretrain.data import sources as sources_mod
from pretrain.data.builtin import builtin_files, stdlib_dir
from pretrain.data.dedup import HashSet
from pretrain.data.prepare import prepare
from tools import prepare_data as prepare_tool

VOCAB = 512
SYLLABLES = ["al", "be", "ga", "de", "ïv", "中", "文", "🐍", "re", "tu", "rn", "se", "lf", "la",
             "mb", "da", "ko", "zi", "pu", "x", "y", "_", "q", "wo", "ng"]


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Small code-like documents of varied length."""
    rng = random.Random(seed)
    docs = []
    for _doc in range(n):
        words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(40)]
        lines = [f"def {rng.choice(words)}(x):\n\treturn {' '.join(rng.choices(words, k=5))}"
                 f" + {rng.randint(0, 10**6)}\n" for _ in range(rng.randint(1, 12))]
        docs.append("".join(lines))
    return docs


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return make_docs(120)


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory: pytest.TempPathFactory, docs: list[str]) -> str:
    out = tmp_path_factory.mktemp("tok") / "tok.model"
    return train_tokenizer(docs, str(out), vocab_size=VOCAB)


@pytest.fixture()
def corpus(tmp_path: Path, docs: list[str]) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", docs)


def read_split(out: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, global doc ends) of a prepared split, concatenated over its shards."""
    manifest = read_manifest(str(out))
    tokens, ends, base = [], [], 0
    for entry in manifest["splits"][split]["shards"]:
        shard = read_shard(str(out / entry["name"]))
        tokens.append(np.asarray(shard.tokens, dtype=np.int64))
        ends.append(shard.doc_ends.astype(np.int64) + base)
        base += shard.n_tokens
    return np.concatenate(tokens), np.concatenate(ends)


# ---------------------------------------------------------------------------------------------
# sources


def test_local_formats_agree(tmp_path: Path, docs: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs[:12]):  # zero-padded names: sorted order is document order
        (tmp_path / "txt" / f"{i:03d}.txt").write_text(d)
    write_jsonl(tmp_path / "a.jsonl", docs[:12], field="content")
    pq.write_table(pa.table({"content": docs[:12]}), tmp_path / "a.parquet", row_group_size=5)
    assert list(iter_documents(str(tmp_path / "txt"))) == docs[:12]
    assert list(iter_documents(str(tmp_path / "txt" / "*.txt"))) == docs[:12]
    assert list(iter_documents(str(tmp_path / "a.jsonl"), text_field="content")) == docs[:12]
    assert list(iter_documents(str(tmp_path / "a.parquet"), text_field="content")) == docs[:12]


def test_txt_keeps_crlf_exactly(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"line one\r\nline two\r\n")
    assert list(iter_documents(str(tmp_path / "a.txt"))) == ["line one\r\nline two\r\n"]


def test_max_bytes_cuts_exactly(corpus: Path, docs: list[str]) -> None:
    out = list(iter_documents(str(corpus), max_bytes=1000))
    assert sum(len(d.encode()) for d in out) == 1000
    assert out[:-1] == docs[:len(out) - 1] and docs[len(out) - 1].startswith(out[-1])


def test_missing_source_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data source .*nowhere\.jsonl does not exist"):
        list(iter_documents(str(tmp_path / "nowhere.jsonl")))
    with pytest.raises(DataError, match=r"holds no \.txt, \.jsonl, .*\.parquet files"):
        list(iter_documents(str(tmp_path / "*.jsonl")))


def test_missing_text_field_names_field_and_file(corpus: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pytest.raises(DataError, match=r"corpus\.jsonl:1 has no field 'body'.*text_field"):
        list(iter_documents(str(corpus), text_field="body"))
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet has no column 'body'"):
        list(iter_documents(str(tmp_path / "p.parquet"), text_field="body"))


def test_bad_jsonl_line_is_named(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"b\.jsonl:2 is not valid JSON"):
        list(iter_documents(str(tmp_path / "b.jsonl")))


def test_compressed_jsonl_streams_like_plain(tmp_path: Path, docs: list[str]) -> None:
    import zstandard

    plain = write_jsonl(tmp_path / "a.jsonl", docs[:20]).read_bytes()
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "a.jsonl.gz").write_bytes(gzip.compress(plain))
    (tmp_path / "gz" / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(plain))
    assert list(iter_documents(str(tmp_path / "gz"))) == docs[:20] * 2
    assert "files=" in describe_source(str(tmp_path / "gz" / "*.jsonl.*"))


def test_unusable_documents_are_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(
        b'{"text": "one"}\n{"text": ""}\n{"text": null}\n\xff\xfe not utf-8\n'
        b'{"text": "lone \\ud800 surrogate"}\n{"text": "pair \\ud83d\\ude00 ok"}\n')
    (tmp_path / "b.txt").write_bytes(b"latin-1 caf\xe9")
    (tmp_path / "c.txt").write_text("two")
    stats = SourceStats()
    assert list(iter_documents(str(tmp_path), stats=stats)) == ["one", "pair 😀 ok", "two"]
    assert stats.skipped == {"empty": 2, "non_utf8": 3}
    assert stats.first["non_utf8"].endswith("a.jsonl:4")
    assert "2 empty" in stats.describe() and "3 non_utf8 (first at" in stats.describe()


def test_unreadable_or_damaged_files_are_named(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"cannot read corpus file .*bad\.jsonl\.gz"):
        list(iter_documents(str(tmp_path / "bad.jsonl.gz")))
    (tmp_path / "cut.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd garbage")
    with pytest.raises(DataError, match=r"cannot read corpus file .*cut\.jsonl\.zst"):
        list(iter_documents(str(tmp_path / "cut.jsonl.zst")))
    write_jsonl(tmp_path / "locked.jsonl", ["x"])

    def denied(path: str) -> Any:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(sources_mod, "_open_binary", denied)  # root ignores chmod
    with pytest.raises(DataError, match=r"cannot read corpus file .*locked\.jsonl "
                                        r"\(.*Permission denied"):
        list(iter_documents(str(tmp_path / "locked.jsonl")))


def test_hub_source_streams_through_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load_dataset(name: str, config: str | None, *, split: str,
                          streaming: bool) -> Iterator[dict[str, str]]:
        calls.append((name, config, split, streaming))
        return iter([{"text": "one"}, {"text": "two"}, {"body": "three"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    docs = iter_documents("hf:org/corpus:en", split="validation")
    assert [next(docs), next(docs)] == ["one", "two"]
    with pytest.raises(DataError, match=r"record 2 of hf:org/corpus:en .*no field 'text'"):
        next(docs)
    assert calls == [("org/corpus", "en", "validation", True)]
    assert sources_mod.parse_hub_source("hf:tiny") == ("tiny", None)


def test_builtin_corpus_is_deterministic_stdlib_code() -> None:
    first = list(iter_documents("builtin", max_bytes=100_000))
    assert first == list(iter_documents("builtin", max_bytes=100_000))
    assert sum(len(d.encode()) for d in first) == 100_000
    files = list(builtin_files())
    assert len(files) > 100 and all(f.startswith(stdlib_dir()) for f in files)
    assert all(f.endswith(".py") for f in files)
    assert not any("site-packages" in f or f"{os.sep}test{os.sep}" in f for f in files)


# ---------------------------------------------------------------------------------------------
# prepare


def test_shards_hold_the_documents_each_ending_in_eos(
    corpus: Path, tmp_path: Path, tok_path: str, docs: list[str]
) -> None:
    out = tmp_path / "out"
    manifest = prepare(str(corpus), tok_path, str(out), shard_tokens=1000, val_fraction=0.0)
    tok = Tokenizer.load(tok_path)
    expected = np.concatenate([tok.encode(d) + [tok.eos_id] for d in docs])
    tokens, ends = read_split(out, "train")
    np.testing.assert_array_equal(tokens, expected)
    np.testing.assert_array_equal(ends, np.flatnonzero(expected == tok.eos_id) + 1)
    sizes = [s["n_tokens"] for s in manifest["splits"]["train"]["shards"]]
    assert len(sizes) > 2 and set(sizes[:-1]) == {1000} and 0 < sizes[-1] <= 1000
    assert manifest["n_tokens"] == len(expected) and manifest["vocab_size"] == VOCAB
    assert manifest["tokenizer"]["fingerprint"] == tok.fingerprint
    assert Tokenizer.load(str(out / "tokenizer.model")).fingerprint == tok.fingerprint


def test_output_is_identical_for_any_worker_count(
    corpus: Path, tmp_path: Path, tok_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prepare_mod, "_BATCH_BYTES", 2000)  # many tasks, to exercise ordering
    contents = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        prepare(str(corpus), tok_path, str(out), num_workers=workers, shard_tokens=700,
                val_fraction=0.2)
        contents.append({str(p.relative_to(out)): p.read_bytes()
                         for p in sorted(out.rglob("*")) if p.is_file()})
    assert contents[0] == contents[1]
    assert len([n for n in contents[0] if n.startswith("train/")]) > 3


def test_val_split_is_deterministic_and_disjoint(
    corpus: Path, tmp_path: Path, tok_path: str, docs: list[str]
) -> None:
    prepare(str(corpus), tok_path, str(tmp_path / "o"), shard_tokens=500, val_fraction=0.25)
    tok = Tokenizer.load(tok_path)
    by_split = {}
    for split in ("train", "val"):
        tokens, ends = read_split(tmp_path / "o", split)
        by_split[split] = [tok.decode(d) for d in np.split(tokens, ends[:-1])]
    want_val = [d for i, d in enumerate(docs) if is_val_document(i, d, 0.25)]
    assert by_split["val"] == want_val and 15 < len(want_val) < 45
    assert by_split["train"] == [d for d in docs if d not in want_val]


def test_tiny_val_fraction_still_gets_a_document(
    corpus: Path, tmp_path: Path, tok_path: str
) -> None:
    manifest = prepare(str(corpus), tok_path, str(tmp_path / "o"), val_fraction=1e-9)
    assert manifest["splits"]["val"]["n_docs"] == 1
    assert manifest["splits"]["train"]["n_docs"] == 119


def test_reprepare_replaces_old_shards(corpus: Path, tmp_path: Path, tok_path: str) -> None:
    out = tmp_path / "o"
    prepare(str(corpus), tok_path, str(out), shard_tokens=300)
    manifest = prepare(str(corpus), tok_path, str(out), shard_tokens=5000)
    names = {s["name"] for s in manifest["splits"]["train"]["shards"]}
    assert {str(p.relative_to(out)) for p in (out / "train").iterdir()} == names


def test_crash_during_prepare_leaves_no_manifest(
    corpus: Path, tmp_path: Path, tok_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = []

    def flaky_write_shard(path: str, *args: Any, **kwargs: Any) -> str:
        if written:
            raise OSError("killed")
        written.append(path)
        return real(path, *args, **kwargs)

    real = writer_mod.write_shard
    monkeypatch.setattr(writer_mod, "write_shard", flaky_write_shard)
    with pytest.raises(OSError, match="killed"):
        prepare(str(corpus), tok_path, str(tmp_path / "o"), shard_tokens=500)
    assert not (tmp_path / "o" / "manifest.json").exists()
    with pytest.raises(DataError, match="not a prepared dataset"):
        read_manifest(str(tmp_path / "o"))


def tree(out: Path) -> dict[str, str]:
    """Every file under `out` and its digest."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def dup_corpus(tmp_path: Path, docs: list[str]) -> Path:
    """docs with every fifth one repeated later (20 exact duplicates)."""
    return write_jsonl(tmp_path / "dups.jsonl", docs[:100] + docs[:100:5])


RESUME_ARGS: dict[str, Any] = dict(shard_tokens=400, val_fraction=0.2, dedup=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, docs: list[str],
                  tok_path: str) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("uninterrupted")
    corpus = dup_corpus(root, docs)
    prepare(str(corpus), tok_path, str(root / "out"), num_workers=1, **RESUME_ARGS)
    return corpus, tree(root / "out")


@pytest.mark.parametrize("stops", [[1], [4, 9], [6, 1, 12], [30]])
def test_resumed_preparation_equals_uninterrupted(
    uninterrupted: tuple[Path, dict[str, str]], tmp_path: Path, tok_path: str,
    monkeypatch: pytest.MonkeyPatch, stops: list[int],
) -> None:
    corpus, expected = uninterrupted
    assert len([n for n in expected if n.startswith("val/")]) > 3  # val shards cut too
    out = tmp_path / "out"
    real = writer_mod.write_shard
    written: list[str] = []
    for stop in stops:  # each run dies while writing its stop-th shard
        def dying_write_shard(path: str, *args: Any, stop: int = stop, **kw: Any) -> str:
            if len(written) == stop:
                raise KeyboardInterrupt("killed")
            written.append(path)
            return real(path, *args, **kw)

        written.clear()
        monkeypatch.setattr(writer_mod, "write_shard", dying_write_shard)
        with pytest.raises(KeyboardInterrupt):
            prepare(str(corpus), tok_path, str(out), num_workers=2, **RESUME_ARGS)
        assert (out / "prepare.progress.json").exists() and not (out / "manifest.json").exists()
    monkeypatch.setattr(writer_mod, "write_shard", lambda *a, **kw: written.append(a[0])
                        or real(*a, **kw))
    written.clear()
    messages: list[str] = []
    prepare(str(corpus), tok_path, str(out), num_workers=1, log=messages.append, **RESUME_ARGS)
    assert tree(out) == expected
    assert messages[0].startswith("resuming the preparation") and "shards done" in messages[0]
    total = len([n for n in expected if n.endswith(".bin")])
    assert len(written) < total  # finished shards were not written again


KILLS = {
    # after six whole shards, mid-way through the seventh
    "shard": """
real, n = w.write_shard, [0]
def write_then_die(*a, **kw):
    n[0] += 1
    if n[0] == 7:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **kw)
w.write_shard = write_then_die
""",
    # half-way through the fifth progress write: its temporary file holds half the JSON
    "progress": """
real, n = w.atomic_write, [0]
def write_half_then_die(path, write, **kw):
    n[0] += 1
    if n[0] < 5:
        return real(path, write, **kw)
    def half(f):
        buf = io.BytesIO()
        write(buf)
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, half, **kw)
w.atomic_write = write_half_then_die
""",
}


@pytest.mark.parametrize("where", sorted(KILLS))
def test_killed_preparation_resumes_byte_identical(
    uninterrupted: tuple[Path, dict[str, str]], tmp_path: Path, tok_path: str, where: str
) -> None:
    """A real SIGKILL in the middle of writing a shard or the progress file, in another
    process, then a resume here: the same files, and no temporary file left."""
    corpus, expected = uninterrupted
    out = tmp_path / "out"
    script = f"""
import io, os, signal
import pretrain.data.shard_writer as w
from pretrain.data.prepare import prepare
{KILLS[where]}
prepare({str(corpus)!r}, {tok_path!r}, {str(out)!r}, num_workers=2, **{RESUME_ARGS!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2],
                          capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert not (out / "manifest.json").exists()
    if where == "progress":
        assert (out / ".prepare.progress.json.tmp").exists()
    prepare(str(corpus), tok_path, str(out), num_workers=1, **RESUME_ARGS)
    assert tree(out) == expected


STALE = [".prepare.progress.json.tmp", ".prepare.progress.json.0123456789ab.tmp",
         ".manifest.json.abcdef012345.tmp", "train/.000009.bin.00112233aabb.tmp",
         "val/.000001.bin.a0b1c2d3e4f5.tmp"]
NOT_OURS = ["notes.tmp", ".notes.json.0123456789ab.tmp", "train/keep.tmp"]


def interrupted(corpus: Path, tok_path: str, out: Path, monkeypatch: pytest.MonkeyPatch,
                at: int) -> None:
    """A preparation of `corpus` into `out` that dies while writing its `at`-th shard."""
    real, n = writer_mod.write_shard, [0]

    def dies(*a: Any, **kw: Any) -> str:
        n[0] += 1
        if n[0] == at:
            raise KeyboardInterrupt("killed")
        return real(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(writer_mod, "write_shard", dies)
        with pytest.raises(KeyboardInterrupt):
            prepare(str(corpus), tok_path, str(out), num_workers=1, **RESUME_ARGS)


def plant(out: Path, names: list[str]) -> None:
    for name in names:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text('{"key": "half')


def test_stale_temporary_files_of_killed_runs_are_removed(
    uninterrupted: tuple[Path, dict[str, str]], tmp_path: Path, tok_path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What killed writes left (our names only) goes at the next resume, fresh start or
    already-prepared check of the directory; other files stay."""
    corpus, expected = uninterrupted
    out = tmp_path / "out"
    interrupted(corpus, tok_path, out, monkeypatch, at=4)
    plant(out, STALE + NOT_OURS)
    messages: list[str] = []
    prepare(str(corpus), tok_path, str(out), num_workers=1, log=messages.append, **RESUME_ARGS)
    assert messages[0].startswith("resuming the preparation")
    assert tree(out) == {**expected, **{n: tree(out)[n] for n in NOT_OURS}}
    plant(out, STALE)
    assert prepare(str(corpus), tok_path, str(out), num_workers=1, **RESUME_ARGS)
    assert sorted(set(tree(out)) - set(expected)) == sorted(NOT_OURS)
    plant(out, STALE)
    prepare(str(corpus), tok_path, str(out), num_workers=1, resume=False, **RESUME_ARGS)
    assert sorted(set(tree(out)) - set(expected)) == sorted(NOT_OURS)


def test_resumed_speed_counts_only_this_runs_tokens(
    uninterrupted: tuple[Path, dict[str, str]], tmp_path: Path, tok_path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    corpus, _ = uninterrupted
    out = tmp_path / "out"
    interrupted(corpus, tok_path, out, monkeypatch, at=6)
    progress = json.loads((out / "prepare.progress.json").read_text())
    before = sum(e["n_tokens"] for split in progress["splits"].values() for e in split["shards"])
    assert before > 0
    clock = iter([100.0, 104.0, 200.0, 200.5])  # this call: 4 s; the next: 0.5 s
    monkeypatch.setattr(prepare_mod.time, "perf_counter", lambda: next(clock))
    stats = prepare_mod.PrepareStats()
    manifest = prepare(str(corpus), tok_path, str(out), num_workers=1, stats=stats,
                       **RESUME_ARGS)
    assert stats.resumed and not stats.already_prepared and stats.seconds == 4.0
    assert stats.tokens_before == before and stats.tokens == manifest["n_tokens"] - before
    assert stats.tokens_per_s == stats.tokens / 4.0
    again = prepare_mod.PrepareStats()
    prepare(str(corpus), tok_path, str(out), stats=again, **RESUME_ARGS)
    assert again.already_prepared and again.tokens == 0 and again.tokens_per_s == 0.0
    assert again.tokens_before == manifest["n_tokens"]
    fresh = prepare_mod.PrepareStats()
    monkeypatch.setattr(prepare_mod.time, "perf_counter", iter([0.0, 2.0]).__next__)
    prepare(str(corpus), tok_path, str(out), stats=fresh, resume=False, **RESUME_ARGS)
    assert not fresh.resumed and fresh.tokens == manifest["n_tokens"]
    assert fresh.tokens_before == 0 and fresh.tokens_per_s == manifest["n_tokens"] / 2.0


def test_finished_preparation_is_kept_and_other_inputs_start_afresh(
    corpus: Path, tmp_path: Path, tok_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "o"
    first = prepare(str(corpus), tok_path, str(out), shard_tokens=500)
    messages: list[str] = []
    assert prepare(str(corpus), tok_path, str(out), shard_tokens=500,
                   log=messages.append) == first
    assert "already prepared" in messages[0]
    # an unfinished run of other inputs is not resumed: its progress is for another key
    (out / "prepare.progress.json").write_text(json.dumps({"key": "other", "splits": {}}))
    (out / "manifest.json").unlink()
    assert prepare(str(corpus), tok_path, str(out), shard_tokens=500) == first
    assert not (out / "prepare.progress.json").exists()
    calls: list[str] = []
    real = writer_mod.write_shard
    monkeypatch.setattr(writer_mod, "write_shard", lambda *a, **kw: calls.append(a[0])
                        or real(*a, **kw))
    prepare(str(corpus), tok_path, str(out), shard_tokens=500, resume=False)
    assert len(calls) == len(first["splits"]["train"]["shards"]) + len(
        first["splits"]["val"]["shards"])


def test_dedup_drops_exact_duplicates_and_counts_them(
    tmp_path: Path, tok_path: str, docs: list[str]
) -> None:
    corpus = dup_corpus(tmp_path, docs)
    kept = prepare(str(corpus), tok_path, str(tmp_path / "dedup"), val_fraction=0.2,
                   dedup=True)
    everything = prepare(str(corpus), tok_path, str(tmp_path / "all"), val_fraction=0.2)
    assert kept["documents"] == {"read": 120, "duplicates": 20, "skipped": {}}
    assert everything["documents"]["duplicates"] == 0 and not everything["dedup"]
    n_docs = {m["dedup"]: sum(s["n_docs"] for s in m["splits"].values())
              for m in (kept, everything)}
    assert n_docs == {True: 100, False: 120}
    tok = Tokenizer.load(tok_path)
    texts = []
    for split in ("train", "val"):
        tokens, ends = read_split(tmp_path / "dedup", split)
        texts += [tok.decode(d) for d in np.split(tokens, ends[:-1])]
    assert sorted(texts) == sorted(docs[:100])  # each document once, in one split only


def test_hash_set_finds_duplicates_within_and_across_batches() -> None:
    seen = HashSet()
    rng = np.random.default_rng(0)
    reference: set[int] = set()
    for _ in range(40):
        batch = rng.integers(0, 3000, size=rng.integers(1, 200)).astype(np.uint64)
        expected = []
        for h in batch.tolist():
            expected.append(h in reference)
            reference.add(h)
        np.testing.assert_array_equal(seen.add(batch), expected)
    assert len(seen) == len(reference) and len(seen._runs) <= 12


def test_counted_skips_are_reported_and_a_source_left_empty_is_an_error(
    tmp_path: Path, tok_path: str
) -> None:
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "def f(x):\\n  return x"}\n\xff\n'
                                       b'{"text": ""}\n')
    manifest = prepare(str(tmp_path / "c.jsonl"), tok_path, str(tmp_path / "o"))
    assert manifest["documents"]["skipped"] == {"empty": 1, "non_utf8": 1}
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "nothing.jsonl").write_bytes(b'{"text": ""}\n\xfe\xff\n')
    for name, message in (("empty.jsonl", r"0 read, 0 duplicates, skipped: none"),
                          ("nothing.jsonl", r"skipped: 1 empty .*1 non_utf8")):
        out = tmp_path / name.replace(".jsonl", "")
        with pytest.raises(DataError, match=rf"yielded no training documents .*{message}"):
            prepare(str(tmp_path / name), tok_path, str(out), val_fraction=0.5)
        assert [p for p in out.rglob("*") if p.is_file()] == []  # nothing half-written


def test_duplicates_only_source_leaves_nothing_behind(tmp_path: Path, tok_path: str) -> None:
    corpus = write_jsonl(tmp_path / "same.jsonl", ["x = 1\n"] * 5)
    with pytest.raises(DataError, match=r"5 read, 4 duplicates"):
        prepare(str(corpus), tok_path, str(tmp_path / "o"), dedup=True, val_fraction=0.5)
    assert [p for p in (tmp_path / "o").rglob("*") if p.is_file()] == []


def test_tool_prints_summary_and_one_line_errors(
    corpus: Path, tmp_path: Path, tok_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--source", str(corpus), "--tokenizer", tok_path, "--out", str(tmp_path / "o"),
            "--workers", "1", "--shard-tokens", "4096"]
    assert prepare_tool.main(argv) == 0
    out = capsys.readouterr().out
    assert "train:" in out and "val:" in out and "tokens/s" in out
    assert prepare_tool.main(argv + ["--text-field", "body"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: record") and "'body'" in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# ensure_prepared


def data_cfg(tmp_path: Path, source: Path, **kw: object) -> DataConfig:
    base: dict[str, object] = dict(name="t", source=str(source), cache_dir=str(tmp_path / "cache"),
                                   max_bytes=0, tokenizer_sample_bytes=100_000, shard_tokens=2000,
                                   prepare_workers=1)
    return DataConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_ensure_prepared_trains_prepares_and_reuses(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = data_cfg(tmp_path, corpus)
    data_dir, tok_path = ensure_prepared(cfg, vocab_size=VOCAB)
    assert Tokenizer.load(tok_path).vocab_size == VOCAB
    assert read_manifest(data_dir)["tokenizer"]["fingerprint"] == Tokenizer.load(
        tok_path).fingerprint

    def must_not_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cache was not reused")

    monkeypatch.setattr(prepare_mod, "prepare", must_not_run)
    monkeypatch.setattr(prepare_mod, "train_tokenizer_from_source", must_not_run)
    assert ensure_prepared(cfg, vocab_size=VOCAB) == (data_dir, tok_path)
    # a prepared directory can be named directly; its own tokenizer is used
    assert ensure_prepared(data_cfg(tmp_path, corpus, dir=data_dir),
                           vocab_size=VOCAB)[1] == os.path.join(data_dir, "tokenizer.model")


def test_concurrent_callers_prepare_once(
    corpus: Path, tmp_path: Path, tok_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = prepare_mod.prepare

    def counting_prepare(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_mod, "prepare", counting_prepare)
    cfg = data_cfg(tmp_path, corpus, tokenizer=tok_path)
    results: list[tuple[str, str]] = []
    threads = [threading.Thread(target=lambda: results.append(
        ensure_prepared(cfg, vocab_size=VOCAB))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1 and len(calls) == 1


def test_vocab_mismatch_is_caught_before_any_work(
    corpus: Path, tmp_path: Path, tok_path: str
) -> None:
    cfg = data_cfg(tmp_path, corpus, tokenizer=tok_path)
    with pytest.raises(DataError, match=rf"tokenizer .*tok\.model has vocabulary {VOCAB} but "
                                        rf"model\.vocab_size=8192; set model\.vocab_size={VOCAB}"):
        ensure_prepared(cfg, vocab_size=8192)
    assert not (tmp_path / "cache" / "data").exists()


def test_missing_or_unprepared_data_dir(corpus: Path, tmp_path: Path, tok_path: str) -> None:
    with pytest.raises(DataError, match=r"data directory .*absent does not exist.*"
                                        r"pretrain-prepare-data"):
        ensure_prepared(data_cfg(tmp_path, corpus, dir=str(tmp_path / "absent")), vocab_size=VOCAB)
    (tmp_path / "half").mkdir()
    with pytest.raises(DataError, match=r"half is not a prepared dataset"):
        ensure_prepared(data_cfg(tmp_path, corpus, dir=str(tmp_path / "half")), vocab_size=VOCAB)


def test_data_dir_with_another_tokenizer_is_rejected(
    corpus: Path, tmp_path: Path, tok_path: str, docs: list[str]
) -> None:
    prepare(str(corpus), tok_path, str(tmp_path / "o"))
    other = train_tokenizer(docs[:60], str(tmp_path / "other.model"), vocab_size=VOCAB)
    cfg = data_cfg(tmp_path, corpus, dir=str(tmp_path / "o"), tokenizer=other)
    with pytest.raises(DataError, match="prepared with a different tokenizer"):
        ensure_prepared(cfg, vocab_size=VOCAB)


def test_schema_default_cache_dir_resolves_outside_hydra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRETRAIN_CACHE", "/somewhere/cache")
    assert prepare_mod.resolve_cache_dir(DataConfig().cache_dir) == "/somewhere/cache"
    monkeypatch.delenv("PRETRAIN_CACHE")
    monkeypatch.setenv("HOME", "/home/u")
    assert prepare_mod.resolve_cache_dir(DataConfig().cache_dir) == "/home/u/.cache/pretrain"
