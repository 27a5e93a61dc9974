"""LoRA through the installed entry and tools, as a user runs it: `pretrain-train lora.rank=8
init_from=<a checkpoint of ours>`; a stop (SIGTERM) and a restart with the same config continue
exactly; a restart onto another base is refused; both exports (`pretrain-export-hf
--merge-lora` and `--adapter`, loaded by transformers and peft) give our logits within 1e-4."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from pretrain.config import ModelConfig
from pretrain.interop.hf import export_hf
from pretrain.train.adapters import BASE_KEY, load_lora_model
from pretrain.train.checkpoint import resolve_checkpoint
from pretrain.train.consolidate import load_model_for_export
from tests.conftest import console_script, refusal_line, run_train, step_losses, train_env
from tools.export_hf import main as export_main

LORA = ("lora.rank=8", "lora.alpha=16", "lora.targets=[wq,wk,wv,wo,w1,w2,w3]",
        "optim.lr=3e-3", "steps=6", "ckpt_every=3", "ckpt_keep=0", "eval_every=0",
        "logging.log_every=1")


def run_tool(cache_dir: Path, name: str, *args: str,
             check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([console_script(name), *args], env=train_env(cache_dir),
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def runs(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two bases (4 steps of full training, different seeds) and the LoRA run on the first."""
    out = tmp_path_factory.mktemp("lora-e2e")
    run_train(cache_dir, out, "base", "steps=4", "ckpt_every=0", "eval_every=0")
    run_train(cache_dir, out, "lora", *LORA, f"init_from={out / 'base'}")
    # Two more bases, written in-process (cheaper than runs): the base as transformers
    # weights, and another one (the base with noise), both LlamaForCausalLM directories.
    state_dict, state = load_model_for_export(out / "base")
    cfg = ModelConfig(**state["config"]["model"])
    export_hf(state_dict, cfg, out / "base_hf")
    g = torch.Generator().manual_seed(0)
    noisy = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state_dict.items()}
    export_hf(noisy, cfg, out / "other_base_hf")
    return out


def test_checkpoint_holds_adapters_and_names_the_base(runs: Path) -> None:
    found = resolve_checkpoint(runs / "lora")
    keys = list(FileSystemReader(str(found)).read_metadata().state_dict_metadata)
    model_keys = [k for k in keys if k.startswith("app.model.")]
    assert len(model_keys) == 2 * 7 * 2 and all(".lora_" in k for k in model_keys)  # 2 layers
    state = json.loads((found / "trainer_state.json").read_text())
    assert state[BASE_KEY]["kind"] == "pretrain"
    assert state[BASE_KEY]["path"] == str(resolve_checkpoint(runs / "base").resolve())
    # The base is frozen: the loaded model's base weights are the base run's, bit for bit.
    model, _ = load_lora_model(runs / "lora")
    base_sd, _ = load_model_for_export(runs / "base")
    lora_sd = model.state_dict()
    for k, v in base_sd.items():
        assert torch.equal(lora_sd[k], v), k
    assert max(float(lora_sd[k].abs().max()) for k in lora_sd if ".lora_b." in k) > 1e-3


def test_stop_and_restart_continue_exactly(runs: Path, cache_dir: Path) -> None:
    base = f"init_from={runs / 'base'}"
    proc = run_train(cache_dir, runs, "stopped", *LORA, base, "faults.signal_at_step=3")
    summary = json.loads((runs / "stopped" / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["steps"] == 3, proc.stdout
    proc = run_train(cache_dir, runs, "stopped", *LORA, base)
    assert "resumed from" in proc.stdout and "step_00000003" in proc.stdout
    assert step_losses(runs / "stopped") == step_losses(runs / "lora")
    assert len(step_losses(runs / "lora")) == 6
    a, _ = load_lora_model(runs / "stopped")
    b, _ = load_lora_model(runs / "lora")
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


def test_restart_on_another_base_is_refused(runs: Path, cache_dir: Path) -> None:
    before = (runs / "lora" / "checkpoints" / "latest.json").read_text()
    proc = run_train(cache_dir, runs, "lora", *LORA, f"init_from={runs / 'other_base_hf'}",
                     check=False)
    line = refusal_line(proc)
    assert "holds LoRA adapters for init_from=" in line and "set init_from=" in line, line
    assert (runs / "lora" / "checkpoints" / "latest.json").read_text() == before


def _tokens() -> torch.Tensor:
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def test_merged_export_matches_our_logits(runs: Path, cache_dir: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import transformers

    assert export_main([str(runs / "lora"), str(tmp_path / "x")]) == 2
    assert "holds LoRA adapters, not a whole model; pass --merge-lora" in capsys.readouterr().err
    proc = run_tool(cache_dir, "pretrain-export-hf", str(runs / "lora"), str(tmp_path / "merged"),
                    "--merge-lora")
    assert "verified: transformers' logits match ours to " in proc.stdout, proc.stdout
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged",
                                                       attn_implementation="eager").eval()
    ours, _ = load_lora_model(runs / "lora")
    x = _tokens()
    with torch.no_grad():
        want = ours(x)
        torch.testing.assert_close(hf(input_ids=x).logits, want, rtol=0, atol=1e-4)
        # ... and the adapters matter: the base alone is farther away than the tolerance.
        base = transformers.LlamaForCausalLM.from_pretrained(
            runs / "base_hf", attn_implementation="eager").eval()
        assert float((base(input_ids=x).logits - want).abs().max()) > 1e-2


def test_peft_adapter_loads_onto_the_transformers_base(runs: Path, cache_dir: Path,
                                                       tmp_path: Path) -> None:
    import transformers
    from peft import PeftModel

    base_dir = runs / "base_hf"
    proc = run_tool(cache_dir, "pretrain-export-hf", str(runs / "lora"),
                    str(tmp_path / "adapter"), "--adapter", "--base-name", str(base_dir))
    assert "verified: transformers' logits match ours to " in proc.stdout, proc.stdout
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj",
                                               "gate_proj", "down_proj", "up_proj"])
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ours, _ = load_lora_model(runs / "lora")
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, ours(x), rtol=0, atol=1e-4)


def test_corrupted_lora_exports_fail_their_check(runs: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The check of both LoRA exports can fail: an adapter written with twice peft's scale
    (lora_alpha), a merged model with one matrix transposed. Exit 1, one error line, the
    directory renamed `.unverified`."""
    import dataclasses

    import pretrain.interop.hf as hf_module
    import tools.export_hf as tool

    real_adapter, real_rename = tool.export_peft_adapter, hf_module.to_hf_state_dict
    monkeypatch.setattr(tool, "export_peft_adapter", lambda adapters, cfg, lora, out, **kw:
                        real_adapter(adapters, cfg, dataclasses.replace(lora, alpha=2 * lora.alpha),
                                     out, **kw))

    def transposed(state_dict: dict, cfg: ModelConfig) -> dict:
        out = real_rename(state_dict, cfg)
        key = "model.layers.0.self_attn.o_proj.weight"  # square: dim x dim
        return out | {key: out[key].t().contiguous()}

    monkeypatch.setattr(hf_module, "to_hf_state_dict", transposed)
    for flag, name in (("--adapter", "adapter"), ("--merge-lora", "merged")):
        assert export_main([str(runs / "lora"), str(tmp_path / name), flag]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: export check failed: "), lines
        assert "logits differ from ours by" in lines[0] and "tolerance" in lines[0], lines
        assert not (tmp_path / name).exists()
        assert (tmp_path / f"{name}.unverified" / "NOT_VERIFIED.txt").is_file()
