"""The data tools: prepare (resume, dedup report), count tokens, inspect a step's windows, and
the data benchmark."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pretrain.data import ShardedWindowLoader, Tokenizer, read_manifest, train_tokenizer
from pretrain.data import prepare as prepare_mod
from pretrain.data import shard_writer as writer_mod
from pretrain.data.inspect import BOUNDARY, EOS_MARK
from pretrain.data.stats import LengthHistogram, count_prepared
from tests.unit.test_prepare import make_docs, write_jsonl
from tools import bench_data, count_tokens, inspect_data
from tools import prepare_data as prepare_tool

VOCAB = 512
SEQ = 32


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tools")
    docs = make_docs(90, seed=4)
    tok = train_tokenizer(docs, str(root / "tok.model"), vocab_size=VOCAB)
    paths = {"tok": Path(tok), "web_corpus": write_jsonl(root / "web.jsonl", docs[:60]),
             "code_corpus": write_jsonl(root / "code.jsonl", docs[60:])}
    for name in ("web", "code"):
        assert prepare_tool.main(["--source", str(paths[f"{name}_corpus"]), "--tokenizer", tok,
                                  "--out", str(root / name), "--workers", "1",
                                  "--shard-tokens", "1500", "--val-fraction", "0.1"]) == 0
        paths[name] = root / name
    return paths


def test_prepare_tool_reports_dedup_and_resumes(
    prepared: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    docs = make_docs(30, seed=4)
    corpus = write_jsonl(tmp_path / "d.jsonl", docs + docs[:7])
    argv = ["--source", str(corpus), "--tokenizer", str(prepared["tok"]), "--out",
            str(tmp_path / "o"), "--workers", "1", "--shard-tokens", "300", "--dedup"]
    real, calls = writer_mod.write_shard, []

    def dies_at_third(*a: Any, **kw: Any) -> str:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(writer_mod, "write_shard", dies_at_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_tool.main(argv)
    monkeypatch.setattr(writer_mod, "write_shard", real)
    progress = json.loads((tmp_path / "o" / "prepare.progress.json").read_text())
    before = sum(e["n_tokens"] for split in progress["splits"].values() for e in split["shards"])
    capsys.readouterr()
    monkeypatch.setattr(prepare_mod.time, "perf_counter", iter([10.0, 12.0]).__next__)
    assert prepare_tool.main(argv) == 0
    out = capsys.readouterr().out
    assert "resuming the preparation" in out and "2 shards done" in out
    assert "documents: 37 read, 7 duplicates removed, skipped: none" in out
    total = read_manifest(str(tmp_path / "o"))["n_tokens"]
    new = total - before  # the speed of the resumed run counts only the tokens it wrote
    assert (f"{total:,} tokens (uint16); this run: {new:,} new tokens in 2.0s, "
            f"{new / 2:,.0f} tokens/s (resumed after {before:,})") in out
    monkeypatch.setattr(prepare_mod.time, "perf_counter", iter([20.0, 20.001]).__next__)
    assert prepare_tool.main(argv) == 0
    out = capsys.readouterr().out
    assert "already prepared" in out and "tokens/s" not in out
    assert not [p.name for p in (tmp_path / "o").rglob("*.tmp")]


def test_count_tokens_from_shards_matches_the_manifest(
    prepared: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "lengths.png"
    assert count_tokens.main([f"web={prepared['web']}", str(prepared["code"]),
                              "--hist", str(png)]) == 0
    out = capsys.readouterr().out
    for name in ("web", "code"):
        manifest = read_manifest(str(prepared[name]))
        for split, entry in manifest["splits"].items():
            line = next(ln for ln in out.splitlines() if ln.split()[:2] == [name, split])
            assert f"{entry['n_tokens']:,}" in line and f"{entry['n_docs']:,}" in line
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    total = sum(read_manifest(str(prepared[n]))["n_tokens"] for n in ("web", "code"))
    assert f"{total:,}" in out.splitlines()[-2]


def test_count_tokens_of_a_corpus_equals_its_preparation(
    prepared: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert count_tokens.main(["--source", str(prepared["web_corpus"]), "--tokenizer",
                              str(prepared["tok"]), "--workers", "1"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("corpus"))
    assert f"{read_manifest(str(prepared['web']))['n_tokens']:,}" in line
    assert f"{60:,}" in line.split()


def test_document_lengths_from_shards_are_exact(prepared: dict[str, Path]) -> None:
    tok = Tokenizer.load(str(prepared["tok"]))
    counts = {c.split: c for c in count_prepared("web", str(prepared["web"]))}
    docs = [json.loads(line)["text"] for line in prepared["web_corpus"].read_text().splitlines()]
    lengths = np.array([len(tok.encode(d)) + 1 for d in docs])
    assert counts["train"].n_docs + counts["val"].n_docs == len(docs)
    both = LengthHistogram()
    both.add(lengths)
    merged = counts["train"].lengths.counts + counts["val"].lengths.counts
    np.testing.assert_array_equal(merged, both.counts)  # documents spanning shards count once
    assert max(counts["train"].lengths.longest, counts["val"].lengths.longest) == lengths.max()


def test_inspect_shows_what_the_rank_read_at_that_step(
    prepared: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    step, rank, dp, mb, gbs = 3, 1, 2, 2, 8  # 2 micro-batches per rank and step
    argv = ["--data", f"web={prepared['web']}:0.7", "--data", f"code={prepared['code']}:0.3",
            "--seq-len", str(SEQ), "--micro-batch-size", str(mb), "--global-batch-size",
            str(gbs), "--dp-size", str(dp), "--rank", str(rank), "--step", str(step),
            "--seed", "5", "--max-chars", "0"]
    assert inspect_data.main(argv) == 0
    out = capsys.readouterr().out
    # the rank's loader, driven through the steps as training would
    loader = ShardedWindowLoader({"web": str(prepared["web"]), "code": str(prepared["code"])},
                                 seq_len=SEQ, micro_batch_size=mb, dp_rank=rank, dp_size=dp,
                                 seed=5, vocab_size=VOCAB, weights={"web": 0.7, "code": 0.3})
    for _ in range((step - 1) * 2):
        loader.next_batch()
    tok = Tokenizer.load(str(prepared["tok"]))
    blocks = out.strip().split("\n\n== ")
    assert len(blocks) == 2 * mb
    for i in range(2):
        batch = loader.next_batch()
        for row in range(mb):
            block = blocks[i * mb + row]
            s, w = int(loader.last_rows.sources[row]), int(loader.last_rows.windows[row])
            assert (f"micro-batch {i + 1}/2 | row {row} | source {loader.names[s]} | "
                    f"window {w} (epoch 0)") in block
            text = block.split("==\n", 1)[1]
            text = text.removeprefix("[... continues a document from before this window]\n")
            assert text.replace(f"\n{BOUNDARY}\n", "").replace(EOS_MARK, "") == tok.decode(
                batch.inputs[row].tolist())
            n_eos = int((batch.inputs[row] == tok.eos_id).sum())
            assert text.count(EOS_MARK) == n_eos
            assert text.count(BOUNDARY) == n_eos - int(batch.inputs[row][-1] == tok.eos_id)


def test_inspect_errors_are_one_line(prepared: dict[str, Path],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert inspect_data.main(["--data", f"web={prepared['web']}", "--global-batch-size", "6",
                              "--micro-batch-size", "4", "--step", "1"]) == 2
    assert "does not split into 1 ranks of micro-batches of 4" in capsys.readouterr().err
    assert inspect_data.main(["--data", "web=/no/such/dir", "--step", "1"]) == 2
    assert "/no/such/dir does not exist" in capsys.readouterr().err


def test_bench_runs_both_pipelines_on_the_same_corpus(
    prepared: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json = tmp_path / "bench.json"
    assert bench_data.main(["--source", str(prepared["web_corpus"]), "--tokenizer",
                            str(prepared["tok"]), "--workers", "2", "--reps", "1",
                            "--loader-tokens", "300000", "--seq-len", "256",
                            "--loader-batches", "20", "--step-ms", "1",
                            "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "pretrain prepare" in out and "datasets map num_proc=2" in out
    assert "ours / datasets" in out and "2 prefetch threads" in out and "load average" in out
    figures = json.loads(out_json.read_text())
    assert figures["prepare"]["ours"]["tokens_per_s"] > 0
    assert set(figures["loader"]["tokens_per_s"]) == set(bench_data.LOADER_MODES)
