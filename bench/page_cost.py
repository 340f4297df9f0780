"""What each page costs a slow browser: every page loaded in a fresh Chromium context with its CPU slowed down.

Under load, a page's time goes mostly to the browsing tab's renderer, which shares the 2 cores with the live
chain tabs (``bench/README.md``, "Where the cores went"). This measures that part on an idle machine: Chromium's
CPU is slowed ``--throttle`` times through the DevTools protocol (``Emulation.setCPUThrottlingRate``; the
server is not slowed), and each page is loaded ``--repeat`` times, each in a new browser context, as a new
visitor would (the first load of each page is a warm-up and is not counted: it fills the server's caches).
Per load: until the document has loaded ("dom"), until the page's title is drawn ("title"), until the page
shows content or a progress box ("shown", as in ``bench/load.py``).

    python bench/page_cost.py --throttle 4 --repeat 3 --out bench/page_cost.json

Prints one line per page (medians) and writes the JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load import CHROMIUM_ARGS, PAGES, _free_port, _idle, start_server, stop_server, timed_load  # noqa: E402


def page_costs(url: str, pages: list[str], throttle: float, repeat: int) -> dict:
    """``{page: [{"dom": s, "title": s, "shown": s}, ...]}``: ``repeat`` counted loads per page (after one
    uncounted warm-up load) of ``url/page`` in fresh contexts of a Chromium slowed ``throttle`` times."""
    from playwright.sync_api import sync_playwright

    out: dict[str, list[dict[str, float]]] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                    args=CHROMIUM_ARGS)
        for page in pages:
            loads = []
            for i in range(repeat + 1):
                ctx = browser.new_context(viewport={"width": 1280, "height": 900})
                pg = ctx.new_page()
                pg.set_default_timeout(120_000)
                ctx.new_cdp_session(pg).send("Emulation.setCPUThrottlingRate", {"rate": throttle})
                t = timed_load(pg, f"{url}/{page}")
                _idle(pg)  # the page's computations end before the next load starts
                ctx.close()
                if i:
                    loads.append(t)
            out[page or "home"] = loads
            med = {k: statistics.median(x[k] for x in loads) for k in ("dom", "title", "shown")}
            print(f"{page or 'home':12s} medians: dom {med['dom']:.2f} s, title {med['title']:.2f} s, "
                  f"shown {med['shown']:.2f} s", flush=True)
        browser.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--throttle", type=float, default=4.0, help="Chromium CPU slow-down factor (1 = none)")
    ap.add_argument("--repeat", type=int, default=3, help="counted loads per page")
    ap.add_argument("--pages", nargs="*", default=None, help="page paths (default: every page; '' is Home)")
    ap.add_argument("--out", default="bench/page_cost.json")
    args = ap.parse_args()
    if args.throttle < 1 or args.repeat < 1:
        ap.error("--throttle must be >= 1 and --repeat >= 1")
    pages = PAGES if args.pages is None else args.pages
    port = _free_port()
    log = Path(tempfile.mkdtemp()) / "server.log"
    proc = start_server(port, log, {})
    try:
        loads = page_costs(f"http://127.0.0.1:{port}", pages, args.throttle, args.repeat)
    finally:
        stop_server(proc)
    Path(args.out).write_text(json.dumps({"throttle": args.throttle, "repeat": args.repeat, "loads": loads},
                                         indent=1))


if __name__ == "__main__":
    main()
