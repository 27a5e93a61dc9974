"""The installed package, the way a user gets it: a wheel built from this tree, installed into a
fresh virtual environment, its console scripts started from a directory that knows nothing of
the repository. The presets must come with the wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY

# What a wheel is built from; everything else in the tree (tests, docs, runs) stays behind.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "conf", "pretrain", "launch", "tools")


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None,
         timeout: int = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{cmd[:3]} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment holding this tree's wheel. It sees the system's site-packages
    (torch, deepspeed, ... are not reinstalled), but its own `pretrain` is the wheel's."""
    root = tmp_path_factory.mktemp("installed")
    src = root / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-w", str(root / "dist"), str(src)], cwd=root)
    (wheel,) = (root / "dist").glob("pretrain-*.whl")
    env_dir = root / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env_dir)],
         cwd=root)
    # --force-reinstall: the system's own (editable) pretrain counts as installed in the venv.
    _run([sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "install",
          "-q", "--no-deps", "--force-reinstall", str(wheel)], cwd=root)
    return env_dir


def _user_env(cache_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PRETRAIN_CACHE=str(cache_dir), WANDB_MODE="offline", WANDB_SILENT="true",
               OMP_NUM_THREADS="1")
    return env


def test_the_editable_install_reads_the_clones_presets() -> None:
    from launch.common import config_dir

    assert Path(config_dir()) == REPO / "conf"


def test_the_wheel_ships_the_presets(venv: Path, tmp_path: Path, cache_dir: Path) -> None:
    probe = _run([str(venv / "bin" / "python"), "-c",
                  "import pretrain, launch.common as c; print(pretrain.__file__); "
                  "print(c.config_dir())"], cwd=tmp_path, env=_user_env(cache_dir))
    module, conf = probe.stdout.split()
    assert Path(module).is_relative_to(venv) and Path(conf).is_relative_to(venv), probe.stdout
    assert (Path(conf) / "model" / "debug.yaml").is_file()


def test_installed_train_and_launch_run_from_any_directory(venv: Path, tmp_path: Path,
                                                          cache_dir: Path) -> None:
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = _user_env(cache_dir)
    tiny = [o for o in TINY if o != "model=debug"]
    _run([str(venv / "bin" / "pretrain-train"), "model=debug", "steps=2", *tiny,
          "output_root=runs", "run_name=train"], cwd=work, env=env, timeout=300)
    summary = json.loads((work / "runs" / "train" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert (work / "runs" / "train" / ".hydra" / "overrides.yaml").is_file()

    launch = [str(venv / "bin" / "pretrain-launch"), "model=debug", "steps=1", *tiny,
              "output_root=runs", "run_name=launched"]
    dry = _run([*launch, "launcher.dry_run=true"], cwd=work, env=env)
    assert f"{venv / 'bin' / 'python'} -m launch.train" in dry.stdout, dry.stdout
    assert not (work / "runs" / "launched" / "summary.json").exists()
    _run(launch, cwd=work, env=env, timeout=300)  # the launched child is the venv's, too
    summary = json.loads((work / "runs" / "launched" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 1
