"""Post-training quantization of a run's checkpoint into a quantized model directory (its
layout: `pretrain.quant.export`), the directory's loading (for `pretrain-generate`), and the
measurements of the README's table: validation loss, generation speed, size on disk.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from pretrain.config import DataConfig, ModelConfig
from pretrain.data.build import build_loader, ensure_data
from pretrain.data.loader import Batch
from pretrain.errors import CheckpointError, ConfigError
from pretrain.eval.generate import generate
from pretrain.models.build import build_model
from pretrain.models.loss import IGNORE_INDEX
from pretrain.quant import torchao
from pretrain.quant.export import (
    FORMAT,
    META,
    WEIGHTS,
    check_scheme,
    quantize_model,
    to_bf16,
    write_quantized,
)
from pretrain.train.checkpoint import resolve_checkpoint
from pretrain.train.consolidate import load_model_from_checkpoint
from pretrain.train.module import model_loss


def quantize_checkpoint(checkpoint: str | Path, out: str | Path, *, scheme: str,
                        group_size: int = 32,
                        include_output: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Read a run's checkpoint (run dir, checkpoints/ or one step), quantize (the output
    projection too with `include_output`), write `out`; returns the quantized model and the
    directory's metadata."""
    check_scheme(scheme, group_size)  # before any file is read
    ckpt = resolve_checkpoint(checkpoint)
    model, state = load_model_from_checkpoint(ckpt)
    arch = state["config"]["model"].get("arch", "decoder")
    if arch != "decoder":
        raise ConfigError(f"checkpoint {ckpt} is a model.arch={arch}; pretrain-quantize "
                          "quantizes decoders")
    names = quantize_model(model, scheme, group_size, include_output=include_output)
    meta = {"scheme": scheme, "group_size": group_size, "include_output": include_output,
            "quantized": names, "source": str(ckpt), "trainer_state": state}
    write_quantized(model, Path(out), meta)
    return model, meta


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


def read_meta(path: str | Path) -> dict[str, Any]:
    meta_file = Path(path) / META
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {meta_file} ({e}); pass a directory written by "
                              "pretrain-quantize") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_file} is not a {FORMAT} file; pass a directory written "
                              "by pretrain-quantize")
    return meta


def load_quantized(path: str | Path,
                   device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The quantized model of a directory written by `quantize_checkpoint` (or a QAT run's
    runs/NAME/quantized/), in eval mode, and its metadata."""
    meta = read_meta(path)
    torchao()  # registers the tensor subclasses that weights_only loading accepts
    state = meta["trainer_state"]
    model = to_bf16(build_model(ModelConfig(**state["config"]["model"]), device=device))
    weights = torch.load(Path(path) / WEIGHTS, map_location=device, weights_only=True)
    # assign: the quantized tensors replace the float parameters (their types differ)
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval(), meta


def load_for_generation(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """For `pretrain-generate`: a quantized model directory, else a run's checkpoint; returns
    (model, trainer state)."""
    if is_quantized_dir(path):
        model, meta = load_quantized(path)
        return model, meta["trainer_state"]
    return load_model_from_checkpoint(path)


def trainer_state_of(path: str | Path) -> dict[str, Any] | None:
    """The trainer state stored in a quantized model directory; None for anything else."""
    return read_meta(path)["trainer_state"] if is_quantized_dir(path) else None


# -- measurements --------------------------------------------------------------------------


def validation_batches(state: dict[str, Any], n_windows: int | None = None,
                       micro_batch_size: int = 8) -> list[Batch]:
    """The run's first `n_windows` (default: its eval_windows) validation windows, as the
    trainer's evaluation reads them (next-token prediction: decoders)."""
    cfg = state["config"]
    data_cfg: DataConfig = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(DataConfig), cfg["data"]))
    data = ensure_data(data_cfg, vocab_size=cfg["model"]["vocab_size"])
    loader = build_loader(data_cfg, data, "val", seq_len=cfg["seq_len"],
                          micro_batch_size=micro_batch_size, dp_rank=0, dp_size=1,
                          seed=cfg["seed"], vocab_size=cfg["model"]["vocab_size"])
    return list(loader.eval_windows(n_windows or cfg["eval_windows"]))


@torch.no_grad()
def validation_loss(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Token-weighted mean loss over `batches` (padding rows carry IGNORE_INDEX targets), as
    `TrainModule.evaluate` computes it, from the model's full logits."""
    total, count = 0.0, 0
    for batch in batches:
        n = int((batch.targets != IGNORE_INDEX).sum())
        if n:
            total += float(model_loss(model, batch, chunked=False)) * n
            count += n
    return total / max(count, 1)


@dataclass
class Speed:
    tokens_per_s: float
    new_tokens: int


@torch.no_grad()
def generation_speed(model: nn.Module, prompt_ids: list[int], *, new_tokens: int,
                     repeats: int = 3, warmup: bool = True) -> Speed:
    """Greedy decoding with the KV cache and no EOS stop, so every model makes `new_tokens`;
    the best of `repeats` timed runs (after one untimed warm-up run with `warmup`)."""
    best, n = 0.0, 0
    for i in range(repeats + int(warmup)):
        t = time.perf_counter()
        n = len(generate(model, prompt_ids, max_new_tokens=new_tokens, temperature=0.0))
        if i or not warmup:
            best = max(best, n / (time.perf_counter() - t))
    return Speed(best, n)


def size_on_disk(path: str | Path) -> int:
    """Bytes of the weights file of a quantized model directory."""
    return (Path(path) / WEIGHTS).stat().st_size
