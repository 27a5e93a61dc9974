"""`pretrain-launch`: a Hydra app that starts the per-rank entry (`launch/train.py`) with the
launcher the `launcher` group selects: local, torchrun, deepspeed, or slurm.

Each Hydra job (one per multirun combination) becomes one launched job, so

    pretrain-launch -m model=debug,cpu launcher=torchrun launcher.nproc_per_node=2

sweeps multi-process runs. Every rank of a job gets the same run directory: the job's Hydra
output directory, passed explicitly as `hydra.run.dir`.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from launch.common import checked_config, config_dir, deepspeed_launch_hint, fail
from launch.train import apply_init_from
from pretrain.config import LauncherConfig, register_configs
from pretrain.errors import ConfigError, PretrainError

register_configs()

ENTRY = "launch.train"


def train_overrides(task_overrides: list[str], run_dir: str,
                    group: str | None = None) -> list[str]:
    """The job's overrides minus the launcher's own, plus what pins the child to this job.

    The child is one run in the job's directory (the same for every rank). `hydra.mode=RUN`
    keeps a sweep preset's `hydra.mode: MULTIRUN` (conf/sweep) from making each child a sweep
    of its own, and the W&B group is passed resolved: a `${now:}` in it would otherwise resolve
    to each child's own start time and split one sweep over many groups.
    """
    kept = [o for o in task_overrides
            if not o.lstrip("+~").startswith(("launcher", "hydra."))]
    pinned = [f"hydra.run.dir={run_dir}", "hydra.mode=RUN"]
    if group is not None:
        quoted = group.replace("\\", "\\\\").replace("'", "\\'")
        pinned.append(f"logging.group='{quoted}'")
    return [*kept, *pinned]


def torchrun_command(lc: LauncherConfig, args: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={lc.nproc_per_node}",
           f"--nnodes={lc.nnodes}", f"--max_restarts={lc.max_restarts}"]
    if lc.nnodes == 1 and lc.node_rank is None:
        cmd.append("--standalone")
    elif lc.node_rank is not None:
        host, port = lc.rdzv_endpoint.rsplit(":", 1)
        cmd += [f"--node_rank={lc.node_rank}", f"--master_addr={host}", f"--master_port={port}"]
    else:
        cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={lc.rdzv_endpoint}",
                f"--rdzv_id={lc.rdzv_id}"]
    return [*cmd, "-m", ENTRY, *args]


def deepspeed_command(lc: LauncherConfig, args: list[str]) -> list[str]:
    # --no_local_rank: ranks read LOCAL_RANK from the environment; a --local_rank argument
    # would reach the Hydra app as an unknown override.
    cmd = ["deepspeed", "--no_local_rank", f"--master_port={lc.master_port}"]
    if lc.hostfile:
        cmd.append(f"--hostfile={lc.hostfile}")
    else:
        cmd += [f"--num_gpus={lc.nproc_per_node}", f"--num_nodes={lc.nnodes}"]
    if lc.include:
        cmd.append(f"--include={lc.include}")
    if lc.exclude:
        cmd.append(f"--exclude={lc.exclude}")
    return [*cmd, "--module", ENTRY, *args]


def slurm_script(lc: LauncherConfig, args: list[str], run_dir: str, job_name: str) -> str:
    """One task per node; each runs torchrun, the first node of the allocation is the host."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={lc.nnodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={lc.gpus_per_node}",
             f"#SBATCH --cpus-per-task={lc.cpus_per_task}", f"#SBATCH --time={lc.time}",
             f"#SBATCH --output={run_dir}/slurm-%j.out"]
    lines += [f"#SBATCH --partition={lc.partition}"] * bool(lc.partition)
    lines += [f"#SBATCH --account={lc.account}"] * bool(lc.account)
    lines += [f"#SBATCH {extra}" for extra in lc.sbatch_extra]
    lines += ["set -euo pipefail", f"cd {shlex.quote(os.getcwd())}", *lc.setup,
              *(f"export {k}={shlex.quote(str(v))}" for k, v in lc.env.items()),
              'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
              "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}"]
    torchrun = (f"{sys.executable} -m torch.distributed.run --nnodes={lc.nnodes} "
                f"--nproc_per_node={lc.nproc_per_node} --max_restarts={lc.max_restarts} "
                "--rdzv_backend=c10d --rdzv_endpoint=$head:29500 --rdzv_id=$SLURM_JOB_ID "
                f"-m {ENTRY} " + " ".join(shlex.quote(a) for a in args))
    return "\n".join([*lines, f"srun {torchrun}", ""])


def launch(lc: LauncherConfig, args: list[str], run_dir: str, job_name: str) -> int:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    if lc.kind == "slurm":
        path = Path(run_dir) / "job.sbatch"
        path.write_text(slurm_script(lc, args, run_dir, job_name))
        if lc.dry_run:
            print(path.read_text())
            return 0
        return subprocess.run(["sbatch", str(path)], check=False).returncode
    builders = {"local": lambda: [sys.executable, "-m", ENTRY, *args],
                "torchrun": lambda: torchrun_command(lc, args),
                "deepspeed": lambda: deepspeed_command(lc, args)}
    if lc.kind not in builders:
        raise ConfigError(f"launcher.kind={lc.kind!r}; use local, torchrun, deepspeed or slurm")
    cmd = builders[lc.kind]()
    print(" ".join(shlex.quote(c) for c in cmd), flush=True)
    if lc.dry_run:
        return 0
    env = {**os.environ, **{k: str(v) for k, v in lc.env.items()}}
    return subprocess.run(cmd, env=env, check=False).returncode


@hydra.main(config_path=config_dir(), config_name="train", version_base=None)
def hydra_main(dcfg: DictConfig) -> None:
    lc = dcfg.launcher
    # The layout is checked against the world the launched job will have, not this process.
    world = 1 if lc.kind == "local" else lc.nnodes * lc.nproc_per_node
    hc = HydraConfig.get()
    try:  # init_from: the layout is checked against the weights' model, not the preset's
        apply_init_from(dcfg, list(hc.overrides.task), Path(hc.runtime.output_dir))
    except PretrainError as e:
        fail(str(e))
    cfg = checked_config(dcfg, world_size=world)
    if cfg.parallel.backend == "deepspeed" and lc.kind == "local":
        fail(deepspeed_launch_hint())
    run_dir = hc.runtime.output_dir
    args = train_overrides(list(hc.overrides.task), run_dir, cfg.logging.group)
    try:
        code = launch(cfg.launcher, args, run_dir, job_name=f"pretrain-{cfg.model.name}")
    except PretrainError as e:
        fail(str(e))
    if code != 0:
        print(f"error: launched job exited with code {code} (run dir {run_dir})", file=sys.stderr)
        sys.exit(code)


def main() -> None:
    hydra_main()


if __name__ == "__main__":
    main()
