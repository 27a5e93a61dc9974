"""Metric sinks behind one small hook interface: console + progress bar, metrics.jsonl, W&B.

Metric names carry their section (train/…, val/…, perf/…, data/…) so W&B groups its panels.
Only rank 0 builds sinks; other ranks get an empty list.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pretrain.config import LoggingConfig


class Sink:
    """Hooks a sink may implement; each is called on rank 0 only."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_text(self, text: str) -> None: ...

    def on_end(self, summary: dict[str, Any]) -> None: ...


class JsonlSink(Sink):
    """One JSON object per logged step/eval in metrics.jsonl (appended across resumes)."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "a", buffering=1)

    def _write(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in metrics.items()}
        self.f.write(json.dumps({"step": step, **clean}) + "\n")

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._write(step, metrics)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._write(step, metrics)

    def on_end(self, summary: dict[str, Any]) -> None:
        self.f.close()


class ConsoleSink(Sink):
    """A tqdm bar (step, loss, tokens/s, MFU, ETA) and a line per eval."""

    def __init__(self, total_steps: int, start_step: int, progress_bar: bool) -> None:
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not progress_bar, file=sys.stdout, mininterval=1.0)
        self.progress_bar = progress_bar
        self.last_step = start_step

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.last_step, advance = step, step - self.last_step
        mfu = 100 * metrics["perf/mfu"]
        text = (f"loss {metrics['train/loss']:.3f} | lr {metrics['train/lr']:.2e} | "
                f"{metrics['perf/tokens_per_sec']:.0f} tok/s | MFU {mfu:.1f}%")
        if self.progress_bar:  # postfix first, so the redraw shows this step's numbers
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(advance)
        else:
            print(f"step {step} | {text}", flush=True)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        if "val/loss" not in metrics:  # downstream tasks (evals.tasks): eval/<task>/<metric>
            self.on_text(f"step {step} | " + " | ".join(
                f"{k.removeprefix('eval/')} {v:.4f}" for k, v in metrics.items()))
            return
        # The objective's own metrics (val/mlm_acc, val/span_em, val/middle_loss, ...) follow.
        extra = "".join(f" | {k.removeprefix('val/')} {v:.4f}" for k, v in metrics.items()
                        if k not in ("val/loss", "val/ppl"))
        self.on_text(f"step {step} | val loss {metrics['val/loss']:.4f} | "
                     f"val ppl {metrics['val/ppl']:.2f}{extra}")

    def on_text(self, text: str) -> None:
        self.bar.write(text, file=sys.stdout)

    def on_end(self, summary: dict[str, Any]) -> None:
        self.bar.close()


class WandbSink(Sink):
    """A W&B run in the run directory; offline unless the user has logged in."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, run_name: str,
                 config: dict[str, Any], resume_id: str | None) -> None:
        import wandb

        mode = cfg.wandb_mode
        if mode == "auto":
            mode = "online" if _wandb_logged_in() else "offline"
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=cfg.group, name=run_name,
            dir=str(run_dir), config=config, mode=mode, id=resume_id, resume="allow",
            settings=wandb.Settings(quiet=True, console="off", x_disable_stats=True),
        )
        self.run.define_metric("*", step_metric="train/step")

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({"train/step": step, **metrics})

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({"train/step": step, **metrics})

    def on_end(self, summary: dict[str, Any]) -> None:
        for k, v in summary.items():
            if isinstance(v, (int, float, str)):
                self.run.summary[k] = v
            elif k == "final_eval" and isinstance(v, dict):  # val/loss, val/mlm_acc, ...
                for name, value in v.items():
                    self.run.summary[f"final/{name}"] = value
        self.run.finish()


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text()


def build_sinks(cfg: LoggingConfig, *, run_dir: Path, run_name: str, config: dict[str, Any],
                total_steps: int, start_step: int, wandb_id: str | None) -> list[Sink]:
    sinks: list[Sink] = [
        ConsoleSink(total_steps, start_step, cfg.progress_bar),
        JsonlSink(run_dir / "metrics.jsonl"),
    ]
    if cfg.wandb:
        sinks.append(WandbSink(cfg, run_dir, run_name, config, wandb_id))
    return sinks
