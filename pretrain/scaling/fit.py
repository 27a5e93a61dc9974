"""Scaling-law fits of a sweep: IsoFLOP minima (Approach 2) and the parametric loss (Approach 3).

Both follow Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models"
(arXiv:2203.15556), §3.2–3.3 and Appendix D.2, with the corrections of Besiroglu et al. 2024,
"Chinchilla Scaling: A replication attempt" (arXiv:2404.10102): the Huber objective is minimized
to convergence (their finding was that the original fit stopped early), and the uncertainty is
estimated by bootstrapping runs.

FLOPs convention. Every run reports its own C (`flops`, i.e. flops_per_token * tokens, with the
6·N_matmul + attention count of `pretrain.models.llama.flops_per_token`). The fits never assume
C = 6·N·D; where an allocation needs to turn C into N·D they use k = median over runs of
C / (N·D), the sweep's measured FLOPs per parameter per token (`flops_per_param_token`). For
non-embedding N it is a little above 6 (output projection and attention are not in N).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import minimize

from pretrain.scaling.collect import RunResult

if TYPE_CHECKING:
    from pretrain.config import ModelConfig

HUBER_DELTA = 1e-3
"""Huber threshold on log-loss residuals (Hoffmann et al. 2022, App. D.2)."""
MIN_SIZES_PER_BUDGET = 3
"""A parabola needs three distinct model sizes."""
MIN_BUDGETS = 2
"""A power law through IsoFLOP minima needs two budgets (three for a standard error)."""
MIN_RUNS_PARAMETRIC = 6
"""Approach 3 fits five parameters; one more run leaves a residual degree of freedom."""

# Chinchilla's initialization grid (Hoffmann et al. 2022, App. D.2) over θ = (a, b, e, α, β).
_GRID_A = np.arange(0.0, 25.1, 5.0)
_GRID_B = np.arange(0.0, 25.1, 5.0)
_GRID_E = np.arange(-1.0, 1.01, 0.5)
_GRID_ALPHA = np.arange(0.0, 2.01, 0.5)
_GRID_BETA = np.arange(0.0, 2.01, 0.5)
_EXPONENT_BOUNDS = (0.0, 10.0)


class ScalingFitError(ValueError):
    """The runs cannot support the requested fit; the message says what is missing."""


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def flops_per_param_token(runs: Sequence[RunResult]) -> float:
    """k = median of C / (N·D) over runs: the FLOPs-per-token-per-parameter convention in use."""
    if not runs:
        raise ScalingFitError("no runs to measure FLOPs per parameter per token from")
    return float(np.median([r.flops / (r.params * r.tokens) for r in runs]))


def _params_kind(runs: Sequence[RunResult]) -> str:
    kinds = {r.params_kind for r in runs}
    if len(kinds) != 1:
        raise ScalingFitError(f"runs mix parameter conventions {sorted(kinds)}; collect them "
                              "with one setting of use_all_params")
    return kinds.pop()


def group_by_budget(runs: Sequence[RunResult], rel_tol: float = 0.1) -> list[list[RunResult]]:
    """Runs grouped into compute budgets, smallest budget first.

    When every run carries the sweep's nominal `budget`, that is the key (exact, and immune to
    the rounding of tokens to whole steps). Otherwise runs are sorted by C and a new group starts
    whenever C exceeds the group's first C by more than `rel_tol` (relative).
    """
    if runs and all(r.budget is not None for r in runs):
        keyed: dict[float, list[RunResult]] = {}
        for r in runs:
            keyed.setdefault(float(r.budget), []).append(r)  # type: ignore[arg-type]
        return [keyed[k] for k in sorted(keyed)]
    groups: list[list[RunResult]] = []
    for r in sorted(runs, key=lambda r: r.flops):
        if groups and r.flops <= groups[-1][0].flops * (1.0 + rel_tol):
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def _ci(samples: np.ndarray) -> tuple[float, float]:
    """Percentile 95% interval (2.5, 97.5) of bootstrap samples."""
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------------
# Approach 2: IsoFLOP profiles
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetMinimum:
    """The minimum of one IsoFLOP profile: loss ≈ c0 + c1·ln N + c2·(ln N)²."""

    budget: float
    """C of the profile: the geometric mean of its runs' FLOPs."""
    n_opt: float
    """argmin of the parabola: exp(-c1 / (2·c2))."""
    d_opt: float
    """Tokens at n_opt, from the line ln D = u + v·ln N through the profile's runs."""
    loss_min: float
    """The parabola's minimum value."""
    coeffs: tuple[float, float, float]
    """(c0, c1, c2) of the parabola in x = ln N."""
    interior: bool
    """Whether n_opt lies inside the sampled range of N (else it is an extrapolation)."""
    params: tuple[float, ...]
    """N of the profile's runs."""
    losses: tuple[float, ...]
    """Loss of the profile's runs."""


