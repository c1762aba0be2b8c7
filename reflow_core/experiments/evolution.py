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

* the **crystallisation of the expected answer** — the same layer for the data file's expected answer, on the prompts
  where it is the model's final top-1: the seed's "semantic decisions crystallise mid-depth" is a claim about the
  answer, so the scorecard row (:func:`scorecard_rows`) is measured on it, with a bootstrap over prompts (pooled over
  training seeds, resampling prompts) for the interval against the registered band; the model's own decision is
  reported beside it.

Baselines: the same statistics on the tied-embedding model trained under the same budget (``gpt2-new``) and on the
reFlow model at initialisation — a decision that "crystallises" equally early in an untrained model is not a finding.
The row's positive control is that the expected answer becomes reFlow's top-1 at all (``answer_top1``); where it
never does, there is no crystallisation layer to measure and the row is not testable at this scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from reflow_core import tokenizer
from reflow_core.experiments.common import Interval, seed_interval
from reflow_core.scorecard import MET, MISSED, NOT_TESTABLE, STRADDLES, Control, Row, criterion, decide
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
    crystal_expected: list = field(default_factory=list)  # crystallisation layer of the expected answer (None: not top-1)

    def expected_fracs(self) -> list[tuple[int, float]]:
        """(prompt index, crystallisation depth fraction of the expected answer) for the prompts where it is top-1."""
        return [(i, c / self.n_layer) for i, c in enumerate(self.crystal_expected) if c is not None]


def layer_evolution(model, items: list[dict] | None = None, *, label: str = "reflow") -> EvolutionResult:
    """Experiment 7 over a prompt set: trajectories, crystallisation and half-probability layers."""
    items = factual_items() if items is None else items
    L = model.config.n_layer
    dec_p, dec_r, exp_p, exp_r, crystal, half, hit, crystal_exp = [], [], [], [], [], [], [], []
    for it in items:
        d = lens_trajectory(model, it["prompt"])
        e = lens_trajectory(model, it["prompt"], tokenizer.single_token_id(it["target"]))
        dec_p.append(d["probs"]); dec_r.append(d["ranks"]); exp_p.append(e["probs"]); exp_r.append(e["ranks"])
        crystal.append(crystallisation_layer(d["ranks"]))
        crystal_exp.append(crystallisation_layer(e["ranks"]))
        half.append(half_probability_layer(d["probs"]))
        hit.append(e["ranks"][-1] == 1)
    c = np.array(crystal, dtype=float)
    h = np.array(half, dtype=float)
    ce = np.array([x for x in crystal_exp if x is not None], dtype=float)
    summary = {
        "median_crystal_layer": float(np.median(c)), "median_crystal_frac": float(np.median(c) / L),
        "mean_crystal_frac": float(np.mean(c) / L), "median_half_layer": float(np.median(h)),
        "median_half_frac": float(np.median(h) / L),
        "frac_in_paper_band": float(np.mean((c / L >= PAPER_BAND[0]) & (c / L <= PAPER_BAND[1]))),
        "frac_crystal_at_last_layer": float(np.mean(c == L)),
        "n_expected_top1": int(ce.size),
        "median_crystal_frac_expected": float(np.median(ce) / L) if ce.size else float("nan"),
    }
    return EvolutionResult(
        model_label=label, n_layer=L, prompts=[it["prompt"] for it in items], expected=[it["target"] for it in items],
        decision={"probs": dec_p, "ranks": dec_r}, expected_traj={"probs": exp_p, "ranks": exp_r},
        crystal=crystal, half=half, expected_top1=float(np.mean(hit)), summary=summary, crystal_expected=crystal_exp,
    )


def crystallisation_over_seeds(models: list, items: list[dict] | None = None, *,
                               results: list[EvolutionResult] | None = None) -> Interval:
    """Median crystallisation depth fraction of the model's own decision for each training seed, as an interval over
    seeds (``results``: the seeds' :func:`layer_evolution`, if already computed)."""
    results = [layer_evolution(m, items) for m in models] if results is None else results
    return seed_interval([r.summary["median_crystal_frac"] for r in results])


def prompt_bootstrap(records: list[tuple[int, float]], stat=np.median, n_boot: int = 2000, alpha: float = 0.05,
                     seed: int = 0) -> tuple[float, float, float]:
    """(statistic, lower, upper) of ``stat`` over ``records`` = (prompt, value) pairs, by a percentile bootstrap that
    resamples *prompts* (every record of a drawn prompt comes with it: the values of one prompt over several seeds
    are not independent).  One prompt: the point, with no interval (nan bounds)."""
    if not records:
        return float("nan"), float("nan"), float("nan")
    prompts = sorted({p for p, _ in records})
    by_prompt = {p: np.array([v for q, v in records if q == p]) for p in prompts}
    est = float(stat(np.concatenate(list(by_prompt.values()))))
    if len(prompts) < 2:
        return est, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = [stat(np.concatenate([by_prompt[prompts[j]] for j in rng.integers(0, len(prompts), len(prompts))]))
             for _ in range(n_boot)]
    return est, float(np.quantile(boots, alpha / 2)), float(np.quantile(boots, 1 - alpha / 2))


