"""The per-rank training entry (`pretrain-train`): a Hydra app over conf/train.yaml.

torchrun and the deepspeed launcher start one of these per rank; it reads only the environment
they set (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT). The run directory is Hydra's output
directory, `${output_root}/${run_name}`, the same on every rank when run_name is given.

Every check that can refuse a start (the config, the checkpoint it would resume, then the
trainer's own setup and resume) runs before the run's config files are written, so a refused
start leaves an existing run as it was.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from launch.common import (
    checked_config,
    config_dir,
    deepspeed_launch_hint,
    fail,
    is_launched,
    save_run_config,
)
from pretrain.config import register_configs
from pretrain.errors import PretrainError

register_configs()


def explicit_keys(overrides: list[str], group: str) -> set[str]:
    """Fields of config group `group` the command line sets (`model.n_layers=3`, `+model.x=1`;
    not a preset choice `model=cpu`, whose values are defaults)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = set()
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.key_or_group
        if key.startswith(f"{group}.") and not o.is_delete():
            keys.add(key[len(group) + 1:])
    return keys


def apply_init_from(dcfg: DictConfig, overrides: list[str], run_dir: Path) -> None:
    """init_from: the model config becomes the weights' (a command-line `model.X` among
    `overrides` that contradicts them is an error; the preset's other values do not count), and
    without data.tokenizer, data prepared from a corpus uses the weights' tokenizer."""
    init_from = dcfg.get("init_from")
    if not init_from:
        return
    from pretrain.train.initial import base_tokenizer, model_config_of, resolve_model

    origin = init_from
    resumable = _resumable(dcfg, run_dir)
    if resumable is not None and not Path(init_from).exists():
        origin = str(resumable)  # the run resumes (resume wins): its checkpoint is the model
    configured = OmegaConf.to_object(dcfg.model)
    dcfg.model = resolve_model(model_config_of(origin), configured,
                               explicit_keys(overrides, "model"), init_from)
    data = dcfg.data
    if data.tokenizer is None and data.dir is None and not data.mix:
        data.tokenizer = base_tokenizer(origin)


def _resumable(dcfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint resume=auto finds in the run directory, if any."""
    if dcfg.get("resume") != "auto":
        return None
    from pretrain.train.checkpoint import find_resumable

    with warnings.catch_warnings():  # the trainer warns about damaged ones when it resumes
        warnings.simplefilter("ignore")
        return find_resumable(run_dir / "checkpoints")


@hydra.main(config_path=config_dir(), config_name="train", version_base=None)
def hydra_main(dcfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        apply_init_from(dcfg, list(HydraConfig.get().overrides.task), run_dir)
    except PretrainError as e:
        fail(str(e))
    cfg = checked_config(dcfg)
    if cfg.parallel.backend == "deepspeed" and not is_launched():
        fail(deepspeed_launch_hint())

    from pretrain.train.compat import check_resume  # heavy imports after the config is good
    from pretrain.train.trainer import train

    def on_start() -> None:  # rank 0, once setup and resume were accepted
        save_run_config(dcfg, run_dir)

    try:
        check_resume(cfg, run_dir)
        summary = train(cfg, run_dir, on_start=on_start)
    except PretrainError as e:
        fail(str(e))
    best = summary["best_val_loss"]  # None when no evaluation ran (a preempted run)
    return math.nan if best is None else float(best)


def main() -> None:
    hydra_main()


if __name__ == "__main__":
    main()
