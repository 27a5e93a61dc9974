"""Low-rank adapters (LoRA, Hu et al. 2021) on the linear layers of a model, as plain modules.

`apply_lora(model, ...)` swaps each targeted `nn.Linear` (e.g. `layers.0.attention.wq`) for a
`LoraLinear` that keeps the base parameter under its name (`layers.0.attention.wq.weight`)
and adds two small matrices under `...wq.lora_a.weight` (r, in) and `...wq.lora_b.weight`
(out, r):

    y = W x + b + (alpha / r) · B(A(dropout(x)))

and freezes every other parameter (`requires_grad=False`). It works on the meta device, before
parallelism is applied, so FSDP/DDP wrap the adapters with the rest and the layout-independent
initialization covers them (`lora_init_`: A kaiming-uniform with a=sqrt(5), B zeros, as peft
does, so training starts from the base model's function). `merge_lora` folds the adapters back
into plain `nn.Linear` weights W + (alpha / r) · B A.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LORA_TARGETS",
    "LoraLinear",
    "apply_lora",
    "is_lora_name",
    "lora_init_",
    "lora_module_names",
    "merge_lora",
]

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
"""Module names that may carry adapters: attention.{wq,wk,wv,wo}, feed_forward.{w1,w2,w3}."""

_ADAPTER_PARTS = ("lora_a", "lora_b")


def is_lora_name(name: str) -> bool:
    """Whether a parameter name is an adapter's (`....lora_a.weight`, `....lora_b.weight`)."""
    return any(f"{part}." in name for part in _ADAPTER_PARTS)


class LoraLinear(nn.Module):
    """A frozen linear map plus a trainable low-rank update. `weight` (and `bias`) are the
    base layer's own parameters, so the base names and checkpoints do not change."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Linear(self.in_features, rank, bias=False, **factory)
        self.lora_b = nn.Linear(rank, self.out_features, bias=False, **factory)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_b(
            self.lora_a(self.dropout(x))) * self.scale

    def delta(self) -> Tensor:
        """(out, in) the adapter's update of the weight: (alpha / r) · B A."""
        return (self.lora_b.weight @ self.lora_a.weight) * self.scale

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, alpha={self.alpha}")


def lora_module_names(model: nn.Module, targets: list[str] | tuple[str, ...]) -> list[str]:
    """Names of the model's linear layers whose last name part is one of `targets`."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rpartition(".")[2] in targets
            and not is_lora_name(name + ".")]


def apply_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float,
               targets: list[str] | tuple[str, ...]) -> nn.Module:
    """Put adapters on the `targets` linears of `model` (in place; meta device or real) and
    freeze everything else. Returns `model`. ValueError if no layer matches."""
    names = lora_module_names(model, targets)
    if not names:
        raise ValueError(f"no linear layer of the model is named one of {list(targets)}; "
                         f"LoRA targets are any of {', '.join(LORA_TARGETS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        setattr(parent, child, LoraLinear(base, rank=rank, alpha=alpha, dropout=dropout))
    return model


def lora_init_(name: str, weight: Tensor, seed: int) -> None:
    """Initialize adapter parameter `name` (a full-size tensor) as peft does: A uniform kaiming
    (a=sqrt(5), nn.Linear's default) from a CPU generator seeded by the base `seed` and the
    name, so it is the same on every layout and device; B zeros, so the adapted model starts
    as the base."""
    with torch.no_grad():
        if ".lora_b." in name:
            weight.zero_()
            return
        digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        values = torch.empty(weight.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
        weight.copy_(values)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every `LoraLinear` of `model` (plain, unsharded) by an `nn.Linear` holding
    W + (alpha / r) · B A; in place, returns `model`."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLinear):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=module.weight.device, dtype=module.weight.dtype)
        linear.weight.copy_(module.weight + module.delta().to(module.weight.dtype))
        if module.bias is not None:
            linear.bias.copy_(module.bias)
        linear.requires_grad_(True)
        setattr(parent, child, linear)
    return model

