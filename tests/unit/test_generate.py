"""Generation: KV cache vs recomputation, EOS, max_seq_len, top-k / top-p filtering."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.eval.generate import filter_logits, generate, sample_logits
from pretrain.models.llama import Transformer, build_model

PROMPT = [2, 17, 5, 33, 8]


@pytest.fixture(scope="module")
def model() -> Transformer:
    cfg = ModelConfig(name="tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64,
                      multiple_of=16, max_seq_len=48)
    torch.manual_seed(0)
    return build_model(cfg, device="cpu")


def test_greedy_with_and_without_cache_agree(model: Transformer) -> None:
    cached = generate(model, PROMPT, max_new_tokens=30, temperature=0)
    recomputed = generate(model, PROMPT, max_new_tokens=30, temperature=0, use_cache=False)
    assert len(cached) == 30
    assert cached == recomputed
    assert len(set(cached)) > 1  # a random model that emits one token would prove little


def test_sampling_with_and_without_cache_agree_given_a_seed(model: Transformer) -> None:
    runs = [generate(model, PROMPT, max_new_tokens=20, temperature=0.8, top_k=20, use_cache=c,
                     generator=torch.Generator().manual_seed(3)) for c in (True, False)]
    assert runs[0] == runs[1]


def test_stops_at_eos_without_returning_it(model: Transformer) -> None:
    greedy = generate(model, PROMPT, max_new_tokens=30, temperature=0)
    eos = greedy[6]
    stopped = generate(model, PROMPT, max_new_tokens=30, temperature=0, eos_id=eos)
    assert stopped == greedy[: greedy.index(eos)]


def test_respects_max_seq_len(model: Transformer) -> None:
    out = generate(model, PROMPT, max_new_tokens=1000, temperature=0)
    assert len(PROMPT) + len(out) == 48
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, list(range(48)), max_new_tokens=1)


def test_top_k_one_is_greedy(model: Transformer) -> None:
    greedy = generate(model, PROMPT, max_new_tokens=20, temperature=0)
    top1 = generate(model, PROMPT, max_new_tokens=20, temperature=1.5, top_k=1,
                    generator=torch.Generator().manual_seed(0))
    assert top1 == greedy


PROBS = torch.tensor([0.5, 0.05, 0.3, 0.15])


@pytest.mark.parametrize("top_p, kept", [
    (0.4, {0}), (0.7, {0, 2}), (0.85, {0, 2, 3}), (1.0, {0, 1, 2, 3}),
])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p: float, kept: set[int]) -> None:
    filtered = filter_logits(PROBS.log()[None], top_p=top_p)[0]
    assert {i for i in range(4) if math.isfinite(filtered[i])} == kept


def test_top_k_keeps_the_k_largest() -> None:
    filtered = filter_logits(PROBS.log(), top_k=2)
    assert torch.isfinite(filtered).tolist() == [True, False, True, False]


def test_samples_follow_the_renormalized_nucleus() -> None:
    logits = PROBS.log().expand(4000, 4)
    ids = sample_logits(logits, top_p=0.7, generator=torch.Generator().manual_seed(0))
    assert set(ids.tolist()) == {0, 2}
    assert (ids == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.03)


def test_temperature_zero_is_argmax_and_bad_arguments_are_refused() -> None:
    logits = torch.randn(3, 10)
    assert torch.equal(sample_logits(logits, temperature=0), logits.argmax(-1))
    for kwargs in ({"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            sample_logits(logits, **kwargs)