@dataclass(frozen=True)
class PowerLaw:
    """y = coefficient · C^exponent, fitted by least squares in log-log space."""

    exponent: float
    coefficient: float
    exponent_se: float
    """Standard error of the exponent (OLS); NaN with only two points."""
    log_coefficient_se: float
    """Standard error of ln(coefficient) (OLS); NaN with only two points."""
    exponent_ci: tuple[float, float] | None = None
    """Bootstrap 95% percentile interval of the exponent, when bootstrapped."""

    def __call__(self, c: float | np.ndarray) -> float | np.ndarray:
        return self.coefficient * np.power(c, self.exponent)


@dataclass(frozen=True)
class IsoFlopFit:
    """Approach 2: N_opt = k_N·C^a and D_opt = k_D·C^b through the IsoFLOP minima."""

    minima: tuple[BudgetMinimum, ...]
    n_opt: PowerLaw
    d_opt: PowerLaw
    params_kind: str
    skipped_budgets: tuple[str, ...] = ()
    """One line per budget that could not give a minimum, with the reason."""
    n_bootstrap: int = 0

    @property
    def a(self) -> float:
        return self.n_opt.exponent

    @property
    def b(self) -> float:
        return self.d_opt.exponent

    def optimal(self, c: float) -> tuple[float, float]:
        """(N_opt, D_opt) at compute C from the two power laws."""
        return float(self.n_opt(c)), float(self.d_opt(c))


def fit_power_law(c: np.ndarray, y: np.ndarray) -> PowerLaw:
    """OLS of ln y = ln k + p·ln C, with the textbook standard errors of p and ln k."""
    x, z = np.log(c), np.log(y)
    design = np.column_stack([np.ones_like(x), x])
    (log_k, p), *_ = np.linalg.lstsq(design, z, rcond=None)
    dof = len(x) - 2
    if dof > 0:
        s2 = float(np.sum((z - design @ np.array([log_k, p])) ** 2)) / dof
        cov = s2 * np.linalg.inv(design.T @ design)
        log_k_se, p_se = float(np.sqrt(cov[0, 0])), float(np.sqrt(cov[1, 1]))
    else:
        log_k_se = p_se = math.nan
    return PowerLaw(float(p), float(np.exp(log_k)), p_se, log_k_se)


def profile_minimum(group: Sequence[RunResult]) -> BudgetMinimum:
    """Fit one IsoFLOP profile's parabola in ln N and return its minimum.

    Raises ScalingFitError when the profile has fewer than three sizes or curves downwards.
    """
    n = np.array([r.params for r in group])
    x, loss = np.log(n), np.array([r.loss for r in group])
    budget = float(np.exp(np.mean(np.log([r.flops for r in group]))))
    if len(np.unique(n)) < MIN_SIZES_PER_BUDGET:
        raise ScalingFitError(f"budget {budget:.3g}: {len(np.unique(n))} model sizes, "
                              f"need {MIN_SIZES_PER_BUDGET}")
    c2, c1, c0 = np.polyfit(x, loss, 2)
    if c2 <= 0:
        raise ScalingFitError(f"budget {budget:.3g}: loss is not convex in ln N (no minimum)")
    x_opt = -c1 / (2 * c2)
    # D along the profile: exactly ln(C/k) - ln N when k is constant; a fitted line also absorbs
    # the attention term's drift of k with N and the rounding of tokens to whole steps.
    v, u = np.polyfit(x, np.log([r.tokens for r in group]), 1)
    return BudgetMinimum(
        budget=budget,
        n_opt=float(np.exp(x_opt)),
        d_opt=float(np.exp(u + v * x_opt)),
        loss_min=float(c0 - c1 * c1 / (4 * c2)),
        coeffs=(float(c0), float(c1), float(c2)),
        interior=bool(x.min() <= x_opt <= x.max()),
        params=tuple(float(p) for p in n),
        losses=tuple(float(val) for val in loss),
    )


