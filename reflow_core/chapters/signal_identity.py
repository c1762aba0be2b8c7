"""Chapter 03, Signal identity: what the recipe rows are (experiments 1–3: Recipe Atlas, Sparsity Profile,
Basis Geometry), each statistic against GPT-2-New's embedding rows, reFlow at initialisation and a Gaussian null."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from reflow_core.chapters import ChapterResult
from reflow_core.experiments import atlas, controls, geometry, sparsity
from reflow_core.experiments.common import fmt_group, over_models, seed_interval
from reflow_core.runs import comparison_models, seeds_label

NAME = "signal-identity"
TAGS = [("reflow", ""), ("gpt2-new", "_gpt2new"), ("reflow (init)", "_init"), ("reflow-topk", "_topk")]


@dataclass(kw_only=True)
class Result(ChapterResult):
    labels: dict  # group -> checkpoint label per seed
    n_signals: int
    atlas: dict  # group -> [atlas.AtlasResult per seed]
    sparsity: dict  # group -> [sparsity.SparsityResult per seed]
    geometry: dict  # group -> [geometry.GeometryResult per seed]
    controls: dict  # claim id -> its positive control (reflow_core.experiments.controls)
    n_seeds: int = 1

    def to_json(self) -> dict:
        return {
            "checkpoints": self.labels,
            "atlas": {n: [{"purity": r.purity, "chance": r.chance, "top_pairs_valid": r.top_pairs_valid,
                           "vocab_top1_valid": r.vocab_top1_valid, "named": r.named,
                           "named_percentile": r.named_percentile, "dropped": r.dropped} for r in rs]
                      for n, rs in self.atlas.items()},
            "sparsity": {n: [{"rate_at_2": r.rate_at_2, "active_at_2": r.active_at_2, "gini": r.gini,
                              "null_rate_at_2": r.null_rate_at_2, "null_gini": r.null_gini,
                              "excess_kurtosis": r.excess_kurtosis, "top_signal_mass": r.top_signal_mass, "cs": r.cs,
                              "rate": r.rate} for r in rs]
                         for n, rs in self.sparsity.items()},
            "geometry": {n: [{k: {"effective_rank": s.effective_rank, "participation_ratio": s.participation_ratio}
                              for k, s in r.spectra.items()} | {"mean_abs_cos": r.mean_abs_cos} for r in rs]
                         for n, rs in self.geometry.items()},
            "controls": {claim: dataclasses.asdict(c) for claim, c in self.controls.items()},
        }

    def prose(self) -> dict[str, object]:
        at, sp, geo = self.atlas, self.sparsity, self.geometry
        r0 = at["reflow"][0]
        p = {"scale": self.scale, "ckpt_label": self.checkpoint, "n_seeds": self.n_seeds, "n_signals": self.n_signals}
        # Recipe Atlas
        for pair, key in [("three↔four", "three_four"), ("king↔queen", "king_queen"),
                          ("France↔Germany", "france_germany")]:
            for name, tag in TAGS:
                p[f"atlas_{key}{tag}"] = fmt_group(at, name, lambda r: r.named[pair], ".2f")
            p[f"atlas_{key}_pct"] = f"{seed_interval([r.named_percentile[pair] for r in at['reflow']]).mean:.1f}"
        for name, tag in TAGS:
            p[f"atlas_purity{tag}"] = fmt_group(at, name, lambda r: r.purity, ".2f")
            p[f"atlas_top20{tag}"] = fmt_group(at, name, lambda r: r.top_pairs_valid, ".0f")
            p[f"atlas_vocab1{tag}"] = fmt_group(at, name, lambda r: 100 * r.vocab_top1_valid, ".0f", "%")
        p["atlas_chance"] = f"{r0.chance:.2f}"
        p["atlas_n_words"] = len(r0.words)
        p["atlas_dropped"] = len(r0.dropped)
        # Sparsity Profile
        reflow_sp = sp["reflow"]
        p["gauss_rate_2"] = f"{100 * float(sparsity.gaussian_rate(2.0)):.2f}%"
        for name, tag in TAGS:
            p[f"sp_rate{tag}"] = fmt_group(sp, name, lambda r: 100 * r.rate_at_2, ".2f", "%")
            p[f"sp_gini{tag}"] = fmt_group(sp, name, lambda r: r.gini, ".3f")
            p[f"sp_kurt{tag}"] = fmt_group(sp, name, lambda r: r.excess_kurtosis, ".2f")
        p["sp_active"] = seed_interval([r.active_at_2 for r in reflow_sp]).fmt(".1f")
        p["sp_null_rate"] = f"{100 * seed_interval([r.null_rate_at_2 for r in reflow_sp]).mean:.2f}%"
        p["sp_null_gini"] = f"{seed_interval([r.null_gini for r in reflow_sp]).mean:.3f}"
        # Basis Geometry

        def spectrum(name: str, key: str, stat: str):
            return seed_interval([getattr(r.spectra[key], stat) for r in geo[name]])

        p["geo_basis_er"] = spectrum("reflow", "basis", "effective_rank").fmt(".1f")
        p["geo_basis_pr"] = spectrum("reflow", "basis", "participation_ratio").fmt(".1f")
        p["geo_basis_er_gauss"] = f"{spectrum('reflow', 'basis (gaussian)', 'effective_rank').mean:.1f}"
        p["geo_basis_er_init"] = spectrum("reflow (init)", "basis", "effective_rank").fmt(".1f")
        p["geo_prod_er"] = spectrum("reflow", "product", "effective_rank").fmt(".1f")
        p["geo_prod_pr"] = spectrum("reflow", "product", "participation_ratio").fmt(".1f")
        p["geo_prod_er_gpt2new"] = spectrum("gpt2-new", "product", "effective_rank").fmt(".1f")
        p["geo_prod_pr_gpt2new"] = spectrum("gpt2-new", "product", "participation_ratio").fmt(".1f")
        p["geo_cos"] = seed_interval([r.mean_abs_cos for r in geo["reflow"]]).fmt(".3f")
        p["geo_cos_null"] = f"{np.mean([r.mean_abs_cos_null for r in geo['reflow']]):.3f}"
        p["geo_cos_init"] = seed_interval([r.mean_abs_cos for r in geo["reflow (init)"]]).fmt(".3f")
        return p


def run(scale: str, results_dir=None, *, with_topk: bool = True) -> Result:
    models, labels = comparison_models(scale, results_dir, with_topk=with_topk)
    reflow = models["reflow"][0]
    gates = controls.final_gates(scale, results_dir)
    claim_controls = {claim: controls.claim_control(claim, gates, reflow) for claim in ("atlas.three_four", "atlas.top20")}
    claim_controls["sparsity.rate"] = controls.spike_sparsity(reflow.config.n_signals)
    claim_controls["sparsity.gini"] = controls.spike_uneven_usage(reflow.config.n_signals)
    return Result(
        scale=scale, checkpoint=seeds_label(labels["reflow"]), labels=labels, n_seeds=len(labels["reflow"]),
        n_signals=reflow.config.n_signals,
        atlas=over_models(atlas.recipe_atlas, models), sparsity=over_models(sparsity.sparsity_profile, models),
        geometry=over_models(geometry.basis_geometry, models), controls=claim_controls,
    )


def plot(result: Result) -> dict:
    return {
        "fig-signal-identity-atlas-heatmap": atlas.plot_heatmap(result.atlas["reflow"][0],
                                                                title="reFlow recipe cosine (first seed)"),
        "fig-signal-identity-atlas-purity": atlas.plot_purity(result.atlas),
        "fig-signal-identity-sparsity-sweep": sparsity.plot_sweep(result.sparsity),
        "fig-signal-identity-geometry": geometry.plot_geometry(result.geometry),
    }


def scorecard_rows(result: Result) -> list:
    return (atlas.scorecard_rows(result.atlas, result.scale, result.checkpoint, result.controls)
            + sparsity.scorecard_rows(result.sparsity, result.scale, result.checkpoint, result.controls))
