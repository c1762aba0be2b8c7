"""The built book and the live app in a real browser that clicks: Selenium on headless Debian Chromium.

* the static steering panel answers from the saved widget state alone: dragging α, picking a direction or a layer
  range shows the precomputed cell of that setting (continuation and next-token bars, as the chapter stored them);
* the live steering app (``python -m reflow_core steer``) regenerates for a typed prompt and a moved slider, and
  Ctrl-C leaves no process behind;
* the scorecard page fits a 1366 px laptop screen: the whole table inside the viewport's width, nothing cut off;
* the steering page stays small (its widget state holds the whole grid).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import browser
from reflow_core.steering_grid import SteeringGrid

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
LAPTOP = (1366, 900)


@pytest.fixture(scope="module")
def html_dir(real_book) -> Path:
    return real_book[0].parent


def _wait(driver, condition, timeout: float = 60, what: str = "condition"):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d))
    except TimeoutException:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


# ----------------------------------------------------------------------------------------------
# The static steering panel


def shown_cells(panel) -> list:
    return [c for c in panel.find_elements("css selector", ".reflow-steer-cell") if c.is_displayed()]


def shown_setting(panel) -> tuple[int, str, float]:
    (cell,) = shown_cells(panel)  # a Stack shows one child: exactly one cell is on screen
    return (int(cell.get_attribute("data-direction")), cell.get_attribute("data-layers"),
            float(cell.get_attribute("data-rel-alpha")))


def assert_shows(panel, grid: SteeringGrid, setting: tuple[int, str, float]) -> None:
    """The panel shows the stored cell of ``setting``: its continuation and its bars' tokens and probabilities."""
    (cell,) = shown_cells(panel)
    stored = grid.cell(*setting)
    assert shown_setting(panel) == setting
    assert cell.find_element("css selector", ".reflow-steer-continuation").get_attribute("textContent") == \
        stored.continuation
    rows = cell.find_elements("css selector", "tr")[1:]
    assert [r.find_element("css selector", ".tok").get_attribute("textContent") for r in rows] == \
        [repr(t) for t in stored.top_tokens]
    assert [r.find_elements("css selector", "td")[2].text for r in rows] == [f"{p:.3f}" for p in stored.top_probs]


def test_static_steering_panel_answers_without_a_kernel(real_book, html_dir, tmp_path):
    from selenium.webdriver import ActionChains
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    grid = SteeringGrid.from_json(json.loads((real_book[1] / "data" / "steering.json").read_text())["panel"]["grid"])
    a = grid.rel_alphas
    with browser.webdriver(LAPTOP) as d:
        d.get(browser.file_url(html_dir / "notebooks" / "06_steering.html"))
        panel = _wait(d, lambda d: (d.find_elements("css selector", ".reflow-steer-grid") or [None])[0],
                      what="the embed manager to render the steering panel")
        _wait(d, lambda d: shown_cells(panel), what="a cell of the grid")
        d.execute_script("arguments[0].scrollIntoView()", panel)
        assert_shows(panel, grid, (0, "early", 2.0))  # the saved state: the chapter's first setting
        png = tmp_path / "steering-panel-first.png"
        d.save_screenshot(str(png))
        browser.keep_screenshot(png)

        # drag α to the left end of its slider, then one step right with the keyboard
        handle = panel.find_element("css selector", ".widget-slider .noUi-handle")
        track = panel.find_element("css selector", ".widget-slider .noUi-target")
        ActionChains(d).click_and_hold(handle).move_by_offset(-track.size["width"], 0).release().perform()
        _wait(d, lambda d: shown_setting(panel)[2] == a[0], 10, "the α drag to show the leftmost cell")
        assert_shows(panel, grid, (0, "early", a[0]))
        handle.send_keys(Keys.ARROW_RIGHT)
        _wait(d, lambda d: shown_setting(panel)[2] == a[1], 10, "one α step")
        assert_shows(panel, grid, (0, "early", a[1]))

        # another direction (the last one: the random null), then another layer range
        Select(panel.find_element("css selector", ".widget-dropdown select")).select_by_index(len(grid.directions) - 1)
        _wait(d, lambda d: shown_setting(panel)[0] == len(grid.directions) - 1, 10, "the direction to switch")
        assert_shows(panel, grid, (len(grid.directions) - 1, "early", a[1]))
        panel.find_elements("css selector", ".widget-toggle-buttons button")[list(grid.ranges).index("all")].click()
        _wait(d, lambda d: shown_setting(panel)[1] == "all", 10, "the layer range to switch")
        assert_shows(panel, grid, (len(grid.directions) - 1, "all", a[1]))
        png = tmp_path / "steering-panel-moved.png"
        d.save_screenshot(str(png))
        browser.keep_screenshot(png)


