"""One process reads a finished run's checkpoint: the model with its weights (`pretrain-generate`),
a full state dict (`pretrain-export-hf`), or one consolidated file (`pretrain-consolidate`).
Works for checkpoints written on any layout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from pretrain.config import ModelConfig
from pretrain.models.llama import build_model
from pretrain.train.checkpoint import load_checkpoint, load_trainer_state, resolve_checkpoint


def load_model_from_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The run's model on CPU with the checkpoint's weights, and the run's trainer state."""
    ckpt = resolve_checkpoint(path)
    state = load_trainer_state(ckpt)
    model = build_model(ModelConfig(**state["config"]["model"]), device="cpu")
    with torch.no_grad():
        model.init_weights()  # buffers (RoPE) are not in the checkpoint
    load_checkpoint(ckpt, model, None)
    return model, state


def load_model_for_export(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A full (unsharded) model state dict and the run's trainer state, on one process, from a
    sharded checkpoint (any layout) or a file written by `consolidate`."""
    if Path(path).is_file():
        blob = torch.load(path, map_location="cpu", weights_only=False)
        return blob["model"], blob["state"]
    model, state = load_model_from_checkpoint(path)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)), state


def consolidate(path: str | Path, out_file: str | Path) -> Path:
    """Gather a sharded checkpoint into one torch file: {'model': full state dict, 'state':
    trainer state (config, counters, tokenizer path)}. Written atomically."""
    state_dict, state = load_model_for_export(path)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({"model": state_dict, "state": state}, tmp)
    os.replace(tmp, out)
    return out
