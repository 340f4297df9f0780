"""Shared computation in the dashboard: the result cache, its progress box, and the server-wide worker limit.

- :func:`cached`: a small LRU of evaluation results shared by every session, keyed by everything a result
  depends on and bounded in entries and in megabytes (:data:`CACHE_MB`); a miss computes inside :func:`progress_box` (elapsed time, time left from measured throughput,
  a Cancel button) while holding a :func:`worker` slot.
- :func:`worker`: at most :data:`N_WORKERS` heavy computations at once in this server (one per core, each on
  one torch thread), with a visible wait for a free one; live views ask without waiting and skip a tick.
- :func:`live_share`: the live views of all sessions together use at most :data:`LIVE_SHARE` of the workers'
  time; with more sessions live, each gets a smaller compute budget per refresh (fewer steps, same refresh
  rate), so pages and other computations still find a free core.
- :func:`in_background`: work the server does once, ahead of any visit (at low CPU priority, outside the workers).
- :func:`start_memory_keeper`: the server's freed heap goes back to the system every
  :data:`MEMORY_RELEASE_S` seconds, whichever thread freed it.

What does not live here: what is computed (``jem_core``) and how results are shown (``app/figures.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable, Iterator, TypeVar

import streamlit as st
import torch

from jem_core.perf import release_free_memory

T = TypeVar("T")

#: Heavy computations (evaluations, attacks, AIS, live-chain steps) that may run at once in this server,
#: across all sessions: one per CPU core (``$JEM_WORKERS`` overrides). Each runs torch on one thread, so
#: the cores are shared fairly instead of oversubscribed (two 2-thread pools on 2 shared cores were
#: measured 10x slower).
N_WORKERS = max(1, int(os.environ.get("JEM_WORKERS", 0)) or (os.cpu_count() or 1))
torch.set_num_threads(int(os.environ.get("JEM_TORCH_THREADS", 1)))

#: Bound of the shared result cache in megabytes of tensor and array data (``$JEM_CACHE_MB`` overrides);
#: the least recently used results are dropped first. 96 MB hold about 30 results of 1,000 MNIST images
#: (an OOD set or an attack's adversarial images: 3.1 MB each) and keep the cache within the dashboard's
#: memory target (growth under load within 150 MB).
CACHE_MB = float(os.environ.get("JEM_CACHE_MB", 96))


#: Share of the workers' time that all sessions' live views (the Langevin chains) may use together
#: (``$JEM_LIVE_SHARE`` overrides): with 0.5 on 2 cores the chains of every session together use about one core.
LIVE_SHARE = float(os.environ.get("JEM_LIVE_SHARE", 0.5))
#: A live view that has not ticked for this many seconds no longer counts as live.
LIVE_WINDOW_S = 2.0
#: Seconds between two hand-backs of the server's free heap to the system (``$JEM_MEMORY_RELEASE_S``; 0: never).
MEMORY_RELEASE_S = float(os.environ.get("JEM_MEMORY_RELEASE_S", 10))
#: CPU niceness added to the threads of :func:`in_background` (work nobody waits for yet).
BACKGROUND_NICE = 10


@st.cache_resource(show_spinner=False)
def _live() -> dict[str, Any]:
    return {"lock": threading.Lock(), "seen": {}}


def live_share(session: str | None, duty: float, now: float | None = None) -> tuple[float, int]:
    """Register a tick of ``session``'s live view and return ``(factor, live)``: the factor in (0, 1] by
    which the view scales its compute budget, and how many sessions' live views ticked in the last
    :data:`LIVE_WINDOW_S` seconds (this one included).

    ``duty`` is the fraction of wall time one view computes at its full budget (e.g. 0.5: half of each
    refresh interval). The factor is ``min(1, LIVE_SHARE * N_WORKERS / (live * duty))``: the live views
    together stay within :data:`LIVE_SHARE` of the workers' time. ``now`` (seconds, monotonic) is for tests.
    """
    t = time.monotonic() if now is None else now
    state = _live()
    with state["lock"]:
        seen = state["seen"]
        seen[session] = t
        for k in [k for k, v in seen.items() if t - v > LIVE_WINDOW_S]:
            del seen[k]
        live = len(seen)
    return min(1.0, LIVE_SHARE * N_WORKERS / (live * max(duty, 1e-9))), live


@st.cache_resource(show_spinner=False)
def _store() -> dict[str, Any]:
    return {"lock": threading.Lock(), "data": OrderedDict(), "bytes": {}}


def nbytes(value: Any, _seen: set[int] | None = None) -> int:
    """Bytes of tensor and array data held by ``value`` (tensors, NumPy arrays, and containers of them:
    dicts, lists, tuples, sets, dataclasses, objects' ``__dict__``); each object counted once. Other objects
    count 0: the result cache's bound is on the data that dominates it (images, logits, scores)."""
    import dataclasses

    import numpy as np

    seen = set() if _seen is None else _seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(nbytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return sum(nbytes(v, seen) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes(getattr(value, f.name), seen) for f in dataclasses.fields(value))
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return sum(nbytes(v, seen) for v in vars(value).values())
    return 0


def cache_stats() -> dict[str, float]:
    """The shared result cache now: ``{"entries": int, "mb": float}`` (megabytes of tensor and array data)."""
    s = _store()
    with s["lock"]:
        return {"entries": len(s["data"]), "mb": sum(s["bytes"].values()) / 2**20}


class Cancelled(Exception):
    """The user pressed Cancel on a long computation (see :func:`progress_box`)."""


_CANCEL = "_jem_cancel"  # session_state: True after a Cancel click, until the next computation sees it


@contextlib.contextmanager
def progress_box(label: str) -> Iterator[Callable[[float], None]]:
    """A progress bar with elapsed time, an estimate of the time left, and a Cancel button.

    Yields ``progress(fraction in [0, 1])``. The estimate is measured throughput: ``elapsed * (1 - f) / f``.
    Cancel works by Streamlit's own interruption: its click reruns the script, which stops the running
    computation at its next progress update (no thread is left behind); the click also marks the session
    so that the computation asked for first on the rerun raises :class:`Cancelled` instead of starting
    again. Raises :class:`Cancelled` at entry when that mark is set.
    """
    if st.session_state.pop(_CANCEL, False):
        raise Cancelled(label)
    slot = st.empty()
    box = slot.container(border=True)
    bar = box.progress(0.0, text=label)
    box.button("Cancel", key=f"cancel_{hashlib.sha1(label.encode()).hexdigest()[:10]}", icon=":material/cancel:",
               on_click=lambda: st.session_state.__setitem__(_CANCEL, True))
    t0 = time.monotonic()

    def progress(f: float) -> None:
        f = min(max(float(f), 0.0), 1.0)
        elapsed = time.monotonic() - t0
        eta = f", about {elapsed * (1 - f) / f:.0f} s left" if 0.02 <= f < 1 and elapsed > 1 else ""
        bar.progress(f, text=f"{label} {f:.0%} · {elapsed:.0f} s{eta}")
    try:
        yield progress
    finally:
        slot.empty()


@st.cache_resource(show_spinner=False)
def _workers() -> dict[str, Any]:
    return {"sem": threading.BoundedSemaphore(N_WORKERS), "lock": threading.Lock(), "busy": 0}


@contextlib.contextmanager
def worker(label: str, wait: bool = True) -> Iterator[bool]:
    """Hold one of the server's :data:`N_WORKERS` compute slots while the block runs.

    With ``wait``, shows "waiting for a free worker" until a slot frees (the wait can be interrupted like
    any script run) and yields True; without, yields False at once when every slot is busy, so a live
    view can skip a tick instead of queueing behind long computations.
    """
    w = _workers()
    got = w["sem"].acquire(blocking=False)
    if not got and wait:
        slot = st.empty()
        t0 = time.monotonic()
        while not got:
            slot.info(f"Waiting for a free worker for: {label} ({w['busy']} computations are using this machine's "
                      f"{N_WORKERS} worker{'s' if N_WORKERS > 1 else ''}; {time.monotonic() - t0:.0f} s so far)",
                      icon=":material/hourglass_top:")
            got = w["sem"].acquire(timeout=0.5)
        slot.empty()
    if got:
        with w["lock"]:
            w["busy"] += 1
    try:
        yield got
    finally:
        if got:
            with w["lock"]:
                w["busy"] -= 1
            w["sem"].release()


def workers_busy() -> int:
    """How many of the server's compute slots are in use now."""
    return int(_workers()["busy"])


def cached(key: tuple, compute: Callable[[Callable[[float], None]], T], label: str, max_items: int = 96) -> T:
    """Shared store of evaluation results keyed by ``key``; computes on a miss inside :func:`progress_box`,
    holding a :func:`worker` slot (so at most :data:`N_WORKERS` computations run at once, server-wide).

    ``compute`` receives a ``progress(fraction)`` callback. Keys must name everything the result
    depends on (model keys from :func:`entry_key`, dataset, number of images, settings). The store keeps at
    most ``max_items`` results and :data:`CACHE_MB` megabytes of their tensor and array data (:func:`nbytes`),
    dropping the least recently used first; a result larger than the bound is returned but not kept.
    Raises :class:`Cancelled` when the user cancelled this computation.
    """
    s = _store()
    with s["lock"]:
        if key in s["data"]:
            s["data"].move_to_end(key)
            return s["data"][key]
    try:
        with worker(label), progress_box(label) as progress:
            value = compute(progress)
    finally:  # the computation's peak heap goes back to the system instead of staying with the server
        release_free_memory()
    size, limit = nbytes(value), CACHE_MB * 2**20
    with s["lock"]:
        if size > limit:
            return value
        s["data"][key], s["bytes"][key] = value, size
        s["data"].move_to_end(key)
        while len(s["data"]) > max_items or sum(s["bytes"].values()) > limit:
            old, _ = s["data"].popitem(last=False)
            s["bytes"].pop(old, None)
    return value


def digest_files(files: Iterable[Any]) -> str:
    """A short hash of uploaded files' names and bytes (cache key for uploads)."""
    h = hashlib.sha256()
    for f in files:
        h.update(str(getattr(f, "name", "")).encode())
        h.update(f.getvalue())
    return h.hexdigest()[:16]


def current_session_id() -> str | None:
    """This browser session's id (None outside a script run: a bare import, a server thread)."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx(suppress_warning=True)
    return None if ctx is None else ctx.session_id


def session_alive(session_id: str | None) -> bool:
    """True while the browser session is connected (callable from any thread, e.g. a training thread).

    A closed tab disconnects its session; background work started by it can then stop by itself.
    """
    from streamlit import runtime

    if session_id is None or not runtime.exists():
        return True  # no runtime (tests, bare mode): nothing to watch
    return runtime.get_instance().is_active_session(session_id)


@st.cache_resource(show_spinner=False)
def _background() -> dict[str, Any]:
    return {"lock": threading.Lock(), "threads": {}}


def in_background(name: str, work: Callable[[], Any]) -> threading.Thread:
    """Run ``work()`` once per server process, in a daemon thread, ahead of the visits that will need it.

    The first call with a ``name`` starts the thread; later calls (any session, any run) return that same
    thread, finished or not. The thread lowers its own CPU priority by :data:`BACKGROUND_NICE` (Linux: per
    thread), so that the computations of pages being looked at win the cores (a niced thread gets about a
    tenth of a core that one of them also wants), and it takes no :func:`worker` slot: the slots admit work
    someone waits for, and one held by this thread would leave a live view with none (its chains stall while
    the other slot computes a page). ``work`` should fill a shared ``st.cache_resource`` entry that the pages
    then read (not :func:`cached`, whose worker wait and progress box belong to a script run): a visit that
    arrives first computes as usual or waits for the same entry. An exception in ``work`` is printed to the
    server log and the visit computes for itself.
    """
    state = _background()
    with state["lock"]:
        thread = state["threads"].get(name)
        if thread is None:
            def run() -> None:
                with contextlib.suppress(OSError, AttributeError):  # per-thread niceness is Linux-only
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
                try:
                    work()
                finally:
                    release_free_memory()

            thread = state["threads"][name] = threading.Thread(target=run, name=f"jem-background-{name}", daemon=True)
            thread.start()
    return thread


@st.cache_resource(show_spinner=False)
def start_memory_keeper(interval_s: float = MEMORY_RELEASE_S) -> threading.Event | None:
    """Once per server process: a daemon thread that hands the free heap back to the system every
    ``interval_s`` seconds (:func:`jem_core.perf.release_free_memory`).

    Every session's script and fragment threads allocate tensors; under :func:`jem_core.perf.tune_malloc`'s
    thresholds (kept for the speed of SGLD steps) the heap otherwise keeps the highest peak any of them
    reached. One hand-back costs 0.3 ms with nothing to return and about 20 ms for 300 MB; the pages touched
    again afterwards fault back in. Returns the event that stops the thread when set, or None when
    ``interval_s`` is 0 (off).
    """
    if interval_s <= 0:
        return None
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval_s):
            release_free_memory()

    threading.Thread(target=run, name=f"jem-memory-keeper-{interval_s:g}s", daemon=True).start()
    return stop
