"""The window loader on one source: one seeded global order, rank slicing, exact resume (also
with prefetch threads), epochs, the data fingerprint, and checks."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.data import (
    Batch,
    DataError,
    ShardedWindowLoader,
    Tokenizer,
    read_manifest,
    read_shard,
)
from pretrain.data.prepare import prepare, train_tokenizer_from_source
from pretrain.data.windows import permute
from pretrain.models.loss import IGNORE_INDEX

VOCAB = 512
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


def batches(loader: ShardedWindowLoader, n: int) -> list[Batch]:
    return [loader.next_batch() for _ in range(n)]


def same(a: list[Batch], b: list[Batch]) -> bool:
    """Equal inputs, targets, and doc ids / positions when present."""
    def fields(x: Batch) -> list[torch.Tensor | None]:
        return [x.inputs, x.targets, x.doc_ids, x.positions]

    return len(a) == len(b) and all(
        (p is None and q is None) or (p is not None and q is not None and torch.equal(p, q))
        for x, y in zip(a, b) for p, q in zip(fields(x), fields(y)))


def cat(parts: list[Batch]) -> Batch:
    """The ranks' batches of one step, stacked in rank order."""
    def stack(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None if ts[0] is None else torch.cat(ts)  # type: ignore[arg-type]

    return Batch(stack([p.inputs for p in parts]), stack([p.targets for p in parts]),
                 stack([p.doc_ids for p in parts]), stack([p.positions for p in parts]))


def test_batches_are_shifted_windows_of_the_stream(data_dir: Path) -> None:
    loader, tokens = make(data_dir, seed=3), stream(data_dir)
    assert len(loader.sources[0].shards) > 3  # so that some windows cross shard boundaries
    assert loader.windows_per_epoch == (len(tokens) - 1) // SEQ
    assert loader.tokens_per_epoch == loader.windows_per_epoch * SEQ
    x, y = loader.next_batch()  # a Batch unpacks as (inputs, targets)
    assert x.shape == y.shape == (4, SEQ) and x.dtype == y.dtype == torch.int64
    for row, w in enumerate(loader.last_rows.windows):
        np.testing.assert_array_equal(x[row].numpy(), tokens[w * SEQ:w * SEQ + SEQ])
        np.testing.assert_array_equal(y[row].numpy(), tokens[w * SEQ + 1:w * SEQ + SEQ + 1])


def test_windows_cross_shard_boundaries(data_dir: Path) -> None:
    loader, tokens = make(data_dir), stream(data_dir)
    w = 3000 // SEQ  # shard 0 holds 3000 tokens: this window starts in it and ends in shard 1
    assert w * SEQ < 3000 < w * SEQ + SEQ + 1
    np.testing.assert_array_equal(loader.sources[0].window(w), tokens[w * SEQ:w * SEQ + SEQ + 1])


def test_same_seed_same_batches_other_seed_differs(data_dir: Path) -> None:
    a = batches(make(data_dir, seed=1), 5)
    assert same(a, batches(make(data_dir, seed=1), 5))
    assert not same(a, batches(make(data_dir, seed=2), 5))


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_same_global_order_for_1_2_and_4_ranks(data_dir: Path, dp_size: int) -> None:
    # global batch 8: one rank with 4 accumulation micro-steps of 2 == dp_size ranks with 8/dp
    reference = make(data_dir, micro_batch_size=2, seed=9)
    mb = 8 // dp_size
    ranks = [make(data_dir, micro_batch_size=mb, dp_rank=r, dp_size=dp_size, seed=9)
             for r in range(dp_size)]
    for _ in range(3):
        expected = cat(batches(reference, 4))
        parts = [r.next_batch() for r in ranks]
        assert same([cat(parts)], [expected])
        seen = [set(r.last_rows.windows.tolist()) for r in ranks]
        assert sum(map(len, seen)) == len(set().union(*seen)) == 8  # no overlap
    assert all(r.state_dict() == reference.state_dict() for r in ranks)


def test_exact_resume(data_dir: Path) -> None:
    full = batches(make(data_dir, seed=4), 7)
    first = make(data_dir, seed=4)
    batches(first, 3)
    state = json.loads(json.dumps(first.state_dict()))  # it travels in trainer_state.json
    assert state["cursor"] == 12 and state["seed"] == 4
    assert state["sources"]["data"]["consumed"] == 12
    resumed = make(data_dir, seed=999)  # the checkpoint's seed wins
    resumed.load_state_dict(state)
    assert same(batches(resumed, 4), full[3:]) and resumed.notes == []


def test_resume_with_another_dp_size_continues_the_global_order(data_dir: Path) -> None:
    single = make(data_dir, micro_batch_size=4, seed=6)
    batches(single, 3)
    state = single.state_dict()
    expected = batches(single, 2)
    ranks = [make(data_dir, micro_batch_size=2, dp_rank=r, dp_size=2, seed=6) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    for batch in expected:
        assert same([cat([r.next_batch() for r in ranks])], [batch])


def test_union_of_windows_across_ranks_covers_each_window_once_per_epoch(
    data_dir: Path
) -> None:
    ranks = [make(data_dir, micro_batch_size=3, dp_rank=r, dp_size=4, seed=2) for r in range(4)]
    n = ranks[0].windows_per_epoch
    seen: list[int] = []
    while ranks[0].cursor < 2 * n + 12:  # batches straddle the epoch ends
        for r in ranks:
            r.next_batch()
            seen.extend(r.last_rows.windows.tolist())
    epoch0, epoch1 = seen[:n], seen[n:2 * n]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1
    assert ranks[0].metrics()["data/epoch/data"] == pytest.approx(ranks[0].cursor / n)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 64, 1000, 4097])
