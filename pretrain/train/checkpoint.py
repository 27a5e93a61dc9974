"""Checkpoints of one state: a dict of stateful objects under fixed keys (`Run.state()`: the train
module, counters, schedule, data loader position, spike detector, ...). Exactly one of them is
the payload, which writes the tensors itself: the train module (model and optimizer through
torch.distributed.checkpoint, sharded and reshardable; or the DeepSpeed engine's own files). The
`state_dict()` of every other object goes to trainer_state.json under its key, and loading
hands each object back its own. Every backend's checkpoint is written atomically by the same
code here, with an integrity manifest, `latest` and retention.

Layout of a run's checkpoints:

    checkpoints/
      latest.json             name of the newest complete checkpoint (moved last)
      step_00000100/
        .metadata, *.distcp   model + optimizer (DCP; one file per rank), or
        deepspeed/            the DeepSpeed engine's files (its ZeRO partitions)
        trainer_state.json    step, tokens, schedule, data loader position, config
        rng_rank{r}.pt        per-rank RNG states
        integrity.json        size and sha256 of every file above (written last)
      step_00000200.tmp/      a checkpoint being written: never selected

A checkpoint directory appears under its final name only once every file and the integrity
manifest are on disk, so a crash mid-write leaves at most a `.tmp` directory behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from pretrain.errors import CheckpointError

STEP_PREFIX = "step_"
INTEGRITY = "integrity.json"
TRAINER_STATE = "trainer_state.json"
LATEST = "latest.json"


# Optimizer state keyed by parameter name, not by group index: pipeline stages each own groups
# of their own, which index-keyed groups would overwrite.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
# A model with frozen parameters (LoRA) saves and loads only its trainable ones: the frozen
# base comes from `init_from` (or the seed), which the checkpoint names (see
# `pretrain.train.adapters`). Not strict on load, as the frozen names are absent on purpose;
# DCP itself refuses a checkpoint that lacks any trainable one.
_TRAINABLE_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True,
                                      ignore_frozen_params=True, strict=False)


def has_frozen_params(model: nn.Module) -> bool:
    """Whether some parameters of `model` do not train (a LoRA base)."""
    return any(not p.requires_grad for p in model.parameters())


class ModelOptimState(Stateful):
    """Model + optimizer as one DCP-stateful object (FQN keys, layout independent)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.options = _TRAINABLE_OPTIONS if has_frozen_params(model) else _OPTIONS

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model, options=self.options)}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self.options)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        optims = [] if self.optimizer is None else self.optimizer
        set_state_dict(
            self.model,
            optims,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict.get("optim", {}),
            options=self.options,
        )

    def write_checkpoint(self, path: Path, *, background: bool = False) -> Future | None:
        """DCP files into `path` (collective); with `background`, staged to host memory and
        written in a thread (returns its future)."""
        if background:
            return dcp.async_save({"app": self}, checkpoint_id=str(path))
        dcp.save({"app": self}, checkpoint_id=str(path))
        return None

    def read_checkpoint(self, path: Path) -> None:
        dcp.load({"app": self}, checkpoint_id=str(path))


class Payload(Protocol):
    """The tensors of a checkpoint (model and optimizer), written by their owner: DCP files
    for the native backends, the engine's files for DeepSpeed (a train module, or a
    `ModelOptimState`)."""

    def write_checkpoint(self, path: Path, *, background: bool = False) -> Future | None: ...

    def read_checkpoint(self, path: Path) -> None: ...


class MaybeStateful:
    """A stateful object that may be absent in this run (the fp16 loss scaler): saved as None
    then, and a saved None (or a run without it) leaves the object as it is."""

    def __init__(self, obj: Any | None) -> None:
        self.obj = obj

    def state_dict(self) -> Any:
        return None if self.obj is None else self.obj.state_dict()

    def load_state_dict(self, state: Any) -> None:
        if self.obj is not None and state:
            self.obj.load_state_dict(state)


class Record:
    """Facts saved with a checkpoint for tools and checks (the resolved config, the tokenizer
    path), not restored on resume: they come from the new start's config."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def state_dict(self) -> Any:
        return self.value

    def load_state_dict(self, state: Any) -> None:
        pass


# DCP warns on every single-process save/load; one process is a supported layout here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def write_integrity(ckpt: Path) -> None:
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != INTEGRITY)
    manifest = {
        str(p.relative_to(ckpt)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in files
    }
    _write_json_atomic(ckpt / INTEGRITY, manifest)


def verify_integrity(ckpt: Path) -> None:
    """Raise CheckpointError naming the first missing, resized or altered file."""
    manifest_path = ckpt / INTEGRITY
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no {INTEGRITY}: it was never completed")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint manifest {manifest_path} is corrupt: {e}") from e
    for rel, meta in manifest.items():
        path = ckpt / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        if path.stat().st_size != meta["size"]:
            raise CheckpointError(
                f"checkpoint file {path} has {path.stat().st_size} bytes, expected {meta['size']}"
            )
        if _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"checkpoint file {path} fails its checksum (corrupted)")


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories (no .tmp), oldest first."""
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir()
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and not p.name.endswith(".tmp")
    ]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def find_resumable(root: Path) -> Path | None:
    """The newest checkpoint that passes its integrity check; warns about each one skipped."""
    for ckpt in reversed(list_checkpoints(root)):
        try:
            verify_integrity(ckpt)
            return ckpt
        except CheckpointError as e:
            warnings.warn(f"skipping damaged checkpoint: {e}; falling back to an older one",
                          stacklevel=2)
    return None


