from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pretrain.config import OptimConfig
from pretrain.train.optim import build_optimizer, lr_lambda, param_groups


def test_cosine_warmup_then_decay_to_floor() -> None:
    fn = lr_lambda(OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1), 100)
    values = [fn(s) for s in range(101)]
    assert values[0] == pytest.approx(1 / 11)
    assert values[9] == pytest.approx(10 / 11)
    assert max(values) == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[100] == pytest.approx(0.1)
    assert values[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_wsd_is_flat_then_decays_linearly() -> None:
    fn = lr_lambda(OptimConfig(schedule="wsd", warmup_steps=5, decay_fraction=0.2,
                               min_lr_ratio=0.0), 100)
    assert [fn(s) for s in (5, 50, 79, 80)] == [1.0, 1.0, 1.0, 1.0]
    assert fn(90) == pytest.approx(0.5)
    assert fn(100) == pytest.approx(0.0)


def test_decay_applies_to_matrices_only() -> None:
    model = nn.ModuleDict({"tok_embeddings": nn.Embedding(10, 4), "lin": nn.Linear(4, 4),
                           "norm": nn.LayerNorm(4)})
    decay, no_decay = param_groups(model, 0.1)
    assert decay["params"] == [model["lin"].weight]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0
    opt = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    assert opt.defaults["fused"] is True
