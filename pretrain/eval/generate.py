"""Autoregressive sampling from a `Transformer`: greedy, temperature, top-k, top-p (nucleus).

`generate` decodes one sequence with a KV cache (or, for checking, recomputing the whole prefix
each step), never runs past `model.config.max_seq_len`, and stops at EOS.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pretrain.models.llama import KVCache, Transformer

__all__ = ["filter_logits", "generate", "sample_logits"]


def filter_logits(
    logits: Tensor, *, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """Set to -inf the logits (..., vocab) that top-k and top-p sampling exclude.

    top_k keeps the k largest (ties at the k-th value are all kept). top_p keeps the smallest
    set of most probable tokens whose probabilities sum to at least top_p: a token stays if the
    mass of the tokens ranked before it is below top_p, so the most probable token always stays.
    """
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k={top_k}; use a positive integer or None")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p}; use a value in (0, 1] or None")
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # (..., vocab) in rank order
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_logits(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token id per row of `logits` (..., vocab) -> (...,) long.

    temperature 0 is greedy (argmax; top_k/top_p then change nothing). `generator` must live on
    the logits' device.
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature}; use 0 (greedy) or a positive value")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    probs = logits.softmax(dim=-1).reshape(-1, logits.shape[-1])  # (rows, vocab)
    ids = torch.multinomial(probs, num_samples=1, generator=generator)  # (rows, 1)
    return ids.view(logits.shape[:-1])


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Continue `prompt_ids`; return the new tokens only.

    Stops after `max_new_tokens`, when the prompt plus the new tokens fill
    `model.config.max_seq_len` (the rotary table's length), or at `eos_id`; the EOS token itself
    is not returned (the result is the text's tokens). With `use_cache=False` every step
    recomputes the whole prefix: slower, and the reference the cached path is tested against.
    """
    max_len = model.config.max_seq_len
    if not prompt_ids:
        raise ValueError("prompt_ids is empty; start from at least one token (e.g. BOS)")
    if len(prompt_ids) >= max_len:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens, which leaves no room under "
                         f"model.max_seq_len={max_len}; shorten the prompt")
    n_new = min(max_new_tokens, max_len - len(prompt_ids))
    device = next(model.parameters()).device
    context = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    cache = None
    if use_cache:  # sized for this request, not max_seq_len: big models have long contexts
        cache = KVCache.for_model(model, batch_size=1, max_len=len(prompt_ids) + n_new)
    step_input, new_ids = context, []
    for _ in range(n_new):
        logits = model(step_input, kv_cache=cache)[0, -1]  # (vocab,)
        next_id = int(sample_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                    generator=generator))
        if next_id == eos_id:
            break
        new_ids.append(next_id)
        token = torch.tensor([[next_id]], dtype=torch.long, device=device)  # (1, 1)
        context = torch.cat([context, token], dim=1)
        step_input = token if use_cache else context
    return new_ids
