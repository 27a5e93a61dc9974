"""The losses: next-token cross-entropy on logits, and of the output projection without
materializing the full logits.

The plain loss, `cross_entropy(output(h), targets)`, holds (N, V) logits in the compute dtype,
their fp32 copy, the log-softmax and its gradient at once: for N = 8 x 512 tokens and V = 8192
that is ~0.4 GB, for a 1B model at 16k tokens x 32k vocabulary ~6 GB, more than one block's
activations (with full checkpointing, more than all of them). `linear_cross_entropy` takes the
final hidden states and the output weight instead and works on chunks of tokens: per chunk it
computes the logits, the loss and, right away, the gradients with respect to the chunk's
hidden states and to the weight (the softmax minus the one-hot target, times the two
operands), then drops the chunk's logits. Backward only scales the stored gradients by the
incoming scalar, so no matmul is recomputed: the FLOPs are those of the plain loss, and the
loss adds one chunk of logits plus the gradients to the peak memory.

Numerics follow the plain loss under autocast: the matmuls run in the autocast dtype (bf16 or
fp16), the logits are upcast to fp32 for the log-sum-exp, and the logit gradient is cast back
to the matmul dtype, before the division by the token count so that fp16 does not underflow.
The weight gradient is summed over chunks in fp32 (the plain path rounds the whole sum to bf16
once), so in fp32 the result equals the plain loss to rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["IGNORE_INDEX", "cross_entropy", "default_chunk_tokens", "linear_cross_entropy"]

IGNORE_INDEX = -100
"""The target id every loss here skips (PyTorch's default `ignore_index`): padding rows of an
evaluation batch carry it."""


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token loss in fp32 over the targets that are not IGNORE_INDEX; logits (B, T, V),
    targets (B, T)."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                             ignore_index=IGNORE_INDEX)

# Logits per chunk (16 MiB in fp32): small next to a block's activations, so the loss does not
# set the step's peak memory; at least _MIN_CHUNK rows, so each chunk's matmuls stay efficient.
_CHUNK_ELEMENTS = 2**22
_MIN_CHUNK = 256


def default_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk: ~_CHUNK_ELEMENTS logits, a multiple of 64 rows, >= _MIN_CHUNK."""
    return max(_MIN_CHUNK, (_CHUNK_ELEMENTS // vocab_size) // 64 * 64)


def _compute_dtype(device_type: str, fallback: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return fallback


def _chunk_loss_and_grad(
    h: Tensor, w: Tensor, targets: Tensor, valid: Tensor, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Summed loss of one chunk (fp32 scalar) and d(summed loss)/d(logits) in h's dtype.

    h: (n, D), w: (V, D), targets/valid: (n,). The gradient is not yet divided by the token
    count: softmax - one_hot lies in [-1, 1], where fp16 does not underflow as it would at
    1/N of it. Written for few passes over the (n, V) logits, which bound its speed: the
    softmax is built in place in the fp32 logits and the last pass writes h's dtype.
    """
    logits = (h @ w.t()).float()  # (n, V)
    safe = torch.where(valid, targets, torch.zeros_like(targets))[:, None]  # (n, 1)
    target_logit = logits.gather(1, safe)  # (n, 1)
    peak = logits.amax(dim=-1, keepdim=True)  # (n, 1)
    exp = logits.sub_(peak).exp_()  # (n, V), in place
    total = exp.sum(dim=-1, keepdim=True)  # (n, 1)
    loss = ((peak + total.log() - target_logit).squeeze(1) * valid).sum()
    if not need_grad:
        return loss, None
    # (softmax - one_hot) * valid  ==  (exp - total * one_hot) * (valid / total)
    exp.scatter_add_(1, safe, -total)
    grad = torch.empty(exp.shape, dtype=h.dtype, device=h.device)
    torch.mul(exp, (valid / total.squeeze(1))[:, None], out=grad)
    return loss, grad


@functools.cache
def _compiled_chunk_fn() -> Callable[..., tuple[Tensor, Tensor | None]]:
    """`_chunk_loss_and_grad` compiled (once, on first use): the passes over the logits fuse
    into a reduction and one element-wise kernel."""
    return torch.compile(_chunk_loss_and_grad)


def _loss_and_grads(
    h: Tensor, w: Tensor, targets: Tensor, chunk_tokens: int, ignore_index: int,
    need_h: bool, need_w: bool, compiled: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Mean loss over the valid tokens, 1 / their count, and if asked the gradients of the
    summed loss: d/dh (N, D) in h's dtype and d/dw (V, D) in fp32.
    h: (N, D) and w: (V, D) already in the matmul dtype."""
    valid = targets != ignore_index
    # A tensor, not a Python number: reading the count would stall a GPU step.
    scale = 1.0 / valid.sum().clamp(min=1).float()
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    chunk_fn = _compiled_chunk_fn() if compiled else _chunk_loss_and_grad
    with torch.autocast(h.device.type, enabled=False):
        for start in range(0, h.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            loss, g = chunk_fn(h[rows], w, targets[rows], valid[rows], need_h or need_w)
            total += loss
            if grad_h is not None:
                torch.mm(g, w, out=grad_h[rows])
            if grad_w is not None:
                grad_w.add_(g.t() @ h[rows])  # summed in fp32 across chunks
    return total * scale, scale, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean CE of hidden @ weight.T against targets; gradients computed during forward."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        chunk_tokens: int,
        ignore_index: int,
        compute_dtype: torch.dtype,
        compiled: bool,
    ) -> Tensor:
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)  # (N, D), (V, D)
        loss, scale, grad_h, grad_w = _loss_and_grads(
            h, w, targets, chunk_tokens, ignore_index, *ctx.needs_input_grad[:2], compiled)
        ctx.save_for_backward(grad_h, grad_w, scale)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        grad_h, grad_w, scale = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        # The mean's 1/N, times grad_out: 1, 1 / grad_accum, or an fp16 loss scale.
        factor = scale * grad_out
        dh = None if grad_h is None else grad_h.to(h_dtype) * factor
        dw = None if grad_w is None else (grad_w * factor).to(w_dtype)
        return dh, dw, None, None, None, None, None


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    chunk_tokens: int | None = None,
    ignore_index: int = -100,
    compile: bool = False,
) -> Tensor:
    """Mean next-token loss (fp32) of `logits = hidden @ weight.T` without the full logits.

    hidden: (..., D) final-norm hidden states (`Transformer(..., return_hidden=True)`);
    weight: (V, D) the output projection's weight; targets: (...) ids, `ignore_index` skipped.
    Equals `F.cross_entropy(F.linear(hidden, weight).float(), targets)`, also under autocast
    (whose dtype the matmuls then use). `chunk_tokens` defaults to ~4M logits per chunk;
    `compile` runs each chunk's element-wise work as torch.compile'd kernels.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} "
                         "must agree on every dimension but the last")
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    dtype = _compute_dtype(hidden.device.type, hidden.dtype)
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, ignore_index, dtype,
                                         compile)
    # Evaluation: the same chunked loss, no gradients computed.
    loss, _, _, _ = _loss_and_grads(hidden.to(dtype), weight.to(dtype), targets, chunk,
                                    ignore_index, False, False, compile)
    return loss
