"""The reproduction scorecard: one row per claim of the source documents.

Each chapter computes its rows (:class:`Row`) from its own results and stores them with :func:`save_rows`; the
scorecard chapter, which runs after all others, gathers every stored row with :func:`scorecard_table`.  A verdict is
one of :data:`VERDICTS` and always comes with one line saying why — the numbers come from the measurements, never
from typing.

**The verdict rule** (:func:`decide`), the same for every claim:

* the claim's criterion — its statistic, threshold and direction, and where its tolerance comes from — is registered
  beside the published figure in ``assets/claims.json`` (:func:`criterion`), not in code;
* a figure met that the claim's *null itself* meets too is **inconclusive**, with the null's number;
* a measured interval (over seeds, or a bootstrap over words, prompts or tokens) that straddles the threshold is
  **inconclusive**;
* the criterion met is **reproduced**;
* the criterion missed is **not reproduced** only when a **positive control** of the same test passed on the same
  build (:class:`Control`: a competence gate, a baseline meeting the same criterion, or a planted spike-in the test
  finds); otherwise the scale cannot decide and the row says **not testable at this scale**.  :class:`Row` refuses
  "not reproduced" without a passed control.

**Multiple comparisons.**  Rows whose verdict rests on a p-value carry it (``p_value``); :func:`scorecard_table`
applies Holm's step-down correction over all of them (family-wise error at :data:`FAMILY_ALPHA`), and a
"reproduced" whose adjusted p-value no longer clears the bar becomes "inconclusive".
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
INCONCLUSIVE = "inconclusive"
NOT_TESTABLE = "not testable at this scale"
NOT_YET = "not yet measured"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, NOT_TESTABLE, NOT_YET)
FAMILY_ALPHA = 0.05  # family-wise error rate of the scorecard's p-values (Holm)


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


def no_control_possible(why: str) -> Control:
    """For a claim that is a count or a definition, not an effect a test could miss: no control is possible, and
    none is needed for either verdict."""
    return Control(f"none possible: {why}", passed=True, detail="the verdict compares exact quantities")


def combined(name: str, controls: list[Control]) -> Control:
    """Several controls of one test as one: passed when all passed; the detail lists each."""
    return Control(name, all(c.passed for c in controls), "; ".join(str(c) for c in controls))


MET, MISSED, STRADDLES = "met", "missed", "straddles"


def against(lo: float, hi: float, threshold: float, direction: str = ">=") -> str:
    """Where an interval [lo, hi] of a statistic lies against a claim's threshold: :data:`MET` (wholly on the claim's
    side), :data:`MISSED` (wholly on the other) or :data:`STRADDLES`.  A point estimate is lo == hi."""
    if direction not in (">=", "<="):
        raise ValueError(f"direction must be '>=' or '<=', got {direction!r}")
    if direction == "<=":
        lo, hi, threshold = -hi, -lo, -threshold
    if lo >= threshold:
        return MET
    if hi < threshold:
        return MISSED
    return STRADDLES


def decide(outcome: str, control: Control, *, null_meets_paper: bool = False) -> str:
    """The verdict rule (module docstring) from where the measurement lies against the criterion (:func:`against`, or
    :data:`MET` / :data:`MISSED` for a test decided by a p-value) and the claim's positive control."""
    if outcome not in (MET, MISSED, STRADDLES):
        raise ValueError(f"outcome must be one of {(MET, MISSED, STRADDLES)}, got {outcome!r}")
    if outcome == STRADDLES:
        return INCONCLUSIVE
    if outcome == MET:  # a figure the null reaches by itself says nothing about what the model learned
        return INCONCLUSIVE if null_meets_paper else REPRODUCED
    return NOT_REPRODUCED if control.passed else NOT_TESTABLE


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
    control: Control  # the positive control of the test (see the module docstring)
    p_value: float | None = None  # the p-value the verdict rests on, if any (Holm-corrected in the scorecard)
    chapter: str = ""
    source: str = field(init=False)  # "reFlow" | "reFlow thread" | "SAE+NFM"
    claim: str = field(init=False)  # the claim in a few words
    paper: str = field(init=False)  # the paper's figure, as published

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")
        if isinstance(self.control, dict):  # read back from stored JSON
            self.control = Control(**self.control)
        if not isinstance(self.control, Control):
            raise TypeError(f"{self.claim_id}: control must be a Control, got {type(self.control).__name__}")
        if self.verdict == NOT_REPRODUCED and not self.control.passed:
            raise ValueError(f"{self.claim_id}: 'not reproduced' needs a positive control that passed on the same "
                             f"build; {self.control}. Say '{NOT_TESTABLE}' instead.")
        registered = _registry().get(self.claim_id)
        if registered is None:
            raise ValueError(f"claim_id {self.claim_id!r} is not in assets/claims.json")
        for name in REGISTRY_FIELDS:
            setattr(self, name, registered[name])


