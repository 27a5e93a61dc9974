"""Whether a run may resume its checkpoint: the checks that read only files, run by the entry
point before anything is written, built or loaded.

A checkpoint fixes the parameter set and shapes (and with them the optimizer state) and the
backend that wrote it. A config that changes any of them would load partially, fail deep in
the loader, or, worst, train on and prune the checkpoints it was meant to continue; so such a
resume is refused with the field, both values and the fix. Fields that change neither (init,
RoPE, norm epsilon, max_seq_len unless positions are learned: the RoPE table is not saved)
may change on resume, and so may the layout within a backend (checkpoints reshard). Data
changes are the loader's to judge.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from pretrain.config import ModelConfig, TrainConfig
from pretrain.errors import ConfigError
from pretrain.models.llama import ffn_hidden_dim
from pretrain.parallel.deepspeed_backend import is_deepspeed_checkpoint
from pretrain.train import checkpoint as ckpt
from pretrain.train.adapters import check_base, lora_mismatches

SHAPE_FIELDS = ("arch", "dim", "n_layers", "n_decoder_layers", "n_heads", "n_kv_heads",
                "head_dim", "vocab_size", "tie_embeddings", "norm", "bias", "mlp", "position",
                "type_vocab_size", "relative_buckets", "max_seq_len")
"""ModelConfig fields that change a parameter's shape or meaning, or the parameter set."""
_DERIVED = ("head_dim", "n_decoder_layers")
"""Fields whose null means "follow another field" (dim // n_heads, n_layers)."""
FFN_FIELDS = ("ffn_hidden_dim", "multiple_of", "ffn_dim_multiplier")
"""Fields that together give the SwiGLU hidden size; a change that keeps the size is fine."""


def resumable_checkpoint(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint `cfg.resume` would load: 'auto' the newest good one in the run directory,
    'none' nothing, else the given path (CheckpointError when it holds none)."""
    if cfg.resume == "none":
        return None
    with warnings.catch_warnings():  # the trainer warns about damaged ones when it resumes
        warnings.simplefilter("ignore")
        if cfg.resume == "auto":
            return ckpt.find_resumable(run_dir / "checkpoints")
        return ckpt.resolve_checkpoint(cfg.resume)


def model_mismatches(now: ModelConfig, saved: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, configured value, checkpoint's value) for each shape field that differs."""
    old = ModelConfig(**{k: v for k, v in saved.items() if k in ModelConfig.__dataclass_fields__})
    found = []
    for name in SHAPE_FIELDS:
        if name in saved and _shaping(now, name) != _shaping(old, name):
            if name in _DERIVED and getattr(now, name) == saved[name]:
                continue  # both follow another field (dim, n_layers), which is reported
            found.append((name, getattr(now, name), saved[name]))
    if ffn_hidden_dim(now) != ffn_hidden_dim(old):
        found += [(name, getattr(now, name), saved[name]) for name in FFN_FIELDS
                  if name in saved and getattr(now, name) != saved[name]]
    return [(f"model.{name}", a, b) for name, a, b in found]


def _shaping(m: ModelConfig, name: str) -> Any:
    """The value of field `name` as the model uses it (n_kv_heads=None means n_heads)."""
    if name == "n_kv_heads":
        return m.n_kv_heads or m.n_heads
    if name == "n_decoder_layers":
        return (m.n_decoder_layers or m.n_layers) if m.arch == "encoder_decoder" else None
    if name == "max_seq_len":  # the size of learned position embeddings; RoPE's is not saved
        return m.max_seq_len if m.position == "learned" else None
    if name == "head_dim":
        return m.head_dim or m.dim // m.n_heads
    return getattr(m, name)


def check_resume(cfg: TrainConfig, run_dir: Path) -> None:
    """Raise ConfigError when the checkpoint this start would resume was written with another
    model shape or backend; return quietly when there is none or it fits."""
    found = resumable_checkpoint(cfg, run_dir)
    if found is None:
        return
    state = ckpt.load_trainer_state(found)
    saved = state.get("config", {})
    mismatches = model_mismatches(cfg.model, saved.get("model", {}))
    mismatches += lora_mismatches(cfg.lora, saved.get("lora", {}))
    backend = "deepspeed" if is_deepspeed_checkpoint(found) else "native"
    if cfg.parallel.backend != backend:
        mismatches.append(("parallel.backend", cfg.parallel.backend, backend))
    if not mismatches:
        if cfg.lora.rank > 0:  # the adapters need the base they were trained on
            check_base(found, state, cfg.init_from, cfg.model, cfg.seed)
        return
    if len(mismatches) == 1:
        name, now, old = mismatches[0]
        what = (f"{name} is {_override(now)} but checkpoint {found} was written with "
                f"{_override(old)}")
    else:
        what = (", ".join(f"{name} is {_override(now)}" for name, now, _ in mismatches)
                + f" but checkpoint {found} was written with "
                + ", ".join(f"{name}={_override(old)}" for name, _, old in mismatches))
    restore = " ".join(f"{name}={_override(old)}" for name, _, old in mismatches)
    raise ConfigError(f"resume refused: {what}; restore {restore}, or start a new run "
                      "(another run_name, or resume=none)")


def _override(value: Any) -> str:
    """A value as a command-line override spells it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
