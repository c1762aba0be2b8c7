"""Headless Chromium for tests that check the built book *renders*, not just that HTML files exist.

Used as a plain module (``from browser import screenshot, dump_dom``; pytest puts ``tests/`` on ``sys.path``)::

    png = screenshot(file_url(index), tmp_path / "index.png")
    assert not is_blank(png)
    dom = dump_dom(file_url(chapter))          # the DOM after scripts ran (MathJax, widgets)

Chromium is the Debian package (``/usr/bin/chromium``; ``make test`` installs it). When it is missing,
:func:`require_chromium` *fails* the test with that instruction, because a rendering test that silently skips
proves nothing; set ``REFLOW_ALLOW_NO_BROWSER=1`` to skip instead (e.g. on a machine where it cannot be installed).

Every run gets a fresh profile and the flags that keep Chromium from phoning home (the book must work offline,
and background fetches against a closed network only slow it down).

Tests that interact with a page (drag a slider, pick from a dropdown, type a prompt) drive the same Chromium through
Selenium and Debian's ``chromium-driver`` (:class:`webdriver`, :func:`require_chromedriver`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

BASE_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
)


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable, or ``None``. ``REFLOW_CHROMIUM`` overrides the search."""
    override = os.environ.get("REFLOW_CHROMIUM")
    if override:
        return override if shutil.which(override) else None
    for candidate in CHROMIUM_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def require_chromium() -> str:
    """The Chromium path; otherwise fail the calling test (or skip it if ``REFLOW_ALLOW_NO_BROWSER=1``)."""
    import pytest

    found = find_chromium()
    if found:
        return found
    message = ("headless Chromium not found (looked for /usr/bin/chromium). Run `make test`, which installs the "
               "Debian package `chromium`, or `apt-get install -y chromium`; set REFLOW_ALLOW_NO_BROWSER=1 to skip "
               "browser checks instead")
    if os.environ.get("REFLOW_ALLOW_NO_BROWSER") == "1":
        pytest.skip(message)
    pytest.fail(message, pytrace=False)


def file_url(path: str | os.PathLike) -> str:
    """``file://`` URL of a local file (absolute, percent-encoded)."""
    return Path(path).resolve().as_uri()


def _run(args: list[str], *, timeout: float) -> subprocess.CompletedProcess:
    chromium = require_chromium()
    profile = tempfile.mkdtemp(prefix="reflow-chromium-")
    cmd = [chromium, *BASE_FLAGS, f"--user-data-dir={profile}", *args]
    # Own process group: on timeout, the browser and all its helper processes are ended together.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise RuntimeError(f"chromium timed out after {timeout} s: {' '.join(cmd)}\n{err[-3000:]}") from None
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited {proc.returncode}: {' '.join(cmd)}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def screenshot(url: str, png: str | os.PathLike, *, window: tuple[int, int] = (1280, 900),
               budget_ms: int = 5000, timeout: float = 120) -> Path:
    """Render ``url`` and save a ``window``-sized PNG screenshot to ``png``; return its path.

    ``budget_ms`` of virtual time lets page scripts (MathJax typesetting, widget rendering) finish first.
    """
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    _run([f"--screenshot={png}", f"--window-size={window[0]},{window[1]}",
          f"--virtual-time-budget={budget_ms}", url], timeout=timeout)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot for {url}")
    return png


def dump_dom(url: str, *, budget_ms: int = 5000, timeout: float = 120) -> str:
    """The serialised DOM of ``url`` after ``budget_ms`` of virtual time (i.e. after its scripts ran)."""
    return _run(["--dump-dom", f"--virtual-time-budget={budget_ms}", url], timeout=timeout).stdout


def color_count(png: str | os.PathLike, *, limit: int = 4096) -> int:
    """Number of distinct colours in the image (capped at ``limit``)."""
    from PIL import Image  # pillow comes with matplotlib

    with Image.open(png) as img:
        colors = img.convert("RGB").getcolors(maxcolors=limit)
    return limit if colors is None else len(colors)


def is_blank(png: str | os.PathLike) -> bool:
    """True if the screenshot is a single flat colour (nothing rendered)."""
    return color_count(png, limit=2) < 2


# ----------------------------------------------------------------------------------------------
# Selenium: pages a test clicks, types into and drags on (Debian's chromium-driver; `make browser` installs it)

WEBDRIVER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   "--disable-dev-shm-usage", "--disable-extensions", "--mute-audio")
CHROMEDRIVER_CANDIDATES = ("/usr/bin/chromedriver", "chromedriver")


def require_chromedriver() -> str:
    """The chromedriver path; otherwise fail the calling test (skip with ``REFLOW_ALLOW_NO_BROWSER=1``)."""
    import pytest

    for candidate in (os.environ.get("REFLOW_CHROMEDRIVER"), *CHROMEDRIVER_CANDIDATES):
        found = candidate and shutil.which(candidate)
        if found:
            return found
    message = ("chromedriver not found (looked for /usr/bin/chromedriver). Run `make test`, which installs the Debian "
               "packages `chromium` and `chromium-driver`; set REFLOW_ALLOW_NO_BROWSER=1 to skip browser checks instead")
    if os.environ.get("REFLOW_ALLOW_NO_BROWSER") == "1":
        pytest.skip(message)
    pytest.fail(message, pytrace=False)


class webdriver:
    """``with webdriver((1366, 900)) as d: d.get(url)`` — a Selenium Chrome driver on headless Debian Chromium with a
    fresh profile and the flags that keep it off the network; the driver and the profile are gone afterwards."""

    def __init__(self, window: tuple[int, int] = (1366, 900)) -> None:
        self.window = window

    def __enter__(self):
        import pytest

        try:  # a test extra (pyproject): missing means a broken install, not a reason to skip
            from selenium import webdriver as wd
            from selenium.webdriver.chrome.service import Service
        except ImportError:
            message = "selenium is not installed: pip install -e '.[test]' (`make test` does)"
            if os.environ.get("REFLOW_ALLOW_NO_BROWSER") == "1":
                pytest.skip(message)
            pytest.fail(message, pytrace=False)
        options = wd.ChromeOptions()
        options.binary_location = require_chromium()
        self.profile = tempfile.mkdtemp(prefix="reflow-selenium-")
        for flag in (*WEBDRIVER_FLAGS, f"--user-data-dir={self.profile}",
                     f"--window-size={self.window[0]},{self.window[1]}"):
            options.add_argument(flag)
        self.driver = wd.Chrome(service=Service(require_chromedriver()), options=options)
        self.driver.set_page_load_timeout(120)
        return self.driver

    def __exit__(self, *exc) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)


def keep_screenshot(png: str | os.PathLike) -> None:
    """Copy a test's screenshot to ``$REFLOW_SCREENSHOT_DIR`` when that is set (to look at it after the run)."""
    where = os.environ.get("REFLOW_SCREENSHOT_DIR")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        shutil.copy2(png, Path(where) / Path(png).name)
