"""The dry run: a 70B / 512-rank layout parallelized on the meta device under a fake process
group, on this one CPU process, in seconds; its per-rank counts agree with the memory model."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pretrain.config import ModelConfig, ParallelConfig
from pretrain.models.llama import count_params
from pretrain.parallel.dims import ParallelDims
from pretrain.parallel.dryrun import dry_run
from pretrain.parallel.memory import rank_param_count

CONF = Path(__file__).resolve().parents[2] / "conf"


def _preset(name: str) -> ModelConfig:
    return ModelConfig(**OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml")))


@pytest.fixture(scope="module")
def llama70b() -> ModelConfig:
    return _preset("llama2_70b")


def test_llama2_70b_on_512_ranks(llama70b: ModelConfig) -> None:
    parallel = ParallelConfig(dp_shard=-1, tp=8, pp=8, pp_schedule="1F1B")
    start = time.perf_counter()
    report = dry_run(llama70b, parallel, world_size=512, micro_batch_size=8, seq_len=4096,
                     activation_checkpointing="full")
    assert time.perf_counter() - start < 60
    assert report.layers_per_stage == [10] * 8
    assert "pp=8" in report.mesh and "dp_shard=8" in report.mesh and "tp=8" in report.mesh
    dims = ParallelDims(1, -1, 8, 8, 512)
    for r in report.ranks:
        # The real parallelize() and the memory model agree on what each rank holds.
        assert r.local_params == rank_param_count(llama70b, dims, pp_rank=r.pp_rank)
        assert r.layers == [list(range(10 * r.pp_rank, 10 * r.pp_rank + 10))]
        assert r.memory.peak > 0
    assert report.ranks[0].modules == [["tok_embeddings"]]
    assert report.ranks[-1].modules == [["norm", "output"]]
    # 64 ranks per stage hold the model once, except the TP-replicated norms.
    norms = (2 * llama70b.n_layers + 1) * llama70b.dim
    total = sum(r.local_params for r in report.ranks) * 64
    assert total == count_params(llama70b) + 7 * norms
    text = report.format()
    assert "pp rank 7" in text and "parameters per rank" in text and "peak" in text


def test_interleaved_virtual_stages_and_hsdp() -> None:
    cfg = _preset("debug")
    cfg.n_layers = 8
    parallel = ParallelConfig(dp_replicate=2, dp_shard=-1, tp=2, pp=2,
                              pp_schedule="Interleaved1F1B", pp_virtual_stages=2)
    report = dry_run(cfg, parallel, world_size=16, micro_batch_size=4, seq_len=64)
    assert report.n_stages == 4
    assert [r.stages for r in report.ranks] == [[0, 2], [1, 3]]
    assert report.ranks[1].layers == [[2, 3], [6, 7]]
    dims = ParallelDims(2, -1, 2, 2, 16)
    assert [r.local_params for r in report.ranks] == [
        rank_param_count(cfg, dims, pp_rank=r, virtual_stages=2, schedule="Interleaved1F1B")
        for r in range(2)]


def test_cli_dry_run_prints_the_layout(capsys: pytest.CaptureFixture[str]) -> None:
    from tools.estimate_memory import main

    rc = main(["model=llama2_70b", "parallel=3d", "parallel.tp=8", "parallel.pp=8",
               "parallel.pp_virtual_stages=1", "parallel.pp_schedule=1F1B", "micro_batch_size=8",
               "global_batch_size=512", "seq_len=4096", "--world-size", "512", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "mesh: DeviceMesh" in out and "layers per stage: [10, 10" in out


def test_cli_rejects_a_bad_layout(capsys: pytest.CaptureFixture[str]) -> None:
    from tools.estimate_memory import main

    rc = main(["model=llama2_70b", "parallel=tp", "parallel.tp=3", "--world-size", "6"])
    assert rc == 2
    assert "divisible by parallel.tp=3" in capsys.readouterr().err
