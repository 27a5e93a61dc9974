"""Estimate per-rank memory of a training layout, optionally validating it with a dry run.

    pretrain-estimate-memory model=llama2_70b parallel=3d parallel.tp=8 parallel.pp=8 \\
        micro_batch_size=8 seq_len=4096 activation_checkpointing=full --world-size 512
    pretrain-estimate-memory model=llama2_70b parallel=3d parallel.tp=8 parallel.pp=8 \\
        --world-size 512 --dry-run
    pretrain-estimate-memory model=cpu precision=fp32 micro_batch_size=8 --measure

Positional arguments are the same Hydra overrides `pretrain-train` takes (composed over
conf/train.yaml), so the estimate is of exactly the run you would launch. `--dry-run` also
builds the sharded model on the meta device for every pipeline rank, on this one CPU process
with a fake process group, and prints the mesh, the layers of each stage and the parameters
each rank holds (see pretrain/parallel/dryrun.py). `--measure` checks the estimate against a
real run: two steps of the trainer's own train module built from this config on one CPU process
(fp32; the config's loss, checkpointing and gradient accumulation), resident-set growth vs
estimated peak (see pretrain/perf/memory.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from launch.common import config_dir
from pretrain.config import TrainConfig, register_configs
from pretrain.errors import ConfigError
from pretrain.validate import validate

CONF_DIR = Path(config_dir())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=llama2_7b")
    p.add_argument("--world-size", type=int, default=1, help="number of ranks (default 1)")
    p.add_argument("--dry-run", action="store_true",
                   help="also parallelize the meta model per pipeline rank (fake process group)")
    p.add_argument("--measure", action="store_true",
                   help="also run two training steps of this config's train module in one CPU "
                        "process and print the measured peak next to the estimate (world size "
                        "1, precision=fp32)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    return p.parse_intermixed_args(argv)  # overrides may come before or after the flags


def compose(overrides: Sequence[str]) -> TrainConfig:
    """conf/train.yaml with `overrides`, as the typed config (what launch/train.py builds)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        dcfg = hydra_compose(config_name="train", overrides=list(overrides))
    # Fields interpolating ${now:...} / env vars are irrelevant here; resolve what resolves.
    dcfg.run_name = "estimate"
    return OmegaConf.to_object(dcfg)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = compose(args.overrides)
        validate(cfg, world_size=args.world_size)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pretrain.parallel.dryrun import dry_run
    from pretrain.parallel.memory import estimate_memory

    common = dict(world_size=args.world_size, micro_batch_size=cfg.micro_batch_size,
                  seq_len=cfg.seq_len, precision=cfg.precision,
                  activation_checkpointing=cfg.activation_checkpointing, loss=cfg.loss)
    if args.dry_run:
        report = dry_run(cfg.model, cfg.parallel, **common)
        print(json.dumps(asdict(report), indent=1) if args.json else report.format())
        return 0
    est = estimate_memory(cfg.model, cfg.parallel, **common)
    measured = measure(cfg, args.world_size) if args.measure else None
    if args.json:
        print(json.dumps({**asdict(est), "peak": est.peak, "measured_peak": measured}, indent=1))
    else:
        p = cfg.parallel
        print(f"model {cfg.model.name}, world {args.world_size} (dp_replicate {p.dp_replicate}, "
              f"dp_shard {p.dp_shard}, tp {p.tp}, pp {p.pp}, backend {p.backend}), "
              f"precision {cfg.precision}, activation checkpointing "
              f"{cfg.activation_checkpointing}, {loss_name(cfg)} loss, micro-batch "
              f"{cfg.micro_batch_size} × {cfg.seq_len} tokens")
        print(est.format())
        if measured is not None:
            print(f"  {'measured peak':<16} {measured / 2**30:10.3f} GiB "
                  f"(estimate {100 * (est.peak / measured - 1):+.1f}%)")
    return 0


def loss_name(cfg: TrainConfig) -> str:
    """'chunked' or 'full': the loss the trainer runs for `cfg` (loss=auto resolved)."""
    from pretrain.config import uses_chunked_loss

    return "chunked" if uses_chunked_loss(cfg.loss, cfg.parallel) else "full"


def measure(cfg: TrainConfig, world_size: int) -> int:
    """The measured peak of `cfg`'s train module on this CPU. fp32 only: CPU autocast adds
    temporaries a GPU run does not have (fp32 results cast into bf16 outputs), so a bf16 CPU
    measurement would check the CPU's kernels rather than the estimate."""
    from pretrain.perf.memory import measure_cpu_peak_in_subprocess

    if world_size != 1 or cfg.precision != "fp32" or cfg.parallel.backend != "native":
        raise SystemExit("error: --measure runs one native fp32 process: use --world-size 1, "
                         "precision=fp32 and parallel.backend=native")
    return measure_cpu_peak_in_subprocess(cfg)


if __name__ == "__main__":
    sys.exit(main())
