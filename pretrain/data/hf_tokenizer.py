"""A Hugging Face tokenizer behind our `Tokenizer` interface: `Tokenizer.load("hf:DIR")`.

DIR is a local directory that `transformers.AutoTokenizer.from_pretrained` loads (tokenizer.json
and tokenizer_config.json, or a SentencePiece tokenizer.model, ...); nothing is downloaded.
Encoding never adds the tokenizer's own special tokens (BOS and EOS are ours to place, as with
SentencePiece), and special-token text in a document encodes as the tokenizer's pieces for
it, as `tok(text, add_special_tokens=False)` does. The fingerprint is the sha256 over the
tokenizer files the directory holds (names and bytes), so prepared shards name exactly the
tokenizer they were made with, as they do for a SentencePiece model.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import DataError

PREFIX = "hf:"
"""How a tokenizer spec names a transformers tokenizer directory."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
"""Files of a transformers tokenizer; those a directory has make its fingerprint and are what
`tokenizer_files` copies."""


def tokenizer_files(directory: str | Path) -> list[Path]:
    """The tokenizer files in `directory` (by name, sorted)."""
    d = Path(directory)
    return sorted(d / name for name in TOKENIZER_FILES if (d / name).is_file())


def fingerprint_of(directory: str | Path) -> str:
    """sha256 hex digest over the tokenizer files' names and bytes."""
    h = hashlib.sha256()
    for path in tokenizer_files(directory):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def is_hf_spec(spec: str) -> bool:
    """Whether `spec` names a transformers tokenizer: 'hf:DIR', or a directory."""
    return spec.startswith(PREFIX) or os.path.isdir(spec)


class HFTokenizer(Tokenizer):
    """A transformers tokenizer with `Tokenizer`'s interface; `hf` is the transformers object
    (its `apply_chat_template`, ...). The special pieces the objectives need are looked up by
    their text in its vocabulary (added tokens included)."""

    def __init__(self, hf: Any, directory: str, fingerprint: str) -> None:
        self.hf = hf
        self._path = f"{PREFIX}{directory}"
        self._fingerprint = fingerprint
        self._vocab: dict[str, int] = hf.get_vocab()

    @classmethod
    def load(cls, path: str) -> HFTokenizer:
        """'hf:DIR' (or DIR); DataError naming the directory when it is missing or holds no
        tokenizer transformers can load, or one without an EOS token."""
        directory = os.path.abspath(path.removeprefix(PREFIX))
        if not tokenizer_files(directory):
            raise DataError(f"tokenizer {PREFIX}{directory}: no tokenizer files there "
                            f"({', '.join(TOKENIZER_FILES[:4])}, ...); pass a local directory "
                            "saved by a transformers tokenizer's save_pretrained")
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except Exception as e:  # transformers raises OSError, ValueError, JSON and Rust errors
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"tokenizer {PREFIX}{directory} cannot be loaded by transformers "
                            f"({type(e).__name__}: {first}); its files are damaged or "
                            "incomplete") from e
        if hf.eos_token_id is None:
            raise DataError(f"tokenizer {PREFIX}{directory} defines no EOS token, which "
                            "separates documents; set eos_token in its tokenizer_config.json")
        return cls(hf, directory, fingerprint_of(directory))

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        # A tokenizer without BOS (Qwen's, ...) starts with the text, as sentencepiece does.
        bos = bos and self.bos_id is not None
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally with BOS first and EOS last."""
        return self._wrap(self.hf.encode(text, add_special_tokens=False), bos, eos)

    def encode_batch(
        self, texts: Sequence[str], *, bos: bool = False, eos: bool = False, num_threads: int = 1
    ) -> list[list[int]]:
        """Token ids of each text (a fast tokenizer encodes the batch at once)."""
        if not texts:
            return []
        ids = self.hf(list(texts), add_special_tokens=False)["input_ids"]
        return [self._wrap(list(x), bos, eos) for x in ids]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, special tokens dropped."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def piece_to_id(self, piece: str) -> int | None:
        """The id of `piece`, or None when the vocabulary has no such piece."""
        return self._vocab.get(piece)

    @property
    def control_ids(self) -> list[int]:
        """The special tokens' ids (pad, unk, BOS, EOS and every added special token)."""
        special = set(self.hf.all_special_ids)
        special |= {i for i, t in self.hf.added_tokens_decoder.items() if t.special}
        return sorted(special)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce (added tokens included); the model's vocabulary may
        be larger (padded embeddings), never smaller."""
        return max(len(self.hf), max(self._vocab.values(), default=-1) + 1)

    @property
    def bos_id(self) -> int | None:  # type: ignore[override]
        return self.hf.bos_token_id

    @property
    def eos_id(self) -> int:
        return self.hf.eos_token_id

    @property
    def pad_id(self) -> int:
        """The pad id, or EOS for tokenizers without one (LLaMA's), which losses mask."""
        pad = self.hf.pad_token_id
        return pad if pad is not None else self.eos_id

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's chat template (Jinja), or None when it has none."""
        template = getattr(self.hf, "chat_template", None)
        return template if isinstance(template, str) else None

    @property
    def directory(self) -> str:
        """The directory the tokenizer was loaded from."""
        return self._path.removeprefix(PREFIX)
