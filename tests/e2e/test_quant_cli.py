"""The quantization commands as a user runs them: a QAT training run writes its converted
model, `pretrain-quantize` quantizes a checkpoint and measures it, `pretrain-generate` loads
both; bad input is one error line."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import console_script, refusal_line, run_train, train_env


def run(cache_dir: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([console_script(name), *args], env=train_env(cache_dir),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def qat_run(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quant")
    run_train(cache_dir, out, "qat", "steps=6", "eval_every=0", "ckpt_every=0",
              "quant.qat=int8_dynamic_act_int4_weight")
    return out / "qat"


def val_loss(proc: subprocess.CompletedProcess) -> float:
    assert proc.returncode == 0, proc.stderr
    return float(re.search(r"^val/loss (\S+)", proc.stdout, re.M).group(1))


def test_qat_run_writes_a_model_that_generates(cache_dir: Path, qat_run: Path) -> None:
    meta = json.loads((qat_run / "quantized" / "quant.json").read_text())
    assert meta["scheme"] == "int8_dynamic_act_int4_weight" and meta["qat"]
    assert len(meta["quantized"]) == 14  # 2 layers x 7 block linears; not `output`
    proc = run(cache_dir, "pretrain-generate", str(qat_run / "quantized"), "--prompt", "def ",
               "--max-new-tokens", "8", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("--- 'def '\ndef "), proc.stdout
    # The converted model computes what the run trained (fake-quantized, fp32 here); measured
    # difference from the run's own final validation loss: 0.1%.
    summary = json.loads((qat_run / "summary.json").read_text())
    loss = val_loss(run(cache_dir, "pretrain-quantize", str(qat_run / "quantized"), "--eval"))
    assert math.isclose(loss, summary["final_val_loss"], rel_tol=0.01), (loss, summary)


# int4 with --include-output: the output projection too (15 linears).
@pytest.mark.parametrize(("scheme", "extra"), [("int8_weight_only", ()),
                                               ("int4_weight_only", ("--include-output",))])
def test_ptq_writes_evaluates_and_generates(cache_dir: Path, qat_run: Path, tmp_path: Path,
                                            scheme: str, extra: tuple[str, ...]) -> None:
    out = tmp_path / scheme
    proc = run(cache_dir, "pretrain-quantize", str(qat_run), "--scheme", scheme,
               "--out", str(out), "--eval", *extra)
    n = 14 + len(extra)
    assert f"wrote {out} ({scheme}, {n} linears quantized" in proc.stdout, proc.stderr
    assert ("output" in json.loads((out / "quant.json").read_text())["quantized"]) == bool(extra)
    assert math.isfinite(val_loss(proc))
    assert (out / "model.pt").is_file() and not out.with_name(scheme + ".tmp").exists()
    proc = run(cache_dir, "pretrain-generate", str(out), "--prompt", "def ",
               "--max-new-tokens", "4", "--temperature", "0")
    assert proc.returncode == 0 and proc.stdout.startswith("--- 'def '"), proc.stderr


def test_bad_input_is_one_error_line(cache_dir: Path, qat_run: Path, tmp_path: Path) -> None:
    proc = run(cache_dir, "pretrain-quantize", str(qat_run), "--scheme", "int3",
               "--out", str(tmp_path / "x"))
    assert "error: --scheme 'int3'; use one of int8_weight_only" in refusal_line(proc)
    assert not (tmp_path / "x").exists()
    proc = run(cache_dir, "pretrain-quantize", str(qat_run), "--scheme", "int4_weight_only",
               "--group-size", "256", "--out", str(tmp_path / "x"))
    assert "--group-size 256 with int4_weight_only; use 32, 64 or 128" in refusal_line(proc)
    proc = run(cache_dir, "pretrain-quantize", str(tmp_path / "missing"), "--scheme",
               "int8_weight_only", "--out", str(tmp_path / "y"))
    assert f"error: no complete checkpoint under {tmp_path / 'missing'}" in refusal_line(proc)
    proc = run_train(cache_dir, tmp_path, "fp8", "precision=fp8", check=False)
    assert "precision=fp8 needs a CUDA GPU" in refusal_line(proc)
    assert not (tmp_path / "fp8" / "checkpoints").exists()
