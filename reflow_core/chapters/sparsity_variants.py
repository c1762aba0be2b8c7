"""Chapter 08, Sparsity variants: hard Top-K vs soft gating of the recipe matrix (the forum thread's follow-up).

The vocabularies themselves (Top-K, Relative Mean Gating, learned routing) are in :mod:`reflow_core.vocab`; this
module trains (once per scale, through :mod:`reflow_core.runs`) and measures a model of each at the same activation
rate with the Signal-identity and Semantic experiments, tables and plots them, and decides the thread's scorecard row
by the one collapse rule of topk.collapse (:func:`reflow_core.experiments.common.collapse_outcome`): a soft variant
"keeps what Top-K loses" when Top-K is lower than it on all three statistics beyond their spread — and the question
is asked only where dense reFlow shows the three structures and Top-K loses them (the row's control).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from reflow_core.chapters import ChapterResult
from reflow_core.config import get_config
from reflow_core.experiments import algebra, atlas, galaxy, sparsity
from reflow_core.experiments.common import Interval, collapse_outcome
from reflow_core.runs import ensure_model, load_models
from reflow_core.scales import chapter_families, get_scale, results_dir_for
from reflow_core.scorecard import MET, MISSED, NOT_TESTABLE, STRADDLES, Control, Row, combined, decide
from reflow_core.vocab.gated import active_per_token, measured_rate, routing_divergence

NAME = "sparsity-variants"
VARIANTS = ("reflow", "reflow-topk", "reflow-rmg", "reflow-routed")
TAGS = {"reflow": "dense", "reflow-topk": "topk", "reflow-rmg": "rmg", "reflow-routed": "routed"}  # prose keys
SEMANTIC_STATS = ("three↔four cos", "algebra MRR", "silhouette")


@dataclass
class VariantMetrics:
    """Everything the sparsity-variants chapter compares for one trained model."""

    family: str
    val_loss: float
    rate: float  # measured activation rate of the effective recipe rows
    active_mean: float  # mean active signals per token
    active_sd: float  # their spread over tokens (0 for Top-K at full rows; > 0 for the gates)
    rate_at_2: float  # the Sparsity Profile's c = 2 rule on the effective rows
    gini: float
    three_four: float
    purity: float
    silhouette: float
    silhouette_p: float
    mrr: float
    paper_hits: int  # of the seed's three analogies, rank ≤ 5
    ms_per_step: float
    tokens_per_s: float
    routing_divergence: float = float("nan")
    active_counts: list = field(default_factory=list)
    collapse: dict = field(default_factory=dict)  # the collapse statistics with their spread (algebra.collapse_statistics)

    def semantic(self) -> dict[str, float]:
        return dict(zip(SEMANTIC_STATS, (self.three_four, self.mrr, self.silhouette)))


def variant_metrics(model, family: str, summary: dict, *, n_perm: int = 200, n_null: int = 200) -> VariantMetrics:
    """Validation loss and cost from the training ``summary``; rate, sparsity and semantics measured on ``model``
    with the Signal-identity and Semantic experiments (:mod:`reflow_core.experiments`)."""
    counts = active_per_token(model).float()
    at = atlas.recipe_atlas(model)
    sp = sparsity.sparsity_profile(model)
    ga = galaxy.semantic_galaxy(model, n_perm=n_perm)
    al = algebra.semantic_algebra(model, n_null=n_null)
    steps = max(int(summary.get("steps_this_run") or summary.get("steps") or 1), 1)
    wall = summary.get("wall_s_this_run") or summary.get("wall_s") or float("nan")
    return VariantMetrics(
        family=family, val_loss=float(summary.get("final_val_loss") or float("nan")), rate=measured_rate(model),
        active_mean=float(counts.mean()), active_sd=float(counts.std()), rate_at_2=float(sp.rate_at_2),
        gini=float(sp.gini), three_four=float(at.named.get("three↔four", float("nan"))), purity=float(at.purity),
        silhouette=float(ga.silhouette), silhouette_p=float(ga.p_value), mrr=float(al.mrr),
        paper_hits=sum(1 for _, rank, _ in algebra.paper_ranks(al) if rank is not None and rank <= algebra.HIT_RANK),
        ms_per_step=1000.0 * float(wall) / steps, tokens_per_s=float(summary.get("tokens_per_s") or float("nan")),
        routing_divergence=routing_divergence(model), active_counts=np.bincount(counts.long().numpy()).tolist(),
        collapse=algebra.collapse_statistics([at], [al], [ga]),
    )


@dataclass(kw_only=True)
class Result(ChapterResult):
    labels: dict  # family -> checkpoint label (first training seed)
    metrics: dict  # family -> VariantMetrics
    n_signals: int
    topk_k: int
    target_rate: float  # the soft variants' global activation rate
    n_steps: int
    tokens_per_step: int
    seed: int
    controls: dict = field(default_factory=dict)  # claim id -> its positive control

    def to_json(self) -> dict:
        return {
            "checkpoints": self.labels,
            "metrics": {f: {k: (v if k != "collapse" else {n: dataclasses.asdict(i) for n, i in v.items()})
                            for k, v in m.__dict__.items() if k != "active_counts"}
                        for f, m in self.metrics.items()},
            "controls": {claim: dataclasses.asdict(c) for claim, c in self.controls.items()},
        }

    def prose(self) -> dict[str, object]:
        p = {"scale": self.scale, "ckpt_label": self.checkpoint, "n_signals": self.n_signals, "topk_k": self.topk_k,
             "target_rate": f"{self.target_rate:.4f}", "n_steps": self.n_steps,
             "tokens_per_step": f"{self.tokens_per_step:,}", "seed": self.seed}
        for f, tag in TAGS.items():
            if f not in self.metrics:  # not trained at this scale (its `families` budget): the text says so
                for key in ("val", "rate", "active", "cos", "mrr", "hits", "sil", "silp", "gini", "ms"):
                    p[f"{key}_{tag}"] = "n/a"
                p[f"val_{tag}"] = f"not trained at scale {self.scale}"
                continue
            m = self.metrics[f]
            p[f"val_{tag}"] = f"{m.val_loss:.3f}"
            p[f"rate_{tag}"] = f"{m.rate:.4f}"
            p[f"active_{tag}"] = f"{m.active_mean:.1f} ± {m.active_sd:.1f}"
            p[f"cos_{tag}"] = f"{m.three_four:.3f}"
            p[f"mrr_{tag}"] = f"{m.mrr:.4f}"
            p[f"hits_{tag}"] = f"{m.paper_hits}/3"
            p[f"sil_{tag}"] = f"{m.silhouette:+.3f}"
            p[f"silp_{tag}"] = f"{m.silhouette_p:.3f}"
            p[f"gini_{tag}"] = f"{m.gini:.3f}"
            p[f"ms_{tag}"] = f"{m.ms_per_step:.0f}"
        p["div_routed"] = (f"{100 * self.metrics['reflow-routed'].routing_divergence:.1f}%"
                           if "reflow-routed" in self.metrics else "n/a (not trained at this scale)")
        return p


def run(scale: str, results_dir=None, *, families=VARIANTS) -> Result:
    """Train (once) and measure every variant at the scale's first training seed; the claim's control is dense
    reFlow's three structures (:data:`reflow_core.experiments.controls.CLAIM_GATES`)."""
    from reflow_core.experiments import controls

    results_dir = results_dir_for(scale, results_dir)
    claim_control = controls.claim_control("thread.soft_sparsity",
                                           controls.final_gates(scale, results_dir, families=("reflow",)))
    spec = get_scale(scale)
    families = chapter_families(scale, "sparsity_variants", families)  # what the scale trains of them
    summaries = {f: ensure_model(scale, f, results_dir) for f in families}
    models, labels = {}, {}
    for f in families:
        ms, ls = load_models(scale, f, results_dir, seeds=spec.seeds[:1])
        models[f], labels[f] = ms[0], ls[0]
    cfg = {f: get_config(f"{f}@{spec.size}") for f in VARIANTS}  # configurations only: nothing is trained here
    return Result(
        scale=scale, checkpoint=", ".join(labels.values()), labels=labels,
        metrics={f: variant_metrics(models[f], f, summaries[f]) for f in families},
        n_signals=cfg["reflow"].n_signals, topk_k=cfg["reflow-topk"].topk, target_rate=cfg["reflow-rmg"].target_rate,
        n_steps=summaries[families[0]]["steps"], tokens_per_step=spec.train["tokens_per_step"], seed=spec.seeds[0],
        controls={"thread.soft_sparsity": claim_control},
    )


