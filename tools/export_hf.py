"""Turn a run's checkpoint into a Hugging Face directory that transformers' `from_pretrained`
and `AutoTokenizer.from_pretrained` load, as the class of the run's model (its `arch`, and an
encoder's `norm_position`, saved with the run): LlamaForCausalLM (decoder), BertForMaskedLM
(post-norm encoder), ModernBertForMaskedLM (pre-norm encoder) or T5ForConditionalGeneration
(encoder_decoder). Reads checkpoints of either backend (native DCP files, DeepSpeed ZeRO 1-3)
on one process.

A LoRA run's checkpoint holds the adapters only; its base comes from the `init_from` (or
seed) it names, checked by digest. Export it either way:

    pretrain-export-hf runs/NAME out/hf-model [--dtype bf16]
    pretrain-export-hf runs/LORA out/merged --merge-lora       base + adapters merged: a plain
                                                               LlamaForCausalLM
    pretrain-export-hf runs/LORA out/adapter --adapter [--base-name DIR]
                                                               a peft adapter directory
"""

from __future__ import annotations

import argparse
import sys

import torch

from pretrain.config import LoraConfig, ModelConfig
from pretrain.errors import CheckpointError, ConfigError
from pretrain.interop.hf import check_exportable, export_hf
from pretrain.interop.peft import export_peft_adapter
from pretrain.models.lora import is_lora_name, merge_lora
from pretrain.train.adapters import is_lora_run, load_lora_model
from pretrain.train.checkpoint import load_trainer_state, resolve_checkpoint
from pretrain.train.consolidate import load_model_for_export
from pretrain.train.initial import HF, kind_of

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _lora_state(path: str) -> dict | None:
    """The trainer state of a LoRA run's checkpoint at `path`, else None (also for a
    consolidated file: those hold whole models)."""
    try:
        state = load_trainer_state(resolve_checkpoint(path))
    except (CheckpointError, OSError, ValueError):
        return None
    return state if is_lora_run(state) else None


def _export_lora(args: argparse.Namespace) -> str:
    model, state = load_lora_model(args.checkpoint)
    saved = state["config"]
    cfg = ModelConfig(**saved["model"])
    if args.adapter:
        init_from = saved.get("init_from")
        base = args.base_name or (init_from if init_from and kind_of(init_from) == HF else None)
        adapters = {k: v for k, v in model.state_dict().items() if is_lora_name(k)}
        export_peft_adapter(adapters, cfg, LoraConfig(**saved["lora"]), args.out_dir,
                            base_model_name_or_path=base)
        return f"wrote peft adapter {args.out_dir} (base {base})"
    check_exportable(cfg)
    state_dict = merge_lora(model).state_dict()
    export_hf(state_dict, cfg, args.out_dir, tokenizer_path=args.tokenizer
              or state.get("tokenizer_path"), dtype=_DTYPES[args.dtype])
    return f"wrote {args.out_dir} ({cfg.name}, base + LoRA merged)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", help="run directory, checkpoints/ directory, one checkpoint, "
                   "or a file written by pretrain-consolidate")
    p.add_argument("out_dir", help="directory to write (config, safetensors, tokenizer)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the run's)")
    p.add_argument("--merge-lora", action="store_true",
                   help="LoRA run: merge the adapters into the base, write a plain model")
    p.add_argument("--adapter", action="store_true",
                   help="LoRA run: write a peft adapter directory (adapter_config.json, "
                   "adapter_model.safetensors) for the transformers base")
    p.add_argument("--base-name", help="--adapter: base_model_name_or_path to record (default: "
                   "init_from when it is a transformers directory)")
    args = p.parse_args(argv)
    try:
        lora = _lora_state(args.checkpoint)
        if args.merge_lora and args.adapter:
            raise ConfigError("pass one of --merge-lora and --adapter")
        if lora is None and (args.merge_lora or args.adapter):
            raise ConfigError(f"{args.checkpoint} is not a LoRA run's checkpoint (lora.rank=0); "
                              "drop --merge-lora / --adapter")
        if lora is not None:
            if not (args.merge_lora or args.adapter):
                raise ConfigError(f"{args.checkpoint} holds LoRA adapters, not a whole model; "
                                  "pass --merge-lora (a plain model) or --adapter (a peft "
                                  "adapter directory)")
            print(_export_lora(args))
            return 0
        state_dict, state = load_model_for_export(args.checkpoint)
        cfg = ModelConfig(**state["config"]["model"])
        check_exportable(cfg)
    except (CheckpointError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    export_hf(state_dict, cfg, args.out_dir, tokenizer_path=args.tokenizer
              or state.get("tokenizer_path"), dtype=_DTYPES[args.dtype])
    print(f"wrote {args.out_dir} ({cfg.name}, {cfg.arch}, step {state['counters']['step']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
