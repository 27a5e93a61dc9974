"""Print the windows one data-parallel rank reads in a given training step, decoded, with the
document boundaries marked: exactly what the model saw.

From a run directory (its config.yaml gives the data, seq_len, batch sizes and seed):

    pretrain-inspect-data --run runs/NAME --step 1200 --rank 3 --dp-size 8

or from prepared datasets directly (NAME=DIR[:WEIGHT] each; NAME is the source's name in the
run, data.name or its data.mix key, since each source's window order is keyed by it):

    pretrain-inspect-data --data web=data/web:0.7 --data code=data/code:0.3 \\
        --seq-len 2048 --micro-batch-size 4 --global-batch-size 256 --dp-size 8 --step 5

The position is computed from step 1 with the configured weights; --state starts instead from a
checkpoint's trainer_state.json (whose weights may have differed in earlier runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

from omegaconf import OmegaConf

from pretrain.config import DataConfig
from pretrain.data.build import PreparedData, build_loader, ensure_data
from pretrain.data.inspect import render, views_at_step
from pretrain.data.shards import read_manifest
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import DataError


@dataclass
class Setup:
    """What the step's windows depend on."""

    data: PreparedData
    mix: dict[str, dict[str, object]]
    seq_len: int
    micro_batch_size: int
    global_batch_size: int
    seed: int
    vocab_size: int


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", help="run directory (reads its config.yaml)")
    p.add_argument("--data", action="append", default=[], metavar="NAME=DIR[:WEIGHT]",
                   help="a prepared dataset (repeat for a mixture)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--step", type=int, required=True, help="optimizer step, from 1 as logged")
    p.add_argument("--rank", type=int, default=0, help="data-parallel rank")
    p.add_argument("--dp-size", type=int, default=1, help="data-parallel ranks")
    p.add_argument("--state", help="a checkpoint's trainer_state.json to start from")
    p.add_argument("--max-chars", type=int, default=600,
                   help="shorten longer documents to their ends (0: print whole)")
    args = p.parse_args(argv)
    if bool(args.run) == bool(args.data):
        p.error("give --run or --data")
    try:
        for text in inspect(args):
            print(text, end="\n\n")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def inspect(args: argparse.Namespace) -> list[str]:
    setup = _from_run(args.run) if args.run else _from_flags(args)
    per_rank_step = setup.global_batch_size // args.dp_size
    if per_rank_step % setup.micro_batch_size or setup.global_batch_size % args.dp_size:
        raise DataError(f"global batch {setup.global_batch_size} does not split into "
                        f"{args.dp_size} ranks of micro-batches of {setup.micro_batch_size}")
    grad_accum = per_rank_step // setup.micro_batch_size
    cfg = _data_config(setup.mix)
    loader = build_loader(cfg, setup.data, "train", seq_len=setup.seq_len,
                          micro_batch_size=setup.micro_batch_size, dp_rank=args.rank,
                          dp_size=args.dp_size, seed=setup.seed, vocab_size=setup.vocab_size)
    if args.state:
        with open(args.state, encoding="utf-8") as f:
            loader.load_state_dict(json.load(f)["train_loader"])
    tokenizer = Tokenizer.load(setup.data.tokenizer_path)
    return [render(v, rank=args.rank, dp_size=args.dp_size, grad_accum=grad_accum,
                   max_chars=args.max_chars)
            for v in views_at_step(loader, tokenizer, args.step, grad_accum)]


def _data_config(mix: dict[str, dict[str, object]]) -> DataConfig:
    # Masking on: the views split windows into documents by the loader's document ids.
    return DataConfig(mix=mix, document_masking=True, num_workers=0, pin_memory=False)


def _from_flags(args: argparse.Namespace) -> Setup:
    dirs, mix = {}, {}
    for spec in args.data:
        name, _, rest = spec.partition("=")
        path, _, weight = rest.rpartition(":") if ":" in rest else (rest, "", "1")
        if not name or not path:
            raise DataError(f"--data {spec!r}: use NAME=DIR or NAME=DIR:WEIGHT")
        dirs[name] = path
        mix[name] = {"dir": path, "weight": float(weight or 1)}
    first = next(iter(dirs.values()))
    manifest = read_manifest(first)
    data = PreparedData(dirs, os.path.join(first, manifest["tokenizer"]["file"]))
    return Setup(data, mix, args.seq_len, args.micro_batch_size, args.global_batch_size,
                 args.seed, manifest["vocab_size"])


def _from_run(run_dir: str) -> Setup:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise DataError(f"{run_dir} has no config.yaml; give the run directory of a training run")
    cfg = OmegaConf.load(path)
    data_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), cfg.data))
    assert isinstance(data_cfg, DataConfig)
    data = ensure_data(data_cfg, vocab_size=int(cfg.model.vocab_size))
    mix = data_cfg.mix or {name: {"dir": d, "weight": 1.0} for name, d in data.dirs.items()}
    return Setup(data, {n: {"dir": data.dirs[n], "weight": float(e.get("weight", 1.0))}
                        for n, e in mix.items()},
                 int(cfg.seq_len), int(cfg.micro_batch_size), int(cfg.global_batch_size),
                 int(cfg.seed), int(cfg.model.vocab_size))


if __name__ == "__main__":
    sys.exit(main())
