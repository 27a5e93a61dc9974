"""Instruction fine-tuning data (`objective=sft`): chat JSONL, templated, masked, packed.

Data: one JSON record per line, ``{"messages": [{"role": "system"|"user"|"assistant",
"content": "..."}, ...]}``, from `data.source` (a file, directory or glob). Blank lines are
skipped. Validation reads `objective.sft_val_source` when set, else holds out
`data.val_fraction` of the conversations (at least one), chosen by a hash of each record's
text, so the split does not move with the seed or the file order.

Template. A tokenizer with a chat template (a Hugging Face tokenizer, `tokenizer.hf`) renders
the conversation with `apply_chat_template`; the tokens the loss covers are found by rendering
prefixes: assistant message k spans from the end of ``messages[:k]`` rendered with the
generation prompt (the assistant header; as far as the conversation's tokens agree with it) to
the end of ``messages[:k + 1]``, so the span holds the answer and the template's end-of-turn
token. A template whose prefixes are not prefixes of
the whole rendering (one that rewrites earlier turns) is refused record by record. Our
SentencePiece tokenizers (and Hugging Face ones without a template) use the default template,
in tokens::

    BOS (when the tokenizer has one)
    per message:  encode("<|{role}|>\\n") + encode(content) + (EOS if assistant else encode("\\n"))

The loss covers each assistant message's content tokens and its EOS (so generation learns to
stop), nothing else. A prompt for generation is the rendering of the conversation so far followed
by ``encode("<|assistant|>\\n")`` (`prompt`); an answer ends at EOS (`stop_ids`). With a chat
template, the prompt is its rendering with the generation prompt, and an answer ends at EOS or
the special tokens the template closes an assistant turn with.

Loss mask. A conversation of n tokens contributes n - 1 inputs (its tokens but the last) and
their next tokens as targets; a target is IGNORE_INDEX unless it is an assistant token.

Packing. Conversations are packed into windows of `seq_len` inputs, each its own document:
attention stays inside a conversation (block-diagonal causal mask) and rotary positions restart
at 0, so a packed conversation is computed exactly as if it were alone in its row. The train
conversations are shuffled by the seed and packed once (each goes into the first of the last
`_OPEN_WINDOWS` windows with room, else a new one); the rest of a window is padding (pad id,
targets IGNORE_INDEX, its own document). Each epoch reads the packed windows in an order keyed
by (seed, epoch), exactly as the pre-training loader reads its windows: a global cursor, rank r
takes positions ``[cursor + r * mb, cursor + (r + 1) * mb)``, and the state is the cursor, so
resume is exact on any number of ranks.

Long conversations. A conversation needs n <= seq_len + 1 tokens. A longer one is cut after its
last assistant message that still fits (with `objective.sft_truncate`, the default; the later
messages are dropped and counted as truncated), else it is a bad record.

Bad records: invalid JSON, no `messages` list, an empty conversation, an unknown role, a content
that is not a string, no assistant message, a message longer than seq_len tokens, a
conversation that does not fit (nothing to cut, or `sft_truncate=false`). They are counted and
skipped, with one summary line per file naming the first bad lines; with
`objective.sft_strict=true` the first one is a DataError naming the file and line, before
training starts.

Every rank reads and tokenizes the files itself (deterministic), which suits fine-tuning sets
of up to some hundred thousand conversations; bigger sets would want preparing once. Batches are
built in the training loop from memory (`data.num_workers` does not apply).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from pretrain.data.loader import Batch
from pretrain.data.objectives import Clm
from pretrain.data.prepare import file_lock, resolve_cache_dir
from pretrain.data.sources import resolve_local_files
from pretrain.data.tokenizer import TOKENIZER_FORMAT, train_tokenizer
from pretrain.data.windows import permute
from pretrain.errors import DataError
from pretrain.models.loss import IGNORE_INDEX

ROLES = ("system", "user", "assistant")
STATE_VERSION = 1
_OPEN_WINDOWS = 16  # windows packing still fills: near first-fit, without a quadratic scan
_SHOWN_BAD = 3  # bad lines named per file in the summary
_PROBE = "Sure, done."  # an answer to render, to find what a template writes after one


class TextTokenizer(Protocol):
    """What the default template needs of a tokenizer (our SentencePiece `Tokenizer`)."""

    bos_id: int | None
    eos_id: int

    def encode(self, text: str) -> list[int]: ...


Message = dict[str, str]


# -- templates ---------------------------------------------------------------------------------


class BadRecord(ValueError):
    """A record that cannot be trained on; the message says why."""


@dataclass
class Encoded:
    """One templated conversation."""

    ids: list[int]
    labels: list[bool]
    """Per token: the loss covers it (an assistant token)."""
    turn_ends: list[int]
    """Tokens rendered once messages[:k + 1] are in, per message k."""


class DefaultTemplate:
    """The default chat template for tokenizers without one (see the module docstring)."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tok = tokenizer
        self.headers = {r: tokenizer.encode(f"<|{r}|>\n") for r in ROLES}
        self.newline = tokenizer.encode("\n")

    def encode(self, messages: Sequence[Message]) -> Encoded:
        # A tokenizer without BOS (an HF one, Qwen's, ...) starts with the first header.
        ids = [] if self.tok.bos_id is None else [self.tok.bos_id]
        labels, ends = [False] * len(ids), []
        for m in messages:
            header = self.headers[m["role"]]
            body = self.tok.encode(m["content"])
            assistant = m["role"] == "assistant"
            tail = [self.tok.eos_id] if assistant else self.newline
            ids += header + body + tail
            labels += [False] * len(header) + [assistant] * (len(body) + len(tail))
            ends.append(len(ids))
        return Encoded(ids, labels, ends)

    def prompt(self, messages: Sequence[Message]) -> list[int]:
        """The tokens a model continues with the next assistant message: `messages` rendered,
        then the assistant header."""
        return self.encode(messages).ids + self.headers["assistant"]

    def stop_ids(self) -> list[int]:
        """Where an answer ends: EOS, the token this template closes an assistant turn with."""
        return [self.tok.eos_id]


