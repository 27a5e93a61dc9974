"""Pre-training objectives: what a batch of raw token windows becomes before the model sees it.

Each objective turns the windows the loader reads, ``tokens`` (B, W) with W = `window_len`, into
model inputs and targets (`Corrupted`, numpy; the loader makes the `Batch`):

- `Clm`: next-token prediction; inputs are ``tokens[:, :-1]`` and targets ``tokens[:, 1:]``.
- `Mlm`: BERT's masked LM over the first seq_len tokens: exactly ``round(mask_rate * seq_len)``
  tokens per row (never a control id: pad, BOS, EOS, ...) are predicted; of those, a fraction
  becomes <mask>, a fraction a random ordinary token, the rest stay (80/10/10 by default);
  every other target is IGNORE_INDEX.
- `Span`: T5's span corruption. The raw window is sized (`window_len`) so that the encoder
  input is exactly seq_len tokens: non-noise tokens, one sentinel per noise span, EOS; the target
  is each sentinel followed by its span, then EOS (`target_len` tokens); the decoder input is the
  target shifted right behind the pad id (T5's decoder start).
- `Fim`: fill-in-the-middle (Bavarian et al. 2022) at document level, as Megatron-LM and
  StarCoder do it: each document segment of a window is, with probability fim_rate, cut at two
  uniform points and rewritten PSM or SPM (see `Fim`), its length kept; then shifted as clm.

Randomness: every row has its own generator, keyed by `window_keys` from (seed, a split tag, the
row's global window position) and nothing else, so a batch does not depend on the number of
ranks, workers or accumulation steps, a resumed run corrupts as the original did, and a window
read again in a later epoch (at a later position) is corrupted anew.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pretrain.data.tokenizer import FimIds
from pretrain.data.windows import mix64
from pretrain.errors import DataError
from pretrain.models.loss import IGNORE_INDEX

if TYPE_CHECKING:
    from pretrain.config import ObjectiveConfig
    from pretrain.data.tokenizer import Tokenizer

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment
FIM_EXTRA_TOKENS = 3
"""Tokens FIM adds to a segment (<fim_prefix>, <fim_suffix>, <fim_middle>), cut from its suffix."""


# -- keys ------------------------------------------------------------------------------------


def window_keys(seed: int, tag: str, positions: np.ndarray) -> np.ndarray:
    """(n,) uint64 generator keys of the windows at global `positions` of the stream `tag`
    names ("train", or "eval:val" for the fixed validation set): splitmix64 of the positions,
    started at a hash of (seed, tag)."""
    digest = hashlib.blake2b(f"objective:{seed}:{tag}".encode(), digest_size=8).digest()
    base = np.uint64(int.from_bytes(digest, "little"))
    with np.errstate(over="ignore"):  # wrapping arithmetic on purpose
        return mix64(base + (np.asarray(positions, dtype=np.uint64) + np.uint64(1)) * _GOLDEN)


def row_rng(key: int | np.integer) -> np.random.Generator:
    """The generator of one row: Philox keyed by the row's key (independent streams per key)."""
    return np.random.Generator(np.random.Philox(key=int(key)))


# -- shared types ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecialIds:
    """The ids an objective needs from the tokenizer."""

    pad: int
    eos: int
    control: tuple[int, ...]
    """Every id encoding text never produces (pad, unk, BOS, EOS, the control symbols)."""
    mask: int | None = None
    sentinels: tuple[int, ...] = ()
    fim: FimIds | None = None

    @classmethod
    def of(cls, tok: Tokenizer, objective: str) -> SpecialIds:
        """The ids `objective` needs from `tok`; DataError naming what is missing."""
        tok.require_specials(objective)
        return cls(
            pad=tok.pad_id, eos=tok.eos_id, control=tuple(tok.control_ids),
            mask=tok.mask_id if objective == "mlm" else None,
            sentinels=tuple(tok.sentinel_ids) if objective == "span" else (),
            fim=tok.fim_ids if objective == "fim" else None)


