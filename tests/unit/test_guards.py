from __future__ import annotations

import os
import signal
import subprocess
import sys

from pretrain.train.guards import PreemptionHandler, SpikeDetector


def test_spike_detector_flags_outliers_only() -> None:
    det = SpikeDetector(window=20, threshold=6.0)
    losses = [3.0 - 0.01 * i + 0.005 * (-1) ** i for i in range(30)]
    assert not any(det.update(x) for x in losses)
    assert det.update(6.0)  # a jump far outside the recent spread
    assert not det.update(2.7)
    state = det.state_dict()
    again = SpikeDetector(window=20, threshold=6.0)
    again.load_state_dict(state)
    assert again.is_spike(6.0) and list(again.history) == list(det.history)


def test_spike_detector_needs_history_first() -> None:
    det = SpikeDetector(window=50)
    assert not det.update(10.0) and not det.update(100.0)


def test_preemption_signal_sets_flag() -> None:
    handler = PreemptionHandler().install()
    try:
        assert not handler.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.requested and handler.received == signal.SIGUSR1
    finally:
        handler.uninstall()


def test_watchdog_dumps_stacks_and_exits_on_a_hung_step() -> None:
    code = ("import time\nfrom pretrain.train.guards import StepWatchdog\n"
            "w = StepWatchdog(0.5)\nw.arm()\ntime.sleep(30)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=20)
    assert proc.returncode != 0
    assert "Timeout" in proc.stderr
    assert 'File "<string>", line 5' in proc.stderr  # the stack of the hung line
