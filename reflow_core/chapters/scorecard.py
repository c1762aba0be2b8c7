"""Chapter 00, the reproduction scorecard: every claim of the sources, the paper's figure, ours, and a verdict.

It is shown first and run last (notebook metadata ``run_after_all``): it reads the rows the other chapters stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from reflow_core.chapters import ChapterResult
from reflow_core.scorecard import VERDICTS, scorecard_table

NAME = "scorecard"
VERDICT_COLOURS = {"reproduced": "background-color:#dff0d8", "not reproduced": "background-color:#f2dede",
                   "not testable at this scale": "background-color:#fcf8e3"}


@dataclass(kw_only=True)
class Result(ChapterResult):
    table: pd.DataFrame  # one row per registered claim

    def counts(self) -> pd.Series:
        return self.table["verdict"].value_counts().reindex(VERDICTS, fill_value=0)

    def to_json(self) -> dict:
        return {"scale": self.scale, "counts": self.counts().to_dict(),
                "claims": self.table[["claim_id", "verdict", "chapter"]].to_dict(orient="records")}

    def prose(self) -> dict[str, object]:
        p = {"scale": self.scale, "n_claims": len(self.table)}
        for verdict, n in self.counts().items():
            p["n_" + verdict.replace(" ", "_")] = int(n)
        return p


def run(scale: str, results_dir) -> Result:
    return Result(scale=scale, checkpoint="every chapter's own", table=scorecard_table(results_dir))


def plot(result: Result) -> dict:
    return {}


def scorecard_rows(result: Result) -> list:
    return []


def styled(result: Result):
    pd.set_option("display.max_colwidth", None)
    return (result.table[["source", "claim", "paper", "ours", "verdict", "why", "scale", "checkpoint"]]
            .style.hide(axis="index").map(lambda v: VERDICT_COLOURS.get(v, ""), subset=["verdict"]))
