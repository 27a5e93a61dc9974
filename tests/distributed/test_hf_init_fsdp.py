"""init_from on 2 FSDP ranks (gloo): each rank loads its shards of a transformers LLaMA
(sharded safetensors, tied embeddings) straight into its DTensors, and the step-0 loss through
the real train module equals transformers' within 1e-5, as on one process."""

from __future__ import annotations

from pathlib import Path

from tests.distributed.helpers import run_distributed
from tests.distributed.hf_base import hf_loss, make_llama, step0_losses


def test_fsdp_step0_loss_equals_transformers(tmp_path: Path) -> None:
    untied = make_llama(tmp_path / "untied", 96, seed=3)
    tied = make_llama(tmp_path / "tied", 96, tie=True, shard=True, seed=4)
    names = ["untied", "tied"]
    results = run_distributed(step0_losses, 2, [str(tmp_path / n) for n in names], 2)
    for i, (name, model) in enumerate(zip(names, (untied, tied))):
        ref = hf_loss(model, 96)
        for rank in results:
            assert rank[i]["sharded"] == "DTensor"
            assert abs(rank[i]["loss"] - ref) < 1e-5, (name, rank[i], ref)
