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

Every export checks itself before it reports success: transformers loads what was written
(peft an adapter, onto the transformers model of the base) and its logits on a fixed batch
must match ours within 1e-4 x max(1, max |logit|) (fp32; pretrain/interop/verify.py). It
prints the largest difference. On a mismatch it prints one error line naming the difference,
where it is and the tolerance, renames the directory OUT.unverified (NOT_VERIFIED.txt inside
says why) and exits 1. --no-verify skips the check (it holds the model twice in memory).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

from pretrain.config import LoraConfig, ModelConfig
from pretrain.errors import CheckpointError, ConfigError
from pretrain.interop.hf import check_exportable, export_hf
from pretrain.interop.peft import export_peft_adapter
from pretrain.interop.verify import (
    ExportMismatch,
    mark_unverified,
    reference_model,
    verify_adapter,
    verify_export,
)
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
        weights = model.state_dict()
        adapters = {k: v for k, v in weights.items() if is_lora_name(k)}
        export_peft_adapter(adapters, cfg, LoraConfig(**saved["lora"]), args.out_dir,
                            base_model_name_or_path=base)
        print(f"wrote peft adapter {args.out_dir} (base {base})")
        if not args.no_verify:  # onto the transformers model of the very base weights we hold
            base_weights = {k: v for k, v in weights.items() if not is_lora_name(k)}
            return str(verify_adapter(args.out_dir, cfg, model, base_weights))
        return _NOT_VERIFIED
    check_exportable(cfg)
    state_dict = merge_lora(model).state_dict()
    dtype = _DTYPES[args.dtype]
    export_hf(state_dict, cfg, args.out_dir, tokenizer_path=args.tokenizer
              or state.get("tokenizer_path"), dtype=dtype)
    print(f"wrote {args.out_dir} ({cfg.name}, base + LoRA merged)")
    return _verify(args, state_dict, cfg, dtype)


_NOT_VERIFIED = "not verified (--no-verify)"


def _verify(args: argparse.Namespace, state_dict: dict[str, torch.Tensor], cfg: ModelConfig,
            dtype: torch.dtype) -> str:
    """The check of a whole-model export against our model holding the exported weights."""
    if args.no_verify:
        return _NOT_VERIFIED
    return str(verify_export(args.out_dir, cfg, reference_model(state_dict, cfg, dtype)))


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
    p.add_argument("--no-verify", action="store_true",
                   help="skip loading the export back and comparing logits with ours (for "
                   "models too large to hold twice in memory)")
    args = p.parse_args(argv)
    _quiet_transformers()
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
            return _checked(lambda: _export_lora(args), args.out_dir)
        state_dict, state = load_model_for_export(args.checkpoint)
        cfg = ModelConfig(**state["config"]["model"])
        check_exportable(cfg)
    except (CheckpointError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def export() -> str:
        dtype = _DTYPES[args.dtype]
        export_hf(state_dict, cfg, args.out_dir, tokenizer_path=args.tokenizer
                  or state.get("tokenizer_path"), dtype=dtype)
        print(f"wrote {args.out_dir} ({cfg.name}, {cfg.arch}, step {state['counters']['step']})")
        return _verify(args, state_dict, cfg, dtype)

    return _checked(export, args.out_dir)


def _quiet_transformers() -> None:
    """No progress bars or warnings from transformers on stderr (saving, loading back, e.g. its
    notice that an untied T5 is not tied): the check judges the result, and what the tool
    prints is its verdict, or a failure's one error line."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _checked(export: Callable[[], str], out_dir: str) -> int:
    """Run `export` (it writes, then checks); print its verdict, 0. A failed check: one error
    line, the directory renamed OUT.unverified, 1."""
    try:
        print(export())
    except ExportMismatch as e:
        moved = mark_unverified(out_dir, str(e))
        print(f"error: export check failed: {e}; moved to {moved}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
