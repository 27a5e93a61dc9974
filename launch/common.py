"""What both Hydra apps do first: turn the composed config into the typed one and validate it."""

from __future__ import annotations

import sys
from typing import NoReturn

from omegaconf import DictConfig, OmegaConf

from pretrain.config import TrainConfig
from pretrain.errors import ConfigError
from pretrain.validate import validate


def fail(message: str) -> NoReturn:
    """One line on stderr, exit status 2: a user error, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def checked_config(dcfg: DictConfig, world_size: int | None = None) -> TrainConfig:
    """`OmegaConf.to_object` once at the entry point, then every cross-field check."""
    cfg: TrainConfig = OmegaConf.to_object(dcfg)
    try:
        validate(cfg, world_size)
    except ConfigError as e:
        fail(str(e))
    return cfg
