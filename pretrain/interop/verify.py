"""Exports that check themselves: load what `pretrain-export-hf` wrote with transformers (and
peft for an adapter) and compare its logits with ours on a fixed batch before success is
reported.

The batch is two rows of seeded random valid ids (no tokenizer needed, the same for every run
of a config). Encoders and T5 take padding, so the second row's last third is masked in both
models (and, for an encoder, left out of the comparison; T5's decoder inputs are not padded).
Decoders are compared without padding: they were pre-trained without it, and a causal model's
logits at a position do not depend on later (padded) ones.

Tolerance: both sides compute in fp32 from the same weights (for a bf16/fp16 export ours are
rounded to that dtype first), so they differ only by the order of operations (SDPA kernels,
ModernBERT's fused Wqkv, peft's separate adapter path): a few 1e-7 to 1e-6 of the logits' scale
on the models we test. A wrong mapping, a swapped matrix or a wrong config field (rope_theta,
norm_eps, ...) moves logits by a good fraction of that scale. The check fails above
`RTOL` x max(1, max |logit|): 1e-4 relative, room for deep models' longer fp32 sums, with a
floor of 1e-4 absolute for fresh models whose logits are small but whose residual stream (and
so its rounding) is O(1).

A directory that fails is renamed `<out>.unverified` (an earlier one of that name is replaced)
with `NOT_VERIFIED.txt` inside giving the reason: nothing that loads `<out>` gets the bad model,
and the files stay for inspection.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from pretrain.config import ModelConfig
from pretrain.errors import PretrainError
from pretrain.interop.hf import to_hf_config, to_hf_state_dict

__all__ = ["RTOL", "ExportMismatch", "Verified", "fixed_batch", "mark_unverified",
           "our_logits", "reference_model", "verify_adapter", "verify_export"]

RTOL = 1e-4
"""Largest logit difference allowed, relative to max(1, max |logit|) (module docstring)."""
_SEED, _DECODER_SEED = 0, 1
UNVERIFIED_SUFFIX = ".unverified"
MARKER = "NOT_VERIFIED.txt"


class ExportMismatch(PretrainError, RuntimeError):
    """transformers' logits of an export differ from ours by more than the tolerance."""


@dataclass(frozen=True)
class Batch:
    """The fixed batch: `tokens` (B, T) with `mask` (True = a real token), and for T5 the
    decoder's inputs (B, T')."""

    tokens: Tensor
    mask: Tensor
    decoder_tokens: Tensor | None


@dataclass(frozen=True)
class Verified:
    """A passed check: the largest difference, its tolerance, and what was compared."""

    max_diff: float
    tolerance: float
    n_tokens: int

    def __str__(self) -> str:
        return (f"verified: transformers' logits match ours to {self.max_diff:.1e} "
                f"(tolerance {self.tolerance:.1e}, {self.n_tokens} tokens, fp32)")