def test_permute_is_a_bijection(n: int) -> None:
    out = permute(np.arange(n), n, seed=0, epoch=0)
    assert sorted(out.tolist()) == list(range(n))
    np.testing.assert_array_equal(out, permute(np.arange(n), n, seed=0, epoch=0))
    if n >= 17:
        assert not np.array_equal(out, np.arange(n))
        assert not np.array_equal(out, permute(np.arange(n), n, seed=0, epoch=1))


def test_eval_windows_are_fixed_and_in_order(data_dir: Path) -> None:
    val = make(data_dir, "val", micro_batch_size=2, seed=1)
    tokens = stream(data_dir, "val")
    first = list(val.eval_windows(6))
    assert len(first) == 3 and (torch.cat([b.targets for b in first]) != IGNORE_INDEX).all()
    assert same(first, list(val.eval_windows(6))) and val.cursor == 0
    assert same(first, list(make(data_dir, "val", micro_batch_size=2, seed=7).eval_windows(6)))
    np.testing.assert_array_equal(first[0].inputs[0].numpy(), tokens[:SEQ])
    np.testing.assert_array_equal(first[1].inputs[1].numpy(), tokens[3 * SEQ:4 * SEQ])
    np.testing.assert_array_equal(first[1].targets[1].numpy(), tokens[3 * SEQ + 1:4 * SEQ + 1])
    ranks = [make(data_dir, "val", micro_batch_size=1, dp_rank=r, dp_size=2) for r in range(2)]
    split = [list(r.eval_windows(6)) for r in ranks]
    for i, batch in enumerate(first):
        assert same([cat([split[0][i], split[1][i]])], [batch])
    with pytest.raises(ValueError, match="n_windows > 0"):
        next(val.eval_windows(0))


def rows_of(batch: Batch) -> list[Batch]:
    return [Batch(*(None if t is None else t[j:j + 1] for t in (batch.inputs, batch.targets,
                                                                  batch.doc_ids, batch.positions)))
            for j in range(len(batch.inputs))]


