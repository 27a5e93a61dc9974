"""Fit scaling laws to a finished sweep and say what to train with a compute budget.

    python -m tools.fit_scaling multirun/2025-01-01/12-00-00 --budget 1e21
    python -m tools.fit_scaling SWEEP_DIR --gpu-hours 1000 --flops-per-sec 4e14
    python -m tools.fit_scaling SWEEP_DIR --budget 1e21 --downstream eval/hellaswag/acc_norm

Collects every run's summary.json under SWEEP_DIR (reporting the runs it skips and why), fits
Approach 2 (IsoFLOP minima) and Approach 3 (parametric L(N, D)) of Hoffmann et al. 2022, writes
fit.json and the plots to --out, and prints the compute-optimal model as Hydra overrides. Each
--downstream METRIC (a key of the runs' final_eval) is also fitted against compute through the
loss with Llama 3's sigmoid link (`pretrain.scaling.downstream`), plotted, and predicted at the
budget.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from launch.common import config_dir
from pretrain.scaling.collect import RunResult, SkippedRun, collect_runs
from pretrain.scaling.downstream import (
    DownstreamFit,
    DownstreamPrediction,
    fit_downstream,
    predict_at,
)
from pretrain.scaling.fit import (
    MIN_BUDGETS,
    MIN_RUNS_PARAMETRIC,
    MIN_SIZES_PER_BUDGET,
    IsoFlopFit,
    ParametricFit,
    Recommendation,
    ScalingFitError,
    budget_from_gpu_hours,
    fit_isoflop,
    fit_parametric,
    load_presets,
    recommend,
)

DEFAULT_CONF_DIR = Path(config_dir()) / "model"
FIT_SCHEMA_VERSION = 1


class UsageError(Exception):
    """A user error; main prints it as one line and exits 2."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", type=Path, help="sweep directory to collect")
    p.add_argument("--budget", type=float, help="compute budget in FLOPs, e.g. 1e21")
    p.add_argument("--gpu-hours", type=float, help="budget as GPU-hours (with --flops-per-sec)")
    p.add_argument("--flops-per-sec", type=float,
                   help="achieved FLOP/s per GPU (peak × MFU), with --gpu-hours")
    p.add_argument("--out", type=Path, help="output directory (default: SWEEP_DIR/scaling)")
    p.add_argument("--bootstrap", type=int, default=100,
                   help="bootstrap resamples for confidence intervals (0: none; default 100)")
    p.add_argument("--use-all-params", action="store_true",
                   help="N counts all parameters (default: non-embedding parameters)")
    p.add_argument("--conf-dir", type=Path, default=DEFAULT_CONF_DIR,
                   help="model presets to recommend from (default: conf/model)")
    p.add_argument("--seq-len", type=int,
                   help="sequence length of the recommended run (default: the sweep's)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--downstream", action="append", default=[], metavar="METRIC",
                   help="also fit this final_eval metric against compute through the loss "
                        "(Llama 3's sigmoid link), e.g. eval/hellaswag/acc_norm; repeatable")
    return p.parse_args(argv)


def resolve_budget(args: argparse.Namespace) -> float | None:
    """FLOPs from --budget or --gpu-hours × --flops-per-sec; None when neither is given."""
    hours_given = args.gpu_hours is not None or args.flops_per_sec is not None
    if args.budget is not None and hours_given:
        raise UsageError("give either --budget or --gpu-hours with --flops-per-sec, not both")
    if hours_given:
        if args.gpu_hours is None or args.flops_per_sec is None:
            raise UsageError("--gpu-hours and --flops-per-sec go together; give both")
        return budget_from_gpu_hours(args.gpu_hours, args.flops_per_sec)
    if args.budget is not None and not args.budget > 0:
        raise UsageError(f"--budget must be a positive number of FLOPs, got {args.budget}")
    return args.budget


def collect(args: argparse.Namespace) -> tuple[list[RunResult], list[SkippedRun]]:
    """(usable, skipped) runs, after printing the skipped; UsageError when too few remain."""
    try:
        runs, skipped = collect_runs(args.sweep_dir, use_all_params=args.use_all_params)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from err
    print_skipped(skipped)
    if len(runs) < MIN_RUNS_PARAMETRIC:
        raise UsageError(
            f"{len(runs)} usable runs in {args.sweep_dir}; fitting needs at least "
            f"{MIN_RUNS_PARAMETRIC} (Approach 3 has 5 parameters), and Approach 2 needs "
            f"{MIN_SIZES_PER_BUDGET} model sizes at each of {MIN_BUDGETS} or more FLOP budgets")
    print(f"using {len(runs)} runs ({runs[0].params_kind} parameters)")
    return runs, skipped


def print_skipped(skipped: Sequence[SkippedRun]) -> None:
    for s in skipped:
        print(f"skipped {s.path}: {s.reason}")


