"""Process-wide speed settings for CPU runs: call :func:`tune_malloc` once at start-up.

glibc's ``malloc`` serves blocks above its mmap threshold with fresh ``mmap`` pages and unmaps them
on ``free``; its dynamic threshold only rises to the size of a freed block, so a same-sized block
(the next step's activation map, a few MB for the MNIST ConvNet at batch 64) is mapped again, and
every SGLD step page-faults through all its activations anew. Raising the mmap threshold to
glibc's maximum (32 MiB on 64-bit) and the trim threshold to 1 GiB keeps freed blocks in the heap
for reuse. Measured on the 2-vCPU machine (``bench/README.md``): a forward pass plus ``dE/dx`` of the
MNIST ConvNet at batch 64 went from 28 to 19 ms on 1 thread and from 18 to 10 ms on 2 threads.
The cost: the process keeps its peak heap instead of returning it to the operating system.

What does not live here: the benchmarks that measure it (``bench/speed.py``), device choice
(:mod:`jem_core.utils`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_malloc", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
MMAP_THRESHOLD = 32 * 2**20  # the largest value glibc accepts on 64-bit
TRIM_THRESHOLD = 2**30
_tuned = False


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (see the module docstring).

    Returns True when the settings are in effect (now or from an earlier call). Does nothing and
    returns False off glibc (macOS, Windows, musl) and when the user set ``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES`` (their choice wins).
    """
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux") or any(
            k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # no libc by that name, or a libc without mallopt (musl)
        return False
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _tuned
