"""One process reads a finished run's checkpoint: the model with its weights (`pretrain-generate`),
a full state dict (`pretrain-export-hf`), or one consolidated file (`pretrain-consolidate`).
Works for checkpoints written on any layout, by either backend, without a process group:

- native backend: the DCP files (`.metadata`, `*.distcp`) are resharded onto one process;
- DeepSpeed backend (ZeRO stage 1, 2 or 3): the `deepspeed/` directory holds one partition of
  the fp32 master weights per rank (inside each `*_optim_states.pt`); DeepSpeed's own
  `zero_to_fp32` reader concatenates them on the CPU. Names are mapped back to ours (wrapper
  prefixes dropped) and a tied `output.weight` is restored from `tok_embeddings.weight`.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from pretrain.config import ModelConfig
from pretrain.errors import CheckpointError
from pretrain.models.build import build_model
from pretrain.parallel.parallelize import clean_fqn
from pretrain.train.adapters import is_lora_run, load_lora_model
from pretrain.train.checkpoint import (
    TRAINER_STATE,
    load_checkpoint,
    load_trainer_state,
    resolve_checkpoint,
    verify_integrity,
)

# The on-disk layout: the DeepSpeed backend saves with `engine.save_checkpoint(step_dir,
# tag=DEEPSPEED_TAG)`, so its ZeRO files sit in `step_N/deepspeed/`.
DEEPSPEED_TAG = "deepspeed"
# `deepspeed.initialize` (and DeepSpeed's own launchers) wrap the model in `module.`.
_ENGINE_PREFIX = "module."


def load_model_from_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The run's model on CPU with the checkpoint's weights, and the run's trainer state."""
    ckpt, state = _open(path)
    if is_lora_run(state):  # adapters only: the base comes from the init_from it names
        return load_lora_model(ckpt)
    cfg = ModelConfig(**state["config"]["model"])
    model = build_model(cfg, device="cpu")  # initialized: buffers (RoPE) are not in checkpoints
    if _is_deepspeed(ckpt):
        # strict: read_deepspeed_checkpoint has checked every name and shape already
        model.load_state_dict(read_deepspeed_checkpoint(ckpt, cfg), strict=True)
    else:
        load_checkpoint(ckpt, model, None)  # verifies the integrity manifest first
    return model, state


def load_model_for_export(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A full (unsharded) model state dict and the run's trainer state, on one process, from a
    sharded checkpoint (any layout, either backend) or a file written by `consolidate`."""
    if Path(path).is_file():
        blob = torch.load(path, map_location="cpu", weights_only=False)
        return blob["model"], blob["state"]
    ckpt, state = _open(path)
    if _is_deepspeed(ckpt):
        return read_deepspeed_checkpoint(ckpt, ModelConfig(**state["config"]["model"])), state
    model, state = load_model_from_checkpoint(ckpt)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)), state


def consolidate(path: str | Path, out_file: str | Path) -> Path:
    """Gather a sharded checkpoint into one torch file: {'model': full state dict, 'state':
    trainer state (config, counters, tokenizer path)}. Written atomically."""
    state_dict, state = load_model_for_export(path)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({"model": state_dict, "state": state}, tmp)
    os.replace(tmp, out)
    return out


def _is_deepspeed(ckpt: Path) -> bool:
    return (ckpt / DEEPSPEED_TAG).is_dir()


def _open(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """One checkpoint of either backend, checked before any tensor is read, and its trainer
    state. A DeepSpeed checkpoint is verified against its integrity manifest here; a native one
    by `load_checkpoint`."""
    ckpt = resolve_checkpoint(path)
    if _is_deepspeed(ckpt):
        verify_integrity(ckpt)
    elif not (ckpt / ".metadata").is_file():
        raise CheckpointError(
            f"checkpoint {ckpt} has neither DCP files ({ckpt / '.metadata'}) nor a DeepSpeed "
            f"directory ({ckpt / DEEPSPEED_TAG}); pass a checkpoints/step_* directory written "
            "by pretrain-train")
    try:
        return ckpt, load_trainer_state(ckpt)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {ckpt / TRAINER_STATE} ({e}); pass a checkpoint "
                              "written by pretrain-train") from e


def read_deepspeed_checkpoint(ckpt: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The full fp32 state dict, under our module names, of the DeepSpeed ZeRO checkpoint (stage
    1, 2 or 3, any number of ranks) in `ckpt/deepspeed/`. Needs no process group and no GPU.
    Raises CheckpointError naming the file when a partition is missing or the names or shapes
    do not match the model that `cfg` describes."""
    source = ckpt / DEEPSPEED_TAG
    gather = _zero_to_fp32(source)
    # Its progress prints and bars would mix into our tools' output (generate prints samples).
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            raw = gather(str(ckpt), tag=DEEPSPEED_TAG)
    except (OSError, ValueError, KeyError, IndexError, RuntimeError, NotImplementedError,
            EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(
            f"cannot gather the DeepSpeed ZeRO checkpoint {source} ({type(e).__name__}: "
            f"{str(e).rstrip('.')}); every rank's *_model_states.pt and *_optim_states.pt must "
            "be there: pass an older checkpoint (checkpoints/step_*) if this one is incomplete"
            ) from e
    state_dict = {_our_name(k): v for k, v in raw.items()}
    if cfg.tie_embeddings and "tok_embeddings.weight" in state_dict:
        # DeepSpeed records a shared parameter once; our state dict names it twice, like the
        # model's own state_dict.
        state_dict.setdefault("output.weight", state_dict["tok_embeddings.weight"])
    _check_names_and_shapes(state_dict, cfg, source)
    return state_dict


def _zero_to_fp32(source: Path) -> Callable[..., dict[str, torch.Tensor]]:
    """DeepSpeed's consolidation function, importable on a machine without GPUs."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        # Without it DeepSpeed probes for accelerators at import and warns; the reader only
        # ever uses the CPU.
        os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as e:
        raise CheckpointError(
            f"{source} was written by the DeepSpeed backend; reading it needs the deepspeed "
            f"package ({e}): pip install deepspeed") from e
    return get_fp32_state_dict_from_zero_checkpoint


def _our_name(name: str) -> str:
    """`module.layers.0._checkpoint_wrapped_module.attention.wq.weight` → ours."""
    name = clean_fqn(name)
    while name.startswith(_ENGINE_PREFIX):
        name = name[len(_ENGINE_PREFIX):]
    return name


def _check_names_and_shapes(state_dict: dict[str, torch.Tensor], cfg: ModelConfig,
                            source: Path) -> None:
    expected = {k: v.shape for k, v in build_model(cfg, device="meta").state_dict().items()}
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & state_dict.keys()
                   if state_dict[k].shape != expected[k])
    if not (missing or unexpected or wrong):
        return
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} with another shape, e.g. {k}: "
                        f"{tuple(state_dict[k].shape)} vs {tuple(expected[k])}")
    raise CheckpointError(
        f"the weights in {source} do not fit model {cfg.name!r} of its trainer_state.json "
        f"({'; '.join(problems)}); the checkpoint directory mixes files of different runs: "
        "pass a checkpoint written by one run")


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
