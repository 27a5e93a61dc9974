"""Quantizing a plain model and writing it as a quantized model directory. Below
`pretrain.train` (the trainer converts a QAT run with it); reading checkpoints, loading and
measuring live in `pretrain.quant.ptq`.

A quantized model directory (written atomically):

    quant.json   {"format": "pretrain-quantized", "scheme", "group_size", "quantized": [module
                 names], "source": where the weights came from, "trainer_state": the run's
                 trainer state (config, tokenizer path)}
    model.pt     the state dict: torchao tensor subclasses for the quantized linears' weights,
                 bf16 for everything else (embeddings, norms, `output`)

The float baseline is the same model in bf16 (`scheme=bf16`), so every row of a comparison
runs bf16 activations.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.errors import ConfigError
from pretrain.quant import torchao
from pretrain.quant.training import linear_filter, qat_base_config

FORMAT = "pretrain-quantized"
META = "quant.json"
WEIGHTS = "model.pt"
PTQ_SCHEMES = ("int8_weight_only", "int4_weight_only", "int8_dynamic_act_int4_weight")
"""int8_weight_only: int8 per-channel weights, bf16 activations. int4_weight_only: int4 weights
in groups (asymmetric, tinygemm layout: on CPU torchao's prototype Int4OpaqueTensor, the only
int4 weight-only layout 0.18 runs on CPU; on CUDA the tile-packed layout).
int8_dynamic_act_int4_weight: the QAT scheme's post-training twin (int4 weights stored one per
int8 byte by torchao's IntxUnpackedToInt8Tensor, so the file is int8-sized)."""
SCHEMES = ("bf16", *PTQ_SCHEMES)


def check_scheme(scheme: str, group_size: int = 32) -> None:
    """ConfigError for a scheme or group size the quantization would refuse later."""
    if scheme not in SCHEMES:
        raise ConfigError(f"--scheme {scheme!r}; use one of {', '.join(PTQ_SCHEMES)}")
    if scheme == "int4_weight_only" and group_size not in (32, 64, 128):
        # the tinygemm int4 kernels take these group sizes only
        raise ConfigError(f"--group-size {group_size} with int4_weight_only; use 32, 64 or 128")
    if group_size <= 0:
        raise ConfigError(f"--group-size {group_size}; use a positive divisor of the model dim")


def ptq_config(scheme: str, group_size: int, device: torch.device):  # noqa: ANN201
    """The torchao config of a PTQ scheme on `device`."""
    check_scheme(scheme)
    ao = torchao()
    q = ao.quantization
    if scheme == "int8_weight_only":
        return q.Int8WeightOnlyConfig()
    if scheme == "int4_weight_only":
        if device.type == "cuda":
            return q.Int4WeightOnlyConfig(group_size=group_size,
                                          int4_packing_format="tile_packed_to_4d")
        proto = ao.prototype.quantization.int4.inference_workflow
        return proto.PrototypeInt4WeightOnlyConfig(group_size=group_size)
    return qat_base_config(scheme, group_size)


def to_bf16(model: nn.Module) -> nn.Module:
    """Parameters to bf16; the rotary table stays fp32 (apply_rotary computes in fp32)."""
    rope = getattr(model, "rope_cache", None)
    model.to(torch.bfloat16)
    if rope is not None:
        model.rope_cache = rope
    return model


def quantize_model(model: nn.Module, scheme: str, group_size: int, *,
                   include_output: bool = False) -> list[str]:
    """Quantize a plain model's eligible linears in place (bf16 first); returns their names.
    The linears are those QAT and fp8 swap (`pretrain.quant.training.linear_filter`), and the
    output projection with `include_output`."""
    check_scheme(scheme, group_size)
    out, emb = getattr(model, "output", None), getattr(model, "tok_embeddings", None)
    if include_output and out is not None and emb is not None and out.weight is emb.weight:
        # a quantized output would untie (and change) the embedding it shares
        raise ConfigError("--include-output with tied embeddings (model.tie_embeddings=true); "
                          "drop --include-output for this model")
    to_bf16(model)
    if scheme == "bf16":
        return []
    device = next(model.parameters()).device
    keep = linear_filter(1 if scheme == "int8_weight_only" else group_size, include_output)
    names = [n for n, m in model.named_modules() if keep(m, n)]
    torchao().quantization.quantize_(model, ptq_config(scheme, group_size, device),
                                     filter_fn=keep)
    return names


def write_quantized(model: nn.Module, out: str | Path, meta: dict[str, Any]) -> Path:
    """Write `model` and `meta` as a quantized model directory `out` (atomically: a `.tmp`
    sibling renamed into place; an existing `out` is replaced only once the new one is whole)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(model.state_dict(), tmp / WEIGHTS)
    (tmp / META).write_text(json.dumps({"format": FORMAT, **meta}, indent=2, default=str))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
