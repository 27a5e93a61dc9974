"""Document masking for packed windows: attention that does not cross document boundaries.

A window packs several documents (each ending with EOS). With document masking, a token attends
only to earlier tokens of its own document: the causal mask intersected with a block-diagonal
"same document" mask, which `pretrain.models.llama.Transformer` takes as `attn_mask` (SDPA
with a boolean mask). Rotary positions can restart at each document start as well, so that a
document is encoded exactly as if it began the window.
"""

from __future__ import annotations

import numpy as np
import torch


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool, True = attend: causal, within one document.

    Build it on the device the model runs on (from the doc ids moved there): it holds B * T^2
    bytes, far more than the ids it is computed from.
    """
    T = doc_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril_()  # (T, T)
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (same_doc & causal)[:, None]


def document_positions(doc_ids: np.ndarray) -> np.ndarray:
    """(B, T) document ids -> (B, T) int64 offset of each token from its document's start in
    the window (the window's first document counts from the window start)."""
    B, T = doc_ids.shape
    # Flattened, the batch is a run of segments, one per (row, document); a token's position is
    # its distance from its segment's start.
    new = np.empty((B, T), dtype=bool)
    new[:, 0] = True
    np.not_equal(doc_ids[:, 1:], doc_ids[:, :-1], out=new[:, 1:])
    starts = np.flatnonzero(new)
    lengths = np.diff(starts, append=B * T)
    return (np.arange(B * T) - np.repeat(starts, lengths)).reshape(B, T)
