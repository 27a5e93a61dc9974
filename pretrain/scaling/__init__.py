"""Scaling studies: IsoFLOP sweep grids, collecting a sweep's runs, law fitting, plots.

`pretrain.scaling.plots` is imported on its own, so that fitting does not pull in matplotlib.
"""

from pretrain.scaling.collect import RunResult, SkippedRun, collect_runs
from pretrain.scaling.fit import (
    BudgetMinimum,
    IsoFlopFit,
    ParametricFit,
    PowerLaw,
    Recommendation,
    ScalingFitError,
    budget_from_gpu_hours,
    fit_isoflop,
    fit_parametric,
    group_by_budget,
    load_presets,
    recommend,
)
from pretrain.scaling.grid import format_overrides, isoflop_grid

__all__ = [
    "BudgetMinimum",
    "IsoFlopFit",
    "ParametricFit",
    "PowerLaw",
    "Recommendation",
    "RunResult",
    "ScalingFitError",
    "SkippedRun",
    "budget_from_gpu_hours",
    "collect_runs",
    "fit_isoflop",
    "fit_parametric",
    "format_overrides",
    "group_by_budget",
    "isoflop_grid",
    "load_presets",
    "recommend",
]