def variants_table(metrics: dict[str, VariantMetrics]):
    import pandas as pd

    return pd.DataFrame([{
        "model": m.family, "val loss": m.val_loss, "active rate": m.rate, "active/token (mean ± sd)":
        f"{m.active_mean:.1f} ± {m.active_sd:.1f}", "rate at c=2": m.rate_at_2, "Gini": m.gini,
        "three↔four cos": m.three_four, "purity@5": m.purity, "silhouette": m.silhouette,
        "silhouette p": m.silhouette_p, "algebra MRR": m.mrr, "seed analogies hit": f"{m.paper_hits}/3",
        "ms/step": m.ms_per_step,
    } for m in metrics.values()]).set_index("model")


def plot_variants(metrics: dict[str, VariantMetrics]):
    """Bars of val loss, activation rate, the three semantic statistics and cost per step; per-token active counts."""
    import matplotlib.pyplot as plt

    names = list(metrics)
    colours = {"reflow": "#4c72b0", "reflow-topk": "#c44e52", "reflow-rmg": "#55a868", "reflow-routed": "#8172b2"}
    panels = [("val loss", "val_loss"), ("active rate", "rate"), ("three↔four cos", "three_four"),
              ("algebra MRR", "mrr"), ("silhouette", "silhouette"), ("ms / step", "ms_per_step")]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(15, 3.4))
    for ax, (title, attr) in zip(axes, panels):
        vals = [getattr(metrics[n], attr) for n in names]
        ax.bar(range(len(names)), vals, color=[colours.get(n, "0.5") for n in names])
        ax.set_xticks(range(len(names)), [n.removeprefix("reflow-") for n in names], rotation=45, ha="right",
                      fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.axhline(0, color="k", lw=0.5)
    ax = axes[-1]
    for n in names:
        c = np.asarray(metrics[n].active_counts, dtype=float)
        if c.sum():
            ax.step(np.arange(c.size), c / c.sum(), where="mid", color=colours.get(n, "0.5"),
                    label=n.removeprefix("reflow-"))
    ax.set_xlabel("active signals per token", fontsize=8); ax.set_title("per-token activity", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle("Hard vs soft sparsity of the recipe matrix, same budget", fontsize=11)
    fig.tight_layout()
    return fig


def plot(result: Result) -> dict:
    return {"fig-sparsity-variants-metrics": plot_variants(result.metrics)}


def scorecard_rows(result: Result) -> list[Row]:
    return [soft_sparsity_row(result.metrics, result.scale, result.checkpoint,
                              result.controls["thread.soft_sparsity"])]


def _fmt(stats: dict[str, Interval]) -> str:
    spec = {"three↔four cosine": ".2f", "algebra MRR": ".3f", "silhouette": "+.3f"}
    return ", ".join(f"{k.split()[0]} {stats[k].fmt(v)}" for k, v in spec.items())


def soft_sparsity_row(metrics: dict[str, VariantMetrics], scale: str, checkpoint: str, structure: Control) -> Row:
    """thread.soft_sparsity: does a soft mechanism keep the semantic statistics that Top-K loses?

    The one collapse rule (:func:`reflow_core.experiments.common.collapse_outcome`, as topk.collapse) twice:

    * **control** — dense reFlow shows the three structures (``structure``: its competence gates) *and* Top-K loses
      them (Top-K lower than dense on all three beyond their spread); without a loss there is nothing to keep, and the
      row is not testable at this scale whatever the soft variants do;
    * **outcome** — for each soft variant, is Top-K lower than *it* on all three (the soft variant kept the
      structure)?  Any soft variant that keeps all three → met; none keeps any → missed; otherwise straddles.
    """
    if "reflow-topk" not in metrics or "reflow" not in metrics:
        return Row(claim_id="thread.soft_sparsity", ours="—", verdict=NOT_TESTABLE,
                   why="reflow or reflow-topk was not trained at this scale", scale=scale, checkpoint=checkpoint,
                   control=structure)
    dense, hard = metrics["reflow"].collapse, metrics["reflow-topk"].collapse
    topk_loss, lost = collapse_outcome(dense, hard)
    loses = Control("Top-K loses the structure (collapse rule, dense vs Top-K)", topk_loss == MET,
                    f"Top-K lower than dense reFlow on {len(lost)}/3 beyond their spread"
                    + (f" ({', '.join(lost)})" if lost else ""))
    control = combined("dense reFlow shows the structure + Top-K loses it", [structure, loses])
    soft = {n: metrics[n].collapse for n in ("reflow-rmg", "reflow-routed") if n in metrics}
    kept = {n: collapse_outcome(s, hard) for n, s in soft.items()}
    outcomes = [o for o, _ in kept.values()]
    outcome = MET if MET in outcomes else MISSED if outcomes and all(o == MISSED for o in outcomes) else STRADDLES
    ours = (f"dense {_fmt(dense)}; Top-K {_fmt(hard)}; "
            + "; ".join(f"{n.removeprefix('reflow-')} {_fmt(s)} (rate {metrics[n].rate:.3f})" for n, s in soft.items()))
    if not soft:
        verdict, why = NOT_TESTABLE, "no soft variant was trained at this scale"
    else:
        verdict = decide(outcome, control) if control.passed else NOT_TESTABLE
        why = ("criterion (the topk.collapse rule): Top-K lower than a soft variant on all three statistics beyond "
               "their spread (one training seed: bootstrap over analogies / words, the three↔four pair a point); "
               + "; ".join(f"{n.removeprefix('reflow-')} keeps {len(k)}/3" for n, (_, k) in kept.items())
               + ("" if control.passed else "; testable only where dense reFlow shows the structure and Top-K loses "
                  "it, which this build does not"))
    return Row(claim_id="thread.soft_sparsity", ours=ours, verdict=verdict, why=why, scale=scale,
               checkpoint=checkpoint, control=control)
