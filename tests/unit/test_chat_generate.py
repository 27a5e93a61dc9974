"""Chat generation for instruction-tuned models: prompts rendered with the run's chat template
(the code path objective=sft trains with) equal transformers' `apply_chat_template(...,
add_generation_prompt=True)`, answers stop at the template's end-of-turn token, in `generate`,
the batched path, `pretrain-generate --chat`, the trainer's end-of-run samples, and the
exported model's generation_config.json (transformers' `generate` stops there too)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.data.sft import DefaultTemplate, HFChatTemplate, chat_template
from pretrain.data.tokenizer import Tokenizer, train_tokenizer
from pretrain.eval.generate import generate, generate_many, read_chats
from pretrain.interop.hf import export_hf
from pretrain.models.build import build_model
from pretrain.models.llama import Transformer
from pretrain.train import checkpoint as ckpt
from pretrain.train.trainer import samples
from tests.unit.test_sft import CHATML, CHATML_BOS, OTHER_TEMPLATES, saved_hf_tokenizer
from tools.generate import _with_bos
from tools.generate import main as generate_main

QUESTION = "What is 12 + 30?"
CONV = [{"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": QUESTION}]
MAX_NEW = 24


def _hf_prompt(hf: Any, messages: list[dict[str, str]]) -> list[int]:
    out = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                 return_dict=False)
    return [int(i) for i in out]


@pytest.mark.parametrize("template", [CHATML, CHATML_BOS], ids=["chatml", "bos+chatml"])
def test_prompt_is_transformers_generation_prompt_and_stops_at_im_end(
        tmp_path: Path, template: str) -> None:
    tok = saved_hf_tokenizer(tmp_path / "tok", template)
    t = chat_template(tok)
    assert isinstance(t, HFChatTemplate)
    for messages in (CONV, CONV[1:], [*CONV, {"role": "assistant", "content": "42."},
                                      {"role": "user", "content": "And 1 + 1?"}]):
        ids = t.prompt(messages)
        assert ids == _hf_prompt(tok.hf, messages)
        assert ids.count(tok.bos_id) == (template == CHATML_BOS)  # never a second BOS
        assert tok.hf.decode(ids).endswith("<|im_end|>\n<|im_start|>assistant\n")
    im_end = tok.piece_to_id("<|im_end|>")
    assert t.stop_ids() == [tok.eos_id, im_end]


@pytest.mark.parametrize("name", sorted(OTHER_TEMPLATES))
def test_end_of_turn_ids_come_from_what_the_template_writes_after_an_answer(
        tmp_path: Path, name: str) -> None:
    """LLaMA-3's shape closes its header with a special token but ends answers with EOS; Qwen's
    ends them with <|im_end|>; Mistral's and Vicuna's with EOS."""
    tok = saved_hf_tokenizer(tmp_path / "tok", OTHER_TEMPLATES[name][0])
    want = [tok.eos_id] + ([tok.piece_to_id("<|im_end|>")] if name == "qwen" else [])
    assert chat_template(tok).stop_ids() == want
    if name != "mistral":  # Mistral's template has no generation prompt
        assert chat_template(tok).prompt(CONV[1:]) == _hf_prompt(tok.hf, CONV[1:])


def test_default_template_prompt_is_the_training_rendering_then_the_assistant_header(
        tmp_path: Path) -> None:
    texts = [f"<|user|>\nline {i} of text\n<|assistant|>\nok {i}\n" for i in range(300)]
    tok = Tokenizer.load(str(train_tokenizer(texts, str(tmp_path / "t.model"),
                                             vocab_size=420)))
    t = chat_template(tok)
    assert isinstance(t, DefaultTemplate)
    ids = t.prompt(CONV)
    want = ([tok.bos_id] + tok.encode("<|system|>\n") + tok.encode(CONV[0]["content"])
            + tok.encode("\n") + tok.encode("<|user|>\n") + tok.encode(QUESTION)
            + tok.encode("\n") + tok.encode("<|assistant|>\n"))
    assert ids == want
    assert t.stop_ids() == [tok.eos_id]


# -- a model that emits <|im_end|> ------------------------------------------------------------


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A ChatML tokenizer saved as an HF base directory, and a random decoder whose greedy
    answer to QUESTION (a user message alone) emits <|im_end|> after `k` tokens: two rows of
    the output layer of a random model are swapped, so that the token it would first write at
    step k becomes <|im_end|> (every earlier step keeps its argmax). `ref`: the answer without
    stopping at <|im_end|>."""
    root = tmp_path_factory.mktemp("chat")
    tok = saved_hf_tokenizer(root / "base", CHATML_BOS)
    im_end = tok.piece_to_id("<|im_end|>")
    cfg = ModelConfig(name="tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      vocab_size=tok.vocab_size, multiple_of=16, max_seq_len=96)
    torch.manual_seed(0)
    model = build_model(cfg, device="cpu").eval()
    prompt = chat_template(tok).prompt(CONV[1:])
    free = generate(model, prompt, max_new_tokens=MAX_NEW, temperature=0)
    k = next(i for i in range(3, MAX_NEW) if free[i] not in free[:i] and im_end not in free[:i]
             and free[i] not in tok.control_ids)
    with torch.no_grad():
        w = model.output.weight
        w[[free[k], im_end]] = w[[im_end, free[k]]]
        w.mul_(1000.0)  # near one-hot: sampling at temperature 0.8 follows the argmax
    ref = generate(model, prompt, max_new_tokens=MAX_NEW, temperature=0)
    assert ref[:k] == free[:k] and ref[k] == im_end and len(ref) > k + 1
    run = root / "run"
    config = {"model": dataclasses.asdict(cfg), "objective": {"name": "sft"}}
    ckpt.save_checkpoint(run / "checkpoints", 1, {
        "app": ckpt.ModelOptimState(model, None), "config": ckpt.Record(config),
        "tokenizer_path": ckpt.Record(tok.path)}, keep=1)
    return {"root": root, "tok": tok, "model": model, "cfg": cfg, "k": k, "ref": ref,
            "run": run, "prompt": prompt}


def test_generation_stops_at_the_end_of_turn_token_one_by_one_and_batched(
        chat: dict[str, Any]) -> None:
    tok, model, k, ref = chat["tok"], chat["model"], chat["k"], chat["ref"]
    stops = chat_template(tok).stop_ids()
    got = generate(model, chat["prompt"], max_new_tokens=MAX_NEW, temperature=0,
                   eos_id=tok.eos_id, stop_ids=stops)
    assert got == ref[:k]
    other = chat_template(tok).prompt([{"role": "user", "content": "Reverse: apple tiger"}])
    one = generate(model, other, max_new_tokens=MAX_NEW, temperature=0, eos_id=tok.eos_id,
                   stop_ids=stops)
    assert generate_many(model, [chat["prompt"], other], batch_size=2, max_new_tokens=MAX_NEW,
                         temperature=0, eos_id=tok.eos_id, stop_ids=stops,
                         pad_id=tok.pad_id) == [ref[:k], one]


def test_cli_chat_renders_with_the_template_and_stops_at_im_end(
        chat: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    tok, k, ref, run = chat["tok"], chat["k"], chat["ref"], str(chat["run"])
    flags = ["--temperature", "0", "--max-new-tokens", str(MAX_NEW)]
    assert generate_main([run, "--chat", QUESTION, *flags]) == 0
    out, err = capsys.readouterr()
    assert out == f"--- {QUESTION!r}\n{tok.decode(ref[:k])}\n"
    assert "note:" not in err  # the run trained objective=sft
    stops = chat_template(tok).stop_ids()
    with_system = generate(chat["model"], chat_template(tok).prompt(CONV),
                           max_new_tokens=MAX_NEW, temperature=0, eos_id=tok.eos_id,
                           stop_ids=stops)
    assert generate_main([run, "--chat", QUESTION, "--system", CONV[0]["content"], *flags]) == 0
    assert capsys.readouterr().out == f"--- {QUESTION!r}\n{tok.decode(with_system)}\n"

    root = chat["root"]
    (root / "q.txt").write_text(f"{QUESTION}\nReverse: apple tiger\n")
    (root / "q.jsonl").write_text(json.dumps({"id": 7, "messages": CONV[1:]}) + "\n")
    assert read_chats(root / "q.txt")[0] == {"messages": [CONV[1]]}
    assert generate_main([run, "--chat", "--prompts-file", str(root / "q.jsonl"), *flags]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert json.loads(line) == {"id": 7, "messages": CONV[1:], "completion": tok.decode(ref[:k]),
                                "new_tokens": k, "finish_reason": "stop"}
    want = [generate(chat["model"], chat_template(tok).prompt([{"role": "user", "content": q}]),
                     max_new_tokens=MAX_NEW, temperature=0, eos_id=tok.eos_id, stop_ids=stops)
            for q in (QUESTION, "Reverse: apple tiger")]
    assert generate_main([run, "--chat", "--prompts-file", str(root / "q.txt"), *flags]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["completion"] for x in lines] == [tok.decode(w) for w in want]


def test_cli_chat_flag_errors_are_one_line(chat: dict[str, Any],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    run = str(chat["run"])
    for argv, words in (([run, "--chat"], "needs the user's message"),
                        ([run, "--chat", "hi", "--prompt", "x"], "drop --prompt"),
                        ([run, "--system", "s", "--prompt", "x"], "--system goes with --chat")):
        assert generate_main(argv) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1


def test_raw_prompt_that_spells_bos_gets_no_second_bos(chat: dict[str, Any],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A templated prompt written out by hand (with "<s>") continues exactly as --chat."""
    tok, k, ref = chat["tok"], chat["k"], chat["ref"]
    text = tok.hf.decode(chat["prompt"])
    assert text.startswith("<s><|im_start|>user")
    assert _with_bos(tok, text) == chat["prompt"]  # the one BOS of the text
    assert _with_bos(tok, text[len("<s>"):]) == chat["prompt"]  # BOS added when it has none
    assert generate_main([str(chat["run"]), "--prompt", text, "--temperature", "0",
                          "--max-new-tokens", str(k)]) == 0
    assert capsys.readouterr().out == f"--- {text!r}\n{text}{tok.decode(ref[:k])}\n"


def test_trainer_samples_of_an_sft_run_are_answers_to_user_messages(
        chat: dict[str, Any]) -> None:
    tok, k, ref = chat["tok"], chat["k"], chat["ref"]
    cfg = SimpleNamespace(sample_prompts=[QUESTION], model=SimpleNamespace(arch="decoder"),
                          seed=0, sample_tokens=MAX_NEW, objective=SimpleNamespace(name="sft"))
    run = SimpleNamespace(module=SimpleNamespace(generation_model=chat["model"]), cfg=cfg,
                          device=torch.device("cpu"), tokenizer=tok)
    # The trainer samples (temperature 0.8, top-k 50, seeded); this model's logits are so
    # peaked that the draw is its greedy answer, which ends at <|im_end|>.
    assert samples(run) == [{"prompt": QUESTION, "completion": tok.decode(ref[:k])}]
    cfg.objective.name = "clm"  # raw text, as before
    raw = generate(chat["model"], tok.encode(QUESTION, bos=True), max_new_tokens=MAX_NEW,
                   temperature=0.8, top_k=50, eos_id=tok.eos_id,
                   generator=torch.Generator().manual_seed(0))
    assert samples(run) == [{"prompt": QUESTION, "completion": tok.decode(raw)}]


def test_export_generation_config_lists_end_of_turn_and_transformers_stops_there(
        chat: dict[str, Any]) -> None:
    """An HF base directory's generation_config.json (LLaMA-3-Instruct-like sampling defaults)
    carries over; eos_token_id gains <|im_end|>; transformers' greedy generate stops there."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    tok, k, ref = chat["tok"], chat["k"], chat["ref"]
    base = Path(tok.directory)
    im_end = tok.piece_to_id("<|im_end|>")
    GenerationConfig(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, do_sample=True,
                     temperature=0.6, top_p=0.9).save_pretrained(base)
    model: Transformer = chat["model"]
    out = export_hf(model.state_dict(), chat["cfg"], chat["root"] / "export",
                    tokenizer_path=tok.path)
    saved = json.loads((out / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [tok.eos_id, im_end]
    assert (saved["temperature"], saved["top_p"], saved["do_sample"]) == (0.6, 0.9, True)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([chat["prompt"]])
    got = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                      do_sample=False, pad_token_id=tok.pad_id)[0, ids.shape[1]:].tolist()
    assert got == ref[:k + 1]  # the answer, then <|im_end|>, where generation stopped
    (base / "generation_config.json").unlink()  # without a base's: our own, with the ids
    out = export_hf(model.state_dict(), chat["cfg"], chat["root"] / "export2",
                    tokenizer_path=tok.path)
    saved = json.loads((out / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [tok.eos_id, im_end] and "temperature" not in saved


def test_read_chats_names_a_bad_line(tmp_path: Path) -> None:
    from pretrain.errors import DataError

    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": CONV}) + "\n"
                    + json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"c.jsonl:2 has no valid \"messages\" list"):
        read_chats(path)
