"""Continued pre-training from Hugging Face weights through the installed console scripts, as a
user runs it: a random transformers LLaMA and a BPE tokenizer saved locally, data prepared with
`pretrain-prepare-data --tokenizer hf:DIR`, `pretrain-train init_from=DIR` for a few steps
(then resumed from its own checkpoint, which wins over init_from), `pretrain-export-hf` of the
result loaded back by transformers with our logits (1e-4); and the refused starts, each one
line naming the thing: a contradicting override, data of another tokenizer than the base's
(a missing or damaged init_from: tests/unit/test_hf_init.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tests.conftest import read_metrics, refusal_line, run_script, step_losses
from tests.distributed.hf_base import make_llama, make_tokenizer

VOCAB = 320
RUN = ["seq_len=16", "global_batch_size=4", "micro_batch_size=2", "precision=fp32",
       "logging=none", "logging.progress_bar=false", "eval_windows=4", "sample_prompts=[]",
       "optim.warmup_steps=1", "optim.lr=1e-3", "logging.log_every=1"]


def _corpus(path: Path) -> Path:
    """Seeded sentences over a small vocabulary: fixed text (not the package's own sources,
    which change) whose unigram statistics a few steps already learn."""
    words = ("the a model data train loss token layer weight batch step rank shard window "
             "checkpoint resume export").split()
    rng = random.Random(0)
    lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(60)) + "."})
             for _ in range(300)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict:
    root = tmp_path_factory.mktemp("hf-continued")
    tok = make_tokenizer(root / "tok")
    base = root / "base"
    make_llama(base, VOCAB, shard=True)
    for f in tok.iterdir():  # a transformers directory holds its tokenizer
        (base / f.name).write_bytes(f.read_bytes())
    corpus = _corpus(root / "corpus.jsonl")
    run_script(cache_dir, root, "pretrain-prepare-data", "--source", str(corpus), "--tokenizer",
         f"hf:{tok}", "--out", str(root / "prep"), "--workers", "2", "--val-fraction", "0.1")
    return {"root": root, "tok": tok, "base": base, "corpus": corpus, "prep": root / "prep"}


def test_continued_training_exports_to_transformers(setup: dict, cache_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pretrain.data.tokenizer import Tokenizer
    from pretrain.train.consolidate import load_model_from_checkpoint

    root, out = setup["root"], setup["root"] / "runs"
    manifest = json.loads((setup["prep"] / "manifest.json").read_text())
    assert manifest["tokenizer"]["fingerprint"] == Tokenizer.load(f"hf:{setup['tok']}").fingerprint
    common = [f"init_from={setup['base']}", f"data.dir={setup['prep']}", *RUN,
              f"output_root={out}", "run_name=cont", "ckpt_every=3", "eval_every=3"]
    first = run_script(cache_dir, root, "pretrain-train", *common, "steps=3")
    assert "resumed" not in first.stdout
    second = run_script(cache_dir, root, "pretrain-train", *common, "steps=6")
    assert "resumed from" in second.stdout and "step_00000003" in second.stdout
    losses = step_losses(out / "cont")
    val = {m["step"]: m["val/loss"] for m in read_metrics(out / "cont") if "val/loss" in m}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and val[6] < val[3]

    proc = run_script(cache_dir, root, "pretrain-export-hf", str(out / "cont"),
                      str(root / "exported"))
    assert "verified: transformers' logits match ours to " in proc.stdout, proc.stdout
    hf = AutoModelForCausalLM.from_pretrained(root / "exported").eval()
    hf_tok = AutoTokenizer.from_pretrained(root / "exported")
    ours, state = load_model_from_checkpoint(out / "cont")
    ours.eval()
    assert state["counters"]["step"] == 6
    text = Path(setup["corpus"]).read_text()[:300]
    ids = Tokenizer.load(state["tokenizer_path"]).encode(text)
    assert hf_tok.encode(text, add_special_tokens=False) == ids
    x = torch.tensor([ids[:48]])
    with torch.no_grad():
        diff = (hf(input_ids=x).logits - ours(x)).abs().max().item()
    assert diff < 1e-4, diff
    base = AutoModelForCausalLM.from_pretrained(setup["base"]).eval()
    with torch.no_grad():  # trained: the weights moved away from the base's
        assert (base(input_ids=x).logits - ours(x)).abs().max().item() > 1e-3


def test_refused_starts_are_one_line(setup: dict, cache_dir: Path, tmp_path: Path) -> None:
    out = setup["root"] / "runs"
    args = [f"data.dir={setup['prep']}", *RUN, f"output_root={out}", "steps=1"]
    line = refusal_line(run_script(cache_dir, setup["root"], "pretrain-train",
                             f"init_from={setup['base']}", "model.n_layers=3", *args,
                             "run_name=r1", check=False))
    assert "model.n_layers=3 contradicts init_from=" in line and "n_layers=2" in line
    other = tmp_path / "other"
    make_llama(other, VOCAB, seed=5)
    make_tokenizer(other, vocab_size=300)  # its own tokenizer: not the data's
    line = refusal_line(run_script(cache_dir, setup["root"], "pretrain-train",
                             f"init_from={other}", *args, "run_name=r3", check=False))
    assert f"is not the one of init_from={other}" in line
    assert not (out / "r1").exists() and not (out / "r3").exists()
