"""IsoFLOP sweep grids: which presets to train, for how many tokens, at each FLOP budget.

For a budget C and a preset with F = flops_per_token(cfg, seq_len) FLOPs per token (the
6·N_matmul + attention convention of `pretrain.models.llama`), the run that spends C trains on
D = C / F tokens. A preset belongs on the budget's IsoFLOP profile when that run is long enough to
mean something (D / (global_batch_size · seq_len) ≥ min_steps) and D/N lies in a plausible range
around the compute-optimal ratio (Hoffmann et al. 2022 found D/N ≈ 20). Sweeping every such
preset gives the spread of sizes on both sides of the optimum that Approach 2's parabolas need.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pretrain.config import ModelConfig

CHINCHILLA_TOKENS_PER_PARAM = 20.0
"""D/N at the compute optimum found by Hoffmann et al. 2022; where a grid is centred."""


def isoflop_grid(
    budgets: Sequence[float],
    presets: dict[str, ModelConfig],
    *,
    seq_len: int,
    global_batch_size: int,
    min_steps: int = 100,
    tokens_per_param: tuple[float, float] = (1.0, 1000.0),
    max_sizes: int | None = None,
    exclude_embeddings: bool = True,
) -> list[dict[str, Any]]:
    """Runs of an IsoFLOP sweep, sorted by budget then by parameter count.

    Each entry is {budget, model, params, tokens, steps, tokens_per_param}. Tokens are a whole
    number of optimizer steps (the trainer runs tokens // (global_batch_size · seq_len) steps),
    rounded to the nearest step, so tokens · flops_per_token is within half a step of the budget.
    A preset is kept when steps ≥ `min_steps` and tokens / params lies in `tokens_per_param`
    (params non-embedding unless `exclude_embeddings` is False). With `max_sizes`, only the
    presets whose D/N is closest (in log) to 20 are kept per budget. A budget with fewer than
    three entries cannot give an IsoFLOP minimum; check the grid before launching it.
    """
    if seq_len <= 0 or global_batch_size <= 0:
        raise ValueError("seq_len and global_batch_size must be positive")
    lo, hi = tokens_per_param
    step_tokens = global_batch_size * seq_len
    entries: list[dict[str, Any]] = []
    for budget in sorted(budgets):
        row = [_entry(budget, name, cfg, seq_len, step_tokens, exclude_embeddings)
               for name, cfg in presets.items()]
        row = [e for e in row if e["steps"] >= min_steps and lo <= e["tokens_per_param"] <= hi]
        if max_sizes is not None:
            row = sorted(row, key=_distance_from_optimum)[:max_sizes]
        entries.extend(sorted(row, key=lambda e: (e["params"], e["model"])))
    return entries


def _entry(
    budget: float, name: str, cfg: ModelConfig, seq_len: int, step_tokens: int,
    exclude_embeddings: bool,
) -> dict[str, Any]:
    from pretrain.models.build import count_params, flops_per_token

    params = count_params(cfg, exclude_embeddings=exclude_embeddings)
    steps = round(budget / flops_per_token(cfg, seq_len) / step_tokens)
    tokens = steps * step_tokens
    return {
        "budget": float(budget),
        "model": name,
        "params": int(params),
        "tokens": int(tokens),
        "steps": int(steps),
        "tokens_per_param": tokens / params,
    }


def _distance_from_optimum(entry: dict[str, Any]) -> tuple[float, str]:
    ratio = max(entry["tokens_per_param"], 1e-30)
    return abs(math.log(ratio / CHINCHILLA_TOKENS_PER_PARAM)), entry["model"]


def format_overrides(entries: Sequence[dict[str, Any]]) -> list[str]:
    """One Hydra override string per entry: 'model=NAME tokens=TOKENS'."""
    return [f"model={e['model']} tokens={int(e['tokens'])}" for e in entries]
