"""Where a run's weights start when `init_from` is set: a local transformers LLaMA directory
(config.json, *.safetensors, sharded or not, tokenizer files) or one of our checkpoints (a
step directory, a checkpoints/ directory or a run directory).

    model_config_of(init_from)                      the model config the weights fit
    describe_base(init_from)                        {"path", "kind", "digest"}: what a run
                                                    (or a LoRA adapter) names as its base
    load_initial_weights(parts, init_from, cfg)     into the built, parallelized, initialized
                                                    parts (the train module calls it)

Loading is sharded: each rank builds the model's own state dict (DTensor shards under FSDP and
TP) and `torch.distributed.checkpoint` reads only the slices that rank holds, from the
safetensors files (`HuggingFaceStorageReader`, under HF's names from the one mapping in
`pretrain.interop.hf`) or from our DCP files; no rank materializes the whole model. Our rotary
convention is HF's "rotate half", so wq/wk need no permutation; a tied output projection is
the embedding (read once). Parameters whose names contain "lora_" (adapters added on top of the
base names) may be missing from the source; any other missing, unexpected or reshaped
parameter is an error naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, HuggingFaceStorageReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from pretrain.config import ModelConfig
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import CheckpointError, ConfigError, DataError
from pretrain.parallel.parallelize import clean_fqn
from pretrain.train import checkpoint as ckpt

__all__ = ["HF", "PRETRAIN", "base_tokenizer", "check_base_tokenizer", "describe_base", "kind_of",
           "load_initial_weights", "model_config_of", "resolve_model"]

HF, PRETRAIN = "hf", "pretrain"
ADAPTER_MARK = "lora_"
"""Parameters whose names contain this (LoRA adapters) may be absent from the source."""
_MODEL_PREFIX = "app.model."
"""Where our DCP checkpoints keep the model's tensors (`ModelOptimState` under key "app")."""


def kind_of(init_from: str) -> str:
    """'hf' (a directory with config.json) or 'pretrain' (anything else that exists);
    ConfigError naming the path when it does not exist."""
    path = Path(init_from)
    if not path.exists():
        raise ConfigError(f"init_from={init_from} does not exist; pass a local transformers "
                          "LLaMA directory (config.json, *.safetensors) or a checkpoint of ours "
                          "(a run directory or checkpoints/step_*)")
    return HF if (path / "config.json").is_file() else PRETRAIN


def _hf_config(directory: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"init_from={directory}: config.json cannot be read ({first}); "
                              "pass a transformers model directory saved by save_pretrained"
                              ) from e


def _hf_model_config(directory: Path) -> ModelConfig:
    from pretrain.interop.hf import from_hf_config

    hf_cfg = _hf_config(directory)
    if getattr(hf_cfg, "model_type", None) != "llama":
        raise ConfigError(f"init_from={directory} holds a {hf_cfg.model_type!r} model; init_from "
                          "reads LlamaForCausalLM directories (convert other families first with "
                          "`pretrain-import-hf DIR OUT` and pass init_from=OUT)")
    try:
        return from_hf_config(hf_cfg, name=directory.resolve().name)
    except ValueError as e:
        raise ConfigError(f"init_from={directory}: {e}") from e


def _checkpoint(init_from: str) -> tuple[Path, dict[str, Any]]:
    """Our checkpoint behind `init_from` and its trainer state, verified."""
    found = ckpt.resolve_checkpoint(init_from)
    ckpt.verify_integrity(found)
    if not (found / ".metadata").is_file():
        raise CheckpointError(f"init_from={init_from}: checkpoint {found} has no DCP files "
                              "(a DeepSpeed one?); gather it with `pretrain-consolidate` and "
                              "train from a native checkpoint, or resume it with its backend")
    try:
        return found, ckpt.load_trainer_state(found)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"init_from={init_from}: cannot read {found / ckpt.TRAINER_STATE} "
                              f"({e})") from e


def model_config_of(init_from: str) -> ModelConfig:
    """The model config of the weights at `init_from` (a transformers directory's config.json,
    or the model our checkpoint was trained as)."""
    if kind_of(init_from) == HF:
        return _hf_model_config(Path(init_from))
    _, state = _checkpoint(init_from)
    saved = state["config"]["model"]
    return ModelConfig(**{k: v for k, v in saved.items() if k in ModelConfig.__dataclass_fields__})


def _sha256_files(h: Any, files: Iterable[Path]) -> None:
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                h.update(block)


