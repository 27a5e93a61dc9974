"""A bad layout ends with one clear message before any process group exists; the DeepSpeed
config is generated from ours and `deepspeed_extra` may add to it but not contradict it."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from pretrain.config import ModelConfig, ParallelConfig, TrainConfig
from pretrain.errors import ConfigError
from pretrain.parallel.deepspeed_backend import deepspeed_config
from pretrain.validate import validate


def _cfg(**parallel: object) -> TrainConfig:
    cfg = TrainConfig(
        model=ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256,
                          multiple_of=64, max_seq_len=128),
        parallel=ParallelConfig(**parallel), seq_len=64, global_batch_size=16,
        micro_batch_size=4, run_name="x",
    )
    return cfg


@pytest.mark.parametrize(
    ("world", "parallel", "changes", "message"),
    [
        (3, dict(tp=2), {}, "world size 3 is not divisible by dp_replicate*tp*pp=2"),
        (4, dict(dp_replicate=2, dp_shard=3), {}, "world size is 4"),
        (4, dict(tp=4), {}, "n_kv_heads=2 must both be divisible by parallel.tp=4"),
        (2, dict(tp=2), {"seq_len": 63}, "seq_len=63 is not divisible by parallel.tp=2"),
        (4, dict(pp=4, pp_virtual_stages=2, pp_schedule="Interleaved1F1B"), {},
         "model.n_layers=4 is fewer than parallel.pp × parallel.pp_virtual_stages = 8"),
        (8, dict(), {"micro_batch_size": 4}, "global_batch_size=16 is not divisible by "
         "micro_batch_size=4 × data-parallel degree 8"),
        (2, dict(pp=2, pp_schedule="GPipe", pp_virtual_stages=2), {}, "runs one stage per rank"),
        (2, dict(pp=2, pp_schedule="ZBVZeroBubble"), {}, "needs parallel.pp_virtual_stages=2"),
        (2, dict(pp=2, pp_schedule="Bogus"), {}, "pp_schedule='Bogus'"),
        (2, dict(pp=2, pp_microbatches=3), {}, "not divisible by the 3 pipeline micro-batches"),
        (2, dict(tp=2), {"tie": True}, "tie_embeddings=true is not supported"),
        (2, dict(pp=2), {"precision": "fp16"}, "use precision=bf16 with parallel.pp > 1"),
        (2, dict(backend="deepspeed", tp=2, zero_stage=1), {}, "set parallel.tp=1"),
        (2, dict(zero_stage=2), {}, "needs parallel.backend=deepspeed"),
        (2, dict(backend="deepspeed", zero_stage=2,
                 deepspeed_extra={"train_micro_batch_size_per_gpu": 8}), {},
         "deepspeed_extra.train_micro_batch_size_per_gpu=8 contradicts micro_batch_size"),
        (2, dict(backend="deepspeed", zero_stage=2,
                 deepspeed_extra={"zero_optimization": {"stage": 3}}), {},
         "deepspeed_extra.zero_optimization.stage=3 contradicts parallel.zero_stage"),
        (2, dict(backend="deepspeed", zero_stage=1, deepspeed_extra={"bf16": {"enabled": False}}),
         {"precision": "bf16"}, "deepspeed_extra.bf16.enabled=False contradicts precision"),
        (2, dict(backend="deepspeed", zero_stage=1,
                 deepspeed_extra={"optimizer": {"type": "Adam"}}), {},
         "deepspeed_extra.optimizer is not allowed"),
    ],
)
def test_bad_layout_is_one_clear_error(world: int, parallel: dict, changes: dict,
                                       message: str) -> None:
    cfg = _cfg(**parallel)
    if changes.pop("tie", False):
        cfg.model.tie_embeddings = True
    for key, value in changes.items():
        setattr(cfg, key, value)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=world)
    assert message in str(err.value)
    assert not dist.is_initialized()


@pytest.mark.parametrize("parallel", [
    dict(dp_shard=-1), dict(dp_replicate=2, dp_shard=2), dict(tp=2, dp_shard=-1),
    dict(pp=2, pp_schedule="Interleaved1F1B", pp_virtual_stages=2),
    dict(pp=2, pp_schedule="DualPipeV", pp_virtual_stages=2, pp_microbatches=4),
    dict(backend="deepspeed", zero_stage=3,
         deepspeed_extra={"zero_optimization": {"stage": 3, "overlap_comm": True}}),
])
def test_good_layouts_pass(parallel: dict) -> None:
    validate(_cfg(**parallel), world_size=4)


def test_deepspeed_config_from_ours_with_extra_keys_merged() -> None:
    ds = deepspeed_config(zero_stage=2, precision="bf16", global_batch_size=64,
                          micro_batch_size=4, world_size=4, grad_clip=1.0,
                          extra={"zero_optimization": {"overlap_comm": True},
                                 "train_batch_size": 64, "flops_profiler": {"enabled": False}})
    assert ds["train_batch_size"] == 64
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False
    assert ds["flops_profiler"] == {"enabled": False}
    assert "optimizer" not in ds and "scheduler" not in ds  # ours: AdamW + our schedule


@pytest.mark.parametrize("overrides", [dict(backend="deepspeed", zero_stage=2, dp_shard=-1),
                                       dict(pp=2)])
def test_document_masking_needs_a_layout_that_passes_the_mask(overrides: dict) -> None:
    cfg = TrainConfig(model=ModelConfig(n_layers=4), parallel=ParallelConfig(**overrides),
                      global_batch_size=8, micro_batch_size=2)
    cfg.data.document_masking = True
    with pytest.raises(ConfigError, match="document_masking"):
        validate(cfg, world_size=2)


def test_spike_skip_is_refused_under_deepspeed() -> None:
    cfg = TrainConfig(parallel=ParallelConfig(backend="deepspeed", zero_stage=2, dp_shard=-1),
                      global_batch_size=8, micro_batch_size=2, spike_policy="skip")
    with pytest.raises(ConfigError, match="spike_policy=skip cannot drop an update"):
        validate(cfg, world_size=2)
