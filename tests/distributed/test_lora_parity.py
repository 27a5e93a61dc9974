"""LoRA trains the same on every data-parallel layout: one process vs DDP vs FSDP (2 gloo
ranks), the real train module, fp32, the parity matrix's tiny model and batches. Losses and
adapter weights agree within 1e-5 (relative), the base weights are bit for bit unchanged after
training, the optimizer holds the adapters only, and an FSDP checkpoint (adapters and their
optimizer state, no base weights) loads back onto one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader

from pretrain.config import LoraConfig, output_whole_on_one_rank
from pretrain.data.loader import Batch
from pretrain.parallel.dims import ParallelDims
from pretrain.parallel.parallelize import clean_fqn
from pretrain.train.module import StepSettings, TrainModule, build_train_module
from tests.distributed.helpers import run_distributed
from tests.distributed.parity import (
    GLOBAL_BATCH,
    OPTIM,
    SEED,
    SINGLE,
    TINY,
    Layout,
    _full_weights,
    max_rel_loss_diff,
    merge_weights,
    micro_batches,
)

LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=["wq", "wk", "wv", "wo", "w1", "w2",
                                                           "w3"])
STEPS = 6
LAYOUTS = [Layout("ddp", dp_replicate=2), Layout("fsdp", dp_shard=2),
           Layout("fsdp_ac_full", dp_shard=2, ac_mode="full", micro_batch_size=1)]


def build_lora(layout: Layout) -> tuple[TrainModule, ParallelDims, int]:
    world = dist.get_world_size() if dist.is_initialized() else 1
    p = layout.parallel()
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, p.pp, world)
    mesh = dims.build_mesh("cpu")
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    settings = StepSettings(global_batch_size=GLOBAL_BATCH,
                            micro_batch_size=layout.micro_batch_size, precision="fp32",
                            activation_checkpointing=layout.ac_mode,
                            chunked_loss=output_whole_on_one_rank(p), seed=SEED, lora=LORA)
    module = build_train_module(model=TINY, optim=OPTIM, parallel=p, settings=settings,
                                dims=dims, mesh=mesh, device=torch.device("cpu"),
                                total_steps=STEPS)
    return module, dims, dp_rank


def train_lora(layout: Layout, ckpt_root: str) -> dict:
    module, dims, dp_rank = build_lora(layout)
    initial = _full_weights(module)
    n_state = len(module.optimizer.state)
    losses = []
    for step in range(STEPS):
        batches = (Batch(x, y) for x, y in
                   micro_batches(step, dp_rank, dims.dp, layout.micro_batch_size))
        losses.append(float(module.train_step(batches).loss))
    optimized = {id(p) for g in module.optimizer.param_groups for p in g["params"]}
    names = [clean_fqn(n) for n, p in module.model.named_parameters() if id(p) in optimized]
    # One more backward (no step): gradients exist for the adapters only.
    module.forward_backward(Batch(x, y) for x, y in
                            micro_batches(0, dp_rank, dims.dp, layout.micro_batch_size))
    grads = [clean_fqn(n) for n, p in module.model.named_parameters() if p.grad is not None]
    module.optimizer.zero_grad(set_to_none=True)
    ckpt = Path(ckpt_root) / layout.name
    module.write_checkpoint(ckpt)
    return {"losses": losses, "initial": initial, "weights": _full_weights(module),
            "optimized": names, "n_state_before": n_state,
            "n_state": len(module.optimizer.state), "grads": grads,
            "ckpt": str(ckpt)}


def train_layouts(layouts: list[Layout], ckpt_root: str) -> dict[str, dict]:
    return {layout.name: train_lora(layout, ckpt_root) for layout in layouts}


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("lora-ckpt"))


@pytest.fixture(scope="module")
def reference(ckpt_root: str) -> dict:
    return train_lora(SINGLE, ckpt_root)


@pytest.fixture(scope="module")
def two_ranks(ckpt_root: str) -> list[dict]:
    return run_distributed(train_layouts, 2, LAYOUTS, ckpt_root)


def _rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: list[str]) -> float:
    """The largest difference relative to the adapters' scale (their largest magnitude): B is
    small after a few steps, so a per-tensor ratio measures Adam's rounding noise on it."""
    scale = max(float(b[k].abs().max()) for k in keys)
    return max(float((a[k] - b[k]).abs().max()) for k in keys) / scale


def test_one_process_trains_adapters_only(reference: dict) -> None:
    init, final = reference["initial"], reference["weights"]
    adapters = sorted(k for k in init if ".lora_" in k)
    assert len(adapters) == 2 * 7 * TINY.n_layers
    assert sorted(reference["optimized"]) == adapters  # no optimizer state for the base
    assert reference["n_state_before"] == 0 and reference["n_state"] == len(adapters)
    assert sorted(reference["grads"]) == adapters  # no gradients for the base
    for k in init:
        if k not in adapters:
            assert torch.equal(init[k], final[k]), f"frozen {k} changed"
    # B starts at zero (the adapted model is the base), and training moves it well past 1e-5.
    assert all(float(init[k].abs().max()) == 0.0 for k in adapters if ".lora_b." in k)
    assert max(float((final[k] - init[k]).abs().max()) for k in adapters) > 1e-3


@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay.name for lay in LAYOUTS])
def test_two_ranks_match_one_process(layout: Layout, two_ranks: list[dict],
                                     reference: dict) -> None:
    per_rank = [r[layout.name] for r in two_ranks]
    initial, weights = merge_weights(per_rank, "initial"), merge_weights(per_rank)
    assert set(initial) == set(reference["initial"])
    for k, v in initial.items():
        assert torch.equal(v, reference["initial"][k]), f"{layout.name}: initial {k} differs"
    for r in per_rank:
        assert max_rel_loss_diff(r["losses"], reference["losses"]) <= 1e-5
        assert sorted(r["optimized"]) == sorted(reference["optimized"])
        assert sorted(r["grads"]) == sorted(reference["optimized"])
    adapters = [k for k in weights if ".lora_" in k]
    rel = _rel_diff(weights, reference["weights"], adapters)
    loss_rel = max_rel_loss_diff(per_rank[0]["losses"], reference["losses"])
    worst = max(float((weights[k] - reference["weights"][k]).abs().max()) for k in adapters)
    print(f"{layout.name}: losses {loss_rel:.1e} relative, adapters {worst:.1e} absolute "
          f"({rel:.1e} of their largest magnitude)")
    assert rel <= 1e-5
    for k in weights:
        if k not in adapters:
            assert torch.equal(weights[k], initial[k]), f"{layout.name}: frozen {k} changed"


def test_checkpoint_holds_adapters_and_loads_on_one_process(two_ranks: list[dict],
                                                            reference: dict) -> None:
    ckpt = two_ranks[0]["fsdp"]["ckpt"]
    keys = list(FileSystemReader(ckpt).read_metadata().state_dict_metadata)
    model_keys = [k for k in keys if k.startswith("app.model.")]
    assert model_keys and all(".lora_" in k for k in model_keys), model_keys[:3]
    assert any(k.startswith("app.optim.") and "lora_a" in k for k in keys)
    module, _, _ = build_lora(SINGLE)
    module.read_checkpoint(Path(ckpt))
    loaded = _full_weights(module)
    fsdp = merge_weights([r["fsdp"] for r in two_ranks])
    for k, v in fsdp.items():
        assert torch.equal(loaded[k], v), k
    assert len(module.optimizer.state) == len(model_keys)
