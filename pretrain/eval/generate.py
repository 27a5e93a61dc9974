"""Generation from every model family: greedy, temperature, top-k, top-p (nucleus).

    decoder          `generate` continues a prompt; `generate_batch` / `generate_many` continue
                     many at once (left-padded, one KV cache); `infill` writes a FIM middle
                     between a prefix and a suffix (`infill_exact_match`: the training-time
                     metric)
    encoder          `fill_masks` predicts the <mask> positions (`fill_mask_text` on text)
    encoder_decoder  `generate_seq2seq` decodes from an encoded input (T5: start at pad, stop at
                     EOS), the encoder and the cross-attention keys computed once

Autoregressive paths use a KV cache, or, for checking, recompute the whole prefix each step
(`use_cache=False`), and stop at EOS. Text helpers (`encode_with_specials`,
`decode_with_specials`) let a user write the control pieces (`<mask>`, `<extra_id_0>`, ...) in
text, which plain encoding never turns into their ids.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pretrain.data.tokenizer import EOS_ID, MASK, PAD_ID
from pretrain.errors import DataError
from pretrain.models.encoder import Encoder
from pretrain.models.llama import KVCache, Transformer
from pretrain.models.t5 import EncoderDecoder

if TYPE_CHECKING:
    from pretrain.data.tokenizer import FimIds, Tokenizer

__all__ = [
    "BatchTiming",
    "InfillDoc",
    "MaskPrediction",
    "decode_with_specials",
    "encode_with_specials",
    "fill_mask_text",
    "fill_masks",
    "filter_logits",
    "fim_prompt",
    "generate",
    "generate_batch",
    "generate_many",
    "generate_seq2seq",
    "infill",
    "infill_exact_match",
    "prefill",
    "read_chats",
    "read_prompts",
    "sample_logits",
    "time_batch_sizes",
]


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
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> Tensor:
    """Draw one token id per row of `logits` (..., vocab) -> (...,) long.

    temperature 0 is greedy (argmax; top_k/top_p then change nothing). `generator` must live on
    the logits' device; a sequence holds one per row, so that a row draws what it would alone.
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature}; use 0 (greedy) or a positive value")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    probs = logits.softmax(dim=-1).reshape(-1, logits.shape[-1])  # (rows, vocab)
    if generator is None or isinstance(generator, torch.Generator):
        ids = torch.multinomial(probs, num_samples=1, generator=generator)  # (rows, 1)
    else:
        if len(generator) != probs.shape[0]:
            raise ValueError(f"{len(generator)} generators for {probs.shape[0]} rows of logits; "
                             "give one per row")
        ids = torch.cat([torch.multinomial(row[None], num_samples=1, generator=g)
                         for row, g in zip(probs, generator)])  # (rows, 1)
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
    stop_ids: Collection[int] = (),
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Continue `prompt_ids`; return the new tokens only.

    Stops after `max_new_tokens`, when the prompt plus the new tokens fill
    `model.config.max_seq_len` (the rotary table's length), or at `eos_id` or any of
    `stop_ids`; the stop token itself is not returned (the result is the text's tokens). With
    `use_cache=False` every step recomputes the whole prefix: slower, and the reference the
    cached path is tested against.
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
        if next_id == eos_id or next_id in stop_ids:
            break
        new_ids.append(next_id)
        token = torch.tensor([[next_id]], dtype=torch.long, device=device)  # (1, 1)
        context = torch.cat([context, token], dim=1)
        step_input = token if use_cache else context
    return new_ids


# -- many prompts at once (decoder) ------------------------------------------------------------


def _check_prompts(prompts: Sequence[Sequence[int]], max_len: int) -> None:
    for i, ids in enumerate(prompts):
        if not ids:
            raise ValueError(f"prompt {i} is empty; start from at least one token (e.g. BOS)")
        if len(ids) >= max_len:
            raise ValueError(f"prompt {i} has {len(ids)} tokens, which leaves no room under "
                             f"model.max_seq_len={max_len}; shorten the prompt")


@torch.no_grad()
def generate_batch(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    stop_ids: Collection[int] = (),
    generators: Sequence[torch.Generator] | None = None,
    pad_id: int = PAD_ID,
) -> list[list[int]]:
    """`generate` for a batch of prompts at once, through one KV cache; return each prompt's
    new tokens, in order.

    The prompts are left-padded with `pad_id` to the longest: each row's rotary positions start
    at 0 at its first real token, and the cache's key mask keeps every query off the padding,
    in the prefill and at every step. Each row stops as `generate` would (`max_new_tokens`,
    `model.config.max_seq_len`, `eos_id` or `stop_ids`; the stop token is not returned) and
    leaves the batch, which ends when no row is left. Greedy (temperature 0) gives
    `generate`'s tokens for every prompt. `generators`: one per prompt, so that a prompt's
    samples equal `generate`'s with that generator (None: one global stream for the batch).
    """
    max_len = model.config.max_seq_len
    _check_prompts(prompts, max_len)
    if generators is not None and len(generators) != len(prompts):
        raise ValueError(f"{len(generators)} generators for {len(prompts)} prompts; give one "
                         "per prompt or None")
    if not prompts or max_new_tokens < 1:
        return [[] for _ in prompts]
    caps = [min(max_new_tokens, max_len - len(ids)) for ids in prompts]
    logits, cache, positions = prefill(model, prompts, max_new_tokens=max(caps), pad_id=pad_id)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    rows = list(range(len(prompts)))  # the prompt index of each row still in the batch
    new: list[list[int]] = [[] for _ in prompts]
    while True:
        row_gens = None if generators is None else [generators[r] for r in rows]
        next_ids = sample_logits(logits, generator=row_gens, **sampling)  # (b,)
        live = []
        for i, (r, token) in enumerate(zip(rows, next_ids.tolist())):
            if token == eos_id or token in stop_ids:
                continue
            new[r].append(token)
            if len(new[r]) < caps[r]:
                live.append(i)
        if len(live) < len(rows):  # finished rows leave: no more work on them
            keep = torch.tensor(live, dtype=torch.long, device=logits.device)
            cache.keep_rows(keep)
            rows = [rows[i] for i in live]
            next_ids, positions = next_ids[keep], positions[keep]
        if not rows:
            return new
        positions = positions[:, -1:] + 1  # (b, 1)
        logits = model(next_ids[:, None], positions=positions, kv_cache=cache)[:, -1]


def prefill(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
            pad_id: int = PAD_ID) -> tuple[Tensor, KVCache, Tensor]:
    """Run the left-padded prompts (B, P) through `model` into a new KV cache with room for
    `max_new_tokens` more; return the next-token logits (B, vocab), the cache (its key mask
    marks the padding) and each row's rotary positions (B, P), which start at 0 at the row's
    first token (the padding before it repeats 0: it is never attended)."""
    device = next(model.parameters()).device
    lengths = torch.tensor([len(ids) for ids in prompts], device=device)  # (B,)
    P, B = int(lengths.max()), len(prompts)
    pads = P - lengths  # (B,) left padding of each row
    tokens = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    for b, ids in enumerate(prompts):
        tokens[b, P - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
    cache = KVCache.for_model(model, batch_size=B, max_len=P + max_new_tokens)
    slots = torch.arange(P + max_new_tokens, device=device)
    cache.key_mask = slots[None, :] >= pads[:, None]  # (B, P + max_new_tokens) True: a token
    positions = (slots[None, :P] - pads[:, None]).clamp(min=0)  # (B, P)
    logits = model(tokens, positions=positions, kv_cache=cache)[:, -1]  # (B, vocab)
    return logits, cache, positions


def generate_many(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    batch_size: int,
    seed: int | None = None,
    **kwargs: Any,
) -> list[list[int]]:
    """`generate_batch` over `prompts` in batches of `batch_size`; return each prompt's new
    tokens in input order. Prompts of similar length are batched together (less padding).
    With a `seed`, prompt i samples from its own generator (on the model's device) seeded
    `seed + i`: its text then does not depend on the batch size or on the other prompts
    (`generate` with that generator gives the same)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; use a positive integer")
    _check_prompts(prompts, model.config.max_seq_len)  # all of them, before any work
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        gens = None if seed is None else [torch.Generator(device).manual_seed(seed + i)
                                          for i in chunk]
        for i, ids in zip(chunk, generate_batch(model, [prompts[i] for i in chunk],
                                                generators=gens, **kwargs)):
            out[i] = ids
    return out


@dataclass(frozen=True)
class BatchTiming:
    """Generation speed at one batch size (`time_batch_sizes`)."""

    batch_size: int
    new_tokens: int
    """Tokens generated over all prompts (stop tokens not counted)."""
    seconds: float
    """Wall-clock time of the fastest repeat."""

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds


def time_batch_sizes(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    batch_sizes: Sequence[int],
    *,
    repeats: int = 2,
    **kwargs: Any,
) -> tuple[list[BatchTiming], bool]:
    """Time `generate_many` over `prompts` at each of `batch_sizes` (after a short warm-up; the
    repeats interleave the batch sizes, so that a busy machine slows them alike, and the
    fastest of each counts). Also whether every batch size gave the same tokens."""
    generate_many(model, prompts[:2], batch_size=2, **{**kwargs, "max_new_tokens": 2})
    best: dict[int, float] = {}
    outputs: dict[int, list[list[int]]] = {}
    for _ in range(repeats):
        for n in batch_sizes:
            start = time.perf_counter()
            outputs[n] = generate_many(model, prompts, batch_size=n, **kwargs)
            best[n] = min(best.get(n, math.inf), time.perf_counter() - start)
    timings = [BatchTiming(n, sum(map(len, outputs[n])), best[n]) for n in batch_sizes]
    same = all(outputs[n] == outputs[batch_sizes[0]] for n in batch_sizes)
    return timings, same


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """The prompts of a file, as records with a "prompt" string: a `.jsonl` file holds one JSON
    object with a "prompt" field per line (other fields are kept); any other file holds one
    prompt per line (write a newline inside a prompt with JSONL). Blank lines are skipped.
    DataError when the file is missing, has no prompt or a malformed line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompts file {path} does not exist; give a text file with one prompt "
                        "per line, or a .jsonl file with a \"prompt\" field per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"prompts file {path} is not UTF-8 text ({e.reason} at byte "
                        f"{e.start}); save it as UTF-8") from None
    records: list[dict[str, Any]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            records.append({"prompt": line})
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n} is not JSON ({e.msg}); write one object with a "
                            "\"prompt\" field per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise DataError(f"{path}:{n} has no \"prompt\" string; write one object with a "
                            "\"prompt\" field per line")
        records.append(record)
    if not records:
        raise DataError(f"prompts file {path} holds no prompt; write one prompt per line")
    return records


def read_chats(path: str | Path) -> list[dict[str, Any]]:
    """The conversations of a file, as records with a "messages" list to answer: a `.jsonl`
    file holds one JSON object with "messages" (``[{"role": "system"|"user"|"assistant",
    "content": "..."}, ...]``, other fields are kept) per line; any other file one user message
    per line. Blank lines are skipped. DataError naming the line when one is malformed."""
    from pretrain.data.sft import ROLES

    path = Path(path)
    if path.suffix != ".jsonl":
        return [{"messages": [{"role": "user", "content": r["prompt"]}]}
                for r in read_prompts(path)]
    if not path.is_file():
        raise DataError(f"chat file {path} does not exist; give a text file with one user "
                        "message per line, or a .jsonl file with a \"messages\" list per line")
    records: list[dict[str, Any]] = []
    fix = ('write one object per line: {"messages": [{"role": "user", "content": "..."}]}, '
           f"roles {', '.join(ROLES)}")
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n} is not JSON ({e.msg}); {fix}") from None
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in ROLES
                and isinstance(m.get("content"), str) for m in messages):
            raise DataError(f"{path}:{n} has no valid \"messages\" list; {fix}")
        records.append(record)
    if not records:
        raise DataError(f"chat file {path} holds no conversation; {fix}")
    return records


