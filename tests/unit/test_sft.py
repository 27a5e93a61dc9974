"""Instruction fine-tuning data (`pretrain/data/sft.py`): the loss mask token by token for the
default template and for a Hugging Face chat template, packing against one conversation per
row through the real train module, bad records, the loader's order, slices and resume, and
the config checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pretrain.config import ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from pretrain.data.hf_tokenizer import HFTokenizer
from pretrain.data.sft import (
    BadRecord,
    Conversation,
    DefaultTemplate,
    HFChatTemplate,
    SftLoader,
    build_rows,
    build_sft_loaders,
    chat_template,
    chat_texts,
    encode_conversation,
    pack,
    read_conversations,
    synthetic_chats,
    write_synthetic_chats,
)
from pretrain.data.tokenizer import Tokenizer, train_tokenizer
from pretrain.errors import ConfigError, DataError
from pretrain.models.loss import IGNORE_INDEX
from pretrain.parallel.dims import ParallelDims
from pretrain.train.module import StepSettings, build_train_module
from pretrain.validate import validate

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5."},
        {"role": "user", "content": "Reverse: apple stone"},
        {"role": "assistant", "content": "stone apple."}]


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sft") / "chat.jsonl"
    write_synthetic_chats(str(path), 300, seed=1)
    return path


@pytest.fixture(scope="module")
def sp(chat_file: Path) -> Tokenizer:
    """One of our SentencePiece tokenizers, trained on the chat file's text."""
    out = chat_file.parent / "tok.model"
    train_tokenizer(chat_texts([str(chat_file)]), str(out), vocab_size=512)
    return Tokenizer.load(str(out))


# -- 1. the loss mask, token by token ------------------------------------------------------------


def test_default_template_masks_exactly_the_assistant_tokens_and_their_eos(sp: Tokenizer) -> None:
    enc = DefaultTemplate(sp).encode(CHAT)
    ids: list[int] = [sp.bos_id]
    want: list[bool] = [False]
    for m in CHAT:
        header, body = sp.encode(f"<|{m['role']}|>\n"), sp.encode(m["content"])
        tail = [sp.eos_id] if m["role"] == "assistant" else sp.encode("\n")
        ids += header + body + tail
        want += [False] * len(header) + [m["role"] == "assistant"] * (len(body) + len(tail))
    assert enc.ids == ids and enc.labels == want
    # The labelled tokens are exactly the two answers, each closed by EOS.
    spans = _runs(enc.ids, enc.labels)
    assert [s[-1] for s in spans] == [sp.eos_id, sp.eos_id]
    assert [sp.decode(s) for s in spans] == ["2 + 3 = 5.", "stone apple."]
    assert sp.decode(enc.ids) == "".join(
        f"<|{m['role']}|>\n{m['content']}" + ("" if m["role"] == "assistant" else "\n")
        for m in CHAT)

    # As a packed row: target t is token t + 1 when that token is an assistant token.
    conv = Conversation(np.array(enc.ids), np.array(enc.labels), 0)
    n = len(ids) - 1  # inputs: every token but the last; then 3 padding
    row = build_rows([conv], [[0]], seq_len=n + 3, pad_id=sp.pad_id)
    assert row.inputs[0, :n].tolist() == ids[:-1]
    assert row.targets[0, :n].tolist() == [ids[t + 1] if want[t + 1] else IGNORE_INDEX
                                           for t in range(n)]
    assert row.targets[0, n:].tolist() == [IGNORE_INDEX] * 3
    assert row.inputs[0, n:].tolist() == [sp.pad_id] * 3


def _runs(ids: list[int], labels: list[bool]) -> list[list[int]]:
    out: list[list[int]] = []
    for i, (t, lab) in enumerate(zip(ids, labels)):
        if lab:
            if i == 0 or not labels[i - 1]:
                out.append([])
            out[-1].append(t)
    return out


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATML_BOS = "{{ bos_token }}" + CHATML
"""ChatML led by the BOS token's text, as LLaMA's and Mistral's templates are."""


