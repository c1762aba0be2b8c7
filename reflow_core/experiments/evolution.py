"""Experiment 7 — Layer Evolution: when does the model's next-token decision crystallise?

At every layer state h_0 … h_L (see :mod:`reflow_core.steering`) we read the last position through the book's lens
(``model.lens_logits`` = final RMSNorm, then the factored read-out s_l · W_recipeᵀ; for the tied baseline the same
logit lens through its embedding) and record the probability and rank of a target token.  At l = L this is exactly
the model's output.

Definitions (stated once, used everywhere):

* **crystallisation layer** — the smallest l such that the target is the lens top-1 at *every* layer l, l+1, …, L.
  Defined only when the target is the model's final top-1 (otherwise ``None``); the default target is therefore the
  model's own final prediction (the *decision*), not the data file's expected answer.
* **half-probability layer** — the first l at which p_l(target) ≥ ½·p_L(target).
* both are also reported as a *fraction of depth*, l / L, so a 6-layer model can be set beside the seed's
  "L12–L18 of 36" (0.33–0.50).

Baselines: the same statistics on the tied-embedding model trained under the same budget (``gpt2-new``) and on the
reFlow model at initialisation — a decision that "crystallises" equally early in an untrained model is not a finding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from reflow_core import tokenizer
from reflow_core.experiments.common import Interval, seed_interval
from reflow_core.scorecard import NOT_REPRODUCED, REPRODUCED, Row
from reflow_core.hooks import encode_prompt, residual_states
from reflow_core.stimuli import load_stimuli, token_ids

PAPER_BAND = (12 / 36, 18 / 36)  # the seed's L12–L18 of 36, as a fraction of depth


def factual_items() -> list[dict]:
    """The factual prompt set (``assets/prompts/factual.json``); every target is checked to be one token."""
    items = load_stimuli("factual")["items"]
    token_ids([it["target"] for it in items])  # raises if a target splits
    return items


@torch.no_grad()
def lens_trajectory(model, prompt: str | torch.Tensor, target_id: int | None = None) -> dict:
    """Lens probability and rank of ``target_id`` (default: the final top-1) at every layer, last position."""
    idx = encode_prompt(model, prompt) if isinstance(prompt, str) else prompt
    states = residual_states(model, idx)[:, 0, -1]  # (L+1, d)
    logits = model.lens_logits(states)[:, : model.config.real_vocab_size].float()
    logp = F.log_softmax(logits, dim=-1)
    final_top = int(logits[-1].argmax())
    target = final_top if target_id is None else int(target_id)
    t_logit = logits[:, target : target + 1]
    ranks = (logits > t_logit).sum(-1) + 1  # 1 = top-1
    probs = logp[:, target].exp()
    return {
        "target": target, "target_token": tokenizer.decode([target]), "final_top1": final_top,
        "probs": probs.tolist(), "ranks": ranks.tolist(), "top1": logits.argmax(-1).tolist(),
    }


def crystallisation_layer(ranks: list[int]) -> int | None:
    """Smallest l from which the target stays top-1 through the last layer; None if it is not top-1 at the end."""
    if ranks[-1] != 1:
        return None
    layer = len(ranks) - 1
    while layer > 0 and ranks[layer - 1] == 1:
        layer -= 1
    return layer


def half_probability_layer(probs: list[float]) -> int:
    """First l with p_l ≥ ½ p_L."""
    final = probs[-1]
    return next(l for l, p in enumerate(probs) if p >= 0.5 * final)


@dataclass
class EvolutionResult:
    model_label: str
    n_layer: int
    prompts: list[str]
    expected: list[str]
    decision: dict  # per prompt trajectories of the model's own final top-1
    expected_traj: dict  # per prompt trajectories of the data file's target
    crystal: list  # crystallisation layer per prompt (decision target)
    half: list  # half-probability layer per prompt (decision target)
    expected_top1: float  # fraction of prompts whose expected target is the model's final top-1
    summary: dict = field(default_factory=dict)


def layer_evolution(model, items: list[dict] | None = None, *, label: str = "reflow") -> EvolutionResult:
    """Experiment 7 over a prompt set: trajectories, crystallisation and half-probability layers."""
    items = factual_items() if items is None else items
    L = model.config.n_layer
    dec_p, dec_r, exp_p, exp_r, crystal, half, hit = [], [], [], [], [], [], []
    for it in items:
        d = lens_trajectory(model, it["prompt"])
        e = lens_trajectory(model, it["prompt"], tokenizer.single_token_id(it["target"]))
        dec_p.append(d["probs"]); dec_r.append(d["ranks"]); exp_p.append(e["probs"]); exp_r.append(e["ranks"])
        crystal.append(crystallisation_layer(d["ranks"]))
        half.append(half_probability_layer(d["probs"]))
        hit.append(e["ranks"][-1] == 1)
    c = np.array(crystal, dtype=float)
    h = np.array(half, dtype=float)
    summary = {
        "median_crystal_layer": float(np.median(c)), "median_crystal_frac": float(np.median(c) / L),
        "mean_crystal_frac": float(np.mean(c) / L), "median_half_layer": float(np.median(h)),
        "median_half_frac": float(np.median(h) / L),
        "frac_in_paper_band": float(np.mean((c / L >= PAPER_BAND[0]) & (c / L <= PAPER_BAND[1]))),
        "frac_crystal_at_last_layer": float(np.mean(c == L)),
    }
    return EvolutionResult(
        model_label=label, n_layer=L, prompts=[it["prompt"] for it in items], expected=[it["target"] for it in items],
        decision={"probs": dec_p, "ranks": dec_r}, expected_traj={"probs": exp_p, "ranks": exp_r},
        crystal=crystal, half=half, expected_top1=float(np.mean(hit)), summary=summary,
    )


def crystallisation_over_seeds(models: list, items: list[dict] | None = None) -> Interval:
    """Median crystallisation depth fraction of each training seed's model, as an interval over seeds."""
    return seed_interval([layer_evolution(m, items).summary["median_crystal_frac"] for m in models])