# -- encoder-decoder ---------------------------------------------------------------------------


def _padded(inputs: Tensor | Sequence[Sequence[int]], attn_mask: Tensor | None, pad_id: int,
            device: torch.device) -> tuple[Tensor, Tensor | None]:
    """(B, S) ids and their (B, 1, 1, S) key mask (None: every position is a token) of a
    tensor (S,) or (B, S), or of a batch of id lists (right-padded, masked where ragged)."""
    if isinstance(inputs, Tensor):
        ids = (inputs[None] if inputs.dim() == 1 else inputs).to(device=device, dtype=torch.long)
        mask = None if attn_mask is None else attn_mask.view(ids.shape).to(device, torch.bool)
    else:
        if attn_mask is not None:
            raise ValueError("attn_mask goes with a tensor of ids; lists are masked by length")
        lengths = [len(row) for row in inputs]
        ids = torch.full((len(inputs), max(lengths, default=0)), pad_id, dtype=torch.long)
        for b, row in enumerate(inputs):
            ids[b, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        ids = ids.to(device)
        ragged = len(set(lengths)) > 1
        mask = (torch.arange(ids.shape[1], device=device)[None, :]
                < torch.tensor(lengths, device=device)[:, None]) if ragged else None
    if ids.numel() == 0 or (mask is not None and not bool(mask.any(dim=1).all())):
        raise ValueError("an encoder input is empty; give every sequence at least one token "
                         "(T5 inputs end with EOS)")
    return ids, None if mask is None else mask[:, None, None, :]


@torch.no_grad()
def generate_seq2seq(
    model: EncoderDecoder,
    input_ids: Tensor | Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eos_id: int | None = EOS_ID,
    start_id: int = PAD_ID,
    pad_id: int = PAD_ID,
    attn_mask: Tensor | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Decode each encoder input of a batch; return each one's new tokens (without the start
    token and the EOS that ended it).

    input_ids: a tensor (S,) or (B, S) (`attn_mask` (B, S) bool marks its real tokens, default
    all), or a list of id lists of any lengths (right-padded with `pad_id` and masked). The
    encoder runs once and each decoder block's cross-attention keys and values are computed
    once; the decoder starts from `start_id` (T5's decoder_start_token_id: pad) and feeds one
    token per step through a KV cache. A sequence is finished at `eos_id` (the batch runs on
    until all are, or `max_new_tokens`). `use_cache=False` recomputes the whole decoder over
    the encoder output at every step: the reference the cached path is tested against.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; ask for at least one token")
    param = next(model.parameters())
    ids, mask = _padded(input_ids, attn_mask, pad_id, param.device)  # (B, S), (B, 1, 1, S)
    B = ids.shape[0]
    memory = model.encode(ids, attn_mask=mask)  # (B, S, dim)
    cfg = model.config
    cache, cross = None, memory
    if use_cache:
        cross = model.memory_kv(memory)  # per decoder block, reused at every step
        cache = KVCache(n_layers=len(model.decoder_layers), batch_size=B,
                        n_kv_heads=cfg.n_kv_heads or cfg.n_heads,
                        head_dim=cfg.head_dim or cfg.dim // cfg.n_heads,
                        max_len=max_new_tokens, device=param.device, dtype=param.dtype)
    decoded = torch.full((B, 1), start_id, dtype=torch.long, device=param.device)  # (B, t)
    step_input, done = decoded, torch.zeros(B, dtype=torch.bool, device=param.device)
    new: list[list[int]] = [[] for _ in range(B)]
    for _ in range(max_new_tokens):
        h = model.decode(step_input, cross, memory_mask=mask, kv_cache=cache)[:, -1]  # (B, dim)
        logits = model.output(h * model.output_scale)  # (B, vocab)
        next_ids = sample_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                 generator=generator)  # (B,)
        stop = next_ids == eos_id if eos_id is not None else torch.zeros_like(done)
        for row, token, keep in zip(new, next_ids.tolist(), (~done & ~stop).tolist()):
            if keep:
                row.append(token)
        done |= stop
        if bool(done.all()):
            break
        next_ids = next_ids.masked_fill(done, pad_id)  # finished rows: fed, never read
        decoded = torch.cat([decoded, next_ids[:, None]], dim=1)
        step_input = next_ids[:, None] if use_cache else decoded
    return new


# -- fill in the middle (decoder) --------------------------------------------------------------

InfillDoc = tuple[Sequence[int], Sequence[int], Sequence[int]]
"""(prefix, middle, suffix) token ids of one held-out document (lists or numpy arrays)."""


def fim_prompt(prefix_ids: Iterable[int], suffix_ids: Iterable[int], fim_ids: FimIds, *,
               spm: bool = False) -> list[int]:
    """The tokens a FIM-trained decoder continues with the middle, in the training format
    (`pretrain.data.objectives.Fim`): PSM `<fim_prefix> prefix <fim_suffix> suffix <fim_middle>`
    or SPM `<fim_prefix> <fim_suffix> suffix <fim_middle> prefix`."""
    prefix, suffix = [int(i) for i in prefix_ids], [int(i) for i in suffix_ids]
    if spm:
        return [fim_ids.prefix, fim_ids.suffix, *suffix, fim_ids.middle, *prefix]
    return [fim_ids.prefix, *prefix, fim_ids.suffix, *suffix, fim_ids.middle]


def infill(
    model: Transformer,
    prefix_ids: Iterable[int],
    suffix_ids: Iterable[int],
    *,
    fim_ids: FimIds,
    max_new_tokens: int,
    eos_id: int | None = EOS_ID,
    spm: bool = False,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> list[int]:
    """The middle a FIM-trained decoder writes between a prefix and a suffix (greedy by
    default): `generate` on `fim_prompt`, stopped at EOS (a trained middle ends where its
    document did), at <fim_pad>, after `max_new_tokens` or at the model's max_seq_len
    (ValueError when the prompt alone fills it)."""
    prompt = fim_prompt(prefix_ids, suffix_ids, fim_ids, spm=spm)
    return generate(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_k=top_k, top_p=top_p, eos_id=eos_id, stop_ids=(fim_ids.pad,),
                    use_cache=use_cache, generator=generator)


def infill_exact_match(
    model: Transformer,
    docs: Sequence[InfillDoc],
    *,
    fim_ids: FimIds,
    max_new_tokens: int,
    eos_id: int | None = EOS_ID,
    spm: bool = False,
) -> float:
    """The fraction of `docs` whose greedy infill (`infill`) equals the true middle exactly,
    ended by EOS or <fim_pad> (0.0 for no docs). Eager, without gradients, the model in eval
    mode and put back as it was.

    Each document is asked for len(middle) + 1 tokens, the middle and its end (past that it
    cannot match); a middle longer than `max_new_tokens` counts as a miss without generating.
    Every prompt must leave room under the model's max_seq_len (ValueError otherwise).
    """
    if not docs:
        return 0.0
    was_training = model.training
    model.eval()
    hits = 0
    try:
        with torch.no_grad():
            for prefix, middle, suffix in docs:
                target = [int(i) for i in middle]
                if len(target) > max_new_tokens:
                    continue
                got = infill(model, prefix, suffix, fim_ids=fim_ids,
                             max_new_tokens=len(target) + 1, eos_id=eos_id, spm=spm,
                             temperature=0.0)
                hits += got == target
    finally:
        model.train(was_training)
    return hits / len(docs)


# -- masked LM (encoder) -----------------------------------------------------------------------


@dataclass(frozen=True)
class MaskPrediction:
    """The most probable ids at one masked position, most probable first."""

    position: int
    """Index of the masked token in the input."""
    ids: list[int]
    probs: list[float]
    """Softmax probabilities over the whole vocabulary (so they sum to at most 1)."""


@torch.no_grad()
def fill_masks(model: Encoder, token_ids: Sequence[int] | Tensor, mask_id: int, *,
               top_k: int = 5) -> list[MaskPrediction]:
    """The `top_k` predictions at every position of `token_ids` (one sequence, (T,)) that holds
    `mask_id`, in position order; the masked-LM head runs on those positions only."""
    if top_k < 1:
        raise ValueError(f"top_k={top_k}; use a positive integer")
    param = next(model.parameters())
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten().to(param.device)  # (T,)
    positions = (ids == mask_id).nonzero().flatten()  # (M,)
    if positions.numel() == 0:
        return []
    h = model.encode(ids[None])[0, positions]  # (M, dim)
    probs = model.head(h).float().softmax(dim=-1)  # (M, vocab)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)  # (M, k) each
    return [MaskPrediction(int(pos), top.indices[m].tolist(), top.values[m].tolist())
            for m, pos in enumerate(positions.tolist())]


def fill_mask_text(model: Encoder, tokenizer: Tokenizer, text: str, *,
                   top_k: int = 5) -> tuple[str, list[MaskPrediction]]:
    """`text` with each literal "<mask>" replaced by the model's most probable token, and the
    `top_k` predictions at each mask. DataError when the tokenizer has no <mask>."""
    mask_id = tokenizer.mask_id
    ids = encode_with_specials(tokenizer, text, [MASK])
    predictions = fill_masks(model, ids, mask_id, top_k=top_k)
    for p in predictions:
        ids[p.position] = p.ids[0]
    return tokenizer.decode(ids), predictions


# -- text with control pieces ------------------------------------------------------------------


def _specials_pattern(pieces: Iterable[str]) -> re.Pattern[str]:
    # Longest first, so that <extra_id_10> is not read as <extra_id_1> followed by "0>".
    names = sorted(set(pieces), key=len, reverse=True)
    return re.compile("(" + "|".join(re.escape(p) for p in names) + ")")


def encode_with_specials(tokenizer: Tokenizer, text: str, pieces: Iterable[str]) -> list[int]:
    """Token ids of `text` in which each literal occurrence of one of `pieces` (e.g. "<mask>",
    "<extra_id_0>") becomes that piece's id: plain encoding spells them out as characters.
    DataError when the tokenizer lacks a piece the text uses."""
    ids: list[int] = []
    for i, part in enumerate(_specials_pattern(pieces).split(text)):
        if i % 2 == 0:
            ids.extend(tokenizer.encode(part) if part else [])
            continue
        piece_id = tokenizer.piece_to_id(part)
        if piece_id is None:
            raise DataError(f"tokenizer {tokenizer.path} has no piece {part}; re-train it with "
                            "`pretrain-train-tokenizer` (it reserves the objectives' pieces)")
        ids.append(piece_id)
    return ids


def decode_with_specials(tokenizer: Tokenizer, ids: Iterable[int], pieces: Iterable[str]) -> str:
    """The text of `ids` with each of `pieces` the tokenizer holds written out (decoding drops
    control pieces): the inverse of `encode_with_specials`."""
    shown = {i: p for p in pieces if (i := tokenizer.piece_to_id(p)) is not None}
    out, run = [], []
    for i in (int(i) for i in ids):
        if i in shown:
            out += [tokenizer.decode(run), shown[i]]
            run = []
        else:
            run.append(i)
    return "".join([*out, tokenizer.decode(run)])