def _minima(groups: Iterable[Sequence[RunResult]]) -> tuple[list[BudgetMinimum], list[str]]:
    minima: list[BudgetMinimum] = []
    skipped: list[str] = []
    for group in groups:
        try:
            minima.append(profile_minimum(group))
        except ScalingFitError as err:
            skipped.append(str(err))
    return minima, skipped


def fit_isoflop(
    runs: Sequence[RunResult], *, rel_tol: float = 0.1, bootstrap: int = 0, seed: int = 0
) -> IsoFlopFit:
    """Approach 2 (Hoffmann et al. 2022, §3.2): IsoFLOP minima, then power laws in C.

    For each budget with ≥ 3 model sizes, fit L = c0 + c1·ln N + c2·(ln N)² and take
    N_opt(C) = exp(-c1 / 2c2); D_opt(C) is read off the same profile (see `profile_minimum`).
    Then ln N_opt = ln k_N + a·ln C and ln D_opt = ln k_D + b·ln C by least squares; with
    C ∝ N·D, a + b ≈ 1. `bootstrap` > 0 resamples runs within each budget with replacement and
    refits, giving percentile intervals of a and b.
    """
    groups = group_by_budget(runs, rel_tol)
    minima, skipped = _minima(groups)
    if len(minima) < MIN_BUDGETS:
        raise ScalingFitError(
            f"Approach 2 needs {MIN_BUDGETS} compute budgets with ≥ {MIN_SIZES_PER_BUDGET} model "
            f"sizes each; found {len(minima)} ({len(groups)} budgets in all)")
    c = np.array([m.budget for m in minima])
    n_law = fit_power_law(c, np.array([m.n_opt for m in minima]))
    d_law = fit_power_law(c, np.array([m.d_opt for m in minima]))
    if bootstrap > 0:
        a_ci, b_ci = _bootstrap_isoflop(groups, bootstrap, seed)
        n_law = _with_ci(n_law, a_ci)
        d_law = _with_ci(d_law, b_ci)
    return IsoFlopFit(tuple(minima), n_law, d_law, _params_kind(runs), tuple(skipped), bootstrap)


def _with_ci(law: PowerLaw, ci: tuple[float, float]) -> PowerLaw:
    return PowerLaw(law.exponent, law.coefficient, law.exponent_se, law.log_coefficient_se, ci)


