"""Every model family trains on its objective like one process, through the real train module
and on the user's data path: encoder + masked LM, encoder-decoder + span corruption and
decoder + fill-in-the-middle, under DDP, FSDP and DeepSpeed ZeRO-2 on two ranks, the decoder
also under tensor and pipeline parallelism.

Each rank reads its own slice of a prepared dataset through `ShardedWindowLoader`, corrupted
by the objective `build_objective` makes, so the runs also show that the corruption does not
depend on the number of ranks or loader threads: the ranks' micro-batches together are the
one-process run's. Against that run, over 8 fp32 steps of a tiny model: the same initial
weights bit for bit, per-step losses within 1e-5 relative, final weights within 1e-5, and the
same validation metrics (the loss and the objective's scorer: masked-LM accuracy, span token
accuracy and exact match, FIM middle loss) of the initial and final weights within 1e-5.

Tensor and pipeline parallelism are implemented for the decoder only: validation refuses them
for the encoder and the encoder-decoder with a message naming the way out.

All two-rank runs share one spawned process group (starting ranks costs more than the tiny
runs do); each family and layout still reports as its own test.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pretrain.config import ObjectiveConfig, TrainConfig
from pretrain.errors import ConfigError
from pretrain.validate import validate
from tests.distributed.helpers import run_distributed
from tests.distributed.parity import (
    FAMILIES,
    FAMILY_SEQ,
    FAMILY_STEPS,
    GLOBAL_BATCH,
    SINGLE,
    Family,
    Layout,
    max_rel_loss_diff,
    max_rel_metric_diff,
    max_weight_diff,
    merge_weights,
    train_families,
    train_family,
    write_family_data,
)

DATA_PARALLEL = [
    # One loader thread: the batches must not depend on it either.
    Layout("ddp", dp_replicate=2, loader_workers=1),
    Layout("fsdp", dp_shard=2),
    Layout("zero2", zero_stage=2),
]
DECODER_ONLY = [
    Layout("tp_sp", tp=2, micro_batch_size=4),
    Layout("pp_1f1b", pp=2, pp_schedule="1F1B", micro_batch_size=4),
]
DECODER = next(f for f in FAMILIES if f.model.arch == "decoder")
RUNS = [(family, layout) for family in FAMILIES for layout in DATA_PARALLEL]
RUNS += [(DECODER, layout) for layout in DECODER_ONLY]
DEEPSPEED_ENV = {"DS_ACCELERATOR": "cpu"}


def _id(run: tuple[Family, Layout]) -> str:
    return f"{run[0].name}/{run[1].name}"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_family_data(tmp_path_factory.mktemp("parity-families"))


@pytest.fixture(scope="module")
def reference(data_dir: str) -> dict[str, dict]:
    refs = {f.name: train_family(f, SINGLE, FAMILY_STEPS, data_dir) for f in FAMILIES}
    for ref in refs.values():
        # The comparison is only meaningful if training moves the weights well beyond 1e-5.
        assert max_weight_diff(ref["weights"], ref["initial"]) > 1e-2
    return refs


@pytest.fixture(scope="module")
def two_ranks(data_dir: str) -> list[dict]:
    return run_distributed(train_families, 2, RUNS, FAMILY_STEPS, data_dir, env=DEEPSPEED_ENV)


def _global_inputs(per_rank: list[dict], step: int) -> torch.Tensor:
    """The step's inputs over all data-parallel ranks in global order: micro-batch i of every
    data-parallel rank before micro-batch i + 1 (the ranks of one replica read the same)."""
    dp_ranks = sorted({r["dp_rank"]: r for r in per_rank}.items())
    n_micro = len(per_rank[0]["inputs"][step])
    return torch.cat([r["inputs"][step][i] for i in range(n_micro) for _, r in dp_ranks])


@pytest.mark.parametrize("run", RUNS, ids=[_id(r) for r in RUNS])
def test_family_trains_like_one_process(run: tuple[Family, Layout], two_ranks: list[dict],
                                        reference: dict[str, dict]) -> None:
    family, layout = run
    ref = reference[family.name]
    per_rank = [r[_id(run)] for r in two_ranks]
    for step in range(FAMILY_STEPS):  # each rank's slice of the same global batch
        assert torch.equal(_global_inputs(per_rank, step), torch.cat(ref["inputs"][step]))
    initial = merge_weights(per_rank, "initial")
    assert set(initial) == set(ref["initial"])
    for k, v in initial.items():
        assert torch.equal(v, ref["initial"][k]), f"{_id(run)}: initial {k} differs"
    for r in per_rank:  # every rank reports the global loss and the global metrics
        assert max_rel_loss_diff(r["losses"], ref["losses"]) <= 1e-5, (r["losses"], ref["losses"])
        val = [m["val/loss"] for m in r["metrics"]]
        assert max_rel_loss_diff(val, [m["val/loss"] for m in ref["metrics"]]) <= 1e-5
    assert max_weight_diff(merge_weights(per_rank), ref["weights"]) <= 1e-5


@pytest.mark.parametrize("run", RUNS, ids=[_id(r) for r in RUNS])
def test_family_validation_metrics_match_one_process(run: tuple[Family, Layout],
                                                     two_ranks: list[dict],
                                                     reference: dict[str, dict]) -> None:
    ref = reference[run[0].name]["metrics"]
    for r in two_ranks:
        metrics = r[_id(run)]["metrics"]
        assert max_rel_metric_diff(metrics, ref) <= 1e-5, (metrics, ref)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.model.arch != "decoder"],
                         ids=lambda f: f.name)
@pytest.mark.parametrize("degree", ["tp", "pp"])
def test_tensor_and_pipeline_parallel_are_refused(family: Family, degree: str) -> None:
    cfg = TrainConfig(model=family.model, objective=ObjectiveConfig(name=family.objective),
                      seq_len=FAMILY_SEQ, global_batch_size=GLOBAL_BATCH, micro_batch_size=2,
                      precision="fp32")
    for layout in DATA_PARALLEL:  # the layouts proven above are accepted
        validate(dataclasses.replace(cfg, parallel=layout.parallel()), world_size=2)
    setattr(cfg.parallel, degree, 2)
    with pytest.raises(ConfigError, match=f"model.arch={family.model.arch} trains with data "
                       r"parallelism .* tensor and pipeline parallelism are implemented for "
                       r"the decoder only: set parallel.tp=1 and parallel.pp=1"):
        validate(cfg, world_size=2)
