"""The load harness at a small scale (bench/load.py): two real browsers on one server for about 40 s, one
with live chains, one browsing the pages (an attack, an upload). No exception, memory that does not grow,
chains that keep refreshing, and a closed tab whose chains stop."""

from __future__ import annotations

import shutil
import time
import tempfile
from pathlib import Path

import pytest

from bench import load

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def measured():
    if not (shutil.which("chromium") or Path("/usr/bin/chromium").exists()):
        pytest.fail("chromium is not installed: run `apt-get install -y chromium` (.ci/run does this)", pytrace=False)
    log = Path(tempfile.mkdtemp()) / "server.log"
    proc = load.start_server(load._free_port(), log, {"OMP_NUM_THREADS": "1", "JEM_EXPLORER_DEFAULT": "digits"})
    try:
        port = proc.args[proc.args.index("--server.port") + 1]
        # 1,000 steps: the chains finish and start again within the run (38-94 SGLD steps/s measured in this scenario)
        return load.run(f"http://127.0.0.1:{port}", proc.pid, chains=1, browse=1, train=False, minutes=0.6,
                        sample_s=3.0, log=log, steps=1000, visitors_every=10)
    finally:
        load.stop_server(proc)


def test_no_exception_in_any_page_or_in_the_server_log(measured):
    assert measured["exceptions"] == []
    assert {a["action"] for a in measured["actions"]} >= {"attack"} or len(measured["page_loads"]) >= 4


def test_live_chains_keep_refreshing_while_another_user_browses(measured):
    s = measured["sessions"]["chains0"]
    # A floor that holds on a loaded CI machine while the other browser runs attacks and AIS (measured here:
    # 0.9-1.8 refreshes/s); the target figures are measured by bench/load.py on an idle machine.
    assert s["refresh_per_s"] >= 0.5, s
    assert s["gap_ms_max"] is not None and s["gap_ms_max"] < 10_000, s
    assert s["sgld_steps_per_s"] >= 1.0, s  # the chains advance (steps read from the grid's caption)
    # Chains that finished started again by themselves, the gap between the two runs included in the bound above.
    assert s["restarts"] >= 1 or s["sgld_steps"] <= 1000, s


def test_memory_stays_bounded(measured):
    assert measured["rss_growth_mb"] < 150, measured["memory"]


def test_the_harness_times_the_server_apart_from_the_browsers(measured):
    lat = measured["server_latency"]
    for path in ("/_stcore/health", "/"):
        assert lat[path]["n"] >= 10 and lat[path]["failed"] == 0, lat
        assert 0 < lat[path]["median_ms"] <= lat[path]["p95_ms"] <= lat[path]["max_ms"], lat
    loads = [x for x in measured["page_loads"] if x["session"].startswith("browse")]
    assert loads and [x["t"] for x in loads] == sorted(x["t"] for x in loads)
    for x in loads:  # the browser's timing of the document phase, in the order a navigation goes
        nav = x["nav"]
        assert 0 <= nav["ttfb"] <= nav["html"] <= nav["dcl"] <= x["s_dom"] + 0.1, x
        assert 0 <= x["s_settle"] <= 10.5, x
    # a new browser fetches the app's scripts from the server; the next load finds them in its cache
    assert loads[0]["nav"]["fetched"] > 10 and (len(loads) == 1 or loads[1]["nav"]["fetched"] < 10), loads[:2]
    # the server's age at each load: after the chain tab's, in the order of the loads, within the run
    chain_load = next(x for x in measured["page_loads"] if x["session"] == "chains0")
    ages = [x["since_start"] for x in loads]
    assert chain_load["since_start"] <= ages[0] and ages == sorted(ages) and ages[-1] < 0.6 * 60 + 60, ages


def test_new_visitors_load_home_cold_between_the_browsing_loads(measured):
    """Every 10 s or more, a fresh browser context (nothing cached) loads Home: each fetches the app's scripts
    from the server, its times come in the order of a navigation, and the summary counts them."""
    visits = measured["visitor_loads"]
    assert len(visits) >= 2 and [v["session"] for v in visits] == [f"visitor{i}" for i in range(len(visits))], visits
    assert [v["t"] for v in visits] == sorted(v["t"] for v in visits) and visits[1]["t"] - visits[0]["t"] >= 9
    for v in visits:
        assert v["page"] == "home" and v["nav"]["fetched"] > 10, v
        assert 0 <= v["nav"]["ttfb"] <= v["nav"]["dcl"] <= v["s_dom"] + 0.1 and v["s_dom"] <= v["s_title"] <= v["s"], v
    summary = measured["visitor_load_s"]
    assert summary["n"] == len(visits) and summary["max"] == round(max(v["s"] for v in visits), 2)
    assert summary["under_5s"] == sum(v["s"] < 5 for v in visits)


def test_the_harness_splits_the_cores_between_server_browsers_and_machine(measured):
    """Every second, the cores' worth of CPU of the server, of all Chromium processes and of the machine: each in
    [0, cores], the server and the browsers within the machine's total; the browsers are drawing, the server is
    computing."""
    import os

    cores = measured["cores"]
    rows = cores["samples"]
    assert len(rows) >= 30 and [r[0] for r in rows] == sorted(r[0] for r in rows), rows[:3]
    n = os.cpu_count()
    for _, server, chromium, machine in rows:
        assert 0 <= server <= n + 0.3 and 0 <= chromium <= n + 0.3 and 0 <= machine <= n + 0.3, rows
    first = cores["first_minute"]
    assert first["server"] > 0.05 and first["chromium"] > 0.05, cores
    assert first["server"] + first["chromium"] <= first["machine"] + 0.3, cores


def test_closing_a_tab_stops_its_chains_within_15_seconds(measured):
    settle = measured["tab_close"]["seconds_to_settle"]
    assert settle is not None and settle <= 15, measured["tab_close"]


