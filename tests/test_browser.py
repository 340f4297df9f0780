"""Real-browser end-to-end test: the dashboard served by ``streamlit run`` and driven by Chromium.

Starts ``streamlit run app/Home.py`` on a free port (digits models), then with Playwright (sync API) and
Debian's Chromium: visits every page of the sidebar navigation, runs the live Langevin chains and scores an
uploaded PNG. Needs ``chromium`` on PATH (CI apt-installs it); without it the test fails, it does not skip.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from bench import load

ROOT = Path(__file__).resolve().parents[1]

#: (sidebar link text, the page's st.title) in navigation order (app/ui.py PAGE_SPECS, pages/*.py run_page).
PAGES = [
    ("Home", "JEM Explorer"),
    ("Langevin chains", "Langevin chains"),
    ("Calibration", "Calibration"),
    ("Robustness", "Robustness"),
    ("OOD detection", "OOD detection"),
    ("Likelihood", "Likelihood"),
    ("Score an image", "Score an image"),
    ("Train", "Train"),
    ("2-D playground", "2-D playground"),
]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOAD_MS = 60_000  # page loads can take 10-30 s on a slow 2-core machine

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]
SERVER_LOGS: list[Path] = []  # the module server's log, read into a failure message


def _server_log_lines(pattern: str, limit: int = 10) -> list[str]:
    """The server log's last ``limit`` lines matching ``pattern`` (a regular expression)."""
    text = SERVER_LOGS[-1].read_text(errors="replace") if SERVER_LOGS and SERVER_LOGS[-1].exists() else ""
    return [line for line in text.splitlines() if re.search(pattern, line)][-limit:]


def _chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        pytest.fail("chromium is not installed: run `apt-get update && apt-get install -y chromium` "
                    "(.ci/run does this); the browser test needs Debian's Chromium", pytrace=False)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``streamlit run app/Home.py`` on a free loopback port (the load harness's starter); yields the base URL."""
    log = tmp_path_factory.mktemp("streamlit") / "server.log"
    SERVER_LOGS.append(log)
    try:
        proc = load.start_server(load._free_port(), log, {"JEM_EXPLORER_DEFAULT": "digits", "OMP_NUM_THREADS": "1"})
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        yield f"http://127.0.0.1:{proc.args[proc.args.index('--server.port') + 1]}"
    finally:
        load.stop_server(proc)


@pytest.fixture(scope="module")
def page(server):
    from playwright import sync_api

    exe = _chromium()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1400, "height": 1000})
            pg.set_default_timeout(LOAD_MS)
            pg.goto(server, wait_until="domcontentloaded")
            yield pg
        finally:
            browser.close()


def _wait_idle(pg, timeout_ms: int = LOAD_MS) -> None:
    """Wait until the script run finished (the 'Running...' status widget is gone)."""
    pg.wait_for_timeout(300)
    pg.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
        " || !/running/i.test(document.querySelector('[data-testid=\"stStatusWidget\"]').innerText)",
        timeout=timeout_ms)


def _wait_single(pg, loc, timeout_s: float = 30) -> None:
    """Wait until a keyed widget is rendered exactly once (stale copies of the previous page are gone)."""
    deadline = time.monotonic() + timeout_s
    while loc.count() != 1 and time.monotonic() < deadline:
        pg.wait_for_timeout(250)
    assert loc.count() == 1, f"{loc} is rendered {loc.count()} times"


def _title(pg, title: str):
    return pg.locator("h1").filter(has_text=re.compile(rf"^\s*{re.escape(title)}\s*$"))


def _goto(pg, link: str, title: str) -> None:
    nav = pg.locator('[data-testid="stSidebarNav"]')
    nav.get_by_role("link", name=link, exact=True).click()
    _title(pg, title).first.wait_for(state="visible")
    _wait_idle(pg)


def _pause_chains(pg) -> None:
    """Press the Langevin page's Pause if its chains still run.

    A run can finish between any check and the click, which disables the button; so the click is tried with a
    short timeout and a disabled button afterwards counts as paused (the run ended by itself).
    """
    pause = pg.locator(".st-key-lg_pause button").filter(visible=True).first
    try:
        pause.click(timeout=5000)
    except PlaywrightTimeout:
        assert not pause.is_enabled(), "the Pause button stayed enabled but could not be clicked for 5 s"
    _wait_idle(pg)


