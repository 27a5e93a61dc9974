"""Scaling sweeps end to end: the conf/sweep presets through the real Hydra multirun entry
(and through `pretrain-launch`), then tools/fit_scaling.py over the sweep directory."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from pretrain.config import OptimConfig
from pretrain.train.optim import lr_lambda
from tests.conftest import REPO, TINY, read_metrics, train_env

# The sweep chooses the models; everything else is the tiny fp32 setting of the other e2e tests
# (vocabulary 512 and the same corpus slice, so the session cache's tokenizer and shards serve).
SWEEP_TINY = [o for o in TINY if not o.startswith("model=")]
ISO_SIZES = ("sweep_s0", "sweep_s1", "sweep_s2")
# 20 to 160 steps of 512 tokens, depending on the size. At these budgets both IsoFLOP profiles
# are convex with their minimum between the sizes (at 4e9 the smallest size was still best).
ISO_BUDGETS = (8e9, 1.6e10)
GRID_SIZES = ("sweep_s0", "sweep_s1")
GRID_TOKENS = (5120, 10240, 20480)
TOKENS_PER_STEP = 8 * 64  # TINY's global_batch_size * seq_len


def _run(module: str, out: Path, cache_dir: Path, *overrides: str) -> Path:
    """A multirun of `python -m module` into out/multirun/<time>/; returns that directory."""
    cmd = [sys.executable, "-m", module, *SWEEP_TINY, *overrides, f"output_root={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env=train_env(cache_dir), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    (sweep_dir,) = (out / "multirun").iterdir()  # one sweep: no job started a sweep of its own
    return sweep_dir


def _fit(sweep_dir: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "tools/fit_scaling.py", str(sweep_dir), "--out", str(out),
           "--bootstrap", "0", *args]  # intervals are the unit tests' business
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@dataclass
class Job:
    dir: Path
    """The job's directory, <sweep dir>/<job number>."""
    summary: dict[str, Any]
    """Its summary.json."""
    cfg: dict[str, Any]
    """The resolved config the entry saved next to the run."""


def _jobs(sweep_dir: Path) -> list[Job]:
    """Every job of a multirun directory, in job order."""
    dirs = sorted((d for d in sweep_dir.iterdir() if d.name.isdigit()), key=lambda d: int(d.name))
    return [Job(d, json.loads((d / "summary.json").read_text()),
                OmegaConf.to_container(OmegaConf.load(d / "config.yaml"))) for d in dirs]


def _assert_pngs(out: Path, names: list[str]) -> None:
    for name in names:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.fixture(scope="module")