def test_a_training_run_stops_by_itself_when_its_tab_is_closed():
    from playwright.sync_api import sync_playwright

    log = Path(tempfile.mkdtemp()) / "server.log"
    proc = load.start_server(load._free_port(), log, {"OMP_NUM_THREADS": "1", "JEM_EXPLORER_DEFAULT": "digits"})
    port = proc.args[proc.args.index("--server.port") + 1]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                        args=load.CHROMIUM_ARGS)
            ctx = browser.new_context()
            pg = ctx.new_page()
            pg.set_default_timeout(120_000)
            pg.goto(f"http://127.0.0.1:{port}/train", wait_until="domcontentloaded")
            pg.locator(".st-key-tr_start button").filter(visible=True).first.click()
            iteration = pg.locator('[data-testid="stMetric"]').filter(has_text="Iteration").first
            iteration.wait_for(state="visible")
            pg.wait_for_function("() => [...document.querySelectorAll('[data-testid=\"stMetric\"]')].some("
                                 "e => /Iteration\\s*[1-9]/.test(e.innerText))", timeout=120_000)
            before = load._cpu_rate(proc.pid, 3)
            assert before > 0.2, f"the run trains while its tab is open ({before:.2f} cores)"
            ctx.close()  # the tab goes away without pressing Stop
            deadline, rate = time.monotonic() + 30, None
            while time.monotonic() < deadline:
                rate = load._cpu_rate(proc.pid, 2)
                if rate < 0.3 * before:
                    break
            browser.close()
        assert rate is not None and rate < 0.3 * before, (
            f"the server still uses {rate:.2f} cores (training: {before:.2f}) 30 s after the tab closed")
    finally:
        load.stop_server(proc)


def test_page_cost_times_each_page_load_in_order_in_a_slowed_browser():
    from bench import page_cost

    log = Path(tempfile.mkdtemp()) / "server.log"
    proc = load.start_server(load._free_port(), log, {"OMP_NUM_THREADS": "1", "JEM_EXPLORER_DEFAULT": "digits"})
    try:
        port = proc.args[proc.args.index("--server.port") + 1]
        costs = page_cost.page_costs(f"http://127.0.0.1:{port}", ["", "playground"], throttle=2, repeat=1)
    finally:
        load.stop_server(proc)
    assert set(costs) == {"home", "playground"}
    for page, loads in costs.items():
        assert len(loads) == 1, (page, loads)
        x = loads[0]
        assert 0 < x["dom"] <= x["title"] <= x["shown"] < 120, (page, x)


def test_browser_cost_reports_refreshes_main_thread_time_and_cores_per_process_kind():
    from bench import browser_cost

    log = Path(tempfile.mkdtemp()) / "server.log"
    proc = load.start_server(load._free_port(), log, {"OMP_NUM_THREADS": "1", "JEM_EXPLORER_DEFAULT": "digits"})
    try:
        port = proc.args[proc.args.index("--server.port") + 1]
        r = browser_cost.measure(f"http://127.0.0.1:{port}", tabs=1, warmup=8, seconds=6)
    finally:
        load.stop_server(proc)
    (tab,) = r["tabs"]
    assert tab["refreshes_per_s"] > 0.3 and tab["sgld_steps_per_s"] > 0, tab  # the chains ran and the tab drew them
    assert 0 < tab["script_ms_per_refresh"] <= tab["main_thread_ms_per_refresh"], tab  # scripts are part of the tasks
    assert r["cores"].get("server", 0) > 0 and r["cores"].get("chromium renderer", 0) > 0, r["cores"]


class _FlakyButton:
    """A stand-in for a Playwright page whose Start button times out ``failures`` times, then clicks."""

    def __init__(self, failures: int):
        self.failures, self.clicks, self.timeouts = failures, 0, []

    def locator(self, selector: str):
        if selector != ".st-key-lg_start button":
            raise RuntimeError("page gone")  # what _stuck reads besides the button: unreadable, as on a dead page
        return self

    def filter(self, visible: bool):
        return self

    @property
    def first(self):
        return self

    def click(self, timeout: float):
        self.timeouts.append(timeout)
        if self.failures:
            self.failures -= 1
            raise TimeoutError("Timeout 20000ms exceeded.\nCall log:\n  - waiting for locator\n"
                               "  - element is not stable\n  - retrying click action\n  - element is not stable")
        self.clicks += 1


def test_a_start_that_times_out_once_is_clicked_again_and_the_retry_recorded_with_why():
    result = {"exceptions": [], "click_retries": []}
    pg = _FlakyButton(failures=1)
    assert load._click_start("chains0", pg, result) is True
    assert pg.clicks == 1 and pg.timeouts == [load.CLICK_TIMEOUT_S * 1000] * 2
    assert result["exceptions"] == []
    (retry,) = result["click_retries"]
    assert retry["session"] == "chains0"
    # Playwright's call log, each reason once: what the click waited for
    assert retry["why"] == "TimeoutError: Timeout 20000ms exceeded. | Call log: | waiting for locator | " \
                           "element is not stable | retrying click action"


def test_a_start_that_no_try_can_click_is_a_finding_with_every_reason():
    result = {"exceptions": [], "click_retries": []}
    pg = _FlakyButton(failures=load.CLICK_TRIES)
    assert load._click_start("chains1", pg, result) is False
    assert pg.clicks == 0 and len(pg.timeouts) == load.CLICK_TRIES
    assert result["click_retries"] == []
    (finding,) = result["exceptions"]
    assert finding.startswith("chains1/langevin: Start could not be clicked (TimeoutError: ")
    assert finding.count("element is not stable") == load.CLICK_TRIES and "(unreadable: RuntimeError)" in finding
