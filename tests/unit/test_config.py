from __future__ import annotations

import pytest

from pretrain.config import TrainConfig
from pretrain.errors import ConfigError
from pretrain.parallel.dims import ParallelDims
from pretrain.validate import validate


def test_default_config_is_valid() -> None:
    validate(TrainConfig())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: setattr(c.model, "n_heads", 7), "not divisible by model.n_heads"),
        (lambda c: setattr(c.model, "n_kv_heads", 3), "not divisible by model.n_kv_heads"),
        (lambda c: setattr(c, "precision", "fp8"), "precision"),
        (lambda c: setattr(c, "seq_len", 99999), "max_seq_len"),
        (lambda c: setattr(c, "micro_batch_size", 5), "global_batch_size"),
        (lambda c: setattr(c.optim, "schedule", "linear"), "optim.schedule"),
        (lambda c: setattr(c, "activation_checkpointing", "some"), "activation_checkpointing"),
    ],
)
def test_validate_names_the_field(change, message: str) -> None:
    cfg = TrainConfig()
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_parallel_dims_infers_and_checks() -> None:
    assert ParallelDims(1, -1, 2, 2, 8).dp_shard == 2
    dims = ParallelDims(2, 2, 1, 1, 4)
    assert dims.dp == 4 and dims.fsdp_enabled and not dims.tp_enabled
    with pytest.raises(ConfigError, match="world size is 8"):
        ParallelDims(1, 2, 2, 1, 8)
    with pytest.raises(ConfigError, match="not divisible"):
        ParallelDims(1, -1, 3, 1, 8)
