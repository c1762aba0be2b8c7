"""End-to-end: papermill executes a tiny chapter, jupyter-book builds the HTML offline, Chromium renders it.

The book is a miniature of the real one, assembled in ``tmp_path`` from the repository's own ``_config.yml`` and
``book/`` (so the offline assets, MathJax path, widget scripts and bibliography are the real ones), plus:

* ``notebooks/01_tiny.ipynb`` with a ``parameters`` cell, a figure saved through ``save_figure``, a glued number,
  a ``{glue:figure}`` with a ``:name:`` label and an ipywidgets slider (static widget embedding);
* ``book/quote.md``, a prose page that quotes the glued number across documents, cites the figure with
  ``{numref}`` and typesets ``$E = W_{recipe} W_{basis}$``.

Nothing is mocked: papermill starts a real ``python3`` kernel and ``jupyter-book`` runs as a subprocess.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest

import browser
from reflow_core import book

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
GLUED_VALUE = "0.3702"  # 0.1234 * 3, formatted with :.4f

PARAMETERS_CELL = 'scale = "smoke"\nresults_dir = ""\n'

CODE_CELL = """\
import ipywidgets as widgets
import matplotlib.pyplot as plt
from myst_nb import glue

from reflow_core.scales import resolve_results_dir
from reflow_core.figures import caption, save_figure

results = resolve_results_dir(results_dir, scale)
value = 0.1234 * 3
glue("tiny_value", value, display=False)

fig, ax = plt.subplots(figsize=(4, 3))
ax.plot([0, 1, 2, 3], [3.0, 2.2, 1.9, 1.8], marker="o", label="reflow")
ax.set_xlabel("step")
ax.set_ylabel("loss")
ax.legend()
png = save_figure(fig, "fig-01-tiny", results_dir=results, scale=scale, checkpoint="tiny-step3")
glue("tiny_fig", fig, display=False)
glue("tiny_caption", caption("A tiny loss curve.", scale=scale, checkpoint="tiny-step3"), display=False)
plt.close(fig)
print("saved", png.name)
import sys
print("stderr" + "-chatter", file=sys.stderr)  # progress bars write here; it stays out of the book
"""

FIGURE_CELL = """\
```{glue:figure} tiny_fig
:name: fig-tiny
:alt: tiny loss curve

A tiny loss curve, glued from the notebook. {glue:text}`tiny_caption`
```

The notebook measured {glue:text}`tiny_value:.4f`, plotted in {numref}`fig-tiny`.
"""

WIDGET_CELL = 'widgets.IntSlider(value=3, min=0, max=10, description="steps")\n'

QUOTE_PAGE = """\
# Quoted results

The tiny chapter measured {glue:text}`../notebooks/01_tiny.ipynb::tiny_value:.4f` (a cross-document glue),
shown in {numref}`fig-tiny`. The factorisation is $E = W_{recipe} W_{basis}$.

Absolute document paths work too: {glue:text}`/notebooks/01_tiny.ipynb::tiny_value:.2f`.

