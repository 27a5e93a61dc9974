"""The CPU allocator settings the trainer and the benchmark apply (in fresh processes: they
change the process for good)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = "from pretrain.train.host import tune_cpu_allocator; print(tune_cpu_allocator())"


def _run(env: dict[str, str]) -> str:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")}
    proc = subprocess.run([sys.executable, "-c", CODE], env={**clean, **env},
                          capture_output=True, text=True, timeout=120, check=True)
    return proc.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_thresholds_are_set_unless_the_user_set_them() -> None:
    assert _run({}) == "True"
    assert _run({"MALLOC_MMAP_THRESHOLD_": "65536"}) == "False"  # the user's setting wins
    assert _run({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}) == "False"
