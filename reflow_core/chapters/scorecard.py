"""Chapter 00, the reproduction scorecard: every claim of the sources, the paper's figure, ours, a verdict and the
positive control that decided it; and when each claim becomes testable over training (``fig-scorecard-competence``).

What a reader takes in at a glance: ``fig-scorecard-summary`` (every claim one tile, grouped by source, coloured by
verdict, hatched where a failed positive control made it "not testable"), then a compact table — claim, paper, ours,
verdict badge — whose why, control and checkpoint sit in an expandable ``<details>`` row under each claim
(:func:`table_html`), so that no column is cut off in the theme's text column.

It is shown first and run last (notebook metadata ``run_after_all``): it reads the rows the other chapters stored,
and evaluates every model-level control (:mod:`reflow_core.experiments.controls`) on the snapshots training kept.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from reflow_core.chapters import ChapterResult
from reflow_core.experiments import controls
from reflow_core.scales import results_dir_for
from reflow_core.scorecard import (FAMILY_ALPHA, INCONCLUSIVE, NOT_REPRODUCED, NOT_TESTABLE, NOT_YET, REPRODUCED,
                                   VERDICTS, scorecard_table)

NAME = "scorecard"
FAMILIES = ("reflow", "gpt2-new")
# one colour per verdict, for the summary figure's tiles and the table's badges (text colour on the badge)
VERDICT_COLOURS = {REPRODUCED: ("#2a9d55", "#ffffff"), NOT_REPRODUCED: ("#c0392b", "#ffffff"),
                   INCONCLUSIVE: ("#7e6bb5", "#ffffff"), NOT_TESTABLE: ("#f0c04a", "#3a2e00"),
                   NOT_YET: ("#c8c8c8", "#333333")}
SOURCE_NAMES = {"reFlow": "reFlow paper and repository", "reFlow thread": "reFlow forum thread",
                "SAE+NFM": "joint SAE + NFM post"}


@dataclass(kw_only=True)
class Result(ChapterResult):
    table: pd.DataFrame  # one row per registered claim
    competence: dict = field(default_factory=dict)  # family -> [ModelControls per snapshot, step order]

    def counts(self) -> pd.Series:
        return self.table["verdict"].value_counts().reindex(VERDICTS, fill_value=0)

    def semantic_passed(self, family: str) -> list[str]:
        """The semantic controls ``family`` passes at its last snapshot."""
        if not self.competence.get(family):
            return []
        last = self.competence[family][-1]
        return [n for n in controls.SEMANTIC_CONTROLS if last.controls[n].passed]

    def to_json(self) -> dict:
        claims = self.table[["claim_id", "verdict", "chapter", "p_value", "p_holm"]].copy()
        claims["control"] = [None if c is None else {"name": c.name, "passed": c.passed}
                             for c in self.table["control"]]
        return {"scale": self.scale, "counts": self.counts().to_dict(), "family_alpha": FAMILY_ALPHA,
                "claims": claims.to_dict(orient="records"),
                "competence": {f: [m.to_json() for m in ms] for f, ms in self.competence.items()}}

    def prose(self) -> dict[str, object]:
        p = {"scale": self.scale, "n_claims": len(self.table), "n_p_values": int(self.table["p_value"].notna().sum())}
        for verdict, n in self.counts().items():
            p["n_" + verdict.replace(" ", "_")] = int(n)
        for family in FAMILIES:
            key = family.replace("-", "_")
            passed = self.semantic_passed(family)
            p[f"semantic_passed_{key}"] = f"{len(passed)} of {len(controls.SEMANTIC_CONTROLS)}"
            p[f"semantic_passed_names_{key}"] = ", ".join(passed) or "none"
        return p


def run(scale: str, results_dir) -> Result:
    results_dir = results_dir_for(scale, results_dir)  # the notebook's parameter: "" or repository-relative
    # every snapshot of the run; a run kept without snapshots (trained before they existed, or with snapshots off)
    # shows its final checkpoint alone
    competence = {f: controls.training_controls(scale, f, results_dir)
                  or [controls.trained_controls(scale, f, results_dir)] for f in FAMILIES}
    return Result(scale=scale, checkpoint="every chapter's own; competence: snapshots of the first seed",
                  table=scorecard_table(results_dir), competence=competence)


def sources(table: pd.DataFrame) -> list[str]:
    """The table's sources in registry order (the order claims.json lists them)."""
    return list(dict.fromkeys(table["source"]))


def decided_by_control(verdict: str, control) -> bool:
    """Whether a failed positive control made this row "not testable at this scale" (the criterion was missed, but
    the test could not have seen the effect on this build)."""
    return verdict == NOT_TESTABLE and control is not None and not control.passed


