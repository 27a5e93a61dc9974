"""The per-rank training entry (`pretrain-train`): a Hydra app over conf/train.yaml.

torchrun and the deepspeed launcher start one of these per rank; it reads only the environment
they set (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT). The run directory is Hydra's output
directory, `${output_root}/${run_name}`, the same on every rank when run_name is given.

Every check that can refuse a start (the config, the checkpoint it would resume, then the
trainer's own setup and resume) runs before the run's config files are written, so a refused
start leaves an existing run as it was.
"""

from __future__ import annotations

import math
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from launch.common import (
    checked_config,
    config_dir,
    deepspeed_launch_hint,
    fail,
    is_launched,
    save_run_config,
)
from pretrain.config import register_configs
from pretrain.errors import PretrainError

register_configs()


@hydra.main(config_path=config_dir(), config_name="train", version_base=None)
def hydra_main(dcfg: DictConfig) -> float:
    cfg = checked_config(dcfg)
    if cfg.parallel.backend == "deepspeed" and not is_launched():
        fail(deepspeed_launch_hint())
    run_dir = Path(HydraConfig.get().runtime.output_dir)

    from pretrain.train.compat import check_resume  # heavy imports after the config is good
    from pretrain.train.trainer import train

    def on_start() -> None:  # rank 0, once setup and resume were accepted
        save_run_config(dcfg, run_dir)

    try:
        check_resume(cfg, run_dir)
        summary = train(cfg, run_dir, on_start=on_start)
    except PretrainError as e:
        fail(str(e))
    best = summary["best_val_loss"]  # None when no evaluation ran (a preempted run)
    return math.nan if best is None else float(best)


def main() -> None:
    hydra_main()


if __name__ == "__main__":
    main()