def _begin(root: Path, step: int, trainer_state: dict[str, Any]) -> tuple[Path, Path]:
    """Create `step_N.tmp/` and write the small per-rank and rank-0 files into it."""
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
    if _rank() == 0:
        _write_json_atomic(tmp / TRAINER_STATE, trainer_state)
    return tmp, final


def _finalize(root: Path, tmp: Path, final: Path, step: int, keep: int) -> None:
    """After every rank's files are on disk: integrity manifest, rename, then `latest`."""
    _barrier()
    if _rank() == 0:
        write_integrity(tmp)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_json_atomic(root / LATEST, {"checkpoint": final.name, "step": step})
        prune(root, keep)
    _barrier()


def split_state(state: Mapping[str, Any]) -> tuple[Payload, dict[str, Any]]:
    """The one payload (the object with `write_checkpoint`) and the other stateful objects,
    whose `state_dict()`s go to trainer_state.json under their keys."""
    payloads = [k for k, v in state.items() if hasattr(v, "write_checkpoint")]
    if len(payloads) != 1:
        raise ValueError(f"a checkpoint state needs exactly one payload, got {payloads}")
    rest = {k: v for k, v in state.items() if k != payloads[0]}
    return state[payloads[0]], rest


def save_checkpoint(root: Path, step: int, state: Mapping[str, Any], *, keep: int) -> Path:
    """Write checkpoint `step` of `state` atomically (collective: every rank calls it)."""
    Checkpointer(root, keep=keep).save(step, state)
    return root / step_dir_name(step)


def load_state(ckpt: Path, state: Mapping[str, Any]) -> dict[str, Any]:
    """Verify `ckpt`, load every object of `state` from it and this rank's RNG state; return
    the saved trainer state (the JSON side)."""
    verify_integrity(ckpt)
    payload, rest = split_state(state)
    payload.read_checkpoint(ckpt)
    saved = load_trainer_state(ckpt)
    for key, obj in rest.items():
        if key not in saved:
            raise CheckpointError(f"checkpoint {ckpt} has no {key!r} state; it was written by "
                                  "another version of pretrain: start a new run (resume=none)")
        obj.load_state_dict(saved[key])
    rng_path = ckpt / f"rng_rank{_rank()}.pt"
    if rng_path.is_file():
        set_rng_state(torch.load(rng_path, weights_only=False))
    return saved


def load_checkpoint(ckpt: Path, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Only the model's (and optimizer's) tensors from a native checkpoint, for tools: no RNG,
    no other state restored. Returns the saved trainer state."""
    verify_integrity(ckpt)
    ModelOptimState(model, optimizer).read_checkpoint(ckpt)
    return load_trainer_state(ckpt)


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (0 keeps all); never the one
    `latest` names, and never a `.tmp` directory still being written."""
    if keep <= 0:
        return
    latest = read_latest(root)
    for old in list_checkpoints(root)[:-keep]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def read_latest(root: Path) -> str | None:
    try:
        return json.loads((root / LATEST).read_text())["checkpoint"]
    except (OSError, ValueError, KeyError):
        return None


class Checkpointer:
    """Saves one state (a dict of stateful objects under fixed keys, see `split_state`)
    synchronously or asynchronously; at most one asynchronous save is in flight.

    An async save stages the payload to CPU memory before returning (so what is saved is the
    state at the moment of the call) and writes in a background thread. The checkpoint is
    finalized (integrity manifest, rename, `latest`) by `poll` once every rank has finished, by
    the next `save`, or by `wait`; until then it is a `.tmp` directory that is never selected.
    """

    def __init__(self, root: Path, *, keep: int, async_save: bool = False) -> None:
        self.root = root
        self.keep = keep
        self.async_save = async_save
        self._pending: tuple[Future, Path, Path, int] | None = None

    def save(self, step: int, state: Mapping[str, Any], *, finalize: bool = True) -> None:
        """`finalize=False` leaves the checkpoint a `.tmp` directory (fault injection)."""
        self.wait()
        payload, rest = split_state(state)
        tmp, final = _begin(self.root, step, {k: v.state_dict() for k, v in rest.items()})
        future = payload.write_checkpoint(tmp, background=self.async_save and finalize)
        if future is not None:
            self._pending = (future, tmp, final, step)
        elif finalize:
            _finalize(self.root, tmp, final, step, self.keep)

    def poll(self) -> None:
        """Finalize the in-flight save if every rank's write has finished (a cheap collective)."""
        if self._pending is None:
            return
        done = torch.tensor(float(self._pending[0].done()))
        if dist.is_initialized():
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if bool(done):
            self.wait()

    def wait(self) -> None:
        if self._pending is None:
            return
        future, tmp, final, step = self._pending
        self._pending = None
        future.result()
        _finalize(self.root, tmp, final, step, self.keep)


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / TRAINER_STATE).read_text())


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory, a checkpoints/ directory or one checkpoint → one verified checkpoint."""
    p = Path(path)
    for root in (p / "checkpoints", p):
        if (root / INTEGRITY).is_file():
            return root
        found = find_resumable(root)
        if found is not None:
            return found
    raise CheckpointError(
        f"no complete checkpoint under {p}; pass a run directory or a checkpoints/step_* "
        "directory written by pretrain-train"
    )
