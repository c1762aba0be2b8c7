"""Chapter 06, Control and steering: writing into the signal space (experiments 10–12: Emotion Surgery, Concept
Inception, Genetic Hijack), each intervention against a random direction of the same norm or a random edit of the
same size; the steering panel (every setting precomputed, so it answers in the static page: :mod:`reflow_core.steering_grid`)
and, in a live kernel or ``make steer``, the live panel for any prompt."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from reflow_core.chapters import ChapterResult
from reflow_core.data import load_tokens
from reflow_core.experiments import controls, emotion, hijack, inception
from reflow_core.experiments.common import Interval
from reflow_core.experiments.emotion import EmotionResult
from reflow_core.experiments.hijack import HijackResult
from reflow_core.experiments.inception import InceptionResult
from reflow_core.runs import load_models
from reflow_core.scales import budget, data_dir_for
from reflow_core.steering import steering_panel
from reflow_core.steering_grid import SteeringGrid, compute_grid, default_directions, grid_widget
from reflow_core.stimuli import load_stimuli

NAME = "steering"
EMOTION_REL_ALPHA = 1.0  # α of the emotion surgery, in units of the median residual norm
INCEPTION_ITERS = 12  # bisection steps of the concept inception
HIJACK_WINDOWS = 32  # sentiment-free validation windows for the hijack's collateral damage
HIJACK_WINDOW_TOKENS = 128  # their length (or the model's context, if shorter)
HIJACK_NULL_READ = 99  # random edits of the same size for the hijack's read flip (permutation p ≥ 0.01)
CLAIMS = ("emotion.flip", "inception.alpha", "hijack.sentiment")
# The panel's initial setting (its α: twice the emotion surgery's, i.e. 2 × the median residual norm); the static grid
# opens on the same setting.
PANEL = dict(prompt="The service was terrible and the food was", kind="sentiment", word=" ocean", max_new_tokens=16)
PANEL_REL_ALPHA = 2.0


@dataclass(kw_only=True)
class Result(ChapterResult):
    labels: list  # checkpoint label per training seed
    n_layer: int
    budget: dict  # budget(scale, "steering")
    stimuli: dict  # the counts the text quotes: positive/negative words, prompts, antonym pairs, concepts
    emotion: EmotionResult
    flip_seeds: Interval  # early-range flip rate over the training seeds
    inception: InceptionResult
    hijack: HijackResult
    panel_settings: dict  # the live panel's initial setting (SteeringPanel keyword arguments)
    grid: SteeringGrid  # every setting of the static panel, precomputed (reflow_core.steering_grid)
    controls: dict  # claim id -> its positive control (reflow_core.experiments.controls)
    d_model: int = 0
    model: object = field(repr=False, compare=False, default=None)  # the first seed's model, for the live panel

    @property
    def ranges(self) -> dict:
        return emotion.layer_ranges(self.n_layer)

    def to_json(self) -> dict:
        emo, inc, hj = self.emotion, self.inception, self.hijack
        return {
            "scale": self.scale, "checkpoint": self.checkpoint,
            "emotion": {"alpha": emo.alpha, "rel_alpha": emo.rel_alpha, "responds": emo.responds,
                        "effect_per_layer": emo.effect.mean(1).tolist(), "null_p95_per_layer":
                        np.percentile(np.abs(emo.null_effect).mean(1), 95, axis=1).tolist(),
                        "flip_rate": emo.flip_rate, "null_flip_rate": emo.null_flip_rate, "flips": emo.flips,
                        "generations": emo.generations, "flip_rate_seeds": self.flip_seeds.values,
                        "seed_labels": self.labels},
            "inception": {"median_alpha_per_layer": inc.median_alpha_per_layer().tolist(),
                          "found": float(inc.found.mean()), "null_found": inc.null_found_rate,
                          "unit_norm": inc.unit_norm, "alpha_max": inc.alpha_max},
            "hijack": {"edit_size": hj.edit_size, "read_before": hj.read_before.tolist(),
                       "read_after": hj.read_after.tolist(), "full_after": hj.full_after.tolist(),
                       "read_flip_rate": hj.read_flip_rate, "null_read_flip_rates": hj.null_read_flip_rates.tolist(),
                       "read_p": hj.read_p_value, "delta_loss": hj.delta_loss,
                       "null_delta_loss": hj.null_delta_loss.tolist(), "damage_percentile": hj.damage_percentile(),
                       "n_windows": int(hj.loss_before.size), "generations": hj.generations},
            "panel": {"settings": self.panel_settings, "grid": self.grid.to_json()},
            "controls": {claim: dataclasses.asdict(c) for claim, c in self.controls.items()},
        }

    def prose(self) -> dict[str, object]:
        emo, inc, hj, ranges = self.emotion, self.inception, self.hijack, self.ranges
        p = {"scale": self.scale, "ckpt_label": self.checkpoint, "n_layer": self.n_layer,
             "early_range": f"L{ranges['early'][0]}–L{ranges['early'][1]}",
             "late_range": f"L{ranges['late'][0]}–L{ranges['late'][1]}"}
        p |= self.stimuli | self.budget
        # Emotion Surgery
        p["emo_alpha"] = f"{emo.alpha:.3g}"
        p["emo_responds"] = ", ".join(str(l) for l, r in enumerate(emo.responds) if r) or "none"
        p["emo_n_responds"] = f"{sum(emo.responds)} of {len(emo.responds)}"
        p["emo_flip_early"] = f"{100 * emo.flip_rate['early']:.0f}%"
        p["emo_flip_late"] = f"{100 * emo.flip_rate['late']:.0f}%"
        p["emo_null_early"] = f"{100 * emo.null_flip_rate['early']:.0f}%"
        p["emo_null_late"] = f"{100 * emo.null_flip_rate['late']:.0f}%"
        p["emo_flips"] = ", ".join(f"{a.strip()} → {b.strip()}" for a, b in emo.flips["early"])
        p["emo_n_start_neg"] = emo.n_start_negative["early"]
        p["n_seeds"] = len(self.labels)
        p["emo_flip_seeds"] = self.flip_seeds.fmt(".2f")
        p["emo_p"] = f"{emo.flip_p_value('early'):.3g}"
        # Concept Inception
        found_alpha = np.where(inc.found, inc.alpha, np.nan)
        med = inc.median_alpha_per_layer()
        p["inc_median"] = f"{np.nanmedian(found_alpha):.3g}" if inc.found.any() else "—"
        p["inc_median_rel"] = f"{np.nanmedian(found_alpha) / inc.unit_norm:.2g}" if inc.found.any() else "—"
        p["inc_found"] = f"{100 * inc.found.mean():.0f}%"
        p["inc_null_found"] = f"{100 * inc.null_found_rate:.0f}%"
        p["inc_best_layer"] = int(np.nanargmin(med)) if np.isfinite(med).any() else "—"
        p["inc_unit"] = f"{inc.unit_norm:.3g}"
        p["inc_alpha_max_rel"] = f"{inc.alpha_max / inc.unit_norm:.2g}"
        # Genetic Hijack
        pct, lo, hi = hj.damage_percentile()
        p["hj_n_start_neg"] = int(hj.start_negative.sum())
        p["hj_read_flip"] = f"{100 * hj.read_flip_rate:.0f}%"
        p["hj_null_read_flip"] = (f"{100 * np.median(hj.null_read_flip_rates):.0f}%"
                                  if len(hj.null_read_flip_rates) else "—")
        p["hj_read_p"] = f"{hj.read_p_value:.3g}"
        p["hj_full_flip"] = f"{100 * hj.full_flip_rate:.0f}%"
        p["hj_windows"] = int(hj.loss_before.size)
        p["hj_loss"] = f"{hj.loss_before.mean():.3f}" if hj.loss_before.size else "—"
        p["hj_dloss"] = f"{hj.delta_loss:+.4f}"
        p["hj_null_dloss"] = f"{np.median(hj.null_delta_loss):+.4f}"
        p["hj_pct"] = f"{pct:.0f}"
        p["hj_pct_ci"] = f"[{lo:.0f}, {hi:.0f}]"
        p["n_null_read"] = len(hj.null_read_after)
        # The static panel: its grid and its first setting (= the live panel's)
        g = self.grid
        first = g.cell(0, "early", PANEL_REL_ALPHA)
        p["panel_prompt"] = g.prompt
        p["panel_steered"] = first.continuation
        p["panel_unsteered"] = g.baseline_continuation
        p["grid_n_cells"] = len(g.cells)
        p["grid_n_directions"] = len(g.directions)
        p["grid_n_concepts"] = sum(d.kind == "concept" for d in g.directions)
        p["grid_n_ranges"] = len(g.ranges)
        p["grid_n_alphas"] = len(g.rel_alphas)
        p["grid_alphas"] = ", ".join(f"{a:g}" for a in g.rel_alphas)
        p["grid_unit"] = f"{g.unit_norm:.3g}"
        p["grid_ranges"] = "; ".join(f"{n} L{lo}–L{hi}" for n, (lo, hi) in g.ranges.items())
        return p


def stimulus_counts() -> dict[str, int]:
    """The sizes of the word lists and prompt sets the chapter's text quotes."""
    sent, concepts = load_stimuli("sentiment"), load_stimuli("concepts")
    return {"n_pos": len(sent["positive"]), "n_neg": len(sent["negative"]),
            "n_sent_prompts": len(sent["prompts"]) + len(sent["negative_prompts"]),
            "n_neg_prompts": len(sent["negative_prompts"]), "n_pairs": len(sent["swap_pairs"]),
            "n_concepts": len(concepts["concepts"])}