def _weight_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"init_from={directory} holds no *.safetensors weights; save the "
                              "model with save_pretrained(safe_serialization=True)")
    return files


def describe_base(init_from: str) -> dict[str, str]:
    """{"path": absolute path, "kind": "hf" | "pretrain", "digest": sha256 hex}. The digest
    covers the model config and the weights: for a transformers directory config.json and every
    safetensors file's bytes, for our checkpoint the model config and the recorded sha256 of
    its DCP files (integrity.json), so it names the base without reading the weights again."""
    kind = kind_of(init_from)
    h = hashlib.sha256()
    if kind == HF:
        directory = Path(init_from).resolve()
        _sha256_files(h, [directory / "config.json", *_weight_files(directory)])
        return {"path": str(directory), "kind": kind, "digest": h.hexdigest()}
    found, state = _checkpoint(init_from)
    h.update(json.dumps(state["config"]["model"], sort_keys=True).encode())
    recorded = json.loads((found / ckpt.INTEGRITY).read_text())
    for name in sorted(recorded):
        if name == ".metadata" or name.endswith(".distcp"):
            h.update(f"{name}\0{recorded[name]['sha256']}\0".encode())
    return {"path": str(found.resolve()), "kind": kind, "digest": h.hexdigest()}


def base_tokenizer(init_from: str) -> str | None:
    """The tokenizer of the weights: 'hf:DIR' when `init_from` is a transformers directory with
    tokenizer files, the tokenizer our checkpoint's run recorded when it still exists; else
    None."""
    from pretrain.data.hf_tokenizer import PREFIX, tokenizer_files

    if kind_of(init_from) == HF:
        directory = Path(init_from).resolve()
        return f"{PREFIX}{directory}" if tokenizer_files(directory) else None
    _, state = _checkpoint(init_from)
    recorded = state.get("tokenizer_path")
    if isinstance(recorded, str) and Path(recorded.removeprefix(PREFIX)).exists():
        return recorded
    return None


def check_base_tokenizer(init_from: str, tokenizer: Tokenizer) -> None:
    """DataError when the run's data was tokenized with another tokenizer than the one that
    comes with the weights at `init_from` (by fingerprint)."""
    base = base_tokenizer(init_from)
    if base is None or Tokenizer.load(base).fingerprint == tokenizer.fingerprint:
        return
    raise DataError(f"the data's tokenizer {tokenizer.path} is not the one of init_from="
                    f"{init_from} ({base}); prepare the data with `pretrain-prepare-data "
                    f"--tokenizer {base}` or set data.tokenizer={base}")


_FREE = ("name", "init_std", "depth_init")
"""Model fields an explicit override may set with init_from: they change no loaded weight."""


def resolve_model(source: ModelConfig, configured: ModelConfig, explicit: Iterable[str],
                  init_from: str) -> ModelConfig:
    """The run's model config: `source`'s (the weights'), with `configured`'s values of the
    fields the user set (`explicit`: ModelConfig field names) that change no weight (the name,
    the init, a rotary model's max_seq_len: longer context). ConfigError for an explicitly set
    field whose value differs from the source's; the model preset's other values do not
    count."""
    free = set(_FREE) | ({"max_seq_len"} if source.position == "rope" else set())
    explicit = set(explicit) & set(ModelConfig.__dataclass_fields__)
    for name in sorted(explicit - free):
        want, have = getattr(configured, name), getattr(source, name)
        if want != have:
            raise ConfigError(f"model.{name}={want} contradicts init_from={init_from}, whose "
                              f"model has {name}={have}; drop the override (the model config "
                              "comes from init_from)")
    return dataclasses.replace(source, **{k: getattr(configured, k) for k in explicit & free})


# ---------------------------------------------------------------------------------- loading


def _targets(part: nn.Module, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """This part's state dict under our plain names (DTensor shards where parallelized),
    less the adapters and a tied output (the embedding, read once)."""
    sd = {clean_fqn(k): v for k, v in get_model_state_dict(part).items()}
    if cfg.tie_embeddings and "tok_embeddings.weight" in sd:
        sd.pop("output.weight", None)
    return {k: v for k, v in sd.items() if ADAPTER_MARK not in k}


def _all_ranks(keys: Iterable[str]) -> set[str]:
    """The union of `keys` over every rank (pipeline stages each hold some parameters)."""
    keys = set(keys)
    if not dist.is_initialized():
        return keys
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(keys))
    return set().union(*gathered)


