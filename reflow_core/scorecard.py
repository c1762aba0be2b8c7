"""The reproduction scorecard: one row per claim of the source documents.

Each chapter notebook computes its rows (:class:`Row`) from its own results and stores them with
:func:`save_rows`; the scorecard notebook, which runs after all chapters, gathers every stored row
with :func:`collect_rows`.  A verdict is one of :data:`VERDICTS` and always comes with one line
saying why — the numbers themselves come from the measurements, never from typing.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from reflow_core.results import load_result, save_result

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
NOT_TESTABLE = "not testable at this scale"
NOT_YET = "not yet measured"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, NOT_TESTABLE, NOT_YET)


REGISTRY_FIELDS = ("source", "claim", "paper")


@dataclass
class Control:
    """A positive control of a claim's test: did the test show, on this build, that it can see the effect?

    ``name`` says which control (a competence gate, a baseline gate, a planted spike-in, or why none is possible),
    ``detail`` the measured numbers; ``value`` and ``threshold`` (where the control is one number against a bar) let the
    competence figure plot it.
    """

    name: str
    passed: bool
    detail: str = ""
    value: float | None = None
    threshold: float | None = None

    def __str__(self) -> str:
        return f"{self.name}: {'passed' if self.passed else 'failed'}" + (f" ({self.detail})" if self.detail else "")


@dataclass(kw_only=True)
class Row:
    """One measured claim.  ``source``, ``claim`` and ``paper`` come from the registry (``assets/claims.json``) by
    ``claim_id``, so the published figure is written in one place; a chapter supplies only what it measured."""

    claim_id: str  # stable id, e.g. "training.val_gap"; must be in the registry
    ours: str  # our measured figure, formatted
    verdict: str
    why: str  # one line
    scale: str
    checkpoint: str
    chapter: str = ""
    source: str = field(init=False)  # "reFlow" | "reFlow thread" | "SAE+NFM"
    claim: str = field(init=False)  # the claim in a few words
    paper: str = field(init=False)  # the paper's figure, as published

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")
        registered = _registry().get(self.claim_id)
        if registered is None:
            raise ValueError(f"claim_id {self.claim_id!r} is not in assets/claims.json")
        for name in REGISTRY_FIELDS:
            setattr(self, name, registered[name])


@functools.cache
def _registry() -> dict[str, dict]:
    from importlib.resources import files

    return {c["claim_id"]: c for c in json.loads(files("reflow_core").joinpath("assets/claims.json").read_text())}


def save_rows(results_dir: str | Path, chapter: str, rows: list[Row]) -> Path:
    for row in rows:
        row.chapter = row.chapter or chapter
    return save_result(results_dir, f"scorecard-{chapter}", {"rows": [asdict(r) for r in rows]})


def collect_rows(results_dir: str | Path, chapters: list[str] | None = None) -> pd.DataFrame:
    """All rows stored under ``results_dir/data/scorecard-*.json`` (in ``chapters`` order if given)."""
    data_dir = Path(results_dir) / "data"
    names = chapters or sorted(p.stem.removeprefix("scorecard-") for p in data_dir.glob("scorecard-*.json"))
    rows = []
    for name in names:
        stored = load_result(results_dir, f"scorecard-{name}")
        if stored:
            # what a row says of the paper is read from today's registry, not from the stored copy
            rows.extend(Row(**{k: v for k, v in r.items() if k not in REGISTRY_FIELDS}) for r in stored["rows"])
    columns = ["claim_id", *REGISTRY_FIELDS, "ours", "verdict", "why", "scale", "checkpoint", "chapter"]
    return pd.DataFrame([asdict(r) for r in rows], columns=columns)


def verdict_within(ours: float, paper: float, rel_tol: float) -> str:
    """``reproduced`` when ``ours`` lies within ``rel_tol`` (relative) of ``paper``."""
    return REPRODUCED if abs(ours - paper) <= rel_tol * abs(paper) else NOT_REPRODUCED


def load_claims() -> pd.DataFrame:
    """Every claim of the sources the book tracks (``assets/claims.json``), measured or not."""
    return pd.DataFrame(list(_registry().values()))


def scorecard_table(results_dir: str | Path) -> pd.DataFrame:
    """Stored rows joined onto the claim registry; claims no chapter measured say so."""
    rows = collect_rows(results_dir)  # a row whose claim is not registered is refused when it is read
    claims = load_claims()
    missing = claims[~claims["claim_id"].isin(rows["claim_id"])]
    pending = pd.DataFrame({
        **{c: missing[c] for c in ("claim_id", "source", "claim", "paper")},
        "ours": "—", "verdict": NOT_YET, "why": "no chapter at this build measures it yet",
        "scale": "—", "checkpoint": "—", "chapter": "—",
    })
    table = pd.concat([rows, pending], ignore_index=True)
    order = {cid: i for i, cid in enumerate(claims["claim_id"])}
    return table.sort_values("claim_id", key=lambda s: s.map(order)).reset_index(drop=True)
