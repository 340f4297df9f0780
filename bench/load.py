"""Load and soak harness: several real browsers on one JEM Explorer server, on loopback only.

Starts ``streamlit run app/Home.py`` on a free port of 127.0.0.1 (or uses ``--url`` of a running server on
this machine), then drives Debian's Chromium through Playwright:

- ``--chains N`` sessions open the Langevin page, whose chains start by themselves and refresh live; in the
  page, a 50 ms timer records each change of the grid's "after N steps" caption (one refresh) and the SGLD
  steps it reports (``sgld_steps_per_s``: how fast the chains advance, whatever the refresh rate); chains that
  finish their steps (``--steps``, 2,000 by default) are started again by the page itself (``restarts``,
  :data:`CHAIN_RESTARTER`);
- ``--browse M`` sessions cycle through every page, run the default attack, upload an image on the Score
  page; per page load four times: until the browser has loaded the document ("dom"), until the page's title
  is drawn ("title": the app's scripts have run and its session has started), until the page shows its
  content or says it is computing ("shown": a chart, an image, a metric, a progress box or a notice under
  the title) and until the server has finished the page's script, computations included ("idle"), then how
  long the tab's main thread took to be free after that ("settle": charts still drawing; the next load begins
  once it is, or after 10 s); with each load, when it began ("t", seconds into the run; "since_start", seconds
  since the harness began, before the chain tabs opened: a started server's age) and the browser's own
  timing of its document phase ("nav": first and last byte of the HTML, last byte of the scripts,
  DOMContentLoaded, files fetched from the server rather than the cache; :data:`NAV_TIMING`);
- ``--train`` adds one session that trains a digits JEM on the Train page;
- ``--visitors-every S``: every S seconds a new visitor, a fresh browser context with nothing cached, loads Home
  once ("dom", "title", "shown" and "nav" as above) and leaves (``visitor_loads``; ``visitor_load_s``: their
  count, median, max and how many were under 5 s): cold first loads while the chains run steadily, apart from
  the browsing session's one first load.

Every ``--sample`` seconds it records the server's resident memory and CPU time (``/proc``) and every
session's refreshes; every second, the cores used by the server, by the Chromium processes and by the whole
machine (``cores``, :class:`CoreSampler`); twice a second, how long the server takes to answer its health check
and the app's HTML (``server_latency``, :class:`ServerProbe`: the server apart from the browsers); exceptions
shown in a page or printed by the server are collected, and so is a Start button the harness could not click
(:func:`_click_start`: a try that timed out before one that worked goes to ``click_retries``), and the status and text of
any chain page that has not refreshed for :data:`STALLED_S` seconds when the load ends (``stalled``; that last gap
counts in the session's gaps). At the end it closes the other sessions, waits for the server to
settle with one chain session left, then closes that tab and measures how long the server's CPU use takes to
fall back (the tab's work must stop). Bounded: ``--minutes`` of load, then everything is closed.

    python bench/load.py --chains 4 --browse 1 --minutes 10 --out bench/load.json
    python bench/load.py --chains 1 --browse 0 --minutes 2 --out bench/load_one.json   # the refresh rate

Writes the JSON (``--out``) and a plot next to it (``.png``): memory over time and refreshes per second per
session. Needs ``chromium`` (Debian) and the ``playwright`` Python package; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: In-page recorder of the live chains' refreshes: the time of each change of the grid caption, and the SGLD
#: steps the caption reports, summed over restarts (a count that falls means new chains).
REFRESH_RECORDER = """
window.__refreshes = [];
window.__lastCaption = null;
window.__steps = 0;
window.__lastSteps = 0;
setInterval(() => {
  const el = [...document.querySelectorAll('[data-testid="stCaptionContainer"] p, [data-testid="stImageCaption"]')]
    .find(e => /chains? from .* after \\d+ steps/.test(e.textContent || ''));
  const text = el ? el.textContent : null;
  if (text && text !== window.__lastCaption) {
    window.__refreshes.push(performance.now()); window.__lastCaption = text;
    const n = parseInt(text.match(/after (\\d+) steps/)[1]);
    window.__steps += n >= window.__lastSteps ? n - window.__lastSteps : n;
    window.__lastSteps = n;
  }
}, 50);
"""
#: In-page restart of finished chains: once the Langevin page's status says "finished" (its steps done), the page
#: clicks its own Start (at most once per 5 s; ``window.__restarts`` counts the clicks). A soak never idles, and
#: a pause between two refreshes is never the time the harness took to come back from another tab's page load
#: (the browsing tab's Likelihood page can keep it 10 s and more); :func:`_restart_finished` remains the check.
CHAIN_RESTARTER = """
window.__restarts = 0;
window.__restartAt = -1e9;
setInterval(() => {
  const done = [...document.querySelectorAll('[data-testid="stMetric"]')]
    .some(e => /finished/.test(e.textContent || ''));
  const start = document.querySelector('.st-key-lg_start button');
  if (done && start && performance.now() - window.__restartAt > 5000) {
    start.click(); window.__restartAt = performance.now(); window.__restarts += 1;
  }
}, 100);
"""
PAGES = ["", "langevin", "calibration", "robustness", "ood", "likelihood", "score", "train", "playground"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_stats(pid: int) -> tuple[float, float]:
    """(resident memory in MB, CPU seconds user+system) of a process and its children threads."""
    rss = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks


def start_server(port: int, log: Path, env_extra: dict[str, str]) -> subprocess.Popen:
    """``streamlit run app/Home.py`` on 127.0.0.1:port; waits for its health endpoint (90 s at most)."""
    env = dict(os.environ, STREAMLIT_BROWSER_GATHER_USAGE_STATS="false", **env_extra)
    out = open(log, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app/Home.py", "--server.headless", "true",
                             "--server.address", "127.0.0.1", "--server.port", str(port),
                             "--server.fileWatcherType", "none"], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("streamlit did not become healthy in 90 s")


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _idle(pg, timeout_ms: int = 120_000) -> None:
    pg.wait_for_timeout(300)
    pg.wait_for_function("() => { const e = document.querySelector('[data-testid=\"stStatusWidget\"]');"
                         " return !e || !/running|stop/i.test(e.innerText); }", timeout=timeout_ms)


def _settle(pg, timeout_ms: int = 10_000) -> float:
    """Seconds until the tab's main thread is free (``requestIdleCallback``, ``timeout_ms`` at most): what the page
    still draws once its script has finished (charts), so that the next timed load does not begin in it."""
    return round(pg.evaluate("""t => new Promise(r => { const t0 = performance.now();
        requestIdleCallback(() => r((performance.now() - t0) / 1000), {timeout: t}); })""", timeout_ms), 2)


#: What a page shows once it has loaded: its content, or a progress box or notice while it computes.
SHOWN = ('[data-testid="stMain"] :is([data-testid="stPlotlyChart"], [data-testid="stImage"], '
         '[data-testid="stMetric"], [data-testid="stProgress"], [data-testid="stAlert"], '
         '[data-testid="stExpander"])')


#: Where the document phase of a load went, from the browser's Navigation and Resource Timing (seconds after
#: the navigation started): the document's first byte ("ttfb") and last byte ("html"), the last script's last
#: byte ("scripts"), DOMContentLoaded ("dcl", after the scripts have run), and how many files came from the
#: server rather than the browser's cache ("fetched").
NAV_TIMING = """() => {
  const n = performance.getEntriesByType('navigation')[0];
  const r = performance.getEntriesByType('resource');
  const s = r.filter(e => e.initiatorType === 'script' || e.name.endsWith('.js'));
  const f = x => Math.round(x) / 1000;
  return {ttfb: f(n.responseStart), html: f(n.responseEnd), scripts: f(Math.max(0, ...s.map(e => e.responseEnd))),
          dcl: f(n.domContentLoadedEventStart), fetched: r.filter(e => e.transferSize > 0).length};
}"""


def timed_load(pg, url: str) -> dict:
    """Load ``url`` in the Playwright page ``pg``; seconds (2 decimals) until the document has loaded ("dom"),
    until the page's title is drawn ("title") and until it shows content or a progress box ("shown",
    :data:`SHOWN`), and the browser's own breakdown of the document phase ("nav", :data:`NAV_TIMING`). Raises
    Playwright's TimeoutError after the page's default timeout."""
    t0 = time.monotonic()
    pg.goto(url, wait_until="domcontentloaded")
    dom = time.monotonic() - t0
    nav = pg.evaluate(NAV_TIMING)
    pg.locator("h1").first.wait_for(state="visible")
    title = time.monotonic() - t0
    pg.locator(SHOWN).first.wait_for(state="visible")
    return {"dom": round(dom, 2), "title": round(title, 2), "shown": round(time.monotonic() - t0, 2), "nav": nav}


def page_text(pg, limit: int = 400) -> str:
    """The first ``limit`` characters of what the Playwright page ``pg`` shows in its main area, on one line, or
    ``(unreadable: <error>)`` when it cannot be read within 5 s (a page that is gone, or never drew it): for a
    finding's message."""
    try:
        return pg.locator('[data-testid="stMain"]').inner_text(timeout=5_000)[:limit].replace("\n", " ")
    except Exception as e:  # noqa: BLE001 - the page may be gone
        return f"(unreadable: {type(e).__name__})"


