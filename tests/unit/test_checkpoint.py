from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pretrain.train import checkpoint as ckpt


def _model_and_optim(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    return model, opt


def _state(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> dict:
    return {"app": ckpt.ModelOptimState(model, opt), "counters": ckpt.Record({"step": step})}


def _save(root: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer,
          keep: int = 0) -> Path:
    return ckpt.save_checkpoint(root, step, _state(model, opt, step), keep=keep)


def test_round_trip_restores_model_and_optimizer(tmp_path: Path) -> None:
    model, opt = _model_and_optim(0)
    path = _save(tmp_path, 5, model, opt)
    other, other_opt = _model_and_optim(1)
    state = ckpt.load_checkpoint(path, other, other_opt)
    assert state["counters"]["step"] == 5
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict()["state"], other_opt.state_dict()["state"]
    for k in sa:
        assert torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"])


class Position:
    """A JSON-side stateful object, like the loader or the counters."""

    def __init__(self, at: int = 0) -> None:
        self.at = at

    def state_dict(self) -> dict:
        return {"at": self.at}

    def load_state_dict(self, state: dict) -> None:
        self.at = state["at"]


def test_one_state_dict_saves_and_loads_every_object(tmp_path: Path) -> None:
    model, opt = _model_and_optim(0)
    path = ckpt.save_checkpoint(tmp_path, 3, {"app": ckpt.ModelOptimState(model, opt),
                                              "position": Position(42)}, keep=0)
    other, other_opt = _model_and_optim(1)
    position = Position()
    ckpt.load_state(path, {"app": ckpt.ModelOptimState(other, other_opt), "position": position})
    assert position.at == 42
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    with pytest.raises(ckpt.CheckpointError, match="'missing'"):
        ckpt.load_state(path, {"app": ckpt.ModelOptimState(other, other_opt),
                               "missing": Position()})
    with pytest.raises(ValueError, match="exactly one payload"):
        ckpt.save_checkpoint(tmp_path, 4, {"position": Position()}, keep=0)


def test_flipped_byte_is_named_and_auto_resume_falls_back(tmp_path: Path) -> None:
    model, opt = _model_and_optim(0)
    good = _save(tmp_path, 1, model, opt)
    bad = _save(tmp_path, 2, model, opt)
    shard = next(bad.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=shard.name):
        ckpt.verify_integrity(bad)
    with pytest.warns(UserWarning, match="damaged"):
        assert ckpt.find_resumable(tmp_path) == good


def test_partial_checkpoint_is_never_selected(tmp_path: Path) -> None:
    model, opt = _model_and_optim(0)
    good = _save(tmp_path, 1, model, opt)
    (tmp_path / "step_00000002.tmp").mkdir()  # a crash mid-write leaves this behind
    (tmp_path / "step_00000002.tmp" / "__0_0.distcp").write_bytes(b"partial")
    assert ckpt.list_checkpoints(tmp_path) == [good]
    assert ckpt.find_resumable(tmp_path) == good


def test_keep_last_k(tmp_path: Path) -> None:
    model, opt = _model_and_optim(0)
    for step in range(1, 5):
        _save(tmp_path, step, model, opt, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000003",
                                                                   "step_00000004"]


def test_async_save_is_the_state_at_the_call(tmp_path: Path) -> None:
    model, opt = _model_and_optim(0)
    sync_dir, async_dir = tmp_path / "sync", tmp_path / "async"
    _save(sync_dir, 1, model, opt)
    saver = ckpt.Checkpointer(async_dir, keep=0, async_save=True)
    saver.save(1, _state(model, opt, 1))
    with torch.no_grad():  # change everything right after the call
        for p in model.parameters():
            p.add_(100.0)
    assert ckpt.list_checkpoints(async_dir) == []  # not visible until finalized
    saver.wait()
    (done,) = ckpt.list_checkpoints(async_dir)
    a, _ = _model_and_optim(5)
    b, _ = _model_and_optim(6)
    ckpt.load_checkpoint(sync_dir / "step_00000001", a, None)
    ckpt.load_checkpoint(done, b, None)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_prune_never_deletes_latest(tmp_path: Path) -> None:
    model, opt = _model_and_optim(0)
    for step in (1, 2):
        _save(tmp_path, step, model, opt)
    (tmp_path / "latest.json").write_text('{"checkpoint": "step_00000001", "step": 1}')
    ckpt.prune(tmp_path, 1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001",
                                                                   "step_00000002"]


def test_checkpoint_benchmark_tool(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    from tools.bench_checkpoint import main

    assert main(["debug", "--repeats", "1", "--out", str(tmp_path / "scratch"),
                 "--json", str(tmp_path / "rows.json")]) == 0
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert row["preset"] == "debug" and row["size_mb"] > 0
    assert 0 < row["save_async_return_s"] <= row["save_async_final_s"]
    assert "debug" in capsys.readouterr().out


def test_an_absent_optional_object_round_trips(tmp_path: Path) -> None:
    """A run without a loss scaler saves None for it; a later run with one keeps its fresh
    scaler when resuming from that checkpoint."""
    model, opt = _model_and_optim(0)
    path = ckpt.save_checkpoint(tmp_path, 1, {"app": ckpt.ModelOptimState(model, opt),
                                              "scaler": ckpt.MaybeStateful(None)}, keep=0)
    position = Position(7)
    ckpt.load_state(path, {"app": ckpt.ModelOptimState(model, opt),
                           "scaler": ckpt.MaybeStateful(position)})
    assert position.at == 7
    path = ckpt.save_checkpoint(tmp_path, 2, {"app": ckpt.ModelOptimState(model, opt),
                                              "scaler": ckpt.MaybeStateful(Position(3))}, keep=0)
    ckpt.load_state(path, {"app": ckpt.ModelOptimState(model, opt),
                           "scaler": ckpt.MaybeStateful(position)})
    assert position.at == 3
