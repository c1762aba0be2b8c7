"""Result JSON and training metrics: what notebooks write for the scorecard and read back."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from reflow_core.fileio import write_json_atomic


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return value.item()
    return value


def save_result(results_dir: str | Path, name: str, result: dict) -> Path:
    """Write ``results_dir/data/<name>.json`` atomically (the scorecard reads these); paths in it are written relative
    to the repository root (:func:`reflow_core.public_paths.redact_json`): the record must not name the machine."""
    from reflow_core.public_paths import redact_json

    return write_json_atomic(Path(results_dir) / "data" / f"{name}.json", redact_json(_jsonable(result)),
                             sort_keys=True)


def load_result(results_dir: str | Path, name: str) -> dict | None:
    path = Path(results_dir) / "data" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """The JSONL metrics a training run writes (one row per logged step)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return pd.DataFrame(rows)


class _ProseText(str):
    """A string that IPython shows as itself: the text/plain form of a plain ``str`` is its repr, quotes included,
    and a glued string would appear in the book's sentences as 'smoke' instead of smoke."""

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(str(self))


def glue(name: str, value, display: bool = False) -> None:
    """``myst_nb.glue`` for the chapters: strings are glued as their text, everything else unchanged."""
    from myst_nb import glue as myst_glue

    myst_glue(name, _ProseText(value) if isinstance(value, str) else value, display=display)
