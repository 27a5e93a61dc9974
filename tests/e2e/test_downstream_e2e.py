"""Downstream evaluation end to end through the installed console scripts: `pretrain-train` with
`evals.tasks` (in-loop, to the console, metrics.jsonl and summary.json), then `pretrain-eval`
on the finished run giving the in-loop end-of-run numbers, and the one-line refusals."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pretrain.eval.synthetic import write_synthetic
from tests.conftest import console_script, read_metrics, refusal_line, run_train, train_env

TASKS = ["hellaswag", "lambada", "piqa"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict:
    root = tmp_path_factory.mktemp("downstream-e2e")
    write_synthetic(root / "tasks", 10, tasks=TASKS)
    proc = run_train(cache_dir, root, "evals", "steps=4", "eval_every=2",
                     f"evals.tasks=[{','.join(TASKS)}]", "evals.every=2",
                     f"evals.data_dir={root / 'tasks'}", "evals.limit=8", "evals.batch_size=5")
    return {"root": root, "run": root / "evals", "proc": proc}


def _pretrain_eval(cache_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([console_script("pretrain-eval"), *args], cwd=cwd,
                          env=train_env(cache_dir), capture_output=True, text=True, timeout=120)


def test_in_loop_evals_reach_every_sink_and_pretrain_eval_agrees(trained: dict,
                                                                 cache_dir: Path) -> None:
    run, root = trained["run"], trained["root"]
    evals = [m for m in read_metrics(run) if "eval/hellaswag/acc" in m]
    assert [m["step"] for m in evals] == [2, 4]  # every 2 steps, the last one at the end
    assert "step 2 | hellaswag/acc " in trained["proc"].stdout
    final = json.loads((run / "summary.json").read_text())["downstream"]
    assert final == {k: v for k, v in evals[-1].items() if k != "step"}
    out = root / "results.json"
    proc = _pretrain_eval(cache_dir, root, str(run), "--tasks", ",".join(TASKS), "--data-dir",
                          str(root / "tasks"), "--limit", "8", "--batch-size", "3",
                          "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "| hellaswag | acc_norm |" in proc.stdout
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 2 + 2 + 2
    for r in rows:
        assert r["value"] == pytest.approx(final[f"eval/{r['task']}/{r['metric']}"], rel=1e-5)


def test_refusals_are_one_line(trained: dict, cache_dir: Path, tmp_path: Path) -> None:
    root = trained["root"]
    proc = run_train(cache_dir, tmp_path, "bad", "steps=2", "evals.tasks=[hellaswag,mmlu]",
                     f"evals.data_dir={root / 'tasks'}", check=False, timeout=120)
    assert "unknown task 'mmlu'" in refusal_line(proc)
    proc = run_train(cache_dir, tmp_path, "bad2", "steps=2", "evals.tasks=[winogrande]",
                     f"evals.data_dir={root / 'tasks'}", check=False, timeout=120)
    assert "winogrande/validation.jsonl" in refusal_line(proc)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()
    proc = _pretrain_eval(cache_dir, tmp_path, str(trained["run"]), "--tasks", "piqa",
                          "--data-dir", str(tmp_path))
    assert "piqa/validation.jsonl" in refusal_line(proc)
    bad = tmp_path / "t" / "piqa" / "validation.jsonl"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n{"goal": "g"}\n')
    proc = _pretrain_eval(cache_dir, tmp_path, str(trained["run"]), "--tasks", "piqa",
                          "--data-dir", str(tmp_path / "t"))
    assert f"{bad}:2: malformed piqa record: no field 'sol1'" in refusal_line(proc)