@dataclass(frozen=True)
class Fits:
    """Both approaches' results; Approach 2 may be impossible (too few sizes per budget)."""

    isoflop: IsoFlopFit | None
    isoflop_error: str | None
    """Why Approach 2 was not fitted, when it was not."""
    parametric: ParametricFit


def fit_both(runs: Sequence[RunResult], bootstrap: int, seed: int) -> Fits:
    try:
        isoflop, isoflop_error = fit_isoflop(runs, bootstrap=bootstrap, seed=seed), None
    except ScalingFitError as err:
        isoflop, isoflop_error = None, str(err)
    return Fits(isoflop, isoflop_error, fit_parametric(runs, bootstrap=bootstrap, seed=seed))


def _interval(ci: tuple[float, float] | None) -> str:
    return f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci and all(map(math.isfinite, ci)) else ""


def print_isoflop(fit: IsoFlopFit | None, error: str | None) -> None:
    if fit is None:
        print(f"Approach 2 (IsoFLOP): not fitted: {error}")
        return
    print(f"Approach 2 (IsoFLOP), {len(fit.minima)} budgets:")
    for m in fit.minima:
        where = "" if m.interior else "  (outside the sampled sizes: extrapolated)"
        print(f"  C={m.budget:.3g}: N_opt={m.n_opt:.4g} D_opt={m.d_opt:.4g} "
              f"L_min={m.loss_min:.4f}{where}")
    for line in fit.skipped_budgets:
        print(f"  skipped {line}")
    for sym, law in (("N_opt", fit.n_opt), ("D_opt", fit.d_opt)):
        print(f"  {sym} = {law.coefficient:.4g} * C^{law.exponent:.4f} "
              f"(± {law.exponent_se:.4f} s.e.){_interval(law.exponent_ci)}")


def print_parametric(fit: ParametricFit) -> None:
    print(f"Approach 3 (L = E + A/N^alpha + B/D^beta), {fit.n_runs} runs, "
          f"C = {fit.flops_per_param_token:.3g}·N·D:")
    for name in ("E", "A", "B", "alpha", "beta", "a", "b", "G"):
        print(f"  {name:5s} = {getattr(fit, name):.4g}{_interval(fit.ci.get(name))}")
    if fit.ci:
        print(f"  (95% bootstrap intervals over {fit.n_bootstrap} resamples)")


def print_recommendation(rec: Recommendation) -> None:
    loss = f", predicted loss {rec.loss_opt:.4f}" if rec.loss_opt is not None else ""
    print(f"budget {rec.budget_flops:.3g} FLOPs: N_opt = {rec.n_opt:.4g} parameters, "
          f"D_opt = {rec.d_opt:.4g} tokens{loss}")
    if rec.override is None:
        print("no model presets found to recommend from (see --conf-dir)")
        return
    loss = f", predicted loss {rec.preset_loss:.4f}" if rec.preset_loss is not None else ""
    print(f"closest preset: {rec.preset} ({rec.preset_params:.4g} parameters) on "
          f"{rec.preset_tokens:.4g} tokens{loss}")
    print(f"run: {rec.override}")