@pytest.mark.parametrize("n_windows", [1, 5, 12, 13])
def test_eval_windows_are_the_same_set_on_every_layout(data_dir: Path, n_windows: int) -> None:
    """Every rank yields the same number of full batches; the real rows of all ranks, in eval
    position order, are the same windows for any dp_size and micro_batch_size; padding rows
    repeat a real window (document ids and positions included) and predict nothing."""
    kw = dict(document_masking=True, restart_positions=True)
    reference = [b for b in make(data_dir, "val", micro_batch_size=1, **kw)
                 .eval_windows(n_windows)]
    assert len(reference) == n_windows
    for dp in (1, 2, 3):
        for mb in (1, 2, 4):
            ranks = [list(make(data_dir, "val", micro_batch_size=mb, dp_rank=r, dp_size=dp, **kw)
                          .eval_windows(n_windows)) for r in range(dp)]
            n_batches = -(-n_windows // (dp * mb))
            assert [len(batches) for batches in ranks] == [n_batches] * dp
            real, padding = [], []
            for i in range(n_batches):
                for r in range(dp):
                    assert ranks[r][i].inputs.shape == (mb, SEQ)
                    for j, row in enumerate(rows_of(ranks[r][i])):
                        pad = i * dp * mb + r * mb + j >= n_windows
                        (padding if pad else real).append(row)
            assert same(real, reference), (dp, mb)
            assert len(padding) == n_batches * dp * mb - n_windows
            for row in padding:
                assert (row.targets == IGNORE_INDEX).all()
                assert any(same([Batch(row.inputs, ref.targets, row.doc_ids, row.positions)],
                                [ref]) for ref in reference)


def test_eval_loss_over_real_targets_does_not_depend_on_the_layout(data_dir: Path) -> None:
    """A token-weighted loss summed over ranks (skipping IGNORE_INDEX) is layout-free, even
    where some ranks hold only padding."""
    logits_of = torch.randn(VOCAB, VOCAB, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(0))

    def loss(dp: int, mb: int) -> float:
        total, count = 0.0, 0
        for r in range(dp):
            for b in make(data_dir, "val", micro_batch_size=mb, dp_rank=r,
                          dp_size=dp).eval_windows(7):
                total += torch.nn.functional.cross_entropy(
                    logits_of[b.inputs].flatten(0, 1), b.targets.flatten(),
                    ignore_index=IGNORE_INDEX, reduction="sum").item()
                count += int((b.targets != IGNORE_INDEX).sum())
        assert count == 7 * SEQ
        return total / count

    single = loss(1, 1)
    for dp, mb in ((1, 4), (2, 2), (3, 4), (2, 8)):
        assert loss(dp, mb) == pytest.approx(single, rel=1e-12)


def test_eval_windows_wrap_around_a_small_split(data_dir: Path) -> None:
    val = make(data_dir, "val", micro_batch_size=1)
    n = val.windows_per_epoch
    batches = list(val.eval_windows(n + 2))
    assert same(batches[n:], batches[:2])


def test_document_ids_change_right_after_eos(data_dir: Path) -> None:
    source, tokens = make(data_dir).sources[0], stream(data_dir)
    eos = Tokenizer.load(str(data_dir / "tokenizer.model")).eos_id
    n = source.windows_per_epoch
    ids = source.document_ids(np.arange(n))
    assert ids.shape == (n, SEQ) and (ids[:, 0] == 0).all()
    inputs = tokens[:n * SEQ].reshape(n, SEQ)
    np.testing.assert_array_equal(np.diff(ids, axis=1), inputs[:, :-1] == eos)
    assert ids.max() >= 1 and (inputs == eos).sum() >= 3


# ---------------------------------------------------------------------------------------------
# prefetch threads


@pytest.mark.parametrize("masking", [False, True])
def test_same_windows_for_0_1_and_2_workers(data_dir: Path, masking: bool) -> None:
    kw = dict(seed=5, document_masking=masking, restart_positions=masking)
    reference = batches(make(data_dir, **kw), 12)
    for workers, prefetch in ((1, 3), (2, 2)):
        loader = make(data_dir, num_workers=workers, prefetch=prefetch, **kw)
        assert same(batches(loader, 12), reference)
        loader.close()


def test_exact_resume_with_workers(data_dir: Path) -> None:
    reference = make(data_dir, seed=8)
    expected = batches(reference, 9)
    loader = make(data_dir, seed=8, num_workers=2, prefetch=3)
    batches(loader, 5)
    state = loader.state_dict()  # 6 more batches are read ahead; the state ignores them
    assert state["cursor"] == 5 * 4
    loader.close()
    for workers in (0, 2):
        resumed = make(data_dir, seed=8, num_workers=workers)
        resumed.load_state_dict(state)
        assert same(batches(resumed, 4), expected[5:])
        resumed.close()


def test_loading_a_state_drops_batches_read_ahead(data_dir: Path) -> None:
    expected = batches(make(data_dir, seed=3), 4)
    loader = make(data_dir, seed=3, num_workers=2)
    start = loader.state_dict()
    batches(loader, 3)
    loader.load_state_dict(start)
    assert same(batches(loader, 4), expected)
    loader.close()


def test_prefetch_threads_stop_and_their_errors_reach_the_caller(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def data_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("data-")]

    loader = make(data_dir, num_workers=2)
    loader.next_batch()
    assert "data-planner" in data_threads()
    loader.close()
    assert data_threads() == []

    def disk_gone(w: int, out: np.ndarray) -> None:
        raise OSError("disk gone")

    broken = make(data_dir, num_workers=1)
    monkeypatch.setattr(broken.sources[0], "read", disk_gone)
    with pytest.raises(OSError, match="disk gone"):
        broken.next_batch()
    assert broken.cursor == 0  # nothing was consumed
    broken.close()


@pytest.mark.gpu
def test_pinned_batches_copy_to_the_gpu_without_blocking(data_dir: Path) -> None:
    loader = make(data_dir, num_workers=2, pin_memory=True, document_masking=True)
    batch = loader.next_batch()
    assert batch.inputs.is_pinned() and batch.doc_ids is not None and batch.doc_ids.is_pinned()
    on_gpu = batch.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert on_gpu.inputs.is_cuda and torch.equal(on_gpu.inputs.cpu(), batch.inputs)
    assert on_gpu.model_kwargs()["attn_mask"].is_cuda
    loader.close()


# ---------------------------------------------------------------------------------------------
# checks


def test_token_id_outside_the_model_vocabulary(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"vocabulary {VOCAB} but model\.vocab_size=300; set "
                                        rf"model\.vocab_size={VOCAB}"):
        make(data_dir, vocab_size=300)
    biggest = max(read_shard(str(data_dir / e["name"])).max_token_id
                  for e in read_manifest(str(data_dir))["splits"]["train"]["shards"])
    copy = tmp_path / "copy"  # a manifest that understates the vocabulary: the shards tell
    shutil.copytree(data_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["vocab_size"] = biggest
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=rf"shard .*\.bin holds token id {biggest}, outside the "
                                        rf"model's vocabulary of {biggest}.*tokenizer"):
        make(copy, vocab_size=biggest)


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


def test_state_of_other_data_is_refused_unless_allowed(data_dir: Path, tmp_path: Path) -> None:
    state = make(data_dir, seed=2).state_dict()
    state["cursor"] = state["sources"]["data"]["consumed"] = 40
    with pytest.raises(DataError, match=r"other data: .*'data' .* holds other shards or another "
                                        r"tokenizer.*data\.allow_data_change=true"):
        make(data_dir, "val").load_state_dict(state)
    # the fingerprint covers the tokenizer too: same shards, another tokenizer's manifest
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tokenizer"]["fingerprint"] = "f" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="holds other shards or another tokenizer"):
        make(copy).load_state_dict(state)
    allowed = make(copy, allow_data_change=True)
    allowed.load_state_dict(state)
    assert allowed.cursor == 40 and "changed data" in allowed.notes[0]


def test_seq_len_change_is_refused_unless_allowed(data_dir: Path) -> None:
    loader = make(data_dir)
    batches(loader, 4)
    state = loader.state_dict()
    with pytest.raises(DataError, match="seq_len was 16, now 32"):
        make(data_dir, seq_len=2 * SEQ).load_state_dict(state)
    longer = make(data_dir, seq_len=2 * SEQ, allow_data_change=True)
    longer.load_state_dict(state)
    assert longer.cursor == 8 and longer.tokens_consumed() == loader.tokens_consumed()


def test_state_of_another_format_is_refused(data_dir: Path) -> None:
    old = {"epoch": 0, "cursor": 4, "seed": 0, "seq_len": SEQ, "dataset": "abc"}
    with pytest.raises(DataError, match="format version None"):
        make(data_dir).load_state_dict(old)


def test_split_smaller_than_a_window(data_dir: Path) -> None:
    with pytest.raises(DataError, match=r"val split .* fewer than one window"):
        make(data_dir, "val", seq_len=10**7)