def evolution_with_baselines(models: dict, items: list[dict] | None = None) -> dict[str, EvolutionResult]:
    """``{label: model}`` → ``{label: EvolutionResult}`` (e.g. reflow, gpt2-new, reflow@init)."""
    return {label: layer_evolution(m, items, label=label) for label, m in models.items()}


def summary_table(results: dict[str, EvolutionResult]):
    """Each model's summary (crystallisation and half-probability layers, as layers and fractions of depth), one row
    per model."""
    import pandas as pd

    return pd.DataFrame({label: r.summary for label, r in results.items()}).T.round(3)


# ----------------------------------------------------------------------------------------------
# Figures


def plot_trajectories(results: dict[str, EvolutionResult], which: str = "decision"):
    """Median lens probability and rank of the target per layer (fraction of depth on x), per model."""
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, r in results.items():
        traj = r.decision if which == "decision" else r.expected_traj
        x = np.arange(r.n_layer + 1) / r.n_layer
        p = np.array(traj["probs"]); rk = np.array(traj["ranks"])
        a1.plot(x, np.median(p, 0), "o-", label=label)
        a1.fill_between(x, np.percentile(p, 25, 0), np.percentile(p, 75, 0), alpha=0.15)
        a2.plot(x, np.median(rk, 0), "o-", label=label)
    a1.set_xlabel("layer / depth"); a1.set_ylabel("lens p(target)  (median, IQR)"); a1.set_yscale("log")
    a2.set_xlabel("layer / depth"); a2.set_ylabel("lens rank of target (median)"); a2.set_yscale("log")
    for a in (a1, a2):
        a.axvspan(*PAPER_BAND, color="0.85", zorder=0)
    a1.legend(fontsize=8)
    what = "the model's own final prediction" if which == "decision" else "the expected answer"
    fig.suptitle(f"Layer evolution of {what} (grey band: the seed's L12–L18 of 36)", fontsize=11)
    fig.tight_layout()
    return fig


def plot_crystallisation(results: dict[str, EvolutionResult]):
    """Distribution of crystallisation layers as a fraction of depth, per model."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = list(results)
    for i, label in enumerate(labels):
        r = results[label]
        frac = np.array(r.crystal, dtype=float) / r.n_layer
        jitter = np.random.default_rng(i).uniform(-0.15, 0.15, len(frac))
        ax.scatter(frac, i + jitter, s=14, alpha=0.6)
        ax.plot([np.median(frac)] * 2, [i - 0.3, i + 0.3], color="k", lw=2)
    ax.axvspan(*PAPER_BAND, color="0.85", zorder=0, label="seed: L12–L18 of 36")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("crystallisation layer / depth (black bar: median)")
    ax.set_xlim(-0.05, 1.05)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def scorecard_rows(results: dict[str, EvolutionResult], scale: str, checkpoint: str) -> list[Row]:
    r = results["reflow"]
    s = r.summary
    lo, hi = PAPER_BAND
    inside = lo <= s["median_crystal_frac"] <= hi
    # an untrained model that "crystallises" in the same band shows the band is not a learned property
    init_inside = [lo <= b.summary["median_crystal_frac"] <= hi for label, b in results.items() if "init" in label]
    null_also = any(init_inside)
    null_parts = []
    for label, b in results.items():
        if label != "reflow":
            null_parts.append(f"{label} {b.summary['median_crystal_frac']:.2f}")
    null_text = ("; null/baseline medians: " + ", ".join(null_parts)) if null_parts else ""
    return [Row(
        claim_id="evolution.crystallisation",
        ours=(f"median crystallisation layer {s['median_crystal_layer']:.0f} of {r.n_layer} "
              f"({s['median_crystal_frac']:.2f} of depth; {100 * s['frac_in_paper_band']:.0f}% of prompts in 0.33–0.50)"),
        verdict=REPRODUCED if inside and not null_also else NOT_REPRODUCED,
        why=("lens top-1 stays fixed from that layer on, over the factual prompt set" + null_text
             + ("; the model at initialisation lands in the band too" if inside and null_also else "")),
        scale=scale, checkpoint=checkpoint,
    )]
