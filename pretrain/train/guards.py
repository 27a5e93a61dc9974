"""Fault handling that plugs into the loop: preemption signals, a hung-step watchdog, and a
loss-spike detector. Each is a small object the trainer consults once per step."""

from __future__ import annotations

import faulthandler
import math
import signal
import sys
from collections import deque
from dataclasses import dataclass, field
from types import FrameType


class PreemptionHandler:
    """SIGTERM / SIGUSR1 (what Slurm sends before preemption or at its time limit) set a flag;
    the loop checkpoints at the end of the current step and exits 0."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionHandler:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.received is not None


class StepWatchdog:
    """If one step (collectives included) takes longer than `timeout_s`, dump every thread's
    stack to stderr and exit, instead of hanging forever on a dead peer. Re-armed each step."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s

    def arm(self) -> None:
        if self.timeout_s > 0:
            faulthandler.dump_traceback_later(self.timeout_s, exit=True, file=sys.stderr)

    def disarm(self) -> None:
        faulthandler.cancel_dump_traceback_later()


@dataclass
class SpikeDetector:
    """A loss is a spike when it exceeds the mean of the last `window` accepted losses by more
    than `threshold` standard deviations *and* by a relative margin `min_ratio` (so a flat,
    low-variance curve does not flag noise). Spikes are not added to the window."""

    window: int = 50
    threshold: float = 6.0
    min_ratio: float = 1.2
    history: deque = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.history = deque(self.history, maxlen=self.window)

    def is_spike(self, loss: float) -> bool:
        if len(self.history) < max(5, self.window // 5):
            return False
        mean = sum(self.history) / len(self.history)
        var = sum((x - mean) ** 2 for x in self.history) / len(self.history)
        limit = max(mean + self.threshold * math.sqrt(var), mean * self.min_ratio)
        return loss > limit

    def update(self, loss: float) -> bool:
        """Record `loss` unless it is a spike; return whether it was one."""
        spike = self.is_spike(loss)
        if not spike:
            self.history.append(loss)
        return spike

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state["history"], maxlen=self.window)
