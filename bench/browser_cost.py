"""What live chain tabs cost the browser and the server: Chromium's main-thread time per refresh and the CPU of
every process, with N chain tabs open on one server (loopback only).

Starts ``streamlit run app/Home.py`` on a free port of 127.0.0.1 (as ``bench/load.py`` does), opens ``--tabs``
Chromium contexts on the Langevin page (the chains start by themselves), waits until every tab has drawn two
refreshes of its chains (:data:`START_TIMEOUT_S` at most: a fresh server imports and loads first), then ``--warmup``
seconds, then measures for ``--seconds``:

- per tab: refreshes per second and SGLD steps per second (the grid caption, ``bench/load.py``'s recorder), and
  the renderer's main-thread time per refresh (CDP ``Performance.getMetrics``: ``TaskDuration``, ``ScriptDuration``;
  wall time of the tasks, so on loaded cores it includes time spent waiting for a core);
- per process kind (the server, Chromium's renderers, its GPU process, its browser process, ...): cores used
  (``/proc`` CPU time over the window).

    python bench/browser_cost.py --tabs 1                 # one tab: main-thread ms per refresh
    python bench/browser_cost.py --tabs 4 --out x.json    # four tabs: who uses the two cores

Needs ``chromium`` (Debian) and the ``playwright`` Python package; nothing is downloaded. Writes a JSON with
``--out`` and prints one line per tab and per process kind.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load import (CHAIN_RESTARTER, CHROMIUM_ARGS, REFRESH_RECORDER, _free_port, _proc_stats,  # noqa: E402
                        page_text, start_server, stop_server)


def process_cpu() -> dict[str, float]:
    """CPU seconds (user + system) so far of the Streamlit server and of Chromium's processes by kind (its
    renderers, GPU process, ...), summed over this machine's processes."""
    out: collections.Counter = collections.Counter()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
            cpu = _proc_stats(int(pid))[1]
        except OSError:  # the process ended meanwhile
            continue
        if "chrom" in cmd.split(" ")[0]:
            kind = next((a.split("=", 1)[1] for a in cmd.split() if a.startswith("--type=")), "browser")
            out[f"chromium {kind}"] += cpu
        elif "streamlit run" in cmd:
            out["server"] += cpu
    return dict(out)


#: Seconds a tab may take to draw its chains' first two refreshes before :func:`measure` gives up.
START_TIMEOUT_S = 120.0


def measure(url: str, tabs: int, warmup: float, seconds: float) -> dict:
    """Open ``tabs`` chain tabs on ``url``; once each has drawn two refreshes of its chains, wait ``warmup`` seconds,
    then measure for ``seconds`` (see the module docstring). Returns ``{"tabs": [per tab], "cores": {process kind:
    cores}}``. Raises RuntimeError when a tab draws no two refreshes within :data:`START_TIMEOUT_S` (with what the
    page showed)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                    args=CHROMIUM_ARGS)
        pages = []
        for _ in range(tabs):
            ctx = browser.new_context(viewport={"width": 1280, "height": 900})
            ctx.add_init_script(REFRESH_RECORDER)
            ctx.add_init_script(CHAIN_RESTARTER)  # finished chains would cut the refreshes measured short
            pg = ctx.new_page()
            cdp = ctx.new_cdp_session(pg)
            cdp.send("Performance.enable")
            pg.goto(f"{url}/langevin?lg_steps=2000", wait_until="domcontentloaded")
            pages.append((pg, cdp))
        for i, (pg, _) in enumerate(pages):
            try:
                pg.wait_for_function("window.__refreshes.length >= 2", timeout=START_TIMEOUT_S * 1000)
            except Exception as e:  # noqa: BLE001 - Playwright's TimeoutError: say what the tab showed instead
                raise RuntimeError(f"tab {i}: the chains drew fewer than two refreshes within {START_TIMEOUT_S:g} s "
                                   f"({type(e).__name__}); the page showed: {page_text(pg)}") from e
        time.sleep(warmup)

        def snapshot() -> list[tuple[dict, list]]:
            return [({m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]},
                     pg.evaluate("[window.__refreshes.length, window.__steps]")) for pg, cdp in pages]

        before, cpu0, t0 = snapshot(), process_cpu(), time.monotonic()
        time.sleep(seconds)
        after, cpu1, dt = snapshot(), process_cpu(), time.monotonic() - t0
        browser.close()
    result = {"tabs": [], "cores": {k: round((cpu1.get(k, 0.0) - cpu0.get(k, 0.0)) / dt, 3) for k in sorted(cpu1)}}
    for (m0, (n0, s0)), (m1, (n1, s1)) in zip(before, after):
        n = n1 - n0
        result["tabs"].append({
            "refreshes_per_s": round(n / dt, 2), "sgld_steps_per_s": round((s1 - s0) / dt, 1),
            "main_thread_ms_per_refresh": round((m1["TaskDuration"] - m0["TaskDuration"]) * 1000 / max(n, 1), 1),
            "script_ms_per_refresh": round((m1["ScriptDuration"] - m0["ScriptDuration"]) * 1000 / max(n, 1), 1)})
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tabs", type=int, default=1, help="chain tabs open at once (default 1)")
    ap.add_argument("--warmup", type=float, default=25.0, help="seconds before measuring (default 25)")
    ap.add_argument("--seconds", type=float, default=30.0, help="seconds measured (default 30)")
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    args = ap.parse_args()
    if args.tabs < 1 or args.seconds <= 0 or args.warmup < 0:
        ap.error("--tabs must be >= 1, --seconds > 0 and --warmup >= 0")
    port = _free_port()
    server = start_server(port, Path(tempfile.mkdtemp()) / "server.log", {"OMP_NUM_THREADS": "1"})
    try:
        result = measure(f"http://127.0.0.1:{port}", args.tabs, args.warmup, args.seconds)
    finally:
        stop_server(server)
    result.update(tabs_open=args.tabs, warmup_s=args.warmup, seconds=args.seconds)
    for i, t in enumerate(result["tabs"]):
        print(f"tab {i}: {t['refreshes_per_s']:.2f} refreshes/s, {t['sgld_steps_per_s']:.1f} SGLD steps/s, "
              f"main thread {t['main_thread_ms_per_refresh']:.0f} ms per refresh ({t['script_ms_per_refresh']:.0f} ms"
              " of scripts)")
    for kind, cores in result["cores"].items():
        print(f"{kind}: {cores:.2f} cores")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
