"""One module per chapter notebook, all under one contract, so that a notebook only sets parameters, calls the
package, shows and glues.

A chapter module ``reflow_core.chapters.<name>`` (``<name>`` = the notebook's name without its number) has:

* ``NAME`` — the stem of its stored files: ``results/<scale>/data/<NAME>.json`` and ``scorecard-<NAME>.json``;
* ``run(scale, results_dir, **parameters) -> Result`` — everything the chapter measures, with its nulls and baselines
  (the models it needs are trained once per scale by :mod:`reflow_core.runs`);
* ``plot(result) -> {figure name: Figure}`` — the chapter's figures, named ``fig-<chapter>-<what>`` (stable, citable),
  stamped with ``result.checkpoint`` (a value may be ``(Figure, checkpoint)`` for a figure made from other weights);
* ``scorecard_rows(result) -> list[Row]`` — the chapter's claims, with verdicts;
* ``Result`` — a dataclass deriving from :class:`ChapterResult`: ``result.to_json()`` is the stored record, and
  ``result.prose()`` the values the chapter's text quotes (``{glue:}`key```), each computed, never typed.

A notebook is then::

    from reflow_core.chapters import publish, signal_identity as chapter

    result = chapter.run(scale, results_dir)
    publish(chapter, result, results_dir)        # figures saved + glued, prose values glued, JSON and rows stored

followed by its prose, ``{glue:figure}`` directives (key: the figure name with ``_`` for ``-``) and any table cells.
:func:`publish` also glues each row's ``verdict_<claim>``, ``why_<claim>`` and ``ours_<claim>`` (``<claim>`` = the part
of the claim id after the dot).

Chapters, in book order: ``scorecard`` (00, run last), ``architecture``, ``training``, ``signal_identity``,
``semantic_properties``, ``mechanistic``, ``steering``, ``posthoc``, ``sparsity_variants``, ``thread_followups``,
``cost``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from types import ModuleType

from reflow_core.figures import publish_figure
from reflow_core.results import glue, save_result
from reflow_core.scales import results_dir_for
from reflow_core.scorecard import Row, save_rows


@dataclass(kw_only=True)
class ChapterResult:
    """What every chapter's result carries: the scale it ran at and the checkpoint label its figures are stamped with."""

    scale: str
    checkpoint: str

    def to_json(self) -> dict:
        """The stored record (``results/<scale>/data/<NAME>.json``); chapters override it to leave out bulky data."""
        return dataclasses.asdict(self)

    def prose(self) -> dict[str, object]:
        """``{glue key: value}`` for every number the chapter's text quotes."""
        return {}


def claim_key(row: Row) -> str:
    """``atlas.three_four`` → ``three_four``: the suffix a chapter's prose uses for a row's verdict and why."""
    return row.claim_id.split(".", 1)[1]


def publish(chapter: ModuleType, result: ChapterResult, results_dir: str | os.PathLike) -> list[Row]:
    """Save and glue ``chapter.plot(result)``'s figures and ``result.prose()``; store the result JSON and the
    chapter's scorecard rows (their verdict, why and ours glued too).  Returns the rows.

    ``results_dir`` is the notebook's parameter: "" (a notebook opened by hand) means ``results/<scale>``."""
    results_dir = results_dir_for(result.scale, results_dir)
    for name, fig in chapter.plot(result).items():
        fig, checkpoint = fig if isinstance(fig, tuple) else (fig, result.checkpoint)
        publish_figure(fig, name, results_dir=results_dir, scale=result.scale, checkpoint=checkpoint)
    for key, value in result.prose().items():
        glue(key, value)
    rows = chapter.scorecard_rows(result)
    for row in rows:
        glue(f"verdict_{claim_key(row)}", row.verdict)
        glue(f"why_{claim_key(row)}", row.why)
        glue(f"ours_{claim_key(row)}", row.ours)
    save_result(results_dir, chapter.NAME, result.to_json())
    if rows:  # the scorecard chapter reads rows, it has none of its own
        save_rows(results_dir, chapter.NAME, rows)
    return rows


def rows_table(rows: list[Row]):
    """The chapter's rows as a small table (claim, paper, ours, verdict, why) for the end of a chapter."""
    import pandas as pd

    return pd.DataFrame([dataclasses.asdict(r) for r in rows])[["claim_id", "paper", "ours", "verdict", "why"]]