@dataclass
class Corrupted:
    """What an objective makes of a batch of windows (numpy; the loader turns it into a Batch)."""

    inputs: np.ndarray
    """(B, T) int64 model (encoder) input ids."""
    targets: np.ndarray
    """(B, T) int64, or (B, T_dec) for span; IGNORE_INDEX where nothing is predicted."""
    decoder_inputs: np.ndarray | None = None
    """(B, T_dec) int64 decoder input ids (span)."""
    middle_mask: np.ndarray | None = None
    """(B, T) bool: the target is a token of a FIM middle (fim)."""


class Objective:
    """The interface every objective follows."""

    name: str
    needs_doc_ids = False
    """Whether `corrupt` needs the document ids of the whole window."""
    aligned = True
    """Whether input t is the window's token t (possibly replaced), so that document ids and
    restarted positions of the window apply to the inputs."""

    def window_len(self, seq_len: int) -> int:
        """Raw tokens the loader reads per window for inputs of `seq_len` tokens."""
        return seq_len + 1

    def corrupt(self, tokens: np.ndarray, keys: np.ndarray,
                doc_ids: np.ndarray | None = None) -> Corrupted:
        """Inputs and targets of `tokens` (B, W) int64; `keys` (B,) uint64 from `window_keys`;
        `doc_ids` (B, W) the document index of every token (where `needs_doc_ids`)."""
        raise NotImplementedError


class Clm(Objective):
    """Next-token prediction: the window shifted by one."""

    name = "clm"

    def corrupt(self, tokens: np.ndarray, keys: np.ndarray,
                doc_ids: np.ndarray | None = None) -> Corrupted:
        return Corrupted(tokens[:, :-1].copy(), tokens[:, 1:].copy())  # (B, T) each


# -- masked LM -------------------------------------------------------------------------------


class Mlm(Objective):
    """BERT's masked LM on the first seq_len tokens of each window."""

    name = "mlm"

    def __init__(self, ids: SpecialIds, vocab_size: int, *, mask_rate: float = 0.15,
                 mask_token_fraction: float = 0.8, random_token_fraction: float = 0.1):
        if ids.mask is None:
            raise ValueError("mlm needs the <mask> id")
        if not (0 < mask_rate <= 1 and mask_token_fraction >= 0 and random_token_fraction >= 0
                and mask_token_fraction + random_token_fraction <= 1):
            raise ValueError(f"need 0 < mask_rate <= 1 and fractions summing to at most 1; got "
                             f"{mask_rate}, {mask_token_fraction}, {random_token_fraction}")
        self.mask_id, self.rate = ids.mask, mask_rate
        self.mask_fraction, self.random_fraction = mask_token_fraction, random_token_fraction
        self.control = np.array(sorted(ids.control), dtype=np.int64)
        self.normal_ids = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), self.control)
        """The ids a random replacement is drawn from: every id but the control ones."""

    def corrupt(self, tokens: np.ndarray, keys: np.ndarray,
                doc_ids: np.ndarray | None = None) -> Corrupted:
        inputs = tokens[:, :-1].copy()  # (B, T)
        B, T = inputs.shape
        targets = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        n_predict = int(round(self.rate * T))
        candidates = ~np.isin(inputs, self.control)  # (B, T)
        for row, key in enumerate(keys):
            rng = row_rng(key)
            where = np.flatnonzero(candidates[row])
            chosen = rng.choice(where, size=min(n_predict, len(where)), replace=False)
            targets[row, chosen] = inputs[row, chosen]
            u = rng.random(len(chosen))
            masked = chosen[u < self.mask_fraction]
            randomized = chosen[(u >= self.mask_fraction)
                                & (u < self.mask_fraction + self.random_fraction)]
            inputs[row, masked] = self.mask_id
            inputs[row, randomized] = self.normal_ids[rng.integers(len(self.normal_ids),
                                                                   size=len(randomized))]
        return Corrupted(inputs, targets)