def plot_summary(result: Result, per_row: int = 14):
    """Every claim one tile, a row of tiles per source, coloured by verdict and numbered as in the table; hatched
    where a failed positive control decided "not testable at this scale"."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    table = result.table.reset_index(drop=True)
    groups = [(src, table.index[table["source"] == src].tolist()) for src in sources(table)]
    lines = sum(max(1, -(-len(ix) // per_row)) for _, ix in groups)
    fig, ax = plt.subplots(figsize=(7.6, 0.55 * lines + 0.45 * len(groups) + 1.5))
    y = 0.0
    for src, ix in groups:
        counts = table.loc[ix, "verdict"].value_counts()
        ax.text(0, y - 0.05, f"{SOURCE_NAMES.get(src, src)}: {len(ix)} claims  ("
                + ", ".join(f"{counts[v]} {v}" for v in VERDICTS if counts.get(v, 0)) + ")",
                fontsize=8.5, va="bottom", ha="left", fontweight="bold")
        y += 0.15
        for k, i in enumerate(ix):
            row_y, col = y + (k // per_row) * 1.1, k % per_row
            verdict = table.at[i, "verdict"]
            failed = decided_by_control(verdict, table.at[i, "control"])
            face, text = VERDICT_COLOURS[verdict]
            ax.add_patch(Rectangle((col * 1.1, row_y), 1, 1, facecolor=face, edgecolor="#5a4500" if failed else face,
                                   hatch="///" if failed else None, lw=1.0))
            ax.text(col * 1.1 + 0.5, row_y + 0.5, str(i + 1), ha="center", va="center", fontsize=8, color=text,
                    fontweight="bold", bbox=dict(boxstyle="round,pad=0.12", fc=face, ec="none") if failed else None)
        y += max(1, -(-len(ix) // per_row)) * 1.1 + 0.55
    ax.set_xlim(-0.1, per_row * 1.1)
    ax.set_ylim(y, -0.6)
    ax.set_aspect("equal")
    ax.axis("off")
    handles = [Patch(facecolor=VERDICT_COLOURS[v][0], edgecolor=VERDICT_COLOURS[v][0], label=v) for v in VERDICTS]
    handles.append(Patch(facecolor=VERDICT_COLOURS[NOT_TESTABLE][0], edgecolor="#5a4500", hatch="///",
                         label="not testable: its positive control failed"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False)
    n = result.counts()
    ax.set_title(f"{len(table)} claims at scale {result.scale}\n" + " · ".join(f"{n[v]} {v}" for v in VERDICTS),
                 fontsize=10)
    return fig


def plot(result: Result) -> dict:
    figures = {"fig-scorecard-summary": plot_summary(result)}
    if not result.competence:
        return figures
    import matplotlib.pyplot as plt

    names = list(controls.MODEL_CONTROLS)
    fig, axes = plt.subplots(1, len(result.competence), figsize=(5.2 * len(result.competence), 0.42 * len(names) + 1.6),
                             sharey=True, squeeze=False)
    for ax, (family, snaps) in zip(axes[0], result.competence.items()):
        tokens = np.array([m.tokens for m in snaps]) / 1e3
        for y, name in enumerate(names):
            passed = np.array([m.controls[name].passed for m in snaps])
            ax.plot(tokens, [y] * len(snaps), color="0.85", lw=1, zorder=1)
            ax.scatter(tokens[passed], [y] * int(passed.sum()), s=70, color="#2a9d55", zorder=2, label=None)
            ax.scatter(tokens[~passed], [y] * int((~passed).sum()), s=70, facecolor="white", edgecolor="#b03a2e",
                       zorder=2)
        ax.set_yticks(range(len(names)), [n.replace("_", " ") for n in names], fontsize=8.5)
        ax.set_xlabel("training tokens (thousands)")
        ax.set_title(f"{family}: {len(result.semantic_passed(family))}/{len(controls.SEMANTIC_CONTROLS)} semantic "
                     "controls pass at the end", fontsize=10)
        ax.invert_yaxis()
        ax.set_xlim(0, tokens.max() * 1.08 if len(tokens) else 1)
    handles = [plt.Line2D([], [], marker="o", ls="", color="#2a9d55", label="control passed"),
               plt.Line2D([], [], marker="o", ls="", markerfacecolor="white", markeredgecolor="#b03a2e",
                          label="control failed")]
    fig.suptitle(f"When does a claim become testable? Positive controls over training (scale {result.scale})",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))  # room below the panels for the legend, which would cover the last points
    fig.legend(handles=handles, fontsize=8, loc="lower center", ncol=2, frameon=False)
    return figures | {"fig-scorecard-competence": fig}


def scorecard_rows(result: Result) -> list:
    return []


TABLE_STYLE = """<style>
table.reflow-scorecard { width: 100%; table-layout: fixed; border-collapse: collapse; font-size: 0.86em;
  line-height: 1.35; }