class HFChatTemplate:
    """A Hugging Face tokenizer's own chat template; assistant spans from prefix renderings."""

    def __init__(self, hf: Any):
        self.hf = hf

    def _render(self, messages: Sequence[Message], generation_prompt: bool = False) -> list[int]:
        if not messages and not generation_prompt:
            return []
        try:
            out = self.hf.apply_chat_template(list(messages), tokenize=True,
                                              add_generation_prompt=generation_prompt,
                                              return_dict=False)
        except Exception as e:  # a Jinja template raises what its author chose
            raise BadRecord(f"the chat template refused it ({type(e).__name__}: {e})") from e
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return [int(i) for i in out]

    def encode(self, messages: Sequence[Message]) -> Encoded:
        ids = self._render(messages)
        labels = [False] * len(ids)
        ends = []
        for k, m in enumerate(messages):
            prefix = self._render(messages[:k + 1])
            if ids[:len(prefix)] != prefix:
                raise BadRecord(f"the chat template renders messages[:{k + 1}] differently from "
                                "the start of the whole conversation, so the assistant tokens "
                                "cannot be found")
            ends.append(len(prefix))
            if m["role"] == "assistant":
                # From the end of the generation prompt (the assistant header) where the
                # conversation's tokens agree with it: a prompt ending in a space ("ASSISTANT: ")
                # tokenizes its last token differently from the space joined to the answer. A
                # template without a generation prompt starts at the previous message's end.
                start = ends[-2] if k else 0
                try:
                    prompt = self._render(messages[:k], generation_prompt=True)
                except BadRecord:
                    prompt = []
                same = next((i for i, (a, b) in enumerate(zip(ids, prompt)) if a != b),
                            min(len(ids), len(prompt)))
                start = min(max(start, same), len(prefix) - 1)
                labels[start:len(prefix)] = [True] * (len(prefix) - start)
        return Encoded(ids, labels, ends)

    def prompt(self, messages: Sequence[Message]) -> list[int]:
        """`apply_chat_template(messages, add_generation_prompt=True)`: the tokens a model
        continues with the next assistant message (BOS as the template places it)."""
        return self._render(messages, generation_prompt=True)

    def stop_ids(self) -> list[int]:
        """Where an answer ends: EOS and the special tokens the template writes after an
        assistant message's content (ChatML's <|im_end|>, LLaMA-3's <|eot_id|>, ...), found by
        rendering a probe conversation as text. Plain text after the content (a newline) does
        not stop: it would also occur inside answers."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
        try:
            text = self.hf.apply_chat_template(probe, tokenize=False)
        except Exception:  # a template that refuses the probe: EOS is all we know
            return [self.hf.eos_token_id]
        at = text.rfind(_PROBE) if isinstance(text, str) else -1
        tail = self.hf.encode(text[at + len(_PROBE):], add_special_tokens=False) if at >= 0 else []
        special = set(self.hf.all_special_ids)
        special |= {i for i, t in self.hf.added_tokens_decoder.items() if t.special}
        return list(dict.fromkeys([self.hf.eos_token_id, *(i for i in tail if i in special)]))


def chat_template(tokenizer: Any) -> DefaultTemplate | HFChatTemplate:
    """The tokenizer's own chat template when it has one (`tokenizer.hf.chat_template`), else
    the default template."""
    hf = getattr(tokenizer, "hf", None)
    if hf is not None and getattr(hf, "chat_template", None):
        return HFChatTemplate(hf)
    return DefaultTemplate(tokenizer)


# -- records -----------------------------------------------------------------------------------


def parse_record(line: str) -> list[Message]:
    """The messages of one JSONL line; BadRecord saying what is wrong."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRecord(f"invalid JSON ({e.msg} at column {e.colno})") from e
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list):
        raise BadRecord('no "messages" list')
    if not messages:
        raise BadRecord("empty conversation")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise BadRecord(f"message {k} has unknown role {role!r} (use {', '.join(ROLES)})")
        if not isinstance(m.get("content"), str):
            raise BadRecord(f"message {k} has no string content")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant message")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def encode_conversation(template: DefaultTemplate | HFChatTemplate, messages: list[Message], *,
                        seq_len: int, truncate: bool) -> tuple[Encoded, bool]:
    """(the conversation fitted to seq_len + 1 tokens, whether it was cut); BadRecord when a
    message is longer than seq_len tokens or it does not fit and cannot be cut."""
    enc = template.encode(messages)
    for k, (start, end) in enumerate(zip([0, *enc.turn_ends], enc.turn_ends)):
        if end - start > seq_len:
            raise BadRecord(f"message {k} ({messages[k]['role']}) is {end - start} tokens, "
                            f"longer than seq_len={seq_len}")
    if len(enc.ids) <= seq_len + 1:
        return enc, False
    fits = [k for k, m in enumerate(messages)
            if m["role"] == "assistant" and enc.turn_ends[k] <= seq_len + 1]
    if not truncate or not fits:
        why = "" if truncate else " (objective.sft_truncate=false)"
        raise BadRecord(f"the conversation is {len(enc.ids)} tokens and no assistant message "
                        f"ends within seq_len + 1 = {seq_len + 1}{why}")
    cut = template.encode(messages[:fits[-1] + 1])
    if len(cut.ids) > seq_len + 1:  # a template whose prefix rendering is longer
        raise BadRecord(f"the conversation is {len(enc.ids)} tokens, more than seq_len + 1 = "
                        f"{seq_len + 1}, and cannot be cut to fit")
    return cut, True