def fixed_batch(cfg: ModelConfig, *, length: int = 32) -> Batch:
    """Two rows of seeded random ids in [0, vocab_size); padding where the family takes it."""
    T = min(length, cfg.max_seq_len)
    tokens = torch.randint(0, cfg.vocab_size, (2, T),
                           generator=torch.Generator().manual_seed(_SEED))
    mask = torch.ones(2, T, dtype=torch.bool)
    if cfg.arch != "decoder":
        mask[1, T - T // 3:] = False
    decoder_tokens = None
    if cfg.arch == "encoder_decoder":
        decoder_tokens = torch.randint(0, cfg.vocab_size, (2, T),
                                       generator=torch.Generator().manual_seed(_DECODER_SEED))
    return Batch(tokens, mask, decoder_tokens)


def _compared(cfg: ModelConfig, batch: Batch) -> Tensor:
    """(B, T) bool: the logit rows that are compared (an encoder's padding is not)."""
    if cfg.arch == "encoder_decoder":
        return torch.ones_like(batch.decoder_tokens, dtype=torch.bool)
    return batch.mask


@torch.no_grad()
def our_logits(model: nn.Module, cfg: ModelConfig, batch: Batch) -> Tensor:
    """Our model's fp32 logits (B, T, vocab) on `batch`."""
    model.eval()
    if cfg.arch == "decoder":
        return model(batch.tokens).float()
    attn_mask = batch.mask[:, None, None, :]
    if cfg.arch == "encoder":
        return model(batch.tokens, attn_mask=attn_mask).float()
    return model(batch.tokens, decoder_inputs=batch.decoder_tokens, attn_mask=attn_mask).float()


@torch.no_grad()
def _hf_logits(hf: nn.Module, cfg: ModelConfig, batch: Batch) -> Tensor:
    hf.eval()
    if cfg.arch == "decoder":
        return hf(input_ids=batch.tokens).logits.float()
    mask = batch.mask.long()
    if cfg.arch == "encoder":
        return hf(input_ids=batch.tokens, attention_mask=mask).logits.float()
    return hf(input_ids=batch.tokens, attention_mask=mask,
              decoder_input_ids=batch.decoder_tokens).logits.float()


def reference_model(state_dict: dict[str, Tensor], cfg: ModelConfig,
                    dtype: torch.dtype = torch.float32) -> nn.Module:
    """Our fp32 model holding `state_dict` as an export in `dtype` stores it (rounded)."""
    from pretrain.models.build import build_model

    model = build_model(cfg, device="cpu")
    weights = {k: v.detach().to("cpu", dtype).float() for k, v in state_dict.items()}
    if cfg.tie_embeddings and "tok_embeddings.weight" in weights:  # a checkpoint may hold it once
        weights.setdefault("output.weight", weights["tok_embeddings.weight"])
    model.load_state_dict(weights, strict=True)
    return model.eval()


def _compare(ours: Tensor, theirs: Tensor, cfg: ModelConfig, batch: Batch,
             what: str) -> Verified:
    """`Verified`, or ExportMismatch naming the largest difference and where it is."""
    compared = _compared(cfg, batch)
    if ours.shape != theirs.shape:
        raise ExportMismatch(f"{what}: transformers' logits have shape {tuple(theirs.shape)}, "
                             f"ours {tuple(ours.shape)}")
    diff = (ours - theirs).abs().nan_to_num(nan=float("inf")).masked_fill(~compared[..., None],
                                                                          0.0)
    scale = max(1.0, float(ours.abs().masked_fill(~compared[..., None], 0.0).max()))
    tolerance = RTOL * scale
    worst = float(diff.max())
    if worst <= tolerance:
        return Verified(worst, tolerance, int(compared.sum()))
    row, pos, vocab = (int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    inputs = batch.tokens if batch.decoder_tokens is None else batch.decoder_tokens
    where = "decoder position" if batch.decoder_tokens is not None else "position"
    raise ExportMismatch(
        f"{what}: transformers' logits differ from ours by {worst:.3e} at row {row}, {where} "
        f"{pos} (input id {int(inputs[row, pos])}), vocab id {vocab} (ours "
        f"{float(ours[row, pos, vocab]):.4g}, transformers {float(theirs[row, pos, vocab]):.4g});"
        f" tolerance {tolerance:.1e} = {RTOL:g} x max(1, max |logit| {scale:.3g}); the export "
        "does not reproduce the model: report it (pass --no-verify only to skip the check)")


def verify_export(out_dir: str | Path, cfg: ModelConfig, reference: nn.Module) -> Verified:
    """Load the export at `out_dir` with transformers (its declared class, fp32, local files
    only) and compare its logits on `fixed_batch(cfg)` with `reference`'s (ours, holding the
    exported weights). Raises ExportMismatch."""
    import transformers

    out = Path(out_dir)
    architectures = json.loads((out / "config.json").read_text()).get("architectures") or []
    if len(architectures) != 1 or not hasattr(transformers, architectures[0]):
        raise ExportMismatch(f"{out}/config.json declares architectures={architectures}; "
                             "expected one transformers model class")
    hf = getattr(transformers, architectures[0]).from_pretrained(
        out, dtype=torch.float32, local_files_only=True)
    batch = fixed_batch(cfg)
    return _compare(our_logits(reference, cfg, batch), _hf_logits(hf, cfg, batch), cfg, batch,
                    f"{out} ({architectures[0]})")


def _hf_model(state_dict: dict[str, Tensor], cfg: ModelConfig) -> nn.Module:
    """The transformers model of `cfg` holding our `state_dict`, in memory (fp32)."""
    import transformers

    hf_cfg = to_hf_config(cfg)
    weights = {k: v.detach().to("cpu", torch.float32)
               for k, v in to_hf_state_dict(state_dict, cfg).items()}
    # on the CPU, not meta: buffers the weights do not hold (RoPE's inv_freq) need their values
    model = getattr(transformers, hf_cfg.architectures[0])(hf_cfg)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def verify_adapter(adapter_dir: str | Path, cfg: ModelConfig, lora_model: nn.Module,
                   base_state_dict: dict[str, Tensor]) -> Verified:
    """Load the peft adapter at `adapter_dir` onto the transformers model of our base weights
    (`base_state_dict`, built in memory) and compare its logits with `lora_model`'s (ours,
    adapters unmerged). Raises ExportMismatch."""
    from peft import PeftModel

    base = _hf_model(base_state_dict, cfg)
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in 5.x
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    batch = fixed_batch(cfg)
    return _compare(our_logits(lora_model, cfg, batch), _hf_logits(peft_model, cfg, batch), cfg,
                    batch, f"{adapter_dir} (peft adapter)")


def mark_unverified(out_dir: str | Path, reason: str) -> Path:
    """Rename a failed export `<out>.unverified` (replacing an earlier one), with MARKER inside
    holding `reason`, so that nothing loads it by its name. Returns the new path."""
    out = Path(out_dir)
    moved = out.with_name(out.name + UNVERIFIED_SUFFIX)
    if moved.exists():
        shutil.rmtree(moved)
    out.rename(moved)
    (moved / MARKER).write_text(reason + "\n")
    return moved
