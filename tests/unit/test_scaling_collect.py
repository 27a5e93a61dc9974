"""Collecting a sweep directory, and the fit_scaling tool end to end on a synthetic sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pretrain.scaling.collect import collect_runs
from tools.fit_scaling import main

# Chinchilla's law (Hoffmann et al. 2022, eq. 10) generates the synthetic sweep's losses.
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def summary(**overrides: Any) -> dict[str, Any]:
    base = {
        "run_name": "run", "model": "s1", "params": 2_000_000, "non_embedding_params": 1_000_000,
        "tokens": 20_000_000, "flops": 1.2e14, "steps": 100, "final_train_loss": 3.1,
        "final_val_loss": 3.2, "best_val_loss": 3.15, "wall_time_s": 10.0,
        "tokens_per_sec": 2e6, "status": "completed", "seq_len": 256,
        "sweep": {"budget": 1.2e14, "model": "s1"},
    }
    return {**base, **overrides}


def make_run(root: Path, name: str, data: dict[str, Any] | str | None) -> Path:
    """A Hydra job directory: .hydra/config.yaml, plus summary.json unless `data` is None."""
    run_dir = root / name
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("model:\n  name: s1\n")
    if data is not None:
        text = data if isinstance(data, str) else json.dumps(data)
        (run_dir / "summary.json").write_text(text)
    return run_dir


def synthetic_sweep(root: Path, budgets: tuple[float, ...] = (1e18, 1e19, 1e20, 1e21),
                    sizes: int = 5, seed: int = 0) -> None:
    """Runs on an IsoFLOP grid (C = 6ND) with 0.5% multiplicative noise, one failed run."""
    rng = np.random.default_rng(seed)
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    job = 0
    for c in budgets:
        n_opt = g * (c / 6) ** (BETA / (ALPHA + BETA))
        for n in n_opt * np.geomspace(1 / 6, 6, sizes):
            d = c / (6 * n)
            loss = (E + A / n**ALPHA + B / d**BETA) * math.exp(rng.normal(0, 0.005))
            make_run(root, str(job), summary(
                run_name=f"job{job}", non_embedding_params=int(n), params=int(n) + 10_000_000,
                tokens=int(d), flops=c, best_val_loss=loss, final_val_loss=loss,
                sweep={"budget": c}))
            job += 1
    make_run(root, str(job), summary(status="failed"))


# ----------------------------------------------------------------------------- collect_runs


def test_collect_keeps_good_runs_and_explains_the_rest(tmp_path: Path) -> None:
    make_run(tmp_path, "0", summary(run_name="good"))
    make_run(tmp_path, "1", summary(run_name="fallback", best_val_loss=None))
    make_run(tmp_path, "2", summary(status="failed"))
    make_run(tmp_path, "3", None)
    make_run(tmp_path, "4", summary(final_val_loss=float("nan")))
    make_run(tmp_path, "5", '{"status": "completed", "params": ')
    make_run(tmp_path, "6", summary(status="running"))
    make_run(tmp_path, "7", summary(non_embedding_params=0))
    # A job whose run directory is nested below it finished: not reported as missing.
    nested = make_run(tmp_path, "8", None) / "runs" / "deep"
    nested.mkdir(parents=True)
    (nested / "summary.json").write_text(json.dumps(summary(run_name="nested")))

    runs, skipped = collect_runs(tmp_path)

    assert [r.name for r in runs] == ["good", "fallback", "nested"]
    assert runs[0].loss == 3.15 and runs[1].loss == 3.2  # best, else final
    assert runs[0].params == 1_000_000 and runs[0].params_kind == "non_embedding"
    assert (runs[0].tokens, runs[0].flops, runs[0].budget) == (20_000_000, 1.2e14, 1.2e14)
    assert runs[2].path == nested
    reasons = {s.path.name: s.reason for s in skipped}
    assert set(reasons) == {"2", "3", "4", "5", "6", "7"}
    assert "status 'failed'" in reasons["2"]
    assert "no summary.json" in reasons["3"]
    assert "non-finite loss" in reasons["4"] and "final_val_loss" in reasons["4"]
    assert "unreadable summary.json" in reasons["5"]
    assert "status 'running'" in reasons["6"]
    assert "non_embedding_params" in reasons["7"]


def test_collect_all_params_option(tmp_path: Path) -> None:
    make_run(tmp_path, "a/0", summary())
    runs, _ = collect_runs(tmp_path, use_all_params=True)
    assert runs[0].params == 2_000_000 and runs[0].params_kind == "all"


def test_collect_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect_runs(tmp_path / "nope")


# ----------------------------------------------------------------------------- the tool


def write_presets(conf_dir: Path) -> None:
    conf_dir.mkdir()
    (conf_dir / "s1.yaml").write_text("name: s1\ndim: 256\nn_layers: 4\nn_heads: 4\n")
    (conf_dir / "s2.yaml").write_text("name: s2\ndim: 1024\nn_layers: 16\nn_heads: 16\n")
    (conf_dir / "s3.yaml").write_text("name: s3\ndim: 4096\nn_layers: 32\nn_heads: 32\n")


def test_fit_scaling_tool_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pretrain.config import ModelConfig
    from pretrain.models.llama import count_params, flops_per_token

    sweep = tmp_path / "sweep"
    synthetic_sweep(sweep)
    write_presets(tmp_path / "model")
    out = tmp_path / "out"

    rc = main([str(sweep), "--budget", "1e22", "--bootstrap", "10", "--out", str(out),
               "--conf-dir", str(tmp_path / "model")])

    printed = capsys.readouterr().out
    assert rc == 0
    assert "skipped" in printed and "status 'failed'" in printed
    record = json.loads((out / "fit.json").read_text())
    assert record["parametric"]["alpha"] == pytest.approx(ALPHA, abs=0.05)
    assert record["isoflop"]["a"] == pytest.approx(BETA / (ALPHA + BETA), abs=0.05)
    assert len(record["runs"]) == 20 and len(record["skipped"]) == 1
    assert set(record["parametric"]["ci"]) >= {"alpha", "beta", "a", "b"}
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3 and sorted(record["plots"]) == [p.name for p in pngs]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)
    # N_opt(1e22) ≈ 8e9 non-embedding parameters: s3 (~6.5e9) is closest; s2 has ~2e8.
    rec = record["recommendation"]
    s3 = ModelConfig(name="s3", dim=4096, n_layers=32, n_heads=32)
    assert rec["preset"] == "s3"
    assert rec["preset_params"] == count_params(s3, exclude_embeddings=True)
    assert rec["preset_tokens"] == int(1e22 // flops_per_token(s3, 256))
    assert f"run: model=s3 tokens={rec['preset_tokens']}" in printed


def test_fit_scaling_tool_gpu_hours_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "sweep"
    synthetic_sweep(sweep, budgets=(1e18, 1e19), sizes=3)
    rc = main([str(sweep), "--gpu-hours", "100", "--flops-per-sec", "1e14", "--bootstrap", "0",
               "--conf-dir", str(tmp_path / "none")])
    assert rc == 0
    record = json.loads((sweep / "scaling" / "fit.json").read_text())
    assert record["recommendation"]["budget_flops"] == pytest.approx(3.6e19)
    assert record["recommendation"]["override"] is None
    assert "no model presets" in capsys.readouterr().out


def test_fit_scaling_tool_too_few_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(4):
        make_run(tmp_path, str(i), summary(non_embedding_params=1_000_000 * (i + 1)))
    make_run(tmp_path, "4", summary(status="failed"))
    rc = main([str(tmp_path), "--budget", "1e20"])
    captured = capsys.readouterr()
    assert rc != 0
    assert "4 usable runs" in captured.err and "at least 6" in captured.err
    assert "status 'failed'" in captured.out
    assert not (tmp_path / "scaling").exists()


def test_fit_scaling_tool_budget_arguments_must_pair(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(tmp_path), "--gpu-hours", "10"]) == 2
    assert "--flops-per-sec" in capsys.readouterr().err
