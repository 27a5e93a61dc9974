"""Validation per source of a 2-source mixture: the same set of windows, batched one source at
a time; `val/loss/<source>` equals that source's windows evaluated alone, `val/loss` stays the
token-weighted mean over the whole mixed set (today's figure), with and without `eval.stride`.
Two ranks against one: tests/distributed/test_per_source_val.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.data.loader import ShardedWindowLoader
from pretrain.data.mixture import assign_sources
from pretrain.data.tokenizer import train_tokenizer
from pretrain.models.loss import IGNORE_INDEX
from pretrain.train.module import TrainModule
from pretrain.train.trainer import train
from tests.distributed.parity import SEQ, TINY
from tests.unit.test_eval_stride import trained_module, write_source
from tests.unit.test_prepare import make_docs, write_jsonl
from tests.unit.test_train_step import make_config

WEIGHTS = {"a": 0.3, "b": 0.7}
N = 13  # windows: not a multiple of the micro-batch, so every source pads its last batch


def write_mixture(root: Path) -> dict[str, str]:
    """Source a's tokens lie in [0, 64), b's in [64, 128)."""
    return {"a": write_source(root / "a", seed=5), "b": write_source(root / "b", seed=6, low=64)}


def mixture_loader(dirs: dict[str, str], **kw: object) -> ShardedWindowLoader:
    args: dict = dict(seq_len=SEQ, micro_batch_size=3, vocab_size=TINY.vocab_size,
                      weights=WEIGHTS)
    return ShardedWindowLoader(dirs, "val", **(args | kw))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_mixture(tmp_path_factory.mktemp("per-source"))


@pytest.fixture(scope="module")
def module() -> TrainModule:
    return trained_module()


def real_rows(batches: list) -> list[tuple[str | None, np.ndarray]]:
    return [(b.source, b.inputs[i].numpy()) for b in batches for i in range(len(b.inputs))
            if (b.targets[i] != IGNORE_INDEX).any()]


def test_by_source_batches_hold_the_same_windows_one_source_each(dirs: dict[str, str]) -> None:
    val = mixture_loader(dirs)
    plain = real_rows(list(val.eval_windows(N)))
    grouped = real_rows(list(val.eval_windows(N, by_source=True)))
    assert {s for s, _ in plain} == {None} and [s for s, _ in grouped] == sorted(
        s for s, _ in grouped)
    for name, row in grouped:  # every row of a batch comes from the source it names
        assert ((row >= 64) == (name == "b")).all(), name
    key = lambda rows: sorted(r.tobytes() for _, r in rows)  # noqa: E731
    assert key(plain) == key(grouped) and len(plain) == N


@pytest.mark.parametrize("stride", [None, 5])
def test_per_source_losses_and_the_overall(module: TrainModule, dirs: dict[str, str],
                                           stride: int | None) -> None:
    val = mixture_loader(dirs)
    out = module.evaluate(val.eval_windows(N, stride=stride, by_source=True))
    overall = module.evaluate(val.eval_windows(N, stride=stride))
    assert set(out) == {"val/loss", "val/ppl", "val/loss/a", "val/loss/b", "val/ppl/a",
                        "val/ppl/b"}
    assert set(overall) == {"val/loss", "val/ppl"}  # one source's batches name none
    assert abs(out["val/loss"] - overall["val/loss"]) <= 1e-6 * overall["val/loss"]
    counts = np.bincount(assign_sources(np.arange(N), val._bounds, np.uint64(0)), minlength=2)
    tokens = {}
    for name, n in zip(("a", "b"), counts.tolist()):
        alone = module.evaluate(val.eval_windows(n, name, stride=stride))["val/loss"]
        assert abs(out[f"val/loss/{name}"] - alone) <= 1e-6 * alone, (name, alone)
        assert out[f"val/ppl/{name}"] == pytest.approx(math.exp(alone), rel=1e-6)
        s = stride or SEQ
        tokens[name] = SEQ + (n - 1) * s  # window 0 scores SEQ targets, the others `stride`
    mean = sum(tokens[k] * out[f"val/loss/{k}"] for k in tokens) / sum(tokens.values())
    assert abs(out["val/loss"] - mean) <= 1e-9, (out, mean)
    assert abs(out["val/loss/a"] - out["val/loss/b"]) > 1e-4  # the sources do differ


def test_by_source_names_even_a_lone_source(module: TrainModule, dirs: dict[str, str]) -> None:
    """(The trainer asks for it only with several sources, so a lone source adds nothing.)"""
    val = ShardedWindowLoader(dirs["a"], "val", seq_len=SEQ, micro_batch_size=3,
                              vocab_size=TINY.vocab_size)
    by = module.evaluate(val.eval_windows(7, by_source=True))
    assert set(by) == {"val/loss", "val/ppl", "val/loss/data", "val/ppl/data"}
    assert torch.isclose(torch.tensor(by["val/loss/data"]), torch.tensor(by["val/loss"]))


def test_a_mixture_run_logs_and_summarizes_each_source(cache_dir: Path, tmp_path: Path,
                                                       capfd: pytest.CaptureFixture) -> None:
    """Through the trainer: the console, metrics.jsonl and summary.json's final_eval."""
    docs = make_docs(160)
    tok = train_tokenizer(docs, str(tmp_path / "tok.model"), vocab_size=512)
    a = write_jsonl(tmp_path / "a.jsonl", docs[:80])
    b = write_jsonl(tmp_path / "b.jsonl", make_docs(80, seed=1))
    cfg = make_config(tmp_path, f"data.mix={{a: {{source: '{a}', weight: 0.4}}, "
                                f"b: {{source: '{b}', weight: 0.6}}}}",
                      f"data.tokenizer={tok}", "data.val_fraction=0.2", "steps=2",
                      "eval_every=1", "eval_windows=5", "eval.stride=32", "seq_len=64")
    (tmp_path / "mix").mkdir()  # the entry makes it
    summary = train(cfg, tmp_path / "mix")
    final = summary["final_eval"]
    assert {"val/loss", "val/loss/a", "val/loss/b", "val/ppl/a", "val/ppl/b"} <= set(final)
    assert min(final["val/loss/a"], final["val/loss/b"]) < final["val/loss"] < max(
        final["val/loss/a"], final["val/loss/b"])
    written = json.loads((tmp_path / "mix" / "summary.json").read_text())["final_eval"]
    assert written["val/loss/b"] == pytest.approx(final["val/loss/b"])
    rows = [json.loads(line) for line in (tmp_path / "mix" / "metrics.jsonl").open()]
    evals = [r for r in rows if "val/loss/a" in r]
    assert len(evals) == 2 and evals[-1]["val/loss/a"] == pytest.approx(final["val/loss/a"])
    assert "loss/a " in capfd.readouterr().out
