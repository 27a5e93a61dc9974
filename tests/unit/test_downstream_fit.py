"""Downstream scaling (Llama 3's two steps): a synthetic sweep whose metric follows a known
sigmoid of a known loss law; the fit recovers the link's parameters and predicts the metric at
the recommended budget; `pretrain-fit-scaling --downstream` prints, plots and records it."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pretrain.scaling.collect import collect_runs
from pretrain.scaling.downstream import fit_downstream, predict_at, sigmoid_link
from pretrain.scaling.fit import ScalingFitError, fit_parametric, recommend
from tests.unit.test_scaling_collect import PNG_MAGIC, make_run, summary, synthetic_sweep
from tests.unit.test_scaling_fit import A_TRUE, G_TRUE, synthetic_runs, true_loss
from tools.fit_scaling import main

LINK = dict(lo=0.25, hi=0.80, k=3.0, l0=2.7)
METRIC = "eval/hellaswag/acc_norm"


def with_metric(runs: list, noise: float = 0.002, seed: int = 1) -> list:
    """Each run's final_eval: its loss and the metric the link gives it (plus noise)."""
    rng = np.random.default_rng(seed)
    return [replace(r, final_eval={"val/loss": r.loss,
                                   METRIC: sigmoid_link(r.loss, **LINK) + rng.normal(0, noise)})
            for r in runs]


def test_the_link_is_recovered_and_predicts_at_the_budget() -> None:
    runs = with_metric(synthetic_runs())
    fit = fit_downstream(runs, METRIC)
    assert fit.lo == pytest.approx(LINK["lo"], abs=0.03)
    assert fit.hi == pytest.approx(LINK["hi"], abs=0.03)
    assert fit.k == pytest.approx(LINK["k"], rel=0.15)
    assert fit.l0 == pytest.approx(LINK["l0"], abs=0.05)
    assert fit.rmse < 0.004 and len(fit.points) == len(runs) and not fit.skipped
    # Step 1 + 2 at 1e22 FLOPs against the truth: the true law's compute-optimal loss (C = 6ND)
    rec = recommend(fit_parametric(runs, bootstrap=0, seed=0), 1e22)
    pred = predict_at(fit, rec.budget_flops, rec.loss_opt)
    n = G_TRUE * (1e22 / 6) ** A_TRUE
    truth = sigmoid_link(true_loss(n, 1e22 / (6 * n)), **LINK)
    assert pred.value == pytest.approx(truth, abs=0.01), (pred, truth)
    assert pred.value > max(p.value for p in fit.points)  # beyond the sweep: extrapolated


def test_runs_without_the_metric_are_left_out_and_too_few_refused() -> None:
    runs = with_metric(synthetic_runs())
    runs[0] = replace(runs[0], final_eval={"val/loss": 3.0})
    runs[1] = replace(runs[1], final_eval={METRIC: math.nan})
    fit = fit_downstream(runs, METRIC)
    assert len(fit.points) == len(runs) - 2 and len(fit.skipped) == 2
    assert "no finite final_eval['eval/hellaswag/acc_norm']" in fit.skipped[0]
    with pytest.raises(ScalingFitError, match=r"4 runs report .*at least 5.*evals.tasks"):
        fit_downstream(runs[:6], METRIC)


def sweep_with_metric(root: Path) -> None:
    synthetic_sweep(root)  # jobs 0..19 and a failed one; add the metric to each summary
    rng = np.random.default_rng(3)
    for path in sorted(root.glob("*/summary.json")):
        data = json.loads(path.read_text())
        if data["status"] == "completed":
            loss = data["final_val_loss"]
            data["final_eval"] = {"val/loss": loss, "val/ppl": math.exp(loss),
                                  METRIC: sigmoid_link(loss, **LINK) + rng.normal(0, 0.002)}
            path.write_text(json.dumps(data))
    make_run(root, "no_metric", summary(run_name="no_metric", final_eval={"val/loss": 3.2}))


def test_the_tool_fits_plots_and_predicts(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tmp_path / "sweep"
    sweep_with_metric(sweep)
    runs, _ = collect_runs(sweep)
    assert {METRIC, "val/loss", "val/ppl"} <= set(runs[0].final_eval)  # collected
    out = tmp_path / "out"
    rc = main([str(sweep), "--budget", "1e22", "--bootstrap", "0", "--out", str(out),
               "--conf-dir", str(tmp_path / "none"), "--downstream", METRIC,
               "--downstream", "eval/piqa/acc"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    record = json.loads((out / "fit.json").read_text())
    (hella, piqa) = record["downstream"]
    assert piqa["fit"] is None and "0 runs report final_eval['eval/piqa/acc']" in piqa["error"]
    fit, pred = hella["fit"], hella["prediction"]
    assert fit["k"] == pytest.approx(LINK["k"], rel=0.15)
    assert fit["l0"] == pytest.approx(LINK["l0"], abs=0.05)
    assert len(fit["points"]) == 20 and fit["skipped"][0].startswith("no_metric:")
    rec = record["recommendation"]
    assert pred["budget_flops"] == 1e22 and pred["loss"] == pytest.approx(rec["loss_opt"])
    assert pred["value"] == pytest.approx(sigmoid_link(rec["loss_opt"], fit["lo"], fit["hi"],
                                                       fit["k"], fit["l0"]))
    assert (f"compute-optimal loss {pred['loss']:.4f} -> predicted {METRIC} = "
            f"{pred['value']:.4f}") in printed
    png = out / "downstream_eval_hellaswag_acc_norm.png"
    assert png.name in record["plots"] and png.read_bytes()[:8] == PNG_MAGIC
    assert "downstream eval/piqa/acc: not fitted" in printed
