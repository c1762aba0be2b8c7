"""The real book, end to end at scale="test": every chapter in _toc.yml executed by papermill, the HTML built
offline by jupyter-book, and the pages opened in headless Chromium."""

import json
import re
from pathlib import Path

import nbformat
import pytest

import browser
from reflow_core import book

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def built_book(real_book):
    return real_book  # conftest: the one execution of the whole book at scale="test" in this session


def test_every_chapter_executed_without_error(built_book):
    _, results = built_book
    for notebook in book.toc_notebooks(REPO):
        executed = results / "notebooks" / notebook.name
        assert executed.is_file(), f"{notebook.name} was not executed"
        nb = nbformat.read(executed, as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
        assert not errors, f"{notebook.name}: {errors[0]['ename']}: {errors[0]['evalue']}"
    run = json.loads((results / "RUN.json").read_text())
    assert run["scale"] == "test"


def test_figures_have_stable_names_and_both_formats(built_book):
    _, results = built_book
    pngs = sorted((results / "figures").glob("fig-*.png"))
    assert len(pngs) >= 4
    for png in pngs:
        assert re.fullmatch(r"fig-[a-z0-9]+(-[a-z0-9]+)+\.png", png.name)
        assert png.with_suffix(".svg").is_file()


def test_test_scale_never_promotes_into_the_record(built_book):
    record = REPO / "figures" / "RECORD.json"
    if record.exists():
        assert all(entry.get("scale") != "test" for entry in json.loads(record.read_text()).get("figures", {}).values())


def test_index_and_chapters_render_in_chromium(built_book, tmp_path):
    index, _ = built_book
    html = index.parent
    shot = browser.screenshot(browser.file_url(index), tmp_path / "index.png")
    assert not browser.is_blank(shot)
    dom = browser.dump_dom(browser.file_url(html / "notebooks" / "02_training.html"))
    assert "Training and convergence" in dom
    assert re.search(r"<img[^>]+fig[-_]training[-_]loss[-_]curves|<img[^>]+src=\"[^\"]+\.png\"", dom)
    scorecard = browser.dump_dom(browser.file_url(html / "notebooks" / "00_scorecard.html"))
    assert "Reproduction scorecard" in scorecard
    # the counts the page states are the stored verdicts' counts, each verdict word where the table shows it
    stored = json.loads((built_book[1] / "data" / "scorecard.json").read_text())
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", scorecard))
    counts = stored["counts"]
    assert f"Of {sum(counts.values())} tracked claims" in text
    for verdict, n in counts.items():
        assert f"{n} {verdict}" in text, (verdict, n)
    cells = re.findall(r'<span class="sc-badge"[^>]*>(reproduced|not reproduced|inconclusive|not testable at this '
                       r"scale|not yet measured)</span>", scorecard)
    assert sorted(cells) == sorted(c["verdict"] for c in stored["claims"])


def test_no_page_loads_anything_from_the_network(built_book):
    index, _ = built_book
    for page in index.parent.rglob("*.html"):
        text = page.read_text(errors="replace")
        external = re.findall(r"<(?:script|link)[^>]+(?:src|href)=\"(https?://[^\"]+)\"", text)
        assert not external, f"{page.name} loads {external[:3]}"