def run(scale: str, results_dir=None) -> Result:
    b = budget(scale, "steering")
    models, labels = load_models(scale, "reflow", results_dir)  # one model per training seed of the scale
    model = models[0]
    gates = controls.final_gates(scale, results_dir)
    claim_controls = {claim: controls.claim_control(claim, gates) for claim in CLAIMS}
    val_tokens = load_tokens(data_dir_for(scale), "val")
    emo = emotion.emotion_surgery(model, rel_alpha=EMOTION_REL_ALPHA, n_random=b["n_random_emotion"])
    flip_seeds = emotion.flip_rate_over_seeds(models)
    inc = inception.concept_inception(model, n_prompts=b["n_prompts_inception"], n_random=b["n_random_inception"],
                                      n_iter=INCEPTION_ITERS)
    hj = hijack.genetic_hijack(model, val_tokens, n_null=b["n_null_hijack"], n_null_read=HIJACK_NULL_READ,
                               n_windows=HIJACK_WINDOWS, block_size=HIJACK_WINDOW_TOKENS)
    settings = PANEL | {"layers": emotion.layer_ranges(model.config.n_layer)["early"],
                        "alpha": round(PANEL_REL_ALPHA * emo.unit_norm, 2)}
    grid = compute_grid(model, PANEL["prompt"], emo.unit_norm,
                        default_directions(model, load_stimuli("concepts")["concepts"]))
    return Result(scale=scale, checkpoint=labels[0], labels=labels, n_layer=model.config.n_layer,
                  d_model=model.config.d_model, budget=b, stimuli=stimulus_counts(), emotion=emo,
                  flip_seeds=flip_seeds, inception=inc, hijack=hj, panel_settings=settings,
                  grid=grid, controls=claim_controls, model=model)


def panel(result: Result):
    """The live steering panel at the chapter's initial setting (any prompt; needs a kernel); display
    ``panel(result).widget``."""
    return steering_panel(result.model, **result.panel_settings)


def static_panel(result: Result):
    """The steering panel of the book: every setting of its controls precomputed (``result.grid``), switched in the
    browser, so it answers in the static page; a widget to display."""
    return grid_widget(result.grid)


def plot(result: Result) -> dict:
    return {
        "fig-steering-emotion": emotion.plot_emotion(result.emotion),
        "fig-steering-inception": inception.plot_inception(result.inception),
        "fig-steering-hijack": hijack.plot_hijack(result.hijack),
    }


def scorecard_rows(result: Result) -> list:
    c = result.controls
    return (emotion.scorecard_rows(result.emotion, result.scale, result.checkpoint, result.n_layer, c["emotion.flip"],
                                   result.flip_seeds)
            + inception.scorecard_rows(result.inception, result.scale, result.checkpoint, c["inception.alpha"],
                                       n_layer=result.n_layer, d_model=result.d_model)
            + hijack.scorecard_rows(result.hijack, result.scale, result.checkpoint, c["hijack.sentiment"]))
