"""Downstream scoring (pretrain.eval.downstream, pretrain.eval.tasks): log-likelihoods against a
direct computation, acc/acc_norm on known log-probs, left truncation, batching, the tasks'
lm-eval framing, and the errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import ModelConfig
from pretrain.errors import DataError
from pretrain.eval.downstream import (
    encode_pair,
    evaluate_tasks,
    loglikelihoods,
    model_forward,
    shared_loglikelihoods,
    task_metrics,
)
from pretrain.eval.tasks import Item, load_task, parse_tasks
from pretrain.models.build import build_model

VOCAB = 16


def table_forward(table: torch.Tensor):
    """A 'model' whose next-token log-probs depend only on the current token: (V, V) table."""
    def forward(tokens: torch.Tensor) -> torch.Tensor:
        return table[tokens]  # (B, T, V)
    return forward


@pytest.fixture(scope="module")
def table() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return F.log_softmax(torch.randn(VOCAB, VOCAB, generator=g, dtype=torch.float64), dim=-1)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    cfg = ModelConfig(name="tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64,
                      multiple_of=16, max_seq_len=64)
    torch.manual_seed(0)
    return build_model(cfg, device="cpu").eval()


def test_loglikelihood_is_the_sum_of_the_continuations_log_probs(table: torch.Tensor) -> None:
    ctx, cont = [1, 2, 3], [4, 5]
    [s] = loglikelihoods(table_forward(table), [(ctx, cont)], max_len=32, batch_size=4)
    expected = float(table[3, 4] + table[4, 5])
    assert s.loglik == pytest.approx(expected, abs=1e-6)
    assert s.greedy == (int(table[3].argmax()) == 4 and int(table[4].argmax()) == 5)
    greedy_cont = [int(table[3].argmax())]
    [g] = loglikelihoods(table_forward(table), [(ctx, greedy_cont)], max_len=32, batch_size=1)
    assert g.greedy


def test_acc_and_acc_norm_on_known_log_probs() -> None:
    """Choice 0 ('a', 1 char) has the highest sum; divided by length choice 1 ('bbbbbbbb',
    8 chars) wins: acc picks 0, acc_norm picks 1, as lm-eval's multiple_choice does."""
    choices = ["a", "bbbbbbbb", "cc"]
    logps = [-2.0, -8.0, -6.0]  # per-char: -2, -1, -3
    # A table forward: context token 0; choice i is the single token i+1 with log-prob logps[i].
    table = torch.full((4, 4), -50.0, dtype=torch.float64)
    for i, lp in enumerate(logps):
        table[0, i + 1] = lp
    item_gold1 = Item([("", c) for c in choices], 1, choices)
    item_gold0 = Item([("", c) for c in choices], 0, choices)

    class Tok:  # encode_pair's needs: prefix token 0, each choice one token
        eos_id, pad_id = 0, 0

        def encode(self, text: str) -> list[int]:
            return [] if not text else [1 + choices.index(text.strip())]

    res = evaluate_tasks(table_forward(table), Tok(), {"hellaswag": [item_gold1, item_gold0]},
                         max_len=8, batch_size=2)["hellaswag"]
    assert res["acc"][0] == 0.5  # item_gold0 right, item_gold1 wrong
    assert res["acc_norm"][0] == 0.5  # item_gold1 right, item_gold0 wrong
    assert res["acc"][1] == pytest.approx(math.sqrt(0.25 / 1))  # lm-eval's mean_stderr


def test_task_metrics_perplexity_and_stderr() -> None:
    m = task_metrics("lambada", [4.0, 1.0, -8.0])
    assert m["acc"][0] == 0.25
    assert m["acc"][1] == pytest.approx(math.sqrt(0.25 * 0.75 / 3))
    assert m["perplexity"][0] == pytest.approx(math.exp(2.0))
    assert "acc_norm" not in task_metrics("winogrande", [2.0, 1.0, 1.0])


def test_long_context_is_truncated_from_the_left(model: torch.nn.Module) -> None:
    ctx, cont = list(range(1, 40)), [7, 9, 11]
    seen: list[int] = []

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        seen.append(tokens.shape[1])
        return model(tokens)

    [s] = loglikelihoods(forward, [(ctx, cont)], max_len=16, batch_size=1)
    assert seen == [16]
    window = (ctx + cont)[-17:-1]  # the last 16 inputs: the context's head is dropped
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([window])).double(), dim=-1)[0]
    direct = sum(float(logp[16 - 3 + j, t]) for j, t in enumerate(cont))
    assert s.loglik == pytest.approx(direct, abs=1e-5)
    with pytest.raises(ValueError, match="does not fit the window"):
        loglikelihoods(forward, [(ctx, list(range(20)))], max_len=16, batch_size=1)


