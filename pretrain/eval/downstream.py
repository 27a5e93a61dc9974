"""Downstream scoring as lm-eval-harness does it, for `pretrain-eval`, the in-loop hook and the
harness's `pretrain` model type (one implementation, so their numbers agree).

    encode_pair(tok, context, continuation)   token ids as lm-eval's `_encode_pair`: trailing
                                              spaces of the context move to the continuation;
                                              the whole text is encoded and split at the
                                              context's length; the document-start token first
    loglikelihoods(forward, pairs, ...)       (sum of log-probs of the continuation, whether it
                                              is the greedy continuation) per pair; batched,
                                              right-padded, longest first; a context that does
                                              not fit the window loses tokens on the left
    shared_loglikelihoods(forward, groups, ...)
                                              the same for the choices after one context,
                                              the context run once: one packed row per item,
                                              choices masked from each other (in-loop path)
    evaluate_tasks(forward, tok, items, ...)  metrics per task: acc and acc_norm (multiple
                                              choice: argmax of the summed log-probs, and of
                                              them divided by each choice's character length),
                                              LAMBADA's acc (greedy last word) and perplexity
                                              (exp of minus the mean log-likelihood); stderr as
                                              lm-eval's (sample std / sqrt(n))

`forward` maps tokens (B, T) to logits (B, T, vocab). Under data parallelism each rank scores
its share of the items (item i on rank i % world) and the sums are added over the ranks; every
rank runs the same number of forward passes (sharded weights are gathered per forward).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import ConfigError
from pretrain.eval.tasks import TASKS, Item

__all__ = ["Collectives", "Scored", "encode_pair", "evaluate_tasks", "load_for_eval",
           "loglikelihoods", "prefix_id", "shared_loglikelihoods", "task_metrics"]

Forward = Callable[..., Tensor]
"""tokens (B, T) -> logits (B, T, vocab); for `shared_loglikelihoods` also the keywords
`positions` and `attn_mask`, as `Transformer.forward` takes them."""
Pair = tuple[list[int], list[int]]


@dataclass
class Collectives:
    """How the ranks that share an evaluation agree: sum a float64 tensor, max an int."""

    rank: int
    world: int
    sum: Callable[[Tensor], Tensor]
    max: Callable[[int], int]


def prefix_id(tok: Tokenizer) -> int:
    """The token every scored text starts after: BOS where the tokenizer has one and is a
    transformers tokenizer; our SentencePiece tokenizers' EOS otherwise, the boundary that
    precedes every document in training (prepare writes document + EOS, no BOS)."""
    from pretrain.data.hf_tokenizer import HFTokenizer

    if isinstance(tok, HFTokenizer) and tok.bos_id is not None:
        return tok.bos_id
    return tok.eos_id


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> Pair:
    """(context ids, continuation ids) as lm-eval's `_encode_pair` for a causal model, with
    `prefix_id` in front of the context (an empty context is the prefix alone)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context) if context else []
    return [prefix_id(tok), *ctx], whole[len(ctx):]


@dataclass
class Scored:
    loglik: float
    greedy: bool


def _window(pair: Pair, max_len: int) -> tuple[list[int], int]:
    """The model input (the last max_len + 1 tokens, less the last) and the continuation's
    length, as lm-eval's HFLM cuts a long context from the left."""
    ctx, cont = pair
    if not cont:
        raise ValueError("a continuation encodes to no tokens; nothing to score")
    if len(cont) > max_len:
        raise ValueError(f"a continuation of {len(cont)} tokens does not fit the window of "
                         f"{max_len}; raise the window or shorten it")
    return (ctx + cont)[-(max_len + 1):][:-1], len(cont)


