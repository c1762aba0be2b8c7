"""Experiment 11 — Concept Inception: the smallest push that makes a concept the model's next token.

For a concept token c, a neutral prompt and a layer l, inject α·v̂_c at layer state l (every position), v̂_c the unit
embedding direction of c (its recipe row through W_basis), and find by bisection the smallest α ∈ [0, α_max] at which
c is the top-1 next token.  Bisection assumes "top-1" is monotone in α; it returns ``inf`` when c is not top-1 even at
α_max (censored).  All (concept, layer) bisections for one prompt run as one batch.

Null: random unit directions, bisected the same way for the same concept — how often does an arbitrary push of any
strength up to α_max make c the top-1?  The seed reports a critical α ≈ 18.4 for its 36-layer, 1024-wide model; α is
in units of the residual stream, so we also state it relative to the median residual norm.

Verdict (:func:`scorecard_rows`): α is an absolute length in the residual stream of the paper's model, whose norm
grows with width, depth and training; the paper gives only the number, not its residual norm or the layer, so no
relative criterion can be derived from it.  The figure is therefore comparable only for the paper's configuration at
the paper's scale, and elsewhere the row is "not testable at this scale" with a control saying why.  At the paper's
scale: the median critical α (bootstrap over the implanted cases) within ±25% of 18.4, the control being that the
concept's own direction implants it beyond random directions (the test can see a concept direction at all), and a row
whose random directions also land in the band is inconclusive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from reflow_core.experiments.common import bootstrap_ci
from reflow_core.scorecard import (FAMILY_ALPHA, MET, MISSED, NOT_TESTABLE, STRADDLES, Control, Row, against, combined,
                                   criterion, decide)
from reflow_core.steering import random_directions
from reflow_core.hooks import encode_prompt, last_logits, layer_hook_name, n_states
from reflow_core.stimuli import load_stimuli, token_ids
from reflow_core.experiments.emotion import median_residual_norm

PAPER_SHAPE = {"n_layer": 36, "d_model": 1024}  # reFlow-1-Big, the model the paper's α was measured on


@torch.no_grad()
def batched_critical_alpha(model, idx: torch.Tensor, layer: int, directions: torch.Tensor, concepts: list[int],
                           alpha_max: float, n_iter: int = 24) -> np.ndarray:
    """Bisection, batched: smallest α making ``concepts[i]`` top-1 when α·directions[i] is added at ``layer``."""
    n = len(concepts)
    dirs = directions / directions.norm(dim=1, keepdim=True)
    target = torch.as_tensor(concepts, device=idx.device)
    batch = idx.expand(n, -1)

    def top1(alpha: torch.Tensor) -> torch.Tensor:
        add = (alpha[:, None] * dirs)[:, None, :]
        with model.hooks.attach({layer_hook_name(model, layer): lambda x: x + add.to(x.dtype)}):
            return last_logits(model, batch).argmax(-1) == target

    lo = torch.zeros(n, device=idx.device)
    hi = torch.full((n,), float(alpha_max), device=idx.device)
    at_zero, at_max = top1(lo), top1(hi)
    for _ in range(n_iter):
        mid = (lo + hi) / 2
        ok = top1(mid)
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    out = hi.clone()
    out[at_zero] = 0.0
    out[~at_max & ~at_zero] = float("inf")
    return out.cpu().numpy()


@dataclass
class InceptionResult:
    concepts: list[str]
    prompts: list[str]
    alpha_max: float
    unit_norm: float
    alpha: np.ndarray  # (L+1, P, C) critical α, concept direction (inf = never top-1 up to α_max)
    null_alpha: np.ndarray  # (L+1, P, C, n_random) the same for random directions

    @property
    def found(self) -> np.ndarray:
        return np.isfinite(self.alpha)

    def median_alpha_per_layer(self) -> np.ndarray:
        a = np.where(self.found, self.alpha, np.nan).reshape(self.alpha.shape[0], -1)
        return np.array([np.nanmedian(r) if np.isfinite(r).any() else np.nan for r in a])

    @property
    def null_found_rate(self) -> float:
        return float(np.isfinite(self.null_alpha).mean())


def concept_inception(model, *, concepts: list[str] | None = None, prompts: list[str] | None = None,
                      n_prompts: int | None = None, alpha_max_rel: float = 8.0, n_random: int = 4, n_iter: int = 20,
                      seed: int = 0) -> InceptionResult:
    """Experiment 11 at every layer state, for every (prompt, concept), with the random-direction null.

    Cost: (L+1) × prompts × 2 bisections of ``n_iter + 2`` batched forward passes; ``n_prompts`` keeps the first few
    prompts of the data file.
    """
    stim = load_stimuli("concepts")
    concepts = stim["concepts"] if concepts is None else concepts
    prompts = stim["prompts"] if prompts is None else prompts
    prompts = prompts[:n_prompts] if n_prompts else prompts
    ids = token_ids(concepts, vocab=model.vocab)[0]
    unit = median_residual_norm(model, prompts)
    alpha_max = alpha_max_rel * unit
    with torch.no_grad():
        dirs = model.vocab.embed(torch.as_tensor(ids, device=model.device))  # the concepts' embedding rows
    g = torch.Generator().manual_seed(seed)
    rand = random_directions(n_random * len(ids), model.config.d_model, g, model.device)
    rand_ids = [i for i in ids for _ in range(n_random)]
    L1, P, C = n_states(model), len(prompts), len(ids)
    alpha = np.zeros((L1, P, C))
    null = np.zeros((L1, P, C, n_random))
    for p, prompt in enumerate(prompts):
        idx = encode_prompt(model, prompt)
        for layer in range(L1):
            alpha[layer, p] = batched_critical_alpha(model, idx, layer, dirs, ids, alpha_max, n_iter)
            null[layer, p] = batched_critical_alpha(model, idx, layer, rand, rand_ids, alpha_max, n_iter).reshape(C, n_random)
    return InceptionResult(concepts=concepts, prompts=prompts, alpha_max=alpha_max, unit_norm=unit, alpha=alpha,
                           null_alpha=null)


def layer_table(result: InceptionResult):
    """Per layer: median critical α, and the share of prompt × concept pairs made top-1 by the concept's direction
    and by random directions."""
    import pandas as pd

    med = result.median_alpha_per_layer()
    null_found = np.isfinite(result.null_alpha).reshape(len(med), -1)
    return pd.DataFrame({"layer": range(len(med)), "median critical α": np.round(med, 3),
                         "share made top-1": result.found.reshape(len(med), -1).mean(1).round(2),
                         "random directions: share": null_found.mean(1).round(2)})


def plot_inception(result: InceptionResult):
    """Critical α per injection layer (median over prompts × concepts, dots: each pair) and the null's hit rate."""
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    L1 = result.alpha.shape[0]
    for l in range(L1):
        a = result.alpha[l].ravel()
        a = a[np.isfinite(a)]
        a1.scatter(np.full(len(a), l) + np.random.default_rng(l).uniform(-0.2, 0.2, len(a)), a, s=8, alpha=0.4,
                   color="#4c72b0")
    a1.plot(range(L1), result.median_alpha_per_layer(), "o-", color="k", label="median (found)")
    a1.axhline(result.unit_norm, color="0.5", ls=":", label="median |h|")
    a1.set_xlabel("injection layer"); a1.set_ylabel("critical α"); a1.legend(fontsize=8)
    a2.plot(range(L1), result.found.reshape(L1, -1).mean(1), "o-", color="#4c72b0", label="concept direction")
    a2.plot(range(L1), np.isfinite(result.null_alpha).reshape(L1, -1).mean(1), "s--", color="0.4",
            label="random directions (null)")
    a2.set_ylim(-0.05, 1.05)
    a2.set_xlabel("injection layer"); a2.set_ylabel(f"share made top-1 within α ≤ {result.alpha_max:.3g}")
    a2.legend(fontsize=8)
    fig.suptitle("Concept inception: bisection for the smallest injection that wins", fontsize=11)
    fig.tight_layout()
    return fig


