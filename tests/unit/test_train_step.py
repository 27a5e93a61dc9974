"""The training step in-process: no host-device sync outside log steps, non-finite steps
skipped on the device and halted on at the right step, the chunked loss against the full
one, and the SDPA kernel choice reaching attention."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.overrides import TorchFunctionMode

from pretrain.config import SDPA_BACKENDS, TrainConfig, register_configs
from pretrain.errors import ConfigError, NonFiniteError
from pretrain.models.llama import SDPA_KERNELS
from pretrain.train.guards import StepWatchdog
from pretrain.train.trainer import Run, autocast_factory, settle, setup, train_loop, train_step
from pretrain.validate import validate
from tests.conftest import REPO, TINY

# Tensor methods that make the host wait for the device (on a GPU): reading a value.
SYNCING = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}


class SyncSpy(TorchFunctionMode):
    """Records every call of a syncing tensor method made while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = getattr(func, "__name__", "")
        if name in SYNCING:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def make_config(tmp_path: Path, *overrides: str, world_size: int = 1) -> TrainConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("train", overrides=[*TINY, f"output_root={tmp_path}", "eval_every=0",
                                          "ckpt_every=0", *overrides])
    cfg = OmegaConf.to_object(cfg)
    validate(cfg, world_size=world_size)
    return cfg


def make_run(cache_dir: Path, tmp_path: Path, name: str, *overrides: str) -> Run:
    cfg = make_config(tmp_path, *overrides)
    return setup(cfg, tmp_path / name)


def test_steps_between_log_steps_read_nothing_from_the_device(cache_dir: Path,
                                                              tmp_path: Path) -> None:
    run = make_run(cache_dir, tmp_path, "nosync", "logging.log_every=100")
    assert not run.settle_each_step  # fused AdamW skips non-finite steps on the device
    autocast = autocast_factory(run.cfg.precision, run.device)
    run.pending.append(train_step(run, autocast))  # first step: lazy initializations
    with SyncSpy() as spy:
        for _ in range(2):
            run.pending.append(train_step(run, autocast))
    assert spy.calls == []
    with SyncSpy() as spy:  # the log step reads every pending step in one transfer
        metrics = settle(run)
    assert spy.calls == ["tolist"]
    assert math.isfinite(metrics["train/loss"]) and metrics["train/grad_norm"] > 0
    assert run.pending == []


def test_nonfinite_step_leaves_weights_and_adam_state_alone(cache_dir: Path,
                                                             tmp_path: Path) -> None:
    run = make_run(cache_dir, tmp_path, "nan", "logging.log_every=100",
                   "nonfinite_policy=skip", "faults.nan_at_step=2")
    autocast = autocast_factory(run.cfg.precision, run.device)
    run.pending.append(train_step(run, autocast))
    run.counters.step = 1
    weights = {k: v.clone() for k, v in run.model.state_dict().items()}
    adam = {id(p): {k: v.clone() for k, v in s.items()} for p, s in run.optimizer.state.items()}
    run.pending.append(train_step(run, autocast))  # NaN gradients on this step
    for k, v in run.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for p, s in run.optimizer.state.items():
        for k, v in s.items():
            assert torch.equal(v, adam[id(p)][k]), k  # moments and step count too
    metrics = settle(run)
    assert metrics["train/skipped"] == 1.0 and run.counters.skipped_total == 1


