"""Every pre-training objective end to end through the installed console scripts (issue #12):
masked LM on an encoder, T5 span corruption on an encoder-decoder, fill-in-the-middle on a
decoder. Tiny models, a slice of the built-in corpus, fp32 on CPU; one run per objective is
shared by the tests of this module (metrics, exact resume, refusals, generation, W&B)."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    console_script,
    file_digests,
    read_metrics,
    refusal_line,
    run_train,
    step_losses,
    train_env,
)

STEPS = 12
HALF = STEPS // 2
# Evaluate and checkpoint at HALF and STEPS: the resume test restarts from the HALF checkpoint.
COMMON = (f"steps={STEPS}", f"ckpt_every={HALF}", "ckpt_keep=0", f"eval_every={HALF}",
          "logging.log_every=1", "logging.progress_bar=false")


@dataclass(frozen=True)
class Case:
    arch: str
    overrides: tuple[str, ...]
    metrics: tuple[str, ...]
    """The objective's validation metrics besides val/loss and val/ppl."""


CASES = {
    "mlm": Case("encoder",
                ("objective=mlm", "model=cpu_encoder", "model.dim=64", "model.n_layers=2",
                 "model.n_heads=4", "model.ffn_hidden_dim=128", "model.max_seq_len=64"),
                ("val/mlm_acc",)),
    "span": Case("encoder_decoder",
                 ("objective=span", "model=cpu_t5", "model.dim=64", "model.n_layers=2",
                  "model.n_decoder_layers=2", "model.n_heads=4", "model.head_dim=16",
                  "model.ffn_hidden_dim=128"),
                 ("val/token_acc", "val/span_em")),
    # The test default decoder (TINY's model=debug); this run also logs to W&B offline.
    "fim": Case("decoder",
                ("objective=fim", "objective.eval_infill_docs=4",
                 "objective.eval_infill_max_tokens=8", "logging=wandb",
                 "logging.wandb_mode=offline"),
                ("val/middle_loss", "val/infill_em")),
}


def _overrides(name: str) -> tuple[str, ...]:
    return (*CASES[name].overrides, "model.vocab_size=512", *COMMON)


@pytest.fixture(scope="module")
def trained(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Callable[[str], Path]:
    """The run dir of objective `name`, trained on first use (a failure is kept, not retried)."""
    out = tmp_path_factory.mktemp("objectives")
    done: dict[str, Path | AssertionError] = {}

    def get(name: str) -> Path:
        if name not in done:
            try:
                run_train(cache_dir, out, name, *_overrides(name))
                done[name] = out / name
            except AssertionError as e:
                done[name] = e
        result = done[name]
        if isinstance(result, AssertionError):
            raise result
        return result

    return get


def _val_records(run_dir: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("val/")}
            for r in read_metrics(run_dir) if "val/loss" in r}


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from pretrain.train.consolidate import load_model_for_export

    return load_model_for_export(run_dir)[0]


# -- 1. each objective trains, evaluates and reports --------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_objective_trains_and_reports_its_metrics(trained: Callable[[str], Path],
                                                  name: str) -> None:
    run_dir, case = trained(name), CASES[name]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert summary["objective"] == name and summary["arch"] == case.arch
    expected = {"val/loss", "val/ppl", *case.metrics}
    assert set(summary["final_eval"]) == expected, summary["final_eval"]
    for metric in case.metrics:
        assert 0.0 <= summary["final_eval"][metric] <= 1.0 or metric == "val/middle_loss"
    evals = _val_records(run_dir)
    assert sorted(evals) == [HALF, STEPS], evals
    for step, record in evals.items():
        assert set(record) == expected, (step, record)
    assert evals[STEPS] == summary["final_eval"]
    assert summary["final_val_loss"] == summary["final_eval"]["val/loss"]
    losses = step_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1], losses
    assert summary["final_val_loss"] < losses[1], (summary["final_val_loss"], losses)
    if name == "fim":  # the middle is scored apart from the whole window
        assert summary["final_eval"]["val/middle_loss"] != summary["final_eval"]["val/loss"]