@torch.no_grad()
def loglikelihoods(forward: Forward, pairs: Sequence[Pair], *, max_len: int, batch_size: int,
                   pad_id: int = 0, device: torch.device | str = "cpu",
                   min_batches: int = 0) -> list[Scored]:
    """Each pair's continuation log-likelihood given its context, in input order.
    `min_batches`: run at least this many forward passes (the extra ones on one pad token,
    results dropped), so ranks that share sharded weights stay in step."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; use a positive integer")
    windows = [_window(p, max_len) for p in pairs]
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    out: list[Scored | None] = [None] * len(windows)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for k in range(max(len(batches), min_batches)):
        batch = batches[k] if k < len(batches) else []
        inputs = [windows[i][0] for i in batch] or [[pad_id]]  # [[pad_id]]: a step-keeping pass
        width = max(map(len, inputs))
        tokens = torch.full((len(inputs), width), pad_id, dtype=torch.long)
        for row, ids in enumerate(inputs):
            tokens[row, :len(ids)] = torch.tensor(ids)
        logits = forward(tokens.to(device))  # (B, T, vocab); right padding: causal, unseen
        if not batch:
            continue
        for row, i in enumerate(batch):
            ids, n_cont = windows[i]
            cont = torch.tensor(pairs[i][1], device=logits.device)
            # (n_cont, vocab): the positions that predict the continuation
            rows = F.log_softmax(logits[row, len(ids) - n_cont:len(ids)].float(), dim=-1)
            loglik = rows.gather(-1, cont[:, None]).sum()
            greedy = bool((rows.argmax(-1) == cont).all())
            out[i] = Scored(float(loglik.double()), greedy)
    return out  # type: ignore[return-value]


def _shared(pairs: Sequence[Pair], max_len: int) -> bool:
    """Whether an item's requests can be scored as one packed row: two or more choices after
    the same context, each of which fits the window whole (else the per-pair path cuts it)."""
    return (len(pairs) > 1 and all(p[0] == pairs[0][0] for p in pairs)
            and all(0 < len(p[1]) and len(p[0]) + len(p[1]) - 1 <= max_len for p in pairs))


def _packed_row(pairs: Sequence[Pair]) -> tuple[list[int], list[int], list[int]]:
    """(tokens, rotary positions, segment ids) of one row holding a shared context once and,
    after it, each continuation less its last token: segment 0 is the context, segment j the
    j-th continuation, whose positions restart after the context. Masked so that segment j
    sees only the context and itself, each continuation is scored exactly as in its own
    (context + continuation) row; the context's last logit predicts every first token."""
    ctx = pairs[0][0]
    tokens, positions, segments = list(ctx), list(range(len(ctx))), [0] * len(ctx)
    for j, (_, cont) in enumerate(pairs, start=1):
        tokens += cont[:-1]
        positions += range(len(ctx), len(ctx) + len(cont) - 1)
        segments += [j] * (len(cont) - 1)
    return tokens, positions, segments


def _group_batches(groups: Sequence[Sequence[Pair]], batch_size: int) -> list[list[int]]:
    """Indices of the groups in each forward pass: longest packed row first, as many rows as
    keep the requests within `batch_size` (at least one row)."""
    def length(g: Sequence[Pair]) -> int:
        return len(g[0][0]) + sum(len(cont) - 1 for _, cont in g)

    order = sorted(range(len(groups)), key=lambda i: -length(groups[i]))
    batches: list[list[int]] = []
    n_req = 0
    for i in order:
        if not batches or n_req + len(groups[i]) > batch_size:
            batches.append([])
            n_req = 0
        batches[-1].append(i)
        n_req += len(groups[i])
    return batches