@dataclass
class Conversation:
    """A kept conversation: tokens, loss mask, and a digest of its record (the val split)."""

    ids: np.ndarray
    labels: np.ndarray
    digest: int


@dataclass
class FileReport:
    """What reading one file gave: kept, cut and bad records (the first few named)."""

    path: str
    kept: int = 0
    truncated: int = 0
    bad: int = 0
    first_bad: list[str] = field(default_factory=list)

    def line(self) -> str:
        text = f"sft data {self.path}: {self.kept} conversations"
        if self.truncated:
            text += f", {self.truncated} cut to fit seq_len (later messages dropped)"
        if self.bad:
            text += (f"; {self.bad} bad records skipped (first: {'; '.join(self.first_bad)}; "
                     "objective.sft_strict=true refuses them)")
        return text


def read_conversations(source: str, template: DefaultTemplate | HFChatTemplate, *,
                       seq_len: int, strict: bool, truncate: bool
                       ) -> tuple[list[Conversation], list[FileReport]]:
    """Every good conversation of the files `source` names, in file and line order, and a
    report per file. `strict`: DataError naming file and line at the first bad record."""
    convs: list[Conversation] = []
    reports = []
    for path in resolve_local_files(source):
        report = FileReport(path)
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    enc, cut = encode_conversation(template, parse_record(line),
                                                   seq_len=seq_len, truncate=truncate)
                except BadRecord as e:
                    if strict:
                        raise DataError(f"sft data {path}:{lineno}: {e}; fix or remove the "
                                        "record, or set objective.sft_strict=false to skip bad "
                                        "records (counted)") from None
                    report.bad += 1
                    if len(report.first_bad) < _SHOWN_BAD:
                        report.first_bad.append(f"line {lineno}: {e}")
                    continue
                report.kept += 1
                report.truncated += cut
                digest = int.from_bytes(hashlib.blake2b(line.strip().encode(),
                                                        digest_size=8).digest(), "little")
                convs.append(Conversation(np.asarray(enc.ids, dtype=np.int64),
                                          np.asarray(enc.labels, dtype=bool), digest))
        reports.append(report)
    return convs, reports


