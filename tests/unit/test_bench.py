"""The benchmark tool: its report and table on a tiny model, the GPU check's dry run, and (on
a GPU) a bf16 step under flash attention."""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.perf.bench import BenchSettings, cpu_allocation_high_water, run_bench
from tests.conftest import REPO
from tools.bench import load_model_config, main

TINY = ["--model", "debug", "--seq-len", "32", "--batch-size", "2", "--device", "cpu",
        "--warmup", "1", "--steps", "2"]


def test_cli_writes_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = ["hf", "plain", "+fused-adamw", "+chunked-ce"]
    out = tmp_path / "bench.json"
    assert main([*TINY, "--precision", "fp32", "--rows", ",".join(rows), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["row"] for r in report["rows"]] == rows
    assert report["params"] == 1_147_200 and report["peak_flops"] > 0
    for r in report["rows"]:
        assert len(r["step_times"]) == 2 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 2
        assert r["step_s"] >= r["fwd_bwd_s"] > 0
        assert r["peak_mem_mib"] > r["static_mem_mib"] > 0
    # Same weights, batches and optimizer settings in fp32: every row trains the same function.
    losses = [r["final_loss"] for r in report["rows"]]
    assert max(losses) - min(losses) < 1e-4
    printed = capsys.readouterr().out
    assert "vs hf" in printed and "ours (+chunked-ce) / transformers tokens/s" in printed
    assert all(f"\n{row} " in printed for row in rows)
    # --table renders saved reports again, as the GPU check does.
    assert main(["--table", str(out), str(out)]) == 0
    assert capsys.readouterr().out.count("debug T=32 B=2  +chunked-ce") == 2


def test_cli_refuses_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*TINY, "--rows", "plain,+turbo"]) == 2
    assert "unknown rows ['+turbo']" in capsys.readouterr().err
    assert main(["--model", "no-such-preset"]) == 2
    assert "no model preset 'no-such-preset'" in capsys.readouterr().err


def test_row_names_its_parent_and_counts_activation_memory() -> None:
    cfg = ModelConfig(name="ac", dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256,
                      multiple_of=64, max_seq_len=128)
    report = run_bench(BenchSettings(model=cfg, seq_len=128, batch_size=4, warmup=0, steps=1,
                                     device="cpu", rows=("+chunked-ce",)))
    assert report["rows"][0]["spec"]["parent"] == "+fused-adamw"
    # Activations dominate this shape: the step's peak is well above what stays resident.
    row = report["rows"][0]
    assert row["peak_mem_mib"] > 2 * row["static_mem_mib"]


def test_allocation_high_water_follows_allocations_and_frees() -> None:
    def work() -> None:
        a = torch.empty(2**21, dtype=torch.float32)  # 8 MiB
        a.fill_(1)
        del a
        b = torch.empty(2**20, dtype=torch.float32)  # 4 MiB, after the 8 MiB are freed
        b.fill_(1)

    high = cpu_allocation_high_water(work)
    assert 8 * 2**20 <= high < 11 * 2**20


