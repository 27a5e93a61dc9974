"""Validation loss and perplexity."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import torch
from torch import nn

from pretrain.data.loader import Batch
from pretrain.models.loss import cross_entropy


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    chunked: bool = False,
) -> dict[str, float]:
    """Token-weighted mean loss over `batches` (every window has the same length). `chunked`:
    the model computes the loss from `targets` without the full logits, as in training."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        batch = batch.to(device)
        inputs, targets = batch
        with autocast():  # the same document masking as in training, when it is on
            if chunked:
                loss = model(inputs, targets=targets, **batch.model_kwargs())
            else:
                loss = cross_entropy(model(inputs, **batch.model_kwargs()), targets)
        total[0] += loss.double() * targets.numel()
        total[1] += targets.numel()
    total = all_reduce(total)
    model.train(was_training)
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}