# -- 2. exact resume -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_resume_is_bitwise_exact(cache_dir: Path, trained: Callable[[str], Path], name: str,
                                 tmp_path: Path) -> None:
    """A copy of the run that stopped after its HALF checkpoint, restarted with the same
    command, repeats the uninterrupted run exactly: the corruption of each window (masks, spans,
    FIM splits) comes from the seed and the window's index, not from a generator's state."""
    full = trained(name)
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / f"step_{STEPS:08d}")
    (part / "checkpoints" / "latest.json").unlink()
    (part / "summary.json").unlink()
    kept = [r for r in read_metrics(part) if r["step"] <= HALF]
    (part / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    proc = run_train(cache_dir, tmp_path, "part", *_overrides(name))
    assert "resumed from" in proc.stdout and f"step_{HALF:08d}" in proc.stdout, proc.stdout
    assert step_losses(part) == step_losses(full)  # exact float equality, steps 1..STEPS
    assert _val_records(part) == _val_records(full)
    a, b = _weights(full), _weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- 3. refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "overrides", "needles"),
    [
        # model=cpu is the default decoder preset of conf/train.yaml.
        ("mlm", ("objective=mlm", "model=cpu"),
         ("objective=mlm", "model.arch=encoder", "model=cpu ", "use model=cpu_encoder")),
        ("fim", ("objective=fim", "model=cpu_encoder"),
         ("objective=fim", "model.arch=decoder", "model=cpu_encoder", "use model=cpu")),
        ("span", ("objective=span", "model=cpu_encoder"),
         ("objective=span", "model.arch=encoder_decoder", "use model=cpu_t5")),
    ],
)
def test_objective_and_family_must_match(cache_dir: Path, trained: Callable[[str], Path],
                                         target: str, overrides: tuple[str, ...],
                                         needles: tuple[str, ...]) -> None:
    """Refused before any work: an existing run of that name is byte-identical after, and a new
    name leaves no directory."""
    run_dir = trained(target)
    before = file_digests(run_dir)
    for name in (target, "fresh"):
        proc = run_train(cache_dir, run_dir.parent, name, *COMMON, *overrides, check=False,
                         timeout=120)
        line = refusal_line(proc)
        for needle in needles:
            assert needle in line, line
    assert file_digests(run_dir) == before
    assert not (run_dir.parent / "fresh").exists()