def within_band(lo: float, hi: float, band) -> str:
    """Where an interval [lo, hi] lies against a band: wholly inside → met; wholly outside → missed; else straddles."""
    low, high = band
    if lo >= low and hi <= high:
        return MET
    if hi < low or lo > high:
        return MISSED
    return STRADDLES


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
    """Distribution of crystallisation layers as a fraction of depth, per model: the model's own decision (filled
    dots, black bar: median) and the expected answer where it is the final top-1 (open diamonds, red bar: median)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = list(results)
    first_expected = True
    for i, label in enumerate(labels):
        r = results[label]
        frac = np.array(r.crystal, dtype=float) / r.n_layer
        jitter = np.random.default_rng(i).uniform(-0.15, 0.15, len(frac))
        ax.scatter(frac, i - 0.1 + jitter, s=14, alpha=0.6, color=f"C{i}",
                   label="own decision" if i == 0 else None)
        ax.plot([np.median(frac)] * 2, [i - 0.35, i + 0.05], color="k", lw=2)
        exp = np.array([f for _, f in r.expected_fracs()])
        if exp.size:
            ax.scatter(exp, i + 0.2 + np.random.default_rng(100 + i).uniform(-0.08, 0.08, exp.size), s=22,
                       marker="D", facecolors="none", edgecolors=f"C{i}",
                       label="expected answer (where top-1)" if first_expected else None)
            first_expected = False
            ax.plot([np.median(exp)] * 2, [i + 0.05, i + 0.35], color="#c44e52", lw=2)
    ax.axvspan(*PAPER_BAND, color="0.85", zorder=0, label="seed: L12–L18 of 36")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("crystallisation layer / depth (black bar: median)")
    ax.set_xlim(-0.05, 1.05)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def scorecard_rows(results: dict[str, EvolutionResult], scale: str, checkpoint: str, control: Control,
                   seeds: list[EvolutionResult] | None = None) -> list[Row]:
    """evolution.crystallisation: the median crystallisation depth fraction of the *expected answer*, over the prompts
    (of every training seed in ``seeds``, default reFlow's first) where it is the final top-1, with a bootstrap over
    prompts against the registered band (:func:`within_band`); ``control``: the expected answer becomes top-1 at all
    (``answer_top1``).  reFlow at initialisation landing in the band makes the row inconclusive."""
    band = tuple(criterion("evolution.crystallisation")["threshold"])
    r = results["reflow"]
    seeds = [r] if seeds is None else seeds
    records = [(i, f) for res in seeds for i, f in res.expected_fracs()]
    n_prompts = len({i for i, _ in records})
    s = r.summary
    decision = (f"the model's own top-1 crystallises at a median {s['median_crystal_frac']:.2f} of depth "
                f"({100 * s['frac_in_paper_band']:.0f}% of prompts in the band)")
    baselines = ", ".join(f"{label} " + (f"{b.summary['median_crystal_frac_expected']:.2f} "
                                         if b.summary["n_expected_top1"] else "— ")
                          + f"({b.summary['n_expected_top1']} prompts)" for label, b in results.items() if label != "reflow")
    if not records:
        return [Row(
            claim_id="evolution.crystallisation",
            ours=f"expected answer top-1 on 0 of {len(r.prompts)} prompts; {decision}",
            verdict=NOT_TESTABLE,
            why=("no prompt's expected answer is the final top-1, so it has no crystallisation layer to measure"
                 + (f"; baselines (expected answer): {baselines}" if baselines else "")),
            scale=scale, checkpoint=checkpoint, control=control,
        )]
    est, lo, hi = prompt_bootstrap(records)
    lo, hi = (est, est) if not np.isfinite(lo) else (lo, hi)
    init = [b for label, b in results.items() if "init" in label and b.expected_fracs()]
    init_in = [b for b in init if band[0] <= np.median([f for _, f in b.expected_fracs()]) <= band[1]]
    return [Row(
        claim_id="evolution.crystallisation",
        ours=(f"expected answer: median crystallisation {est:.2f} of depth [{lo:.2f}, {hi:.2f}] over {n_prompts} "
              f"prompt(s) where it is top-1 ({len(records)} prompt×seed); {decision}"),
        verdict=decide(within_band(lo, hi, band), control, null_meets_paper=bool(init_in)),
        why=(f"criterion: median depth fraction of the expected answer's crystallisation within "
             f"{band[0]:.2f}–{band[1]:.2f}; 95% bootstrap over prompts, {len(seeds)} seed(s)"
             + ("; the model at initialisation lands in the band too" if init_in else "")
             + (f"; baselines (expected answer): {baselines}" if baselines else "")),
        scale=scale, checkpoint=checkpoint, control=control,
    )]