@torch.no_grad()
def shared_loglikelihoods(forward: Forward, groups: Sequence[Sequence[Pair]], *,
                          batch_size: int, pad_id: int = 0,
                          device: torch.device | str = "cpu") -> list[list[Scored]]:
    """Per group (the requests of one item that share their context, see `_shared`), each
    continuation's log-likelihood, the context run once for all of them: one packed row per
    group, batches of about `batch_size` requests, longest rows first. `forward` takes
    `positions` (B, T) and `attn_mask` (B, 1, T, T) bool keywords (`Transformer.forward`'s).
    Equals `loglikelihoods` on the pairs up to float rounding."""
    rows = [_packed_row(g) for g in groups]
    out: list[list[Scored]] = [[] for _ in groups]
    for batch in _group_batches(groups, batch_size):
        width = len(rows[batch[0]][0])
        tokens = torch.full((len(batch), width), pad_id, dtype=torch.long)
        positions = torch.zeros((len(batch), width), dtype=torch.long)
        segments = torch.full((len(batch), width), -1, dtype=torch.long)  # -1: padding
        for r, i in enumerate(batch):
            ids, pos, seg = rows[i]
            tokens[r, :len(ids)] = torch.tensor(ids)
            positions[r, :len(ids)] = torch.tensor(pos)
            segments[r, :len(ids)] = torch.tensor(seg)
        # causal, and a key is the context's or the query's own segment; a padding query sees
        # the padding before it (never an empty row: softmax over nothing is NaN)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        seg_q, seg_k = segments[:, :, None], segments[:, None, :]
        mask = causal & ((seg_k == 0) | (seg_q == seg_k))
        mask |= torch.eye(width, dtype=torch.bool)
        logits = forward(tokens.to(device), positions=positions.to(device),
                         attn_mask=mask[:, None].to(device))
        for r, i in enumerate(batch):
            ctx_len, at = len(groups[i][0][0]), len(groups[i][0][0])
            for _, cont in groups[i]:
                # the context's last position, then this continuation's own positions
                idx = torch.tensor([ctx_len - 1, *range(at, at + len(cont) - 1)],
                                   device=logits.device)
                at += len(cont) - 1
                lp = F.log_softmax(logits[r, idx].float(), dim=-1)
                target = torch.tensor(cont, device=logits.device)
                loglik = lp.gather(-1, target[:, None]).sum()
                greedy = bool((lp.argmax(-1) == target).all())
                out[i].append(Scored(float(loglik.double()), greedy))
    return out


def _mc_sums(item: Item, scored: list[Scored]) -> tuple[float, float]:
    lls = [s.loglik for s in scored]
    lengths = [float(len(c)) for c in item.choices]
    pred = max(range(len(lls)), key=lambda i: (lls[i], -i))  # numpy argmax: first maximum
    normed = [ll / n for ll, n in zip(lls, lengths)]
    pred_norm = max(range(len(normed)), key=lambda i: (normed[i], -i))
    return float(pred == item.gold), float(pred_norm == item.gold)


