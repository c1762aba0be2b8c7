"""What every chapter test checks in the shared test-scale book run (conftest ``real_book``)."""

from pathlib import Path

import nbformat
import numpy as np
from PIL import Image

from reflow_core.figures import figure_glue_key
from reflow_core.results import load_result
from reflow_core.scorecard import REGISTRY_FIELDS, Row


def check_chapter(real_book, notebook: str, figures: list[str], scorecard: str,
                  claims: set[str]) -> nbformat.NotebookNode:
    """The chapter was executed without an error output, saved each figure under its stable name (a real image, not a
    blank canvas), glued it for the text, and stored exactly ``claims`` as scorecard rows under ``scorecard`` — each
    row a valid :class:`Row` (a verdict of the five, a control, "not reproduced" only on a passed control); returns
    the executed notebook for chapter-specific checks."""
    _, results = real_book
    executed = Path(results) / "notebooks" / f"{notebook}.ipynb"
    assert executed.is_file(), f"{notebook} was not executed by the book run"
    nb = nbformat.read(executed, as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{notebook}: {errors[0]['ename']}: {errors[0]['evalue']}"
    glued = {o.get("metadata", {}).get("scrapbook", {}).get("name") for c in nb.cells if c.cell_type == "code"
             for o in c.get("outputs", [])}
    for name in figures:
        png = Path(results) / "figures" / f"{name}.png"
        assert png.exists(), name
        pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
        assert pixels.std() > 5, f"{name} is blank"
        assert figure_glue_key(name) in glued, f"{name} is not glued for the text"
    rows = load_result(results, scorecard)["rows"]
    assert {r["claim_id"] for r in rows} == claims
    for r in rows:  # re-validates: the verdict, the control, the refusal of an unsupported "not reproduced"
        Row(**{k: v for k, v in r.items() if k not in REGISTRY_FIELDS})
    return nb
