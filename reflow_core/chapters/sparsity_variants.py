"""Chapter 08, Sparsity variants: hard Top-K vs soft gating of the recipe matrix (the forum thread's follow-up).

The vocabularies themselves (Top-K, Relative Mean Gating, learned routing) are in :mod:`reflow_core.vocab`; this
module trains (once per scale, through :mod:`reflow_core.runs`) and measures a model of each at the same activation
rate with the Signal-identity and Semantic experiments, tables and plots them, and decides the thread's scorecard row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from reflow_core.chapters import ChapterResult
from reflow_core.config import get_config
from reflow_core.experiments import algebra, atlas, galaxy, sparsity
from reflow_core.runs import ensure_model, load_models
from reflow_core.scales import get_scale, results_dir_for
from reflow_core.scorecard import NOT_REPRODUCED, NOT_TESTABLE, REPRODUCED, Row
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

    def to_json(self) -> dict:
        return {
            "checkpoints": self.labels,
            "metrics": {f: {k: v for k, v in m.__dict__.items() if k != "active_counts"}
                        for f, m in self.metrics.items()},
        }

    def prose(self) -> dict[str, object]:
        p = {"scale": self.scale, "ckpt_label": self.checkpoint, "n_signals": self.n_signals, "topk_k": self.topk_k,
             "target_rate": f"{self.target_rate:.4f}", "n_steps": self.n_steps,
             "tokens_per_step": f"{self.tokens_per_step:,}", "seed": self.seed}
        for f, tag in TAGS.items():
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
        p["div_routed"] = f"{100 * self.metrics['reflow-routed'].routing_divergence:.1f}%"
        return p


def run(scale: str, results_dir=None, *, families=VARIANTS) -> Result:
    """Train (once) and measure every variant at the scale's first training seed."""
    results_dir = results_dir_for(scale, results_dir)
    spec = get_scale(scale)
    summaries = {f: ensure_model(scale, f, results_dir) for f in families}
    models, labels = {}, {}
    for f in families:
        ms, ls = load_models(scale, f, results_dir, seeds=spec.seeds[:1])
        models[f], labels[f] = ms[0], ls[0]
    cfg = {f: get_config(f"{f}@{spec.size}") for f in families}
    return Result(
        scale=scale, checkpoint=", ".join(labels.values()), labels=labels,
        metrics={f: variant_metrics(models[f], f, summaries[f]) for f in families},
        n_signals=cfg["reflow"].n_signals, topk_k=cfg["reflow-topk"].topk, target_rate=cfg["reflow-rmg"].target_rate,
        n_steps=spec.train["max_steps"], tokens_per_step=spec.train["tokens_per_step"], seed=spec.seeds[0],
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
    return [soft_sparsity_row(result.metrics, result.scale, result.checkpoint)]


def soft_sparsity_row(metrics: dict[str, VariantMetrics], scale: str, checkpoint: str):
    """thread.soft_sparsity: does a soft mechanism keep the semantic statistics that Top-K loses?

    Testable only where Top-K does lose them (worse than dense reFlow on all three of three↔four cosine, algebra MRR
    and silhouette); then reproduced when RMG or routing is better than Top-K on all three.
    """
    ref, hard = metrics["reflow"].semantic(), metrics["reflow-topk"].semantic()
    soft = {n: metrics[n].semantic() for n in ("reflow-rmg", "reflow-routed") if n in metrics}
    lost = [k for k in SEMANTIC_STATS if hard[k] < ref[k]]
    kept = {n: [k for k in SEMANTIC_STATS if s[k] > hard[k]] for n, s in soft.items()}

    def fmt(s):
        return f"cos {s['three↔four cos']:.2f}, MRR {s['algebra MRR']:.4f}, sil {s['silhouette']:+.3f}"

    ours = (f"reflow {fmt(ref)}; topk {fmt(hard)}; "
            + "; ".join(f"{n.removeprefix('reflow-')} {fmt(s)} (rate {metrics[n].rate:.3f})" for n, s in soft.items()))
    if not soft:
        verdict, why = NOT_TESTABLE, "no soft variant was trained at this scale"
    elif len(lost) < len(SEMANTIC_STATS):
        verdict = NOT_TESTABLE
        why = (f"Top-K loses only {len(lost)}/3 of the statistics here, so there is no collapse for a soft mechanism "
               "to avoid")
    else:
        best = max(kept, key=lambda n: len(kept[n]))
        held = len(kept[best]) == len(SEMANTIC_STATS)
        verdict = REPRODUCED if held else NOT_REPRODUCED
        why = (f"reproduced = a soft variant beats Top-K on all three statistics at the same activation rate; best "
               f"{best.removeprefix('reflow-')}: better on {len(kept[best])}/3")
    return Row(claim_id="thread.soft_sparsity",
               ours=ours, verdict=verdict, why=why, scale=scale, checkpoint=checkpoint)