def _stderr(p: float, n: float) -> float | None:
    """lm-eval's `mean_stderr` of a 0/1 metric: sample std / sqrt(n) = sqrt(p(1-p)/(n-1))."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None


def task_metrics(name: str, sums: Sequence[float]) -> dict[str, tuple[float, float | None]]:
    """{metric: (value, stderr)} from a task's summed counts (n, a, b): multiple choice
    (n, correct, correct_norm); loglikelihood (n, greedy, sum of log-likelihoods)."""
    n, a, b = sums
    spec = TASKS[name]
    acc = a / n
    out: dict[str, tuple[float, float | None]] = {"acc": (acc, _stderr(acc, n))}
    if spec.multiple_choice:
        if "acc_norm" in spec.metrics:
            out["acc_norm"] = (b / n, _stderr(b / n, n))
    else:
        # exp(-mean log-likelihood per document), lm-eval's `perplexity` aggregation (its
        # stderr is a bootstrap: not given here)
        out["perplexity"] = (math.exp(min(-b / n, 700.0)), None)
    return out


def evaluate_tasks(forward: Forward, tok: Tokenizer, tasks: dict[str, list[Item]], *,
                   max_len: int, batch_size: int, device: torch.device | str = "cpu",
                   collectives: Collectives | None = None, shared_context: bool = False
                   ) -> dict[str, dict[str, tuple[float, float | None]]]:
    """{task: {metric: (value, stderr)}} over all items (this rank's share under
    `collectives`, the sums added over the ranks: the same result as one process).
    `shared_context`: score the choices that follow one context in one packed row
    (`shared_loglikelihoods`; `forward` then takes `positions` and `attn_mask`), the other
    requests pair by pair."""
    rank, world = (collectives.rank, collectives.world) if collectives else (0, 1)
    shares = {name: items[rank::world] for name, items in tasks.items()}
    per_item = [[encode_pair(tok, c, x) for c, x in item.requests]
                for items in shares.values() for item in items]
    shared = [shared_context and _shared(p, max_len) for p in per_item]
    groups = [p for p, s in zip(per_item, shared) if s]
    pairs = [pair for p, s in zip(per_item, shared) if not s for pair in p]
    n_shared = len(_group_batches(groups, batch_size))
    n_batches = n_shared + -(-len(pairs) // batch_size)
    if collectives is not None:
        n_batches = collectives.max(n_batches)
    pad_id = tok.pad_id if tok.pad_id >= 0 else 0
    grouped = iter(shared_loglikelihoods(forward, groups, batch_size=batch_size, pad_id=pad_id,
                                         device=device))
    single = iter(loglikelihoods(forward, pairs, max_len=max_len, batch_size=batch_size,
                                 pad_id=pad_id, device=device,
                                 min_batches=n_batches - n_shared))
    scored = [s for p, sh in zip(per_item, shared)
              for s in (next(grouped) if sh else [next(single) for _ in p])]
    sums = torch.zeros(len(tasks), 3, dtype=torch.float64)
    at = 0
    for t, (name, items) in enumerate(shares.items()):
        for item in items:
            mine = scored[at:at + len(item.requests)]
            at += len(item.requests)
            if TASKS[name].multiple_choice:
                acc, acc_norm = _mc_sums(item, mine)
                sums[t] += torch.tensor([1.0, acc, acc_norm], dtype=torch.float64)
            else:
                sums[t] += torch.tensor([1.0, float(mine[0].greedy), mine[0].loglik],
                                        dtype=torch.float64)
    if collectives is not None:
        sums = collectives.sum(sums.to(device)).cpu()
    return {name: task_metrics(name, sums[t].tolist()) for t, name in enumerate(tasks)}


def flat_metrics(results: dict[str, dict[str, tuple[float, float | None]]]) -> dict[str, float]:
    """{'eval/<task>/<metric>': value} for the metric sinks."""
    return {f"eval/{task}/{metric}": value for task, metrics in results.items()
            for metric, (value, _) in metrics.items()}


def load_for_eval(path: str | Path, tokenizer: str | None = None
                  ) -> tuple[nn.Module, Tokenizer, int]:
    """(decoder model on CPU in eval mode, its tokenizer, the context window) from one of our
    checkpoints (a run directory or a step directory: the window is the run's seq_len) or a
    Hugging Face LLaMA directory (exported or any loadable by `pretrain-import-hf`; its
    tokenizer files; the window is its max_position_embeddings)."""
    from pretrain.models.build import build_model

    p = Path(path)
    if (p / "config.json").is_file():
        from pretrain.interop.hf import import_hf

        state_dict, cfg = import_hf(p)
        model = build_model(cfg, device="cpu")
        model.load_state_dict(state_dict, strict=True)
        tok = Tokenizer.load(tokenizer or str(p))
        window = cfg.max_seq_len
    else:
        from pretrain.train.consolidate import load_model_from_checkpoint

        model, state = load_model_from_checkpoint(p)  # a LoRA run: its base + adapters
        cfg = model.config
        tok = Tokenizer.load(tokenizer or state["tokenizer_path"])
        window = min(int(state["config"].get("seq_len", cfg.max_seq_len)), cfg.max_seq_len)
    if cfg.arch != "decoder":
        raise ConfigError(f"{path} holds a model.arch={cfg.arch} model; downstream tasks score "
                          "a decoder's log-likelihoods (arch=decoder)")
    model.eval()
    return model, tok, window


def model_forward(model: nn.Module) -> Forward:
    """`forward` for a plain decoder."""

    def forward(tokens: Tensor, **kwargs: Tensor) -> Tensor:
        return model(tokens, **kwargs)

    return forward


def describe(results: dict[str, dict[str, tuple[float, float | None]]]) -> list[dict[str, Any]]:
    """Rows of (task, metric, value, stderr), for tables and JSON."""
    return [{"task": task, "metric": metric, "value": value, "stderr": stderr}
            for task, metrics in results.items() for metric, (value, stderr) in metrics.items()]
