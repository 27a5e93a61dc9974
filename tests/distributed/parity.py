"""A tiny fp32 training run under any layout, through the real train module, for comparing
layouts with one process.

`train(layout, steps, val_dir)` runs on every rank of a process group (or alone, without one):
`pretrain.train.module.build_train_module` builds the layout's train module (native, pipeline
or DeepSpeed) exactly as the trainer does, from the same model, optimizer and seed, and each
step is the module's `train_step` on the step's micro-batches. It returns the per-step losses,
the validation loss of the initial and of the final weights (the loader's fixed global set of
windows, `eval_windows`), and, on the ranks that hold a full copy of some weights after
gathering, those weights by name.

`train_family(family, layout, steps, data_dir)` does the same for a model family and its
objective (encoder + mlm, encoder-decoder + span, decoder + fim) on the user's data path: each
rank's batches come from its own `ShardedWindowLoader` slice of a prepared dataset
(`write_family_data`), corrupted by the objective that `build_objective` makes, and each
evaluation reports the objective's metrics from its scorer, as the trainer does.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from pretrain.config import (
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    ParallelConfig,
    output_whole_on_one_rank,
)
from pretrain.data.loader import Batch, ShardedWindowLoader
from pretrain.data.objectives import build_objective
from pretrain.data.shards import write_manifest, write_shard
from pretrain.data.tokenizer import FimIds
from pretrain.eval.scores import build_scorer
from pretrain.parallel.dims import ParallelDims
from pretrain.parallel.parallelize import clean_fqn
from pretrain.train.module import StepSettings, TrainModule, build_train_module

TINY = ModelConfig(name="tiny", dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=128,
                   multiple_of=32, max_seq_len=32)
SEED = 1234
STEPS = 10
SEQ = 16
GLOBAL_BATCH = 8
# Large enough that weights move well beyond the 1e-5 tolerance in 10 steps; the clip is
# exercised (the norm starts above it).
OPTIM = OptimConfig(lr=3e-3, eps=1e-6, warmup_steps=0, weight_decay=0.1, grad_clip=0.5,
                    implementation="foreach", schedule="constant")
EVAL_WINDOWS = 11
"""Validation windows: not a multiple of any layout's micro-batch × data-parallel degree, so
the padding of the last micro-batch is exercised."""


@dataclass(frozen=True)
class Layout:
    """One parallel layout under test."""

    name: str
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = True
    pp_schedule: str = "1F1B"
    pp_virtual_stages: int = 1
    pp_microbatches: int = 2
    micro_batch_size: int = 2
    zero_stage: int = 0
    ac_mode: str = "none"
    reshard_after_forward: bool = True
    loader_workers: int = 0
    """Prefetch threads of the training loader (`train_family`); batches must not depend on it."""

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    def parallel(self) -> ParallelConfig:
        return ParallelConfig(
            backend="deepspeed" if self.zero_stage else "native",
            dp_replicate=self.dp_replicate, tp=self.tp, pp=self.pp,
            dp_shard=-1 if self.zero_stage else self.dp_shard,  # ZeRO: data parallel over all
            sequence_parallel=self.sequence_parallel, pp_schedule=self.pp_schedule,
            pp_virtual_stages=self.pp_virtual_stages, pp_microbatches=self.pp_microbatches,
            fsdp_param_dtype="fp32", zero_stage=self.zero_stage,
            fsdp_reshard_after_forward=self.reshard_after_forward,
        )


SINGLE = Layout("single", micro_batch_size=4)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of `step`: (GLOBAL_BATCH, SEQ) inputs and shifted targets."""
    g = torch.Generator().manual_seed(SEED + step)
    windows = torch.randint(0, TINY.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return windows[:, :-1], windows[:, 1:]


def micro_batches(step: int, dp_rank: int, dp: int, micro: int):
    """This data-parallel rank's micro-batches of `step` (its contiguous slice of rows)."""
    inputs, targets = batch(step)
    per_rank = GLOBAL_BATCH // dp
    rows = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    inputs, targets = inputs[rows], targets[rows]
    for i in range(0, per_rank, micro):
        yield inputs[i:i + micro], targets[i:i + micro]


def write_val_data(root: Path) -> str:
    """A prepared dataset of random tokens (a `val` split of 600 tokens) for the evaluations."""
    rng = np.random.default_rng(SEED)
    tokens = rng.integers(0, TINY.vocab_size, size=600).astype(np.int64)
    ends = np.array([150, 400, 600], dtype=np.int64)
    (root / "val").mkdir(parents=True, exist_ok=True)
    checksum = write_shard(str(root / "val/000000.bin"), tokens, ends, vocab_size=TINY.vocab_size)
    shard = {"name": "val/000000.bin", "n_tokens": 600, "n_docs": 3, "checksum": checksum}
    write_manifest(str(root), {"format": "pretrain-shards", "version": 1,
                               "vocab_size": TINY.vocab_size,
                               "tokenizer": {"file": "none", "fingerprint": "synthetic"},
                               "splits": {"val": {"n_tokens": 600, "shards": [shard]}}})
    return str(root)


def _full_weights(module: TrainModule) -> dict[str, torch.Tensor]:
    if module.deepspeed:
        return {clean_fqn(k): v for k, v in module.full_state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for part in module.parts:
        sd = get_model_state_dict(part, options=StateDictOptions(full_state_dict=True))
        out.update({clean_fqn(k): v.detach().clone() for k, v in sd.items()})
    return out


def build(layout: Layout, steps: int,
          model: ModelConfig = TINY) -> tuple[TrainModule, ParallelDims, int]:
    """The layout's train module of `model` as the trainer builds it; (module, dims, dp rank)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    p = layout.parallel()
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, p.pp, world)
    mesh = dims.build_mesh("cpu")
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    settings = StepSettings(global_batch_size=GLOBAL_BATCH,
                            micro_batch_size=layout.micro_batch_size, precision="fp32",
                            activation_checkpointing=layout.ac_mode,
                            chunked_loss=output_whole_on_one_rank(p), seed=SEED)
    module = build_train_module(model=model, optim=OPTIM, parallel=p, settings=settings,
                                dims=dims, mesh=mesh, device=torch.device("cpu"),
                                total_steps=steps)
    return module, dims, dp_rank


def train(layout: Layout, steps: int = STEPS, val_dir: str | None = None) -> dict:
    """Train `layout` for `steps`; returns losses, gradient norms, validation losses (with
    `val_dir`) and the initial and final weights."""
    module, dims, dp_rank = build(layout, steps)
    val = None
    if val_dir is not None:
        val = ShardedWindowLoader(val_dir, "val", seq_len=SEQ,
                                  micro_batch_size=layout.micro_batch_size, dp_rank=dp_rank,
                                  dp_size=dims.dp, vocab_size=TINY.vocab_size)
    initial = _full_weights(module)
    val_losses = [module.evaluate(val.eval_windows(EVAL_WINDOWS))["val/loss"]] if val else []
    losses, norms = [], []
    for step in range(steps):
        batches = (Batch(x, y) for x, y in
                   micro_batches(step, dp_rank, dims.dp, layout.micro_batch_size))
        stats = module.train_step(batches)
        losses.append(float(stats.loss))
        norms.append(float(stats.grad_norm))
    if val is not None:
        val_losses.append(module.evaluate(val.eval_windows(EVAL_WINDOWS))["val/loss"])
    return {"losses": losses, "grad_norms": norms, "val_losses": val_losses,
            "weights": _full_weights(module), "initial": initial,
            "rank": int(os.environ.get("RANK", 0))}


def train_many(layouts: list[Layout], steps: int = STEPS,
               val_dir: str | None = None) -> dict[str, dict]:
    """Several layouts in one process group (spawning ranks costs more than tiny runs)."""
    return {layout.name: train(layout, steps, val_dir) for layout in layouts}


def merge_weights(results: list[dict], key: str = "weights") -> dict[str, torch.Tensor]:
    """The union over ranks of gathered weights (pipeline stages each hold some)."""
    merged: dict[str, torch.Tensor] = {}
    for r in results:
        for k, v in r[key].items():
            merged.setdefault(k, v)
    return merged


def max_rel_loss_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# -- model families on their objectives -----------------------------------------------------

FAMILY_SEQ = 32
"""Model input length (the encoder's, for span corruption: 34 raw tokens, 8 target tokens)."""
FAMILY_STEPS = 8
FAMILY_VOCAB = 256
CONF_MODEL = Path(__file__).resolve().parents[2] / "conf" / "model"


class SyntheticTokenizer:
    """The special ids `build_objective` and the trainer's scorer read from a `Tokenizer`, at
    made-up places of a tiny vocabulary (no SentencePiece model): the four fixed ids, <mask>,
    eight sentinels and the FIM pieces are the control ids 0-16; ordinary text is 17 and up."""

    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3
    mask_id = 4
    sentinel_ids = list(range(5, 13))
    fim_ids = FimIds(prefix=13, middle=14, suffix=15, pad=16)
    control_ids = list(range(17))

    def require_specials(self, objective: str) -> None:
        """Every objective's pieces are here."""


@dataclass(frozen=True)
class Family:
    """A model family (a tiny version of its CPU preset) and the objective it trains."""

    name: str
    model: ModelConfig
    objective: str


def tiny_preset(preset: str, **changes: object) -> ModelConfig:
    """`conf/model/<preset>.yaml` (its family's recipe) at a test's size."""
    cfg = ModelConfig(**yaml.safe_load((CONF_MODEL / f"{preset}.yaml").read_text()))
    return dataclasses.replace(cfg, name=f"tiny_{preset}", dim=32, n_layers=2, n_heads=4,
                               vocab_size=FAMILY_VOCAB, ffn_hidden_dim=64, max_seq_len=64,
                               **changes)  # type: ignore[arg-type]


FAMILIES = [
    Family("encoder_mlm", tiny_preset("cpu_encoder"), "mlm"),
    Family("encoder_decoder_span", tiny_preset("cpu_t5", head_dim=8, n_decoder_layers=2),
           "span"),
    Family("decoder_fim", tiny_preset("cpu", n_kv_heads=2), "fim"),
]


def _documents(rng: np.random.Generator, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Random ordinary tokens (text never encodes to a control id) in documents of 5 to 60
    tokens, each ending with EOS as `prepare` writes them; (tokens, document end offsets)."""
    tok = SyntheticTokenizer()
    tokens = rng.integers(len(tok.control_ids), FAMILY_VOCAB, size=n_tokens).astype(np.int64)
    ends = np.cumsum(rng.integers(5, 61, size=n_tokens // 5))
    ends = np.append(ends[ends < n_tokens], n_tokens).astype(np.int64)
    tokens[ends - 1] = tok.eos_id
    return tokens, ends


def write_family_data(root: Path) -> str:
    """A prepared dataset (`train`: 3000 tokens, more than FAMILY_STEPS global batches of any
    objective's windows; `val`: 1000) of random documents for `train_family`."""
    rng = np.random.default_rng(SEED)
    splits = {}
    for split, n_tokens in (("train", 3000), ("val", 1000)):
        tokens, ends = _documents(rng, n_tokens)
        (root / split).mkdir(parents=True, exist_ok=True)
        name = f"{split}/000000.bin"
        checksum = write_shard(str(root / name), tokens, ends, vocab_size=FAMILY_VOCAB)
        splits[split] = {"n_tokens": n_tokens, "shards": [
            {"name": name, "n_tokens": n_tokens, "n_docs": len(ends), "checksum": checksum}]}
    write_manifest(str(root), {"format": "pretrain-shards", "version": 1,
                               "vocab_size": FAMILY_VOCAB,
                               "tokenizer": {"file": "none", "fingerprint": "synthetic"},
                               "splits": splits})
    return str(root)


def train_family(family: Family, layout: Layout, steps: int, data_dir: str) -> dict:
    """Train `family` on its objective under `layout`, each rank reading its own slice of the
    prepared `data_dir`; returns losses, gradient norms, the validation metrics (loss and the
    objective's scorer) of the initial and final weights, each step's micro-batch inputs on this
    rank, the initial and final weights, and this rank's data-parallel rank."""
    tok = SyntheticTokenizer()
    objective = build_objective(ObjectiveConfig(name=family.objective), tok,  # type: ignore[arg-type]
                                vocab_size=family.model.vocab_size)
    scorer = build_scorer(family.objective,
                          sentinels=tok.sentinel_ids if family.objective == "span" else None)
    module, dims, dp_rank = build(layout, steps, family.model)
    common = dict(seq_len=FAMILY_SEQ, micro_batch_size=layout.micro_batch_size,
                  dp_rank=dp_rank, dp_size=dims.dp, seed=SEED,
                  vocab_size=family.model.vocab_size, objective=objective)
    train_loader = ShardedWindowLoader(data_dir, "train", num_workers=layout.loader_workers,
                                       **common)  # type: ignore[arg-type]
    val = ShardedWindowLoader(data_dir, "val", **common)  # type: ignore[arg-type]
    initial = _full_weights(module)
    metrics = [module.evaluate(val.eval_windows(EVAL_WINDOWS), scorer)]
    losses, norms, inputs = [], [], []

    def step_batches(seen: list[torch.Tensor]) -> Iterator[Batch]:
        for _ in range(module.grad_accum):  # read lazily, as the trainer's loop does
            batch = train_loader.next_batch()
            seen.append(batch.inputs.clone())
            yield batch

    try:
        for _ in range(steps):
            seen: list[torch.Tensor] = []
            stats = module.train_step(step_batches(seen))
            losses.append(float(stats.loss))
            norms.append(float(stats.grad_norm))
            inputs.append(seen)
    finally:
        train_loader.close()
    metrics.append(module.evaluate(val.eval_windows(EVAL_WINDOWS), scorer))
    return {"losses": losses, "grad_norms": norms, "metrics": metrics, "inputs": inputs,
            "weights": _full_weights(module), "initial": initial,
            "rank": int(os.environ.get("RANK", 0)), "dp_rank": dp_rank}


def train_families(runs: list[tuple[Family, Layout]], steps: int,
                   data_dir: str) -> dict[str, dict]:
    """Several (family, layout) runs in one process group, keyed "family/layout"."""
    return {f"{family.name}/{layout.name}": train_family(family, layout, steps, data_dir)
            for family, layout in runs}


def max_rel_metric_diff(a: list[dict[str, float]], b: list[dict[str, float]]) -> float:
    """The largest difference between two runs' evaluations, relative to the reference `b`'s
    value where it exceeds 1 (accuracies and exact-match rates compare absolutely)."""
    assert [sorted(x) for x in a] == [sorted(y) for y in b], (a, b)
    return max(abs(x[k] - y[k]) / max(abs(y[k]), 1.0) for x, y in zip(a, b) for k in y)
