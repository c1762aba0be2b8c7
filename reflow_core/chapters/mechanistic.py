"""Chapter 05, Mechanistic analysis: when decisions form and which signals carry them (experiments 7–9: Layer
Evolution, Signal Flow, Causal Ablation), read through the model's own signal lens, against GPT-2-New and reFlow at
initialisation (7), random tokens (8) and random signals (9); the crystallisation depth and the single-signal fold
drop are repeated over every training seed of the scale."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reflow_core.chapters import ChapterResult
from reflow_core.experiments import ablation, evolution, flow
from reflow_core.experiments.common import Interval
from reflow_core.runs import load_initial, load_models, load_trained
from reflow_core.tokenizer import single_token_id

NAME = "mechanistic"
FLOW_TOP_N = 12  # signals shown in the Signal Flow heatmaps
N_RANDOM_ABLATION = 100  # random k-signal draws per k (the null of experiment 9, seed's prompt)
N_RANDOM_PARIS = 50  # random single-signal draws for the seed's target " Paris"
N_RANDOM_OVER_PROMPTS = 50  # random single-signal draws per factual prompt


@dataclass(kw_only=True)
class Result(ChapterResult):
    labels: list  # reflow's checkpoint label per training seed (checkpoint = the first)
    n_layer: int
    n_prompts: int
    n_random_ablation: int
    evolution: dict  # "reflow" / "gpt2-new" / "reflow (init)" -> evolution.EvolutionResult
    flow: flow.FlowResult
    ablation: ablation.AblationResult  # the seed's prompt, target = the model's own top-1
    paris: ablation.AblationResult  # the seed's prompt, target " Paris", k = 1
    over_prompts: dict  # ablation.ablation_over_prompts over the factual prompts
    crystal_seeds: Interval  # median crystallisation depth fraction over training seeds
    fold_seeds: Interval  # log10 single-signal fold drop on the seed's prompt over training seeds

    def to_json(self) -> dict:
        fl, abl, paris = self.flow, self.ablation, self.paris
        return {
            "scale": self.scale, "checkpoint": self.checkpoint,
            "evolution": {label: {"summary": r.summary, "crystal": r.crystal, "half": r.half,
                                  "expected_top1": r.expected_top1} for label, r in self.evolution.items()},
            "flow": {"target": fl.target_token, "signals": fl.signals, "top_share": fl.top_share,
                     "null_top_share_median": float(np.median(fl.null_top_share))},
            "ablation": {"target": abl.target_token, "p_before": abl.p_before, "ks": abl.ks, "p_top": abl.p_top,
                         "p_top_residual": abl.p_top_residual, "p_random_median": np.median(abl.p_random, 1).tolist(),
                         "top_signal": abl.order[0], "codebook": abl.codebook,
                         "codebook_function_share": abl.codebook_function_share,
                         "null_function_share": abl.null_function_share,
                         "paris": {"p_before": paris.p_before, "p_after": paris.p_top[0]},
                         "over_prompts": self.over_prompts},
            "seeds": {"labels": self.labels, "crystal_frac": self.crystal_seeds.values,
                      "log10_fold": self.fold_seeds.values},
        }

    def prose(self) -> dict[str, object]:
        s, evo = self.evolution["reflow"].summary, self.evolution
        fl, abl, paris, over = self.flow, self.ablation, self.paris, self.over_prompts
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
            "crystal_frac_gpt2new": f"{evo['gpt2-new'].summary['median_crystal_frac']:.2f}",
            "crystal_frac_init": f"{evo['reflow (init)'].summary['median_crystal_frac']:.2f}",
            # Signal Flow
            "flow_top_n": len(fl.signals),
            "flow_target": repr(fl.target_token),
            "flow_share": f"{100 * fl.top_share:.0f}%",
            "flow_null_share": f"{100 * float(np.median(fl.null_top_share)):.0f}%",
            "flow_null_pct": f"{100 * float(np.mean(fl.null_top_share < fl.top_share)):.0f}%",
            "flow_top_signal": fl.signals[0],
            # Causal Ablation
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
            "paris_before": f"{100 * paris.p_before:.3g}%",
            "paris_after": f"{100 * paris.p_top[0]:.3g}%",
            "over_fold": f"{over['median_fold_top1']:.3g}",
            "over_fold_random": f"{over['median_fold_random']:.3g}",
            "over_collapse": f"{100 * over['frac_collapse']:.0f}%",
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
    items = evolution.factual_items()
    evo = evolution.evolution_with_baselines({"reflow": model, "gpt2-new": baseline, "reflow (init)": initial}, items)
    fl = flow.signal_flow(model, ablation.PAPER_PROMPT, top_n=FLOW_TOP_N)
    abl = ablation.causal_ablation(model, ablation.PAPER_PROMPT, residual=True, n_random=N_RANDOM_ABLATION)
    paris = ablation.causal_ablation(model, ablation.PAPER_PROMPT, single_token_id(ablation.PAPER_TARGET), ks=[1],
                                     n_random=N_RANDOM_PARIS)
    over = ablation.ablation_over_prompts(model, items, n_random=N_RANDOM_OVER_PROMPTS)
    return Result(
        scale=scale, checkpoint=labels[0], labels=labels, n_layer=model.config.n_layer, n_prompts=len(items),
        n_random_ablation=N_RANDOM_ABLATION, evolution=evo, flow=fl, ablation=abl, paris=paris, over_prompts=over,
        crystal_seeds=evolution.crystallisation_over_seeds(models, items), fold_seeds=ablation.fold_over_seeds(models),
    )


def plot(result: Result) -> dict:
    return {
        "fig-mechanistic-evolution": evolution.plot_trajectories(result.evolution, "decision"),
        "fig-mechanistic-crystallisation": evolution.plot_crystallisation(result.evolution),
        "fig-mechanistic-flow": flow.plot_flow(result.flow),
        "fig-mechanistic-ablation": ablation.plot_ablation(result.ablation),
    }


def scorecard_rows(result: Result) -> list:
    scale, checkpoint = result.scale, result.checkpoint
    return (evolution.scorecard_rows(result.evolution, scale, checkpoint)
            + ablation.scorecard_rows(result.ablation, result.over_prompts, scale, checkpoint, result.paris))