`{glue:figure}` cannot reach into another document; a prose page shows a stored figure by its stable file name
(the stage holds this scale's `figures/`), as in {numref}`fig-tiny-file`.

```{figure} ../figures/fig-01-tiny.png
:name: fig-tiny-file
:alt: the same figure, from its file

The stored figure file.
```
"""

TOC = """\
format: jb-book
root: book/intro
chapters:
  - file: notebooks/01_tiny
  - file: book/quote
  - file: book/data
  - file: book/references
"""


def _tiny_notebook() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    params = nbformat.v4.new_code_cell(PARAMETERS_CELL)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Tiny chapter\n\nA chapter small enough for the test suite."),
        params,
        nbformat.v4.new_code_cell(CODE_CELL),
        nbformat.v4.new_markdown_cell(FIGURE_CELL),
        nbformat.v4.new_code_cell(WIDGET_CELL),
    ]
    return nb


def make_tiny_repo(root: Path) -> Path:
    """A repository-shaped folder: the real config and prose, a tiny TOC and chapter."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "_config.yml", root / "_config.yml")
    shutil.copytree(REPO / "book", root / "book")
    (root / "_toc.yml").write_text(TOC)
    (root / "book" / "quote.md").write_text(QUOTE_PAGE)
    (root / "notebooks").mkdir()
    nbformat.write(_tiny_notebook(), root / "notebooks" / "01_tiny.ipynb")
    return root


CDN_TAG = re.compile(r"""<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)\s*=\s*["'](?:https?:)?//[^"']+""", re.I)


def cdn_references(html_dir: Path) -> list[str]:
    """Every script/link/img/iframe that would load something from another host, in any built page."""
    found = []
    for page in sorted(html_dir.rglob("*.html")):
        for match in CDN_TAG.finditer(page.read_text(encoding="utf8")):
            found.append(f"{page.relative_to(html_dir)}: {match.group(0)}")
    return found


@pytest.fixture(scope="module")
def built_book(tmp_path_factory):
    """Execute the tiny chapter at scale ``test`` and build it; shared by the checks below."""
    repo = make_tiny_repo(tmp_path_factory.mktemp("tinyrepo"))
    # execute, (not) promote, stage, build with -W; the tiny chapters use no trained model
    index = book.run_book("test", repo_root=repo, train_first=False)
    assert index == repo / "_build" / "html" / "index.html"
    record = json.loads((repo / "results" / "test" / "RUN.json").read_text())
    return {"repo": repo, "record": record, "index": index, "html": index.parent}


def test_execution_record_and_figure_files(built_book):
    repo, record = built_book["repo"], built_book["record"]
    results = repo / "results" / "test"
    assert (results / "notebooks" / "01_tiny.ipynb").is_file()
    assert (results / "figures" / "fig-01-tiny.png").stat().st_size > 1000
    assert (results / "figures" / "fig-01-tiny.svg").is_file()
    run = record
    assert run["scale"] == "test" and run["device"]
    assert run["notebooks"]["01_tiny"]["status"] == "ok" and run["notebooks"]["01_tiny"]["seconds"] > 0
    executed = nbformat.read(results / "notebooks" / "01_tiny.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and "scale = \"test\"" in injected[0].source
    # the record names its results folder relative to the repository root, never the producing machine's checkout
    assert 'results_dir = "results/test"' in injected[0].source, injected[0].source
    assert str(repo) not in injected[0].source and str(repo.resolve()) not in injected[0].source
    # a test run is never a figure of record
    assert book.promote_figures("test", repo_root=repo) is False
    assert not (repo / "figures").exists()


def test_glued_numbers_and_figure_in_html(built_book):
    html = built_book["html"]
    chapter = (html / "notebooks" / "01_tiny.html").read_text(encoding="utf8")
    quote = (html / "book" / "quote.html").read_text(encoding="utf8")
    assert GLUED_VALUE in chapter
    assert GLUED_VALUE in quote, "cross-document {glue:text}`path::key` did not resolve"
    assert "0.37" in quote  # the absolute-path form with :.2f
    assert re.search(r"<img[^>]+src=\"[^\"]+\.png\"", chapter), "glued figure missing"
    assert 'id="fig-tiny"' in chapter
    assert 'id="fig-tiny-file"' in quote and "fig-01-tiny.png" in quote
    # the stored parameter cells are folded in the book
    assert re.search(r'class="[^"]*\btag_parameters\b[^"]*\btag_hide-cell\b', chapter)
    assert re.search(r"Fig(ure|\.)\s*\S*\d", quote), "numref to the figure did not resolve"
    assert "(scale: test, checkpoint: tiny-step3)" in chapter  # caption provenance
    assert "stderr-chatter" not in chapter  # stderr output removed (and no warning under -W)
    assert "Radford" in (html / "book" / "references.html").read_text(encoding="utf8")


def test_no_cdn_in_built_html(built_book):
    html = built_book["html"]
    assert cdn_references(html) == []
    chapter = (html / "notebooks" / "01_tiny.html").read_text(encoding="utf8")
    # the widget page must load the vendored embed scripts, and MathJax must be the vendored copy
    assert "_static/vendor/requirejs/require.js" in chapter
    assert "_static/vendor/jupyter-widgets/embed-amd.js" in chapter
    assert "application/vnd.jupyter.widget-state+json" in chapter
    quote = (html / "book" / "quote.html").read_text(encoding="utf8")
    assert "_static/vendor/mathjax/es5/tex-chtml-full.js" in quote
    assert (html / "_static" / "vendor" / "mathjax" / "es5" / "tex-chtml-full.js").is_file()
    log = (built_book["repo"] / "_build" / "jupyter-book.log").read_text()
    assert "loading intersphinx inventory" not in log.lower()


def test_chromium_renders_index_and_chapter(built_book, tmp_path):
    browser.require_chromium()
    html = built_book["html"]
    png = browser.screenshot(browser.file_url(built_book["index"]), tmp_path / "index.png")
    assert not browser.is_blank(png)
    assert browser.color_count(png) > 16, "index screenshot is nearly flat: the page did not render"

    dom = browser.dump_dom(browser.file_url(html / "notebooks" / "01_tiny.html"))
    assert "reFlow Book" in dom
    assert re.search(r"<img[^>]+src=\"[^\"]+\.png\"", dom)
    assert GLUED_VALUE in dom
    # the slider was rendered by the vendored @jupyter-widgets/html-manager (not just left as JSON)
    assert "widget-slider" in dom, "ipywidgets embed manager did not render the slider offline"


def test_chromium_typesets_math_with_local_mathjax(built_book, tmp_path):
    browser.require_chromium()
    page = built_book["html"] / "book" / "quote.html"
    dom = browser.dump_dom(browser.file_url(page))
    assert "<mjx-container" in dom, "MathJax did not typeset (vendored script not loaded?)"
    assert "<mjx-merror" not in dom and "data-mjx-error" not in dom, "MathJax reported a TeX error"
    assert 'jax="CHTML"' in dom  # the CommonHTML output of tex-chtml-full.js, with its vendored fonts
    png = browser.screenshot(browser.file_url(page), tmp_path / "math.png")
    assert browser.color_count(png) > 16


def test_failing_notebook_is_named_and_recorded(tmp_path):
    """A chapter that raises stops the run with its name; what ran before it is still in RUN.json."""
    repo = make_tiny_repo(tmp_path / "repo")
    bad = _tiny_notebook()
    bad.cells = [bad.cells[1], nbformat.v4.new_code_cell("raise ValueError('boom at ' + scale)")]
    nbformat.write(bad, repo / "notebooks" / "02_broken.ipynb")
    (repo / "_toc.yml").write_text(TOC + "  - file: notebooks/02_broken\n")
    with pytest.raises(book.NotebookExecutionError, match=r"02_broken.*boom at test") as info:
        book.execute_notebooks("test", repo_root=repo, log_output=False)
    assert info.value.notebook == "02_broken"
    assert info.value.executed_path.is_file()
    run = json.loads((repo / "results" / "test" / "RUN.json").read_text())
    assert run["notebooks"]["01_tiny"]["status"] == "ok"
    assert run["notebooks"]["02_broken"]["status"] == "failed"
    assert "boom at test" in run["notebooks"]["02_broken"]["error"]
