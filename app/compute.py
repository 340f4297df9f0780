"""Shared computation in the dashboard: the result cache, its progress box, and the server-wide worker limit.

- :func:`cached`: a small LRU of evaluation results shared by every session, keyed by everything a result
  depends on and bounded in entries and in megabytes (:data:`CACHE_MB`); a miss starts a shared :class:`Job`
  (its own thread, holding a :func:`worker` slot) that every session asking for the same key waits for, in
  :func:`progress_box` (elapsed time, time left from measured throughput, a Cancel button); it runs while a
  connected session still wants it; :func:`prefetch` starts one ahead of any visit; a result stored in a file
  (``stored``: the bundled models' precomputed estimates) is read instead of computed.
- :func:`worker`: at most :data:`N_WORKERS` heavy computations at once in this server (one per core, each on
  one torch thread), with a visible wait for a free one; live views ask without waiting and skip a tick
  (one that skipped its last tick waits a moment at the next).
- :func:`live_share`: the live views of all sessions together use at most :data:`LIVE_SHARE` of the workers'
  time; with more sessions live, each gets a smaller share of SGLD time, so pages and other computations still
  find a free core; :func:`refresh_interval`: with more sessions live, each refreshes less often (all together
  at most :data:`LIVE_REFRESHES_PER_S`); :func:`live_interval`: their secondary figures redraw less often.
- :func:`in_background`: work the server does once, ahead of any visit (at low CPU priority, outside the workers);
  :func:`hurry`: a visit waits for it, at the server's priority.
- :func:`note_arrival`, :func:`wait_for_quiet`: work ahead of visits gives way to arriving visitors (it begins, and
  goes on, once no new session has started for :data:`ARRIVAL_QUIET_S` seconds), so their first pages load first.
- :func:`session_alive`: whether a browser session is still connected (work it started can stop by itself).
- :func:`start_memory_keeper`: the server's freed heap goes back to the system every
  :data:`MEMORY_RELEASE_S` seconds, whichever thread freed it.

What does not live here: what is computed (``jem_core``) and how results are shown (``app/figures.py``).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import os
import threading
import time
import traceback
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
#: Bound of the shared result cache in entries.
CACHE_ITEMS = 96
#: Keys remembered as having no stored result (:func:`cached`'s ``stored``), so that a file is looked for once.
NOT_STORED_KEYS = 1024


#: Share of the workers' time that all sessions' live views (the Langevin chains) may use together
#: (``$JEM_LIVE_SHARE`` overrides): with 0.5 on 2 cores the chains of every session together use about one core.
LIVE_SHARE = float(os.environ.get("JEM_LIVE_SHARE", 0.5))
#: Live picture refreshes per second that all sessions' live views may make together (``$JEM_LIVE_REFRESHES``
#: overrides; see :func:`refresh_interval`).
LIVE_REFRESHES_PER_S = float(os.environ.get("JEM_LIVE_REFRESHES", 8))
#: A live view that has not ticked for this many seconds no longer counts as live.
LIVE_WINDOW_S = 2.0
#: Seconds between two hand-backs of the server's free heap to the system (``$JEM_MEMORY_RELEASE_S``; 0: never).
MEMORY_RELEASE_S = float(os.environ.get("JEM_MEMORY_RELEASE_S", 10))
#: CPU niceness added to the threads of :func:`in_background` (work nobody waits for yet).
BACKGROUND_NICE = 10
#: Seconds without a new visitor (a browser session's first script run) before work ahead of visits begins or goes
#: on (``$JEM_ARRIVAL_QUIET_S`` overrides; 0: it never waits). A visitor's first page, computations included, takes
#: well under this on 2 cores once the libraries are imported (``bench/README.md``).
ARRIVAL_QUIET_S = float(os.environ.get("JEM_ARRIVAL_QUIET_S", 10))
_BASE_NICE = os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else 0  # the server's own


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


def _steady(new: float, current: float | None, grow_at_once: bool = False) -> float:
    """``new``, unless the interval in use ``current`` is within [0.5, 1.5] times it (``grow_at_once``: within
    [0.5, 1] times it): a live-session count that wavers between two values does not change an interval back and
    forth (a change needs a full rerun)."""
    if current is None or new > (1.0 if grow_at_once else 1.5) * current or new < 0.5 * current:
        return float(new)
    return float(current)


def live_interval(base: float, live: int, current: float | None = None) -> float:
    """Seconds between redraws of a secondary live view (the chains' traces) with ``live`` sessions' live views
    running on this server: ``base * live``, so that all sessions together redraw it about once per ``base``.
    Measured with 4 live chain sessions on 2 cores, browsers on the same machine (``bench/load.py``): 1.4-1.5
    picture refreshes/s each with the two trace figures redrawn every second, 2.3-2.7 without any redraw.
    Given the interval in use ``current``, the result changes only when the new one is over 1.5x or under half
    of it, so that a count wavering between two values does not change it (a change needs a full rerun)."""
    return _steady(float(base) * max(1, int(live)), current)


def refresh_interval(base: float, live: int, current: float | None = None) -> float:
    """Seconds between two refreshes of a live view (the chains' pictures) with ``live`` sessions' live views
    running on this server: ``max(base, live / LIVE_REFRESHES_PER_S)``: alone (or with one other at the default
    8/s) a view refreshes every ``base`` seconds; with more, all of them together refresh at most
    :data:`LIVE_REFRESHES_PER_S` times per second (4 sessions: every 0.5 s each). Each refresh costs the server a
    script rerun, a PNG and a message, and a browser a re-render (about 130 ms of a core), whatever the SGLD
    steps in it; a view that refreshes less often does more steps per refresh (:func:`live_share` bounds the
    steps), so the chains advance at least as fast (measured in ``bench/README.md``). Given the interval in use
    ``current``, a longer one is taken at once (the bound holds, and sessions that started at different counts
    end on the same interval) and a shorter one only under half of it (a count wavering down does not change it;
    a change needs a full rerun). Raises ValueError when ``base`` is not positive."""
    if not base > 0:
        raise ValueError(f"refresh interval must be positive seconds, got {base!r}")
    return _steady(max(float(base), max(1, int(live)) / LIVE_REFRESHES_PER_S), current, grow_at_once=True)


def live_sessions(besides: str | None = None, now: float | None = None) -> int:
    """How many sessions other than ``besides`` ticked a live view in the last :data:`LIVE_WINDOW_S` seconds
    (``now``: seconds, monotonic, for tests)."""
    t = time.monotonic() if now is None else now
    state = _live()
    with state["lock"]:
        return sum(1 for k, v in state["seen"].items() if k != besides and t - v <= LIVE_WINDOW_S)


@st.cache_resource(show_spinner=False)
def _store() -> dict[str, Any]:
    return {"lock": threading.Lock(), "data": OrderedDict(), "bytes": {}, "not_stored": set()}


def _read_stored(key: tuple, stored: Callable[[], Any] | None) -> Any:
    """The result ``stored()`` reads for ``key`` from a file (then kept in the result store), or None: no
    ``stored``, nothing there, or already looked up in vain (at most :data:`NOT_STORED_KEYS` such keys are
    remembered)."""
    if stored is None:
        return None
    s = _store()
    with s["lock"]:
        if key in s["not_stored"]:
            return None
    value = stored()
    if value is None:
        with s["lock"]:
            if len(s["not_stored"]) >= NOT_STORED_KEYS:
                s["not_stored"].clear()
            s["not_stored"].add(key)
        return None
    _keep(key, value)
    return value


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

    Yields ``progress(fraction in [0, 1], elapsed=None)``. The estimate is measured throughput:
    ``elapsed * (1 - f) / f``, with ``elapsed`` the seconds since the box opened unless given (a computation
    that started before this visit: its own time).
    Cancel works by Streamlit's own interruption: its click reruns the script, which stops a computation
    running in the script at its next progress update (no thread is left behind); the click also marks the
    session so that the computation asked for first on the rerun raises :class:`Cancelled` instead of starting
    again (:func:`cached` then also stops its shared job unless another session waits for it). Raises
    :class:`Cancelled` at entry when that mark is set.
    """
    if st.session_state.pop(_CANCEL, False):
        raise Cancelled(label)
    slot = st.empty()
    box = slot.container(border=True)
    bar = box.progress(0.0, text=label)
    box.button("Cancel", key=f"cancel_{hashlib.sha1(label.encode()).hexdigest()[:10]}", icon=":material/cancel:",
               on_click=lambda: st.session_state.__setitem__(_CANCEL, True))
    t0 = time.monotonic()

    def progress(f: float, elapsed: float | None = None) -> None:
        f = min(max(float(f), 0.0), 1.0)
        elapsed = time.monotonic() - t0 if elapsed is None else elapsed
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
def worker(label: str, wait: bool | float = True) -> Iterator[bool]:
    """Hold one of the server's :data:`N_WORKERS` compute slots while the block runs.

    With ``wait=True``, shows "waiting for a free worker" until a slot frees (the wait can be interrupted like
    any script run) and yields True; with ``wait=False``, yields False at once when every slot is busy, so a
    live view can skip a tick instead of queueing behind long computations; with a number of seconds, waits
    that long at most, silently, then yields whether it got a slot (a live view that lost the race for a slot
    at its last tick: views whose timers tick in step with others' would otherwise lose it tick after tick).
    """
    w = _workers()
    got = w["sem"].acquire(blocking=False)
    if not got and not isinstance(wait, bool) and wait > 0:
        got = w["sem"].acquire(timeout=float(wait))
    elif not got and wait is True:
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


class Abandoned(Exception):
    """Nobody wants a shared computation any more: every session that asked for it closed its tab, pressed
    Cancel, or asked its page for something else (see :func:`cached`)."""


@dataclasses.dataclass(eq=False)
class Job:
    """One shared computation of :func:`cached`, run in its own thread.

    ``progress`` is the fraction done in ``[0, 1]``; ``started`` the monotonic time it got its worker (None
    while it waits for one); ``done`` is set when it ended, with ``value`` or ``error``. ``background``: started
    by :func:`prefetch` (no visitor yet): ``nice`` added to its thread's niceness until a visit joins it, no
    worker slot, runs to the end; ``give_way``: until a visit joins it, it begins and goes on only once no visitor
    has arrived for :data:`ARRIVAL_QUIET_S` seconds (:func:`wait_for_quiet`)."""

    key: tuple
    label: str
    background: bool = False
    nice: int = BACKGROUND_NICE
    give_way: bool = False
    thread_id: int | None = None
    progress: float = 0.0
    started: float | None = None
    value: Any = None
    error: BaseException | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


@st.cache_resource(show_spinner=False)
def _jobs() -> dict[str, Any]:
    # jobs: key -> Job in flight; wants: (session id, page) -> the key that page of that session waits for
    return {"lock": threading.Lock(), "jobs": {}, "wants": {}}


def _set_nice(thread_id: int, nice: int) -> None:
    """Set one thread's niceness (Linux: per thread); where the system refuses (raising priority back needs
    root or ``RLIMIT_NICE``) or has no per-thread niceness, nothing changes."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, thread_id, nice)


_EXITING = threading.Event()  # set at interpreter exit: every job stops at its next progress call


@atexit.register
def _stop_jobs() -> None:
    """At exit, stop the jobs and wait for them and for :func:`in_background` threads (at most 10 s each): a
    daemon thread killed inside torch aborts the process ("terminate called without an active exception",
    exit status 134)."""
    _EXITING.set()
    with contextlib.suppress(Exception):
        for job in list(_jobs()["jobs"].values()):
            job.done.wait(10)
        for thread in list(_background()["threads"].values()):
            thread.join(10)


def _wanted(job: Job) -> bool:
    """True while a :func:`prefetch` started ``job`` or a connected session's page still asks for it (and the
    process is not exiting)."""
    if _EXITING.is_set():
        return False
    if job.background:
        return True
    j = _jobs()
    with j["lock"]:
        sessions = [who[0] for who, k in j["wants"].items() if k == job.key]
    return any(session_alive(s) for s in sessions)


def _keep(key: tuple, value: Any) -> None:
    """Put ``value`` in the result store (least recently used dropped first; a result over the bound is not kept)."""
    s = _store()
    size, limit = nbytes(value), CACHE_MB * 2**20
    with s["lock"]:
        if size > limit:
            return
        s["data"][key], s["bytes"][key] = value, size
        s["data"].move_to_end(key)
        while len(s["data"]) > CACHE_ITEMS or sum(s["bytes"].values()) > limit:
            old, _ = s["data"].popitem(last=False)
            s["bytes"].pop(old, None)


def _run_job(job: Job, compute: Callable[[Callable[[float], None]], Any]) -> None:
    """The job's thread: a worker slot (a background job: lower CPU priority instead), ``compute``, the store."""
    w = _workers()
    got = False
    try:
        if job.background:
            _set_nice(threading.get_native_id(), _BASE_NICE + job.nice)
            j = _jobs()
            with j["lock"]:  # a visit that came before this line found no thread to raise: raise it here
                job.thread_id = threading.get_native_id()
                if job.key in j["wants"].values():
                    _set_nice(job.thread_id, _BASE_NICE)
        else:
            while not got:
                if not _wanted(job):
                    raise Abandoned(job.label)
                got = w["sem"].acquire(timeout=0.5)
            with w["lock"]:
                w["busy"] += 1

        def unjoined() -> bool:
            j = _jobs()
            with j["lock"]:
                return job.key not in j["wants"].values()

        if job.give_way:
            wait_for_quiet(unjoined)
        job.started = time.monotonic()

        def progress(f: float) -> None:
            job.progress = min(max(float(f), 0.0), 1.0)
            if job.give_way:
                wait_for_quiet(unjoined)
            if not _wanted(job):
                raise Abandoned(job.label)

        value = compute(progress)
        job.progress = 1.0
        _keep(job.key, value)
        job.value = value
    except BaseException as e:  # noqa: BLE001 - handed to the sessions waiting for it, re-raised there
        job.error = e
        if job.background and not isinstance(e, Abandoned):  # nobody waits to see it: the server log does
            traceback.print_exc()
    finally:
        if got:
            with w["lock"]:
                w["busy"] -= 1
            w["sem"].release()
        j = _jobs()
        with j["lock"]:
            j["jobs"].pop(job.key, None)
            for who in [who for who, k in j["wants"].items() if k == job.key]:
                del j["wants"][who]
        job.done.set()
        release_free_memory()  # the computation's peak heap goes back to the system


def _start(key: tuple, compute: Callable[[Callable[[float], None]], Any], label: str, background: bool,
           who: tuple[str | None, str] | None, nice: int = BACKGROUND_NICE,
           give_way: bool = False) -> tuple[Any, Job | None]:
    """The stored result ``(value, None)``, or ``(None, job)``: the job in flight for ``key`` or a new one.
    ``who`` (session, page) is recorded as waiting for it, in place of what that page waited for before."""
    j, s = _jobs(), _store()
    with j["lock"]:
        with s["lock"]:
            if key in s["data"]:
                s["data"].move_to_end(key)
                return s["data"][key], None
        job = j["jobs"].get(key)
        if job is None:
            job = j["jobs"][key] = Job(key, label, background, nice, give_way)
            threading.Thread(target=_run_job, args=(job, compute), daemon=True,
                             name=f"jem-job-{hashlib.sha1(repr(key).encode()).hexdigest()[:8]}").start()
        if who is not None:
            j["wants"][who] = key
            if job.background and job.thread_id is not None:  # someone waits for it now: back to full priority
                _set_nice(job.thread_id, _BASE_NICE)
    return None, job


def _who() -> tuple[str | None, str]:
    """(session id, page) of the running script: a page waits for one shared computation at a time."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx(suppress_warning=True)
    return (None, "") if ctx is None else (ctx.session_id, str(ctx.page_script_hash))


def cached(key: tuple, compute: Callable[[Callable[[float], None]], T], label: str,
           stored: Callable[[], T | None] | None = None) -> T:
    """Shared store of evaluation results keyed by ``key``; a miss computes once for every session that asks.

    ``stored``: called on a miss before anything is computed, in the asking thread; it returns the result read
    from a file (a precomputed estimate), which is then kept like a computed one, or None (computed as usual).
    It is called once per key while the server runs.

    ``compute`` receives a ``progress(fraction)`` callback and runs in a thread of its own holding a
    :func:`worker` slot (so at most :data:`N_WORKERS` computations run at once, server-wide); the page shows
    its progress in :func:`progress_box` (or "waiting for a free worker" before it starts). A session that asks
    for a key already being computed (another visitor's, a :func:`prefetch`, or its own from before a page
    switch) waits for that computation instead of starting its own. The computation runs on while a connected
    session still wants it: it stops (:class:`Abandoned`, at its next progress call) when every session
    that asked closed its tab, pressed Cancel, or asked the same page for another key (changed a setting), and
    nothing is kept; a page left for another keeps its computation going, and a later visit finds it done or
    under way.

    Keys must name everything the result depends on (model keys from :func:`entry_key`, dataset, number of
    images, settings). The store keeps at most :data:`CACHE_ITEMS` results and :data:`CACHE_MB` megabytes of their
    tensor and array data (:func:`nbytes`), dropping the least recently used first; a result larger than the
    bound is returned but not kept. Raises :class:`Cancelled` when the user cancelled this computation, and
    whatever ``compute`` raised.
    """
    s = _store()
    with s["lock"]:
        if key in s["data"]:  # a hit: before the Cancel mark, which belongs to the first computation asked for
            s["data"].move_to_end(key)
            return s["data"][key]
    value = _read_stored(key, stored)
    if value is not None:
        return value
    who = _who()
    if st.session_state.pop(_CANCEL, False):
        j = _jobs()
        with j["lock"]:
            j["wants"].pop(who, None)  # this page no longer waits: the computation stops unless others want it
        raise Cancelled(label)
    value, job = _start(key, compute, label, background=False, who=who)
    if job is None:
        return value
    if not job.done.is_set():
        wait = st.empty()
        with progress_box(label) as progress:
            while not job.done.wait(0.25):
                if job.started is None:
                    wait.info(f"Waiting for a free worker for: {label} ({workers_busy()} computations are using "
                              f"this machine's {N_WORKERS} worker{'s' if N_WORKERS > 1 else ''})",
                              icon=":material/hourglass_top:")
                else:
                    wait.empty()
                    progress(job.progress, time.monotonic() - job.started)
        wait.empty()
    # Dropped by the sessions that wanted it just before this one asked: compute it again, for this one.
    if isinstance(job.error, Abandoned) and not _EXITING.is_set():
        return cached(key, compute, label)
    if job.error is not None:
        raise job.error
    return job.value


def prefetch(key: tuple, compute: Callable[[Callable[[float], None]], Any], label: str,
             stored: Callable[[], Any] | None = None, nice: int = BACKGROUND_NICE,
             give_way: bool = False) -> Job | None:
    """Compute a :func:`cached` result ahead of any visit: a job that takes no worker slot and runs to the end
    whoever watches it, its thread ``nice`` (0-19, default :data:`BACKGROUND_NICE`) above the server's niceness.
    ``give_way``: it begins, and goes on at each of its progress calls, only once no visitor has arrived for
    :data:`ARRIVAL_QUIET_S` seconds (:func:`wait_for_quiet`). Returns the job (None when the result is already
    stored). A visit asking for ``key`` meanwhile waits for it: the job then no longer gives way, and its thread
    goes back to the server's priority where the system lets a process raise it (Linux: as root, or within
    ``RLIMIT_NICE``; elsewhere it stays lower). ``stored``: as for :func:`cached` (a result it reads starts no
    job). Callable from any thread."""
    s = _store()
    with s["lock"]:
        held = key in s["data"]
    if not held and _read_stored(key, stored) is not None:
        return None
    _, job = _start(key, compute, label, background=True, who=None, nice=int(nice), give_way=bool(give_way))
    return job


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
def _arrivals() -> dict[str, Any]:
    # seen: session id -> monotonic time of its first script run; last: the latest such time (None: no visitor yet)
    return {"lock": threading.Lock(), "seen": {}, "last": None}


def note_arrival(session_id: str | None, now: float | None = None) -> bool:
    """Record a script run of ``session_id``; returns True when it is the session's first (a visitor arrived: a
    new tab, or a full reload of one). ``None`` (no session: a bare import, a server thread) records nothing.
    Sessions no longer connected are forgotten. ``now``: seconds, monotonic, for tests. Callable from any thread."""
    if session_id is None:
        return False
    t = time.monotonic() if now is None else now
    state = _arrivals()
    with state["lock"]:
        seen = state["seen"]
        if session_id in seen:
            return False
        for k in [k for k in seen if not session_alive(k)]:
            del seen[k]
        seen[session_id] = state["last"] = t
        return True


def since_last_arrival(now: float | None = None) -> float:
    """Seconds since a visitor last arrived (:func:`note_arrival`); infinity before the first."""
    last = _arrivals()["last"]
    return float("inf") if last is None else (time.monotonic() if now is None else now) - last


def wait_for_quiet(keep_waiting: Callable[[], bool] = lambda: True, quiet_s: float | None = None) -> float:
    """Sleep until no visitor has arrived for ``quiet_s`` seconds (default :data:`ARRIVAL_QUIET_S`), while
    ``keep_waiting()`` holds (checked every 0.25 s; e.g. False once a visit waits for the work) and the process is
    not exiting. Returns the seconds slept.

    Work ahead of visits calls this before it begins and between its steps, so that arriving visitors' first
    pages get the cores (their scripts, the files their browsers fetch, their first computations): a thread that
    sleeps holds neither a core nor the interpreter lock, which a lower CPU priority alone does not give (a niced
    thread can hold the lock while it waits for a core). Measured in ``bench/README.md`` ("A fresh server's
    first minute")."""
    quiet = ARRIVAL_QUIET_S if quiet_s is None else float(quiet_s)
    t0 = time.monotonic()
    while not _EXITING.is_set():
        left = quiet - since_last_arrival()
        if left <= 0 or not keep_waiting():  # the clock first: quiet is the common case, the callback takes a lock
            break
        time.sleep(min(left, 0.25))
    return time.monotonic() - t0


@st.cache_resource(show_spinner=False)
def _background() -> dict[str, Any]:
    return {"lock": threading.Lock(), "threads": {}, "ids": {}, "hurried": set()}


def hurry(name: str) -> None:
    """A visit now waits for the :func:`in_background` work ``name``: it begins at once if it was still giving way
    to arriving visitors, and its thread goes back to the server's CPU priority where the system lets a process
    raise it (Linux: as root, or within ``RLIMIT_NICE``). Without it, a niced thread gets about a tenth of a core
    that busy browsers also want: the playground's pair took minutes under load (``bench/README.md``). Cheap;
    a name never started, or finished, changes nothing."""
    state = _background()
    with state["lock"]:
        thread = state["threads"].get(name)
        if thread is None or not thread.is_alive():
            return
        state["hurried"].add(name)
        thread_id = state["ids"].get(name)
    if thread_id is not None:
        _set_nice(thread_id, _BASE_NICE)


def in_background(name: str, work: Callable[[], Any], nice: int = BACKGROUND_NICE,
                  give_way: bool = False) -> threading.Thread:
    """Run ``work()`` once per server process, in a daemon thread, ahead of the visits that will need it.

    The first call with a ``name`` starts the thread; later calls (any session, any run) return that same
    thread, finished or not. The thread lowers its own CPU priority by ``nice`` (default :data:`BACKGROUND_NICE`;
    Linux: per thread), so that the computations of pages being looked at win the cores (a niced thread gets
    about a tenth of a core that one of them also wants); ``nice=0`` for short work that a visit may wait for
    inside a lock it cannot raise (a module import: a page importing the same module waits for this thread).
    It takes no :func:`worker` slot: the slots admit work
    someone waits for, and one held by this thread would leave a live view with none (its chains stall while
    the other slot computes a page). ``work`` should fill a shared ``st.cache_resource`` entry that the pages
    then read (a :func:`cached` result is computed ahead by :func:`prefetch` instead): a visit that
    arrives first computes as usual or waits for the same entry. ``give_way``: the thread first waits until no
    visitor has arrived for :data:`ARRIVAL_QUIET_S` seconds (:func:`wait_for_quiet`; once begun, ``work`` runs to
    its end). A visit that waits for ``work``'s result calls :func:`hurry`. An exception in ``work`` is printed to
    the server log and the visit computes for itself.
    """
    state = _background()
    with state["lock"]:
        thread = state["threads"].get(name)
        if thread is None:
            def run() -> None:
                if give_way:
                    wait_for_quiet(lambda: name not in state["hurried"])
                if _EXITING.is_set():
                    return
                with state["lock"]:
                    state["ids"][name] = threading.get_native_id()
                    hurried = name in state["hurried"]
                _set_nice(threading.get_native_id(), _BASE_NICE + (0 if hurried else int(nice)))
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
