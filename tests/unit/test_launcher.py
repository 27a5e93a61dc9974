"""pretrain-launch builds the commands users would type: torchrun, deepspeed, an sbatch script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from launch.run import deepspeed_command, slurm_script, torchrun_command, train_overrides
from pretrain.config import LauncherConfig
from tests.conftest import REPO


def test_train_overrides_drop_the_launchers_own() -> None:
    args = train_overrides(["model=debug", "launcher=slurm", "launcher.nnodes=4",
                            "hydra.run.dir=x"], "/runs/a", None)
    assert "model=debug" in args and "hydra.run.dir=/runs/a" in args
    assert not any(a.startswith("launcher") for a in args)


def test_torchrun_single_and_multi_node() -> None:
    single = torchrun_command(LauncherConfig(kind="torchrun", nproc_per_node=8), ["model=1b"])
    assert "--standalone" in single and "--nproc_per_node=8" in single
    assert single[-3:] == ["-m", "launch.train", "model=1b"]
    multi = torchrun_command(LauncherConfig(kind="torchrun", nproc_per_node=8, nnodes=4,
                                            rdzv_endpoint="node0:29500", max_restarts=3), [])
    assert "--nnodes=4" in multi and "--rdzv_endpoint=node0:29500" in multi
    assert "--rdzv_backend=c10d" in multi and "--max_restarts=3" in multi
    assert "--standalone" not in multi


def test_deepspeed_command() -> None:
    cmd = deepspeed_command(LauncherConfig(kind="deepspeed", hostfile="hosts",
                                           include="worker-0:0,1"), ["parallel=zero3"])
    assert cmd[:2] == ["deepspeed", "--no_local_rank"]
    assert "--hostfile=hosts" in cmd and "--include=worker-0:0,1" in cmd
    assert cmd[-3:] == ["--module", "launch.train", "parallel=zero3"]


def test_slurm_script_runs_torchrun_on_every_node(tmp_path: Path) -> None:
    lc = LauncherConfig(kind="slurm", nnodes=4, nproc_per_node=8, gpus_per_node=8,
                        partition="gpu", account="lab", sbatch_extra=["--signal=USR1@120"],
                        setup=["source venv/bin/activate"])
    script = slurm_script(lc, ["model=llama3_8b", "run_name=x y"], str(tmp_path), "job")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=lab",
                 "#SBATCH --signal=USR1@120", "source venv/bin/activate"):
        assert line in script.splitlines(), line
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--nnodes=4" in srun and "--nproc_per_node=8" in srun
    assert "--rdzv_endpoint=$head:29500" in srun and "'run_name=x y'" in srun
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_launch_slurm_dry_run_prints_and_writes_the_script(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "launch.run", "launcher=slurm", "launcher.dry_run=true",
         "launcher.nnodes=2", "launcher.nproc_per_node=8", "parallel=fsdp", "model=1b",
         "global_batch_size=256", "micro_batch_size=4",
         f"output_root={tmp_path}", "run_name=big"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --nodes=2" in proc.stdout and "srun " in proc.stdout
    assert (tmp_path / "big" / "job.sbatch").read_text().strip() in proc.stdout


def test_launch_rejects_a_layout_the_world_cannot_hold(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "launch.run", "launcher=torchrun", "launcher.nproc_per_node=3",
         "parallel=tp", "launcher.dry_run=true", f"output_root={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "world size 3" in proc.stderr


def test_unknown_keys_are_named_and_open_maps_stay_open() -> None:
    from omegaconf import OmegaConf

    from launch.common import unknown_keys, unknown_keys_message
    from pretrain.config import TrainConfig

    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), {
        "tags": {"sweep": 1}, "parallel": {"deepspeed_extra": {"zero_optimization": {"x": 1}}},
        "launcher": {"env": {"NCCL_DEBUG": "INFO"}},
        "data": {"mix": {"web": {"dir": "/d", "weight": 1.0}}}})
    assert unknown_keys(cfg, TrainConfig) == []
    with_extra = OmegaConf.merge(OmegaConf.create(OmegaConf.to_container(cfg)), {
        "optim": {"lrr": 0.1}, "faults": {"nan_at": 3}, "stepz": 5, "hydra": {"run": {}}})
    unknown = unknown_keys(with_extra, TrainConfig)
    assert unknown == ["optim.lrr", "faults.nan_at", "stepz"]
    message = unknown_keys_message(unknown)
    assert "optim.lrr (did you mean optim.lr?)" in message
    assert "faults.nan_at (did you mean faults.nan_at_step?)" in message
    assert "stepz (did you mean steps?)" in message and "\n" not in message
