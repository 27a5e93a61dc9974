"""Batched generation: left padding (positions, masks) through the KV cache, per-row stops,
seeded sampling per prompt, equality with one-by-one `generate`, and `pretrain-generate
--prompts-file`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.data.tokenizer import Tokenizer, train_tokenizer
from pretrain.eval.generate import (
    generate,
    generate_batch,
    generate_many,
    prefill,
    read_prompts,
    sample_logits,
    time_batch_sizes,
)
from pretrain.models.llama import KVCache, Transformer, build_model
from tests.unit.test_generate_families import TEXTS, _checkpoint, decoder_config
from tools.generate import main as generate_main

MAX_LEN = 48
LENGTHS = (1, 5, 12, 3, 20, 7, 30, 2)  # the 30-token prompt reaches max_seq_len first


@pytest.fixture(scope="module")
def model() -> Transformer:
    cfg = ModelConfig(name="tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64,
                      multiple_of=16, max_seq_len=MAX_LEN)
    torch.manual_seed(0)
    return build_model(cfg, device="cpu").eval()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(4, 64, (n,), generator=g).tolist() for n in LENGTHS]


def one_by_one(model: Transformer, prompts: list[list[int]], **kwargs: object) -> list[list[int]]:
    return [generate(model, p, **kwargs) for p in prompts]


def test_greedy_equals_one_by_one_at_every_batch_size(model: Transformer,
                                                      prompts: list[list[int]]) -> None:
    ref = one_by_one(model, prompts, max_new_tokens=25, temperature=0)
    assert [len(r) for r in ref] == [25] * 6 + [MAX_LEN - 30, 25]  # one row stops at max_len
    assert all(len(set(r)) > 1 for r in ref)  # a model that repeats one token proves little
    for batch_size in range(1, len(prompts) + 1):
        assert generate_many(model, prompts, batch_size=batch_size, max_new_tokens=25,
                             temperature=0) == ref, batch_size
    assert generate_batch(model, prompts, max_new_tokens=25, temperature=0) == ref


def test_rows_stop_at_eos_and_the_batch_runs_on(model: Transformer,
                                                prompts: list[list[int]]) -> None:
    free = one_by_one(model, prompts, max_new_tokens=25, temperature=0)
    # A token that one row emits early but several rows never emit: they run to the end.
    counts = {t: sum(t in r for r in free) for t in range(64)}
    eos = min((t for r in free for t in r[:4] if 0 < counts[t] < len(prompts) - 1),
              key=lambda t: counts[t])
    ref = one_by_one(model, prompts, max_new_tokens=25, temperature=0, eos_id=eos)
    stopped = [len(r) < len(f) for r, f in zip(ref, free)]
    assert any(stopped) and not all(stopped)
    assert all(eos not in r for r in ref)
    for batch_size in (1, 3, len(prompts)):
        assert generate_many(model, prompts, batch_size=batch_size, max_new_tokens=25,
                             temperature=0, eos_id=eos) == ref
    ref = one_by_one(model, prompts, max_new_tokens=25, temperature=0, stop_ids={eos})
    assert generate_batch(model, prompts, max_new_tokens=25, temperature=0,
                          stop_ids={eos}) == ref


def test_padding_changes_no_row_of_the_first_logits(model: Transformer,
                                                    prompts: list[list[int]]) -> None:
    logits, cache, positions = prefill(model, prompts, max_new_tokens=4)
    P = max(LENGTHS)
    for b, p in enumerate(prompts):
        alone = model(torch.tensor([p]))[0, -1]  # unpadded, no cache
        torch.testing.assert_close(logits[b], alone, atol=1e-5, rtol=0)
        pad = P - len(p)
        assert positions[b].tolist() == [0] * pad + list(range(len(p)))
        assert cache.key_mask[b].tolist() == [False] * pad + [True] * (len(p) + 4)
    # Padded keys are never attended: other padding ids change no logit by a single bit.
    assert torch.equal(prefill(model, prompts, max_new_tokens=4, pad_id=63)[0], logits)


def test_cache_mask_hides_padding_from_every_query() -> None:
    cache = KVCache(n_layers=1, batch_size=2, n_kv_heads=1, head_dim=2, max_len=6)
    cache.key_mask = torch.tensor([[True] * 6, [False, False] + [True] * 4])
    prefill_mask = cache.attn_mask(4, torch.device("cpu"))  # (B, 1, 4, 4)
    causal = torch.ones(4, 4).tril().bool()
    assert torch.equal(prefill_mask[0, 0], causal)
    # Row 1: real queries see only real keys; a padding query sees itself (no empty row).
    assert prefill_mask[1, 0].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0],
                                                 [0, 0, 1, 0], [0, 0, 1, 1]]
    cache.advance(4)
    step_mask = cache.attn_mask(1, torch.device("cpu"))  # (B, 1, 1, 5)
    assert step_mask[:, 0, 0].int().tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    cache.keep_rows(torch.tensor([1]))
    assert cache.k[0].shape[0] == 1
    assert torch.equal(cache.attn_mask(1, torch.device("cpu")), step_mask[1:])


def test_seeded_sampling_is_per_prompt(model: Transformer, prompts: list[list[int]]) -> None:
    sampling = dict(max_new_tokens=20, temperature=0.9, top_k=20, top_p=0.9)
    ref = [generate(model, p, generator=torch.Generator().manual_seed(7 + i), **sampling)
           for i, p in enumerate(prompts)]
    greedy = one_by_one(model, prompts, max_new_tokens=20, temperature=0)
    assert ref != greedy
    for batch_size in (1, 3, len(prompts)):
        assert generate_many(model, prompts, batch_size=batch_size, seed=7, **sampling) == ref
    assert generate_many(model, prompts, batch_size=4, seed=8, **sampling) != ref


def test_bad_prompts_are_refused(model: Transformer) -> None:
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_batch(model, [[3], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 0 has 48 tokens.*max_seq_len"):
        generate_many(model, [list(range(48)), [3]], batch_size=1, max_new_tokens=2)
    with pytest.raises(ValueError, match="batch_size=0"):
        generate_many(model, [[3]], batch_size=0, max_new_tokens=2)
    with pytest.raises(ValueError, match="1 generators for 2 rows"):
        sample_logits(torch.zeros(2, 4), generator=[torch.Generator()])


def test_timing_counts_the_same_tokens(model: Transformer, prompts: list[list[int]]) -> None:
    timings, same = time_batch_sizes(model, prompts, [1, 4], repeats=1, max_new_tokens=5,
                                     temperature=0)
    assert same and [t.batch_size for t in timings] == [1, 4]
    assert timings[0].new_tokens == timings[1].new_tokens == 5 * len(prompts)
    assert all(t.seconds > 0 and t.tokens_per_s > 0 for t in timings)


# -- files and the command line ----------------------------------------------------------------


def test_prompt_files(tmp_path: Path) -> None:
    text = tmp_path / "p.txt"
    text.write_text("def \n\n  x = 1\r\nimport os\n")
    assert read_prompts(text) == [{"prompt": "def "}, {"prompt": "  x = 1"},
                                  {"prompt": "import os"}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a\\nb", "id": 7}\n\n{"prompt": "c"}\n')
    assert read_prompts(jsonl) == [{"prompt": "a\nb", "id": 7}, {"prompt": "c"}]
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    for name, says in (("missing.txt", "does not exist"), ("empty.txt", "holds no prompt"),
                       ("bad.jsonl", 'bad.jsonl:2 has no "prompt"'),
                       ("latin1.txt", "is not UTF-8")):
        with pytest.raises(ValueError, match=says):
            read_prompts(tmp_path / name)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tiny.model"
    return Tokenizer.load(train_tokenizer(TEXTS * 50, str(path), vocab_size=420))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("runs") / "dec",
                       decoder_config(tokenizer.vocab_size), tokenizer, "clm")


PROMPTS = ["def ", "The cat sat on the mat. The", "x", "return x + y"]


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = generate_main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_prompts_file_equals_one_prompt_at_a_time(run: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    greedy = ("--max-new-tokens", "6", "--temperature", "0")
    rc, out, err = _cli(capsys, str(run), "--prompts-file", str(path), "--batch-size", "3",
                        *greedy)
    assert rc == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in records] == PROMPTS
    for r in records:
        rc, single, _ = _cli(capsys, str(run), "--prompt", r["prompt"], *greedy)
        assert rc == 0 and single == f"--- {r['prompt']!r}\n{r['prompt']}{r['completion']}\n"
        assert r["finish_reason"] in ("stop", "length") and 0 <= r["new_tokens"] <= 6
    # JSONL in, --out file, other fields kept, sampling seeded per prompt.
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n"
                             for i, p in enumerate(PROMPTS)))
    outs = []
    for batch_size in ("1", "4"):
        target = tmp_path / f"out{batch_size}.jsonl"
        rc, out, _ = _cli(capsys, str(run), "--prompts-file", str(jsonl), "--batch-size",
                          batch_size, "--out", str(target), "--top-k", "20", "--seed", "5")
        assert rc == 0 and out == ""
        outs.append([json.loads(line) for line in target.read_text().splitlines()])
    assert outs[0] == outs[1] and [r["id"] for r in outs[0]] == list(range(len(PROMPTS)))


def test_cli_benchmark_prints_the_table(run: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS * 2) + "\n")
    rc, out, err = _cli(capsys, str(run), "--prompts-file", str(path), "--batch-size", "4",
                        "--benchmark", "--max-new-tokens", "3", "--temperature", "0")
    assert rc == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| ") and "batch" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "4"]
    assert rows[0].endswith("| 1.00x |") and "same completions at every batch size: yes" in out


def test_cli_refuses_bad_prompt_files_and_flags(run: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    ok = tmp_path / "ok.txt"
    ok.write_text("def \n")
    cases = ((["--prompts-file", str(tmp_path / "nope.txt")], "does not exist"),
             (["--prompts-file", str(empty)], "holds no prompt"),
             (["--prompts-file", str(ok), "--prompt", "x"], "drop --prompt"),
             (["--prompts-file", str(ok), "--no-cache"], "--no-cache"),
             (["--prompts-file", str(ok), "--batch-size", "0"], "--batch-size 0"),
             (["--prompts-file", str(ok), "--out", str(tmp_path / "no" / "o.jsonl")],
              "does not exist"),
             (["--batch-size", "4", "--benchmark"], "--batch-size --benchmark go with"))
    for argv, says in cases:
        rc, out, err = _cli(capsys, str(run), *argv)
        assert rc == 2 and out == "" and err.count("\n") == 1 and says in err, (argv, err)