# -- T5 span corruption ----------------------------------------------------------------------


def noise_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a window of `length` tokens, as T5's
    random_spans_noise_mask decides them: round(length * density) clipped to [1, length - 1],
    and round(noise / mean) spans, at least 1 (and at most the noise and non-noise tokens, so
    that every span and every gap is non-empty)."""
    noise = min(max(int(round(length * noise_density)), 1), length - 1)
    spans = max(int(round(noise / mean_span_length)), 1)
    return noise, min(spans, noise, length - noise)


def span_lengths(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(encoder input, target) lengths T5's span corruption makes of `length` raw tokens: the
    non-noise tokens, a sentinel per span and EOS; the noise tokens, a sentinel per span and EOS."""
    noise, spans = noise_counts(length, noise_density, mean_span_length)
    return length - noise + spans + 1, noise + spans + 1


def random_spans_noise_mask(length: int, noise: int, spans: int,
                            rng: np.random.Generator) -> np.ndarray:
    """(length,) bool, True = noise: `spans` noise spans holding `noise` tokens between as many
    non-noise spans, starting with non-noise; every such segmentation equally likely (T5). As in
    T5's span_corruption (no random roll), the window's last token is always noise."""
    noise_lengths = _random_segmentation(noise, spans, rng)
    keep_lengths = _random_segmentation(length - noise, spans, rng)
    lengths = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)  # keep, noise, ...
    starts = np.zeros(length, dtype=np.int64)
    starts[np.cumsum(lengths)[:-1]] = 1
    return np.cumsum(starts) % 2 == 1


def _random_segmentation(n_items: int, n_segments: int, rng: np.random.Generator) -> np.ndarray:
    """(n_segments,) positive lengths summing to n_items, uniformly among such partitions."""
    first = np.zeros(n_items, dtype=bool)
    first[1 + rng.choice(n_items - 1, size=n_segments - 1, replace=False)] = True
    return np.bincount(np.cumsum(first), minlength=n_segments)