def test_halt_names_the_nonfinite_step_though_read_later(
        cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_run(cache_dir, tmp_path, "halt", "steps=8", "logging.log_every=6",
                   "faults.nan_at_step=3")
    run.sinks = []
    calls: list[str] = []
    monkeypatch.setattr(StepWatchdog, "arm", lambda self: calls.append("arm"))
    monkeypatch.setattr(StepWatchdog, "disarm", lambda self: calls.append("disarm"))
    with pytest.raises(NonFiniteError, match="at step 3 "):
        train_loop(run, autocast_factory(run.cfg.precision, run.device))
    assert run.counters.step == 5  # read at the log step, 6; steps 4 and 5 ran meanwhile
    assert calls[-1] == "disarm"  # the halt left no exit timer armed behind it


def _losses(cache_dir: Path, tmp_path: Path, loss: str, *overrides: str) -> list[float]:
    run = make_run(cache_dir, tmp_path, f"loss-{loss}", f"loss={loss}", *overrides)
    assert run.chunked_loss == (loss == "chunked")
    autocast = autocast_factory(run.cfg.precision, run.device)
    out = []
    for step in range(3):
        run.pending.append(train_step(run, autocast))
        run.counters.step = step + 1
        out.append(settle(run)["train/loss"])
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_trains_like_the_full_loss(cache_dir: Path, tmp_path: Path,
                                                tied: bool) -> None:
    # Tied: the loss's weight gradient and the embedding's add up in one parameter.
    extra = [f"model.tie_embeddings={str(tied).lower()}"]
    chunked = _losses(cache_dir, tmp_path, "chunked", *extra)
    full = _losses(cache_dir, tmp_path, "full", *extra)
    for a, b in zip(chunked, full, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (chunked, full)
    assert chunked[-1] < chunked[0]


def test_loss_auto_is_chunked_only_where_the_output_is_whole(tmp_path: Path) -> None:
    from pretrain.train.trainer import uses_chunked_loss

    assert uses_chunked_loss(make_config(tmp_path))
    assert uses_chunked_loss(make_config(tmp_path, "parallel=fsdp", world_size=2))
    assert not uses_chunked_loss(make_config(tmp_path, "parallel=tp", world_size=2))
    assert not uses_chunked_loss(make_config(tmp_path, "parallel=zero2", world_size=2))
    with pytest.raises(ConfigError, match="loss=chunked needs the whole output projection"):
        make_config(tmp_path, "parallel=tp", "loss=chunked", world_size=2)


def test_sdpa_backends_reach_attention(cache_dir: Path, tmp_path: Path) -> None:
    assert set(SDPA_BACKENDS) == set(SDPA_KERNELS)
    with pytest.raises(ConfigError, match="sdpa_backends has"):
        make_config(tmp_path, "sdpa_backends=[flash,fastest]")
    autocast = autocast_factory("fp32", torch.device("cpu"))
    run = make_run(cache_dir, tmp_path, "math", "sdpa_backends=[math]")
    assert math.isfinite(float(train_step(run, autocast).loss))
    # The CPU has no memory-efficient kernel: restricted to it, attention cannot run at all.
    run = make_run(cache_dir, tmp_path, "efficient", "sdpa_backends=[efficient]")
    with pytest.raises(RuntimeError, match="No viable backend"):
        train_step(run, autocast)


@pytest.mark.gpu
def test_cuda_step_has_no_sync_outside_log_steps(cache_dir: Path, tmp_path: Path) -> None:
    # Eager, to stay quick inside the GPU check's time limit.
    run = make_run(cache_dir, tmp_path, "cuda", "device=cuda", "precision=bf16",
                   "compile=false", "logging.log_every=100")
    autocast = autocast_factory(run.cfg.precision, run.device)
    run.pending.append(train_step(run, autocast))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run.pending.append(train_step(run, autocast))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(settle(run)["train/loss"])


def test_compile_defaults_on_only_with_cuda_and_the_native_backend(tmp_path: Path) -> None:
    from pretrain.train.trainer import compile_enabled

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    cfg = make_config(tmp_path)
    assert cfg.compile is None
    assert compile_enabled(cfg, cuda) and not compile_enabled(cfg, cpu)
    assert not compile_enabled(make_config(tmp_path, "parallel=zero2", world_size=2), cuda)
    assert compile_enabled(make_config(tmp_path, "compile=true"), cpu)
    assert not compile_enabled(make_config(tmp_path, "compile=false"), cuda)


def test_compiling_also_compiles_the_loss_chunks(cache_dir: Path, tmp_path: Path) -> None:
    assert make_run(cache_dir, tmp_path, "compiled", "compile=true").model.compile_loss
    assert not make_run(cache_dir, tmp_path, "eager").model.compile_loss


def test_optimizer_without_device_skip_is_checked_every_step(cache_dir: Path,
                                                             tmp_path: Path) -> None:
    run = make_run(cache_dir, tmp_path, "foreach", "optim.implementation=foreach",
                   "nonfinite_policy=skip", "faults.nan_at_step=2", "logging.log_every=100",
                   "steps=3")
    assert run.settle_each_step
    run.sinks = []
    before: dict[str, torch.Tensor] = {}

    def snapshot() -> None:
        before.update({k: v.clone() for k, v in run.model.state_dict().items()})

    autocast = autocast_factory(run.cfg.precision, run.device)
    run.pending.append(train_step(run, autocast))
    run.counters.step = 1
    snapshot()
    run.pending.append(train_step(run, autocast))  # NaN: the host decides, and skips
    for k, v in run.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    settle(run)
    assert run.counters.skipped_total == 1 and run.counters.skipped_in_row == 1


def test_spike_warning_comes_with_the_settled_losses(cache_dir: Path, tmp_path: Path,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    run = make_run(cache_dir, tmp_path, "spike", "steps=12", "spike_window=5",
                   "faults.spike_at_step=10", "logging.log_every=12")
    run.sinks = []
    train_loop(run, autocast_factory(run.cfg.precision, run.device))
    assert "warning: loss spike at step 10" in capfd.readouterr().out
    assert run.counters.skipped_total == 0  # warn only: the update was made


def test_validation_with_the_chunked_loss_equals_the_full_logits(cache_dir: Path,
                                                                 tmp_path: Path) -> None:
    from pretrain.eval.perplexity import evaluate

    run = make_run(cache_dir, tmp_path, "eval")
    common = dict(device=run.device, autocast=autocast_factory(run.cfg.precision, run.device))
    batches = list(run.val_loader.eval_batches(2))
    full = evaluate(run.parts[0], batches, **common)["val/loss"]
    chunked = evaluate(run.parts[0], batches, chunked=True, **common)["val/loss"]
    assert abs(full - chunked) <= 1e-5 * full and math.isfinite(full)