def _assert_ok(pg, title: str) -> None:
    assert _title(pg, title).first.is_visible(), f"page title {title!r} not shown"
    exc = pg.locator('[data-testid="stException"]')
    assert exc.count() == 0, f"{title}: Streamlit exception shown:\n{exc.first.inner_text()}"
    err = pg.get_by_text("This page hit an error")
    assert err.count() == 0, f"{title}: the page shows an error: {pg.locator('[data-testid=stAlert]').all_inner_texts()}"


#: In-page recorder of the chain grid: every (picture, "after N steps") pair the page shows, in order, however fast
#: the chains run (a poll can miss a whole run: seeded alike, a new run ends on the same picture as the last one).
GRID_RECORDER = """() => {
  window.__grid = [];
  const record = () => {
    const box = document.querySelector('[data-testid="stImage"]');
    const img = box && box.querySelector('img');
    const m = box && /after (\\d+) steps/.exec(box.innerText);
    if (!img || !m) return;
    const last = window.__grid[window.__grid.length - 1];
    if (!last || last[0] !== img.src || last[1] !== +m[1]) window.__grid.push([img.src, +m[1]]);
  };
  new MutationObserver(record).observe(document.body,
    {subtree: true, childList: true, attributes: true, characterData: true});
}"""


def _grid_advanced(shown: list) -> bool:
    """Whether the recorded ``[picture, steps]`` pairs show the new chains advancing: after the run's first frame
    (the fewest steps recorded), a later frame with more steps and another picture."""
    if not shown:
        return False
    i0 = min(range(len(shown)), key=lambda i: shown[i][1])
    return any(steps > shown[i0][1] and src != shown[i0][0] for src, steps in shown[i0 + 1:])


def _digit_png(path: Path) -> Path:
    from PIL import Image, ImageDraw

    img = Image.new("L", (28, 28), 0)
    d = ImageDraw.Draw(img)
    d.line([(14, 4), (14, 24)], fill=255, width=3)  # a light "1" on a dark background
    d.line([(10, 8), (14, 4)], fill=255, width=3)
    img.save(path)
    return path


def test_dashboard_in_chromium(page, tmp_path):
    pg = page
    _title(pg, "JEM Explorer").first.wait_for(state="visible")
    _wait_idle(pg)

    # Every page of the navigation shows its title, no exception, and makes its point before any click:
    # at least one chart or image.
    for link, title in PAGES:
        _goto(pg, link, title)
        _assert_ok(pg, title)
        shown = pg.locator('[data-testid="stPlotlyChart"], [data-testid="stImage"]').filter(visible=True)
        shown.first.wait_for(state="visible")
        assert shown.count() >= 1, f"{title}: no chart and no image before any click"

    # Langevin chains: Start, then the grid image changes as the chains advance.
    _goto(pg, "Langevin chains", "Langevin chains")
    # (a button with a help tooltip renders a second, hidden button: keep the visible one)
    start = pg.locator(".st-key-lg_start button").filter(visible=True)
    _wait_single(pg, start)
    # The chains started by themselves on the first visit; pause them (or let them finish) first, so that the
    # click on Start does not land in the full rerun that ends a finishing run.
    _pause_chains(pg)
    pg.evaluate(GRID_RECORDER)
    start.click()
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline and not _grid_advanced(pg.evaluate("window.__grid")):
        pg.wait_for_timeout(500)
    shown = pg.evaluate("window.__grid")
    # On failure, say what the page showed: the frames recorded, the status metric, any exception.
    assert _grid_advanced(shown), (
        f"the chain grid did not change within 45 s of Start: frames [picture, steps] {shown[-8:]}; metrics "
        f"{pg.locator('[data-testid=stMetric]').all_inner_texts()}; exceptions "
        f"{[t[:500] for t in pg.locator('[data-testid=stException]').all_inner_texts()]}; "
        f"server log on fragments: {_server_log_lines('(?i)fragment')}")
    _assert_ok(pg, "Langevin chains")
    # Stop the live chains so that they do not load the machine for the rest of the test.
    _pause_chains(pg)

    # Score an image: upload a PNG and read "Predicted label: K".
    png = _digit_png(tmp_path / "one.png")
    _goto(pg, "Score an image", "Score an image")
    upload = pg.locator(".st-key-score_upload input[type=file]")
    _wait_single(pg, upload)
    upload.set_input_files(str(png))
    pg.get_by_text("one.png").first.wait_for(state="visible")  # the upload is scored beside the examples
    label = pg.get_by_text(re.compile(r"Predicted label:\s*\d+"))
    label.first.wait_for(state="visible")
    _wait_idle(pg)
    m = re.search(r"Predicted label:\s*(\d+)", label.first.inner_text())
    assert m, label.first.inner_text()
    assert 0 <= int(m.group(1)) <= 9
    _assert_ok(pg, "Score an image")


