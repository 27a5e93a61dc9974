"""In-loop downstream evaluation (`hooks.evaluate_downstream`, the train module the trainer
builds) on 2 gloo ranks, FSDP and DDP: each rank scores its share of the items (an uneven
split, so one rank runs extra step-keeping forwards) and the global result equals one
process's."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist

from pretrain.config import DownstreamEvalConfig, ModelConfig, OptimConfig, ParallelConfig
from pretrain.data.builtin import iter_builtin_documents
from pretrain.data.tokenizer import Tokenizer, train_tokenizer
from pretrain.eval.synthetic import write_synthetic
from pretrain.eval.tasks import load_task
from tests.distributed.helpers import run_distributed

TASKS = ["hellaswag", "lambada", "winogrande"]
ITEMS = 13  # odd: the ranks' shares differ


def evaluate_on_layouts(tok_path: str, data_dir: str,
                        layouts: list[dict[str, int]]) -> list[dict[str, float]]:
    from pretrain.parallel.dims import ParallelDims
    from pretrain.train.hooks import evaluate_downstream
    from pretrain.train.module import StepSettings, build_train_module

    world = dist.get_world_size() if dist.is_initialized() else 1
    tok = Tokenizer.load(tok_path)
    cfg = ModelConfig(name="tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      vocab_size=tok.vocab_size, multiple_of=16, max_seq_len=64)
    evals = DownstreamEvalConfig(tasks=TASKS, data_dir=data_dir, limit=ITEMS, batch_size=3)
    items = {n: load_task(n, data_dir, limit=ITEMS) for n in TASKS}
    out = []
    for layout in layouts:
        parallel = ParallelConfig(fsdp_param_dtype="fp32", **layout)
        dims = ParallelDims(layout.get("dp_replicate", 1), layout.get("dp_shard", 1), 1, 1,
                            world)
        settings = StepSettings(global_batch_size=2 * dims.dp, micro_batch_size=2,
                                precision="fp32", seed=7)
        module = build_train_module(model=cfg, optim=OptimConfig(), parallel=parallel,
                                    settings=settings, dims=dims, mesh=dims.build_mesh("cpu"),
                                    device=torch.device("cpu"), total_steps=2)
        run = SimpleNamespace(module=module, dims=dims, mesh=module.mesh,
                              device=torch.device("cpu"), tokenizer=tok,
                              cfg=SimpleNamespace(evals=evals, seq_len=48),
                              counters=SimpleNamespace(step=0, last_downstream={}), sinks=[])
        metrics = evaluate_downstream(run, items)  # type: ignore[arg-type]
        metrics.pop("eval/downstream_s")
        out.append(metrics)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("downstream-ranks")
    docs = list(itertools.islice(iter_builtin_documents(), 120))
    train_tokenizer(docs, str(root / "tok.model"), vocab_size=600)
    write_synthetic(root / "data", ITEMS, tasks=TASKS)
    return {"tok": str(root / "tok.model"), "data": str(root / "data")}


def test_two_ranks_equal_one_process(files: dict[str, Any]) -> None:
    [one] = run_distributed(evaluate_on_layouts, 1, files["tok"], files["data"], [{}])
    two = run_distributed(evaluate_on_layouts, 2, files["tok"], files["data"],
                          [{"dp_shard": 2}, {"dp_replicate": 2}])
    [ref] = one
    assert set(ref) == {"eval/hellaswag/acc", "eval/hellaswag/acc_norm", "eval/lambada/acc",
                        "eval/lambada/perplexity", "eval/winogrande/acc"}
    for rank in two:
        for layout in rank:
            for name, value in ref.items():
                assert layout[name] == pytest.approx(value, rel=1e-5), name
    assert Path(files["data"]).is_dir()
