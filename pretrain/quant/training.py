"""fp8 training and quantization-aware training: module swaps applied to a plain model (on the
meta device or materialized) before `parallelize`, by the train module's build.

Which linears: every `nn.Linear` of the blocks whose in and out features divide by the scheme's
multiple (16 for fp8's matmul kernels, the group size for int4 groups). By default not `output`:
as in torchtitan, the output projection stays in high precision (it feeds the softmax directly,
and the chunked loss multiplies by `output.weight` itself, which a swapped module would not
see). `quant.include_output` (QAT, with loss=full) and `--include-output` (PTQ) quantize it
too, as torchao's Llama QAT recipes measure (int4 output projection).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from pretrain.config import QuantConfig
from pretrain.errors import ConfigError
from pretrain.quant import torchao

FP8_RECIPES = ("tensorwise", "rowwise")
QAT_SCHEMES = ("int8_dynamic_act_int4_weight",)
# fp8 matmuls (torch._scaled_mm) need both dims of each operand to divide by 16.
FP8_MULTIPLE = 16
# Module names never quantized (see the module docstring).
SKIPPED = ("output",)


def linear_filter(multiple: int, include_output: bool = False):  # noqa: ANN201 (torchao's)
    """torchao's module filter: (module, fully qualified name) -> swap it or not."""
    skipped = () if include_output else SKIPPED

    def keep(module: nn.Module, fqn: str) -> bool:
        return (isinstance(module, nn.Linear) and fqn.rsplit(".", 1)[-1] not in skipped
                and module.in_features % multiple == 0 and module.out_features % multiple == 0)
    return keep


def fp8_hardware(device: torch.device) -> str | None:
    """None when `device` runs fp8 matmuls, else what it is (for the error)."""
    if device.type != "cuda":
        return f"device {device.type}"
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    return None


def check_fp8(device: torch.device, quant: QuantConfig) -> None:
    """One ConfigError, before any work, where precision=fp8 cannot run."""
    if quant.fp8_recipe not in FP8_RECIPES:
        raise ConfigError(f"quant.fp8_recipe={quant.fp8_recipe!r}; use one of "
                          f"{', '.join(FP8_RECIPES)}")
    lacking = fp8_hardware(device)
    if lacking is not None and not quant.fp8_emulate:
        raise ConfigError(
            f"precision=fp8 needs a CUDA GPU with fp8 matmuls (compute capability 8.9+: Ada, "
            f"Hopper, Blackwell), not {lacking}; use precision=bf16 (quant.fp8_emulate=true "
            "emulates fp8 for tests only)")


def convert_fp8(model: nn.Module, quant: QuantConfig) -> list[str]:
    """Swap the eligible linears of `model` for torchao's Float8Linear (in place); returns
    their names. The weights stay high precision; each matmul casts to float8 with the
    recipe's scales (tensorwise: one per tensor; rowwise: one per row)."""
    ao = torchao()
    config = ao.float8.Float8LinearConfig.from_recipe_name(quant.fp8_recipe)
    if quant.fp8_emulate:
        config = replace(config, emulate=True)
    keep = linear_filter(FP8_MULTIPLE)
    names = [n for n, m in model.named_modules() if keep(m, n)]
    ao.float8.convert_to_float8_training(model, module_filter_fn=keep, config=config)
    return names


def qat_base_config(scheme: str, group_size: int):  # noqa: ANN201 (a torchao config)
    """The torchao post-training config a QAT scheme fake-quantizes towards (and converts to)."""
    ao = torchao()
    if scheme == "int8_dynamic_act_int4_weight":
        return ao.quantization.Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4,
            weight_granularity=ao.quantization.granularity.PerGroup(group_size))
    raise ConfigError(f"quant.qat={scheme!r}; use one of {', '.join(QAT_SCHEMES)} (or null)")


def prepare_qat(model: nn.Module, quant: QuantConfig) -> list[str]:
    """Swap the eligible linears for torchao's FakeQuantizedLinear (in place): the forward
    quantizes and dequantizes activations and weights as the converted model will, the
    backward passes gradients straight through. Returns their names; parameter names do not
    change, so checkpoints load into the plain model."""
    ao = torchao()
    base = qat_base_config(quant.qat or "", quant.group_size)
    keep = linear_filter(quant.group_size, quant.include_output)
    names = [n for n, m in model.named_modules() if keep(m, n)]
    ao.quantization.quantize_(model, ao.quantization.qat.QATConfig(base, step="prepare"),
                              filter_fn=keep)
    return names


def apply_training_quant(model: nn.Module, *, precision: str, quant: QuantConfig,
                         device: torch.device) -> list[str]:
    """What `precision` and `quant` ask of the model before parallelize: the swapped names."""
    if precision == "fp8":
        check_fp8(device, quant)
        return convert_fp8(model, quant)
    if quant.qat:
        return prepare_qat(model, quant)
    return []