@functools.cache
def _registry() -> dict[str, dict]:
    from importlib.resources import files

    return {c["claim_id"]: c for c in json.loads(files("reflow_core").joinpath("assets/claims.json").read_text())}


def criterion(claim_id: str) -> dict:
    """A claim's registered criterion: ``statistic``, ``threshold`` (a number, or named numbers), ``direction`` and
    ``tolerance`` (where the interval comes from)."""
    entry = _registry().get(claim_id)
    if entry is None:
        raise ValueError(f"claim_id {claim_id!r} is not in assets/claims.json")
    return dict(entry["criterion"])


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
    records = [{**asdict(r), "control": r.control} for r in rows]
    return pd.DataFrame(records, columns=COLUMNS)


COLUMNS = ["claim_id", *REGISTRY_FIELDS, "ours", "verdict", "why", "scale", "checkpoint", "control", "p_value",
           "chapter"]


def holm_adjusted(table: pd.DataFrame, alpha: float = FAMILY_ALPHA) -> pd.DataFrame:
    """Holm's correction over the rows that carry a p-value (``p_holm``); a "reproduced" whose adjusted p-value is not
    below ``alpha`` becomes "inconclusive", and its why says so."""
    from statsmodels.stats.multitest import multipletests

    table = table.copy()
    table["p_holm"] = float("nan")
    has_p = table["p_value"].notna()
    if not has_p.any():
        return table
    _, adjusted, _, _ = multipletests(table.loc[has_p, "p_value"].astype(float), alpha=alpha, method="holm")
    table.loc[has_p, "p_holm"] = adjusted
    n = int(has_p.sum())
    lost = has_p & (table["verdict"] == REPRODUCED) & (table["p_holm"] >= alpha)
    table.loc[lost, "verdict"] = INCONCLUSIVE
    table.loc[lost, "why"] = table.loc[lost].apply(
        lambda r: f"p={r.p_value:.3g} alone, but {r.p_holm:.3g} after Holm over the scorecard's {n} p-values; "
                  + r.why, axis=1)
    return table


def load_claims() -> pd.DataFrame:
    """Every claim of the sources the book tracks (``assets/claims.json``), measured or not."""
    return pd.DataFrame(list(_registry().values()))


def scorecard_table(results_dir: str | Path) -> pd.DataFrame:
    """Stored rows joined onto the claim registry (claims no chapter measured say so), with Holm-adjusted p-values
    (:func:`holm_adjusted`)."""
    rows = collect_rows(results_dir)  # a row whose claim is not registered is refused when it is read
    claims = load_claims()
    missing = claims[~claims["claim_id"].isin(rows["claim_id"])]
    pending = pd.DataFrame({
        **{c: missing[c] for c in ("claim_id", "source", "claim", "paper")},
        "ours": "—", "verdict": NOT_YET, "why": "no chapter at this build measures it yet",
        "scale": "—", "checkpoint": "—", "chapter": "—",
    })
    pending["control"] = None
    pending["p_value"] = float("nan")
    table = holm_adjusted(pd.concat([rows, pending], ignore_index=True))
    order = {cid: i for i, cid in enumerate(claims["claim_id"])}
    return table.sort_values("claim_id", key=lambda s: s.map(order)).reset_index(drop=True)
