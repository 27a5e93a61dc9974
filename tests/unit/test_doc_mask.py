"""Document masking: the block-causal mask, restarted positions, what the loader returns, and the
proof on the real model that a token's logits do not depend on the previous document."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.data import EOS_ID, Batch, ShardedWindowLoader, block_causal_mask, document_positions
from pretrain.models.llama import build_model
from tests.unit.test_mixture import VOCAB, synthetic_dataset

SEQ = 32


def tiny_model(max_seq_len: int = 64) -> torch.nn.Module:
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
                      multiple_of=32, max_seq_len=max_seq_len)
    torch.manual_seed(0)
    return build_model(cfg, device="cpu").eval()  # fp32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_dataset(tmp_path_factory.mktemp("docmask"), n_tokens=8000, seed=3,
                             mean_doc=12)


def test_block_causal_mask_is_causal_within_documents() -> None:
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0]])
    mask = block_causal_mask(doc_ids)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    for b in range(2):
        for i in range(6):
            for j in range(6):
                want = j <= i and bool(doc_ids[b, i] == doc_ids[b, j])
                assert bool(mask[b, 0, i, j]) == want
    assert torch.equal(mask[1, 0], torch.ones(6, 6, dtype=torch.bool).tril())


def test_positions_restart_at_each_document() -> None:
    doc_ids = np.array([[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 2]])
    np.testing.assert_array_equal(document_positions(doc_ids),
                                  [[0, 1, 2, 0, 1, 0, 1, 2], [0, 0, 1, 2, 3, 4, 5, 0]])


def test_loader_marks_documents_after_each_eos(data_dir: Path) -> None:
    loader = ShardedWindowLoader(str(data_dir), seq_len=SEQ, micro_batch_size=16,
                                 vocab_size=VOCAB, document_masking=True, restart_positions=True)
    batch = loader.next_batch()
    assert batch.doc_ids is not None and batch.positions is not None
    inputs, ids = batch.inputs.numpy(), batch.doc_ids.numpy()
    assert (ids[:, 0] == 0).all() and ids.max() >= 2
    np.testing.assert_array_equal(np.diff(ids, axis=1), inputs[:, :-1] == EOS_ID)
    np.testing.assert_array_equal(batch.positions.numpy(), document_positions(ids))
    kwargs = batch.model_kwargs()
    assert set(kwargs) == {"attn_mask", "positions"}
    assert torch.equal(kwargs["attn_mask"], block_causal_mask(batch.doc_ids))
    plain = ShardedWindowLoader(str(data_dir), seq_len=SEQ, micro_batch_size=16,
                                vocab_size=VOCAB).next_batch()
    assert plain.doc_ids is None and plain.model_kwargs() == {}
    assert torch.equal(plain.inputs, batch.inputs)  # masking changes nothing about the windows


def window(*docs: list[int]) -> torch.Tensor:
    """(1, T) tokens of documents, each followed by EOS."""
    return torch.tensor([sum((d + [EOS_ID] for d in docs), [])])


def doc_ids_of(tokens: torch.Tensor) -> torch.Tensor:
    """Document ids from EOS positions, as the shards' boundaries give them."""
    ends = (tokens == EOS_ID).long()
    return torch.cumsum(ends, dim=1) - ends  # the EOS belongs to the document it ends


def masked_logits(model: torch.nn.Module, tokens: torch.Tensor, restart: bool) -> torch.Tensor:
    ids = doc_ids_of(tokens)
    batch = Batch(tokens, tokens, ids,
                  torch.from_numpy(document_positions(ids.numpy())) if restart else None)
    with torch.no_grad():
        return model(batch.inputs, **batch.model_kwargs())


def test_with_masking_logits_do_not_depend_on_the_previous_document() -> None:
    model = tiny_model()
    rng = np.random.default_rng(0)
    doc = rng.integers(4, VOCAB, size=12).tolist()
    for n_a, n_b in ((9, 9), (9, 25)):  # other tokens; then also another length
        a = window(rng.integers(4, VOCAB, size=n_a).tolist(), doc)
        b = window(rng.integers(4, VOCAB, size=n_b).tolist(), doc)
        tail_a, tail_b = slice(n_a + 1, n_a + 14), slice(n_b + 1, n_b + 14)  # doc and its EOS
        # Rotary attention depends on relative offsets only, so masking alone suffices even
        # when the document starts at another offset.
        masked_a, masked_b = masked_logits(model, a, False), masked_logits(model, b, False)
        torch.testing.assert_close(masked_a[0, tail_a], masked_b[0, tail_b], rtol=0, atol=1e-5)
        with torch.no_grad():  # without masking the previous document leaks in
            plain_a, plain_b = model(a), model(b)
        assert (plain_a[0, tail_a] - plain_b[0, tail_b]).abs().max() > 1e-3


def test_with_restarted_positions_a_document_reads_as_if_it_began_the_window() -> None:
    model = tiny_model()
    rng = np.random.default_rng(1)
    doc = rng.integers(4, VOCAB, size=15).tolist()
    with torch.no_grad():
        reference = model(window(doc))[0]  # (16, V): the document at the start of a window
    for n_before in (3, 20):
        tokens = window(rng.integers(4, VOCAB, size=n_before).tolist(), doc)
        logits = masked_logits(model, tokens, True)[0, n_before + 1:]
        torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)


def test_loader_batches_give_each_document_its_own_logits(data_dir: Path) -> None:
    """End to end: the loader's masks make every document of a packed window score exactly as
    it would alone."""
    loader = ShardedWindowLoader(str(data_dir), seq_len=SEQ, micro_batch_size=4,
                                 vocab_size=VOCAB, document_masking=True, restart_positions=True)
    model = tiny_model()
    batch = loader.next_batch()
    with torch.no_grad():
        packed = model(batch.inputs, **batch.model_kwargs())
        assert batch.doc_ids is not None
        for row in range(4):
            ids = batch.doc_ids[row]
            for d in ids.unique():
                at = (ids == d).nonzero().flatten()
                alone = model(batch.inputs[row:row + 1, at])
                torch.testing.assert_close(packed[row, at], alone[0], rtol=0, atol=1e-5)
