"""Instruction fine-tuning from a Hugging Face base through the installed console scripts, as a
user runs it: a random transformers LLaMA saved locally with its tokenizer (a tiny byte-level BPE
whose chat template is ChatML led by `{{ bos_token }}`), `pretrain-train objective=sft
init_from=DIR data.source=chat.jsonl` with no data.tokenizer (the base's tokenizer and template
are used), the step-1 loss against transformers' assistant-only loss on the same packed batch
(fp32, 1e-5), and `pretrain-export-hf` of the result loaded back by transformers with our logits
(1e-4) and the base's chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrain.data.sft import synthetic_chats
from tests.conftest import run_script, step_losses
from tests.distributed.hf_base import make_llama
from tests.unit.test_sft import CHATML_BOS, hf_tokenizer

SEED = 7
SEQ = 64
MB = 2
STEPS = 4
RUN = [f"seq_len={SEQ}", "global_batch_size=4", f"micro_batch_size={MB}", f"steps={STEPS}",
       f"seed={SEED}", "data.val_fraction=0.05", "precision=fp32", "logging=none",
       "logging.progress_bar=false", "eval_windows=4", f"eval_every={STEPS}",
       f"ckpt_every={STEPS}", "sample_prompts=[]", "optim.warmup_steps=1", "optim.lr=3e-3",
       "logging.log_every=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict:
    """The base (weights and tokenizer in one directory), the chat file, one 4-step run."""
    root = tmp_path_factory.mktemp("sft-hf")
    base = root / "base"
    tok = hf_tokenizer(CHATML_BOS)
    make_llama(base, len(tok))
    tok.save_pretrained(base)
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in synthetic_chats(64, seed=3)))
    proc = run_script(cache_dir, root, "pretrain-train", "objective=sft", f"init_from={base}",
                f"data.source={chat}", *RUN, f"output_root={root / 'runs'}", "run_name=sft")
    return {"root": root, "base": base, "chat": chat, "run_dir": root / "runs" / "sft",
            "stdout": proc.stdout}


def test_step1_loss_is_transformers_assistant_only_loss(run: dict) -> None:
    """Our logged step-1 loss (two micro-batches of packed conversations, each micro-batch's
    token mean, then their mean) against the base in transformers, one conversation at a time
    from position 0, cross-entropy over the assistant targets only."""
    from transformers import AutoModelForCausalLM

    from pretrain.data.sft import build_sft_loaders
    from pretrain.data.tokenizer import Tokenizer
    from pretrain.models.loss import IGNORE_INDEX
    from pretrain.train.consolidate import load_model_from_checkpoint

    base, chat = run["base"], run["chat"]
    assert f"sft data {chat}: 64 conversations" in run["stdout"]
    _, state = load_model_from_checkpoint(run["run_dir"])
    assert state["tokenizer_path"] == f"hf:{base.resolve()}"  # the base's, by default

    tok = Tokenizer.load(f"hf:{base}")
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    train, _ = build_sft_loaders(str(chat), None, tok, seq_len=SEQ, micro_batch_size=MB,
                                 dp_rank=0, dp_size=1, seed=SEED,
                                 vocab_size=hf.config.vocab_size, val_fraction=0.05)
    answers = [m["content"] + "<|im_end|>\n" for line in chat.read_text().splitlines()
               for m in json.loads(line)["messages"] if m["role"] == "assistant"]
    means, conversations = [], 0
    for _ in range(2):  # the step's two micro-batches
        batch = train.next_batch()
        loss_sum, count = 0.0, 0
        for inputs, targets, doc_ids, positions in zip(batch.inputs, batch.targets,
                                                       batch.doc_ids, batch.positions):
            for d in doc_ids.unique():
                at = doc_ids == d
                t = targets[at]
                if (t == IGNORE_INDEX).all():  # the row's padding
                    continue
                assert positions[at].tolist() == list(range(int(at.sum())))
                # The targets are whole answers with their end-of-turn, nothing else.
                text = tok.hf.decode(t[t != IGNORE_INDEX].tolist())
                assert all(a + "<|im_end|>\n" in answers
                           for a in text.split("<|im_end|>\n")[:-1]), text
                with torch.no_grad():
                    logits = hf(input_ids=inputs[at][None]).logits[0].float()
                loss_sum += F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX,
                                            reduction="sum").item()
                count += int((t != IGNORE_INDEX).sum())
                conversations += 1
        means.append(loss_sum / count)
    assert conversations > 2 * MB  # packed: more conversations than rows
    ours = step_losses(run["run_dir"])
    assert sorted(ours) == list(range(1, STEPS + 1)) and ours[STEPS] < ours[1]
    ref = sum(means) / 2
    print(f"step-1 loss: ours {ours[1]:.7f} | transformers {ref:.7f} | "
          f"|diff| {abs(ours[1] - ref):.1e} ({conversations} conversations)")
    assert abs(ours[1] - ref) < 1e-5, (ours[1], ref)


def test_export_loads_in_transformers_with_our_logits_and_the_chat_template(
        run: dict, cache_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pretrain.train.consolidate import load_model_from_checkpoint

    exported = run["root"] / "exported"
    proc = run_script(cache_dir, run["root"], "pretrain-export-hf", str(run["run_dir"]),
                      str(exported))
    assert "verified: transformers' logits match ours to " in proc.stdout, proc.stdout
    hf = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(exported)
    assert hf_tok.chat_template == CHATML_BOS
    messages = json.loads(run["chat"].read_text().splitlines()[0])["messages"]
    ids = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    base_tok = AutoTokenizer.from_pretrained(run["base"])
    assert ids == base_tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    ours, state = load_model_from_checkpoint(run["run_dir"])
    ours.eval()
    assert state["counters"]["step"] == STEPS
    x = torch.tensor([ids[:SEQ]])
    with torch.no_grad():
        diff = (hf(input_ids=x).logits - ours(x)).abs().max().item()
        base = AutoModelForCausalLM.from_pretrained(run["base"], dtype=torch.float32).eval()
        moved = (base(input_ids=x).logits - ours(x)).abs().max().item()
    print(f"export: max |logits(transformers) - logits(ours)| = {diff:.1e} on {x.shape[1]} "
          f"tokens; vs the base {moved:.1e}")
    assert diff < 1e-4, diff
    assert moved > 1e-3, moved  # trained: the weights moved away from the base's
