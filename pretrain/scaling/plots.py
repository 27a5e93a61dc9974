"""Plots of a scaling study, drawn with matplotlib's Agg canvas (no display, no pyplot state).

(a) `plot_isoflop_profiles`: loss vs N per budget, the fitted parabolas and their minima
    (Hoffmann et al. 2022, Figure 3 left);
(b) `plot_optimal_allocation`: N_opt and D_opt vs C, log-log, with both approaches' power laws
    (Figure 3 centre/right);
(c) `plot_loss_contours`: contours of the fitted L(N, D) with IsoFLOP lines and the efficient
    frontier (Figure 4);
(d) `plot_downstream`: a downstream metric vs loss with its sigmoid link, and vs compute through
    the compute-optimal loss (Dubey et al. 2024, "The Llama 3 Herd of Models", Figure 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from pretrain.scaling.collect import RunResult
from pretrain.scaling.downstream import DownstreamFit, DownstreamPrediction
from pretrain.scaling.fit import IsoFlopFit, ParametricFit, group_by_budget

_DPI = 120


def _new_figure(ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(5.5 * ncols, 4.2), layout="constrained")
    FigureCanvasAgg(fig)  # attach the raster canvas explicitly: no backend lookup, no GUI
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)
    return path


def _budget_colors(budgets: Sequence[float]) -> dict[float, tuple[float, ...]]:
    norm = LogNorm(min(budgets), max(budgets)) if len(set(budgets)) > 1 else None
    cmap = colormaps["viridis"]
    return {c: cmap(norm(c) if norm else 0.5) for c in budgets}


def _group_budgets(runs: Sequence[RunResult]) -> list[float]:
    """Each budget group's C, the geometric mean of its runs' FLOPs (as `profile_minimum`)."""
    return [float(np.exp(np.mean(np.log([r.flops for r in g])))) for g in group_by_budget(runs)]


def plot_isoflop_profiles(
    runs: Sequence[RunResult], fit: IsoFlopFit | None, path: Path
) -> Path:
    """(a) Loss against N for each budget; parabolas and minima where Approach 2 found them."""
    fig, (ax,) = _new_figure()
    groups = group_by_budget(runs)
    budgets = _group_budgets(runs)
    colors = _budget_colors(budgets)
    for c, group in zip(budgets, groups):
        ax.scatter([r.params for r in group], [r.loss for r in group], color=colors[c], s=18,
                   label=f"C = {c:.2g}")
    for m in fit.minima if fit else ():
        color = colors[min(budgets, key=lambda c: abs(np.log(c / m.budget)))]
        x = np.linspace(np.log(min(m.params)) - 0.2, np.log(max(m.params)) + 0.2, 100)
        c0, c1, c2 = m.coeffs
        ax.plot(np.exp(x), c0 + c1 * x + c2 * x * x, color=color, lw=1)
        ax.plot(m.n_opt, m.loss_min, marker="x", color="black", ms=7)
    ax.set(xscale="log", xlabel="parameters N", ylabel="validation loss",
           title="IsoFLOP profiles (Approach 2)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_optimal_allocation(
    fit: IsoFlopFit | None, parametric: ParametricFit | None, path: Path,
    budgets: Sequence[float] = (),
) -> Path:
    """(b) N_opt(C) and D_opt(C), log-log: IsoFLOP minima, Approach 2 and Approach 3 laws."""
    fig, (ax_n, ax_d) = _new_figure(2)
    points = [m.budget for m in fit.minima] if fit else []
    span = [*points, *budgets]
    c = np.geomspace(min(span) / 3, max(span) * 3, 50) if span else np.geomspace(1e15, 1e24, 50)
    if fit:
        ax_n.scatter(points, [m.n_opt for m in fit.minima], color="C0", label="IsoFLOP minima")
        ax_d.scatter(points, [m.d_opt for m in fit.minima], color="C0", label="IsoFLOP minima")
        ax_n.plot(c, fit.n_opt(c), color="C0", label=f"Approach 2: a = {fit.a:.3f}")
        ax_d.plot(c, fit.d_opt(c), color="C0", label=f"Approach 2: b = {fit.b:.3f}")
    if parametric:
        n, d = parametric.optimal(c)
        ax_n.plot(c, n, "--", color="C1", label=f"Approach 3: a = {parametric.a:.3f}")
        ax_d.plot(c, d, "--", color="C1", label=f"Approach 3: b = {parametric.b:.3f}")
    for ax, name in ((ax_n, "N_opt (parameters)"), (ax_d, "D_opt (tokens)")):
        ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel=name)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_loss_contours(
    parametric: ParametricFit, runs: Sequence[RunResult], path: Path,
    budgets: Sequence[float] = (),
) -> Path:
    """(c) Contours of L(N, D), IsoFLOP lines D = C / (k·N), and the efficient frontier."""
    fig, (ax,) = _new_figure()
    n_runs, d_runs = [r.params for r in runs], [r.tokens for r in runs]
    n = np.geomspace(min(n_runs) / 10, max(n_runs) * 10, 200)
    d = np.geomspace(min(d_runs) / 10, max(d_runs) * 10, 200)
    nn, dd = np.meshgrid(n, d)
    loss = parametric.predict(nn, dd)
    # Geometric levels: the loss surface is steep at small N, D and flat near E.
    levels = np.geomspace(loss.min(), np.percentile(loss, 95), 20)
    contours = ax.contourf(nn, dd, loss, levels=levels, cmap="viridis", extend="max")
    fig.colorbar(contours, ax=ax, label="L(N, D)", format="%.2f")
    k = parametric.flops_per_param_token
    for c in sorted({*budgets, *_group_budgets(runs)}):
        ax.plot(n, c / (k * n), color="white", lw=0.6, alpha=0.7)
    frontier_c = np.geomspace(k * n[0] * d[0], k * n[-1] * d[-1], 100)
    fn, fd = parametric.optimal(frontier_c)
    ax.plot(fn, fd, color="red", lw=1.5, label="efficient frontier")
    ax.scatter(n_runs, d_runs, s=8, color="black", label="runs")
    for c in budgets:
        ax.plot(*parametric.optimal(c), marker="*", ms=12, color="red", ls="none")
    ax.set(xscale="log", yscale="log", xlim=(n[0], n[-1]), ylim=(d[0], d[-1]),
           xlabel="parameters N", ylabel="tokens D", title="L(N, D) (Approach 3)")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_downstream(
    fit: DownstreamFit, parametric: ParametricFit | None, path: Path,
    prediction: DownstreamPrediction | None = None,
) -> Path:
    """Left: the metric vs loss, each run and the fitted sigmoid. Right: the metric vs C, each
    run and metric(L_opt(C)) along the compute-optimal frontier, the prediction starred."""
    fig, (left, right) = _new_figure(2)
    loss = np.array([p.loss for p in fit.points])
    value = np.array([p.value for p in fit.points])
    flops = np.array([p.flops for p in fit.points])
    lo_x, hi_x = loss.min(), loss.max()
    if prediction is not None:
        lo_x = min(lo_x, prediction.loss)
    pad = 0.1 * max(hi_x - lo_x, 1e-3)
    grid = np.linspace(lo_x - pad, hi_x + pad, 200)
    left.scatter(loss, value, s=14, color="C0", label="runs")
    left.plot(grid, fit.predict(grid), color="C1",
              label=f"sigmoid: lo {fit.lo:.3g}, hi {fit.hi:.3g}, k {fit.k:.3g}, L0 {fit.l0:.3g}")
    left.set(xlabel="validation loss", ylabel=fit.metric, title="loss -> metric")
    right.scatter(flops, value, s=14, color="C0", label="runs")
    if parametric is not None:
        top = max(flops.max(), prediction.budget_flops if prediction else 0.0)
        c = np.geomspace(flops.min() / 2, top * 2, 100)
        frontier = parametric.predict(*parametric.optimal(c))
        right.plot(c, fit.predict(frontier), color="C1", label="via L(N_opt(C), D_opt(C))")
    if prediction is not None:
        for ax, x in ((left, prediction.loss), (right, prediction.budget_flops)):
            ax.plot(x, prediction.value, marker="*", ms=12, color="red", ls="none",
                    label=f"C={prediction.budget_flops:.3g}: {prediction.value:.4f}")
    right.set(xscale="log", xlabel="training FLOPs C", ylabel=fit.metric,
              title="compute -> metric")
    for ax in (left, right):
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_all(
    runs: Sequence[RunResult], isoflop: IsoFlopFit | None, parametric: ParametricFit | None,
    out_dir: Path, budgets: Sequence[float] = (),
) -> list[Path]:
    """All plots the fits allow, as PNGs in `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    paths = [
        plot_isoflop_profiles(runs, isoflop, out_dir / "isoflop_profiles.png"),
        plot_optimal_allocation(isoflop, parametric, out_dir / "optimal_allocation.png", budgets),
    ]
    if parametric is not None:
        paths.append(plot_loss_contours(parametric, runs, out_dir / "loss_contours.png", budgets))
    return paths
