"""Chapter 04, Semantic properties: clusters, algebra, misspellings (experiments 4–6: Semantic Galaxy, Semantic
Algebra, Typo Resilience), each against its null (shuffled labels, random analogy targets, random word pairs) and on
GPT-2-New's embedding and reFlow at initialisation; and the Top-K collapse row (reFlow vs reFlow-TopK)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from reflow_core.chapters import ChapterResult
from reflow_core.config import get_config
from reflow_core.experiments import algebra, atlas, controls, galaxy, typo
from reflow_core.experiments.common import fmt_group, over_models, seed_interval
from reflow_core.runs import comparison_models, seeds_label
from reflow_core.scales import preset_for
from reflow_core.scorecard import Control, combined

NAME = "semantic"
TAGS = [("reflow", ""), ("gpt2-new", "_gpt2new"), ("reflow (init)", "_init"), ("reflow-topk", "_topk")]
COLLAPSE_GROUPS = ("reflow", "reflow-topk")  # the Recipe Atlas is rerun on these for the Top-K collapse row
CLAIMS = ("galaxy.silhouette", "algebra.hits", "typo.resilience", "topk.collapse")


@dataclass(kw_only=True)
class Result(ChapterResult):
    labels: dict  # group -> checkpoint label per seed
    n_seeds: int
    n_signals: int
    topk_k: int  # K of reflow-topk at this scale
    galaxy: dict  # group -> [galaxy.GalaxyResult per seed]
    algebra: dict  # group -> [algebra.AlgebraResult per seed]
    typo: dict  # group -> [typo.TypoResult per seed]
    atlas: dict  # reflow (and reflow-topk) -> [atlas.AtlasResult per seed], for the Top-K collapse row
    controls: dict  # claim id -> its positive control (reflow_core.experiments.controls)

    def to_json(self) -> dict:
        return {
            "checkpoints": self.labels,
            "galaxy": {n: [{"silhouette": r.silhouette, "silhouette_pca": r.silhouette_pca, "p_value": r.p_value,
                            "null_mean": float(r.null.mean())} for r in rs] for n, rs in self.galaxy.items()},
            "algebra": {n: [{"ranks": r.ranks.tolist(), "ranks_only_c": r.ranks_only_c.tolist(), "mrr": r.mrr,
                             "null_mrr": float(r.null_mrr.mean()), "analogies": r.analogies, "top": r.top}
                            for r in rs] for n, rs in self.algebra.items()},
            "typo": {n: [{m: {"matched": r.mean(m), "random": r.null_mean(m), "p": r.p_value(m)}
                          for m in typo.MEASURES} for r in rs] for n, rs in self.typo.items()},
            "controls": {claim: dataclasses.asdict(c) for claim, c in self.controls.items()},
        }

    def prose(self) -> dict[str, object]:
        ga, al, ty = self.galaxy, self.algebra, self.typo
        p = {"scale": self.scale, "ckpt_label": self.checkpoint, "n_seeds": self.n_seeds, "topk_k": self.topk_k,
             "n_signals": self.n_signals}
        # Semantic Galaxy
        for name, tag in TAGS:
            p[f"sil{tag}"] = fmt_group(ga, name, lambda r: r.silhouette, ".3f")
            p[f"sil_p{tag}"] = f"{max(r.p_value for r in ga[name]):.3f}" if name in ga else "—"
        p["sil_pca"] = seed_interval([r.silhouette_pca for r in ga["reflow"]]).fmt(".3f")
        p["sil_null"] = f"{np.mean([r.null.mean() for r in ga['reflow']]):.3f}"
        p["sil_null95"] = f"{np.mean([np.quantile(r.null, 0.95) for r in ga['reflow']]):.3f}"
        p["galaxy_n_words"] = len(ga["reflow"][0].words)
        # Semantic Algebra
        for name, tag in TAGS:
            p[f"alg_mrr{tag}"] = fmt_group(al, name, lambda r: r.mrr, ".3f")
            p[f"alg_hits1{tag}"] = fmt_group(al, name, lambda r: r.hits(1), ".2f")
            p[f"alg_hits5{tag}"] = fmt_group(al, name, lambda r: r.hits(5), ".2f")
            p[f"alg_paper_ranks{tag}"] = (", ".join(algebra.rank_text(rank)
                                                    for _, rank, _ in algebra.paper_ranks(al[name][0]))
                                          if name in al else "— (not run)")
        p["alg_mrr_onlyc"] = seed_interval([r.mrr_only_c for r in al["reflow"]]).fmt(".3f")
        p["alg_mrr_null"] = f"{np.mean([r.null_mrr.mean() for r in al['reflow']]):.4f}"
        p["alg_p"] = f"{max(r.p_value for r in al['reflow']):.3f}"
        p["alg_n"] = len(al["reflow"][0].analogies)
        p["alg_dropped"] = len(al["reflow"][0].dropped)
        # Typo Resilience
        t0 = ty["reflow"][0]
        p["typo_n"] = len(t0.pairs)
        p["typo_listed"] = len(typo.typo_pairs()[0])
        p["typo_split"] = f"{100 * np.mean([n > 1 for n in t0.n_typo_tokens]):.0f}%"
        for name, tag in TAGS:
            for m in typo.MEASURES:
                p[f"typo_{m}{tag}"] = fmt_group(ty, name, lambda r: r.mean(m), ".3f")
                p[f"typo_{m}_null{tag}"] = fmt_group(ty, name, lambda r: r.null_mean(m), ".3f")
            p[f"typo_p{tag}"] = f"{max(r.p_value('readout') for r in ty[name]):.3f}" if name in ty else "—"
        return p


def reference_structure(atlas_rs: list, algebra_rs: list, galaxy_rs: list) -> Control:
    """Dense reFlow's own recipe rows show the three structures the Top-K collapse compares, each against its null on
    every seed (bars of the matching embedding-row controls in ``assets/controls.json``): three↔four among the most
    similar random pairs, categories beyond the label-permutation null, algebra beyond random targets."""
    bars = controls.settings()
    pct = [r.named_percentile.get("three↔four", float("nan")) for r in atlas_rs]
    parts = [
        Control("three↔four near neighbours", all(p >= bars["number_neighbours"]["threshold"] for p in pct),
                f"percentile {', '.join(f'{p:.1f}' for p in pct)} (bar {bars['number_neighbours']['threshold']:g})"),
        Control("categories cluster", all(r.p_value < bars["category_clusters"]["alpha"] for r in galaxy_rs),
                f"permutation p {', '.join(f'{r.p_value:.3f}' for r in galaxy_rs)}"),
        Control("algebra beats random targets", all(r.p_value < bars["vector_algebra"]["alpha"] for r in algebra_rs),
                f"MRR p {', '.join(f'{r.p_value:.3f}' for r in algebra_rs)}"),
    ]
    return combined("effect: dense reFlow's recipe rows show the structure", parts)


def claim_controls(gates: dict, spike_model, atlas_results: dict, algebra_results: dict,
                   galaxy_results: dict) -> dict[str, Control]:
    """Each claim's positive control: :data:`reflow_core.experiments.controls.CLAIM_GATES` on the final checkpoints
    (with the algebra spike-in planted into ``spike_model``); the Top-K collapse also needs dense reFlow's own recipe
    rows to show the structure (:func:`reference_structure`)."""
    out = {claim: controls.claim_control(claim, gates, spike_model) for claim in CLAIMS}
    out["topk.collapse"] = combined(
        "dense reFlow shows the structure first",
        [out["topk.collapse"], reference_structure(atlas_results["reflow"], algebra_results["reflow"],
                                                   galaxy_results["reflow"])])
    return out


def run(scale: str, results_dir=None, *, with_topk: bool = True) -> Result:
    models, labels = comparison_models(scale, results_dir, with_topk=with_topk)
    gates = controls.final_gates(scale, results_dir)
    ga, al = over_models(galaxy.semantic_galaxy, models), over_models(algebra.semantic_algebra, models)
    at = over_models(atlas.recipe_atlas, {k: models[k] for k in COLLAPSE_GROUPS if k in models})
    return Result(
        scale=scale, checkpoint=seeds_label(labels["reflow"]), labels=labels, n_seeds=len(labels["reflow"]),
        n_signals=models["reflow"][0].config.n_signals, topk_k=get_config(preset_for(scale, "reflow-topk")).topk,
        galaxy=ga, algebra=al, typo=over_models(typo.typo_resilience, models), atlas=at,
        controls=claim_controls(gates, models["reflow"][0], at, al, ga),
    )


def plot(result: Result) -> dict:
    return {
        "fig-semantic-galaxy": galaxy.plot_galaxy(
            result.galaxy, tuple(n for n in ("reflow", "gpt2-new", "reflow-topk") if n in result.galaxy)),
        "fig-semantic-algebra": algebra.plot_ranks(result.algebra),
        "fig-semantic-typo": typo.plot_typo(result.typo),
    }


def scorecard_rows(result: Result) -> list:
    scale, checkpoint, c = result.scale, result.checkpoint, result.controls
    return (galaxy.scorecard_rows(result.galaxy, scale, checkpoint, c["galaxy.silhouette"])
            + algebra.scorecard_rows(result.algebra, scale, checkpoint, c["algebra.hits"])
            + typo.scorecard_rows(result.typo, scale, checkpoint, c["typo.resilience"])
            + [algebra.topk_collapse_row(result.atlas, result.algebra, result.galaxy, scale, checkpoint,
                                         c["topk.collapse"])])
