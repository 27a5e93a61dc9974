"""Validation per source (and with eval.stride) on 2 gloo ranks equals one process: the same
`val/loss`, `val/loss/<source>` and `val/ppl/<source>` within 1e-6 relative, under FSDP and
DDP with micro-batches that leave padding rows."""

from __future__ import annotations

from pathlib import Path

from pretrain.data.loader import ShardedWindowLoader
from tests.distributed.helpers import run_distributed
from tests.distributed.parity import SEQ, SINGLE, TINY, Layout, build
from tests.unit.test_per_source_val import WEIGHTS, write_mixture

N = 13
LAYOUTS = [Layout("fsdp", dp_shard=2, micro_batch_size=2),
           Layout("ddp", dp_replicate=2, micro_batch_size=4)]


def evaluate_mixture(dirs: dict[str, str], layouts: list[Layout]) -> dict[str, list[dict]]:
    """Per layout: the initial weights' validation (plain, then stride 5), by source."""
    out = {}
    for layout in layouts:
        module, dims, dp_rank = build(layout, 1)
        val = ShardedWindowLoader(dirs, "val", seq_len=SEQ, dp_rank=dp_rank, dp_size=dims.dp,
                                  micro_batch_size=layout.micro_batch_size,
                                  vocab_size=TINY.vocab_size, weights=WEIGHTS)
        out[layout.name] = [module.evaluate(val.eval_windows(N, stride=s, by_source=True))
                            for s in (None, 5)]
    return out


def test_two_ranks_equal_one(tmp_path: Path) -> None:
    dirs = write_mixture(tmp_path)
    (want,) = evaluate_mixture(dirs, [SINGLE]).values()
    assert {"val/loss/a", "val/loss/b", "val/ppl/a"} <= set(want[0])
    for rank in run_distributed(evaluate_mixture, 2, dirs, LAYOUTS):
        for name, got in rank.items():
            for g, w in zip(got, want, strict=True):
                assert set(g) == set(w), name
                for k in w:
                    assert abs(g[k] - w[k]) <= 1e-6 * abs(w[k]), (name, k, g[k], w[k])
