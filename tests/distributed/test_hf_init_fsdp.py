"""init_from on 2 ranks (gloo): under FSDP (and tensor parallel) each rank loads its shards of a
transformers LLaMA (one file, or sharded safetensors with tied embeddings) straight into its
DTensors, under pipeline parallelism each stage its parameters (the tied output of the last
stage from the embedding); the step-0 loss through the real train module equals
transformers' within 1e-5, as on one process."""

from __future__ import annotations

from pathlib import Path

from tests.distributed.helpers import run_distributed
from tests.distributed.hf_base import hf_loss, make_llama, step0_losses


def test_sharded_step0_loss_equals_transformers(tmp_path: Path) -> None:
    untied = make_llama(tmp_path / "untied", 96, seed=3)
    tied = make_llama(tmp_path / "tied", 96, tie=True, shard=True, seed=4)
    runs = [("untied", {"dp_shard": 2}), ("tied", {"dp_shard": 2}), ("tied", {"tp": 2}),
            ("tied", {"pp": 2})]  # pipeline: the tied output on the last stage
    results = run_distributed(step0_losses, 2, [(str(tmp_path / n), lay) for n, lay in runs])
    refs = {"untied": hf_loss(untied, 96), "tied": hf_loss(tied, 96)}
    for i, (name, layout) in enumerate(runs):
        for rank in results:
            assert rank[i]["sharded"] == "DTensor" or "pp" in layout
            assert abs(rank[i]["loss"] - refs[name]) < 1e-5, (name, layout, rank[i], refs[name])