def test_the_steering_page_stays_small(html_dir):
    page = html_dir / "notebooks" / "06_steering.html"
    assert page.stat().st_size < 3_000_000, f"{page.name} is {page.stat().st_size / 1e6:.2f} MB"
    text = page.read_text(encoding="utf8")
    assert "fig-steering-panel" not in text  # the panel's chart is not shown a second time as a figure


# ----------------------------------------------------------------------------------------------
# The scorecard at laptop width


def test_scorecard_table_fits_a_1366_px_screen(html_dir, tmp_path):
    with browser.webdriver(LAPTOP) as d:
        d.get(browser.file_url(html_dir / "notebooks" / "00_scorecard.html"))
        table = _wait(d, lambda d: (d.find_elements("css selector", "table.reflow-scorecard") or [None])[0],
                      what="the scorecard table")
        d.execute_script("arguments[0].scrollIntoView()", table)
        png = tmp_path / "scorecard-1366.png"
        d.save_screenshot(str(png))
        browser.keep_screenshot(png)
        geometry = d.execute_script("""
            const t = arguments[0], vw = document.documentElement.clientWidth, r = t.getBoundingClientRect();
            let box = t.parentElement; while (box && getComputedStyle(box).overflowX === 'visible') box = box.parentElement;
            const cells = [...t.querySelectorAll('th, td')].filter(c => c.getClientRects().length)
                .map(c => { const b = c.getBoundingClientRect();
                            return {right: b.right, left: b.left, overflow: c.scrollWidth - c.clientWidth}; });
            return {vw, left: r.left, right: r.right, width: window.innerWidth,
                    boxScroll: box ? box.scrollWidth - box.clientWidth : 0, cells,
                    header: [...t.querySelectorAll('thead th')].map(h => h.textContent.trim())};""", table)
    assert geometry["width"] == LAPTOP[0]
    assert geometry["header"] == ["claim", "paper", "ours", "verdict"]
    assert 0 <= geometry["left"] and geometry["right"] <= geometry["vw"], geometry
    assert geometry["boxScroll"] <= 1, "the table scrolls sideways inside its output box"
    assert all(0 <= c["left"] and c["right"] <= geometry["right"] + 1 for c in geometry["cells"])
    assert all(c["overflow"] <= 1 for c in geometry["cells"]), "a cell's content is wider than the cell"
    assert browser.color_count(png) > 16


def test_scorecard_opens_with_the_summary_figure_and_hides_the_detail(html_dir):
    page = (html_dir / "notebooks" / "00_scorecard.html").read_text(encoding="utf8")
    figure, table = page.find('id="fig-scorecard-summary"'), page.find('class="reflow-scorecard"')
    assert 0 < figure < table, "the summary figure comes before the table"
    assert re.search(r'<img[^>]+fig[-_]scorecard[-_]summary|id="fig-scorecard-summary"', page)
    n_claims = page.count('class="sc-claim"')
    assert n_claims >= 20 and page.count("<details>") == n_claims  # why, control and checkpoint: one click away
    assert "File: <code" in page and "figures/fig-scorecard-summary.png" in page


