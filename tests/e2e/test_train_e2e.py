"""The real Hydra entry point, end to end, on a tiny model and a slice of the built-in corpus."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import read_metrics, run_train, step_losses


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from pretrain.train.consolidate import load_model_for_export

    state_dict, _ = load_model_for_export(run_dir)
    return state_dict


def _tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_run(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    run_train(cache_dir, out, "tiny", "steps=60", "optim.lr=1e-2", "eval_every=30",
              "ckpt_every=30", "logging=wandb", "logging.wandb_mode=offline",
              "logging.progress_bar=false", "logging.log_every=5", "precision=bf16",
              "sample_prompts=[import]", "sample_tokens=8")
    return out / "tiny"


def test_loss_falls_and_run_dir_is_complete(tiny_run: Path) -> None:
    losses = step_losses(tiny_run)
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < 0.75 * first, losses
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 60
    assert summary["tokens"] == 60 * 8 * 64
    assert summary["final_val_loss"] < first
    assert summary["params"] > summary["non_embedding_params"] > 0
    assert summary["samples"] and summary["samples"][0]["prompt"] == "import"
    assert (tiny_run / "config.yaml").is_file()
    assert (tiny_run / "checkpoints" / "step_00000060" / "integrity.json").is_file()
    records = read_metrics(tiny_run)
    step_keys = {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_sec", "perf/mfu"}
    assert step_keys <= set(records[0])
    assert any("val/loss" in r for r in records)
    # A real offline W&B run: its binary log file exists and is not empty.
    wandb_files = list((tiny_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert wandb_files and wandb_files[0].stat().st_size > 0


def test_resume_is_bitwise_equal(cache_dir: Path, tmp_path: Path) -> None:
    common = ("steps=12", "ckpt_every=4", "ckpt_keep=0", "eval_every=0", "logging.log_every=1")
    run_train(cache_dir, tmp_path, "full", *common)
    full = tmp_path / "full"
    # Make a copy that stopped after step 8: drop the later checkpoint and log records.
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step_00000012")
    kept = [r for r in read_metrics(part) if r["step"] <= 8 and "train/loss" in r]
    (part / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    (part / "summary.json").unlink()
    proc = run_train(cache_dir, tmp_path, "part", *common)
    assert "resumed from" in proc.stdout and "step_00000008" in proc.stdout
    assert step_losses(part) == step_losses(full)  # exact float equality, steps 1..12
    a, b = _weights(full), _weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("no_such_key=1", "no_such_key"),
        ("steps=many", "steps"),
        ("model=no_such_preset", "no_such_preset"),
        ("model.n_heads=3", "not divisible"),
        ("model.n_kv_heads=3", "not divisible"),
        ("data.source=/no/such/corpus/*.txt", "/no/such/corpus"),
        ("data.dir=/no/such/shards", "/no/such/shards"),
    ],
)
def test_bad_input_fails_clearly_and_damages_nothing(
    cache_dir: Path, tiny_run: Path, override: str, message: str
) -> None:
    before = _tree_digest(tiny_run / "checkpoints")
    proc = run_train(cache_dir, tiny_run.parent, "tiny", override, "steps=80", check=False,
                     timeout=120)
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert message in err, err
    assert "Traceback" not in err, err
    assert _tree_digest(tiny_run / "checkpoints") == before


def test_tokenizer_model_vocab_mismatch(cache_dir: Path, tiny_run: Path) -> None:
    state = json.loads(next((tiny_run / "checkpoints").glob("step_*/trainer_state.json"))
                       .read_text())
    tok = state["tokenizer_path"]
    proc = run_train(cache_dir, tiny_run.parent, "mismatch", f"data.tokenizer={tok}",
                     "model.vocab_size=1000", check=False, timeout=120)
    assert proc.returncode != 0
    assert "vocab" in proc.stderr and tok in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_export_consolidate_and_generate_tools(tiny_run: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    transformers = pytest.importorskip("transformers")
    from pretrain.data.tokenizer import Tokenizer
    from pretrain.train.consolidate import load_model_from_checkpoint
    from tools.consolidate_checkpoint import main as consolidate_main
    from tools.export_hf import main as export_main
    from tools.generate import main as generate_main

    assert consolidate_main([str(tiny_run), str(tmp_path / "model.pt")]) == 0
    assert export_main([str(tmp_path / "model.pt"), str(tmp_path / "hf")]) == 0
    assert "verified: transformers' logits match ours to " in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model, state = load_model_from_checkpoint(tiny_run)
    text = "import os\n\ndef main():\n    return 1\n"
    ids = Tokenizer.load(state["tokenizer_path"]).encode(text)
    assert hf_tok.encode(text, add_special_tokens=False) == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (model.eval()(x) - hf(x).logits).abs().max().item()
    assert diff < 1e-4
    assert generate_main([str(tiny_run), "--prompt", "import", "--max-new-tokens", "5",
                          "--temperature", "0"]) == 0
    assert "--- 'import'" in capsys.readouterr().out


def test_compiled_run_finishes_with_samples(cache_dir: Path, tmp_path: Path) -> None:
    """compile=true (the CUDA default) end to end: training, evaluation, checkpoint, and the
    sampled texts, whose KV-cache shapes change every token (generation runs eagerly)."""
    run_train(cache_dir, tmp_path, "compiled", "compile=true", "steps=3", "eval_every=0",
              "sample_prompts=[def,import,class]", "sample_tokens=12", timeout=600)
    summary = json.loads((tmp_path / "compiled" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert [s["prompt"] for s in summary["samples"]] == ["def", "import", "class"]
    assert any(s["completion"] for s in summary["samples"])
