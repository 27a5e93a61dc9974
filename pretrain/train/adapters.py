"""The base a LoRA run's checkpoints need. They hold the adapters (and their optimizer state)
but not the frozen base weights, which come back from `init_from` (or, without it, from the
seed's random initialization) on resume and export. So each checkpoint records which base
that was, under the trainer-state key `lora_base`:

    {"path": ..., "kind": "hf" | "pretrain", "digest": sha256}   init_from (`describe_base`)
    {"path": null, "kind": "random", "seed": S, "digest": ...}   the seed's initialization

and a resume or export whose base has another digest, or is missing, is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.config import LoraConfig, ModelConfig
from pretrain.errors import CheckpointError, ConfigError
from pretrain.models.build import build_model
from pretrain.models.lora import apply_lora
from pretrain.parallel.parallelize import init_model_weights
from pretrain.train import checkpoint as ckpt
from pretrain.train.initial import describe_base, load_initial_weights

BASE_KEY = "lora_base"
"""The trainer-state key of the base record."""
RANDOM = "random"


def base_record(init_from: str | None, model: ModelConfig, seed: int) -> dict[str, Any]:
    """The base the adapters train on: `init_from`'s description, or the random
    initialization of `model` with `seed` (which fixes its weights on every layout)."""
    if init_from is not None:
        return describe_base(init_from)
    fields = {k: v for k, v in dataclasses.asdict(model).items() if k != "name"}  # a label
    shape = json.dumps(fields, sort_keys=True)
    digest = hashlib.sha256(f"{shape}\0seed={seed}".encode()).hexdigest()
    return {"path": None, "kind": RANDOM, "seed": seed, "digest": digest}


def _name(record: dict[str, Any]) -> str:
    if record.get("kind") == RANDOM:
        return f"the random initialization with seed={record.get('seed')}"
    return f"init_from={record.get('path')}"


def _fix(record: dict[str, Any]) -> str:
    if record.get("kind") == RANDOM:
        return f"drop init_from and set seed={record.get('seed')}"
    return f"set init_from={record.get('path')} (those exact weights)"


def check_base(ckpt: Path, saved_state: dict[str, Any], init_from: str | None,
               model: ModelConfig, seed: int) -> None:
    """CheckpointError (one line) unless the base of LoRA checkpoint `ckpt` (its trainer
    state `saved_state`) is the one `init_from` / `seed` give now."""
    saved = saved_state.get(BASE_KEY)
    if not saved:
        raise CheckpointError(f"checkpoint {ckpt} holds LoRA adapters but names no base "
                              f"({BASE_KEY} in its trainer_state.json); it cannot be "
                              "resumed or exported: start a new run")
    try:
        now = base_record(init_from, model, seed)
    except (ConfigError, CheckpointError) as e:
        raise CheckpointError(f"checkpoint {ckpt} holds LoRA adapters for {_name(saved)}, "
                              f"which cannot be read now ({e}); {_fix(saved)}") from e
    if now["digest"] != saved["digest"]:
        raise CheckpointError(
            f"checkpoint {ckpt} holds LoRA adapters for {_name(saved)} (digest "
            f"{saved['digest'][:12]}), not for {_name(now)} (digest {now['digest'][:12]}); "
            f"{_fix(saved)}, or start a new run (another run_name, or resume=none)")


def lora_mismatches(now: LoraConfig, saved: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, configured value, checkpoint's value) for the LoRA fields that change the
    parameter set: rank (incl. on/off) and targets."""
    found = []
    if now.rank != saved.get("rank", 0):
        found.append(("lora.rank", now.rank, saved.get("rank", 0)))
    if now.rank and saved.get("rank") and sorted(now.targets) != sorted(saved.get("targets", [])):
        found.append(("lora.targets", f"[{','.join(now.targets)}]",
                      f"[{','.join(saved.get('targets', []))}]"))
    return found


def is_lora_run(state: dict[str, Any]) -> bool:
    """Whether a checkpoint's trainer state is a LoRA run's (its tensors: adapters only)."""
    return int(state.get("config", {}).get("lora", {}).get("rank", 0) or 0) > 0


def load_lora_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A LoRA run's model on the CPU, in eval mode: its base (from the `init_from` or seed the
    checkpoint names, checked by digest) with the checkpoint's adapters; and the trainer state.
    One process, any layout the checkpoint was written on."""
    found = ckpt.resolve_checkpoint(path)
    state = ckpt.load_trainer_state(found)
    saved = state["config"]
    model_cfg = ModelConfig(**{k: v for k, v in saved["model"].items()
                               if k in ModelConfig.__dataclass_fields__})
    lora = LoraConfig(**saved["lora"])
    init_from, seed = saved.get("init_from"), int(saved["seed"])
    check_base(found, state, init_from, model_cfg, seed)
    model = apply_lora(build_model(model_cfg, device="meta"), rank=lora.rank, alpha=lora.alpha,
                       dropout=lora.dropout, targets=lora.targets)
    cpu = torch.device("cpu")
    init_model_weights([model], model_cfg, seed, cpu)
    if init_from is not None:
        load_initial_weights([model], init_from, model_cfg)
    ckpt.load_checkpoint(found, model)  # the adapters only: the model has a frozen base
    return model.eval(), state
