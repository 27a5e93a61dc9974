"""The tiny parity run of `parity.py` under a DeepSpeed engine (ZeRO stage `layout.zero_stage`)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from pretrain.models.llama import build_model
from pretrain.models.loss import cross_entropy
from pretrain.parallel import deepspeed_backend as ds
from pretrain.parallel.parallelize import clean_fqn, init_model_weights
from pretrain.train.optim import build_optimizer
from tests.distributed.parity import (
    GLOBAL_BATCH,
    OPTIM,
    SEED,
    TINY,
    Layout,
    micro_batches,
)


def train_deepspeed(layout: Layout, steps: int) -> dict:
    world = dist.get_world_size()
    rank = dist.get_rank()
    model = build_model(TINY, device="meta")
    init_model_weights(model, TINY, SEED, torch.device("cpu"))
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, OPTIM, torch.device("cpu"))
    config = ds.deepspeed_config(zero_stage=layout.zero_stage, precision="fp32",
                                 global_batch_size=GLOBAL_BATCH,
                                 micro_batch_size=layout.micro_batch_size, world_size=world,
                                 grad_clip=OPTIM.grad_clip)
    engine = ds.initialize(model, optimizer, config)
    losses, norms = [], []
    for step in range(steps):
        loss_sum = torch.zeros(())
        mbs = list(micro_batches(step, rank, world, layout.micro_batch_size))
        for x, y in mbs:
            loss_sum += ds.micro_step(engine, x, y, cross_entropy) / len(mbs)
        dist.all_reduce(loss_sum)
        losses.append(float(loss_sum) / world)
        norms.append(ds.grad_norm(engine))
    weights = {clean_fqn(k): v for k, v in ds.full_state_dict(engine).items()}
    return {"losses": losses, "grad_norms": norms, "weights": weights, "initial": initial,
            "rank": int(os.environ.get("RANK", 0))}