def hf_tokenizer(template: str = CHATML) -> Any:
    """A transformers fast tokenizer over a tiny byte-level BPE, built here, with `template`."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>",
                                        "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [m["content"] for r in synthetic_chats(200) for m in r["messages"]]
    raw.train_from_iterator(texts + ["system user assistant"] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = template
    return tok


def saved_hf_tokenizer(directory: Path, template: str = CHATML) -> HFTokenizer:
    """`hf_tokenizer(template)` saved with save_pretrained to `directory`, loaded back as a run
    loads it: `Tokenizer.load("hf:DIR")`."""
    hf_tokenizer(template).save_pretrained(directory)
    tok = Tokenizer.load(f"hf:{directory}")
    assert isinstance(tok, HFTokenizer)
    return tok


@pytest.mark.parametrize("template", [CHATML, CHATML_BOS], ids=["chatml", "bos+chatml"])
def test_hf_chat_template_masks_each_answer_and_its_end_of_turn_token_by_token(
        tmp_path: Path, template: str) -> None:
    tok = saved_hf_tokenizer(tmp_path / "tok", template)
    assert tok.chat_template == template
    hf = tok.hf
    encoder = chat_template(tok)
    assert isinstance(encoder, HFChatTemplate)
    enc = encoder.encode(CHAT)
    lead = "<s>" if template == CHATML_BOS else ""
    text = lead + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CHAT)
    # Independently of the prefix renderings: the characters each token covers in the text.
    plain = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc.ids == plain["input_ids"]
    assert enc.ids.count(tok.bos_id) == (1 if lead else 0)  # the template's BOS, not doubled
    answers = []  # [start, end) of each answer's content through "<|im_end|>\n"
    at = len(lead)
    for m in CHAT:
        at += len(f"<|im_start|>{m['role']}\n")
        end = at + len(m["content"]) + len("<|im_end|>\n")
        if m["role"] == "assistant":
            answers.append((at, end))
        at = end
    want = [any(a <= s and e <= b for a, b in answers) for s, e in plain["offset_mapping"]]
    assert enc.labels == want
    spans = _runs(enc.ids, enc.labels)
    assert [hf.decode(s) for s in spans] == ["2 + 3 = 5.<|im_end|>\n", "stone apple.<|im_end|>\n"]


# Other shapes of real templates, on the same tokenizer: (template, an answer's masked text).
OTHER_TEMPLATES = {
    # LLaMA-3's: a header closed by a special token, "\n\n", the content trimmed, EOS per turn.
    "llama3": ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}<|im_end|>\n\n"
               "{{ m['content'] | trim }}</s>{% endfor %}{% if add_generation_prompt %}"
               "<|im_start|>assistant<|im_end|>\n\n{% endif %}", "{}</s>"),
    # Mistral's: no generation prompt, system messages dropped, answers end in EOS.
    "mistral": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
                "{{ m['content'] }} [/INST]{% elif m['role'] == 'assistant' %}{{ m['content'] }}"
                "</s>{% endif %}{% endfor %}", "{}</s>"),
    # Qwen's: a default system message when the conversation has none.
    "qwen": ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + "
             "messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\n"
             "You are a bot.<|im_end|>\\n' }}{%- endif %}{%- for m in messages %}{%- if not "
             "(m.role == 'system' and loop.first) %}{{- '<|im_start|>' + m.role + '\\n' + "
             "m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}{%- if "
             "add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
             "{}<|im_end|>\n"),
    # Vicuna's: plain-text roles, a generation prompt ending in a space that the answer's first
    # token absorbs in the whole rendering ("ASSISTANT: " is not a token prefix of it).
    "vicuna": ("{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n"
               "{% elif m['role'] == 'user' %}USER: {{ m['content'] }} {% else %}ASSISTANT: "
               "{{ m['content'] }}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}"
               "ASSISTANT: {% endif %}", " {}</s>"),
}


@pytest.mark.parametrize("name", sorted(OTHER_TEMPLATES))
@pytest.mark.parametrize("system", [True, False], ids=["system", "no-system"])
def test_other_template_shapes_mask_exactly_the_answers(tmp_path: Path, name: str,
                                                        system: bool) -> None:
    template, answer = OTHER_TEMPLATES[name]
    tok = saved_hf_tokenizer(tmp_path / "tok", template)
    chat = CHAT if system else CHAT[1:]
    enc = chat_template(tok).encode(chat)
    assert enc.ids == tok.hf.apply_chat_template(chat, tokenize=True, return_dict=False)
    spans = _runs(enc.ids, enc.labels)
    assert [tok.hf.decode(s) for s in spans] == [answer.format("2 + 3 = 5."),
                                                 answer.format("stone apple.")]


def test_the_loader_trains_an_hf_template_on_its_answers_only(tmp_path: Path) -> None:
    tok = saved_hf_tokenizer(tmp_path / "tok")
    hf = tok.hf
    records = synthetic_chats(40, seed=2)
    path = tmp_path / "hf.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    train, val = build_sft_loaders(str(path), str(path), tok, seq_len=128,
                                   micro_batch_size=4, dp_rank=0, dp_size=1, seed=0,
                                   vocab_size=tok.vocab_size, val_fraction=0.0)
    assert train.pad_id == tok.pad_id == hf.pad_token_id
    answers = sorted(m["content"] + "<|im_end|>\n" for r in records for m in r["messages"]
                     if m["role"] == "assistant")
    got = []
    for batch in val.eval_windows(val.windows_per_epoch):  # every conversation once
        for targets, doc_ids in zip(batch.targets, batch.doc_ids):
            for d in doc_ids.unique():
                t = targets[(doc_ids == d) & (targets != IGNORE_INDEX)].tolist()
                # A conversation's targets are its answers back to back: split at "<|im_end|>\n".
                got += [a + "<|im_end|>\n" for a in hf.decode(t).split("<|im_end|>\n") if a]
    assert sorted(got) == answers
    assert train.target_tokens == val.target_tokens > 0


def test_a_template_that_rewrites_earlier_turns_is_a_bad_record() -> None:
    # Drops every assistant message but the last (as some reasoning templates drop thoughts).
    rewriting = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                 "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
                 "{% endfor %}")
    template = HFChatTemplate(hf_tokenizer(rewriting))
    with pytest.raises(BadRecord, match="renders messages"):
        template.encode(CHAT)


def test_a_sentencepiece_tokenizer_without_hf_uses_the_default_template(sp: Tokenizer) -> None:
    assert isinstance(chat_template(sp), DefaultTemplate)


# -- 2. packing equals one conversation per row -----------------------------------------------


MODEL = ModelConfig(name="tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                    multiple_of=32, max_seq_len=128)


def _loss_and_grads(batch: Any, chunked: bool) -> tuple[float, dict[str, torch.Tensor]]:
    rows = batch.inputs.shape[0]
    settings = StepSettings(global_batch_size=rows, micro_batch_size=rows, precision="fp32",
                            chunked_loss=chunked, seed=7)
    module = build_train_module(model=MODEL, optim=OptimConfig(), parallel=ParallelConfig(),
                                settings=settings, dims=ParallelDims(1, -1, 1, 1, 1), mesh=None,
                                device=torch.device("cpu"), total_steps=1)
    loss = module.forward_backward([batch])
    return loss.item(), {n: p.grad.clone() for n, p in module.model.named_parameters()}


@pytest.mark.parametrize("chunked", [True, False])
def test_packed_conversations_train_as_one_per_row(sp: Tokenizer, chat_file: Path,
                                                   chunked: bool) -> None:
    convs, _ = read_conversations(str(chat_file), DefaultTemplate(sp), seq_len=128,
                                  strict=True, truncate=True)
    convs = convs[:24]
    windows = pack([len(c.ids) - 1 for c in convs], 128)
    assert len(windows) < len(convs) / 2  # several conversations share each row
    packed = build_rows(convs, windows, 128, sp.pad_id)
    single = build_rows(convs, [[i] for i in range(len(convs))], 128, sp.pad_id)
    assert (packed.targets != IGNORE_INDEX).sum() == (single.targets != IGNORE_INDEX).sum()
    loss_p, grads_p = _loss_and_grads(packed, chunked)
    loss_s, grads_s = _loss_and_grads(single, chunked)
    assert abs(loss_p - loss_s) < 1e-5, (loss_p, loss_s)
    for name, g in grads_s.items():
        torch.testing.assert_close(grads_p[name], g, atol=1e-5, rtol=1e-5, msg=name)
    # Without document masking a packed row would attend across conversations: not equal.
    leaky = type(packed)(packed.inputs, packed.targets)
    assert abs(_loss_and_grads(leaky, chunked)[0] - loss_s) > 1e-4


# -- 3. bad records --------------------------------------------------------------------------


def _write(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def _rec(*messages: tuple[str, str]) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in messages]})


BAD_LINES = [
    _rec(("user", "hi"), ("assistant", "hello")),                # 1 good
    "{not json",                                                 # 2 invalid JSON
    json.dumps({"messages": []}),                                # 3 empty conversation
    _rec(("user", "hi"), ("bot", "hello")),                      # 4 unknown role
    "",                                                          # 5 blank: not a record
    _rec(("user", "hi"), ("user", "again")),                     # 6 no assistant message
    _rec(("user", "word " * 200), ("assistant", "ok")),          # 7 a message over seq_len
    json.dumps({"text": "pre-training data"}),                   # 8 no messages
    _rec(("user", "2 + 2?"), ("assistant", "4.")),               # 9 good
]


def test_bad_records_are_counted_and_skipped_with_file_and_first_lines(sp: Tokenizer,
                                                                        tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.jsonl", BAD_LINES)
    convs, [report] = read_conversations(path, DefaultTemplate(sp), seq_len=64, strict=False,
                                         truncate=True)
    assert len(convs) == 2 and (report.kept, report.bad, report.truncated) == (2, 6, 0)
    line = report.line()
    assert line.startswith(f"sft data {path}: 2 conversations; 6 bad records skipped")
    assert "line 2: invalid JSON" in line and "line 3: empty conversation" in line
    assert "line 4: message 1 has unknown role 'bot'" in line
    assert "line 6" not in line  # only the first three are named


@pytest.mark.parametrize(("line", "lineno", "why"), [
    ("{not json", 2, "invalid JSON"),
    (json.dumps({"messages": []}), 2, "empty conversation"),
    (_rec(("user", "hi"), ("bot", "hello")), 2, "unknown role 'bot'"),
    (_rec(("user", "hi")), 2, "no assistant message"),
    (_rec(("user", "word " * 200), ("assistant", "ok")), 2, "message 0 (user) is"),
])
def test_strict_refuses_the_first_bad_record_naming_file_and_line(
        sp: Tokenizer, tmp_path: Path, line: str, lineno: int, why: str) -> None:
    path = _write(tmp_path / "one.jsonl", [BAD_LINES[0], line, BAD_LINES[5]])
    with pytest.raises(DataError) as e:
        read_conversations(path, DefaultTemplate(sp), seq_len=64, strict=True, truncate=True)
    message = str(e.value)
    assert message.startswith(f"sft data {path}:{lineno}: ") and why in message, message
    assert "objective.sft_strict=false" in message and "\n" not in message


def test_a_long_conversation_is_cut_after_its_last_assistant_message_that_fits(
        sp: Tokenizer) -> None:
    template = DefaultTemplate(sp)
    turns = [("user", "What is 12 + 30?"), ("assistant", "12 + 30 = 42.")] * 6
    messages = [{"role": r, "content": c} for r, c in turns]
    full = template.encode(messages)
    seq_len = full.turn_ends[5] + 2  # messages 0..5 fit, 6.. do not
    enc, cut = encode_conversation(template, messages, seq_len=seq_len, truncate=True)
    assert cut and enc.ids == template.encode(messages[:6]).ids
    assert enc.ids == full.ids[:full.turn_ends[5]] and enc.labels == full.labels[:len(enc.ids)]
    with pytest.raises(BadRecord, match="sft_truncate=false"):
        encode_conversation(template, messages, seq_len=seq_len, truncate=False)
    fits, cut = encode_conversation(template, messages, seq_len=len(full.ids) - 1,
                                    truncate=False)
    assert not cut and fits.ids == full.ids  # exactly seq_len + 1 tokens fit


# -- 4. the loader ------------------------------------------------------------------------------


def _loaders(chat_file: Path, sp: Tokenizer, dp_rank: int = 0, dp_size: int = 1,
             mb: int = 4, seed: int = 3) -> tuple[SftLoader, SftLoader]:
    return build_sft_loaders(str(chat_file), None, sp, seq_len=64, micro_batch_size=mb,
                             dp_rank=dp_rank, dp_size=dp_size, seed=seed, vocab_size=512,
                             val_fraction=0.05)


def _cat(batches: list[Any], field: str) -> torch.Tensor:
    return torch.cat([getattr(b, field) for b in batches])


def test_loader_order_is_seeded_sliced_per_rank_and_resumes_exactly(chat_file: Path,
                                                                   sp: Tokenizer) -> None:
    one, val = _loaders(chat_file, sp, mb=4)
    assert len(val.convs) == 15 and len(one.convs) == 285  # 5% held out, none shared
    assert not {c.digest for c in val.convs} & {c.digest for c in one.convs}
    steps = 2 * one.windows_per_epoch // 8 + 1  # runs into the third epoch
    ref = [[one.next_batch(), one.next_batch()] for _ in range(steps)]  # 8 windows a step
    # Two ranks of 4 rows each: rank r holds rows [4r, 4r + 4) of each step's 8.
    ranks = [_loaders(chat_file, sp, dp_rank=r, dp_size=2)[0] for r in range(2)]
    for step in ref:
        got = [r.next_batch() for r in ranks]
        for f in ("inputs", "targets", "doc_ids", "positions"):
            assert torch.equal(_cat(got, f), _cat(step, f)), f
    assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()
    # Every window is read once per epoch; epochs differ in order.
    first = one.window_ids(np.arange(one.windows_per_epoch))
    second = one.window_ids(np.arange(one.windows_per_epoch, 2 * one.windows_per_epoch))
    assert sorted(first) == sorted(second) == list(range(one.windows_per_epoch))
    assert not np.array_equal(first, second)
    # Resume: a fresh loader at the saved position continues exactly.
    fresh, _ = _loaders(chat_file, sp, mb=8)
    fresh.load_state_dict(json.loads(json.dumps(one.state_dict())))
    nxt = one.next_batch(), one.next_batch()
    again = fresh.next_batch()
    assert torch.equal(again.inputs, _cat(list(nxt), "inputs"))
    assert torch.equal(again.targets, _cat(list(nxt), "targets"))
    # Another seed, another order; other data refused.
    other, _ = _loaders(chat_file, sp, seed=4)
    assert not torch.equal(other.next_batch().inputs, _loaders(chat_file, sp)[0].next_batch()
                           .inputs)
    state = dict(one.state_dict(), fingerprint="0" * 32)
    with pytest.raises(DataError, match="allow_data_change"):
        fresh.load_state_dict(state)


def test_eval_windows_are_the_same_set_on_any_layout(chat_file: Path, sp: Tokenizer) -> None:
    def counted(dp_size: int, mb: int) -> int:
        total = 0
        for r in range(dp_size):
            _, val = _loaders(chat_file, sp, dp_rank=r, dp_size=dp_size, mb=mb)
            total += sum(int((b.targets != IGNORE_INDEX).sum()) for b in val.eval_windows(5))
        return total

    assert counted(1, 4) == counted(2, 2) == counted(1, 5) > 0


def test_ids_beyond_the_model_vocabulary_are_refused(chat_file: Path, sp: Tokenizer) -> None:
    with pytest.raises(DataError, match="model.vocab_size=100"):
        build_sft_loaders(str(chat_file), None, sp, seq_len=64, micro_batch_size=4, dp_rank=0,
                          dp_size=1, seed=0, vocab_size=100, val_fraction=0.05)


# -- 5. config ------------------------------------------------------------------------------


def test_sft_is_refused_on_a_non_decoder_and_with_pipeline_stages() -> None:
    cfg = TrainConfig()
    cfg.objective.name = "sft"
    with pytest.raises(ConfigError) as e:  # data.source left at the pre-training default
        validate(cfg, world_size=1)
    assert str(e.value).startswith("objective=sft reads chat JSONL from a local file or glob, "
                                   "not data.source='builtin'; set data.source=PATH")
    cfg.data.source = "chat.jsonl"
    validate(cfg, world_size=1)  # a decoder: accepted
    cfg.model.arch, cfg.model.name, cfg.model.position = "encoder", "cpu_encoder", "learned"
    cfg.model.tie_embeddings = True
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=1)
    assert str(e.value) == ("objective=sft trains a model.arch=decoder, but model=cpu_encoder "
                            "has model.arch=encoder; use model=cpu (or any decoder preset) with "
                            "objective=sft")
    cfg = TrainConfig()
    cfg.objective.name, cfg.parallel.pp, cfg.global_batch_size = "sft", 2, 16
    cfg.data.source = "chat.jsonl"
    with pytest.raises(ConfigError, match="objective=sft packs conversations"):
        validate(cfg, world_size=2)


def test_a_plain_text_prompt_encodes_as_the_template_renders_it(sp: Tokenizer) -> None:
    """`pretrain-generate --prompt` encodes BOS + the whole text: for our tokenizers (newline
    is its own piece) that equals the template's rendering, so a run answers such a prompt."""
    template = DefaultTemplate(sp)
    history = CHAT[:4]
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in history[:2])
    text += "<|assistant|>\n2 + 3 = 5."
    # The answer ends in EOS in the rendering, which text cannot spell: compare up to it.
    rendered = template.encode(history[:3]).ids
    assert sp.encode(text, bos=True) == rendered[:-1]
    prompt = text.replace("<|assistant|>\n2 + 3 = 5.", "<|assistant|>\n")
    assert sp.encode(prompt, bos=True) == (template.encode(history[:2]).ids
                                           + template.headers["assistant"])


@pytest.mark.parametrize("bos", [True, False], ids=["bos", "no-bos"])
def test_an_hf_tokenizer_without_a_template_uses_the_default_one(tmp_path: Path,
                                                                 bos: bool) -> None:
    """A base model's tokenizer (no chat template; some, as Qwen's, without BOS) trains on the
    default template, and `pretrain-generate`'s plain-text prompt encodes as it renders."""
    hf = hf_tokenizer(template=None)
    if not bos:
        hf.bos_token = None
    hf.save_pretrained(tmp_path / "tok")
    tok = Tokenizer.load(f"hf:{tmp_path / 'tok'}")
    assert tok.chat_template is None and (tok.bos_id is not None) == bos
    template = chat_template(tok)
    assert isinstance(template, DefaultTemplate)
    enc = template.encode(CHAT[:3])
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in CHAT[:2]) + "<|assistant|>\n"
    prompt = tok.encode(text, bos=True)
    answer = tok.encode(CHAT[2]["content"]) + [tok.eos_id]
    assert enc.ids == prompt + answer
    assert enc.labels == [False] * len(prompt) + [True] * len(answer)