def paper_band() -> tuple[float, float]:
    """The ±tolerance band around the paper's α (``inception.alpha`` in ``assets/claims.json``)."""
    crit = criterion("inception.alpha")
    return crit["threshold"] * (1 - crit["relative_band"]), crit["threshold"] * (1 + crit["relative_band"])


def comparable_control(scale: str, n_layer: int, d_model: int, unit_norm: float) -> Control:
    """Is α, a length in the residual stream, comparable with the paper's at all?  Only for the paper's configuration
    at the paper's scale (module docstring)."""
    ok = scale == "paper" and n_layer == PAPER_SHAPE["n_layer"] and d_model == PAPER_SHAPE["d_model"]
    return Control(
        "α comparable: the paper's configuration at the paper's scale", ok,
        f"this model: {n_layer} layers × {d_model} wide at scale {scale!r}, median ‖h‖ {unit_norm:.3g}; the paper's "
        f"α ≈ {criterion('inception.alpha')['threshold']:g} is in the residual units of its "
        f"{PAPER_SHAPE['n_layer']}-layer, {PAPER_SHAPE['d_model']}-wide model, whose residual norm it does not publish, "
        "so no rescaling to another model is justified")


def implant_control(result: InceptionResult) -> Control:
    """The test can see a concept direction: it implants the concept more often than random directions of the same
    norm do (one-sided Fisher exact test at α)."""
    from scipy.stats import fisher_exact

    k, n = int(result.found.sum()), int(result.found.size)
    k0, n0 = int(np.isfinite(result.null_alpha).sum()), int(result.null_alpha.size)
    p = float(fisher_exact([[k, n - k], [k0, n0 - k0]], alternative="greater")[1])
    return Control("concept direction implants beyond random directions", p < FAMILY_ALPHA,
                   f"{100 * k / n:.0f}% of cases vs random {100 * k0 / n0:.0f}%, Fisher p={p:.2g}", value=p,
                   threshold=FAMILY_ALPHA)


