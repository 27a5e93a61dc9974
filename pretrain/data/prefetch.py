"""Background prefetch for the loader: a planner thread walks the data order ahead of training
and hands each batch to a pool of reader threads; the training thread only takes finished
batches off a queue.

The planner applies the same pure `plan` function the loader uses in the training thread, to
a private copy of the state, so prefetched batches are exactly those that reading on demand
would give; the state that goes with each batch travels with it and becomes the loader's state
only when the batch is handed out. The queue is bounded, so at most `depth` batches are planned
or read ahead.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

P = TypeVar("P")  # a plan
B = TypeVar("B")  # what reading a plan gives

_POLL_S = 0.05  # how often a blocked planner checks whether it should stop


@dataclass
class Ahead(Generic[B]):
    """A batch being read, and the loader state once it has been handed out."""

    future: Future[B]
    cursor: int
    consumed: np.ndarray


@dataclass
class _Failed:
    error: BaseException


class Prefetcher(Generic[P, B]):
    """Plans batches from (cursor, consumed) on, reads them in `num_workers` threads."""

    def __init__(
        self, plan: Callable[[int, np.ndarray], tuple[P, np.ndarray]], read: Callable[[P], B], *,
        cursor: int, consumed: np.ndarray, step: int, num_workers: int, depth: int,
    ):
        self._plan, self._read, self._step = plan, read, step
        self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="data-reader")
        self._queue: queue.Queue[Ahead[B] | _Failed] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._planner = threading.Thread(target=self._run, args=(cursor, consumed.copy()),
                                         name="data-planner", daemon=True)
        self._planner.start()

    def _run(self, cursor: int, consumed: np.ndarray) -> None:
        try:
            while not self._stop.is_set():
                plan, consumed = self._plan(cursor, consumed)
                cursor += self._step
                self._put(Ahead(self._pool.submit(self._read, plan), cursor, consumed))
        except BaseException as e:  # handed to the training thread, which raises it
            self._put(_Failed(e))

    def _put(self, item: Ahead[B] | _Failed) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def get(self) -> Ahead[B]:
        """The next batch in order (waiting for it if need be)."""
        item = self._queue.get()
        if isinstance(item, _Failed):
            raise item.error
        return item

    def close(self) -> None:
        """Stop planning and reading; batches read ahead are dropped."""
        self._stop.set()
        self._planner.join()
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, Ahead):
                item.future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
