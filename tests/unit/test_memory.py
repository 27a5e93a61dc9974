"""The per-rank memory estimate: its parameter arithmetic, how layouts change it, and (a small
benchmark) its peak against the measured resident-set growth of real CPU training steps."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pretrain.config import ModelConfig, ParallelConfig
from pretrain.models.llama import count_params
from pretrain.parallel.dims import ParallelDims
from pretrain.parallel.memory import (
    estimate_memory,
    measure_cpu_peak_in_subprocess,
    rank_param_count,
)

# Every dimension divisible by 4, so shards are even and the arithmetic is exact.
MODEL = ModelConfig(name="m", dim=256, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=8192,
                    multiple_of=64, max_seq_len=1024)


def _estimate(parallel: ParallelConfig, world: int, **kw):
    args = dict(world_size=world, micro_batch_size=8, seq_len=256, precision="fp32",
                activation_checkpointing="none") | kw
    return estimate_memory(MODEL, parallel, **args)


def test_one_rank_holds_every_parameter() -> None:
    dims = ParallelDims(1, 1, 1, 1, 1)
    assert rank_param_count(MODEL, dims) == count_params(MODEL)


def test_shards_add_up_to_the_model() -> None:
    """tp × dp_shard ranks of each pipeline stage hold, together, the stage; norms are replicated
    over TP (each TP rank keeps them whole)."""
    dims = ParallelDims(1, 2, 2, 2, 8)
    norms = (2 * MODEL.n_layers + 1) * MODEL.dim
    total = sum(rank_param_count(MODEL, dims, pp_rank=r) for r in range(dims.pp))
    assert total * dims.tp * dims.dp_shard == count_params(MODEL) + (dims.tp - 1) * norms


def test_fsdp_shards_states_and_zero_stages_partition_in_order() -> None:
    one = _estimate(ParallelConfig(dp_shard=1), 1)
    fsdp = _estimate(ParallelConfig(dp_shard=4), 4)
    assert fsdp.params == pytest.approx(one.params / 4)
    assert fsdp.optimizer == pytest.approx(one.optimizer / 4)
    assert fsdp.activations == one.activations  # same micro-batch per rank
    ds = [_estimate(ParallelConfig(backend="deepspeed", zero_stage=s), 4) for s in range(4)]
    assert ds[1].optimizer < ds[0].optimizer and ds[1].grads == ds[0].grads
    assert ds[2].grads < ds[1].grads and ds[2].params == ds[1].params
    assert ds[3].params < ds[2].params


def test_tensor_and_sequence_parallel_shrink_activations() -> None:
    one = _estimate(ParallelConfig(dp_shard=1), 1)
    tp = _estimate(ParallelConfig(dp_shard=1, tp=4, sequence_parallel=False), 4)
    sp = _estimate(ParallelConfig(dp_shard=1, tp=4, sequence_parallel=True), 4)
    assert sp.activations < tp.activations < one.activations


def test_checkpointing_and_pipeline_schedules() -> None:
    none = _estimate(ParallelConfig(dp_shard=1), 1)
    full = _estimate(ParallelConfig(dp_shard=1), 1, activation_checkpointing="full")
    selective = _estimate(ParallelConfig(dp_shard=1), 1, activation_checkpointing="selective")
    assert full.activations < selective.activations < none.activations
    pp = ParallelConfig(dp_shard=1, pp=4, pp_microbatches=8)
    gpipe = _estimate(replace(pp, pp_schedule="GPipe"), 4, pp_rank=0)
    one_f_one_b = _estimate(replace(pp, pp_schedule="1F1B"), 4, pp_rank=0)
    assert one_f_one_b.activations < gpipe.activations  # 1F1B holds pp micro-batches, not all


def test_bf16_halves_linear_activations() -> None:
    fp32 = _estimate(ParallelConfig(dp_shard=1), 1)
    bf16 = _estimate(ParallelConfig(dp_shard=1), 1, precision="bf16")
    assert bf16.activations < fp32.activations
    assert bf16.params == fp32.params  # native backend keeps fp32 master weights


@pytest.mark.parametrize("ac_mode", ["none", "full"])
def test_estimate_within_20_percent_of_measured_cpu_peak(ac_mode: str) -> None:
    """Benchmark: two fp32 training steps in a fresh process; resident-set growth vs estimate."""
    cfg = replace(MODEL, n_layers=4)
    measured = measure_cpu_peak_in_subprocess(cfg, micro_batch_size=8, seq_len=256,
                                              activation_checkpointing=ac_mode)
    est = estimate_memory(cfg, ParallelConfig(dp_shard=1), world_size=1, micro_batch_size=8,
                          seq_len=256, precision="fp32", activation_checkpointing=ac_mode).peak
    assert abs(est - measured) / measured < 0.2, (est, measured)
