"""Convert a local Hugging Face model directory into a checkpoint of ours, ahead of training:

    pretrain-import-hf models/llama-hf runs/llama-base
    pretrain-train init_from=runs/llama-base ...        # or pretrain-generate / -export-hf

Reads LlamaForCausalLM (and the families `pretrain.interop.hf.import_hf` knows: BERT,
RoBERTa, ModernBERT, T5) on one process, never from the hub, and writes OUT as a run
directory holding one checkpoint (checkpoints/step_00000000: the model's DCP files, its
config, an integrity manifest) and, when DIR has one, a copy of the tokenizer (OUT/tokenizer,
recorded as the checkpoint's tokenizer `hf:OUT/tokenizer`). `init_from=DIR` reads the
transformers directory directly, sharded over the ranks; importing first pays the conversion
once, and gives other families a way in.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

from pretrain.config import TrainConfig
from pretrain.data.hf_tokenizer import PREFIX, tokenizer_files
from pretrain.errors import PretrainError
from pretrain.interop.hf import import_hf
from pretrain.models.build import build_model
from pretrain.train import checkpoint as ckpt


def import_checkpoint(source: str | Path, out: str | Path) -> Path:
    """Write `out` (a run directory with checkpoint step 0) from the transformers directory
    `source`; returns the checkpoint directory. Refuses an `out` that holds checkpoints."""
    out = Path(out)
    root = out / "checkpoints"
    if ckpt.list_checkpoints(root):
        raise FileExistsError(f"{out} holds checkpoints already; pass a new directory")
    state_dict, cfg = import_hf(source)
    model = build_model(cfg, device="cpu")
    model.load_state_dict(state_dict, strict=True)
    tokenizer = None
    files = tokenizer_files(source)
    if files:
        (out / "tokenizer").mkdir(parents=True, exist_ok=True)
        for path in files:
            shutil.copyfile(path, out / "tokenizer" / path.name)
        tokenizer = f"{PREFIX}{(out / 'tokenizer').resolve()}"
    run = TrainConfig(model=cfg, init_from=str(Path(source).resolve()))
    state = {
        "train_module": ckpt.ModelOptimState(model, None),
        "counters": ckpt.Record({"step": 0, "tokens": 0}),
        "config": ckpt.Record(dataclasses.asdict(run)),
        "tokenizer_path": ckpt.Record(tokenizer),
    }
    root.mkdir(parents=True, exist_ok=True)
    return ckpt.save_checkpoint(root, 0, state, keep=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("source", help="local transformers model directory (config.json, weights)")
    p.add_argument("out", help="directory to write (a run directory with one checkpoint)")
    args = p.parse_args(argv)
    try:
        found = import_checkpoint(args.source, args.out)
    except (PretrainError, OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {found} (from {args.source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
