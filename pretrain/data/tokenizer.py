"""SentencePiece tokenizers: training one on a corpus, and loading one to encode and decode.

Tokenizers trained here are byte-level BPE (byte fallback, so any text encodes without <unk>)
with the special ids fixed below, and they round-trip exactly: `decode(encode(x)) == x` for
code, whitespace, tabs, newlines, any Unicode and emoji. Two details make that hold: the
"identity" normalization (no NFKC, no whitespace collapsing, no dummy prefix), and "\\n" as a
user-defined symbol, because SentencePiece trains on single lines and would otherwise never learn
a newline piece. The one text that does not round-trip is the character U+2581 ("▁"), which
SentencePiece uses internally for a space and decodes back to one.

They also reserve the pieces the pre-training objectives need, as SentencePiece control symbols
(ids 4 to 108, right after the four fixed ids): `<mask>` (masked LM), the 100 sentinels
`<extra_id_0>` .. `<extra_id_99>` (T5 span corruption) and `<fim_prefix>`, `<fim_middle>`,
`<fim_suffix>`, `<fim_pad>` (fill-in-the-middle). Encoding text never produces a control
symbol (the text "<mask>" encodes as its characters), decoding drops them, and the Hugging Face
export turns them into special tokens.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import sentencepiece as spm

from pretrain.data.shards import atomic_write
from pretrain.errors import DataError

# The one place the special ids are fixed; every tokenizer trained here uses them.
PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3
NEWLINE = "\n"
MASK = "<mask>"
SENTINELS = tuple(f"<extra_id_{i}>" for i in range(100))
"""T5's sentinels, in order: span k of a corrupted window is replaced by SENTINELS[k]."""
FIM_PIECES = ("<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>")
"""Fill-in-the-middle pieces, in the order of `FimIds`."""
CONTROL_SYMBOLS = (MASK, *SENTINELS, *FIM_PIECES)
"""Reserved for the objectives, in id order from 4."""
RESERVED_PIECES = 4 + len(CONTROL_SYMBOLS) + 1 + 256
"""Pieces every tokenizer trained here holds before any character or merge: the four fixed
ids, the control symbols, the newline and the 256 byte-fallback pieces."""
OBJECTIVE_PIECES: dict[str, tuple[str, ...]] = {
    "clm": (), "mlm": (MASK,), "span": SENTINELS, "fim": FIM_PIECES,
}
"""The pieces each objective needs in the tokenizer."""
TOKENIZER_FORMAT = 2
"""Bump when `train_tokenizer` makes different tokenizers for the same input (2: the control
symbols above); it keys the cache of the tokenizer pretrain trains itself, so an install never
reuses one made by an older version."""
_MAX_LINE_BYTES = 8192  # SentencePiece skips longer training lines (minified data, blobs)


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    """SentencePiece trains on lines; newlines are a user-defined piece, so drop them here."""
    for text in texts:
        for line in text.split(NEWLINE):
            if line:
                yield line


def train_tokenizer(
    texts: Iterable[str],
    out_path: str,
    *,
    vocab_size: int,
    input_sentence_size: int = 2_000_000,
    character_coverage: float = 0.9999,
    num_threads: int | None = None,
) -> str:
    """Train a byte-fallback BPE SentencePiece model on `texts` and write it to `out_path`.

    `texts` is consumed once, in memory (no temporary corpus file). `input_sentence_size` caps
    the number of lines SentencePiece samples (shuffled) from it. The model file is written
    atomically. Returns `out_path`.
    """
    lines = _training_lines(texts)
    first = next(lines, None)
    if first is None:
        raise DataError(f"no text to train tokenizer {out_path} on; check data.source and "
                        "data.text_field")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_chain(first, lines),
            model_writer=model,
            **_trainer_options(vocab_size, input_sentence_size, character_coverage, num_threads),
        )
    except RuntimeError as e:
        raise DataError(f"training tokenizer {out_path} with vocab_size={vocab_size} failed: "
                        f"{e}; use a vocab_size that suits the corpus (or more text): besides "
                        f"its characters and merges it holds {RESERVED_PIECES} reserved pieces "
                        "(special ids, the objectives' control symbols, newline, 256 bytes)"
                        ) from e
    atomic_write(out_path, lambda f: f.write(model.getvalue()))
    return out_path


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def _trainer_options(
    vocab_size: int, input_sentence_size: int, character_coverage: float, num_threads: int | None
) -> dict[str, object]:
    return dict(
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        control_symbols=list(CONTROL_SYMBOLS),
        user_defined_symbols=[NEWLINE],
        split_digits=True,
        allow_whitespace_only_pieces=True,  # indentation runs become single pieces
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        character_coverage=character_coverage,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=_MAX_LINE_BYTES,
        num_threads=num_threads or min(os.cpu_count() or 1, 16),
        minloglevel=2,  # keep SentencePiece's per-iteration log off the console
    )