def within_outcome(lo: float, hi: float, band: tuple[float, float]) -> str:
    """An interval against a band: met when wholly inside, missed when wholly outside, else straddles."""
    sides = {against(lo, hi, band[0], ">="), against(lo, hi, band[1], "<=")}
    return MISSED if MISSED in sides else STRADDLES if STRADDLES in sides else MET


def scorecard_rows(result: InceptionResult, scale: str, checkpoint: str, control: Control, *, n_layer: int,
                   d_model: int) -> list[Row]:
    """inception.alpha: "not testable" unless the model is the paper's configuration at the paper's scale (module
    docstring); ``control`` is the claim's competence gate from :mod:`reflow_core.experiments.controls`."""
    med = result.median_alpha_per_layer()
    best = int(np.nanargmin(med)) if np.isfinite(med).any() else 0
    found = float(result.found.mean())
    alphas = result.alpha[result.found]
    overall = float(np.median(alphas)) if alphas.size else float("nan")
    if alphas.size:
        ours = (f"median α* {overall:.3g} ({overall / result.unit_norm:.2g}× median ‖h‖); lowest at layer {best} "
                f"({med[best]:.3g}); concept made top-1 in {100 * found:.0f}% of cases vs "
                f"{100 * result.null_found_rate:.0f}% for random directions")
    else:
        ours = (f"no concept made top-1 within α ≤ {result.alpha_max:.3g} "
                f"({result.alpha_max / result.unit_norm:.2g}× median ‖h‖); random directions: "
                f"{100 * result.null_found_rate:.0f}%")
    comparable = comparable_control(scale, n_layer, d_model, result.unit_norm)
    band = paper_band()
    if not comparable.passed:
        control = combined(f"{comparable.name} + {control.name}", [comparable, control])
        return [Row(claim_id="inception.alpha", ours=ours, verdict=NOT_TESTABLE,
                    why=(f"α is a length in the residual stream: the paper's {band[0]:.3g}–{band[1]:.3g} band applies "
                         f"to its own {PAPER_SHAPE['n_layer']}×{PAPER_SHAPE['d_model']} model only, and the paper gives "
                         "no residual norm to rescale it by; the concept direction against random directions is "
                         "reported instead"),
                    scale=scale, checkpoint=checkpoint, control=control)]
    control = combined(f"{control.name} + concept direction implants", [control, implant_control(result)])
    if alphas.size >= 2:
        _, lo, hi = bootstrap_ci(alphas, np.median)
    else:
        lo = hi = overall
    outcome = within_outcome(lo, hi, band) if np.isfinite(overall) else MISSED
    null = result.null_alpha[np.isfinite(result.null_alpha)]
    null_med = float(np.median(null)) if null.size else float("nan")
    null_meets = result.null_found_rate >= 0.5 and band[0] <= null_med <= band[1]
    return [Row(claim_id="inception.alpha", ours=ours + (f"; 95% CI [{lo:.3g}, {hi:.3g}]" if alphas.size >= 2 else ""),
                verdict=decide(outcome, control, null_meets_paper=null_meets),
                why=(f"criterion: median critical α within {band[0]:.3g}–{band[1]:.3g} (bootstrap over implanted cases); "
                     f"random directions: {100 * result.null_found_rate:.0f}% implanted, median α {null_med:.3g}"
                     + (" — the null lands in the band too" if null_meets else "")),
                scale=scale, checkpoint=checkpoint, control=control)]
