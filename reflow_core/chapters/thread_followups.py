"""Chapter 09, Thread follow-ups: the forum thread's crystallisation boundary under context complexity, and a
hidden-state monitor for looping generation against a text-only n-gram rule."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pandas as pd

from reflow_core.chapters import ChapterResult
from reflow_core.experiments import boundary, controls
from reflow_core.experiments import loop_monitor as monitor
from reflow_core.experiments.boundary import BoundaryResult
from reflow_core.experiments.loop_monitor import MonitorEval
from reflow_core.runs import load_models
from reflow_core.scales import budget
from reflow_core.stimuli import load_stimuli

NAME = "followups"
MARGIN = 1.5  # the boundary's fixed α: this × the median layer-0 critical α
# The loop monitor: the thread's rule (window, threshold, patience), the sampling settings and the loop criterion.
# Detectors read the first half of each generation; the loop label is computed on the held-out second half.
MONITOR = dict(window=16, threshold=0.95, patience=3, ngram=4, max_period=8, min_tokens=12)
TEMPERATURES, TOP_K, SEEDS = (0.7, 1.0), 50, (0, 1)
CLAIMS = ("thread.boundary_shift", "thread.loop_monitor")
DETECTORS = (("state", "state"), ("step", "step"), (None, "ngram"))  # (signal at the deepest layer | n-gram, tag)


@dataclass(kw_only=True)
class Result(ChapterResult):
    n_layer: int
    boundary: BoundaryResult
    margin: float
    monitor: MonitorEval
    monitor_prompts: list  # the prompts the monitor generated from
    monitor_tokens: int  # generated tokens per continuation
    layers: list  # layer states monitored
    controls: dict  # claim id -> its positive control (reflow_core.experiments.controls)

    def detector(self, signal: str | None) -> str:
        """The monitor's name for the deepest layer's ``signal`` ("state", "step"), or the n-gram rule (None)."""
        return f"L{self.n_layer} {signal}" if signal else "n-gram"

    def to_json(self) -> dict:
        br, ev = self.boundary, self.monitor
        return {
            "checkpoint": self.checkpoint,
            "boundary": {"alpha": br.alpha, "unit_norm": br.unit_norm, "n_layer": self.n_layer,
                         "boundary": {s: br.boundary[s].tolist() for s in boundary.SETS},
                         "wilcoxon_p": br.wilcoxon()[1], "paired_shift": br.paired_shift(),
                         "shift_interval": list(br.shift_interval()), "pairs_defined": br.n_pairs_defined},
            "monitor": {"layers": self.layers, "visible": ev.visible, "onset": ev.onset.tolist(),
                        "heldout_onset": ev.heldout_onset.tolist(), "degenerate": ev.degenerate.tolist(),
                        "settings": ev.settings, "fire": {k: v.tolist() for k, v in ev.fire.items()},
                        "base_rates": ev.base_rates(), "scores": ev.table().to_dict(orient="records")},
            "controls": {claim: dataclasses.asdict(c) for claim, c in self.controls.items()},
        }

    def prose(self) -> dict[str, object]:
        br, ev, L = self.boundary, self.monitor, self.n_layer
        p = {"scale": self.scale, "ckpt_label": self.checkpoint, "n_layer": L}
        # The crystallisation boundary
        p |= {"n_pairs": len(br.items), "margin": f"{self.margin:g}", "alpha_max_rel": f"{br.alpha_max_rel:g}",
              "n_calibrated": br.n_calibrated, "n_prompts_total": 2 * len(br.items), "alpha": f"{br.alpha:.3g}",
              "alpha_rel": f"{br.alpha / br.unit_norm:.2g}"}
        for s in boundary.SETS:
            p[f"med_{s}"] = f"{br.median(s):g}"
            p[f"frac_{s}"] = f"{br.median(s) / L:.2f}"
            p[f"defined_{s}"] = int(br.defined(s).size)
            p[f"excluded_{s}"] = int(br.native_alt[s].sum())
            p[f"native_{s}"] = f"{100 * br.native_answer[s].mean():.0f}%"
        p["wilcoxon_p"] = f"{br.wilcoxon()[1]:.3g}"
        p["paired_shift"] = f"{br.paired_shift():+g}"
        p["n_pairs_defined"] = br.n_pairs_defined
        p["expected_shift"] = f"{boundary.expected_shift_layers(L):.1f}"
        # The loop monitor
        rates = ev.base_rates()
        p |= {"window": ev.window, "threshold": ev.threshold, "patience": ev.patience, "n_gen": len(ev.texts),
              "mon_tokens": self.monitor_tokens, "n_mon_prompts": len(self.monitor_prompts),
              "n_loops": int(ev.looped.sum()), "mon_layers": ", ".join(str(l) for l in self.layers), "deep": L,
              "temps": ", ".join(f"{t:g}" for t in TEMPERATURES), "top_k": TOP_K, "n_seeds": len(SEEDS),
              "max_period": MONITOR["max_period"], "min_tokens": MONITOR["min_tokens"], "ngram": MONITOR["ngram"],
              "visible": ev.visible, "heldout": self.monitor_tokens - ev.visible,
              "degenerate_within": ev.degenerate_within,
              "loop_share": f"{100 * rates['looping']:.0f}%", "degenerate_share": f"{100 * rates['degenerate']:.0f}%",
              "n_nondegenerate": rates["non-degenerate"], "n_loops_nondeg": rates["looping (non-degenerate)"],
              "base_rate": f"{rates['loop rate (non-degenerate)']:.2f}"}
        for signal, tag in DETECTORS:
            sc = ev.scores(self.detector(signal))
            p[f"prec_{tag}"] = f"{sc['precision']:.2f} [{sc['precision lo']:.2f}, {sc['precision hi']:.2f}]"
            p[f"rec_{tag}"] = f"{sc['recall']:.2f} [{sc['recall lo']:.2f}, {sc['recall hi']:.2f}]"
            p[f"lead_{tag}"] = f"{sc['median lead (tokens)']:g}"
        return p


def monitored_layers(n_layer: int) -> list[int]:
    """The layer states the loop monitor reads: the middle one and the last."""
    return sorted({max(1, n_layer // 2), n_layer})


def run(scale: str, results_dir=None) -> Result:
    b = budget(scale, "followups")
    models, labels = load_models(scale, "reflow", results_dir)
    model, L = models[0], models[0].config.n_layer
    gates = controls.final_gates(scale, results_dir)
    claim_controls = {claim: controls.claim_control(claim, gates) for claim in CLAIMS}
    br = boundary.crystallisation_boundary(model, margin=MARGIN)
    prompts = [it["prompt"] for it in load_stimuli("factual")["items"][:b["monitor_prompts"]]]
    layers = monitored_layers(L)
    ev = monitor.evaluate_monitor(model, prompts, layers, max_new_tokens=b["monitor_tokens"],
                                  temperatures=(0.0, *TEMPERATURES), seeds=SEEDS, top_k=TOP_K, **MONITOR)
    return Result(scale=scale, checkpoint=labels[0], n_layer=L, boundary=br, margin=MARGIN, monitor=ev,
                  monitor_prompts=prompts, monitor_tokens=b["monitor_tokens"], layers=layers,
                  controls=claim_controls)


def generations_table(result: Result):
    """The first generations of the loop monitor: whether they are degenerate, their loop onset (whole generation)
    and label (held-out part loops), and whether the deepest state rule and the n-gram rule fired on the visible part
    (the text marks the end of the visible part with ‖)."""
    ev, state = result.monitor, result.detector("state")
    pd.set_option("display.max_colwidth", 120)
    return pd.DataFrame({"setting": ev.settings, "degenerate": ev.degenerate, "loop onset": ev.onset,
                         "held-out loops": ev.looped, f"{state} fired": ev.fired(state),
                         "n-gram fired": ev.fired("n-gram"),
                         "text": [t.replace("\n", " ⏎ ") for t in ev.texts]}).head(14)


def plot(result: Result) -> dict:
    return {
        "fig-followups-boundary": boundary.plot_boundary(result.boundary),
        "fig-followups-monitor": monitor.plot_monitor(result.monitor),
    }


def scorecard_rows(result: Result) -> list:
    c = result.controls
    return (boundary.scorecard_rows(result.boundary, result.scale, result.checkpoint, c["thread.boundary_shift"])
            + monitor.scorecard_rows(result.monitor, result.scale, result.checkpoint, c["thread.loop_monitor"]))