def _bootstrap_isoflop(
    groups: Sequence[Sequence[RunResult]], n_resamples: int, seed: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Percentile intervals of (a, b) over resamples of runs within each budget."""
    rng = np.random.default_rng(seed)
    a_samples: list[float] = []
    b_samples: list[float] = []
    for _ in range(n_resamples):
        resampled = [[g[i] for i in rng.integers(0, len(g), len(g))] for g in groups]
        minima, _ = _minima(resampled)
        if len(minima) < MIN_BUDGETS:
            continue  # a resample that lost its sizes says nothing about the exponents
        c = np.array([m.budget for m in minima])
        a_samples.append(fit_power_law(c, np.array([m.n_opt for m in minima])).exponent)
        b_samples.append(fit_power_law(c, np.array([m.d_opt for m in minima])).exponent)
    if not a_samples:
        return (math.nan, math.nan), (math.nan, math.nan)
    return _ci(np.array(a_samples)), _ci(np.array(b_samples))


# ---------------------------------------------------------------------------------------------
# Approach 3: parametric L(N, D)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParametricFit:
    """Approach 3: L(N, D) = E + A / N^α + B / D^β.

    Compute-optimal allocation under C = k·N·D (k = `flops_per_param_token`), Hoffmann et al.
    2022 eq. (4): N_opt(C) = G·(C/k)^a, D_opt(C) = G⁻¹·(C/k)^b, with a = β/(α+β),
    b = α/(α+β) and G = (αA / (βB))^(1/(α+β)).
    """

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    """Sum of Huber losses of the log residuals at the optimum."""
    n_runs: int
    flops_per_param_token: float
    """k in C = k·N·D, measured from the runs (see module docstring)."""
    params_kind: str
    huber_delta: float = HUBER_DELTA
    n_bootstrap: int = 0
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Bootstrap 95% percentile intervals of E, A, B, alpha, beta, a, b, G."""

    @property
    def a(self) -> float:
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:  # noqa: N802 - the paper's name
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def predict(self, n: float | np.ndarray, d: float | np.ndarray) -> float | np.ndarray:
        """L(N, D)."""
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def optimal(self, c: float | np.ndarray) -> tuple[float | np.ndarray, float | np.ndarray]:
        """(N_opt, D_opt) at compute C, minimizing L on C = k·N·D."""
        scaled = np.asarray(c, dtype=float) / self.flops_per_param_token
        n = self.G * np.power(scaled, self.a)
        d = np.power(scaled, self.b) / self.G
        if np.ndim(n) == 0:
            return float(n), float(d)
        return n, d


def _single_threaded_blas() -> AbstractContextManager[object]:
    """Limit BLAS to one thread while L-BFGS-B runs, when threadpoolctl is installed.

    L-BFGS-B calls BLAS/LAPACK on 5-vectors thousands of times; OpenBLAS waking its thread pool
    for each call gains nothing and, on a busy machine, made a bootstrap 15x slower (measured:
    93 s against 6 s on two shared cores). Without threadpoolctl the fit is the same, only
    slower under load.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _init_grid() -> np.ndarray:
    """All (a, b, e, α, β) starting points of the Chinchilla grid, shape (4500, 5)."""
    mesh = np.meshgrid(_GRID_A, _GRID_B, _GRID_E, _GRID_ALPHA, _GRID_BETA, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    absr = np.abs(r)
    return np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta))


def _log_pred(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log L = LSE(a - α·ln N, b - β·ln D, e) and the softmax weights of its three terms.

    theta: (..., 5); x, y: (n,). Returns log L (..., n) and weights (..., 3, n).
    """
    a, b, e, alpha, beta = (theta[..., i, None] for i in range(5))
    terms = np.stack([a - alpha * x, b - beta * y, np.broadcast_to(e, a.shape[:-1] + x.shape)],
                     axis=-2)
    top = terms.max(axis=-2, keepdims=True)
    w = np.exp(terms - top)
    total = w.sum(axis=-2, keepdims=True)
    return (top + np.log(total))[..., 0, :], w / total


def _objective(
    theta: np.ndarray, x: np.ndarray, y: np.ndarray, log_loss: np.ndarray, delta: float
) -> tuple[float, np.ndarray]:
    """Σ Huber_δ(log L̂ - log L) / δ² and its gradient in θ.

    Dividing by δ² leaves the argmin alone but brings the objective to O(n): L-BFGS-B's relative
    stopping test would otherwise end on values of order 1e-6, the premature stop Besiroglu et al.
    2024 found in the original fit.
    """
    pred, w = _log_pred(theta, x, y)
    r = pred - log_loss
    psi = np.clip(r, -delta, delta)  # Huber derivative
    grad = np.array([psi @ w[0], psi @ w[1], psi @ w[2], -(psi * w[0]) @ x, -(psi * w[1]) @ y])
    return float(_huber(r, delta).sum()) / delta**2, grad / delta**2


def _grid_starts(
    grid: np.ndarray, x: np.ndarray, y: np.ndarray, log_loss: np.ndarray, delta: float, k: int
) -> np.ndarray:
    """The `k` grid points with the lowest objective: the starts worth refining."""
    pred, _ = _log_pred(grid, x, y)
    values = _huber(pred - log_loss, delta).sum(axis=-1)
    return grid[np.argsort(values, kind="stable")[:k]]


def _refine(
    starts: np.ndarray, x: np.ndarray, y: np.ndarray, log_loss: np.ndarray, delta: float
) -> tuple[np.ndarray, float]:
    """L-BFGS-B from each start; the best optimum and its objective (in units of δ²)."""
    bounds = [(None, None)] * 3 + [_EXPONENT_BOUNDS] * 2
    best_theta, best_value = starts[0], math.inf
    for start in starts:
        res = minimize(_objective, start, args=(x, y, log_loss, delta), jac=True,
                       method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-9})
        if res.fun < best_value:
            best_theta, best_value = res.x, float(res.fun)
    return best_theta, best_value