# ----------------------------------------------------------------------------------------------
# The live app


def _descendants(pid: int) -> list[int]:
    from reflow_core.book import _descendants as below

    return below(pid)


def _alive(pid: int) -> bool:
    from reflow_core.book import _running

    return _running(pid)


def test_live_steering_app_regenerates_and_stops_cleanly(test_results_dir, tmp_path):
    from selenium.webdriver import ActionChains
    from selenium.webdriver.common.keys import Keys

    browser.require_chromedriver()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "steer.log").open("w+")
    # started as a shell's background job would be (SIGINT ignored, inherited): Ctrl-C must stop it all the same
    app = subprocess.Popen([sys.executable, "-m", "reflow_core", "steer", "--scale", "test", "--port", "0",
                            "--results-dir", str(test_results_dir)], cwd=REPO, env=env, stdout=log,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    seen: set[int] = set()
    try:
        deadline, url = time.monotonic() + 300, None  # trains the test model first when this session has none
        while url is None:
            assert app.poll() is None, f"the app exited ({app.returncode}):\n{Path(log.name).read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no address printed:\n{Path(log.name).read_text()[-3000:]}"
            found = re.search(r"http://127\.0\.0\.1:(\d+)/", Path(log.name).read_text())
            url = found.group(0) if found else time.sleep(0.3)
        assert int(found.group(1)) > 0
        with browser.webdriver(LAPTOP) as d:
            d.get(url)
            _wait(d, lambda d: d.find_elements("css selector", ".reflow-next-tokens"), 180,
                  "the app's kernel to render the panel")

            def text() -> str:  # the panel's output widget, found afresh: each regeneration replaces its DOM
                from selenium.common.exceptions import StaleElementReferenceException

                try:
                    return d.find_element("css selector", ".reflow-next-tokens").find_element("xpath", "..").text
                except StaleElementReferenceException:
                    return ""

            seen |= set(_descendants(app.pid))  # Voilà and the page's kernel
            first = text()
            assert "steered:" in first and "The service was terrible" in first
            prompt = d.find_element("xpath", "//div[contains(@class,'widget-text')][.//label[normalize-space()="
                                             "'prompt']]//input")
            prompt.clear()
            prompt.send_keys("The weather in the mountains was", Keys.ENTER)
            _wait(d, lambda d: "The weather in the mountains was" in text(), 60, "the typed prompt to regenerate")
            before = text()
            handle = d.find_element("xpath", "//div[contains(@class,'widget-slider')][.//label[normalize-space()='α']]"
                                             "//div[contains(@class,'noUi-handle')]")
            ActionChains(d).click_and_hold(handle).move_by_offset(-80, 0).release().perform()
            _wait(d, lambda d: text() != before, 60, "the moved α slider to regenerate")
            assert "The weather in the mountains was" in text()
            png = tmp_path / "steer-app.png"
            d.save_screenshot(str(png))
            browser.keep_screenshot(png)
            seen |= set(_descendants(app.pid))
        assert seen, "the app started no process (no Voilà?)"
    finally:
        app.send_signal(signal.SIGINT)  # what Ctrl-C in its terminal sends
        try:
            code = app.wait(timeout=60)
        except subprocess.TimeoutExpired:  # leave nothing behind, then fail: Voilà and its kernels too
            from reflow_core.book import _kill_all

            _kill_all([app.pid, *seen, *_descendants(app.pid)])
            raise
    output = Path(log.name).read_text()
    assert code == 0, output[-3000:]
    assert "steering app stopped" in output
    deadline = time.monotonic() + 10
    while (left := [p for p in seen if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes left behind: {left}"
    assert not browser_port_open(url)


def browser_port_open(url: str) -> bool:
    import socket

    host, port = re.match(r"http://([\d.]+):(\d+)/", url).groups()
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False
