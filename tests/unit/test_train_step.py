"""The training step in-process, through the real objects (`setup`, `train_step(run)`,
`settle`, `run.module`): no host-device sync outside log steps, non-finite steps skipped on the
device and halted on at the right step, the chunked loss against the full one, the SDPA kernel
choice reaching attention, validation over a fixed set of windows that does not depend on the
micro-batch size, and a strict summary.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.overrides import TorchFunctionMode

from pretrain.config import SDPA_BACKENDS, TrainConfig, register_configs, uses_chunked_loss
from pretrain.errors import ConfigError, NonFiniteError
from pretrain.models.llama import SDPA_KERNELS
from pretrain.train.guards import StepWatchdog
from pretrain.train.hooks import settle
from pretrain.train.module import compile_enabled
from pretrain.train.trainer import Run, setup, train, train_loop, train_step, write_json
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
    """A one-process run of TINY (`cache_dir` holds its tokenizer and shards)."""
    cfg = make_config(tmp_path, *overrides)
    return setup(cfg, tmp_path / name)


def step(run: Run) -> None:
    """One step as the loop takes it, its numbers left pending on the device."""
    run.pending.append(train_step(run))
    run.counters.step += 1


def model_state(run: Run) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in run.module.model.state_dict().items()}


def chunked(cfg: TrainConfig) -> bool:
    return uses_chunked_loss(cfg.loss, cfg.parallel)


def test_steps_between_log_steps_read_nothing_from_the_device(cache_dir: Path,
                                                              tmp_path: Path) -> None:
    run = make_run(cache_dir, tmp_path, "nosync", "logging.log_every=100")
    assert run.module.skips_on_device and not run.settle_each_step  # fused AdamW
    step(run)  # first step: lazy initializations
    with SyncSpy() as spy:
        for _ in range(2):
            step(run)
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
    step(run)
    weights = model_state(run)
    opt = run.module.optimizer
    adam = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    assert adam  # the first step created the moments
    step(run)  # NaN gradients on this step
    for k, v in run.module.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, adam[id(p)][k]), k  # moments and step count too
    metrics = settle(run)
    assert metrics["train/skipped"] == 1.0 and run.counters.skipped_total == 1
    assert not math.isfinite(metrics["train/loss"])


def test_halt_names_the_nonfinite_step_though_read_later(
        cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_run(cache_dir, tmp_path, "halt", "steps=8", "logging.log_every=6",
                   "faults.nan_at_step=3")
    assert not run.settle_each_step
    calls: list[str] = []
    monkeypatch.setattr(StepWatchdog, "arm", lambda self: calls.append("arm"))
    monkeypatch.setattr(StepWatchdog, "disarm", lambda self: calls.append("disarm"))
    with pytest.raises(NonFiniteError, match="at step 3 "):
        train_loop(run)
    assert run.counters.step == 5  # read at the log step, 6; steps 4 and 5 ran meanwhile
    assert calls[-1] == "disarm"  # the halt left no exit timer armed behind it


def _losses(cache_dir: Path, tmp_path: Path, loss: str, *overrides: str) -> list[float]:
    run = make_run(cache_dir, tmp_path, f"loss-{loss}", f"loss={loss}", *overrides)
    assert run.module.settings.chunked_loss == (loss == "chunked")
    out = []
    for _ in range(3):
        step(run)
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
    assert chunked(make_config(tmp_path))
    assert chunked(make_config(tmp_path, "parallel=fsdp", world_size=2))
    assert not chunked(make_config(tmp_path, "parallel=tp", world_size=2))
    assert not chunked(make_config(tmp_path, "parallel=zero2", world_size=2))
    with pytest.raises(ConfigError, match="loss=chunked needs the whole output projection"):
        make_config(tmp_path, "parallel=tp", "loss=chunked", world_size=2)


def test_sdpa_backends_reach_attention(cache_dir: Path, tmp_path: Path) -> None:
    assert set(SDPA_BACKENDS) == set(SDPA_KERNELS)
    with pytest.raises(ConfigError, match="sdpa_backends has"):
        make_config(tmp_path, "sdpa_backends=[flash,fastest]")
    run = make_run(cache_dir, tmp_path, "math", "sdpa_backends=[math]")
    assert math.isfinite(float(train_step(run).loss))
    # The CPU has no memory-efficient kernel: restricted to it, attention cannot run at all,
    # in training and in evaluation alike.
    run = make_run(cache_dir, tmp_path, "efficient", "sdpa_backends=[efficient]")
    with pytest.raises(RuntimeError, match="No viable backend"):
        train_step(run)
    with pytest.raises(RuntimeError, match="No viable backend"):
        run.module.evaluate(run.val_loader.eval_windows(4))


@pytest.mark.gpu
def test_cuda_step_has_no_sync_outside_log_steps(cache_dir: Path, tmp_path: Path) -> None:
    # Eager, to stay quick inside the GPU check's time limit.
    run = make_run(cache_dir, tmp_path, "cuda", "device=cuda", "precision=bf16",
                   "compile=false", "logging.log_every=100")
    assert not run.settle_each_step
    step(run)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(run)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(settle(run)["train/loss"])


def test_compile_defaults_on_only_with_cuda_and_the_native_backend(tmp_path: Path) -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    cfg = make_config(tmp_path)
    assert cfg.compile is None
    assert compile_enabled(cfg, cuda) and not compile_enabled(cfg, cpu)
    assert not compile_enabled(make_config(tmp_path, "parallel=zero2", world_size=2), cuda)
    assert compile_enabled(make_config(tmp_path, "compile=true"), cpu)
    assert not compile_enabled(make_config(tmp_path, "compile=false"), cuda)


def test_compiling_also_compiles_the_loss_chunks(cache_dir: Path, tmp_path: Path) -> None:
    compiled = make_run(cache_dir, tmp_path, "compiled", "compile=true")
    assert compiled.module.settings.compile and compiled.module.model.compile_loss
    assert not make_run(cache_dir, tmp_path, "eager").module.model.compile_loss


def test_optimizer_without_device_skip_is_checked_every_step(cache_dir: Path,
                                                             tmp_path: Path) -> None:
    run = make_run(cache_dir, tmp_path, "foreach", "optim.implementation=foreach",
                   "nonfinite_policy=skip", "faults.nan_at_step=2", "logging.log_every=100",
                   "steps=3")
    assert not run.module.skips_on_device and run.settle_each_step
    step(run)
    settle(run)
    before = model_state(run)
    with SyncSpy() as spy:
        step(run)  # NaN: the host reads the finite flag, and skips
    assert spy.calls == ["item"]
    for k, v in run.module.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    settle(run)
    assert run.counters.skipped_total == 1 and run.counters.skipped_in_row == 1


def test_spike_warning_comes_with_the_settled_losses(cache_dir: Path, tmp_path: Path,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    run = make_run(cache_dir, tmp_path, "spike", "steps=12", "spike_window=5",
                   "faults.spike_at_step=10", "logging.log_every=12")
    assert run.cfg.spike_policy == "warn"
    assert train_loop(run) == "completed"
    assert "warning: loss spike at step 10" in capfd.readouterr().out
    assert run.counters.skipped_total == 0  # warn only: the update was made


def test_validation_with_the_chunked_loss_equals_the_full_logits(cache_dir: Path,
                                                                 tmp_path: Path) -> None:
    chunked = make_run(cache_dir, tmp_path, "eval-chunked", "loss=chunked")
    full = make_run(cache_dir, tmp_path, "eval-full", "loss=full")
    assert chunked.module.settings.chunked_loss and not full.module.settings.chunked_loss
    for _ in range(2):
        step(chunked)
    full.module.model.load_state_dict(chunked.module.model.state_dict())
    # 6 windows in micro-batches of 4: the second batch has two padding rows.
    a = chunked.module.evaluate(chunked.val_loader.eval_windows(6))["val/loss"]
    b = full.module.evaluate(full.val_loader.eval_windows(6))["val/loss"]
    assert math.isfinite(b) and abs(a - b) <= 1e-5 * b, (a, b)


def test_validation_loss_does_not_depend_on_the_micro_batch_size(cache_dir: Path,
                                                                 tmp_path: Path) -> None:
    # 10 windows: padding rows in the last micro-batch of 4 (2), 3 (2) and 8 (6).
    n = 10
    runs = {mb: make_run(cache_dir, tmp_path, f"eval-mb{mb}", f"micro_batch_size={mb}",
                         f"global_batch_size={8 if mb != 3 else 6}")
            for mb in (4, 3, 8)}
    trained = runs[4]
    init = model_state(trained)
    for mb, run in runs.items():  # the same seed, the same initial weights
        for k, v in run.module.model.state_dict().items():
            assert torch.equal(v, init[k]), (mb, k)
    for _ in range(3):  # trained weights: windows' losses differ more than at initialization
        step(trained)
    settle(trained)
    weights = trained.module.model.state_dict()
    losses = {}
    for mb, run in runs.items():
        run.module.model.load_state_dict(weights)
        assert run.val_loader.micro_batch_size == mb
        losses[mb] = run.module.evaluate(run.val_loader.eval_windows(n))["val/loss"]
    assert all(math.isfinite(v) for v in losses.values()), losses
    for mb in (3, 8):
        assert abs(losses[mb] - losses[4]) <= 1e-6 * losses[4], losses
    assert losses[4] < math.log(trained.cfg.model.vocab_size)  # the trained weights evaluated


def _strict(text: str) -> object:
    def refuse(name: str) -> None:
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_summary_json_is_strict_when_nothing_was_evaluated(cache_dir: Path,
                                                           tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "steps=4", "faults.signal_at_step=2", "run_name=preempted")
    run_dir = tmp_path / "preempted"
    run_dir.mkdir()
    summary = train(cfg, run_dir)
    assert summary["status"] == "preempted" and summary["steps"] == 2
    written = _strict((run_dir / "summary.json").read_text())
    assert written["status"] == "preempted"
    # No evaluation ran: NaN / inf in the run's counters are null on disk.
    assert written["final_val_loss"] is None and written["best_val_loss"] is None
    assert written["final_val_ppl"] is None
    assert math.isfinite(written["final_train_loss"])


def test_write_json_keeps_measured_nonfinite_values_as_strings(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    write_json(path, {"nan": math.nan, "inf": [math.inf, -math.inf, 1.5],
                      "nested": {"x": (math.nan, 2)}, "missing": None, "ok": 0.25})
    assert _strict(path.read_text()) == {"nan": "nan", "inf": ["inf", "-inf", 1.5],
                                         "nested": {"x": ["nan", 2]}, "missing": None,
                                         "ok": 0.25}
    assert not list(tmp_path.glob("*.tmp"))


def test_a_diverged_run_is_written_strictly_and_left_out_of_a_sweep_fit(
        cache_dir: Path, tmp_path: Path) -> None:
    from pretrain.scaling.collect import load_run

    cfg = make_config(tmp_path, "steps=4", "nonfinite_policy=skip", "faults.nan_at_step=4",
                      "run_name=diverged")
    run_dir = tmp_path / "diverged"
    run_dir.mkdir()
    train(cfg, run_dir)
    written = _strict((run_dir / "summary.json").read_text())
    assert written["status"] == "completed" and written["final_train_loss"] == "nan"
    assert math.isfinite(written["final_val_loss"])  # the skipped step left the weights alone
    skipped = load_run(run_dir / "summary.json")
    assert "non-finite loss (final_train_loss='nan')" in skipped.reason
