"""Exports that check themselves: `pretrain-export-hf` (its main) loads what it wrote with
transformers and compares logits with ours on a fixed batch. Every family passes and prints
the figure; an export corrupted on its way out (two weight matrices swapped, a wrong
rope_theta in config.json, a peft adapter with the wrong scale) fails with exit 1, one error
line and the directory renamed `.unverified`; `--no-verify` skips the check."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pretrain.interop.hf as hf_module  # noqa: E402
from pretrain.config import LoraConfig, ModelConfig  # noqa: E402
from pretrain.interop.peft import export_peft_adapter  # noqa: E402
from pretrain.interop.verify import (  # noqa: E402
    MARKER,
    RTOL,
    ExportMismatch,
    fixed_batch,
    verify_adapter,
)
from pretrain.models.lora import apply_lora, is_lora_name  # noqa: E402
from tests.unit.test_hf_families import ALL, randomized  # noqa: E402
from tools.export_hf import main as export_main  # noqa: E402

DECODER = ModelConfig(name="dec", dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_hidden_dim=96, vocab_size=120, max_seq_len=64, rope_theta=10_000.0)
FAMILIES = {"llama": DECODER, "bert": ALL["bert"], "modernbert": ALL["modernbert"],
            "t5": ALL["v1_1_untied_gated"]}
VERIFIED = re.compile(r"verified: transformers' logits match ours to (\S+) \(tolerance (\S+), "
                      r"(\d+) tokens, fp32\)")


def consolidated(cfg: ModelConfig, tmp_path: Path) -> Path:
    """What `pretrain-consolidate` writes, for a model far from init (no tokenizer)."""
    state = {"config": {"model": dataclasses.asdict(cfg)}, "counters": {"step": 3}}
    path = tmp_path / "model.pt"
    torch.save({"model": randomized(cfg).state_dict(), "state": state}, path)
    return path


def swap_two_layer_weights(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the export swap the first two same-shaped, different block matrices (a mapping
    bug); returns their HF names once it ran."""
    swapped: list[str] = []
    real = hf_module.to_hf_state_dict

    def corrupt(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict:
        out = real(state_dict, cfg)
        names = [k for k, v in out.items() if v.ndim == 2 and re.search(r"\.(layers?|block)\.", k)]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if out[a].shape == out[b].shape and not torch.equal(out[a], out[b]):
                    out[a], out[b] = out[b], out[a]
                    swapped.extend([a, b])
                    return out
        raise AssertionError("no two matrices to swap")

    monkeypatch.setattr(hf_module, "to_hf_state_dict", corrupt)
    return swapped


def assert_failed(capsys: pytest.CaptureFixture[str], out: Path) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("error: export check failed: "), line
    assert "transformers' logits differ from ours by " in line and "at row " in line, line
    assert re.search(rf"tolerance \S+ = {RTOL:g} x max\(1, max \|logit\| \S+\)", line), line
    assert "Traceback" not in err
    assert not out.exists()
    moved = out.with_name(out.name + ".unverified")
    assert (moved / "config.json").is_file()
    assert (moved / MARKER).read_text().strip() in line
    return line


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_is_verified_and_the_figure_printed(family: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    cfg = FAMILIES[family]
    assert export_main([str(consolidated(cfg, tmp_path)), str(tmp_path / "hf")]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # no progress bars, no transformers notices: the verdict is on stdout
    found = VERIFIED.search(out)
    assert found, out
    diff, tolerance, n = float(found[1]), float(found[2]), int(found[3])
    assert diff <= 1e-5 and tolerance >= RTOL
    batch = fixed_batch(cfg)
    # the encoder compares only real tokens (a third of row 2 is padding); T5 its decoder's
    expected = int(batch.mask.sum()) if cfg.arch == "encoder" else batch.tokens.numel()
    assert n == expected
    assert (cfg.arch == "decoder") == bool(batch.mask.all())
    assert (tmp_path / "hf" / "config.json").is_file()
    assert not (tmp_path / "hf" / MARKER).exists()


def test_a_bf16_export_is_checked_against_our_weights_rounded_to_bf16(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = consolidated(DECODER, tmp_path)
    assert export_main([str(path), str(tmp_path / "hf"), "--dtype", "bf16"]) == 0
    found = VERIFIED.search(capsys.readouterr().out)
    assert found and float(found[1]) <= 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_swapped_weights_fail_with_one_line_and_the_directory_renamed(
        family: str, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = consolidated(FAMILIES[family], tmp_path)
    swapped = swap_two_layer_weights(monkeypatch)
    assert export_main([str(path), str(tmp_path / "hf")]) == 1
    assert len(swapped) == 2
    line = assert_failed(capsys, tmp_path / "hf")
    worst = float(re.search(r"differ from ours by (\S+) ", line)[1])
    tolerance = float(re.search(r"tolerance (\S+) =", line)[1])
    assert worst > 10 * tolerance, line


def test_a_wrong_rope_theta_in_config_json_fails(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = consolidated(DECODER, tmp_path)
    real = hf_module._rope_kwargs
    monkeypatch.setattr(hf_module, "_rope_kwargs",
                        lambda cfg: real(dataclasses.replace(cfg, rope_theta=500_000.0)))
    assert export_main([str(path), str(tmp_path / "hf")]) == 1
    line = assert_failed(capsys, tmp_path / "hf")
    saved = json.loads((tmp_path / "hf.unverified" / "config.json").read_text())
    assert saved.get("rope_theta", saved.get("rope_parameters", {}).get("rope_theta")) == 5e5
    # position 0 has no rotation: the difference is elsewhere
    assert not re.search(r"position 0 ", line), line


def test_a_second_failure_replaces_the_earlier_unverified_directory(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    path = consolidated(DECODER, tmp_path)
    (tmp_path / "hf.unverified").mkdir()
    (tmp_path / "hf.unverified" / "stale").write_text("x")
    swap_two_layer_weights(monkeypatch)
    assert export_main([str(path), str(tmp_path / "hf")]) == 1
    assert_failed(capsys, tmp_path / "hf")
    assert not (tmp_path / "hf.unverified" / "stale").exists()


def test_no_verify_skips_the_check(tmp_path: Path, capsys: pytest.CaptureFixture,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Even a corrupted export passes unchecked: the check is what catches it."""
    path = consolidated(DECODER, tmp_path)
    swap_two_layer_weights(monkeypatch)
    assert export_main([str(path), str(tmp_path / "hf"), "--no-verify"]) == 0
    captured = capsys.readouterr()
    assert "not verified (--no-verify)" in captured.out and captured.err == ""
    assert (tmp_path / "hf" / "config.json").is_file()
    assert not (tmp_path / "hf.unverified").exists()


def lora_decoder() -> tuple[torch.nn.Module, LoraConfig]:
    lora = LoraConfig(rank=4, alpha=8.0, targets=["wq", "wv", "w2"])
    torch.manual_seed(0)
    model = apply_lora(randomized(DECODER), rank=lora.rank, alpha=lora.alpha,
                       dropout=lora.dropout, targets=lora.targets)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_lora_name(name):  # lora_b starts at zero: make the adapters matter
                p.normal_(0.0, 0.1)
    return model.eval(), lora


def test_peft_adapter_is_verified_and_a_wrong_scale_is_caught(tmp_path: Path) -> None:
    model, lora = lora_decoder()
    weights = model.state_dict()
    adapters = {k: v for k, v in weights.items() if is_lora_name(k)}
    base = {k: v for k, v in weights.items() if not is_lora_name(k)}
    export_peft_adapter(adapters, DECODER, lora, tmp_path / "ok", base_model_name_or_path=None)
    verified = verify_adapter(tmp_path / "ok", DECODER, model, base)
    assert verified.max_diff <= 1e-5 and verified.n_tokens == fixed_batch(DECODER).tokens.numel()
    # peft's scale is lora_alpha / r: a doubled alpha in adapter_config.json must be caught
    wrong = dataclasses.replace(lora, alpha=2 * lora.alpha)
    export_peft_adapter(adapters, DECODER, wrong, tmp_path / "bad", base_model_name_or_path=None)
    with pytest.raises(ExportMismatch, match=r"\(peft adapter\): transformers' logits differ "
                       r"from ours by \S+ at row \d, position \d+ \(input id \d+\)"):
        verify_adapter(tmp_path / "bad", DECODER, model, base)
