"""Scaling-law fits recover a known law from a synthetic IsoFLOP sweep; grids and presets."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pretrain.config import ModelConfig
from pretrain.scaling.collect import RunResult
from pretrain.scaling.fit import (
    IsoFlopFit,
    ParametricFit,
    ScalingFitError,
    _objective,
    budget_from_gpu_hours,
    fit_isoflop,
    fit_parametric,
    fit_power_law,
    group_by_budget,
    load_presets,
    profile_minimum,
    recommend,
)
from pretrain.scaling.grid import format_overrides, isoflop_grid

# Chinchilla's fitted law (Hoffmann et al. 2022, eq. 10).
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
A_TRUE, B_TRUE = BETA / (ALPHA + BETA), ALPHA / (ALPHA + BETA)
G_TRUE = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
BUDGETS = (1e18, 1e19, 1e20, 1e21)


def true_loss(n: float | np.ndarray, d: float | np.ndarray) -> float | np.ndarray:
    return E + A / np.power(n, ALPHA) + B / np.power(d, BETA)


def synthetic_runs(seed: int = 0, noise: float = 0.005, sizes: int = 7) -> list[RunResult]:
    """An IsoFLOP grid under C = 6ND: `sizes` models from N_opt/8 to 8·N_opt per budget."""
    rng = np.random.default_rng(seed)
    runs = []
    for c in BUDGETS:
        n_opt = G_TRUE * (c / 6) ** A_TRUE
        for n in n_opt * np.geomspace(1 / 8, 8, sizes):
            d = c / (6 * n)
            loss = true_loss(n, d) * math.exp(rng.normal(0.0, noise))
            runs.append(RunResult(f"r{len(runs)}", Path("."), n, d, c, loss, budget=c))
    return runs


@pytest.fixture(scope="module")
def runs() -> list[RunResult]:
    return synthetic_runs()


@pytest.fixture(scope="module")
def parametric(runs: list[RunResult]) -> ParametricFit:
    return fit_parametric(runs, bootstrap=100, seed=0)


@pytest.fixture(scope="module")
def isoflop(runs: list[RunResult]) -> IsoFlopFit:
    return fit_isoflop(runs, bootstrap=200, seed=0)


def true_fit(**kwargs: object) -> ParametricFit:
    fields = dict(E=E, A=A, B=B, alpha=ALPHA, beta=BETA, objective=0.0, n_runs=0,
                  flops_per_param_token=6.0, params_kind="non_embedding")
    return ParametricFit(**{**fields, **kwargs})  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- Approach 3


def test_parametric_recovers_exponents(parametric: ParametricFit) -> None:
    assert parametric.alpha == pytest.approx(ALPHA, abs=0.03)
    assert parametric.beta == pytest.approx(BETA, abs=0.03)
    assert parametric.a == pytest.approx(A_TRUE, abs=0.03)
    assert parametric.flops_per_param_token == pytest.approx(6.0)


@pytest.mark.parametrize("n, d", [(3e8, 1.5e10), (2e9, 8e10)])
def test_parametric_predicts_held_out_loss(parametric: ParametricFit, n: float, d: float) -> None:
    assert parametric.predict(n, d) == pytest.approx(true_loss(n, d), rel=0.01)


def test_parametric_bootstrap_intervals_contain_truth(parametric: ParametricFit) -> None:
    truth = {"alpha": ALPHA, "beta": BETA, "a": A_TRUE, "b": B_TRUE, "E": E}
    for name, value in truth.items():
        lo, hi = parametric.ci[name]
        assert lo < value < hi, (name, lo, hi)
        assert hi - lo < 0.5 * value, f"{name} interval [{lo}, {hi}] is uninformative"


def test_parametric_fit_beats_truth_on_its_objective(
    runs: list[RunResult], parametric: ParametricFit
) -> None:
    """The optimizer converged: no worse than the generating parameters on the same data."""
    x, y = np.log([r.params for r in runs]), np.log([r.tokens for r in runs])
    log_loss = np.log([r.loss for r in runs])
    theta = np.array([math.log(A), math.log(B), math.log(E), ALPHA, BETA])
    at_truth = _objective(theta, x, y, log_loss, 1e-3)[0] * 1e-6
    assert parametric.objective <= at_truth * (1 + 1e-9)


def test_objective_gradient_matches_finite_differences(runs: list[RunResult]) -> None:
    x, y = np.log([r.params for r in runs]), np.log([r.tokens for r in runs])
    log_loss = np.log([r.loss for r in runs])
    theta = np.array([6.5, 5.5, 0.4, 0.38, 0.25])
    _, grad = _objective(theta, x, y, log_loss, 1e-3)
    eps = 1e-6
    numeric = [(_objective(theta + eps * e, x, y, log_loss, 1e-3)[0]
                - _objective(theta - eps * e, x, y, log_loss, 1e-3)[0]) / (2 * eps)
               for e in np.eye(5)]
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-6)


def test_parametric_allocation_minimizes_loss_on_the_isoflop() -> None:
    fit = true_fit(flops_per_param_token=7.0)
    c = 3e21
    n_opt, d_opt = fit.optimal(c)
    assert 7.0 * n_opt * d_opt == pytest.approx(c)
    n = n_opt * np.geomspace(0.5, 2.0, 2001)
    losses = fit.predict(n, c / (7.0 * n))
    assert n[np.argmin(losses)] == pytest.approx(n_opt, rel=2e-3)


def test_parametric_needs_six_runs(runs: list[RunResult]) -> None:
    with pytest.raises(ScalingFitError, match="at least 6 runs"):
        fit_parametric(runs[:5])


# ----------------------------------------------------------------------------- Approach 2


def test_isoflop_recovers_exponents(isoflop: IsoFlopFit) -> None:
    assert isoflop.a == pytest.approx(A_TRUE, abs=0.03)
    assert isoflop.b == pytest.approx(B_TRUE, abs=0.03)
    assert len(isoflop.minima) == len(BUDGETS)
    assert all(m.interior for m in isoflop.minima)
    assert isoflop.n_opt.exponent_se > 0


def test_isoflop_bootstrap_intervals_contain_truth(isoflop: IsoFlopFit) -> None:
    for law, value in ((isoflop.n_opt, A_TRUE), (isoflop.d_opt, B_TRUE)):
        lo, hi = law.exponent_ci  # type: ignore[misc]
        assert lo < value < hi


def test_isoflop_minima_near_true_optimum(isoflop: IsoFlopFit) -> None:
    for m in isoflop.minima:
        n_true = G_TRUE * (m.budget / 6) ** A_TRUE
        assert m.n_opt == pytest.approx(n_true, rel=0.25)
        assert 6 * m.n_opt * m.d_opt == pytest.approx(m.budget, rel=1e-6)


def test_profile_minimum_of_an_exact_parabola() -> None:
    n = np.geomspace(1e7, 1e9, 5)
    x = np.log(n)
    x0 = math.log(1e8) + 0.3
    loss = 2.0 + 0.05 * (x - x0) ** 2
    group = [RunResult("r", Path("."), float(ni), 1e20 / (6 * ni), 1e20, float(li))
             for ni, li in zip(n, loss)]
    m = profile_minimum(group)
    assert m.n_opt == pytest.approx(math.exp(x0), rel=1e-9)
    assert m.loss_min == pytest.approx(2.0, abs=1e-12)
    assert m.d_opt == pytest.approx(1e20 / (6 * m.n_opt), rel=1e-9)


def test_isoflop_reports_budgets_without_a_minimum(runs: list[RunResult]) -> None:
    two_sizes = [r for r in runs if r.budget == BUDGETS[0]][:2]
    concave = [RunResult(r.name, r.path, r.params, r.tokens, r.flops, 5.0 - r.loss, budget=1e22)
               for r in runs if r.budget == BUDGETS[1]]
    rest = [r for r in runs if r.budget in BUDGETS[2:]]
    fit = fit_isoflop(two_sizes + concave + rest)
    assert len(fit.minima) == 2
    assert any("2 model sizes" in s for s in fit.skipped_budgets)
    assert any("not convex" in s for s in fit.skipped_budgets)
    with pytest.raises(ScalingFitError, match="needs 2 compute budgets"):
        fit_isoflop(two_sizes + concave + rest[:7])


def test_group_by_budget_tolerance_and_nominal() -> None:
    def run(c: float, budget: float | None) -> RunResult:
        return RunResult("r", Path("."), 1.0, 1.0, c, 1.0, budget=budget)

    loose = [run(1.05e18, None), run(1e18, None), run(1e19, None), run(1.08e19, None)]
    assert [len(g) for g in group_by_budget(loose, rel_tol=0.1)] == [2, 2]
    assert [len(g) for g in group_by_budget(loose, rel_tol=0.01)] == [1, 1, 1, 1]
    nominal = [run(1.3e18, 1e18), run(0.8e18, 1e18), run(1e19, 1e19)]
    assert [len(g) for g in group_by_budget(nominal)] == [2, 1]


def test_power_law_standard_errors() -> None:
    c = np.geomspace(1e18, 1e21, 6)
    exact = fit_power_law(c, 3.0 * c**0.5)
    assert (exact.exponent, exact.coefficient) == pytest.approx((0.5, 3.0))
    assert exact.exponent_se == pytest.approx(0.0, abs=1e-9)
    noisy = fit_power_law(c, 3.0 * c**0.5 * np.exp([0.1, -0.1, 0.1, -0.1, 0.1, -0.1]))
    assert noisy.exponent_se > 0.005
    assert math.isnan(fit_power_law(c[:2], c[:2]).exponent_se)


# ----------------------------------------------------------------------------- recommendation


def presets() -> dict[str, ModelConfig]:
    return {
        "tiny": ModelConfig(name="tiny", dim=128, n_layers=2, n_heads=4),
        "small": ModelConfig(name="small", dim=512, n_layers=8, n_heads=8),
        "large": ModelConfig(name="large", dim=2048, n_layers=24, n_heads=16),
    }


def test_recommend_picks_closest_preset() -> None:
    from pretrain.models.llama import count_params, flops_per_token

    fit = true_fit()
    small = presets()["small"]
    n_small = count_params(small, exclude_embeddings=True)
    # The budget whose N_opt is 1.3× the small preset: closest in log, far from the others.
    budget = 6 * (1.3 * n_small / fit.G) ** (1 / fit.a)
    rec = recommend(fit, budget, presets(), seq_len=256)
    assert rec.n_opt == pytest.approx(1.3 * n_small, rel=1e-9)
    assert rec.preset == "small" and rec.preset_params == n_small
    assert rec.preset_tokens == int(budget // flops_per_token(small, 256))
    assert rec.override == f"model=small tokens={rec.preset_tokens}"
    assert rec.loss_opt == pytest.approx(float(fit.predict(rec.n_opt, rec.d_opt)))
    assert rec.preset_loss is not None and rec.preset_loss >= rec.loss_opt


def test_recommend_without_presets_and_from_isoflop(isoflop: IsoFlopFit) -> None:
    rec = recommend(isoflop, 1e22)
    assert rec.override is None and rec.loss_opt is None
    assert rec.n_opt == pytest.approx(isoflop.n_opt.coefficient * 1e22**isoflop.a)


def test_budget_from_gpu_hours() -> None:
    assert budget_from_gpu_hours(1000, 4e14) == pytest.approx(1.44e21)
    with pytest.raises(ValueError):
        budget_from_gpu_hours(0, 4e14)


def test_load_presets(tmp_path: Path) -> None:
    (tmp_path / "s1.yaml").write_text("name: s1\ndim: 384\nn_layers: 4\nn_heads: 6\n")
    (tmp_path / "s2.yaml").write_text("defaults:\n  - _self_\nname: s2\ndim: 512\n")
    loaded = load_presets(tmp_path)
    assert sorted(loaded) == ["s1", "s2"]
    assert isinstance(loaded["s1"], ModelConfig)
    assert (loaded["s1"].dim, loaded["s1"].n_heads, loaded["s2"].n_layers) == (384, 6, 6)


# ----------------------------------------------------------------------------- grid


def test_isoflop_grid_invariants() -> None:
    from pretrain.models.llama import count_params, flops_per_token

    seq_len, batch, min_steps = 256, 32, 50
    budgets = [1e15, 1e16, 1e17]
    entries = isoflop_grid(budgets, presets(), seq_len=seq_len, global_batch_size=batch,
                           min_steps=min_steps, tokens_per_param=(1.0, 1000.0))
    assert {e["budget"] for e in entries} <= set(budgets) and entries
    for e in entries:
        cfg = presets()[e["model"]]
        step_tokens = batch * seq_len
        assert e["steps"] >= min_steps and e["tokens"] == e["steps"] * step_tokens
        spent = e["tokens"] * flops_per_token(cfg, seq_len)
        assert abs(spent - e["budget"]) <= 0.5 * step_tokens * flops_per_token(cfg, seq_len)
        assert 1.0 <= e["tokens"] / count_params(cfg, exclude_embeddings=True) <= 1000.0
    # Exactly the presets that pass both filters, computed independently of the grid code.
    expected = set()
    for c in budgets:
        for name, cfg in presets().items():
            tokens = c / flops_per_token(cfg, seq_len)
            ratio = tokens / count_params(cfg, exclude_embeddings=True)
            if tokens / (batch * seq_len) >= min_steps + 0.5 and 1.0 < ratio < 1000.0:
                expected.add((c, name))
    assert {(e["budget"], e["model"]) for e in entries} == expected
    by_budget = [[e["params"] for e in entries if e["budget"] == c] for c in budgets]
    assert all(row == sorted(row) for row in by_budget)


def test_isoflop_grid_max_sizes_keeps_those_nearest_20_tokens_per_param() -> None:
    entries = isoflop_grid([1e16], presets(), seq_len=256, global_batch_size=8, min_steps=1,
                           tokens_per_param=(1e-3, 1e6), max_sizes=1)
    all_entries = isoflop_grid([1e16], presets(), seq_len=256, global_batch_size=8, min_steps=1,
                               tokens_per_param=(1e-3, 1e6))
    best = min(all_entries, key=lambda e: abs(math.log(e["tokens_per_param"] / 20)))
    assert [e["model"] for e in entries] == [best["model"]]


def test_format_overrides() -> None:
    entries = [{"budget": 1e15, "model": "s1", "tokens": 1_000_000, "steps": 10}]
    assert format_overrides(entries) == ["model=s1 tokens=1000000"]
