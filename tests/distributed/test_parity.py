"""Every layout trains like one process, through the real train module: same initial weights
(bit for bit), per-step losses within 1e-5 relative, final weights within 1e-5, and the same
validation loss (the loader's fixed global set of windows) of the initial and final weights
within 1e-5 relative, over 10 fp32 steps of a tiny model.

Layouts run in four spawned process groups (2, 4 and 8 ranks, and 2 under DeepSpeed) that
train one layout after another, because starting ranks costs more than the tiny runs do. Each
layout still reports as its own test.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.helpers import run_distributed
from tests.distributed.parity import (
    SINGLE,
    STEPS,
    Layout,
    max_rel_loss_diff,
    max_weight_diff,
    merge_weights,
    train,
    train_many,
    write_val_data,
)

PP = dict(pp=2, micro_batch_size=4)  # grad_accum 2 schedule steps of 2 pipeline micro-batches
TWO_RANKS = [
    Layout("ddp", dp_replicate=2),
    Layout("fsdp", dp_shard=2),
    Layout("fsdp_no_reshard_ac_full", dp_shard=2, reshard_after_forward=False, ac_mode="full"),
    Layout("tp_sp", tp=2),
    Layout("tp_no_sp_ac_selective", tp=2, sequence_parallel=False, ac_mode="selective"),
    Layout("pp_gpipe", pp_schedule="GPipe", **PP),
    Layout("pp_1f1b", pp_schedule="1F1B", **PP),
    Layout("pp_interleaved_1f1b", pp_schedule="Interleaved1F1B", pp_virtual_stages=2, **PP),
    Layout("pp_looped_bfs", pp_schedule="LoopedBFS", pp_virtual_stages=2, **PP),
    Layout("pp_interleaved_zero_bubble", pp_schedule="InterleavedZeroBubble",
           pp_virtual_stages=2, **PP),
    Layout("pp_zbv_zero_bubble", pp_schedule="ZBVZeroBubble", pp_virtual_stages=2, **PP),
    Layout("pp_dualpipev", pp_schedule="DualPipeV", pp_virtual_stages=2, pp_microbatches=4,
           **PP),
]
FOUR_RANKS = [
    Layout("hsdp", dp_replicate=2, dp_shard=2, micro_batch_size=1),
    Layout("fsdp_tp", dp_shard=2, tp=2),
    Layout("ddp_tp", dp_replicate=2, tp=2, sequence_parallel=False),
    Layout("tp_pp", tp=2, pp=2, micro_batch_size=4),
    Layout("fsdp_pp_interleaved", dp_shard=2, pp=2, pp_schedule="Interleaved1F1B",
           pp_virtual_stages=2),
    # One block per stage: the sequence-parallel split and gather sit on the same block.
    Layout("tp_pp_interleaved", tp=2, pp=2, pp_schedule="Interleaved1F1B", pp_virtual_stages=2,
           micro_batch_size=4),
]
EIGHT_RANKS = [
    Layout("fsdp_tp_pp_ac", dp_shard=2, tp=2, pp=2, pp_schedule="Interleaved1F1B",
           pp_virtual_stages=2, ac_mode="full"),
]
ZERO = [Layout(f"zero{s}", zero_stage=s) for s in (1, 2, 3)]
DEEPSPEED_ENV = {"DS_ACCELERATOR": "cpu"}


def _ids(layouts: list[Layout]) -> list[str]:
    return [layout.name for layout in layouts]


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_val_data(tmp_path_factory.mktemp("parity-val"))


@pytest.fixture(scope="module")
def reference(val_dir: str) -> dict:
    ref = train(SINGLE, STEPS, val_dir)
    # The comparison is only meaningful if training moves the weights well beyond 1e-5.
    moved = max_weight_diff(ref["weights"], ref["initial"])
    assert moved > 1e-2
    return ref


@pytest.fixture(scope="module")
def two_ranks(val_dir: str) -> list[dict]:
    return run_distributed(train_many, 2, TWO_RANKS, STEPS, val_dir)


@pytest.fixture(scope="module")
def four_ranks(val_dir: str) -> list[dict]:
    return run_distributed(train_many, 4, FOUR_RANKS, STEPS, val_dir)


@pytest.fixture(scope="module")
def eight_ranks(val_dir: str) -> list[dict]:
    return run_distributed(train_many, 8, EIGHT_RANKS, STEPS, val_dir)


@pytest.fixture(scope="module")
def zero_ranks(val_dir: str) -> list[dict]:
    return run_distributed(train_many, 2, ZERO, STEPS, val_dir, env=DEEPSPEED_ENV)


def assert_parity(name: str, results: list[dict], ref: dict) -> None:
    per_rank = [r[name] for r in results]
    initial = merge_weights(per_rank, "initial")
    assert set(initial) == set(ref["initial"])
    for k, v in initial.items():
        assert torch.equal(v, ref["initial"][k]), f"{name}: initial {k} differs"
    for r in per_rank:  # every rank reports the global loss
        assert max_rel_loss_diff(r["losses"], ref["losses"]) <= 1e-5, (r["losses"], ref["losses"])
        # The same weights score the same on the fixed global validation windows.
        assert max_rel_loss_diff(r["val_losses"], ref["val_losses"]) <= 1e-5, (
            r["val_losses"], ref["val_losses"])
    assert max_weight_diff(merge_weights(per_rank), ref["weights"]) <= 1e-5


@pytest.mark.parametrize("layout", TWO_RANKS, ids=_ids(TWO_RANKS))
def test_two_ranks_match_one_process(layout: Layout, two_ranks: list[dict],
                                     reference: dict) -> None:
    assert_parity(layout.name, two_ranks, reference)


@pytest.mark.parametrize("layout", FOUR_RANKS, ids=_ids(FOUR_RANKS))
def test_four_ranks_match_one_process(layout: Layout, four_ranks: list[dict],
                                      reference: dict) -> None:
    assert_parity(layout.name, four_ranks, reference)


@pytest.mark.parametrize("layout", EIGHT_RANKS, ids=_ids(EIGHT_RANKS))
def test_eight_ranks_3d_matches_one_process(layout: Layout, eight_ranks: list[dict],
                                            reference: dict) -> None:
    assert_parity(layout.name, eight_ranks, reference)


@pytest.mark.parametrize("layout", ZERO, ids=_ids(ZERO))
def test_deepspeed_zero_matches_one_process(layout: Layout, zero_ranks: list[dict],
                                            reference: dict) -> None:
    assert_parity(layout.name, zero_ranks, reference)