class Span(Objective):
    """T5's span corruption for an encoder-decoder; `seq_len` is the encoder input length."""

    name = "span"
    aligned = False

    def __init__(self, ids: SpecialIds, *, noise_density: float = 0.15,
                 mean_span_length: float = 3.0):
        if not ids.sentinels:
            raise ValueError("span corruption needs the sentinel ids")
        if not (0 < noise_density < 1 and mean_span_length >= 1):
            raise ValueError(f"need 0 < noise_density < 1 and mean_span_length >= 1; got "
                             f"{noise_density}, {mean_span_length}")
        self.sentinels = np.array(ids.sentinels, dtype=np.int64)
        self.pad, self.eos = ids.pad, ids.eos
        self.density, self.mean = noise_density, mean_span_length

    def window_len(self, seq_len: int) -> int:
        """The most raw tokens whose corrupted encoder input is `seq_len` tokens (T5's
        compute_input_and_target_lengths, with the clipping the mask itself applies and without
        its density-0.5 tweak, so the input length is always exactly seq_len)."""
        length = 2
        while span_lengths(length + 1, self.density, self.mean)[0] <= seq_len:
            length += 1
        if span_lengths(length, self.density, self.mean)[0] != seq_len:
            raise ValueError(f"no raw window corrupts to exactly seq_len={seq_len} encoder tokens "
                             f"with noise_density={self.density} and mean_span_length="
                             f"{self.mean}; use a longer seq_len")
        self._check_spans(length)
        return length

    def target_len(self, seq_len: int) -> int:
        """Target (and decoder input) length for encoder inputs of `seq_len` tokens."""
        return span_lengths(self.window_len(seq_len), self.density, self.mean)[1]

    def _check_spans(self, length: int) -> None:
        n_in, _ = span_lengths(length, self.density, self.mean)
        spans = noise_counts(length, self.density, self.mean)[1]
        if spans > len(self.sentinels):
            raise DataError(f"span corruption of seq_len={n_in} makes {spans} noise spans but "
                            f"the tokenizer has {len(self.sentinels)} sentinels; lower seq_len or "
                            "objective.noise_density, or raise objective.mean_span_length")

    def corrupt(self, tokens: np.ndarray, keys: np.ndarray,
                doc_ids: np.ndarray | None = None) -> Corrupted:
        B, W = tokens.shape
        self._check_spans(W)
        noise, spans = noise_counts(W, self.density, self.mean)
        n_in, n_out = span_lengths(W, self.density, self.mean)
        inputs = np.empty((B, n_in), dtype=np.int64)
        targets = np.empty((B, n_out), dtype=np.int64)
        for row, key in enumerate(keys):
            mask = random_spans_noise_mask(W, noise, spans, row_rng(key))
            inputs[row, :-1] = self._replace_spans(tokens[row], mask)
            targets[row, :-1] = self._replace_spans(tokens[row], ~mask)
        inputs[:, -1] = targets[:, -1] = self.eos
        decoder_inputs = np.empty_like(targets)  # (B, T_dec)
        decoder_inputs[:, 0] = self.pad
        decoder_inputs[:, 1:] = targets[:, :-1]
        return Corrupted(inputs, targets, decoder_inputs)

    def _replace_spans(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """`tokens` with each run of `mask` replaced by the next sentinel (T5's
        noise_span_to_unique_sentinel)."""
        previous = np.concatenate([[False], mask[:-1]])
        first = mask & ~previous
        out = np.where(first, self.sentinels[np.cumsum(first) - 1], tokens)
        return out[~(mask & previous)]


# -- fill in the middle ----------------------------------------------------------------------


class Fim(Objective):
    """Fill-in-the-middle on each document segment of a window, keeping its length.

    A segment is a window's run of tokens of one document (its EOS last when the document ends
    inside the window). With probability fim_rate its content (without that EOS) is cut at two
    uniform points into prefix / middle / suffix and rewritten, with probability fim_spm_rate, in
    SPM order, else PSM:

        PSM: <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle
        SPM: <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle

    SPM is the variant of Megatron-LM and StarCoder (Bavarian et al.'s SPM "variant 2"): prefix
    and middle stay contiguous, so the middle continues the prefix in both orders. The three
    added tokens are cut from the end of the suffix (a segment whose suffix has fewer than three
    tokens stays as it is), so segment lengths, document ids and document masks do not change.
    """

    name = "fim"
    needs_doc_ids = True

    def __init__(self, ids: SpecialIds, *, fim_rate: float = 0.5, fim_spm_rate: float = 0.5):
        if ids.fim is None:
            raise ValueError("fim needs the fim piece ids")
        if not (0 <= fim_rate <= 1 and 0 <= fim_spm_rate <= 1):
            raise ValueError(f"need fim_rate and fim_spm_rate in [0, 1]; got {fim_rate}, "
                             f"{fim_spm_rate}")
        self.ids, self.eos = ids.fim, ids.eos
        self.rate, self.spm_rate = fim_rate, fim_spm_rate

    def corrupt(self, tokens: np.ndarray, keys: np.ndarray,
                doc_ids: np.ndarray | None = None) -> Corrupted:
        if doc_ids is None or doc_ids.shape != tokens.shape:
            raise ValueError("fim needs the document ids of every window token, (B, W)")
        out = tokens.copy()  # (B, W)
        middle = np.zeros(tokens.shape, dtype=bool)  # (B, W)
        for row, key in enumerate(keys):
            rng = row_rng(key)
            bounds = np.flatnonzero(np.diff(doc_ids[row])) + 1
            for start, stop in zip([0, *bounds], [*bounds, tokens.shape[1]]):
                if tokens[row, stop - 1] == self.eos:
                    stop -= 1  # the EOS ending the document stays where it is
                if rng.random() >= self.rate:
                    continue
                n_middle = self._permute(out[row, start:stop], rng)
                if n_middle is not None:
                    middle[row, stop - n_middle:stop] = True
        return Corrupted(out[:, :-1].copy(), out[:, 1:].copy(), middle_mask=middle[:, 1:].copy())

    def _permute(self, content: np.ndarray, rng: np.random.Generator) -> int | None:
        """Rewrite `content` in place; the middle's length (it ends the content), or None when
        the suffix is too short to give up the added tokens."""
        lo, hi = np.sort(rng.integers(0, len(content) + 1, size=2))
        spm = rng.random() < self.spm_rate
        if len(content) - hi < FIM_EXTRA_TOKENS:
            return None
        prefix, mid = content[:lo].copy(), content[lo:hi].copy()
        suffix = content[hi:len(content) - FIM_EXTRA_TOKENS].copy()
        content[:] = self.arrange(prefix, mid, suffix, spm=spm)
        return len(mid)

    def arrange(self, prefix: np.ndarray, middle: np.ndarray, suffix: np.ndarray, *,
                spm: bool = False) -> np.ndarray:
        """The FIM sequence of the three parts (PSM, or SPM); without `middle` (empty), the
        prompt an infilling model continues with the middle."""
        p, s, m = ([self.ids.prefix], [self.ids.suffix], [self.ids.middle])
        parts = [p + s, suffix, m, prefix, middle] if spm else [p, prefix, s, suffix, m, middle]
        return np.concatenate([np.asarray(x, dtype=np.int64) for x in parts])

    def infill_prompt(self, prefix: np.ndarray, suffix: np.ndarray, *,
                      spm: bool = False) -> np.ndarray:
        """The tokens before the middle: what an infilling model is given to write it."""
        return self.arrange(prefix, np.zeros(0, dtype=np.int64), suffix, spm=spm)


def infill_split(doc: Sequence[int] | np.ndarray, key: int | np.integer, *,
                 max_middle: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prefix, middle, suffix) of a document's tokens (without EOS) for the infilling
    metric: a middle of 1 to `max_middle` tokens (uniform, at most the document) at a uniform
    place, drawn from `key` alone (e.g. ``window_keys(seed, "infill", doc_index)``)."""
    doc = np.asarray(doc, dtype=np.int64)
    if len(doc) == 0 or max_middle < 1:
        raise ValueError(f"need a non-empty document and max_middle >= 1; got {len(doc)} tokens, "
                         f"max_middle={max_middle}")
    rng = row_rng(key)
    n = int(rng.integers(1, min(max_middle, len(doc)) + 1))
    start = int(rng.integers(0, len(doc) - n + 1))
    return doc[:start], doc[start:start + n], doc[start + n:]


# -- building --------------------------------------------------------------------------------


def build_objective(cfg: ObjectiveConfig, tokenizer: Tokenizer, *, vocab_size: int) -> Objective:
    """The objective `cfg` names, with `tokenizer`'s special ids; DataError when the tokenizer
    lacks the pieces it needs (see `Tokenizer.require_specials`)."""
    ids = SpecialIds.of(tokenizer, cfg.name)
    if cfg.name == "clm":
        return Clm()
    if cfg.name == "mlm":
        return Mlm(ids, vocab_size, mask_rate=cfg.mask_rate,
                   mask_token_fraction=cfg.mask_token_fraction,
                   random_token_fraction=cfg.random_token_fraction)
    if cfg.name == "span":
        return Span(ids, noise_density=cfg.noise_density, mean_span_length=cfg.mean_span_length)
    if cfg.name == "fim":
        return Fim(ids, fim_rate=cfg.fim_rate, fim_spm_rate=cfg.fim_spm_rate)
    raise ValueError(f"unknown objective {cfg.name!r}; one of clm, mlm, span, fim")
