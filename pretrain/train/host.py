"""Settings of the host process that training on a CPU depends on.

glibc's malloc serves a request above its mmap threshold (128 KiB at start, raised adaptively
up to 32 MiB) with a fresh mapping and unmaps it on free, and returns freed heap memory to the
OS above its trim threshold. A training step allocates and frees the same large activation
buffers every step, so by default it pays page faults for them again each step, and how many
depends on the threshold's adaptive history: two processes running the same step differ by
several percent, and the transformers baseline of `pretrain-bench` is bimodal. Fixing both
thresholds keeps those buffers in the heap: the bench15m step on CPU ran ~10% faster and
equally fast in the trainer and the benchmark (README, Performance).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
"""glibc's largest allowed mmap threshold on 64-bit systems."""
TRIM_THRESHOLD = 1 << 30
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def tune_cpu_allocator() -> bool:
    """Fix glibc malloc's mmap and trim thresholds (Linux/glibc only; a user's own MALLOC_*
    or GLIBC_TUNABLES settings win). Returns whether the thresholds were set."""
    if not sys.platform.startswith("linux") or any(k in os.environ for k in _USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def trim_heap() -> bool:
    """Return the heap's free memory to the OS (glibc `malloc_trim(0)`), so that resident
    memory counts only what is in use: a measurement of growth then starts from there.
    Returns whether anything could be trimmed (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(malloc_trim(0))