def _check_keys(init_from: str, wanted: dict[str, torch.Size], found: dict[str, torch.Size],
                optional: set[str], names: dict[str, str]) -> None:
    """`wanted`: source key -> shape over this rank's parts; `found`: what the source holds;
    `names`: source key -> our name (for messages). Missing, unexpected (not wanted on any
    rank), reshaped: an error (on every rank alike, as the checks after the gather see the
    same sets where it matters)."""
    everywhere = _all_ranks(wanted)
    missing = sorted(k for k in wanted if k not in found)
    if missing:
        raise CheckpointError(f"init_from={init_from} lacks {len(missing)} parameters of the "
                              f"model, e.g. {missing[0]} (ours: {names[missing[0]]}); pass "
                              "weights of this architecture")
    unexpected = sorted(k for k in found if k not in everywhere and k not in optional)
    if unexpected:
        raise CheckpointError(f"init_from={init_from} holds {len(unexpected)} parameters the "
                              f"model lacks, e.g. {unexpected[0]}; pass weights of this "
                              "architecture (merge LoRA adapters into the base first)")
    for k, shape in wanted.items():
        if tuple(found[k]) != tuple(shape):
            raise CheckpointError(f"init_from={init_from}: {k} has shape {tuple(found[k])}, the "
                                  f"model's {names[k]} {tuple(shape)}")


def load_initial_weights(parts: list[nn.Module], init_from: str, cfg: ModelConfig) -> None:
    """Copy the weights at `init_from` into `parts` (this rank's built, parallelized,
    initialized model or pipeline stages; collective under a process group: every rank calls
    it). Each rank reads only its own shards. The model's non-adapter parameters must match
    the source's one to one, by name and shape."""
    hf = kind_of(init_from) == HF
    if hf:
        from pretrain.interop.hf import hf_ignored, to_hf_key

        directory = Path(init_from)
        _weight_files(directory)
        reader: Any = HuggingFaceStorageReader(str(directory))
        rename = lambda key: to_hf_key(key, cfg)  # noqa: E731
        ignored = hf_ignored(cfg)
    else:
        found, _ = _checkpoint(init_from)
        reader = FileSystemReader(str(found))
        rename = lambda key: _MODEL_PREFIX + key  # noqa: E731
        ignored = ()
    try:
        metadata = reader.read_metadata()
    except Exception as e:  # a damaged file: safetensors, pickle or OS errors alike
        raise CheckpointError(f"init_from={init_from}: cannot read its weights "
                              f"({type(e).__name__}: {e}); the files are damaged") from e
    available = {k: v.size for k, v in metadata.state_dict_metadata.items()
                 if hasattr(v, "size") and not any(s in k for s in ignored)}
    if not hf:
        available = {k: s for k, s in available.items() if k.startswith(_MODEL_PREFIX)}
    plans = []  # per part: source name -> (our name, the tensor to fill)
    for part in parts:
        plan = {}
        for key, tensor in _targets(part, cfg).items():
            # A tied output on a stage without the embedding is read from the embedding.
            source = "tok_embeddings.weight" if cfg.tie_embeddings and key == "output.weight" \
                else key
            try:
                plan[rename(source)] = (key, tensor)
            except ValueError as e:  # a parameter of ours the HF layout has no name for
                raise CheckpointError(f"init_from={init_from} has no counterpart of the "
                                      f"model's parameter {key}; only LoRA adapters (names "
                                      "with 'lora_') may be extra") from e
        plans.append(plan)
    names = {k: ours for plan in plans for k, (ours, _) in plan.items()}
    wanted = {k: t.shape for plan in plans for k, (_, t) in plan.items()}
    # A tied model reads the embedding; a copy of it under the output's name is no surprise.
    optional = {rename("output.weight")} if cfg.tie_embeddings else set()
    _check_keys(init_from, wanted, available, optional, names)
    for part, plan in zip(parts, plans):
        request = {k: t for k, (_, t) in plan.items()}
        try:
            dcp.load(request, storage_reader=reader,
                     planner=DefaultLoadPlanner(allow_partial_load=True))
        except Exception as e:
            raise CheckpointError(f"init_from={init_from}: reading its weights failed "
                                  f"({type(e).__name__}: {e}); the files are damaged") from e
        loaded = {plan[k][0]: v for k, v in request.items()}
        set_model_state_dict(part, loaded, options=StateDictOptions(strict=False))
        if hasattr(part, "tie_weights"):
            part.tie_weights()