table.reflow-scorecard th, table.reflow-scorecard td { padding: 4px 6px; vertical-align: top; text-align: left;
  overflow-wrap: anywhere; border: none; }
table.reflow-scorecard thead th { border-bottom: 2px solid #888; }
table.reflow-scorecard tr.sc-group th { padding-top: 12px; border-bottom: 1px solid #bbb; font-size: 1.02em; }
table.reflow-scorecard tr.sc-claim td { border-top: 1px solid #e4e4e4; }
table.reflow-scorecard .sc-id { color: #777; font-size: 0.88em; }
table.reflow-scorecard tr.sc-detail td { padding-top: 0; }
table.reflow-scorecard details summary { cursor: pointer; color: #555; font-size: 0.9em; }
table.reflow-scorecard details dl { margin: 2px 0 6px 14px; }
table.reflow-scorecard details dt { font-weight: bold; }
table.reflow-scorecard details dd { margin: 0 0 4px 0; }
.sc-badge { display: inline-block; padding: 1px 6px; border-radius: 8px; font-size: 0.88em; font-weight: 600;
  line-height: 1.3; }
</style>"""
HEADLINE_CHARS = 110  # "ours" longer than this shows its first clause in the table, the rest in the details


def badge(verdict: str, control=None) -> str:
    """The verdict as a coloured badge; hatched like its tile when a failed control decided it."""
    face, text = VERDICT_COLOURS[verdict]
    hatch = (";background-image:repeating-linear-gradient(45deg,transparent 0 5px,rgba(90,69,0,.25) 5px 7px)"
             if decided_by_control(verdict, control) else "")
    return (f'<span class="sc-badge" style="background-color:{face};color:{text}{hatch}" '
            f'title="{html.escape(verdict)}">{html.escape(verdict)}</span>')


def headline(ours: str) -> str:
    """``ours`` up to its first "; " when it is long (the whole text is in the row's details)."""
    if len(ours) <= HEADLINE_CHARS:
        return ours
    first = ours.split("; ", 1)[0]
    return (first if len(first) <= HEADLINE_CHARS else first[:HEADLINE_CHARS].rsplit(" ", 1)[0]) + " …"


def table_html(result: Result):
    """The scorecard as a compact HTML table (claim, paper, ours, verdict badge), grouped by source, claims numbered
    as in ``fig-scorecard-summary``; under each claim a ``<details>`` row with the full figure, the why, the positive
    control and the checkpoint. Returns an IPython ``HTML`` object."""
    from IPython.display import HTML

    e = html.escape
    table = result.table.reset_index(drop=True)
    out = [TABLE_STYLE, '<table class="reflow-scorecard"><colgroup><col style="width:33%"><col style="width:21%">'
           '<col style="width:31%"><col style="width:15%"></colgroup>'
           "<thead><tr><th>claim</th><th>paper</th><th>ours</th><th>verdict</th></tr></thead><tbody>"]
    for src in sources(table):
        ix = table.index[table["source"] == src].tolist()
        out.append(f'<tr class="sc-group"><th colspan="4">{e(SOURCE_NAMES.get(src, src))} ({len(ix)})</th></tr>')
        for i in ix:
            r = table.loc[i]
            control = r["control"]
            p = "" if pd.isna(r["p_value"]) else (f"p = {r['p_value']:.3g}" + ("" if pd.isna(r["p_holm"]) else
                                                                           f", {r['p_holm']:.3g} after Holm"))
            detail = [("ours, in full", r["ours"]) if headline(r["ours"]) != r["ours"] else None,
                      ("why", r["why"]),
                      ("positive control", "—" if control is None else str(control)),
                      ("p-value", p) if p else None,
                      ("scale · checkpoint · chapter", f"{r['scale']} · {r['checkpoint']} · {r['chapter']}")]
            dl = "".join(f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in filter(None, detail))
            out.append(f'<tr class="sc-claim" id="claim-{e(r["claim_id"])}"><td><b>{i + 1}.</b> {e(r["claim"])} '
                       f'<span class="sc-id">{e(r["claim_id"])}</span></td><td>{e(r["paper"])}</td>'
                       f'<td>{e(headline(r["ours"]))}</td><td>{badge(r["verdict"], control)}</td></tr>')
            out.append(f'<tr class="sc-detail"><td colspan="4"><details><summary>why, control, checkpoint'
                       f'</summary><dl>{dl}</dl></details></td></tr>')
    out.append("</tbody></table>")
    return HTML("".join(out))