def fit_parametric(
    runs: Sequence[RunResult],
    *,
    delta: float = HUBER_DELTA,
    n_starts: int = 32,
    bootstrap: int = 0,
    bootstrap_starts: int = 1,
    seed: int = 0,
) -> ParametricFit:
    """Approach 3 (Hoffmann et al. 2022, §3.3 and App. D.2; Besiroglu et al. 2024).

    Minimizes Σᵢ Huber_δ(LSE(a - α·ln Nᵢ, b - β·ln Dᵢ, e) - ln Lᵢ) over θ = (a, b, e, α, β),
    with A = eᵃ, B = eᵇ, E = eᵉ. The whole Chinchilla grid (a, b ∈ {0, 5, …, 25},
    e ∈ {-1, -0.5, …, 1}, α, β ∈ {0, 0.5, …, 2}) is evaluated, and L-BFGS-B refines the
    `n_starts` best grid points; the lowest optimum wins.

    `bootstrap` > 0 resamples runs with replacement and refits each resample from the full fit's
    optimum plus its own `bootstrap_starts` best grid points (a thinned start set, for speed),
    giving percentile 95% intervals.
    """
    if len(runs) < MIN_RUNS_PARAMETRIC:
        raise ScalingFitError(f"Approach 3 fits 5 parameters and needs at least "
                              f"{MIN_RUNS_PARAMETRIC} runs; got {len(runs)}")
    x = np.log([r.params for r in runs])
    y = np.log([r.tokens for r in runs])
    log_loss = np.log([r.loss for r in runs])
    grid = _init_grid()
    ci: dict[str, tuple[float, float]] = {}
    with _single_threaded_blas():
        starts = _grid_starts(grid, x, y, log_loss, delta, n_starts)
        theta, value = _refine(starts, x, y, log_loss, delta)
        if bootstrap > 0:
            ci = _bootstrap_parametric(theta, grid, x, y, log_loss, delta, bootstrap,
                                       bootstrap_starts, seed)
    a, b, e, alpha, beta = (float(v) for v in theta)
    return ParametricFit(
        E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta,
        objective=value * delta**2, n_runs=len(runs),
        flops_per_param_token=flops_per_param_token(runs), params_kind=_params_kind(runs),
        huber_delta=delta, n_bootstrap=bootstrap, ci=ci,
    )


def _bootstrap_parametric(
    theta: np.ndarray, grid: np.ndarray, x: np.ndarray, y: np.ndarray, log_loss: np.ndarray,
    delta: float, n_resamples: int, n_starts: int, seed: int,
) -> dict[str, tuple[float, float]]:
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_resamples):
        idx = rng.integers(0, len(x), len(x))
        xs, ys, ls = x[idx], y[idx], log_loss[idx]
        starts = np.vstack([theta, _grid_starts(grid, xs, ys, ls, delta, n_starts)])
        samples.append(_refine(starts, xs, ys, ls, delta)[0])
    s = np.array(samples)
    a, b, e, alpha, beta = (s[:, i] for i in range(5))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        derived = {
            "E": np.exp(e), "A": np.exp(a), "B": np.exp(b), "alpha": alpha, "beta": beta,
            "a": beta / (alpha + beta), "b": alpha / (alpha + beta),
            "G": (alpha * np.exp(a) / (beta * np.exp(b))) ** (1.0 / (alpha + beta)),
        }
    return {name: _ci(values[np.isfinite(values)]) for name, values in derived.items()}


