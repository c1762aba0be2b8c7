"""Chapter 05, Mechanistic analysis: when decisions form and which signals carry them (experiments 7–9: Layer
Evolution, Signal Flow, Causal Ablation), read through the model's own signal lens, against GPT-2-New and reFlow at
initialisation (7), random tokens (8) and random signals (9); the crystallisation depth and the single-signal fold
drop are repeated over every training seed of the scale."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from reflow_core.chapters import ChapterResult
from reflow_core.experiments import ablation, controls, evolution, flow
from reflow_core.experiments.common import Interval
from reflow_core.runs import load_initial, load_models, load_trained
from reflow_core.tokenizer import single_token_id

NAME = "mechanistic"
FLOW_TOP_N = 12  # signals shown in the Signal Flow heatmaps
N_RANDOM_ABLATION = 100  # random k-signal draws per k (the null of experiment 9, seed's prompt)
N_RANDOM_OVER_PROMPTS = 50  # random single-signal draws per factual prompt
CLAIMS = ("evolution.crystallisation", "ablation.single", "ablation.codebook")


@dataclass(kw_only=True)
class Result(ChapterResult):
    labels: list  # reflow's checkpoint label per training seed (checkpoint = the first)
    n_layer: int
    n_prompts: int
    n_random_ablation: int
    evolution: dict  # "reflow" / "gpt2-new" / "reflow (init)" -> evolution.EvolutionResult
    evolution_seeds: list  # evolution.EvolutionResult of reflow per training seed (the first is evolution["reflow"])
    flow: flow.FlowResult
    ablation: ablation.AblationResult  # the seed's prompt, target = its expected answer " Paris"
    over_prompts: list  # ablation.ablation_over_prompts per training seed (the recalled factual prompts)
    crystal_seeds: Interval  # median crystallisation depth fraction of the own decision over training seeds
    fold_seeds: Interval  # log10 single-signal fold drop of " Paris" on the seed's prompt over training seeds
    controls: dict  # claim id -> its positive control (reflow_core.experiments.controls)

    def to_json(self) -> dict:
        fl, abl = self.flow, self.ablation
        return {
            "scale": self.scale, "checkpoint": self.checkpoint,
            "evolution": {label: {"summary": r.summary, "crystal": r.crystal, "half": r.half,
                                  "crystal_expected": r.crystal_expected, "expected_top1": r.expected_top1}
                          for label, r in self.evolution.items()},
            "flow": {"target": fl.target_token, "signals": fl.signals, "top_share": fl.top_share,
                     "null_top_share_median": float(np.median(fl.null_top_share))},
            "ablation": {"target": abl.target_token, "p_before": abl.p_before, "ks": abl.ks, "p_top": abl.p_top,
                         "p_top_residual": abl.p_top_residual, "p_random_median": np.median(abl.p_random, 1).tolist(),
                         "top_signal": abl.order[0], "codebook": abl.codebook,
                         "codebook_function_share": abl.codebook_function_share,
                         "null_function_share": abl.null_function_share,
                         "over_prompts": self.over_prompts},
            "seeds": {"labels": self.labels, "crystal_frac": self.crystal_seeds.values,
                      "crystal_frac_expected": [r.summary["median_crystal_frac_expected"]
                                                for r in self.evolution_seeds],
                      "log10_fold": self.fold_seeds.values},
            "controls": {claim: dataclasses.asdict(c) for claim, c in self.controls.items()},
        }

    def prose(self) -> dict[str, object]:
        s, evo = self.evolution["reflow"].summary, self.evolution
        fl, abl, over = self.flow, self.ablation, self.over_prompts[0]

        def pct(x: float) -> str:
            return "—" if not np.isfinite(x) else f"{100 * x:.0f}%"

        def frac(x: float) -> str:
            return "—" if not np.isfinite(x) else f"{x:.2f}"

        def fold(x: float) -> str:
            return "—" if not np.isfinite(x) else f"{x:.3g}"

        return {
            "scale": self.scale, "ckpt_label": self.checkpoint, "n_layer": self.n_layer, "n_prompts": self.n_prompts,
            "n_random_ablation": self.n_random_ablation,
            # Layer Evolution
            "crystal_layer": f"{s['median_crystal_layer']:.0f}",
            "crystal_frac": f"{s['median_crystal_frac']:.2f}",
            "half_frac": f"{s['median_half_frac']:.2f}",
            "in_band_pct": f"{100 * s['frac_in_paper_band']:.0f}%",
            "at_last_pct": f"{100 * s['frac_crystal_at_last_layer']:.0f}%",
            "expected_top1_pct": f"{100 * evo['reflow'].expected_top1:.0f}%",
            "n_expected_top1": s["n_expected_top1"],
            "crystal_frac_expected": frac(s["median_crystal_frac_expected"]),
            "crystal_frac_gpt2new": f"{evo['gpt2-new'].summary['median_crystal_frac']:.2f}",
            "crystal_frac_init": f"{evo['reflow (init)'].summary['median_crystal_frac']:.2f}",
            # Signal Flow
            "flow_top_n": len(fl.signals),
            "flow_target": repr(fl.target_token),
            "flow_share": f"{100 * fl.top_share:.0f}%",
            "flow_null_share": f"{100 * float(np.median(fl.null_top_share)):.0f}%",
            "flow_null_pct": f"{100 * float(np.mean(fl.null_top_share < fl.top_share)):.0f}%",
            "flow_top_signal": fl.signals[0],
            # Causal Ablation (target: the expected answer)
            "abl_target": repr(abl.target_token),
            "abl_p_before": f"{100 * abl.p_before:.3g}%",
            "abl_p_after": f"{100 * abl.p_top[0]:.3g}%",
            "abl_fold": f"{abl.fold_drop_1:.3g}",
            "abl_random_median": f"{100 * float(np.median(abl.p_random[0])):.3g}%",
            "abl_beyond": f"{100 * abl.beyond_random_1:.0f}%",
            "abl_signal": abl.order[0],
            "abl_codebook": "{" + ", ".join(repr(t) for t in abl.codebook) + "}",
            "abl_fw_share": f"{100 * abl.codebook_function_share:.0f}%",
            "abl_fw_null": f"{100 * abl.null_function_share:.0f}%",
            "recall_top_k": over["recall_top_k"],
            "n_recalled": over["n_recalled"],
            "over_fold": fold(over["median_fold_top1"]),
            "over_fold_random": fold(over["median_fold_random"]),
            "over_collapse": pct(over["frac_collapse"]),
            "over_fw_share": pct(float(np.mean(over["codebook_function_share"])) if over["n_recalled"] else np.nan),
            # over training seeds
            "n_seeds": len(self.labels),
            "crystal_frac_seeds": self.crystal_seeds.fmt(".2f"),
            "log_fold_seeds": self.fold_seeds.fmt(".2f"),
        }


def run(scale: str, results_dir=None) -> Result:
    models, labels = load_models(scale, "reflow", results_dir)  # one model per training seed of the scale
    model = models[0]
    baseline, _ = load_trained(scale, "gpt2-new", results_dir)
    initial, _ = load_initial(scale, "reflow", results_dir)
    gates = controls.final_gates(scale, results_dir)
    items = evolution.factual_items()
    evo = evolution.evolution_with_baselines({"reflow": model, "gpt2-new": baseline, "reflow (init)": initial}, items)
    evo_seeds = [evo["reflow"]] + [evolution.layer_evolution(m, items) for m in models[1:]]
    fl = flow.signal_flow(model, ablation.PAPER_PROMPT, top_n=FLOW_TOP_N)
    abl = ablation.causal_ablation(model, ablation.PAPER_PROMPT, single_token_id(ablation.PAPER_TARGET),
                                   residual=True, n_random=N_RANDOM_ABLATION)
    top_k = int(controls.settings()["factual_recall"]["top_k"])  # "recalled": the factual_recall control's top-k
    over = [ablation.ablation_over_prompts(m, items, n_random=N_RANDOM_OVER_PROMPTS, recall_top_k=top_k)
            for m in models]
    return Result(
        scale=scale, checkpoint=labels[0], labels=labels, n_layer=model.config.n_layer, n_prompts=len(items),
        n_random_ablation=N_RANDOM_ABLATION, evolution=evo, evolution_seeds=evo_seeds, flow=fl, ablation=abl,
        over_prompts=over, crystal_seeds=evolution.crystallisation_over_seeds(models, results=evo_seeds),
        fold_seeds=ablation.fold_over_seeds(models),
        controls={claim: controls.claim_control(claim, gates) for claim in CLAIMS},
    )


def plot(result: Result) -> dict:
    return {
        "fig-mechanistic-evolution": evolution.plot_trajectories(result.evolution, "decision"),
        "fig-mechanistic-crystallisation": evolution.plot_crystallisation(result.evolution),
        "fig-mechanistic-flow": flow.plot_flow(result.flow),
        "fig-mechanistic-ablation": ablation.plot_ablation(result.ablation),
    }


def scorecard_rows(result: Result) -> list:
    scale, checkpoint, c = result.scale, result.checkpoint, result.controls
    return (evolution.scorecard_rows(result.evolution, scale, checkpoint, c["evolution.crystallisation"],
                                     result.evolution_seeds)
            + ablation.scorecard_rows(result.ablation, result.over_prompts, scale, checkpoint, c))
