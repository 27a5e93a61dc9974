"""Crashes, preemption, non-finite steps and loss spikes, through the real entry point: every
recovery must reproduce the uninterrupted run exactly (CPU, fp32)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY, read_metrics, run_train, step_losses, train_env

STEPS = 16
COMMON = (f"steps={STEPS}", "ckpt_every=4", "ckpt_keep=0", "eval_every=0", "logging.log_every=1")


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from pretrain.train.consolidate import load_model_for_export

    return load_model_for_export(run_dir)[0]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def reference(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    run_train(cache_dir, out, "ref", *COMMON)
    return out / "ref"


def _kill_at_step(cache_dir: Path, out: Path, name: str, step: int) -> None:
    """Start a run and SIGKILL it once metrics.jsonl shows `step` (a crash between checkpoints)."""
    cmd = [sys.executable, "-m", "launch.train", *TINY, f"output_root={out}", f"run_name={name}",
           *COMMON]
    proc = subprocess.Popen(cmd, cwd=REPO, env=train_env(cache_dir), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = out / name / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and any(r["step"] >= step for r in read_metrics(out / name)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def test_two_kills_then_resume_equal_uninterrupted(cache_dir: Path, reference: Path,
                                                   tmp_path: Path) -> None:
    _kill_at_step(cache_dir, tmp_path, "killed", 6)
    _kill_at_step(cache_dir, tmp_path, "killed", 11)
    run_train(cache_dir, tmp_path, "killed", *COMMON)
    assert step_losses(tmp_path / "killed") == step_losses(reference)
    _assert_same_weights(tmp_path / "killed", reference)


def test_crash_while_writing_checkpoint(cache_dir: Path, reference: Path, tmp_path: Path) -> None:
    proc = run_train(cache_dir, tmp_path, "ckcrash", *COMMON,
                     "faults.crash_in_checkpoint_at_step=8", check=False)
    assert proc.returncode != 0
    ckpts = tmp_path / "ckcrash" / "checkpoints"
    assert (ckpts / "step_00000008.tmp").is_dir() and not (ckpts / "step_00000008").exists()
    proc = run_train(cache_dir, tmp_path, "ckcrash", *COMMON)
    assert "step_00000004" in proc.stdout
    assert step_losses(tmp_path / "ckcrash") == step_losses(reference)
    _assert_same_weights(tmp_path / "ckcrash", reference)


def test_sigterm_checkpoints_and_exits_zero(cache_dir: Path, reference: Path,
                                            tmp_path: Path) -> None:
    proc = run_train(cache_dir, tmp_path, "term", *COMMON, "faults.signal_at_step=6")
    summary = json.loads((tmp_path / "term" / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["steps"] == 6
    assert (tmp_path / "term" / "checkpoints" / "step_00000006").is_dir()
    proc = run_train(cache_dir, tmp_path, "term", *COMMON, "faults.signal_at_step=6")
    assert "step_00000006" in proc.stdout
    assert step_losses(tmp_path / "term") == step_losses(reference)
    _assert_same_weights(tmp_path / "term", reference)


def test_async_checkpoints_resume_like_sync(cache_dir: Path, reference: Path,
                                            tmp_path: Path) -> None:
    run_train(cache_dir, tmp_path, "async", *COMMON, "ckpt_async=true")
    _assert_same_weights(tmp_path / "async", reference)
    part = tmp_path / "async"
    import shutil

    for late in ("step_00000012", "step_00000016"):
        shutil.rmtree(part / "checkpoints" / late)
    (part / "checkpoints" / "latest.json").unlink()
    (part / "summary.json").unlink()
    run_train(cache_dir, tmp_path, "async", *COMMON, "ckpt_async=true")
    assert step_losses(part) == step_losses(reference)
    _assert_same_weights(part, reference)


def test_nan_step_is_skipped_without_touching_weights(cache_dir: Path, tmp_path: Path) -> None:
    run_train(cache_dir, tmp_path, "nan", "steps=6", "ckpt_every=1", "ckpt_keep=0",
              "eval_every=0", "logging.log_every=1", "nonfinite_policy=skip",
              "faults.nan_at_step=5")
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["status"] == "completed"
    from pretrain.train.consolidate import load_model_for_export

    before = load_model_for_export(tmp_path / "nan" / "checkpoints" / "step_00000004")[0]
    after = load_model_for_export(tmp_path / "nan" / "checkpoints" / "step_00000005")[0]
    for k in before:
        assert torch.equal(before[k], after[k]), k
    proc = run_train(cache_dir, tmp_path, "nan_halt", "steps=6", "faults.nan_at_step=3",
                     check=False)
    assert proc.returncode != 0 and "non-finite" in proc.stderr


def test_spike_rollback_reloads_and_skips_the_batch(cache_dir: Path, tmp_path: Path) -> None:
    proc = run_train(cache_dir, tmp_path, "spike", *COMMON, "spike_policy=rollback",
                     "spike_window=6", "faults.spike_at_step=10")
    assert "rolled back" in proc.stdout
    summary = json.loads((tmp_path / "spike" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert summary["rollbacks"] == 1
    records = [r for r in read_metrics(tmp_path / "spike") if "train/loss" in r]
    nine = [r["train/loss"] for r in records if r["step"] == 9]
    assert len(nine) == 2 and nine[0] == nine[1]  # replayed exactly after reloading step 8
    ten = [r for r in records if r["step"] == 10]
    assert len(ten) == 1 and ten[0]["train/skipped"] == 1  # the spiking batch, skipped


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun restarts need POSIX signals")
def test_torchrun_max_restarts_recovers_a_crash(cache_dir: Path, reference: Path,
                                                tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "--max_restarts=1", "-m", "launch.train", *TINY, f"output_root={tmp_path}",
           "run_name=restart", *COMMON, "faults.crash_at_step=10"]
    env = {**train_env(cache_dir), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    assert step_losses(tmp_path / "restart") == step_losses(reference)
    _assert_same_weights(tmp_path / "restart", reference)
