"""Instruction fine-tuning end to end through the installed console scripts: `pretrain-train
objective=sft data.source=chat.jsonl` on a generated chat file with a few bad records, exact
resume, the strict refusal, and 2 DDP ranks (`pretrain-launch launcher=torchrun`) against one
process. Tiny decoder, fp32 on CPU; one run is shared by the tests of this module."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pretrain.data.sft import write_synthetic_chats
from tests.conftest import (
    TINY,
    console_script,
    file_digests,
    read_metrics,
    refusal_line,
    run_train,
    step_losses,
    train_env,
)

STEPS = 12
HALF = STEPS // 2
BAD = ['{"messages": [{"role": "bot", "content": "hi"}]}', "{not json",
       '{"messages": []}']


def _overrides(chat: Path) -> tuple[str, ...]:
    return ("objective=sft", f"data.source={chat}", "seq_len=128", f"steps={STEPS}",
            f"ckpt_every={HALF}", "ckpt_keep=0", f"eval_every={HALF}", "logging.log_every=1")


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 generated conversations, then three bad records (lines 301-303)."""
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    write_synthetic_chats(str(path), 300, seed=5)
    with path.open("a") as f:
        f.write("".join(line + "\n" for line in BAD))
    return path


@pytest.fixture(scope="module")
def trained(cache_dir: Path, chat: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("sft-runs")
    return out / "one", run_train(cache_dir, out, "one", *_overrides(chat))


def test_sft_trains_reports_bad_records_and_evaluates(trained: tuple[Path, subprocess.
                                                                    CompletedProcess],
                                                      chat: Path) -> None:
    run_dir, proc = trained
    [line] = [x for x in proc.stdout.splitlines() if x.startswith("sft data ")]
    assert line.startswith(f"sft data {chat}: 300 conversations")
    assert "3 bad records skipped (first: line 301: message 0 has unknown role 'bot'" in line
    assert "line 302: invalid JSON" in line and "line 303: empty conversation" in line
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["objective"] == "sft"
    assert summary["steps"] == STEPS
    losses = step_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 1.0, losses
    evals = [r for r in read_metrics(run_dir) if "val/loss" in r]
    assert [r["step"] for r in evals] == [HALF, STEPS]
    assert evals[1]["val/loss"] < evals[0]["val/loss"] < losses[1]


def test_sft_resume_is_bitwise_exact(cache_dir: Path, chat: Path,
                                     trained: tuple[Path, subprocess.CompletedProcess],
                                     tmp_path: Path) -> None:
    """The run stopped after its HALF checkpoint and restarted with the same command repeats
    the uninterrupted run exactly: the loader's position is in the checkpoint."""
    full, _ = trained
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / f"step_{STEPS:08d}")
    (part / "checkpoints" / "latest.json").unlink()
    (part / "summary.json").unlink()
    kept = [r for r in read_metrics(part) if r["step"] <= HALF]
    (part / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    proc = run_train(cache_dir, tmp_path, "part", *_overrides(chat))
    assert "resumed from" in proc.stdout and f"step_{HALF:08d}" in proc.stdout, proc.stdout
    assert step_losses(part) == step_losses(full)  # exact float equality, steps 1..STEPS
    val = [(r["step"], r["val/loss"]) for r in read_metrics(full) if "val/loss" in r]
    assert [(r["step"], r["val/loss"]) for r in read_metrics(part) if "val/loss" in r] == val


def test_sft_strict_refuses_the_first_bad_record_before_anything_is_written(
        cache_dir: Path, chat: Path, trained: tuple[Path, subprocess.CompletedProcess]) -> None:
    run_dir, _ = trained
    before = file_digests(run_dir)
    for name in ("one", "fresh"):
        proc = run_train(cache_dir, run_dir.parent, name, *_overrides(chat),
                         "objective.sft_strict=true", check=False, timeout=120)
        line = refusal_line(proc)
        assert line.startswith(f"error: sft data {chat}:301: message 0 has unknown role 'bot'")
        assert "objective.sft_strict=false" in line
    assert file_digests(run_dir) == before
    assert not (run_dir.parent / "fresh").exists()


def test_sft_on_two_ddp_ranks_matches_one_process(
        cache_dir: Path, chat: Path, trained: tuple[Path, subprocess.CompletedProcess],
        tmp_path: Path) -> None:
    """Each rank takes its slice of the step's windows: the losses of 2 DDP ranks (one
    micro-batch each) equal one process's (two accumulated micro-batches) to rounding."""
    one, _ = trained
    cmd = [console_script("pretrain-launch"), *TINY, *_overrides(chat),
           f"output_root={tmp_path}", "run_name=ddp", "launcher=torchrun",
           "launcher.nproc_per_node=2", "parallel=ddp"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=train_env(cache_dir), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ddp, single = step_losses(tmp_path / "ddp"), step_losses(one)
    assert sorted(ddp) == sorted(single)
    for step, loss in single.items():
        assert ddp[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), (step, ddp[step], loss)
    val = [r["val/loss"] for r in read_metrics(one) if "val/loss" in r]
    assert [r["val/loss"] for r in read_metrics(tmp_path / "ddp") if "val/loss" in r] == \
        pytest.approx(val, rel=1e-5)
