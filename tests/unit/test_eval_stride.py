"""Sliding-window validation (`eval.stride`): every token of the validation stream is scored
once, with the context the transformers perplexity guide gives it; checked against feeding each
token's context into the model one token at a time (fp32, 1e-5), with and without document
masking. stride=seq_len is today's validation, bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.data.loader import Batch, ShardedWindowLoader
from pretrain.data.shards import write_manifest, write_shard
from pretrain.errors import ConfigError
from pretrain.models.loss import IGNORE_INDEX
from pretrain.train.module import TrainModule
from tests.distributed.parity import SEQ, SINGLE, TINY, build, micro_batches
from tests.unit.test_train_step import make_config


def write_source(root: Path, *, seed: int, n_tokens: int = 700, low: int = 0) -> str:
    """A prepared `val` split of random tokens in [low, low + 64) with documents of 20 to 120
    tokens (many longer than SEQ), under the synthetic tokenizer of `tests.distributed.parity`."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(low, low + 64, size=n_tokens).astype(np.int64)
    ends = np.unique(np.append(np.cumsum(rng.integers(20, 120, size=n_tokens // 20)), n_tokens))
    ends = ends[ends <= n_tokens]
    (root / "val").mkdir(parents=True, exist_ok=True)
    checksum = write_shard(str(root / "val/000000.bin"), tokens, ends, vocab_size=TINY.vocab_size)
    shard = {"name": "val/000000.bin", "n_tokens": n_tokens, "n_docs": len(ends),
             "checksum": checksum}
    write_manifest(str(root), {"format": "pretrain-shards", "version": 1,
                               "vocab_size": TINY.vocab_size,
                               "tokenizer": {"file": "none", "fingerprint": "synthetic"},
                               "splits": {"val": {"n_tokens": n_tokens, "shards": [shard]}}})
    return str(root)


def trained_module(steps: int = 4) -> TrainModule:
    """The single-process tiny module after a few steps (its losses then depend on context)."""
    module, _, _ = build(SINGLE, steps)
    for step in range(steps):
        module.train_step(Batch(x, y) for x, y in micro_batches(step, 0, 1, 4))
    return module


@pytest.fixture(scope="module")
def module() -> TrainModule:
    return trained_module()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_source(tmp_path_factory.mktemp("stride"), seed=5)


def loader(data_dir: str, **kw: object) -> ShardedWindowLoader:
    args: dict = dict(seq_len=SEQ, micro_batch_size=3, vocab_size=TINY.vocab_size)
    return ShardedWindowLoader(data_dir, "val", **(args | kw))


def token_by_token(model: torch.nn.Module, src_loader: ShardedWindowLoader, n_windows: int,
                   stride: int, *, masking: bool) -> float:
    """Mean NLL of the tokens the first `n_windows` windows score, each predicted from its own
    context fed alone: tokens 1..SEQ from the stream's start, later token t from the start of
    the first window whose last `stride` targets hold it (with document masking: not before the
    start of t's input document)."""
    src = src_loader.sources[0]
    last = SEQ + (n_windows - 1) * stride  # the last scored target
    stream = np.empty(last + 1, dtype=np.int64)
    src.read_at(0, stream)
    total = 0.0
    model.eval()
    with torch.no_grad():
        for t in range(1, last + 1):
            start = 0 if t <= SEQ else -(-(t - SEQ) // stride) * stride
            if masking:  # the last document end at or before the input token t - 1
                ends = src.doc_ends_between(start, t - 1)
                start = int(ends[-1]) if len(ends) else start
            ids = torch.from_numpy(stream[start:t])[None]
            logits = model(ids)[0, -1].double()
            total -= float(torch.log_softmax(logits, -1)[stream[t]])
    model.train()
    return total / last


@pytest.mark.parametrize("stride,masking", [(1, False), (5, False), (5, True), (SEQ, True)])
def test_stride_equals_the_token_by_token_computation(module: TrainModule, data_dir: str,
                                                      stride: int, masking: bool) -> None:
    n = 7  # windows: the last micro-batch of 3 has two padding rows
    val = loader(data_dir, document_masking=masking)
    got = module.evaluate(val.eval_windows(n, stride=stride))["val/loss"]
    want = token_by_token(module.model, val, n, stride, masking=masking)
    assert abs(got - want) <= 1e-5, (got, want)
    if stride < SEQ:  # the context matters here: the plain windows score other tokens
        plain = module.evaluate(val.eval_windows(n))["val/loss"]
        assert abs(plain - got) > 1e-4, (plain, got)


def test_each_token_is_scored_once_on_any_layout(data_dir: str) -> None:
    """The scored (stream offset of the target) set is the same for 1 and 2 ranks and any
    micro-batch: 1..SEQ + (n - 1) * stride, each once."""
    n, stride = 9, 6
    for dp, mb in ((1, 3), (2, 2), (3, 4)):
        scored: list[int] = []
        for r in range(dp):
            val = loader(data_dir, micro_batch_size=mb, dp_rank=r, dp_size=dp)
            batches = list(val.eval_windows(n, stride=stride))
            assert len(batches) == -(-n // (dp * mb))
            for i, b in enumerate(batches):
                at = i * dp * mb + r * mb + np.arange(mb)  # eval positions = window indices
                for row, j in enumerate(at):
                    cols = (b.targets[row] != IGNORE_INDEX).nonzero().flatten().tolist()
                    scored += [int(j) * stride + c + 1 for c in cols]
                    # window j starts at j * stride (a padding row repeats window j % n)
                    np.testing.assert_array_equal(b.inputs[row].numpy(),
                                                  _stream(val, int(j) % n * stride, SEQ))
        assert sorted(scored) == list(range(1, SEQ + (n - 1) * stride + 1)), (dp, mb)


def _stream(val: ShardedWindowLoader, start: int, n: int) -> np.ndarray:
    out = np.empty(n, dtype=np.int64)
    val.sources[0].read_at(start, out)
    return out


def test_stride_seq_len_is_todays_validation_exactly(module: TrainModule, data_dir: str) -> None:
    for masking in (False, True):
        val = loader(data_dir, document_masking=masking)
        plain, strided = list(val.eval_windows(8)), list(val.eval_windows(8, stride=SEQ))
        for a, b in zip(plain, strided, strict=True):
            for name in ("inputs", "targets", "doc_ids"):
                x, y = getattr(a, name), getattr(b, name)
                assert (x is None and y is None) or torch.equal(x, y), name
        assert (module.evaluate(iter(plain))["val/loss"]
                == module.evaluate(iter(strided))["val/loss"])


def test_a_small_split_wraps_around_like_the_plain_windows(data_dir: str) -> None:
    val = loader(data_dir, micro_batch_size=200)
    per_epoch = val.sources[0].windows_at_stride(8)
    assert per_epoch == (700 - 1 - SEQ) // 8 + 1
    (batch,) = val.eval_windows(per_epoch + 1, stride=8)
    # the window after the last is window 0 again, scored whole
    assert torch.equal(batch.inputs[per_epoch], batch.inputs[0])
    assert (batch.targets[per_epoch] != IGNORE_INDEX).all()
    assert (batch.targets[1, :SEQ - 8] == IGNORE_INDEX).all()


def test_stride_is_validated(tmp_path: Path) -> None:
    assert make_config(tmp_path, "eval.stride=32").eval.stride == 32
    for overrides, message in (
            (["eval.stride=0"], r"eval.stride=0 must be in \[1, seq_len=64\]"),
            (["eval.stride=65"], r"eval.stride=65 must be in \[1, seq_len=64\]"),
            (["eval.stride=8", "objective=mlm", "model=cpu_encoder"],
             "eval.stride scores next-token prediction")):
        with pytest.raises(ConfigError, match=message):
            make_config(tmp_path, *overrides)
    with pytest.raises(ValueError, match="stride=17 needs objective clm"):
        next(loader(write_source(tmp_path / "d", seed=1)).eval_windows(4, stride=17))
