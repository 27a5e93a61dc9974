"""The per-rank memory estimate: its parameter arithmetic, how layouts and the loss change it,
and (a small benchmark) its peak against the measured resident-set growth of the trainer's own
train module stepping on the CPU (`pretrain.perf.memory`)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pretrain.config import ModelConfig, ParallelConfig, TrainConfig
from pretrain.models.llama import count_params
from pretrain.models.loss import default_chunk_tokens
from pretrain.parallel.dims import ParallelDims
from pretrain.parallel.memory import estimate_memory, rank_param_count
from pretrain.perf import memory as perf_memory
from pretrain.perf.memory import measure_cpu_peak, measure_cpu_peak_in_subprocess
from pretrain.train.module import NativeTrainModule

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


def test_estimate_follows_the_loss_choice() -> None:
    """loss=auto is chunked where one rank holds the whole output projection: no (N, V) logits,
    only one chunk of them and the saved gradients; under tensor parallelism it is the full
    loss, as in the trainer."""
    tokens, v = 8 * 256, MODEL.vocab_size
    auto = _estimate(ParallelConfig(dp_shard=1), 1)
    chunked = _estimate(ParallelConfig(dp_shard=1), 1, loss="chunked")
    full = _estimate(ParallelConfig(dp_shard=1), 1, loss="full")
    assert auto == chunked
    # The full loss keeps fp32 logits and log-probabilities, the chunked one the gradients of
    # hidden states and output weight (fp32); the full loss's backward adds two (N, V) buffers.
    saved = (tokens + v) * MODEL.dim * 4
    assert full.activations - chunked.activations == 2 * tokens * v * 4 - saved
    # fp32: one chunk's logits, its gradient and the previous chunk's, vs two (N, V) buffers.
    assert chunked.transients == 3 * default_chunk_tokens(v) * v * 4
    assert full.transients == 2 * tokens * v * 4
    tp = ParallelConfig(dp_shard=1, tp=2)
    assert _estimate(tp, 2) == _estimate(tp, 2, loss="full")


def _train_config(model: ModelConfig, **kw) -> TrainConfig:
    """A one-process fp32 CPU run of `model`: what `pretrain-estimate-memory --measure` takes."""
    args = dict(model=model, parallel=ParallelConfig(dp_shard=1), precision="fp32",
                seq_len=256, micro_batch_size=8, global_batch_size=8) | kw
    return TrainConfig(**args)


def test_measurement_steps_the_train_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """The measurement is the trainer's step: the train module built from the config (chunked
    loss, gradient accumulation), `steps` calls of train_step, each on the step's micro-batches."""
    built: list[NativeTrainModule] = []
    calls: list[int] = []
    build = perf_memory.build_train_module

    def spy(**kw):
        module = build(**kw)
        step = module.train_step
        module.train_step = lambda batches: calls.append(len(batches)) or step(batches)
        built.append(module)
        return module

    monkeypatch.setattr(perf_memory, "build_train_module", spy)
    tiny = ModelConfig(name="t", dim=32, n_layers=1, n_heads=2, vocab_size=256, multiple_of=32,
                       max_seq_len=64)
    cfg = _train_config(tiny, seq_len=32, micro_batch_size=2, global_batch_size=4)
    assert measure_cpu_peak(cfg, steps=3) > 0
    (module,) = built
    assert isinstance(module, NativeTrainModule) and module.settings.chunked_loss
    assert module.settings.precision == "fp32" and calls == [2, 2, 2]


@pytest.mark.parametrize("ac_mode,loss", [("none", "auto"), ("full", "auto"), ("none", "full")])
def test_estimate_within_20_percent_of_measured_cpu_peak(ac_mode: str, loss: str) -> None:
    """Benchmark: two steps of the train module in a fresh process; resident-set growth vs the
    estimate, with the chunked loss (loss=auto) and the full one."""
    cfg = _train_config(replace(MODEL, n_layers=4), activation_checkpointing=ac_mode, loss=loss)
    measured = measure_cpu_peak_in_subprocess(cfg)
    est = estimate_memory(cfg.model, cfg.parallel, world_size=1, micro_batch_size=8,
                          seq_len=256, precision="fp32", activation_checkpointing=ac_mode,
                          loss=loss).peak
    assert abs(est - measured) / measured < 0.2, (est, measured)


def test_estimate_memory_takes_overrides_before_or_after_the_flags() -> None:
    from tools.estimate_memory import parse_args

    args = parse_args(["model=cpu", "--measure", "activation_checkpointing=full"])
    assert args.measure and args.overrides == ["model=cpu", "activation_checkpointing=full"]