def split_validation(convs: list[Conversation], fraction: float
                     ) -> tuple[list[Conversation], list[Conversation]]:
    """(train, val): the round(fraction * n) conversations of smallest record digest held out
    (at least one when fraction > 0 and there are two, never all), each in file order."""
    if fraction <= 0 or len(convs) < 2:
        return convs, []
    n_val = min(len(convs) - 1, max(1, round(fraction * len(convs))))
    held = set(np.argsort([c.digest for c in convs], kind="stable")[:n_val].tolist())
    return ([c for i, c in enumerate(convs) if i not in held],
            [c for i, c in enumerate(convs) if i in held])


# -- packing -----------------------------------------------------------------------------------


def pack(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Indices of conversations per window, in the given order: each (of `lengths` inputs, all
    <= seq_len) goes into the first of the last `_OPEN_WINDOWS` windows with room, else a new
    one."""
    windows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        first = max(0, len(windows) - _OPEN_WINDOWS)
        for w in range(first, len(windows)):
            if room[w] >= n:
                windows[w].append(i)
                room[w] -= n
                break
        else:
            windows.append([i])
            room.append(seq_len - n)
    return windows


def build_rows(convs: Sequence[Conversation], windows: Sequence[Sequence[int]], seq_len: int,
               pad_id: int) -> Batch:
    """One row per window: the conversations' inputs back to back, each its own document with
    positions from 0, then padding (its own document, targets IGNORE_INDEX)."""
    B = len(windows)
    inputs = np.full((B, seq_len), pad_id, dtype=np.int64)  # (B, T)
    targets = np.full((B, seq_len), IGNORE_INDEX, dtype=np.int64)
    doc_ids = np.empty((B, seq_len), dtype=np.int64)
    positions = np.empty((B, seq_len), dtype=np.int64)
    for b, window in enumerate(windows):
        t = 0
        for d, i in enumerate(window):
            c = convs[i]
            n = len(c.ids) - 1
            inputs[b, t:t + n] = c.ids[:-1]
            targets[b, t:t + n] = np.where(c.labels[1:], c.ids[1:], IGNORE_INDEX)
            doc_ids[b, t:t + n] = d
            positions[b, t:t + n] = np.arange(n)
            t += n
        doc_ids[b, t:] = len(window)
        positions[b, t:] = np.arange(seq_len - t)
    return Batch(torch.from_numpy(inputs), torch.from_numpy(targets),
                 doc_ids=torch.from_numpy(doc_ids), positions=torch.from_numpy(positions))


def _fingerprint(convs: Sequence[Conversation]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for c in convs:
        h.update(c.ids.tobytes())
        h.update(c.labels.tobytes())
    return h.hexdigest()


# -- the loader --------------------------------------------------------------------------------


class SftLoader:
    """Batches of packed conversations for one data-parallel rank, with the pre-training
    loader's interface (`next_batch`, `eval_windows`, `state_dict`, `metrics`, ...)."""

    name = "sft"
    objective = Clm()
    """What the model computes per window: next-token prediction (FLOPs, window length)."""

    def __init__(self, convs: list[Conversation], split: str, *, seq_len: int,
                 micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 pad_id: int, vocab_size: int, allow_data_change: bool = False):
        if not convs:
            raise DataError(f"no {split} conversations for objective=sft: "
                            + ("check data.source (see the sft data lines above)"
                               if split == "train" else
                               "set objective.sft_val_source, or data.val_fraction > 0 with at "
                               "least two conversations"))
        top = max(int(c.ids.max()) for c in convs)
        if top >= vocab_size:
            raise DataError(f"the sft data holds token id {top} but model.vocab_size="
                            f"{vocab_size}; use the model's tokenizer (data.tokenizer) or raise "
                            "model.vocab_size")
        self.split, self.seq_len, self.micro_batch_size = split, seq_len, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.pad_id, self.allow_data_change = pad_id, allow_data_change
        order = list(range(len(convs)))
        if split == "train":  # validation packs in file order: the same set in every run
            random.Random(f"sft:{seed}").shuffle(order)
        self.convs = [convs[i] for i in order]
        self.windows = pack([len(c.ids) - 1 for c in self.convs], seq_len)
        self.fingerprint = _fingerprint(self.convs)
        self.input_tokens = sum(len(c.ids) - 1 for c in convs)
        """Window tokens the conversations fill (the rest is padding)."""
        self.target_tokens = sum(int(c.labels[1:].sum()) for c in convs)
        """Targets the loss covers in one epoch."""
        self.cursor = 0
        """Windows consumed by all ranks together since the start of training."""
        self.notes: list[str] = []

    @property
    def windows_per_epoch(self) -> int:
        return len(self.windows)

    @property
    def global_batch_windows(self) -> int:
        return self.micro_batch_size * self.dp_size

    @property
    def tokens_per_epoch(self) -> int:
        return self.windows_per_epoch * self.seq_len

    def window_ids(self, positions: np.ndarray) -> np.ndarray:
        """The packed windows at global `positions`: each epoch in its own seeded order."""
        epochs, offsets = np.divmod(positions, self.windows_per_epoch)
        out = np.empty_like(offsets)
        for epoch in np.unique(epochs):
            at = epochs == epoch
            out[at] = permute(offsets[at], self.windows_per_epoch, seed=f"{self.seed}:sft",
                              epoch=int(epoch))
        return out

    def read(self, windows: np.ndarray) -> Batch:
        return build_rows(self.convs, [self.windows[int(w)] for w in windows], self.seq_len,
                          self.pad_id)

    def next_batch(self) -> Batch:
        """This rank's next micro-batch: (micro_batch_size, seq_len) inputs, targets, document
        ids and restarted positions."""
        mb = self.micro_batch_size
        start = self.cursor + self.dp_rank * mb
        batch = self.read(self.window_ids(np.arange(start, start + mb, dtype=np.int64)))
        self.cursor += self.global_batch_windows
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def eval_windows(self, n_windows: int, source: str | None = None) -> Iterator[Batch]:
        """The first `n_windows` packed windows (wrapping around), as the pre-training loader's
        `eval_windows`: every rank yields ceil(n / (mb * dp_size)) batches, rows past
        `n_windows` repeat a real window with every target IGNORE_INDEX."""
        if n_windows <= 0:
            raise ValueError(f"need n_windows > 0; got {n_windows}")
        g, mb = self.global_batch_windows, self.micro_batch_size
        for i in range(-(-n_windows // g)):
            rows = i * g + self.dp_rank * mb + np.arange(mb)
            padding = rows >= n_windows
            batch = self.read((rows % n_windows) % self.windows_per_epoch)
            batch.targets[torch.from_numpy(padding)] = IGNORE_INDEX
            yield batch

    def close(self) -> None:
        pass

    def tokens_consumed(self) -> dict[str, int]:
        return {self.name: self.cursor * self.seq_len}

    def metrics(self) -> dict[str, float]:
        return {f"data/tokens/{self.name}": float(self.cursor * self.seq_len),
                f"data/epoch/{self.name}": self.cursor / self.windows_per_epoch}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "kind": "sft", "cursor": self.cursor,
                "seed": self.seed, "seq_len": self.seq_len, "fingerprint": self.fingerprint,
                "windows_per_epoch": self.windows_per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the saved position; other conversations or seq_len is a DataError
        unless data.allow_data_change (then the cursor is kept)."""
        if state.get("kind") != "sft" or state.get("version") != STATE_VERSION:
            raise DataError("the checkpoint's data position is not an sft loader's; resume it "
                            "with the objective it was trained with, or start a new run")
        changes = []
        if int(state["seq_len"]) != self.seq_len:
            changes.append(f"seq_len was {state['seq_len']}, now {self.seq_len}")
        if state["fingerprint"] != self.fingerprint:
            changes.append("the conversations (data.source, tokenizer or template) differ")
        if changes and not self.allow_data_change:
            raise DataError(f"the checkpoint's data position belongs to other data: "
                            f"{'; '.join(changes)}; resume with the data it was saved with, or "
                            "set data.allow_data_change=true to continue on this data")
        self.cursor, self.seed = int(state["cursor"]), int(state["seed"])
        self.notes = [f"continuing on changed data: {c}" for c in changes]


def build_sft_loaders(source: str, val_source: str | None, tokenizer: Any, *, seq_len: int,
                      micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                      vocab_size: int, val_fraction: float, strict: bool = False,
                      truncate: bool = True, allow_data_change: bool = False,
                      log: bool = False) -> tuple[SftLoader, SftLoader]:
    """(train, val) loaders of one rank; `log` prints the per-file summary lines."""
    template = chat_template(tokenizer)
    kw = dict(seq_len=seq_len, strict=strict, truncate=truncate)
    convs, reports = read_conversations(source, template, **kw)
    if val_source:
        val, more = read_conversations(val_source, template, **kw)
        reports += more
        train = convs
    else:
        train, val = split_validation(convs, val_fraction)
    if log:
        for r in reports:
            print(r.line(), flush=True)
    pad = getattr(tokenizer, "pad_id", None)
    common = dict(seq_len=seq_len, micro_batch_size=micro_batch_size, dp_rank=dp_rank,
                  dp_size=dp_size, seed=seed, vocab_size=vocab_size,
                  pad_id=tokenizer.eos_id if pad is None or pad < 0 else pad)
    loaders = (SftLoader(train, "train", allow_data_change=allow_data_change, **common),
               SftLoader(val, "val", **common))
    if log:
        t = loaders[0]
        print(f"sft: {len(train)} train / {len(val)} validation conversations; "
              f"{t.windows_per_epoch} windows of {seq_len} tokens, "
              f"{t.input_tokens / t.tokens_per_epoch:.0%} filled, "
              f"{t.target_tokens / t.tokens_per_epoch:.0%} assistant targets", flush=True)
    return loaders


def ensure_sft_tokenizer(source: str, tokenizer: str | None, cache_dir: str, *,
                         vocab_size: int) -> str:
    """The tokenizer of an sft run: `tokenizer` (data.tokenizer) when given, else one trained
    once on the conversations' text (roles and contents), cached by the files' contents."""
    if tokenizer is not None:
        return tokenizer
    files = resolve_local_files(source)
    h = hashlib.blake2b(f"{vocab_size}:{TOKENIZER_FORMAT}".encode(), digest_size=8)
    for path in files:
        with open(path, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    cache = os.path.join(resolve_cache_dir(cache_dir), "tokenizers")
    path = os.path.join(cache, f"sft-v{vocab_size}-{h.hexdigest()}.model")
    os.makedirs(cache, exist_ok=True)
    with file_lock(path + ".lock"):
        if not os.path.isfile(path):
            train_tokenizer(chat_texts(files), path, vocab_size=vocab_size)
    return path


def chat_texts(files: Sequence[str]) -> Iterator[str]:
    """The text of every readable record of `files` in the default template's terms (role
    headers and contents), to train a tokenizer on."""
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    messages = parse_record(line) if line.strip() else []
                except BadRecord:
                    continue
                yield "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)


# -- a generated chat set (the README's run and the tests) -------------------------------------


def synthetic_chats(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` small chat records with learnable answers: sums, word reversal, counting, some with a
    system message, some two exchanges long."""
    rng = random.Random(seed)
    words = ("apple river stone cloud maple orange tiger piano rocket lemon garden silver "
             "window castle bridge forest").split()

    def exchange() -> tuple[str, str]:
        kind = rng.randrange(3)
        if kind == 0:
            a, b = rng.randrange(100), rng.randrange(100)
            return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
        ws = rng.sample(words, rng.randint(2, 5))
        if kind == 1:
            return f"Reverse the words: {' '.join(ws)}", " ".join(reversed(ws)) + "."
        return f"How many words are in: {' '.join(ws)}", f"There are {len(ws)} words."

    out = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": "You are a careful assistant."})
        for _ in range(rng.choice((1, 1, 2))):
            q, a = exchange()
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append({"messages": messages})
    return out


def write_synthetic_chats(path: str, n: int, seed: int = 0) -> None:
    """Write `synthetic_chats(n, seed)` to `path` as JSONL."""
    with open(path, "w", encoding="utf-8") as f:
        for record in synthetic_chats(n, seed):
            f.write(json.dumps(record) + "\n")
