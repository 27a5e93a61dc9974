"""The real entry point (`python -m launch.train`, the Hydra app) under the real launchers:
torchrun with FSDP, with a 2-stage pipeline, and with the DeepSpeed backend; the `deepspeed`
launcher. Each run's per-step losses equal those of one process within 1e-5 relative."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY, run_train, step_losses, train_env
from tests.distributed.helpers import free_port, torchrun_cmd

STEPS = ["steps=6", "logging.log_every=1", "eval_every=3", "ckpt_every=3"]


def launch(cmd_prefix: list[str], cache_dir: Path, out: Path, name: str,
           *overrides: str) -> subprocess.CompletedProcess:
    cmd = [*cmd_prefix, *TINY, *STEPS, f"output_root={out}", f"run_name={name}", *overrides]
    env = {**train_env(cache_dir), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-6000:]}"
    return proc


def torchrun(cache_dir: Path, out: Path, name: str, *overrides: str, nproc: int = 2) -> Path:
    launch(torchrun_cmd(nproc, "-m", "launch.train"), cache_dir, out, name, *overrides)
    return out / name


def assert_same_losses(run_dir: Path, ref: dict[int, float]) -> None:
    losses = step_losses(run_dir)
    assert sorted(losses) == sorted(ref)
    for step, loss in ref.items():
        assert abs(losses[step] - loss) <= 1e-5 * abs(loss), (step, losses[step], loss)


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("launch")


@pytest.fixture(scope="module")
def one_process(cache_dir: Path, out: Path) -> dict[int, float]:
    run_train(cache_dir, out, "one", *STEPS)
    losses = step_losses(out / "one")
    assert len(losses) == 6 and losses[6] < losses[1]
    return losses


def test_torchrun_fsdp(cache_dir: Path, out: Path, one_process: dict[int, float]) -> None:
    run_dir = torchrun(cache_dir, out, "fsdp", "parallel=fsdp")
    assert_same_losses(run_dir, one_process)
    assert (run_dir / "summary.json").is_file()
    assert (run_dir / "checkpoints" / "step_00000006" / "integrity.json").is_file()


def resume_from_step_3(cache_dir: Path, out: Path, run_dir: Path, *overrides: str) -> None:
    """Copy the run, drop its step-6 checkpoint, resume: steps 4-6 must repeat exactly."""
    resumed = out / f"{run_dir.name}_resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    (resumed / "checkpoints" / "latest.json").write_text(
        '{"checkpoint": "step_00000003", "step": 3}')
    (resumed / "metrics.jsonl").write_text("")
    torchrun(cache_dir, out, resumed.name, *overrides, "resume=auto")
    assert step_losses(resumed) == {s: v for s, v in step_losses(run_dir).items() if s > 3}


@pytest.fixture(scope="module")
def pipeline_run(cache_dir: Path, out: Path) -> Path:
    return torchrun(cache_dir, out, "pp", "parallel=pp")


def test_torchrun_pipeline(pipeline_run: Path, one_process: dict[int, float]) -> None:
    assert_same_losses(pipeline_run, one_process)


def test_torchrun_pipeline_resume(cache_dir: Path, out: Path, pipeline_run: Path) -> None:
    resume_from_step_3(cache_dir, out, pipeline_run, "parallel=pp")


def test_torchrun_deepspeed_backend_and_resume(cache_dir: Path, out: Path,
                                               one_process: dict[int, float]) -> None:
    run_dir = torchrun(cache_dir, out, "zero2", "parallel=zero2")
    assert_same_losses(run_dir, one_process)
    assert (run_dir / "checkpoints" / "step_00000003" / "deepspeed").is_dir()
    resume_from_step_3(cache_dir, out, run_dir, "parallel=zero2")


def test_torchrun_deepspeed_backend_on_one_rank(cache_dir: Path, out: Path,
                                                one_process: dict[int, float]) -> None:
    # The engine needs a process group even for one rank; the trainer creates it.
    run_dir = torchrun(cache_dir, out, "zero2_one_rank", "parallel=zero2", nproc=1)
    assert_same_losses(run_dir, one_process)


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="no deepspeed launcher on PATH")
def test_deepspeed_launcher_zero3(cache_dir: Path, out: Path,
                                  one_process: dict[int, float]) -> None:
    # --no_local_rank: the Hydra app takes its rank from the environment, not from argv.
    prefix = ["deepspeed", "--num_gpus=2", f"--master_port={free_port()}", "--no_local_rank",
              "--module", "launch.train"]
    launch(prefix, cache_dir, out, "zero3_launcher", "parallel=zero3")
    assert_same_losses(out / "zero3_launcher", one_process)


def test_native_backend_refuses_a_deepspeed_checkpoint(cache_dir: Path, out: Path,
                                                       one_process: dict[int, float]) -> None:
    run_dir = out / "zero2"
    if not run_dir.is_dir():
        pytest.skip("needs the zero2 run")
    proc = subprocess.run(
        [sys.executable, "-m", "launch.train", *TINY, *STEPS, f"output_root={out}",
         "run_name=zero2", "steps=9", "resume=auto"],
        cwd=REPO, env={**train_env(cache_dir), "DS_ACCELERATOR": "cpu"},
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "resume refused: parallel.backend is native" in proc.stderr
    assert "written with deepspeed" in proc.stderr