#: (viewport width, pages) of the layout check: a phone, a laptop, a wide screen.
LAYOUTS = [(390, ["", "langevin", "ood"]), (1280, ["", "langevin", "calibration", "ood"]),
           (1600, ["", "ood", "robustness"])]
#: True when the page itself scrolls sideways (a table or a row of chips that scrolls inside its own box is fine).
PAGE_OVERFLOWS = """() => { const m = document.querySelector('[data-testid="stMain"]');
  return document.documentElement.scrollWidth > window.innerWidth + 2 || m.scrollWidth > m.clientWidth + 2; }"""


def _open_fresh(pg, url: str) -> None:
    pg.goto(url, wait_until="domcontentloaded")
    pg.locator("h1").first.wait_for(state="visible")
    _wait_idle(pg)
    pg.wait_for_timeout(500)


def test_layout_holds_at_phone_laptop_and_wide_widths(page, server, tmp_path):
    pg = page
    try:
        for width, paths in LAYOUTS:
            pg.set_viewport_size({"width": width, "height": 1000})
            for path in paths:
                _open_fresh(pg, f"{server}/{path}")
                pg.screenshot(path=str(tmp_path / f"{path or 'home'}_{width}.png"))
                assert not pg.evaluate(PAGE_OVERFLOWS), f"/{path} overflows the page at {width} px"
    finally:
        pg.set_viewport_size({"width": 1400, "height": 1000})


def test_a_link_with_exact_langevin_at_step_one_shows_the_sampler_warning(page, server):
    pg = page
    _open_fresh(pg, f"{server}/langevin?lg_exact=1&lg_step_size=1.0")
    warning = pg.locator('[data-testid="stAlert"]').filter(has_text="Sampler health (exact_step)")
    warning.first.wait_for(state="visible")
    assert "sqrt(1)" in warning.first.inner_text()
    _pause_chains(pg)


def test_langevin_draws_only_the_open_tab_and_a_click_on_another_tab_draws_it(page, server):
    """The live chains' page draws one tab at a time (each refresh re-renders the whole page in the browser):
    a click on In-painting shows its controls in place of the chains, and Chains brings the chains back."""
    pg = page
    _open_fresh(pg, f"{server}/langevin?lg_steps=20")
    pg.locator(".st-key-lg_n").first.wait_for(state="visible")
    assert pg.locator(".st-key-lp_run").count() == 0
    pg.get_by_role("tab", name="In-painting").click()
    pg.locator(".st-key-lp_run button").first.wait_for(state="visible")
    # The other tab's elements leave once the rerun that drew this one has finished (until then they are stale).
    pg.locator(".st-key-lg_n").first.wait_for(state="detached", timeout=30_000)
    assert pg.locator(".st-key-ct_run").count() == 0
    pg.get_by_role("tab", name="Chains").click()
    pg.locator(".st-key-lg_n").first.wait_for(state="visible")
    pg.locator(".st-key-lp_run").first.wait_for(state="detached", timeout=30_000)
    assert pg.locator(".st-key-lg_n").count() == 1


def test_the_playground_figures_update_while_training_runs(page, server):
    pg = page
    _open_fresh(pg, f"{server}/playground")
    iteration = pg.locator('[data-testid="stMetric"]').filter(has_text="Iteration").first
    iteration.wait_for(state="visible")
    before = iteration.inner_text()
    chart = pg.locator('[data-testid="stPlotlyChart"]').first
    pg.locator(".st-key-pg_train button").filter(visible=True).first.click()
    deadline = time.monotonic() + 60
    changed = False
    while time.monotonic() < deadline and not changed:
        pg.wait_for_timeout(1000)
        try:
            changed = iteration.inner_text(timeout=5000) != before and chart.is_visible()
        except Exception:  # noqa: BLE001 - the fragment re-renders between reads
            continue
    assert changed, f"the iteration count stayed at {before!r} while training"
    pg.locator(".st-key-pg_pause button").filter(visible=True).first.click()
    _wait_idle(pg)
