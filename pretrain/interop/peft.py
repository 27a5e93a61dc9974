"""LoRA adapters as a `peft` adapter directory, which loads onto the transformers base:

    PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter_dir)

The directory holds `adapter_config.json` (r, lora_alpha, lora_dropout, target_modules under
HF's module names, base_model_name_or_path) and `adapter_model.safetensors` under peft's
names: our `layers.N.attention.wq.lora_a.weight` (r, in) is
`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`, and `lora_b` is `lora_B`
(out, r). The base names come from the one mapping in `pretrain.interop.hf`. Our rotary
convention is HF's "rotate half", so the export of wq/wk applies no permutation, and neither
does the export of their lora_B. peft's update is lora_B(lora_A(dropout(x))) · lora_alpha / r,
as ours is.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from pretrain.config import LoraConfig, ModelConfig
from pretrain.interop.hf import to_hf_key

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_OURS_TO_PEFT = {"lora_a": "lora_A", "lora_b": "lora_B"}


def hf_target_modules(targets: list[str], cfg: ModelConfig) -> list[str]:
    """HF module names of our LoRA targets (wq -> q_proj, w1 -> gate_proj, ...)."""
    out = []
    for target in targets:
        module = "attention" if target in ("wq", "wk", "wv", "wo") else "feed_forward"
        hf = to_hf_key(f"layers.0.{module}.{target}.weight", cfg)
        out.append(hf.removesuffix(".weight").rpartition(".")[2])
    return out


def peft_key(key: str, cfg: ModelConfig) -> str:
    """peft's name of our adapter parameter `key` (`layers.0.attention.wq.lora_a.weight` ->
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`)."""
    module, part, param = key.rsplit(".", 2)
    if part not in _OURS_TO_PEFT or param != "weight":
        raise ValueError(f"{key!r} is not a LoRA adapter parameter (….lora_a/lora_b.weight)")
    base = to_hf_key(f"{module}.weight", cfg).removesuffix(".weight")
    return f"{_PEFT_PREFIX}{base}.{_OURS_TO_PEFT[part]}.weight"


def export_peft_adapter(adapters: dict[str, Tensor], cfg: ModelConfig, lora: LoraConfig,
                        out_dir: str | Path, *, base_model_name_or_path: str | None) -> Path:
    """Write `adapters` (our adapter parameters, whole, by our names) as a peft LoRA adapter
    directory for the LlamaForCausalLM of `cfg`. Returns out_dir."""
    from safetensors.torch import save_file

    if cfg.arch != "decoder":
        raise ValueError(f"model.arch={cfg.arch}: peft adapters are exported for decoders "
                         "(LlamaForCausalLM)")
    tensors = {peft_key(k, cfg): v.detach().to("cpu").contiguous() for k, v in adapters.items()}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(hf_target_modules(list(lora.targets), cfg)),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