def _click_failure(error: Exception) -> str:
    """Why a Playwright click failed, in one line: the error's type and the distinct lines of its call log (what
    it waited for: visible, enabled, stable, not covered by another element), the last 300 characters."""
    lines = [ln.strip(" -") for ln in str(error).splitlines() if ln.strip(" -")]
    return f"{type(error).__name__}: " + " | ".join(dict.fromkeys(lines))[-300:]


def _status(pg) -> str:
    """The text of the page's script-run status in the top bar ("Running...", "Connecting", ...): empty when none
    is shown (the script is idle)."""
    try:
        return " ".join(pg.locator('[data-testid="stStatusWidget"]').all_inner_texts()).strip()
    except Exception as e:  # noqa: BLE001 - the page may be gone
        return f"(unreadable: {type(e).__name__})"


def _stuck(name: str, pg, reasons: list[str], result: dict) -> None:
    """Record a Start button that could not be clicked: why (:func:`_click_failure` of each try), the tabs' states
    and the page's text."""
    try:
        tabs = pg.locator('[role="tab"]').evaluate_all(
            "els => els.map(e => e.textContent + (e.getAttribute('aria-selected') === 'true' ? ' (open)' : ''))")
    except Exception:  # noqa: BLE001 - the page may be gone
        tabs = []
    result["exceptions"].append(f"{name}/langevin: Start could not be clicked ({'; '.join(reasons)}); "
                                f"tabs {tabs}; the page showed: {page_text(pg)}")