@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SentencePiece model trained with sentencepiece alone: none of our control symbols."""
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("plain-tokenizer")
    text = "".join(Path(m.__file__).read_text() for m in (json, shutil, subprocess))
    (out / "corpus.txt").write_text(text)
    spm.SentencePieceTrainer.train(input=str(out / "corpus.txt"), model_prefix=str(out / "plain"),
                                   vocab_size=512, model_type="bpe", minloglevel=2)
    return out / "plain.model"


@pytest.mark.parametrize(
    ("name", "missing"),
    [("mlm", "(1 missing: <mask>)"), ("span", "(100 missing: <extra_id_0>"),
     ("fim", "(4 missing: <fim_prefix> <fim_middle> <fim_suffix> <fim_pad>)")],
)
def test_a_tokenizer_without_the_special_pieces_is_refused(
    cache_dir: Path, trained: Callable[[str], Path], plain_tokenizer: Path, name: str,
    missing: str,
) -> None:
    """Before any data is prepared with it (the cache is untouched) and before a run dir is
    written; the message names the tokenizer, what it lacks and how to re-train it."""
    run_dir = trained(name)
    before, cache_before = file_digests(run_dir), file_digests(cache_dir)
    for run_name in (name, "fresh"):
        proc = run_train(cache_dir, run_dir.parent, run_name, *_overrides(name),
                         f"data.tokenizer={plain_tokenizer}", check=False, timeout=120)
        line = refusal_line(proc)
        assert str(plain_tokenizer) in line and missing in line, line
        assert "re-train it with `pretrain-train-tokenizer`" in line, line
    assert file_digests(run_dir) == before
    assert file_digests(cache_dir) == cache_before
    assert not (run_dir.parent / "fresh").exists()


def test_a_mixture_with_such_a_tokenizer_is_refused_before_preparing(
    cache_dir: Path, plain_tokenizer: Path, tmp_path: Path,
) -> None:
    cache_before = file_digests(cache_dir)
    proc = run_train(cache_dir, tmp_path, "mix", *_overrides("mlm"),
                     "data.mix={code: {source: builtin, weight: 1}}",
                     f"data.tokenizer={plain_tokenizer}", check=False, timeout=120)
    assert "(1 missing: <mask>)" in refusal_line(proc)
    assert file_digests(cache_dir) == cache_before
    assert not (tmp_path / "mix").exists()


def test_the_named_fix_works(cache_dir: Path, plain_tokenizer: Path, tmp_path: Path) -> None:
    """Next-token prediction needs no special piece and takes the plain tokenizer; a tokenizer
    re-trained as the refusal says is taken by masked LM."""
    run_train(cache_dir, tmp_path, "clm", "model.vocab_size=512", "steps=1", "eval_every=0",
              f"data.tokenizer={plain_tokenizer}")
    retrained = tmp_path / "retrained.model"
    subprocess.run([console_script("pretrain-train-tokenizer"), "--source", "builtin",
                    "--sample-bytes", "200000", "--vocab-size", "512", "--out", str(retrained)],
                   cwd=tmp_path, env=train_env(cache_dir), check=True, capture_output=True,
                   timeout=120)
    run_train(cache_dir, tmp_path, "mlm", *CASES["mlm"].overrides, "model.vocab_size=512",
              "steps=1", "eval_every=0", f"data.tokenizer={retrained}")
    summary = json.loads((tmp_path / "mlm" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["objective"] == "mlm"


# -- 4. generation from each family --------------------------------------------------------------


def _generate(cache_dir: Path, run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([console_script("pretrain-generate"), str(run_dir), *args],
                          cwd=run_dir.parent, env=train_env(cache_dir), capture_output=True,
                          text=True, timeout=120)


def test_generate_fills_masks_with_the_encoder(cache_dir: Path,
                                               trained: Callable[[str], Path]) -> None:
    proc = _generate(cache_dir, trained("mlm"), "--prompt", "def <mask>(x):")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "--- 'def <mask>(x):'", proc.stdout
    assert lines[1].startswith("def ") and lines[1].endswith("(x):"), proc.stdout
    assert "<mask>" not in lines[1], proc.stdout
    assert lines[2].startswith("<mask> 0: ") and len(lines) == 3, proc.stdout
    probs = [float(p) for p in re.findall(r"(?<=\s)(\d\.\d{3})(?=\s\s|$)", lines[2])]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True), proc.stdout
    # Sampling flags mean nothing to an encoder: refused before the weights are read.
    proc = _generate(cache_dir, trained("mlm"), "--prefix", "def f(", "--suffix", "):")
    assert proc.returncode == 2 and "mark what to fill with <mask>" in proc.stderr, proc.stderr


def test_generate_decodes_sentinels_with_t5(cache_dir: Path,
                                            trained: Callable[[str], Path]) -> None:
    prompt = "def <extra_id_0>(x):\n    return <extra_id_1>\n"
    proc = _generate(cache_dir, trained("span"), "--prompt", prompt, "--max-new-tokens", "8",
                     "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    header, _, text = proc.stdout.partition("\n")
    assert header == f"--- {prompt!r}", proc.stdout
    # Every target starts with the first sentinel: even a tiny model learns that first.
    assert text.startswith("<extra_id_0>"), proc.stdout


def test_generate_infills_with_the_fim_decoder(cache_dir: Path,
                                               trained: Callable[[str], Path]) -> None:
    proc = _generate(cache_dir, trained("fim"), "--prefix", "def f(", "--suffix", "):",
                     "--max-new-tokens", "8", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert "note:" not in proc.stderr, proc.stderr  # the run did train objective=fim
    lines = proc.stdout.splitlines()
    assert lines[0] == "--- middle", proc.stdout
    marker = "--- 'def f(' + middle + '):'"
    assert marker in lines, proc.stdout
    whole = "\n".join(lines[lines.index(marker) + 1:])
    middle = "\n".join(lines[1:lines.index(marker)])
    assert whole == f"def f({middle}):", proc.stdout


# -- 5. W&B offline ------------------------------------------------------------------------------


def _wandb_records(path: Path) -> Iterator[object]:
    """The protobuf records of a W&B run file (a LevelDB-style log: 32 KiB blocks of chunks
    with a 7-byte header: CRC32, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:16]
    pos, block, chunks = 7, 32768, []
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # the rest of the block is padding
            pos += left
            continue
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def test_wandb_offline_logs_the_objective_metrics(trained: Callable[[str], Path]) -> None:
    pytest.importorskip("wandb")
    run_dir = trained("fim")
    [path] = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    history: list[dict[str, float]] = []
    summary: dict[str, float] = {}
    for r in _wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in r.history.item})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in r.summary.update})
    evals = _val_records(run_dir)
    logged = {int(h["train/step"]): {k: v for k, v in h.items() if k.startswith("val/")}
              for h in history if "val/loss" in h}
    assert logged == evals, (logged, evals)
    for metric in CASES["fim"].metrics:
        assert summary[f"final/{metric}"] == evals[STEPS][metric], summary
    assert summary["objective"] == "fim"