def test_gpu_check_dry_run(tmp_path: Path) -> None:
    proc = subprocess.run([str(REPO / "tools" / "gpu_check.sh"), "--dry", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout.rsplit("setting", 1)[-1]  # the final, merged table
    for row in ("hf", "plain", "+chunked-ce", "+compile"):
        assert f"debug T=32 B=2  {row} " in table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.json", "main_job.json",
                                                           "small.json"]
    assert "main job: completed, 3 steps" in proc.stdout and ", 3 samples" in proc.stdout


def test_presets_load_for_the_gpu_check() -> None:
    assert load_model_config("1b").dim == 2048 and load_model_config("125m").n_layers == 12


@pytest.mark.gpu
def test_bf16_step_on_cuda_under_flash_attention() -> None:
    """Our attention runs under flash alone (an error if it could not); kept eager so that it
    stays quick (the GPU check benchmarks the compiled model under flash)."""
    cfg = ModelConfig(name="gpu", dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1024,
                      multiple_of=128, max_seq_len=512)
    report = run_bench(BenchSettings(model=cfg, seq_len=512, batch_size=2, warmup=1, steps=2,
                                     device="cuda", sdpa="flash", rows=("plain", "+chunked-ce")))
    for row in report["rows"]:
        assert math.isfinite(row["final_loss"]) and row["tokens_per_s"] > 0
        assert row["peak_mem_mib"] > row["static_mem_mib"] > 0
    assert report["peak_source"].endswith(("data sheet", "assumed"))


def test_kernel_floor_runs_exactly_the_steps_gemms_and_attention(
        capsys: pytest.CaptureFixture[str]) -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    from pretrain.perf.bench import _KernelFloor

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            name = func.overloadpacket.__name__
            self.ops[name] = self.ops.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    cfg = load_model_config("debug")
    settings = BenchSettings(model=cfg, seq_len=32, batch_size=2, device="cpu")
    floor = _KernelFloor("kernels", settings, torch.device("cpu"))
    with Count() as count:
        floor.step()
    # wq wk wv wo w1 w2 w3 per block and the output projection: forward + 2 backward GEMMs.
    assert count.ops["mm"] == 3 * (7 * cfg.n_layers + 1)
    sdpa = {k: v for k, v in count.ops.items() if "attention" in k}
    assert sum(sdpa.values()) == 2 * cfg.n_layers, sdpa  # forward and backward per block
    assert not {"add", "mul", "silu", "rsqrt", "_fused_adamw_"} & count.ops.keys(), count.ops
    assert main([*TINY, "--rows", "kernels,hf,+compile"]) == 0
    printed = capsys.readouterr().out
    assert "kernels only / transformers tokens/s = " in printed


def _family_cfg(arch: str) -> ModelConfig:
    """A tiny model of the family, in the recipe of its transformers baseline."""
    if arch == "encoder":
        return ModelConfig(name="tiny_bert", arch="encoder", dim=64, n_layers=2, n_heads=4,
                           vocab_size=512, ffn_hidden_dim=128, norm="layer", norm_position="post",
                           norm_eps=1e-12, bias=True, mlp="gelu", position="learned",
                           max_seq_len=64, tie_embeddings=True)
    return ModelConfig(name="tiny_t5", arch="encoder_decoder", dim=64, n_layers=2,
                       n_decoder_layers=2, n_heads=4, head_dim=16, vocab_size=512,
                       ffn_hidden_dim=128, norm_eps=1e-6, mlp="gated_gelu", position="relative",
                       scale_attention=False, max_seq_len=64)


@pytest.mark.parametrize("arch", ["encoder", "encoder_decoder"])
def test_family_rows_run_against_their_transformers_model(
        arch: str, capsys: pytest.CaptureFixture[str]) -> None:
    from pretrain.perf.bench import format_table

    rows = ("hf", "plain", "+chunked-ce")
    report = run_bench(BenchSettings(model=_family_cfg(arch), seq_len=32, batch_size=2,
                                     warmup=1, steps=1, device="cpu", rows=rows))
    assert report["arch"] == arch and not report["skipped"]
    assert [r["row"] for r in report["rows"]] == list(rows)
    # Tokens: the encoder's inputs; an encoder-decoder's inputs plus T5's target length.
    tokens = 2 * (32 + (report["decoder_len"] or 0))
    assert report["decoder_len"] == (None if arch == "encoder" else 8)
    for r in report["rows"]:
        assert math.isfinite(r["final_loss"]) and 0 < r["mfu"] < 2
        assert r["tokens_per_s"] == pytest.approx(tokens / r["step_s"])
        assert r["peak_mem_mib"] > r["static_mem_mib"] > 0
    hf_class = "BertForMaskedLM" if arch == "encoder" else "T5ForConditionalGeneration"
    assert hf_class in report["rows"][0]["what"]
    table = format_table([report])
    assert "ours (+chunked-ce) / transformers tokens/s" in table
    assert ("5 of 32 positions" if arch == "encoder" else "(32 + 8 per sequence") in table


def test_family_settings() -> None:
    from pretrain.perf.bench import check_settings, default_rows, span_target_length

    assert span_target_length(512) == 114  # T5: 568 raw tokens -> 512 inputs, 114 targets
    assert "kernels" not in default_rows("encoder") and "kernels" in default_rows("decoder")
    with pytest.raises(ValueError, match="kernels row models a decoder"):
        check_settings(BenchSettings(model=_family_cfg("encoder"), rows=("kernels", "hf")))
    with pytest.raises(ValueError, match="decoder_len"):
        check_settings(BenchSettings(model=_family_cfg("encoder"), decoder_len=16))
    # A block recipe transformers' class lacks skips the hf row, with the reason.
    report = run_bench(BenchSettings(model=replace(_family_cfg("encoder"), mlp="swiglu"),
                                     seq_len=16, batch_size=1, warmup=0, steps=1, device="cpu",
                                     rows=("hf", "+chunked-ce"), memory=False))
    assert [r["row"] for r in report["rows"]] == ["+chunked-ce"]
    assert "model.mlp" in report["skipped"]["hf"]


def test_cli_runs_a_preset_of_another_family(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", "cpu_t5", "--seq-len", "32", "--batch-size", "2", "--device", "cpu",
                 "--warmup", "0", "--steps", "1", "--rows", "hf,+chunked-ce", "--no-memory",
                 "--decoder-len", "12"]) == 0
    printed = capsys.readouterr().out
    assert "cpu_t5" in printed and "(32 + 12 per sequence" in printed
    assert "ours (+chunked-ce) / transformers tokens/s" in printed