# ---------------------------------------------------------------------------------------------
# Recommendation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recommendation:
    """What to train with a compute budget."""

    budget_flops: float
    n_opt: float
    """Compute-optimal parameters (in the fit's convention: non-embedding or all)."""
    d_opt: float
    """Compute-optimal tokens."""
    loss_opt: float | None
    """L(N_opt, D_opt) from Approach 3; None when recommending from Approach 2."""
    preset: str | None = None
    """The preset whose parameter count is closest to N_opt (in log space)."""
    preset_params: int | None = None
    preset_tokens: int | None = None
    """Tokens that spend the budget on the preset: C / flops_per_token(preset, seq_len)."""
    preset_loss: float | None = None
    """Approach 3's predicted loss for the preset trained on preset_tokens."""
    override: str | None = None
    """Hydra overrides that run it, e.g. 'model=125m tokens=2500000000'."""


def budget_from_gpu_hours(gpu_hours: float, flops_per_sec: float) -> float:
    """C = GPU-hours · 3600 s/h · achieved FLOP/s per GPU (peak × MFU, not the peak)."""
    if gpu_hours <= 0 or flops_per_sec <= 0:
        raise ValueError("gpu_hours and flops_per_sec must be positive")
    return gpu_hours * 3600.0 * flops_per_sec


def load_presets(conf_dir: str | Path) -> dict[str, ModelConfig]:
    """Model presets `conf_dir/*.yaml` as ModelConfig, keyed by file stem (Hydra's choice name)."""
    from omegaconf import OmegaConf

    from pretrain.config import ModelConfig

    presets: dict[str, ModelConfig] = {}
    for path in sorted(Path(conf_dir).glob("*.yaml")):
        raw = OmegaConf.load(path)
        if "defaults" in raw:  # a defaults list is Hydra composition, not a ModelConfig field
            raw.pop("defaults")
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), raw)
        presets[path.stem] = OmegaConf.to_object(merged)  # type: ignore[assignment]
    return presets


def recommend(
    fit: ParametricFit | IsoFlopFit,
    budget_flops: float,
    presets: dict[str, ModelConfig] | None = None,
    seq_len: int = 2048,
) -> Recommendation:
    """N_opt, D_opt and predicted loss at `budget_flops`, and the closest preset to run.

    The preset is the one whose parameter count (same convention as the fit) is closest to
    N_opt in log space; it is trained on the tokens that spend exactly the budget with its own
    FLOPs per token, since a preset off N_opt is still best used up to the budget.
    """
    if budget_flops <= 0:
        raise ValueError(f"budget_flops must be positive, got {budget_flops}")
    n_opt, d_opt = fit.optimal(budget_flops)
    parametric = fit if isinstance(fit, ParametricFit) else None
    loss_opt = float(parametric.predict(n_opt, d_opt)) if parametric else None
    rec = Recommendation(float(budget_flops), float(n_opt), float(d_opt), loss_opt)
    if not presets:
        return rec
    from pretrain.models.build import count_params, flops_per_token

    exclude = fit.params_kind == "non_embedding"
    sizes = {name: count_params(cfg, exclude_embeddings=exclude) for name, cfg in presets.items()}
    name = min(sizes, key=lambda k: (abs(math.log(sizes[k] / n_opt)), k))
    tokens = int(budget_flops // flops_per_token(presets[name], seq_len))
    loss = float(parametric.predict(sizes[name], tokens)) if parametric and tokens > 0 else None
    return Recommendation(rec.budget_flops, rec.n_opt, rec.d_opt, rec.loss_opt, name,
                          int(sizes[name]), tokens, loss, f"model={name} tokens={tokens}")
