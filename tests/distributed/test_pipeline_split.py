"""Pipeline stage slicing: layers per stage, stage placement, and names that stay those of the
whole model (so checkpoints do not depend on the layout)."""

from __future__ import annotations

import pytest

from pretrain.config import ModelConfig
from pretrain.errors import ConfigError
from pretrain.models.llama import build_model
from pretrain.parallel.pipeline import pipeline_split, stage_ids, stage_layers

CFG = ModelConfig(dim=32, n_layers=10, n_heads=4, vocab_size=64, multiple_of=32, max_seq_len=16)


def test_layers_split_evenly_extra_layers_first() -> None:
    assert stage_layers(10, 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert stage_layers(4, 4) == [[0], [1], [2], [3]]
    with pytest.raises(ConfigError, match="at least 5 layers"):
        stage_layers(4, 5)


def test_stage_placement_loop_and_v() -> None:
    assert [stage_ids(r, 2, 2, "Interleaved1F1B") for r in range(2)] == [[0, 2], [1, 3]]
    assert [stage_ids(r, 2, 2, "ZBVZeroBubble") for r in range(2)] == [[0, 3], [1, 2]]
    assert stage_ids(1, 4, 1, "1F1B") == [1]


def test_stages_keep_whole_model_names() -> None:
    model = build_model(CFG, device="meta")
    whole = {n for n, _ in model.named_parameters()}
    names: set[str] = set()
    for rank in range(2):
        for stage, part in pipeline_split(model, pp_rank=rank, pp=2, virtual_stages=2,
                                          schedule="Interleaved1F1B"):
            own = {n for n, _ in part.named_parameters()}
            assert not own & names  # no parameter on two stages
            names |= own
            assert (part.tok_embeddings is not None) == (stage == 0)
            assert (part.output is not None) == (part.norm is not None) == (stage == 3)
    assert names == whole
    assert len(list(model.layers)) == CFG.n_layers  # the source model is untouched
