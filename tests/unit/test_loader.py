"""The window loader: one seeded global order, rank slicing, exact resume, epochs, and checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.data import DataError, ShardedWindowLoader, Tokenizer, read_manifest, read_shard
from pretrain.data.loader import permute
from pretrain.data.prepare import prepare, train_tokenizer_from_source

VOCAB = 400
SEQ = 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    tok = train_tokenizer_from_source("builtin", str(root / "tok.model"), vocab_size=VOCAB,
                                      sample_bytes=60_000)
    prepare("builtin", tok, str(root / "data"), shard_tokens=3000, val_fraction=0.2,
            max_bytes=60_000)
    return root / "data"


def make(data_dir: Path, split: str = "train", **kw: object) -> ShardedWindowLoader:
    args: dict[str, object] = dict(seq_len=SEQ, micro_batch_size=4, vocab_size=VOCAB)
    return ShardedWindowLoader(str(data_dir), split, **{**args, **kw})  # type: ignore[arg-type]


def stream(data_dir: Path, split: str = "train") -> np.ndarray:
    entries = read_manifest(str(data_dir))["splits"][split]["shards"]
    return np.concatenate([np.asarray(read_shard(str(data_dir / e["name"])).tokens, np.int64)
                           for e in entries])


def batches(loader: ShardedWindowLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def same(a: list[tuple[torch.Tensor, ...]], b: list[tuple[torch.Tensor, ...]]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for p, q in zip(a, b)
                                    for x, y in zip(p, q))


def test_batches_are_shifted_windows_of_the_stream(data_dir: Path) -> None:
    loader, tokens = make(data_dir, seed=3), stream(data_dir)
    assert len(loader.shards) > 3  # so that some windows cross shard boundaries
    assert loader.windows_per_epoch == (len(tokens) - 1) // SEQ
    assert loader.tokens_per_epoch == loader.windows_per_epoch * SEQ
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, SEQ) and x.dtype == y.dtype == torch.int64
    for row, w in enumerate(loader.last_windows):
        np.testing.assert_array_equal(x[row].numpy(), tokens[w * SEQ:w * SEQ + SEQ])
        np.testing.assert_array_equal(y[row].numpy(), tokens[w * SEQ + 1:w * SEQ + SEQ + 1])


def test_windows_cross_shard_boundaries(data_dir: Path) -> None:
    loader, tokens = make(data_dir), stream(data_dir)
    w = 3000 // SEQ  # shard 0 holds 3000 tokens: this window starts in it and ends in shard 1
    assert w * SEQ < 3000 < w * SEQ + SEQ + 1
    np.testing.assert_array_equal(loader.window(w), tokens[w * SEQ:w * SEQ + SEQ + 1])


def test_same_seed_same_batches_other_seed_differs(data_dir: Path) -> None:
    a = batches(make(data_dir, seed=1), 5)
    assert same(a, batches(make(data_dir, seed=1), 5))
    assert not same(a, batches(make(data_dir, seed=2), 5))


def test_ranks_split_the_global_batch_without_overlap(data_dir: Path) -> None:
    whole = make(data_dir, micro_batch_size=6, seed=5)
    ranks = [make(data_dir, micro_batch_size=2, dp_rank=r, dp_size=3, seed=5) for r in range(3)]
    for _ in range(4):
        x, y = whole.next_batch()
        parts = [r.next_batch() for r in ranks]
        seen = [set(r.last_windows.tolist()) for r in ranks]
        assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_order_does_not_depend_on_dp_size(data_dir: Path) -> None:
    # global batch 4: one rank with 2 accumulation micro-steps of 2 == two ranks with one each
    one = make(data_dir, micro_batch_size=2, seed=9)
    two = [make(data_dir, micro_batch_size=2, dp_rank=r, dp_size=2, seed=9) for r in range(2)]
    for _ in range(3):
        assert same(batches(one, 2), [r.next_batch() for r in two])


def test_exact_resume(data_dir: Path) -> None:
    full = batches(make(data_dir, seed=4), 7)
    first = make(data_dir, seed=4)
    batches(first, 3)
    state = first.state_dict()
    assert state["cursor"] == 12 and state["epoch"] == 0 and state["seed"] == 4
    resumed = make(data_dir, seed=999)  # the checkpoint's seed wins
    resumed.load_state_dict(state)
    assert same(batches(resumed, 4), full[3:])


def test_resume_with_another_dp_size_continues_the_global_order(data_dir: Path) -> None:
    single = make(data_dir, micro_batch_size=4, seed=6)
    batches(single, 3)
    state = single.state_dict()
    expected = batches(single, 2)
    ranks = [make(data_dir, micro_batch_size=2, dp_rank=r, dp_size=2, seed=6) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    for x, y in expected:
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_each_epoch_is_a_fresh_permutation_of_all_windows(data_dir: Path) -> None:
    loader = make(data_dir, micro_batch_size=7, seed=2)
    n = loader.windows_per_epoch
    seen = []
    while loader.cursor < 2 * n + 7:  # batches straddle the epoch ends
        loader.next_batch()
        seen.extend(loader.last_windows.tolist())
    epoch0, epoch1 = seen[:n], seen[n:2 * n]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1 and loader.epoch == 2
    assert loader.state_dict()["epoch"] == 2


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 64, 1000, 4097])
def test_permute_is_a_bijection(n: int) -> None:
    out = permute(np.arange(n), n, seed=0, epoch=0)
    assert sorted(out.tolist()) == list(range(n))
    np.testing.assert_array_equal(out, permute(np.arange(n), n, seed=0, epoch=0))
    if n >= 17:
        assert not np.array_equal(out, np.arange(n))
        assert not np.array_equal(out, permute(np.arange(n), n, seed=0, epoch=1))


def test_eval_batches_are_fixed_and_in_order(data_dir: Path) -> None:
    val = make(data_dir, "val", micro_batch_size=2, seed=1)
    tokens = stream(data_dir, "val")
    first = list(val.eval_batches(3))
    assert same(first, list(val.eval_batches(3))) and val.cursor == 0
    np.testing.assert_array_equal(first[0][0][0].numpy(), tokens[:SEQ])
    np.testing.assert_array_equal(first[1][0][1].numpy(), tokens[3 * SEQ:4 * SEQ])
    ranks = [make(data_dir, "val", micro_batch_size=1, dp_rank=r, dp_size=2) for r in range(2)]
    split = [list(r.eval_batches(3)) for r in ranks]
    for i, (x, _) in enumerate(first):
        assert torch.equal(torch.cat([split[0][i][0], split[1][i][0]]), x)


def test_document_ids_change_right_after_eos(data_dir: Path) -> None:
    loader, tokens = make(data_dir), stream(data_dir)
    eos = Tokenizer.load(str(data_dir / "tokenizer.model")).eos_id
    n = loader.windows_per_epoch
    ids = loader.document_ids(np.arange(n))
    assert ids.shape == (n, SEQ) and ids[0, 0] == 0
    step = np.diff(ids, axis=1)
    inputs = tokens[:n * SEQ].reshape(n, SEQ)
    np.testing.assert_array_equal(step, (inputs[:, :-1] == eos).astype(step.dtype))
    assert ids[-1, -1] < len(loader.doc_ends) and len(loader.doc_ends) > 3


def test_token_id_outside_the_model_vocabulary(data_dir: Path) -> None:
    biggest = max(read_shard(str(data_dir / e["name"])).max_token_id
                  for e in read_manifest(str(data_dir))["splits"]["train"]["shards"])
    with pytest.raises(DataError, match=rf"shard .*\.bin holds token id {biggest}, outside the "
                                        rf"model's vocabulary of {biggest}.*tokenizer"):
        make(data_dir, vocab_size=biggest)
    with pytest.raises(DataError, match=rf"vocabulary {VOCAB} but model\.vocab_size="):
        make(data_dir, vocab_size=VOCAB - 1 if biggest < VOCAB - 1 else biggest + 1)


def test_wrong_tokenizer_and_corrupt_shard_are_caught_at_open(
    data_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(DataError, match="different tokenizer"):
        make(data_dir, tokenizer_fingerprint="0" * 64)
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    shard = copy / "train" / "000001.bin"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"000001\.bin fails its checksum"):
        make(copy)


def test_state_of_another_dataset_or_seq_len_is_refused(data_dir: Path) -> None:
    state = make(data_dir).state_dict()
    with pytest.raises(DataError, match="another dataset or seq_len"):
        make(data_dir, seq_len=SEQ * 2).load_state_dict(state)
    with pytest.raises(DataError, match="another dataset or seq_len"):
        make(data_dir, "val").load_state_dict(state)


def test_split_smaller_than_a_window(data_dir: Path) -> None:
    with pytest.raises(DataError, match=r"val split .* fewer than one window"):
        make(data_dir, "val", seq_len=10**7)
