"""What validation measures besides the loss, per objective, as sums that add over batches and
ranks (so the result is the same on every layout):

    mlm   val/mlm_acc     argmax == target over the predicted (masked) positions
    span  val/token_acc   argmax == target over the decoder's target tokens (teacher forcing)
          val/span_em     spans whose every token is predicted right (teacher forcing: under
                          greedy decoding they are what the model writes, given the spans
                          before them)
    fim   val/middle_loss cross-entropy of the middle part of transformed documents, the part
                          an infill writes (`Batch.middle_mask`)

Each scorer returns {name: (numerator, denominator)}; the caller sums both over its batches and
the data-parallel ranks and reports numerator / denominator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.data.loader import Batch
from pretrain.models.loss import IGNORE_INDEX

Sums = dict[str, tuple[Tensor, Tensor]]


def _count(x: Tensor) -> Tensor:
    return x.sum().double()


class Scorer:
    """The metrics of one objective; `sums(logits, batch)` for each validation batch.
    `loss_targets(batch)` names the metrics that are a loss over some of the targets, for a
    layout that has no logits to give (pipeline stages): they are computed as the loss of the
    batch with the other targets ignored."""

    def sums(self, logits: Tensor, batch: Batch) -> Sums:
        raise NotImplementedError

    def loss_targets(self, batch: Batch) -> dict[str, Tensor]:
        return {}


class MaskedLMScorer(Scorer):
    def sums(self, logits: Tensor, batch: Batch) -> Sums:
        valid = batch.targets != IGNORE_INDEX
        correct = (logits.argmax(-1) == batch.targets) & valid
        return {"val/mlm_acc": (_count(correct), _count(valid))}


class SpanScorer(Scorer):
    """`sentinels`: the ids of <extra_id_N>, which open each span in the targets."""

    def __init__(self, sentinels: list[int]) -> None:
        self.sentinels = torch.tensor(sorted(sentinels))

    def sums(self, logits: Tensor, batch: Batch) -> Sums:
        targets = batch.targets  # (B, T): sentinel, span tokens, sentinel, ..., EOS
        valid = targets != IGNORE_INDEX
        wrong = (logits.argmax(-1) != targets) & valid
        sentinel = torch.isin(targets, self.sentinels.to(targets.device))
        span_id = sentinel.long().cumsum(dim=1)  # (B, T): 0 before the first span
        n_spans = int(span_id.max()) + 1 if span_id.numel() else 1
        # Wrong tokens per (row, span); a span's tokens are its sentinel's followers.
        in_span = valid & ~sentinel & (span_id > 0)
        errors = torch.zeros(targets.shape[0], n_spans, device=targets.device)
        errors.scatter_add_(1, span_id, (wrong & in_span).float())
        present = torch.zeros_like(errors).scatter_add_(1, span_id, in_span.float()) > 0
        exact = (errors == 0) & present
        return {"val/token_acc": (_count(valid & ~wrong), _count(valid)),
                "val/span_em": (_count(exact), _count(present))}


class MiddleScorer(Scorer):
    def sums(self, logits: Tensor, batch: Batch) -> Sums:
        targets = self.loss_targets(batch).get("val/middle_loss")
        if targets is None:
            return {}
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        return {"val/middle_loss": (loss.double(), _count(targets != IGNORE_INDEX))}

    def loss_targets(self, batch: Batch) -> dict[str, Tensor]:
        """The targets of the middle parts only."""
        if batch.middle_mask is None:
            return {}
        return {"val/middle_loss": batch.targets.masked_fill(~batch.middle_mask, IGNORE_INDEX)}


def build_scorer(objective: str, *, sentinels: list[int] | None = None) -> Scorer | None:
    """The scorer of `objective` ('clm' has none: its loss is all it reports)."""
    if objective == "mlm":
        return MaskedLMScorer()
    if objective == "span":
        return SpanScorer(sentinels or [])
    if objective == "fim":
        return MiddleScorer()
    return None
