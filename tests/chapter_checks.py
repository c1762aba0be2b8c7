"""What every chapter test checks in the shared test-scale book run (conftest ``real_book``)."""

from pathlib import Path

import nbformat

from reflow_core.results import load_result


def check_chapter(real_book, notebook: str, figures: list[str], scorecard: str,
                  claims: set[str]) -> nbformat.NotebookNode:
    """The chapter was executed, saved each figure under its stable name, and stored exactly ``claims`` as scorecard
    rows under the result ``scorecard``; returns the executed notebook for chapter-specific checks."""
    _, results = real_book
    executed = Path(results) / "notebooks" / f"{notebook}.ipynb"
    assert executed.is_file(), f"{notebook} was not executed by the book run"
    for name in figures:
        assert (Path(results) / "figures" / f"{name}.png").exists(), name
    rows = load_result(results, scorecard)["rows"]
    assert {r["claim_id"] for r in rows} == claims
    return nbformat.read(executed, as_version=4)