def isoflop_sweep(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("isoflop")
    return _run("launch.train", out, cache_dir, "+sweep=cpu_tiny", f"model={','.join(ISO_SIZES)}",
                f"flops_budget={','.join(map(str, ISO_BUDGETS))}")


def test_isoflop_preset_spends_each_budget_and_groups_the_runs(isoflop_sweep: Path) -> None:
    jobs = _jobs(isoflop_sweep)
    assert {(j.summary["model"], j.summary["sweep"]["budget"]) for j in jobs} == {
        (m, b) for m in ISO_SIZES for b in ISO_BUDGETS}
    for job in jobs:
        summary, budget = job.summary, job.cfg["flops_budget"]
        assert summary["status"] == "completed"
        assert summary["sweep"] == {"sweep": "cpu_tiny", "kind": "isoflop",
                                    "model": summary["model"], "budget": budget}
        assert summary["run_name"] == f"{summary['model']}-C{budget}"
        # Tokens spend the budget in whole steps: one more step would exceed it.
        steps = int(budget / summary["flops_per_token"] // TOKENS_PER_STEP)
        assert summary["steps"] == steps >= 10
        assert summary["tokens"] == steps * TOKENS_PER_STEP
        assert summary["flops"] <= budget < summary["flops"] * (steps + 1) / steps
        # The schedule spans exactly those steps: the last step ran at its final cosine value.
        optim = OptimConfig(**job.cfg["optim"])
        last_lr = [r["train/lr"] for r in read_metrics(job.dir) if "train/lr" in r][-1]
        assert math.isclose(last_lr, optim.lr * lr_lambda(optim, steps)(steps - 1), rel_tol=1e-6)
    # One W&B group for the sweep, named after the preset and the multirun directory's time.
    assert {j.cfg["logging"]["group"] for j in jobs} == {f"cpu_tiny-{isoflop_sweep.name}"}


def test_fit_of_isoflop_sweep_writes_fit_plots_and_recommendation(
    isoflop_sweep: Path, tmp_path: Path
) -> None:
    proc = _fit(isoflop_sweep, tmp_path, "--budget", "1e15")
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert len(fit["runs"]) == 6 and fit["skipped"] == []
    assert fit["parametric"]["n_runs"] == 6
    assert fit["parametric"]["alpha"] > 0 and fit["parametric"]["beta"] > 0
    # Approach 2 has its two budgets of three sizes; each budget's minimum is reported.
    assert fit["isoflop_error"] is None, fit["isoflop_error"]
    assert sorted(m["budget"] for m in fit["isoflop"]["minima"]) == pytest.approx(
        ISO_BUDGETS, rel=0.05)
    assert fit["isoflop"]["a"] == pytest.approx(fit["isoflop"]["n_opt"]["exponent"])
    _assert_pngs(tmp_path, fit["plots"])
    assert set(fit["plots"]) == {"isoflop_profiles.png", "optimal_allocation.png",
                                 "loss_contours.png"}
    rec = fit["recommendation"]
    assert rec["budget_flops"] == 1e15 and rec["n_opt"] > 0 and rec["d_opt"] > 0
    assert (REPO / "conf" / "model" / f"{rec['preset']}.yaml").is_file()
    assert f"run: model={rec['preset']} tokens={rec['preset_tokens']}" in proc.stdout


def test_fit_of_two_sizes_by_two_budgets_says_why_it_cannot(
    isoflop_sweep: Path, tmp_path: Path
) -> None:
    """2 sizes × 2 budgets: neither approach can fit (Approach 3 has 5 parameters, Approach 2
    needs 3 sizes per budget); the tool says so in one line and writes nothing."""
    subset = tmp_path / "subset"
    for job in _jobs(isoflop_sweep):
        if job.summary["model"] in ISO_SIZES[:2]:
            shutil.copytree(job.dir, subset / job.dir.name)
    proc = _fit(subset, tmp_path / "fit")
    assert proc.returncode == 2
    assert "4 usable runs" in proc.stderr and "at least 6" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "fit" / "fit.json").exists()


def test_grid_preset_trains_each_token_budget_and_fits_approach_3(
    cache_dir: Path, tmp_path: Path
) -> None:
    sweep_dir = _run("launch.train", tmp_path / "runs", cache_dir, "+sweep=grid",
                     f"model={','.join(GRID_SIZES)}", f"tokens={','.join(map(str, GRID_TOKENS))}")
    summaries = [j.summary for j in _jobs(sweep_dir)]
    assert {(s["model"], s["tokens"]) for s in summaries} == {
        (m, t) for m in GRID_SIZES for t in GRID_TOKENS}
    for s in summaries:
        assert s["steps"] == s["tokens"] // TOKENS_PER_STEP  # the token budgets are whole steps
        assert s["sweep"] == {"sweep": "grid", "kind": "grid", "model": s["model"],
                              "budget": None, "tokens": s["tokens"]}
        assert s["run_name"] == f"{s['model']}-D{s['tokens']}"
    proc = _fit(sweep_dir, tmp_path / "fit")
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    fit = json.loads((tmp_path / "fit" / "fit.json").read_text())
    # No FLOP budget is shared by three sizes: Approach 2 is skipped with its reason ...
    assert fit["isoflop"] is None and "Approach 2 needs" in fit["isoflop_error"]
    assert "Approach 2 (IsoFLOP): not fitted" in proc.stdout
    # ... and Approach 3 fits the six (N, D) points.
    assert fit["parametric"]["n_runs"] == 6
    assert "loss_contours.png" in fit["plots"]
    _assert_pngs(tmp_path / "fit", fit["plots"])


def test_sweep_preset_through_pretrain_launch(cache_dir: Path, tmp_path: Path) -> None:
    """`pretrain-launch +sweep=...`: each job's child is one run in the job's directory, not a
    sweep of its own (which `_run` would see as a second multirun directory), in the W&B group
    the launcher resolved: the child starts seconds later, so its own `${now:}` would differ."""
    sweep_dir = _run("launch.run", tmp_path, cache_dir, "+sweep=cpu_tiny", "model=sweep_s0",
                     f"flops_budget={ISO_BUDGETS[0]}", "launcher=local")
    (job,) = _jobs(sweep_dir)
    assert job.summary["status"] == "completed"
    assert job.summary["sweep"]["budget"] == ISO_BUDGETS[0]
    assert job.cfg["logging"]["group"] == f"cpu_tiny-{sweep_dir.name}"


@pytest.mark.parametrize(("objective", "arch"), [("mlm", "encoder"), ("span", "encoder_decoder")])
def test_objective_sweep_presets_train_their_family_and_fit(
    objective: str, arch: str, cache_dir: Path, tmp_path: Path
) -> None:
    """`+sweep=cpu_tiny_<objective>`: the ladder in the objective's family, each run spending
    its budget at the objective's FLOPs per token; the fit reads their validation losses."""
    sweep_dir = _run("launch.train", tmp_path / "runs", cache_dir, f"+sweep=cpu_tiny_{objective}",
                     f"model={','.join(ISO_SIZES)}",
                     f"flops_budget={','.join(map(str, ISO_BUDGETS))}")
    jobs = _jobs(sweep_dir)
    assert len(jobs) == len(ISO_SIZES) * len(ISO_BUDGETS)
    for job in jobs:
        s = job.summary
        assert (s["status"], s["objective"], s["arch"]) == ("completed", objective, arch)
        assert s["sweep"]["sweep"] == f"cpu_tiny_{objective}"
        assert s["flops"] <= job.cfg["flops_budget"] and s["final_val_loss"] is not None
        assert s["final_eval"]["val/loss"] == s["final_val_loss"]
    proc = _fit(sweep_dir, tmp_path / "fit", "--budget", "1e15")
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    fit = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert len(fit["runs"]) == 6 and fit["skipped"] == []
    assert fit["parametric"]["n_runs"] == 6
    assert fit["recommendation"]["n_opt"] > 0