def _jsonable(value: Any) -> Any:
    """Plain JSON: paths as strings, tuples as lists, NaN/inf as null (strict parsers)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def fit_record(
    sweep_dir: Path, runs: Sequence[RunResult], skipped: Sequence[SkippedRun], fits: Fits,
    rec: Recommendation | None, plots: Sequence[Path],
    downstream: Sequence[Downstream] = (),
) -> dict[str, Any]:
    """The content of fit.json.

    {version, sweep_dir, params_kind, flops_per_param_token,
     runs: [RunResult fields], skipped: [{path, reason}],
     isoflop: {minima: [BudgetMinimum fields], n_opt: PowerLaw, d_opt: PowerLaw, a, b,
               params_kind, skipped_budgets, n_bootstrap} | null,
     isoflop_error: str | null,
     parametric: {E, A, B, alpha, beta, a, b, G, objective, n_runs, flops_per_param_token,
                  params_kind, huber_delta, n_bootstrap, ci: {name: [lo, hi]}},
     recommendation: Recommendation fields | null, plots: [file names],
     downstream: [{metric, error: str | null, fit: {metric, lo, hi, k, l0, rmse,
                   points: [{name, flops, loss, value}], skipped} | null,
                   prediction: {metric, budget_flops, loss, value, preset_loss,
                                preset_value} | null}]}
    PowerLaw is {exponent, coefficient, exponent_se, log_coefficient_se, exponent_ci}.
    """
    isoflop, parametric = fits.isoflop, fits.parametric
    iso = None
    if isoflop is not None:
        iso = {**asdict(isoflop), "a": isoflop.a, "b": isoflop.b}
    derived = {"a": parametric.a, "b": parametric.b, "G": parametric.G}
    return _jsonable({
        "version": FIT_SCHEMA_VERSION,
        "sweep_dir": sweep_dir,
        "params_kind": parametric.params_kind,
        "flops_per_param_token": parametric.flops_per_param_token,
        "runs": [asdict(r) for r in runs],
        "skipped": [asdict(s) for s in skipped],
        "isoflop": iso,
        "isoflop_error": fits.isoflop_error,
        "parametric": {**asdict(parametric), **derived},
        "recommendation": asdict(rec) if rec else None,
        "plots": [p.name for p in plots],
        "downstream": [{"metric": d.metric, "error": d.error,
                        "fit": asdict(d.fit) if d.fit else None,
                        "prediction": asdict(d.prediction) if d.prediction else None}
                       for d in downstream],
    })


@dataclass(frozen=True)
class Downstream:
    """One --downstream metric: its link fit and prediction, or why there is none."""

    metric: str
    fit: DownstreamFit | None
    prediction: DownstreamPrediction | None
    error: str | None = None


def fit_downstreams(metrics: Sequence[str], runs: Sequence[RunResult],
                    rec: Recommendation | None) -> list[Downstream]:
    out = []
    for metric in metrics:
        try:
            fit = fit_downstream(runs, metric)
        except ScalingFitError as err:
            out.append(Downstream(metric, None, None, str(err)))
            continue
        pred = (predict_at(fit, rec.budget_flops, rec.loss_opt, rec.preset_loss)
                if rec is not None and rec.loss_opt is not None else None)
        out.append(Downstream(metric, fit, pred))
    return out


def print_downstream(d: Downstream) -> None:
    if d.fit is None:
        print(f"downstream {d.metric}: not fitted: {d.error}")
        return
    f = d.fit
    print(f"downstream {d.metric} = lo + (hi - lo) / (1 + exp(k (L - L0))), "
          f"{len(f.points)} runs (Llama 3's sigmoid link):")
    print(f"  lo = {f.lo:.4g}, hi = {f.hi:.4g}, k = {f.k:.4g}, L0 = {f.l0:.4g} "
          f"(rmse {f.rmse:.3g})")
    for line in f.skipped:
        print(f"  skipped {line}")
    p = d.prediction
    if p is not None:
        print(f"  at the recommended budget {p.budget_flops:.3g} FLOPs: compute-optimal loss "
              f"{p.loss:.4f} -> predicted {d.metric} = {p.value:.4f}")
        if p.preset_value is not None:
            print(f"  the recommended preset (predicted loss {p.preset_loss:.4f}): "
                  f"{d.metric} = {p.preset_value:.4f}")


def _sweep_seq_len(runs: Sequence[RunResult]) -> int:
    lengths = Counter(r.seq_len for r in runs if r.seq_len)
    return lengths.most_common(1)[0][0] if lengths else 2048


def run(args: argparse.Namespace) -> None:
    # matplotlib only once there is work to draw
    from pretrain.scaling.plots import plot_all, plot_downstream

    budget = resolve_budget(args)
    runs, skipped = collect(args)
    fits = fit_both(runs, args.bootstrap, args.seed)
    print_isoflop(fits.isoflop, fits.isoflop_error)
    print_parametric(fits.parametric)
    rec = None
    if budget is not None:
        presets = load_presets(args.conf_dir) if args.conf_dir.is_dir() else {}
        rec = recommend(fits.parametric, budget, presets, args.seq_len or _sweep_seq_len(runs))
    out = args.out or args.sweep_dir / "scaling"
    plots = plot_all(runs, fits.isoflop, fits.parametric, out, [budget] if budget else [])
    downstream = fit_downstreams(args.downstream, runs, rec)
    for d in downstream:
        if d.fit is not None:
            name = "downstream_" + "".join(ch if ch.isalnum() else "_" for ch in d.metric)
            plots.append(plot_downstream(d.fit, fits.parametric, out / f"{name}.png",
                                         d.prediction))
    record = fit_record(args.sweep_dir, runs, skipped, fits, rec, plots, downstream)
    (out / "fit.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out / 'fit.json'} and {', '.join(p.name for p in plots)}")
    if rec is None:
        print("pass --budget FLOPS (or --gpu-hours H --flops-per-sec F) for a recommendation")
    else:
        print_recommendation(rec)
        if fits.isoflop is not None:
            n2, d2 = fits.isoflop.optimal(rec.budget_flops)
            print(f"(Approach 2 at this budget: N_opt = {n2:.4g}, D_opt = {d2:.4g})")
    for d in downstream:
        print_downstream(d)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `pretrain-fit-scaling`; returns the exit status."""
    args = parse_args(argv)
    try:
        run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
