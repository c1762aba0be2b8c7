"""Chapter 06, Control and steering: writing into the signal space (experiments 10–12: Emotion Surgery, Concept
Inception, Genetic Hijack), each intervention against a random direction of the same norm or a random edit of the
same size; and the live steering panel."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from reflow_core.chapters import ChapterResult
from reflow_core.data import load_tokens
from reflow_core.experiments import emotion, hijack, inception
from reflow_core.experiments.common import Interval
from reflow_core.experiments.emotion import EmotionResult
from reflow_core.experiments.hijack import HijackResult
from reflow_core.experiments.inception import InceptionResult
from reflow_core.runs import load_models
from reflow_core.scales import budget, data_dir_for
from reflow_core.steering import SteeringOutput, SteeringSpec, plot_steering, steer, steering_panel
from reflow_core.stimuli import load_stimuli

NAME = "steering"
EMOTION_REL_ALPHA = 1.0  # α of the emotion surgery, in units of the median residual norm
INCEPTION_ITERS = 12  # bisection steps of the concept inception
HIJACK_BATCHES = 2  # validation batches for the hijack's loss change
# The panel's initial setting (its α: twice the emotion surgery's); the figure and the prose show the same setting.
PANEL = dict(prompt="The service was terrible and the food was", kind="sentiment", word=" ocean", max_new_tokens=16)


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
    panel_settings: dict  # the panel's initial setting (SteeringPanel keyword arguments)
    panel_output: SteeringOutput  # steer() at that setting: what the panel shows first
    model: object = field(repr=False, compare=False)  # the first seed's model, for the live panel

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
            "hijack": {"flip_rate": hj.flip_rate, "null_flip_rate": hj.null_flip_rate, "delta_loss": hj.delta_loss,
                       "null_delta_loss": hj.null_delta_loss.tolist(), "column": hj.column,
                       "generations": hj.generations},
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
        p["hj_flip"] = f"{100 * hj.flip_rate:.0f}%"
        p["hj_null_flip"] = f"{100 * hj.null_flip_rate:.0f}%"
        p["hj_dloss"] = f"{hj.delta_loss:+.4f}"
        p["hj_null_dloss"] = f"{np.median(hj.null_delta_loss):+.4f}"
        p["hj_null_dloss_hi"] = f"{np.percentile(hj.null_delta_loss, 95):+.4f}"
        p["hj_loss"] = f"{hj.loss_before:.3f}"
        p["hj_col_signal"] = hj.column.get("signal", "—")
        p["hj_col_score"] = f"{hj.column.get('mean_score_change', float('nan')):+.3f}"
        p["hj_col_dloss"] = f"{hj.column.get('delta_loss', float('nan')):+.4f}"
        p["hj_col_null"] = f"{np.median(hj.column.get('null_delta_loss', [np.nan])):+.4f}"
        # The panel's initial setting
        p["panel_steered"] = self.panel_output.continuation
        p["panel_unsteered"] = self.panel_output.baseline_continuation
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
    val_tokens = load_tokens(data_dir_for(scale), "val")
    emo = emotion.emotion_surgery(model, rel_alpha=EMOTION_REL_ALPHA, n_random=b["n_random_emotion"])
    flip_seeds = emotion.flip_rate_over_seeds(models)
    inc = inception.concept_inception(model, n_prompts=b["n_prompts_inception"], n_random=b["n_random_inception"],
                                      n_iter=INCEPTION_ITERS)
    hj = hijack.genetic_hijack(model, val_tokens, n_null=b["n_null_hijack"], max_batches=HIJACK_BATCHES)
    settings = PANEL | {"layers": emotion.layer_ranges(model.config.n_layer)["early"], "alpha": round(2 * emo.alpha, 2)}
    return Result(scale=scale, checkpoint=labels[0], labels=labels, n_layer=model.config.n_layer, budget=b,
                  stimuli=stimulus_counts(), emotion=emo, flip_seeds=flip_seeds, inception=inc, hijack=hj,
                  panel_settings=settings, panel_output=steer(model, SteeringSpec(**settings)), model=model)


def panel(result: Result):
    """The live steering panel at the chapter's initial setting; display ``panel(result).widget``."""
    return steering_panel(result.model, **result.panel_settings)


def plot(result: Result) -> dict:
    return {
        "fig-steering-emotion": emotion.plot_emotion(result.emotion),
        "fig-steering-inception": inception.plot_inception(result.inception),
        "fig-steering-hijack": hijack.plot_hijack(result.hijack),
        "fig-steering-panel": plot_steering(result.panel_output),
    }


def scorecard_rows(result: Result) -> list:
    return (emotion.scorecard_rows(result.emotion, result.scale, result.checkpoint, result.n_layer)
            + inception.scorecard_rows(result.inception, result.scale, result.checkpoint)
            + hijack.scorecard_rows(result.hijack, result.scale, result.checkpoint))