def test_batched_equals_unbatched(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    pairs = []
    for n_ctx, n_cont in [(3, 1), (12, 4), (7, 2), (30, 5), (1, 3), (20, 1), (9, 9)]:
        ids = torch.randint(1, 64, (n_ctx + n_cont,), generator=g).tolist()
        pairs.append((ids[:n_ctx], ids[n_ctx:]))
    one = loglikelihoods(model_forward(model), pairs, max_len=24, batch_size=1)
    many = loglikelihoods(model_forward(model), pairs, max_len=24, batch_size=5)
    for a, b in zip(one, many):
        assert a.loglik == pytest.approx(b.loglik, abs=1e-6)
        assert a.greedy == b.greedy
    assert len({round(s.loglik, 3) for s in one}) == len(pairs)  # distinct: order is checked


def test_shared_context_equals_per_pair(model: torch.nn.Module) -> None:
    """One packed row per context (continuations masked from each other, positions restarting
    after the context) gives each pair's own log-likelihood, with contexts and choices of
    different lengths (a one-token choice too) and padding rows in a batch."""
    g = torch.Generator().manual_seed(2)
    groups = []
    for n_ctx, n_conts in [(5, [3, 1, 6, 2]), (17, [4, 4, 2, 7]), (1, [2, 5]), (11, [1, 1, 9]),
                           (8, [6, 3, 3, 1])]:
        ctx = torch.randint(1, 64, (n_ctx,), generator=g).tolist()
        groups.append([(ctx, torch.randint(1, 64, (n,), generator=g).tolist())
                       for n in n_conts])
    pairs = [p for grp in groups for p in grp]
    direct = loglikelihoods(model_forward(model), pairs, max_len=24, batch_size=1)
    for batch_size in (1, 6, 64):
        shared = [s for grp in shared_loglikelihoods(model_forward(model), groups,
                                                     batch_size=batch_size) for s in grp]
        for a, b in zip(direct, shared, strict=True):
            assert b.loglik == pytest.approx(a.loglik, abs=1e-5)
            assert a.greedy == b.greedy
    assert len({round(s.loglik, 3) for s in direct}) == len(pairs)  # distinct: order is checked
    # a greedy continuation is recognized through the shared row: the model's own argmax
    ctx = groups[0][0][0]
    with torch.no_grad():
        best = int(model(torch.tensor([ctx]))[0, -1].argmax())
    [[s, _]] = shared_loglikelihoods(model_forward(model), [[(ctx, [best]), (ctx, [best, 1])]],
                                     batch_size=8)
    assert s.greedy


def test_evaluate_tasks_shared_context_equals_per_pair(model: torch.nn.Module) -> None:
    """Multiple-choice items through the packed path, a context too long for the window and
    winogrande's per-choice contexts through the per-pair path: the same metrics."""
    class Tok:  # one token per character (ids 1..63)
        eos_id, pad_id = 0, 0

        def encode(self, text: str) -> list[int]:
            return [1 + ord(c) % 63 for c in text]

    g = torch.Generator().manual_seed(3)

    def text(n: int) -> str:
        return "".join(chr(97 + int(i)) for i in torch.randint(0, 26, (n,), generator=g))

    mc = [Item([(text(n), " " + text(m)) for m in (3, 7, 1, 5)], k % 4, [text(2)] * 4)
          for k, n in enumerate([4, 9, 15, 30, 6, 12])]
    mc = [Item([(it.requests[0][0], c) for _, c in it.requests], it.gold,
               [c for _, c in it.requests]) for it in mc]  # one context per item
    wino = [Item([(text(5), " " + text(4)), (text(6), " " + text(4))], 1, ["a", "b"])]
    tasks = {"hellaswag": mc, "winogrande": wino}
    per_pair = evaluate_tasks(model_forward(model), Tok(), tasks, max_len=24, batch_size=5)
    calls: list[bool] = []

    def forward(tokens: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        calls.append("attn_mask" in kwargs)
        return model(tokens, **kwargs)

    shared = evaluate_tasks(forward, Tok(), tasks, max_len=24, batch_size=5, shared_context=True)
    assert True in calls and False in calls  # both paths ran
    for task, metrics in per_pair.items():
        for name, (value, _) in metrics.items():
            assert shared[task][name][0] == pytest.approx(value, abs=1e-9)


def test_encode_pair_moves_trailing_spaces_and_splits_the_whole_text() -> None:
    class Tok:  # one token per character: the split point is exactly visible
        eos_id, pad_id = 0, 0

        def encode(self, text: str) -> list[int]:
            return [ord(c) for c in text]

    ctx, cont = encode_pair(Tok(), "Question: x\nAnswer: ", "yes")
    assert ctx == [0, *map(ord, "Question: x\nAnswer:")]
    assert cont == list(map(ord, " yes"))
    assert encode_pair(Tok(), "", "hi") == ([0], [ord("h"), ord("i")])


# -- tasks ------------------------------------------------------------------------------------

RECORDS = {
    "hellaswag": {"activity_label": "Baking cookies", "ctx_a": "A woman [title] mixes flour.",
                  "ctx_b": "she", "endings": ["adds sugar [step].", "eats it", "runs", "sleeps"],
                  "label": "0"},
    "arc_easy": {"question": "What is 2+2?", "choices": {"text": ["3", "4"], "label": ["A", "B"]},
                 "answerKey": "B"},
    "piqa": {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "kick it", "label": 0},
    "winogrande": {"sentence": "The cup fell because _ was slippery.", "option1": "the cup",
                   "option2": "the table", "answer": "2"},
    "lambada": {"text": "he opened the door and saw his dog"},
}


def _write(root: Path, task: str, records: list, split: str) -> Path:
    path = root / task / f"{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return path


def test_tasks_frame_the_requests_as_lm_eval(tmp_path: Path) -> None:
    splits = {"hellaswag": "validation", "arc_easy": "test", "piqa": "validation",
              "winogrande": "validation", "lambada": "test"}
    for task, record in RECORDS.items():
        _write(tmp_path, task, [record], splits[task])
    [h] = load_task("hellaswag", tmp_path)
    assert h.requests[0] == ("Baking cookies: A woman. mixes flour. She", " adds sugar .")
    assert h.gold == 0 and h.choices[1] == "eats it"
    [a] = load_task("arc_easy", tmp_path)
    assert a.requests == [("Question: What is 2+2?\nAnswer:", " 3"),
                          ("Question: What is 2+2?\nAnswer:", " 4")] and a.gold == 1
    [p] = load_task("piqa", tmp_path)
    assert p.requests[1] == ("Question: Open a jar\nAnswer:", " kick it") and p.gold == 0
    [w] = load_task("winogrande", tmp_path)
    assert w.requests == [("The cup fell because the cup", " was slippery."),
                          ("The cup fell because the table", " was slippery.")] and w.gold == 1
    [lam] = load_task("lambada", tmp_path)
    assert lam.requests == [("he opened the door and saw his", " dog")]


def test_parquet_in_the_hubs_shard_names(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "arc_challenge").mkdir()
    pq.write_table(pa.Table.from_pylist([RECORDS["arc_easy"]] * 3),
                   tmp_path / "arc_challenge" / "test-00000-of-00001.parquet")
    items = load_task("arc_challenge", tmp_path, limit=2)
    assert len(items) == 2 and items[0].gold == 1


def test_errors_name_the_task_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown task 'hellaswag2'.*known tasks: hellaswag"):
        parse_tasks("hellaswag2,piqa")
    with pytest.raises(DataError, match=r"piqa/validation\.jsonl"):
        load_task("piqa", tmp_path)
    bad = dict(RECORDS["piqa"])
    del bad["sol2"]
    path = _write(tmp_path, "piqa", [RECORDS["piqa"], bad], "validation")
    with pytest.raises(DataError, match=rf"{path}:2: malformed piqa record: no field 'sol2'"):
        load_task("piqa", tmp_path)
    path = _write(tmp_path, "piqa", [RECORDS["piqa"], "{not json"], "validation")
    with pytest.raises(DataError, match=rf"{path}:2: not a JSON object"):
        load_task("piqa", tmp_path)
    arc = dict(RECORDS["arc_easy"], answerKey="E")
    path = _write(tmp_path, "arc_easy", [arc], "test")
    with pytest.raises(DataError, match=rf"{path}:1: .*answerKey 'E'"):
        load_task("arc_easy", tmp_path)
