"""Process-wide speed settings for CPU runs: call :func:`tune_malloc` once at start-up.

glibc's ``malloc`` serves blocks above its mmap threshold with fresh ``mmap`` pages and unmaps them
on ``free``; its dynamic threshold only rises to the size of a freed block, so a same-sized block
(the next step's activation map, a few MB for the MNIST ConvNet at batch 64) is mapped again, and
every SGLD step page-faults through all its activations anew. Raising the mmap threshold to
glibc's maximum (32 MiB on 64-bit) and the trim threshold to 1 GiB keeps freed blocks in the heap
for reuse. Measured on the 2-vCPU machine (``bench/README.md``): a forward pass plus ``dE/dx`` of the
MNIST ConvNet at batch 64 went from 28 to 19 ms on 1 thread and from 18 to 10 ms on 2 threads.

The cost: the process keeps its peak heap instead of returning it to the operating system, and in a
server whose many threads each run torch (the dashboard: a script thread per session and run) blocks of
every size from live chains, attacks, AIS and evaluations interleave in the same heap, which then
fragments: with 4 + 1 browser sessions the heap grew to 920 MB of which 640 MB were free, and the
server's memory grew by 160-250 MB after its first minute. Such a server passes
``mmap_threshold=SERVER_MMAP_THRESHOLD`` (4 MiB): a live chain's blocks (16 MNIST chains: at most 3.2 MB)
stay in the heap at full speed, larger ones (evaluation batches) are mapped and unmapped on their own and
never fragment it (its memory then grew by 58-74 MB; an SGLD step at batch 16-32 is as fast, at batch 64
1.2-1.4x slower, one ``predict_proba`` of 2,000 images 2.3-2.8x). ``tune_malloc(arena_max=N)`` also caps
the malloc arenas, so that all threads share N of them, and :func:`release_free_memory` hands free heap
pages back.

What does not live here: the benchmarks that measure it (``bench/speed.py``), device choice
(:mod:`jem_core.utils`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

__all__ = ["tune_malloc", "release_free_memory", "MMAP_THRESHOLD", "SERVER_MMAP_THRESHOLD", "TRIM_THRESHOLD"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameter numbers
MMAP_THRESHOLD = 32 * 2**20  # the largest value glibc accepts on 64-bit
#: The mmap threshold of a server whose threads mix live chains with large evaluations (see above).
SERVER_MMAP_THRESHOLD = 4 * 2**20
TRIM_THRESHOLD = 2**30


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    """glibc, loaded once; None off Linux or when no C library can be loaded."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def tune_malloc(arena_max: int | None = None, mmap_threshold: int = MMAP_THRESHOLD) -> bool:
    """Set glibc's mmap threshold to ``mmap_threshold`` bytes and its trim threshold to 1 GiB for this
    process (see the module docstring); with ``arena_max`` (>= 1), also cap the number of malloc arenas at it
    (for a process with many threads that allocate tensors, e.g. the dashboard's server, which also passes
    :data:`SERVER_MMAP_THRESHOLD`; call it before those threads start).

    Returns True when the threshold settings are in effect. Does nothing and returns False off glibc (macOS,
    Windows, musl) and when the user set ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or
    ``GLIBC_TUNABLES`` (their choice wins); the arena cap is skipped when the user set ``MALLOC_ARENA_MAX`` or
    ``GLIBC_TUNABLES``. Calling it again applies the new values.

    Raises:
        ValueError: if ``arena_max`` is given and below 1, or ``mmap_threshold`` is not in
            ``[1, MMAP_THRESHOLD]`` (glibc's range on 64-bit).
    """
    if arena_max is not None and arena_max < 1:
        raise ValueError(f"arena_max must be >= 1; got {arena_max}")
    if not 1 <= mmap_threshold <= MMAP_THRESHOLD:
        raise ValueError(f"mmap_threshold must lie in [1, {MMAP_THRESHOLD}] bytes; got {mmap_threshold}")
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:  # not Linux, no libc by that name, or a libc without mallopt (musl)
        return False
    if arena_max is not None and not any(k in os.environ for k in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")):
        mallopt(_M_ARENA_MAX, int(arena_max))
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_free_memory() -> bool:
    """Return the heap's free pages to the operating system (glibc's ``malloc_trim(0)``, which also releases
    whole free pages inside the heap, not only at its top). Under :func:`tune_malloc`'s trim threshold a
    process otherwise keeps the peak heap of its largest computation; a server calls this after one.
    Cost: a walk over the free lists (milliseconds). Returns True when memory was released, False when
    none could be or off glibc."""
    trim = getattr(_libc(), "malloc_trim", None)
    return bool(trim(0)) if trim is not None else False