#: Seconds without a refresh at the end of the run after which a chain session counts as stalled: its page's
#: status and text go to ``result["stalled"]``.
STALLED_S = 10

#: Tries of the Langevin page's Start, and seconds each waits for Playwright's checks (visible, enabled, stable,
#: not covered) before it gives up.
CLICK_TRIES, CLICK_TIMEOUT_S = 2, 20


def _click_start(name: str, pg, result: dict) -> bool:
    """Click the Langevin page's Start: up to :data:`CLICK_TRIES` tries of :data:`CLICK_TIMEOUT_S` each. A try
    that timed out before one that worked goes to ``result["click_retries"]`` with why (:func:`_click_failure`);
    a Start that no try could click is a finding (:func:`_stuck`). Returns whether the click happened."""
    reasons = []
    for _ in range(CLICK_TRIES):
        try:
            pg.locator(".st-key-lg_start button").filter(visible=True).first.click(timeout=CLICK_TIMEOUT_S * 1000)
        except Exception as e:  # noqa: BLE001 - e.g. Playwright's TimeoutError
            reasons.append(_click_failure(e))
            continue
        result["click_retries"].extend({"session": name, "why": r} for r in reasons)
        return True
    _stuck(name, pg, reasons, result)
    return False


def _restart_finished(chain_pages, result: dict) -> None:
    """Chains still finished when the harness looks start again: the page restarts its own chains
    (:data:`CHAIN_RESTARTER`), so this is the check that it did. A Start button that cannot be clicked within
    30 s is a finding (recorded in ``result["exceptions"]`` with what the page showed), not the end of the run."""
    for name, _, pg in chain_pages:
        if pg.locator('[data-testid="stMetric"]').filter(has_text="finished").count():
            _click_start(name, pg, result)


