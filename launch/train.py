"""The per-rank training entry: a Hydra app over conf/train.yaml.

torchrun and the deepspeed launcher start one of these per rank; it reads only the environment
they set (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT). The run directory is Hydra's output
directory, `${output_root}/${run_name}`, the same on every rank when run_name is given.
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from launch.common import checked_config, fail
from pretrain.config import register_configs

register_configs()


@hydra.main(config_path="../conf", config_name="train", version_base=None)
def hydra_main(dcfg: DictConfig) -> float:
    cfg = checked_config(dcfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if int(os.environ.get("RANK", 0)) == 0:
        OmegaConf.save(dcfg, run_dir / "config.yaml", resolve=True)

    from pretrain.data.shards import DataError  # heavy imports after the config is good
    from pretrain.errors import CheckpointError
    from pretrain.train.trainer import train

    try:
        summary = train(cfg, run_dir)
    except (DataError, CheckpointError) as e:
        fail(str(e))
    return float(summary["best_val_loss"])


def main() -> None:
    hydra_main()


if __name__ == "__main__":
    main()
