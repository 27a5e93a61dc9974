"""Mixing prepared datasets by weight: the `data.mix` config, and which source each position of
the global training order reads.

Position ``g`` of the global order reads from source ``s`` when

    u_g = (u_0 + g * PHI64) mod 2^64

falls in ``s``'s slice of [0, 2^64), slices in proportion to the weights (sources sorted by
name). ``u_g`` is the additive recurrence of the golden ratio (a Weyl sequence), the best-spread
sequence of its kind: among any n consecutive positions, each source's share differs from its
weight by O(log n / n). So every stretch of training, one global batch or a million, holds the
sources in their proportions, without the drift of independent random draws. ``u_0`` comes from
the seed. The assignment is a function of the position alone: it does not depend on how
positions are split between ranks, accumulation steps or loader threads, and a resumed run with
new weights simply uses them from its resume position on. Each source keeps its own count of
windows consumed, which is its position in its own seeded window order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pretrain.errors import DataError

if TYPE_CHECKING:
    from pretrain.config import DataConfig

PHI64 = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio, odd
_ENTRY_KEYS = frozenset({"dir", "source", "weight", "text_field", "split", "max_bytes"})


@dataclass(frozen=True)
class MixEntry:
    """One dataset of a mixture (an entry of `data.mix`)."""

    name: str
    weight: float
    dir: str | None = None
    """A prepared dataset directory; or else"""
    source: str | None = None
    """a corpus, prepared into the cache on first use (like `data.source`)."""
    text_field: str | None = None
    split: str | None = None
    max_bytes: int | None = None


def parse_mix(mix: Mapping[str, Any]) -> list[MixEntry]:
    """The entries of `data.mix`, sorted by name; DataError naming the entry when one is
    malformed or the weights are not usable."""
    if not isinstance(mix, Mapping):
        raise DataError(f"data.mix must map source names to {{dir: PATH, weight: W}} (or "
                        f"{{source: CORPUS, weight: W}}), got {mix!r}")
    entries = [_parse_entry(str(name), spec) for name, spec in sorted(mix.items())]
    normalize_weights({e.name: e.weight for e in entries})
    return entries


def _parse_entry(name: str, spec: Any) -> MixEntry:
    where = f"data.mix.{name}"
    if not isinstance(spec, Mapping):
        raise DataError(f"{where} must be a mapping like {{dir: PATH, weight: 0.5}}, got "
                        f"{spec!r}")
    unknown = set(spec) - _ENTRY_KEYS
    if unknown:
        raise DataError(f"{where} has unknown keys {sorted(unknown)}; use "
                        f"{sorted(_ENTRY_KEYS)}")
    if (spec.get("dir") is None) == (spec.get("source") is None):
        raise DataError(f"{where} needs exactly one of `dir` (a prepared dataset) or `source` "
                        "(a corpus to prepare)")
    weight = spec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise DataError(f"{where}.weight must be a number, got {weight!r}")
    return MixEntry(name, float(weight), dir=spec.get("dir"), source=spec.get("source"),
                    text_field=spec.get("text_field"), split=spec.get("split"),
                    max_bytes=spec.get("max_bytes"))


def normalize_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Weights scaled to sum to 1; DataError when one is negative or not finite, or when they
    sum to zero (nothing could be read)."""
    for name, w in weights.items():
        if not math.isfinite(w) or w < 0:
            raise DataError(f"mixture weight of {name!r} is {w}; weights must be finite and "
                            ">= 0 (0 pauses a source)")
    total = sum(weights.values())
    if total <= 0:
        raise DataError(f"mixture weights {dict(weights)} sum to zero; give at least one "
                        "source a positive weight")
    return {name: w / total for name, w in weights.items()}


def slice_bounds(weights: list[float]) -> np.ndarray:
    """(n_sources - 1,) uint64 upper ends of the sources' slices of [0, 2^64)."""
    cumulative = np.cumsum(weights)[:-1] / sum(weights)
    # Python ints: exact for 2^64 * x, which float64 -> uint64 casts would round at the top.
    return np.array([min(int(c * 2.0**64), 2**64 - 1) for c in cumulative], dtype=np.uint64)


def mix_offset(seed: int) -> np.uint64:
    """u_0: where the sequence starts, from the seed."""
    digest = hashlib.blake2b(f"mix:{seed}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def assign_sources(positions: np.ndarray, bounds: np.ndarray, offset: np.uint64) -> np.ndarray:
    """(n,) index of the source each global position reads (see the module docstring)."""
    with np.errstate(over="ignore"):  # the recurrence wraps modulo 2^64 on purpose
        u = offset + np.asarray(positions, dtype=np.uint64) * PHI64
    return np.searchsorted(bounds, u, side="right")


def data_config_errors(cfg: DataConfig) -> list[str]:
    """Problems of a DataConfig that can be found without touching any file (for
    `pretrain.config.validate`, so a bad mixture stops the run before anything starts)."""
    errors = []
    if cfg.mix:
        try:
            parse_mix(cfg.mix)
        except DataError as e:
            errors.append(str(e))
    if cfg.restart_positions and not cfg.document_masking:
        errors.append("data.restart_positions=true needs data.document_masking=true: restarted "
                      "positions with attention across documents would mislabel the earlier "
                      "document's tokens")
    if cfg.num_workers < 0 or cfg.prefetch < 1:
        errors.append(f"data.num_workers={cfg.num_workers} must be >= 0 and data.prefetch="
                      f"{cfg.prefetch} >= 1")
    return errors