def _exceptions(pg) -> list[str]:
    return [t[:300] for t in pg.locator('[data-testid="stException"]').all_inner_texts()] + \
           [t[:300] for t in pg.get_by_text("This page hit an error").all_inner_texts()]


def _png_digit(path: Path) -> Path:
    from PIL import Image, ImageDraw

    img = Image.new("L", (28, 28), 0)
    ImageDraw.Draw(img).line([(14, 4), (14, 24)], fill=255, width=3)
    img.save(path)
    return path


def _new_page(browser, *init_scripts: str):
    """A fresh context of ``browser`` (no cache, no cookies; 1280x900, ``init_scripts`` added) and its page, whose
    waits time out after 120 s: ``(context, page)``."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    for script in init_scripts:
        ctx.add_init_script(script)
    pg = ctx.new_page()
    pg.set_default_timeout(120_000)
    return ctx, pg


def _load_record(name: str, page: str, t0: float, start: float, began: float, t: dict) -> dict:
    """One timed load (:func:`timed_load`'s ``t``, begun at monotonic ``t0``) as the JSON records it."""
    return {"session": name, "page": page, "t": round(t0 - start, 1), "since_start": round(t0 - began, 1),
            "s": t["shown"], "s_dom": t["dom"], "s_title": t["title"], "nav": t["nav"]}


def _visit(browser, url: str, name: str, start: float, began: float, result: dict) -> None:
    """One new visitor: a fresh context of ``browser`` (no cache, no cookies) loads Home (:func:`timed_load`) and
    closes; appends its times to ``result["visitor_loads"]`` (or the error to ``result["exceptions"]``)."""
    ctx, pg = _new_page(browser)
    try:
        t0 = time.monotonic()
        result["visitor_loads"].append(_load_record(name, "home", t0, start, began, timed_load(pg, url)))
        result["exceptions"] += [f"{name}/home: {e}" for e in _exceptions(pg)]
    except Exception as e:  # noqa: BLE001 - a timeout is a finding, not the end of the run
        result["exceptions"].append(f"{name}/home: {type(e).__name__}: {str(e)[:200]}")
    finally:
        ctx.close()


def run(url: str, server_pid: int | None, chains: int, browse: int, train: bool, minutes: float,
        sample_s: float, log: Path | None, browse_delay: float = 0.0, steps: int = 2000,
        visitors_every: float = 0.0) -> dict:
    """Drive the sessions for ``minutes``; returns the measurements (see the module docstring). The browsing
    sessions' first load comes as soon as the chain tabs have drawn their titles (their chains starting), or
    ``browse_delay`` seconds later. The chains run ``steps`` SGLD steps (10-2,000, the page's slider), then start
    again. ``visitors_every`` > 0: every that many seconds or more (between two loads of the browsing sessions),
    a new visitor (a fresh browser context: nothing cached) loads Home once and leaves (:func:`_visit`)."""
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium") or "/usr/bin/chromium"
    result: dict = {"url": url, "chains": chains, "browse": browse, "train": train, "minutes": minutes,
                    "memory": [], "sessions": {}, "page_loads": [], "exceptions": [], "actions": [], "click_retries": [],
                    "stalled": {}, "visitor_loads": []}
    upload = _png_digit(Path(tempfile.mkdtemp()) / "one.png")
    began = time.monotonic()
    cores = CoreSampler(server_pid) if server_pid else None
    if cores is not None:
        cores.start()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        chain_pages = []
        for i in range(chains):
            ctx, pg = _new_page(browser, REFRESH_RECORDER, CHAIN_RESTARTER)
            t0 = time.monotonic()
            pg.goto(f"{url}/langevin?lg_steps={int(steps)}", wait_until="domcontentloaded")
            pg.locator("h1").first.wait_for(state="visible")
            result["page_loads"].append({"session": f"chains{i}", "page": "langevin", "s": time.monotonic() - t0,
                                         "since_start": round(t0 - began, 1)})
            chain_pages.append((f"chains{i}", ctx, pg))
        time.sleep(browse_delay)
        browsers = []
        for i in range(browse):
            browsers.append((f"browse{i}", *_new_page(browser)))
        if train:
            ctx, pg = _new_page(browser)
            pg.goto(f"{url}/train", wait_until="domcontentloaded")
            pg.locator(".st-key-tr_start button").filter(visible=True).first.click()
            result["actions"].append({"session": "train", "action": "start training", "t": 0.0})
            browsers.append(("train", ctx, pg))

        probe = ServerProbe(url)
        probe.start()
        start = time.monotonic()
        step = 0
        next_sample = start
        next_visitor = start + visitors_every if visitors_every > 0 else float("inf")
        while time.monotonic() - start < minutes * 60:
            now = time.monotonic()
            if now >= next_visitor:  # the next one at least visitors_every seconds after this one began
                next_visitor = now + visitors_every
                _visit(browser, url, f"visitor{len(result['visitor_loads'])}", start, began, result)
            if now >= next_sample:
                if server_pid:
                    rss, cpu = _proc_stats(server_pid)
                    result["memory"].append({"t": round(now - start, 2), "rss_mb": round(rss, 1), "cpu_s": round(cpu, 2)})
                next_sample += sample_s
            _restart_finished(chain_pages, result)
            for name, _, pg in browsers:
                if name == "train":
                    continue
                page = PAGES[step % len(PAGES)]
                t0 = time.monotonic()
                try:
                    t = timed_load(pg, f"{url}/{page}")
                    _idle(pg)
                    result["page_loads"].append(_load_record(name, page or "home", t0, start, began, t)
                                                | {"s_idle": round(time.monotonic() - t0, 2)})
                    if page == "score":
                        pg.locator(".st-key-score_upload input[type=file]").set_input_files(str(upload))
                        _idle(pg)
                        result["actions"].append({"session": name, "action": "upload", "t": round(now - start, 1)})
                    if page == "robustness":
                        pg.locator(".st-key-rb_run button").filter(visible=True).first.click()
                        _idle(pg)
                        result["actions"].append({"session": name, "action": "attack", "t": round(now - start, 1)})
                    result["exceptions"] += [f"{name}/{page}: {e}" for e in _exceptions(pg)]
                    result["page_loads"][-1]["s_settle"] = _settle(pg)
                except Exception as e:  # noqa: BLE001 - a timeout or a crash of one page is a finding, not the end
                    result["exceptions"].append(f"{name}/{page}: {type(e).__name__}: {str(e)[:200]}")
                _restart_finished(chain_pages, result)
            step += 1
            if not browsers:
                time.sleep(min(0.5, max(0.0, next_sample - time.monotonic())))
        elapsed = time.monotonic() - start
        result["server_latency"] = probe.stop()
        if cores is not None:
            result["cores"] = cores.summary() | {"samples": cores.samples}
        for name, _, pg in chain_pages:
            stamps = pg.evaluate("window.__refreshes") or []
            done_steps = pg.evaluate("window.__steps")
            # The last gap runs to now: chains that stopped refreshing for good are a stall too.
            gaps = [b - a for a, b in zip(stamps, stamps[1:] + [pg.evaluate("performance.now()")])]
            if not stamps or gaps[-1] > STALLED_S * 1000:
                result["stalled"][name] = {"status": _status(pg), "page": page_text(pg, 1000)}
            result["sessions"][name] = {
                "refreshes": len(stamps), "restarts": pg.evaluate("window.__restarts"), "seconds": round(elapsed, 1),
                "sgld_steps": done_steps,
                "refresh_per_s": round(len(stamps) / elapsed, 2) if elapsed else 0.0,
                "sgld_steps_per_s": round(done_steps / elapsed, 1) if elapsed else 0.0,
                "refresh_per_s_last_minute": round(sum(1 for s in stamps if s >= stamps[-1] - 60_000) / min(60, elapsed), 2)
                if stamps else 0.0,
                "gap_ms_median": round(statistics.median(gaps), 1) if gaps else None,
                "gap_ms_max": round(max(gaps), 1) if gaps else None,
                # when the chains stalled: [seconds after the session's first refresh, gap in ms] for gaps over 2 s
                "long_gaps": [[round((a - stamps[0]) / 1000, 1), round(g, 1)] for a, g in zip(stamps, gaps) if g > 2000]}
            result["exceptions"] += [f"{name}/langevin: {e}" for e in _exceptions(pg)]
        # Closing a tab: its chains must stop; the server's CPU use falls back within seconds. The other
        # sessions go first (their work ends with them), so that the last tab's share is measurable.
        if server_pid and chain_pages:
            for _, ctx, _ in chain_pages[:-1] + browsers:
                ctx.close()
            if len(chain_pages) > 1 or browsers:
                time.sleep(20)
            name, ctx, last = chain_pages[-1]
            _click_start(name, last, result)  # running chains
            time.sleep(3)
            before = _cpu_rate(server_pid, 5)
            ctx.close()
            t_close = time.monotonic()
            settle = None
            while time.monotonic() - t_close < 30:
                rate = _cpu_rate(server_pid, 2)
                if rate < 0.1:
                    settle = round(time.monotonic() - t_close, 1)
                    break
            result["tab_close"] = {"session": name, "closed_first": len(chain_pages) - 1 + len(browsers),
                                   "cpu_before": round(before, 2), "seconds_to_settle": settle}
        browser.close()
    if log is not None and log.is_file():
        result["exceptions"] += server_errors(log.read_text(errors="replace"))
    mem = result["memory"]
    if mem:
        first_minute = [m["rss_mb"] for m in mem if m["t"] <= 60] or [mem[0]["rss_mb"]]
        result["rss_mb_after_first_minute"] = first_minute[-1]
        result["rss_mb_end"] = mem[-1]["rss_mb"]
        result["rss_growth_mb"] = round(mem[-1]["rss_mb"] - first_minute[-1], 1)
    rates = [s["refresh_per_s"] for s in result["sessions"].values()]
    if rates:
        result["slowest_over_fastest"] = round(min(rates) / max(rates), 2) if max(rates) else 0.0
    loads = [x for x in result["page_loads"] if x["session"].startswith("browse")]
    result["page_load_s_max"] = round(max(x["s"] for x in loads), 2) if loads else None
    visits = [x["s"] for x in result["visitor_loads"]]
    if visits:
        result["visitor_load_s"] = {"n": len(visits), "median": round(statistics.median(visits), 2),
                                    "max": round(max(visits), 2), "under_5s": sum(v < 5 for v in visits)}
    later = [x["s"] for x in loads if x["since_start"] > 60]
    result["page_load_s_max_after_first_minute"] = round(max(later), 2) if later else None
    result["page_idle_s_max"] = round(max(x["s_idle"] for x in loads), 2) if loads else None
    return result


def server_errors(text: str) -> list[str]:
    """The tracebacks in a server log that pass through this project's code (app/, pages/, jem_core/): the
    web server's own reports of a closed websocket (a tab going away) are not the app's errors."""
    blocks = re.split(r"\n(?=Traceback \(most recent call last\))", text)
    ours = [b for b in blocks if b.startswith("Traceback") and re.search(r"/(app|pages|jem_core)/\w+\.py", b)]
    return [b.strip().splitlines()[-1][:300] for b in ours][:20]


class ServerProbe(threading.Thread):
    """Times ``GET /_stcore/health`` and ``GET /`` (the app's HTML) every ``every`` seconds from the harness's own
    process while the sessions run: how long the server takes to answer, apart from what the browsers on the same
    cores take to draw. :meth:`summary` gives, per path, the count, the failures, and the median, 95th percentile
    and largest time in ms."""

    def __init__(self, url: str, every: float = 0.5) -> None:
        super().__init__(daemon=True, name="server-probe")
        self.url, self.every = url, every
        self.samples: dict[str, list[float | None]] = {"/_stcore/health": [], "/": []}
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every):
            for path, times in self.samples.items():
                t0 = time.monotonic()
                try:
                    with urllib.request.urlopen(self.url + path, timeout=30) as r:
                        r.read()
                    times.append(time.monotonic() - t0)
                except OSError:
                    times.append(None)

    def stop(self) -> dict:
        """Stop probing; returns :meth:`summary`."""
        self._done.set()
        self.join(timeout=70)
        return self.summary()

    def summary(self) -> dict:
        out = {}
        for path, times in self.samples.items():
            ok = sorted(t * 1000 for t in times if t is not None)
            out[path] = {"n": len(times), "failed": len(times) - len(ok),
                         "median_ms": round(statistics.median(ok), 1) if ok else None,
                         "p95_ms": round(ok[min(len(ok) - 1, int(0.95 * len(ok)))], 1) if ok else None,
                         "max_ms": round(ok[-1], 1) if ok else None}
        return out


