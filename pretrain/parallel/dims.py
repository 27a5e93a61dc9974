"""The one object that owns the world layout: degrees, validation, and the named DeviceMesh."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from pretrain.errors import ConfigError


@dataclass
class ParallelDims:
    """dp_replicate × dp_shard × tp × pp must equal the world size (dp_shard=-1 infers)."""

    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    world_size: int

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "tp", "pp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        fixed = self.dp_replicate * self.tp * self.pp
        if self.dp_shard == -1:
            if self.world_size % fixed:
                raise ConfigError(
                    f"world size {self.world_size} is not divisible by dp_replicate*tp*pp="
                    f"{fixed}; change the degrees or the number of processes"
                )
            self.dp_shard = self.world_size // fixed
        if self.dp_shard < 1 or fixed * self.dp_shard != self.world_size:
            raise ConfigError(
                f"parallel degrees dp_replicate={self.dp_replicate} × dp_shard={self.dp_shard}"
                f" × tp={self.tp} × pp={self.pp} = {fixed * max(self.dp_shard, 0)} but the "
                f"world size is {self.world_size}; make the product equal the number of "
                "processes (or set parallel.dp_shard=-1 to infer it)"
            )

    @property
    def dp(self) -> int:
        """Total data-parallel degree (replicate × shard)."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """A mesh with dims ('pp', 'dp_replicate', 'dp_shard', 'tp') and flattened 'dp'."""
        if self.world_size == 1:
            return None
        names, sizes = [], []
        for name, size in (("pp", self.pp), ("dp_replicate", self.dp_replicate),
                           ("dp_shard", self.dp_shard), ("tp", self.tp)):
            names.append(name)
            sizes.append(size)
        mesh = init_device_mesh(device_type, tuple(sizes), mesh_dim_names=tuple(names))
        mesh["dp_replicate", "dp_shard"]._flatten(mesh_dim_name="dp")
        return mesh


@dataclass
class DistEnv:
    """What torchrun / the deepspeed launcher put in the environment."""

    rank: int
    local_rank: int
    world_size: int

    @classmethod
    def from_env(cls) -> DistEnv:
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @cached_property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def init_distributed(env: DistEnv, device: torch.device, timeout_s: int, *,
                     always: bool = False) -> None:
    """Create the default process group when launched with more than one process, or with
    `always` (the DeepSpeed engine needs one even for a single rank) when a launcher set the
    rendezvous address."""
    alone = env.world_size == 1 and not (always and "MASTER_ADDR" in os.environ)
    if alone or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
