"""Collect the `summary.json` of every run in a sweep directory.

A Hydra multirun leaves `SWEEP_DIR/<job_num>/` per job; other layouts nest run directories
deeper, so the walk is recursive and keys off the files alone: every `summary.json` is a run,
and every `.hydra/config.yaml` with no `summary.json` at or below its directory is a run that
never finished (a job refused or crashed before its start was accepted writes no
`.hydra/config.yaml`: it is not listed, and its error is in the sweep's output). Only
completed runs with finite losses (non-finite ones are written as strings, "nan") are kept;
everything else comes back as a `SkippedRun` with the reason, so the user sees exactly what the
fit left out.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUMMARY_FILE = "summary.json"
_LOSS_KEYS = ("final_train_loss", "final_val_loss", "best_val_loss")


@dataclass(frozen=True)
class RunResult:
    """One usable run: a point (N, D, C, L) of the scaling study."""

    name: str
    """`run_name` from the summary, else the run directory's name."""
    path: Path
    """The run directory (the one holding `summary.json`)."""
    params: float
    """N: non-embedding parameters by default, all parameters with `use_all_params`."""
    tokens: float
    """D: tokens trained on."""
    flops: float
    """C: total training FLOPs as the run counted them (flops_per_token * tokens)."""
    loss: float
    """L: `best_val_loss`, or `final_val_loss` where the summary has no best."""
    params_kind: str = "non_embedding"
    """What `params` counts: 'non_embedding' or 'all'."""
    budget: float | None = None
    """The sweep's nominal FLOP budget (`sweep["budget"]`), when the sweep set one."""
    model: str | None = None
    """Model preset name."""
    seq_len: int | None = None
    """Training sequence length."""
    final_eval: dict[str, float] = field(default_factory=dict)
    """The last evaluation's numeric metrics (`val/loss`, `eval/<task>/acc_norm`, ...), for
    fits of downstream metrics (`pretrain.scaling.downstream`); non-finite ones as NaN."""


@dataclass(frozen=True)
class SkippedRun:
    """A run directory the fit cannot use, and why."""

    path: Path
    reason: str


def collect_runs(
    sweep_dir: str | os.PathLike[str], *, use_all_params: bool = False
) -> tuple[list[RunResult], list[SkippedRun]]:
    """Walk `sweep_dir` recursively; return (usable runs, skipped runs), both sorted by path.

    Raises FileNotFoundError when `sweep_dir` is not a directory, so a typo is not mistaken for
    an empty sweep.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep directory {root} does not exist or is not a directory")
    summaries, hydra_dirs = _find_run_files(root)
    runs: list[RunResult] = []
    skipped: list[SkippedRun] = []
    for summary in summaries:
        result = load_run(summary, use_all_params=use_all_params)
        (runs if isinstance(result, RunResult) else skipped).append(result)
    summary_dirs = [s.parent for s in summaries]
    for run_dir in hydra_dirs:
        # A job directory whose summary lives deeper (run_dir/runs/<name>/) did finish.
        if not any(d == run_dir or run_dir in d.parents for d in summary_dirs):
            skipped.append(SkippedRun(run_dir, "no summary.json (only .hydra/config.yaml): the "
                                               "run crashed or has not finished"))
    skipped.sort(key=lambda s: str(s.path))
    return runs, skipped


def _find_run_files(root: Path) -> tuple[list[Path], list[Path]]:
    """All summary files, and all directories holding `.hydra/config.yaml`, under `root`."""
    summaries: list[Path] = []
    hydra_dirs: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if SUMMARY_FILE in filenames:
            summaries.append(here / SUMMARY_FILE)
        if ".hydra" in dirnames and (here / ".hydra" / "config.yaml").is_file():
            hydra_dirs.append(here)
        dirnames.sort()
    return sorted(summaries, key=str), sorted(hydra_dirs, key=str)


def load_run(summary_path: Path, *, use_all_params: bool = False) -> RunResult | SkippedRun:
    """Parse one `summary.json` into a `RunResult`, or say why it cannot be used."""
    run_dir = summary_path.parent
    try:
        data = json.loads(summary_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return SkippedRun(run_dir, f"unreadable summary.json: {err}")
    if not isinstance(data, dict):
        return SkippedRun(run_dir, "unreadable summary.json: not a JSON object")
    reason = _rejection_reason(data, use_all_params)
    if reason is not None:
        return SkippedRun(run_dir, reason)
    return _to_result(data, run_dir, use_all_params)


def _rejection_reason(data: dict[str, Any], use_all_params: bool) -> str | None:
    """Why a parsed summary is unusable, or None when it is usable."""
    status = data.get("status")
    if status != "completed":
        return f"status {status!r} (only 'completed' runs are fitted)"
    # A run that diverged anywhere is excluded even if an earlier best_val_loss is finite: its
    # budget was not spent on learning, so it is not a point on the loss surface.
    for key in _LOSS_KEYS:
        if key in data and data[key] is not None and not _is_finite(data[key]):
            return f"non-finite loss ({key}={data[key]!r})"
    if all(_as_float(data.get(k)) is None for k in ("best_val_loss", "final_val_loss")):
        return "no validation loss (best_val_loss and final_val_loss missing)"
    n_key = "params" if use_all_params else "non_embedding_params"
    for key in (n_key, "tokens", "flops"):
        value = _as_float(data.get(key))
        if value is None or not value > 0:
            return f"missing or non-positive {key!r} ({data.get(key)!r})"
    return None


def _to_result(data: dict[str, Any], run_dir: Path, use_all_params: bool) -> RunResult:
    best = _as_float(data.get("best_val_loss"))
    loss = best if best is not None else _as_float(data.get("final_val_loss"))
    sweep = data.get("sweep") if isinstance(data.get("sweep"), dict) else {}
    seq_len = data.get("seq_len")
    return RunResult(
        name=str(data.get("run_name") or run_dir.name),
        path=run_dir,
        params=float(data["params" if use_all_params else "non_embedding_params"]),
        tokens=float(data["tokens"]),
        flops=float(data["flops"]),
        loss=float(loss),  # type: ignore[arg-type]  # _rejection_reason guarantees one exists
        params_kind="all" if use_all_params else "non_embedding",
        budget=_as_float(sweep.get("budget")),
        model=data.get("model"),
        seq_len=int(seq_len) if isinstance(seq_len, (int, float)) else None,
        final_eval=_numbers(data.get("final_eval")),
    )


def _numbers(metrics: Any) -> dict[str, float]:
    """The entries of a summary's `final_eval` that read as numbers ("nan" included)."""
    if not isinstance(metrics, dict):
        return {}
    return {str(k): v for k, v in ((k, _as_float(x)) for k, x in metrics.items())
            if v is not None}


def _as_float(value: Any) -> float | None:
    """A float from a JSON number or numeric string; None for anything else (or bool)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _is_finite(value: Any) -> bool:
    number = _as_float(value)
    return number is not None and math.isfinite(number)