def _chromium_and_machine_cpu() -> tuple[dict[int, float], float]:
    """({pid: CPU seconds} of every Chromium process on this machine, busy CPU seconds of the whole machine), from
    ``/proc``: the browsers' share of the cores beside the server's."""
    ticks = os.sysconf("SC_CLK_TCK")
    chromium = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                name, rest = f.read().split(" (", 1)[1].rsplit(")", 1)
            if name.startswith("chrom"):
                fields = rest.split()
                chromium[int(pid)] = (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
    with open("/proc/stat") as f:
        cpu = [int(v) for v in f.readline().split()[1:]]
    return chromium, (sum(cpu) - cpu[3] - cpu[4]) / ticks  # all but idle and iowait


class CoreSampler(threading.Thread):
    """Every ``every`` seconds, the cores' worth of CPU used since the last sample by the server (``pid``), by all
    Chromium processes, and by the whole machine: ``samples`` rows ``[t, server, chromium, machine]`` (t: seconds
    since the sampler started). :meth:`summary` gives their means over the first minute and after it.

    Chromium's share is summed per process over the processes alive at the sample (a new one from its start): a
    renderer that ends between two samples (a closed context) leaves out its last second's CPU, instead of its whole
    past making the sum fall."""

    def __init__(self, pid: int, every: float = 1.0) -> None:
        super().__init__(daemon=True, name="core-sampler")
        self.pid, self.every = pid, every
        self.samples: list[list[float]] = []
        self._done = threading.Event()

    def run(self) -> None:
        t0 = last_t = time.monotonic()
        last_server, (last_chromium, last_machine) = _proc_stats(self.pid)[1], _chromium_and_machine_cpu()
        while not self._done.wait(self.every):
            try:
                server = _proc_stats(self.pid)[1]
            except OSError:  # the server has ended
                return
            chromium, machine = _chromium_and_machine_cpu()
            t = time.monotonic()
            used = (server - last_server, sum(c - last_chromium.get(p, 0.0) for p, c in chromium.items()),
                    machine - last_machine)
            self.samples.append([round(t - t0, 1)] + [round(u / (t - last_t), 2) for u in used])
            last_server, last_chromium, last_machine, last_t = server, chromium, machine, t

    def summary(self) -> dict:
        """Stop sampling; the mean cores used by the server, Chromium and the machine in the first minute and after."""
        self._done.set()
        self.join(timeout=5)
        out = {}
        for name, rows in (("first_minute", [r for r in self.samples if r[0] <= 60]),
                           ("after", [r for r in self.samples if r[0] > 60])):
            out[name] = {k: round(statistics.mean(r[i] for r in rows), 2) if rows else None
                         for i, k in enumerate(("server", "chromium", "machine"), start=1)}
        return out


def _cpu_rate(pid: int, seconds: float) -> float:
    """Cores' worth of CPU the process used over the next ``seconds``."""
    _, a = _proc_stats(pid)
    time.sleep(seconds)
    _, b = _proc_stats(pid)
    return (b - a) / seconds


def plot(result: dict, path: Path) -> None:
    """Memory over time and refreshes per second per session (matplotlib, static PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    mem = result["memory"]
    a.plot([m["t"] / 60 for m in mem], [m["rss_mb"] for m in mem])
    a.set_xlabel("minutes")
    a.set_ylabel("server resident memory (MB)")
    a.set_title("Server memory")
    names = list(result["sessions"])
    b.bar(names, [result["sessions"][n]["refresh_per_s"] for n in names])
    b.set_ylabel("refreshes per second")
    b.set_title("Live chains, as the browser saw them")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="a running server on this machine (default: start one on 127.0.0.1)")
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--browse", type=int, default=1)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--sample", type=float, default=5.0, help="seconds between memory samples")
    ap.add_argument("--browse-delay", type=float, default=0.0,
                    help="seconds between the chain tabs' opening and the browsing sessions' first load")
    ap.add_argument("--steps", type=int, default=2000, help="SGLD steps of each chain run, 10-2000 (default 2000)")
    ap.add_argument("--visitors-every", type=float, default=0.0, metavar="S",
                    help="every S seconds a new visitor (a fresh browser context) loads Home once (default: none)")
    ap.add_argument("--default", default="", help="JEM_EXPLORER_DEFAULT for a started server (digits or mnist)")
    ap.add_argument("--out", default="bench/load.json")
    a = ap.parse_args()
    if a.url and not re.match(r"^https?://(127\.\d+\.\d+\.\d+|localhost|\[::1\])(:\d+)?", a.url):
        raise SystemExit("error: --url must point to this machine (127.0.0.1, localhost or [::1])")
    if a.minutes <= 0 or a.minutes > 120 or a.chains < 0 or a.browse < 0:
        raise SystemExit("error: --minutes must lie in (0, 120] and --chains/--browse be >= 0")
    if a.visitors_every < 0:
        raise SystemExit(f"error: --visitors-every must be >= 0 seconds, got {a.visitors_every}")
    if not 10 <= a.steps <= 2000:
        raise SystemExit(f"error: --steps must lie in [10, 2000] (the Langevin page's range), got {a.steps}")
    proc, log = None, None
    url = a.url
    if url is None:
        port = _free_port()
        log = Path(tempfile.mkdtemp()) / "server.log"
        extra = {"OMP_NUM_THREADS": "1"} | ({"JEM_EXPLORER_DEFAULT": a.default} if a.default else {})
        proc = start_server(port, log, extra)
        url = f"http://127.0.0.1:{port}"
    try:
        result = run(url, proc.pid if proc else None, a.chains, a.browse, a.train, a.minutes, a.sample, log,
                     a.browse_delay, a.steps, a.visitors_every)
    finally:
        if proc is not None:
            stop_server(proc)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    summary = {k: result.get(k) for k in ("rss_mb_after_first_minute", "rss_mb_end", "rss_growth_mb",
                                          "slowest_over_fastest", "page_load_s_max",
                                          "page_load_s_max_after_first_minute", "page_idle_s_max", "tab_close")}
    summary["first_minute_loads"] = [(x["page"], x["since_start"], x["s"]) for x in result["page_loads"]
                                     if x["session"].startswith("browse") and x["since_start"] <= 60]
    summary["cores"] = {k: v for k, v in result.get("cores", {}).items() if k != "samples"}
    summary["refresh_per_s"] = {n: s["refresh_per_s"] for n, s in result["sessions"].items()}
    summary["sgld_steps_per_s"] = {n: s["sgld_steps_per_s"] for n, s in result["sessions"].items()}
    summary["visitor_load_s"] = result.get("visitor_load_s")
    summary["server_latency"] = result.get("server_latency")
    summary["exceptions"] = len(result["exceptions"])
    summary["click_retries"] = len(result["click_retries"])
    summary["stalled"] = sorted(result["stalled"])
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
