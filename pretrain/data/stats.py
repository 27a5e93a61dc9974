"""Token and document counts of prepared datasets (from the shards' headers and document ends,
without reading tokens or re-tokenizing) or of a raw corpus (tokenized in worker processes),
and a document length histogram.

Lengths go into fixed logarithmic bins (8 per octave) instead of a list, so counting a corpus of
billions of documents needs constant memory; quantiles are read off the bins (within 9%).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from pretrain.data.shards import read_manifest, read_shard

_BINS_PER_OCTAVE = 8
EDGES = 2.0 ** (np.arange(0, 40 * _BINS_PER_OCTAVE + 1) / _BINS_PER_OCTAVE)
"""Bin edges of document lengths in tokens: 1 to 2^40."""


@dataclass
class LengthHistogram:
    """Document lengths (tokens, EOS included) in logarithmic bins."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(len(EDGES) - 1, np.int64))
    n_docs: int = 0
    n_tokens: int = 0
    longest: int = 0

    def add(self, lengths: np.ndarray) -> None:
        if not len(lengths):
            return
        self.counts += np.histogram(lengths, bins=EDGES)[0]
        self.n_docs += len(lengths)
        self.n_tokens += int(lengths.sum())
        self.longest = max(self.longest, int(lengths.max()))

    @property
    def mean(self) -> float:
        return self.n_tokens / max(self.n_docs, 1)

    def quantile(self, q: float) -> float:
        """The upper edge of the bin holding the q-quantile (0 when empty)."""
        if not self.n_docs:
            return 0.0
        at = int(np.searchsorted(np.cumsum(self.counts), q * self.n_docs, side="left"))
        return float(min(EDGES[at + 1], self.longest))


@dataclass
class SplitCount:
    """Counts of one split of one dataset."""

    source: str
    split: str
    n_tokens: int
    n_docs: int
    n_shards: int
    lengths: LengthHistogram


def count_prepared(name: str, data_dir: str) -> list[SplitCount]:
    """Counts of every split of a prepared dataset, read from shard headers and document ends.

    A document split across shards counts once, with its whole length; tokens after the last
    document end of a split (none, for datasets made by `prepare`) are not a document.
    """
    manifest = read_manifest(data_dir)
    out = []
    for split, entry in sorted(manifest["splits"].items()):
        hist, previous, base = LengthHistogram(), 0, 0
        for shard_entry in entry["shards"]:
            shard = read_shard(os.path.join(data_dir, shard_entry["name"]), verify=False)
            ends = shard.doc_ends.astype(np.int64) + base
            hist.add(np.diff(ends, prepend=previous))
            previous = int(ends[-1]) if len(ends) else previous
            base += shard.n_tokens
        out.append(SplitCount(name, split, base, hist.n_docs, len(entry["shards"]), hist))
    return out


def count_corpus(
    name: str, source: str, tokenizer_path: str, *, num_workers: int = 1,
    text_field: str = "text", split: str = "train", max_bytes: int = 0,
) -> SplitCount:
    """Counts of a raw corpus, tokenized (EOS appended, as preparation would) and discarded."""
    from pretrain.data.prepare import count_document_tokens

    hist = LengthHistogram()
    for lengths in count_document_tokens(source, tokenizer_path, num_workers=num_workers,
                                         text_field=text_field, split=split,
                                         max_bytes=max_bytes):
        hist.add(lengths)
    return SplitCount(name, "corpus", hist.n_tokens, hist.n_docs, 0, hist)


def plot_lengths(counts: list[SplitCount], path: str) -> None:
    """Write a PNG of the document length distribution of each (source, split)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for c in counts:
        used = np.flatnonzero(c.lengths.counts)
        if not len(used):
            continue
        lo, hi = used[0], used[-1] + 1
        ax.stairs(c.lengths.counts[lo:hi], EDGES[lo:hi + 1],
                  label=f"{c.source}/{c.split} ({c.n_docs:,} docs)")
    ax.set_xscale("log")
    ax.set_xlabel("document length (tokens, EOS included)")
    ax.set_ylabel(f"documents per bin ({_BINS_PER_OCTAVE} bins per doubling)")
    ax.set_title("Document lengths")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