class FimIds(NamedTuple):
    """Ids of the fill-in-the-middle pieces."""

    prefix: int
    middle: int
    suffix: int
    pad: int


class Tokenizer:
    """A loaded SentencePiece model. Special ids come from the model file; for tokenizers
    trained by `train_tokenizer` they are PAD_ID, UNK_ID, BOS_ID and EOS_ID."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: str, fingerprint: str):
        self._sp = processor
        self._path = path
        self._fingerprint = fingerprint

    @classmethod
    def load(cls, path: str) -> Tokenizer:
        """Load a `.model` file, or a transformers tokenizer given as 'hf:DIR' (or a directory:
        an `HFTokenizer`); DataError naming the file when it is missing or corrupt."""
        from pretrain.data.hf_tokenizer import HFTokenizer, is_hf_spec

        if is_hf_spec(path):
            return HFTokenizer.load(path)
        if not os.path.isfile(path):
            raise DataError(f"tokenizer {path} does not exist; train one with "
                            "`pretrain-train-tokenizer`, or set data.tokenizer=null to train one "
                            "automatically")
        with open(path, "rb") as f:
            blob = f.read()
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(blob)
        except (RuntimeError, OSError) as e:
            raise DataError(f"tokenizer {path} is not a valid SentencePiece model ({e}); "
                            "re-train it with `pretrain-train-tokenizer`") from e
        if processor.eos_id() < 0:
            raise DataError(f"tokenizer {path} defines no EOS piece, which separates documents; "
                            "use a tokenizer with </s> or train one with "
                            "`pretrain-train-tokenizer`")
        return cls(processor, path, hashlib.sha256(blob).hexdigest())

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally with BOS first and EOS last."""
        return self._sp.encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(
        self, texts: Sequence[str], *, bos: bool = False, eos: bool = False, num_threads: int = 1
    ) -> list[list[int]]:
        """Token ids of each text; one thread by default, as callers parallelize by process."""
        return self._sp.encode(list(texts), add_bos=bos, add_eos=eos, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids` (special pieces, the objectives' control symbols among them, decode
        to nothing)."""
        return self._sp.decode([int(i) for i in ids])

    # -- special pieces ------------------------------------------------------------------------

    def piece_to_id(self, piece: str) -> int | None:
        """The id of `piece`, or None when the vocabulary has no such piece."""
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None

    def missing_pieces(self, pieces: Iterable[str]) -> list[str]:
        """Those of `pieces` that the vocabulary lacks."""
        return [p for p in pieces if self.piece_to_id(p) is None]

    def require_specials(self, objective: str) -> None:
        """DataError, naming the tokenizer and what to do, unless it has the pieces that
        objective `objective` ('clm', 'mlm', 'span' or 'fim') needs."""
        if objective not in OBJECTIVE_PIECES:
            raise ValueError(f"unknown objective {objective!r}; one of {sorted(OBJECTIVE_PIECES)}")
        missing = self.missing_pieces(OBJECTIVE_PIECES[objective])
        if missing:
            shown = missing if len(missing) <= 6 else [*missing[:3], "...", *missing[-2:]]
            raise DataError(
                f"tokenizer {self._path} lacks the special pieces objective {objective!r} needs "
                f"({len(missing)} missing: {' '.join(shown)}); re-train it with "
                "`pretrain-train-tokenizer` (it reserves them) and prepare the data with it, or "
                "set data.tokenizer=null to let pretrain train one")

    def _required_id(self, piece: str, objective: str) -> int:
        i = self.piece_to_id(piece)
        if i is None:
            self.require_specials(objective)
        assert i is not None
        return i

    @property
    def mask_id(self) -> int:
        """The id of <mask> (masked LM); DataError when the tokenizer has none."""
        return self._required_id(MASK, "mlm")

    @property
    def sentinel_ids(self) -> list[int]:
        """The ids of <extra_id_0> .. <extra_id_99>, in order (T5 span corruption)."""
        return [self._required_id(p, "span") for p in SENTINELS]

    @property
    def fim_ids(self) -> FimIds:
        """The ids of the fill-in-the-middle pieces."""
        return FimIds(*(self._required_id(p, "fim") for p in FIM_PIECES))

    @property
    def control_ids(self) -> list[int]:
        """Every id that encoding text never produces (pad, unk, BOS, EOS and the control
        symbols): an objective never masks these nor draws them as random tokens."""
        sp = self._sp
        return [i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        """The pad id; models without one (e.g. LLaMA's) pad with EOS, which losses mask."""
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.eos_id

    @property
    def path(self) -> str:
        return self._path

    @property
    def fingerprint(self) -> str:
        """sha256 hex digest of the model file; prepared shards record it."""
        return self._fingerprint
