"""The entry points refuse a bad start in one line, exit status 2, before anything is written:
an existing run's config, `.hydra/` and checkpoints stay byte-identical, and a new run leaves
no directory behind. Everything goes through the installed console scripts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import TINY, console_script, file_digests, refusal_line, run_train, train_env

BASE = ("steps=4", "ckpt_every=2", "eval_every=0")


def _launch(cache_dir: Path, out: Path, name: str, *overrides: str,
            check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """`pretrain-launch` as `run_train` runs `pretrain-train`."""
    cmd = [console_script("pretrain-launch"), *TINY, f"output_root={out}", f"run_name={name}",
           *overrides]
    proc = subprocess.run(cmd, cwd=out, env=train_env(cache_dir), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def base_run(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("entry")
    run_train(cache_dir, out, "base", *BASE)
    assert (out / "base" / ".hydra" / "overrides.yaml").is_file()
    return out / "base"


@pytest.mark.parametrize("app", ["pretrain-train", "pretrain-launch"])
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+optim.lrr=0.1"], "unknown config key optim.lrr (did you mean optim.lr?)"),
        (["+model.dimm=128", "+no_such_key=1"],
         "unknown config keys model.dimm (did you mean model.dim?), no_such_key;"),
        (["parallel=zero2"], "parallel.backend=deepspeed needs its ranks started by a launcher"),
    ],
)
def test_both_apps_refuse_before_writing(cache_dir: Path, base_run: Path, app: str,
                                         overrides: list[str], message: str) -> None:
    """Hydra applies `+key=` additions past the typed schema; the entry refuses them."""
    before = file_digests(base_run)
    run = run_train if app == "pretrain-train" else _launch
    for name in ("base", "fresh"):
        proc = run(cache_dir, base_run.parent, name, *BASE, *overrides, check=False)
        assert message in refusal_line(proc), proc.stderr
    assert file_digests(base_run) == before
    assert not (base_run.parent / "fresh").exists()


def test_open_maps_take_new_keys(cache_dir: Path, tmp_path: Path) -> None:
    proc = _launch(cache_dir, tmp_path, "open", "launcher.dry_run=true", "+tags.sweep_id=7",
                   "+parallel.deepspeed_extra.wall_clock_breakdown=true", "+launcher.env.FOO=1")
    assert "+tags.sweep_id=7" in proc.stdout


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.n_layers=1", "resume refused: model.n_layers is 1 but checkpoint "),
        ("model.dim=128", "was written with 64; restore model.dim=64, or start a new run"),
        ("model.n_kv_heads=4", "model.n_kv_heads is 4"),
        ("model.tie_embeddings=true", "restore model.tie_embeddings=false"),
        ("model.ffn_hidden_dim=96", "model.ffn_hidden_dim is 96"),
        ("model.vocab_size=1024", "model.vocab_size is 1024"),
        ("seq_len=32", "seq_len"),
        ("model.n_heads=3", "not divisible"),
        ("resume=/no/such/checkpoint", "/no/such/checkpoint"),
    ],
)
def test_a_refused_resume_leaves_the_run_untouched(cache_dir: Path, base_run: Path,
                                                  override: str, message: str) -> None:
    before = file_digests(base_run)
    proc = run_train(cache_dir, base_run.parent, "base", *BASE, "steps=6", override,
                     check=False)
    line = refusal_line(proc)
    assert message in line, line
    if override.startswith("model.n_layers"):
        assert "step_00000004 was written with 2; restore model.n_layers=2" in line, line
    assert file_digests(base_run) == before


def test_a_resume_that_keeps_the_shapes_goes_on(cache_dir: Path, tmp_path: Path) -> None:
    """Fields that shape no parameter may change; the run's config files then say so."""
    run_train(cache_dir, tmp_path, "keep", *BASE)
    # debug preset: n_kv_heads 2, multiple_of 64; multiple_of 32 gives the same SwiGLU size.
    proc = run_train(cache_dir, tmp_path, "keep", *BASE, "steps=6", "model.multiple_of=32",
                     "model.init_std=0.01", "model.max_seq_len=512")
    assert "resumed from" in proc.stdout and "step_00000004" in proc.stdout
    assert "model.multiple_of=32" in (tmp_path / "keep" / ".hydra" / "overrides.yaml").read_text()
    assert "multiple_of: 32" in (tmp_path / "keep" / "config.yaml").read_text()


def test_a_checkpoint_of_the_other_backend_is_refused(cache_dir: Path, base_run: Path,
                                                      tmp_path: Path) -> None:
    # A native checkpoint under the DeepSpeed backend (ranks started by torchrun).
    before = file_digests(base_run)
    proc = _launch(cache_dir, base_run.parent, "base", *BASE, "steps=6", "parallel=zero1",
                   "launcher=torchrun", "launcher.nproc_per_node=2", check=False)
    assert proc.returncode != 0
    assert ("error: resume refused: parallel.backend is deepspeed but checkpoint "
            in proc.stderr), proc.stderr
    assert "was written with native; restore parallel.backend=native" in proc.stderr
    assert file_digests(base_run) == before

    # A DeepSpeed checkpoint under the native backend.
    _launch(cache_dir, tmp_path, "ds", "steps=1", "eval_every=0", "parallel=zero1",
            "launcher=torchrun", "launcher.nproc_per_node=2")
    before = file_digests(tmp_path / "ds")
    proc = run_train(cache_dir, tmp_path, "ds", "steps=2", "eval_every=0", check=False)
    assert "parallel.backend is native but checkpoint" in refusal_line(proc)
    assert file_digests(tmp_path / "ds") == before
