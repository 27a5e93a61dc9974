"""What both Hydra apps share: where the presets are, the config checks that run first, and
the run's config files, written only once a start is accepted."""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import typing
from pathlib import Path
from typing import NoReturn

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pretrain.config import TrainConfig
from pretrain.errors import ConfigError
from pretrain.validate import validate


def config_dir() -> str:
    """The Hydra presets: the copy a wheel ships as `pretrain/conf`, else the `conf/` of the
    clone this code runs from (a source checkout or an editable install, so edits there count).
    """
    import pretrain

    root = Path(__file__).resolve().parents[1]
    for candidate in (Path(pretrain.__file__).resolve().parent / "conf", root / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"no Hydra presets (train.yaml) in {root / 'conf'} or the package; "
                       "reinstall pretrain")


def fail(message: str) -> NoReturn:
    """One line on stderr, exit status 2: a user error, no traceback.

    Hydra creates the job's output directory before the app runs; when it is still empty it
    goes again, so a refused start leaves nothing behind.
    """
    if HydraConfig.initialized():
        try:
            Path(HydraConfig.get().runtime.output_dir).rmdir()
        except OSError:  # not empty (an existing run), already gone, or another rank's
            pass
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def unknown_keys(node: DictConfig, schema: type, prefix: str = "") -> list[str]:
    """Dotted keys of `node` that the dataclass `schema` (recursively) does not have.

    Hydra applies `+key=value` under open_dict, past the struct flag of the typed schema, so
    additions are checked here. Fields typed dict or Any (parallel.deepspeed_extra, tags,
    launcher.env, data.mix) are free-form maps and stay open.
    """
    hints = typing.get_type_hints(schema)
    fields = {f.name for f in dataclasses.fields(schema)}
    found: list[str] = []
    for key in node.keys():
        name = f"{prefix}{key}"
        if not prefix and key == "hydra":  # Hydra's own node, not part of the schema
            continue
        if key not in fields:
            found.append(name)
        elif dataclasses.is_dataclass(hints[key]) and isinstance(node[key], DictConfig):
            found += unknown_keys(node[key], hints[key], f"{name}.")
    return found


def _known_keys(schema: type, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for f in dataclasses.fields(schema):
        keys.append(f"{prefix}{f.name}")
        hint = typing.get_type_hints(schema)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += _known_keys(hint, f"{prefix}{f.name}.")
    return keys


def suggestion(key: str, known: list[str]) -> str | None:
    """The key the user most likely meant: the same name in another section (`lr` →
    `optim.lr`), else a key of the same section that starts with it or is spelled alike."""
    parent, _, leaf = key.rpartition(".")
    elsewhere = [k for k in known if k.rpartition(".")[2] == leaf]
    siblings = [k for k in known if k.rpartition(".")[0] == parent]
    longer = sorted((k for k in siblings if k.startswith(key)), key=len)
    alike = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    return next(iter(elsewhere + longer + alike), None)


def unknown_keys_message(keys: list[str]) -> str:
    known = _known_keys(TrainConfig)
    named = []
    for key in keys:
        close = suggestion(key, known)
        named.append(f"{key} (did you mean {close}?)" if close else key)
    return (f"unknown config key{'s' * (len(keys) > 1)} {', '.join(named)}; every key is "
            "listed with its meaning in pretrain/config.py, and the composed config is shown "
            "by --cfg job")


def checked_config(dcfg: DictConfig, world_size: int | None = None) -> TrainConfig:
    """Unknown keys first, then `OmegaConf.to_object` once at the entry point, then every
    cross-field check."""
    unknown = unknown_keys(dcfg, TrainConfig)
    if unknown:
        fail(unknown_keys_message(unknown))
    cfg: TrainConfig = OmegaConf.to_object(dcfg)
    try:
        validate(cfg, world_size)
    except ConfigError as e:
        fail(str(e))
    return cfg


def save_run_config(dcfg: DictConfig, run_dir: Path) -> None:
    """The resolved `config.yaml` next to the checkpoints, and `.hydra/` (config.yaml,
    hydra.yaml, overrides.yaml) as Hydra writes them; called once the start is accepted
    (conf/train.yaml turns off Hydra's own writing at job start)."""
    OmegaConf.save(dcfg, run_dir / "config.yaml", resolve=True)
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(exist_ok=True)
    hc = HydraConfig.get()
    (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(dcfg))
    (hydra_dir / "hydra.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"hydra": hc})))
    (hydra_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(hc.overrides.task))


def is_launched() -> bool:
    """Whether torchrun or the deepspeed launcher started this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def deepspeed_launch_hint() -> str:
    return ("parallel.backend=deepspeed needs its ranks started by a launcher, not one plain "
            "process: pretrain-launch launcher=deepspeed launcher.nproc_per_node=N ..., "
            "deepspeed --no_local_rank --num_gpus N --module launch.train ..., or "
            "torchrun --nproc_per_node N -m launch.train ...")
