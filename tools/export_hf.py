"""Turn a run's checkpoint into a Hugging Face directory that transformers' `from_pretrained`
and `AutoTokenizer.from_pretrained` load, as the class of the run's model (its `arch`, and an
encoder's `norm_position`, saved with the run): LlamaForCausalLM (decoder), BertForMaskedLM
(post-norm encoder), ModernBertForMaskedLM (pre-norm encoder) or T5ForConditionalGeneration
(encoder_decoder). Reads checkpoints of either backend (native DCP files, DeepSpeed ZeRO 1-3)
on one process.

    pretrain-export-hf runs/NAME out/hf-model [--dtype bf16]
"""

from __future__ import annotations

import argparse
import sys

import torch

from pretrain.config import ModelConfig
from pretrain.errors import CheckpointError
from pretrain.interop.hf import check_exportable, export_hf
from pretrain.train.consolidate import load_model_for_export

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", help="run directory, checkpoints/ directory, one checkpoint, "
                   "or a file written by pretrain-consolidate")
    p.add_argument("out_dir", help="directory to write (config, safetensors, tokenizer)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the run's)")
    args = p.parse_args(argv)
    try:
        state_dict, state = load_model_for_export(args.checkpoint)
        cfg = ModelConfig(**state["config"]["model"])
        check_exportable(cfg)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    export_hf(state_dict, cfg, args.out_dir, tokenizer_path=args.tokenizer
              or state.get("tokenizer_path"), dtype=_DTYPES[args.dtype])
    print(f"wrote {args.out_dir} ({cfg.name}, {cfg.arch}, step {state['counters']['step']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
