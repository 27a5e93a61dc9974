"""Shared fixtures: a per-session cache for tokenizers/shards, and the training entry as a
subprocess (the installed `pretrain-train` console script, started outside the repository,
exactly as users start it)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Overrides for a tiny, fast fp32 run on a small slice of the built-in corpus.
TINY = [
    "model=debug",
    "model.vocab_size=512",
    "data.max_bytes=400000",
    "data.tokenizer_sample_bytes=200000",
    "data.shard_tokens=32768",
    "seq_len=64",
    "global_batch_size=8",
    "micro_batch_size=4",
    "precision=fp32",
    "logging=none",
    "logging.progress_bar=false",
    "eval_windows=8",
    "sample_prompts=[]",
    "optim.warmup_steps=2",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the whole session, so the tiny tokenizer and shards are built once."""
    path = tmp_path_factory.mktemp("pretrain-cache")
    os.environ["PRETRAIN_CACHE"] = str(path)
    return path


def train_env(cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PRETRAIN_CACHE=str(cache_dir), WANDB_MODE="offline", WANDB_SILENT="true",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def console_script(name: str) -> str:
    """An installed console script of this environment (the one next to its python)."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.is_file() else shutil.which(name)
    if found is None:
        raise AssertionError(f"console script {name} is not installed; run `make setup`")
    return found


def run_train(cache_dir: Path, out: Path, name: str, *overrides: str,
              check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """`pretrain-train` with TINY + overrides, run dir out/name, started in `out` (outside
    the repository, so the presets are found the way an installed package finds them)."""
    cmd = [console_script("pretrain-train"), *TINY, f"output_root={out}", f"run_name={name}",
           *overrides]
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, cwd=out, env=train_env(cache_dir), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_script(cache_dir: Path, cwd: Path, script: str, *args: str, check: bool = True,
               timeout: int = 300) -> subprocess.CompletedProcess:
    """An installed console script with `args`, started in `cwd` with the tests' environment;
    AssertionError with its output when it fails and `check`."""
    proc = subprocess.run([console_script(script), *args], cwd=cwd, env=train_env(cache_dir),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n"
                             f"{proc.stderr}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of every file below `root`, by relative path: what a refused start must leave
    byte for byte as it was (config.yaml, .hydra/*, checkpoints/**, caches)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def refusal_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a refused start (exit status 2, no traceback)."""
    assert proc.returncode == 2, f"{proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]
