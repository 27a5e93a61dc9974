"""Downstream scaling: predict a benchmark metric from compute, through the loss.

The two-step method of Llama 3 (Dubey et al. 2024, "The Llama 3 Herd of Models",
arXiv:2407.21783, §3.2.1 "Scaling Laws", Figure 4):

1. compute -> loss. Llama 3 fits the negative log-likelihood of compute-optimal models as a
   function of training FLOPs. Here the compute-optimal loss at a budget C is Approach 3's
   L(N_opt(C), D_opt(C)) (`pretrain.scaling.fit`), the loss the recommendation already
   predicts; Llama 3's intermediate is the benchmark's own NLL of the correct answer, ours
   the validation loss each run reports (`final_eval["val/loss"]`).
2. loss -> metric. A sigmoid that saturates at both ends, fitted over every run that reports
   the metric (Llama 3 fits it on the scaling-law runs and older, larger models):

       metric(L) = lo + (hi - lo) / (1 + exp(k (L - L0))),   k > 0

   `lo` is where the metric sits for a poor model (chance for accuracy), `hi` its ceiling,
   `L0` the loss halfway between and `k` how sharply the metric rises as the loss falls.

The predicted metric at a budget is metric(L_opt(C)). A metric comes from each run's
`summary.json`, e.g. `final_eval["eval/hellaswag/acc_norm"]` from the in-loop task evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from pretrain.scaling.collect import RunResult
from pretrain.scaling.fit import ScalingFitError

MIN_RUNS_DOWNSTREAM = 5
"""The sigmoid has four parameters; one more run leaves a residual degree of freedom."""
LOSS_KEY = "val/loss"
"""The link's loss: the final evaluation's validation loss (the metric is measured there too)."""


def sigmoid_link(loss: float | np.ndarray, lo: float, hi: float, k: float,
                 l0: float) -> float | np.ndarray:
    """metric(L) = lo + (hi - lo) / (1 + exp(k (L - L0)))."""
    z = np.clip(k * (np.asarray(loss, dtype=np.float64) - l0), -500.0, 500.0)
    out = lo + (hi - lo) / (1.0 + np.exp(z))
    return float(out) if np.ndim(out) == 0 else out


@dataclass(frozen=True)
class DownstreamPoint:
    """One run's (C, L, metric)."""

    name: str
    flops: float
    loss: float
    value: float


@dataclass(frozen=True)
class DownstreamFit:
    """The sigmoid link of one metric to the loss (step 2)."""

    metric: str
    lo: float
    hi: float
    k: float
    l0: float
    points: list[DownstreamPoint]
    rmse: float
    """Root-mean-square residual of the metric over the runs."""
    skipped: list[str]
    """Runs left out, with why (the metric is missing or not a finite number)."""

    def predict(self, loss: float | np.ndarray) -> float | np.ndarray:
        return sigmoid_link(loss, self.lo, self.hi, self.k, self.l0)


@dataclass(frozen=True)
class DownstreamPrediction:
    """The metric predicted at a budget, through the compute-optimal loss (steps 1 and 2)."""

    metric: str
    budget_flops: float
    loss: float
    """L(N_opt, D_opt) at the budget (Approach 3)."""
    value: float
    preset_loss: float | None = None
    """The recommended preset's predicted loss on its tokens, and"""
    preset_value: float | None = None
    """its predicted metric."""


def downstream_points(runs: Sequence[RunResult],
                      metric: str) -> tuple[list[DownstreamPoint], list[str]]:
    """Each run's (C, final validation loss, metric); the runs without the metric, and why."""
    points, skipped = [], []
    for r in runs:
        value = _finite(r.final_eval.get(metric))
        if value is None:
            got = r.final_eval.get(metric)
            skipped.append(f"{r.name}: no finite final_eval[{metric!r}] ({got!r})")
            continue
        loss = _finite(r.final_eval.get(LOSS_KEY))
        points.append(DownstreamPoint(r.name, r.flops, r.loss if loss is None else loss, value))
    return points, skipped


def fit_downstream(runs: Sequence[RunResult], metric: str) -> DownstreamFit:
    """Least-squares fit of the sigmoid link from loss to `metric` over the runs that report it.

    Started from several (L0, k) guesses over the observed range (the fit is not convex) and
    kept at the lowest residual; `lo`/`hi` are free, so a metric need not be an accuracy."""
    points, skipped = downstream_points(runs, metric)
    if len(points) < MIN_RUNS_DOWNSTREAM:
        raise ScalingFitError(
            f"{len(points)} runs report final_eval[{metric!r}]; the loss-to-metric link needs "
            f"at least {MIN_RUNS_DOWNSTREAM} (turn on the task's evaluation in the sweep: "
            "evals.tasks=[...])")
    x = np.array([p.loss for p in points])
    y = np.array([p.value for p in points])
    span_x = max(float(np.ptp(x)), 1e-3)
    span_y = max(float(np.ptp(y)), 1e-6)

    def residuals(theta: np.ndarray) -> np.ndarray:
        lo, hi, log_k, l0 = theta
        return np.asarray(sigmoid_link(x, lo, hi, math.exp(log_k), l0)) - y

    best = None
    for l0 in np.linspace(x.min(), x.max(), 5):
        for k in (1.0 / span_x, 4.0 / span_x, 16.0 / span_x):
            start = np.array([y.min() - 0.05 * span_y, y.max() + 0.05 * span_y, math.log(k), l0])
            fit = least_squares(residuals, start, method="trf", x_scale="jac")
            if best is None or fit.cost < best.cost:
                best = fit
    assert best is not None
    lo, hi, log_k, l0 = (float(v) for v in best.x)
    rmse = float(np.sqrt(np.mean(residuals(best.x) ** 2)))
    return DownstreamFit(metric, lo, hi, math.exp(log_k), l0, points, rmse, skipped)


def predict_at(fit: DownstreamFit, budget_flops: float, loss_opt: float,
               preset_loss: float | None = None) -> DownstreamPrediction:
    """The metric at `budget_flops` from the compute-optimal loss there (and the preset's)."""
    return DownstreamPrediction(
        fit.metric, float(budget_flops), float(loss_opt), float(fit.predict(loss_opt)),
        preset_loss, None if preset_loss is None else float(fit.predict(preset_loss)))


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None
