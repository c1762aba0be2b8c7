"""Thread follow-up — the crystallisation boundary ("point of no return") under context complexity.

The forum thread claims that the last layer at which an injected intervention still overrides the native prediction
sits near L18 of a deep model for short, direct contexts and moves to about L28 when the context has long clauses.
We test it with paired prompts (``assets/prompts/boundary_pairs.json``): each pair has the same single-token answer
after a short direct context and after a long-clause / long-range one, and names an *alternative* single-token answer.

For every prompt and every layer state l = 0 … L we add α·v̂ at layer state l (all positions; the Concept Inception
injection of :mod:`reflow_core.steering`), v̂ the unit embedding direction of the alternative, and record whether the
next-token top-1 becomes the alternative (**flip**).  α is **fixed** for the whole experiment and calibrated once:
the median over all prompts of the smallest α that flips at layer 0 (bisection of
:func:`reflow_core.experiments.inception.batched_critical_alpha`), times ``margin``.  The **boundary** of a prompt is
the last layer state at which it still flips (undefined when it never flips, or when the model already predicts the
alternative without injection); we report it per prompt, as a fraction of depth (l / L), its distribution per set and
— the prompts being paired, the short and the long context of the same question — the paired shift (long − short)
with a two-sided Wilcoxon signed-rank test over the pairs where both boundaries are defined.

Verdict (:func:`scorecard_rows`, criterion ``thread.boundary_shift`` in ``assets/claims.json``): a shift above 0 with
Wilcoxon p < α is met; a bootstrap interval of the mean shift at or below 0 is missed; anything else straddles.  The
positive control: the model's expected answer is its top-1 for factual prompts (a boundary of the native answer
exists), the injection flips the answer at some layer for enough pairs in both contexts (the calibration works), and
the thread's shift spans at least two layers at this depth (a per-layer scan can resolve it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files

import numpy as np
import torch

from reflow_core.experiments.common import bootstrap_ci
from reflow_core.experiments.emotion import median_residual_norm
from reflow_core.experiments.inception import batched_critical_alpha
from reflow_core.scorecard import MET, MISSED, STRADDLES, Control, Row, combined, criterion, decide
from reflow_core.steering import concept_direction
from reflow_core.hooks import encode_prompt, injected, last_logits, n_states
from reflow_core.stimuli import NOT_IN_VOCABULARY, token_ids

SETS = ("short", "long")
PAPER_DEPTH = 36
PAPER_SHORT, PAPER_LONG = 18, 28
# The shift is testable only if the paper's shift, scaled to this depth, spans at least this many layers
# (the boundary is measured in whole layers).
MIN_RESOLVABLE_SHIFT = 2.0


@lru_cache(maxsize=None)
def _read_pairs() -> str:
    return files("reflow_core").joinpath("assets/prompts/boundary_pairs.json").read_text()


def boundary_pairs() -> list[dict]:
    """The paired prompts, each answer and alternative checked to be one GPT-2 token (raises otherwise)."""
    items = json.loads(_read_pairs())["items"]
    token_ids([it["answer"] for it in items] + [it["alternative"] for it in items])
    return items


def boundary_layer(flips) -> float:
    """Last layer index at which ``flips`` is true; nan when it never is."""
    f = np.flatnonzero(np.asarray(flips, dtype=bool))
    return float(f[-1]) if f.size else float("nan")


@dataclass
class BoundaryResult:
    items: list[dict]
    n_layer: int
    alpha: float  # the fixed injection strength
    unit_norm: float  # median ‖h‖, the unit of α
    alpha0: dict  # set -> per-prompt critical α at layer 0 (inf: never within alpha_max)
    flips: dict  # set -> (P, L+1) bool
    native_alt: dict  # set -> (P,) bool: the model already predicts the alternative (excluded)
    native_answer: dict  # set -> (P,) bool: the model's own top-1 is the expected answer
    alpha_max_rel: float = 16.0  # the calibration searched α up to this × unit_norm
    boundary: dict = field(default_factory=dict)  # set -> (P,) float, nan = undefined
    dropped: list = field(default_factory=list)  # pairs left out: answer or alternative without a row of its own

    def __post_init__(self) -> None:
        if not self.boundary:
            self.boundary = {
                s: np.array([float("nan") if self.native_alt[s][p] else boundary_layer(self.flips[s][p])
                             for p in range(len(self.items))]) for s in SETS}

    @property
    def n_calibrated(self) -> int:
        """Prompts (both sets) that some α ≤ alpha_max flips at layer 0: the ones the calibration used."""
        return int(sum((np.isfinite(self.alpha0[s]) & ~self.native_alt[s]).sum() for s in SETS))

    def fraction(self, s: str) -> np.ndarray:
        return self.boundary[s] / self.n_layer

    def defined(self, s: str) -> np.ndarray:
        b = self.boundary[s]
        return b[np.isfinite(b)]

    def median(self, s: str) -> float:
        b = self.defined(s)
        return float(np.median(b)) if b.size else float("nan")

    def flip_rate(self, s: str) -> np.ndarray:
        """Share of (non-excluded) prompts flipped at each layer state."""
        keep = ~self.native_alt[s]
        return self.flips[s][keep].mean(0) if keep.any() else np.full(self.n_layer + 1, np.nan)

    def shifts(self) -> np.ndarray:
        """long − short boundary of each pair where both are defined."""
        d = self.boundary["long"] - self.boundary["short"]
        return d[np.isfinite(d)]

    @property
    def n_pairs_defined(self) -> int:
        return int(self.shifts().size)

    def wilcoxon(self) -> tuple[float, float]:
        """(W, two-sided p) of the Wilcoxon signed-rank test of the paired shifts; p = 1 when every shift is 0, nan
        with fewer than two pairs."""
        from scipy.stats import wilcoxon

        d = self.shifts()
        if d.size < 2:
            return float("nan"), float("nan")
        if not np.any(d):  # all ties at zero: no evidence of a shift
            return 0.0, 1.0
        r = wilcoxon(d, alternative="two-sided")
        return float(r.statistic), float(r.pvalue)

    def paired_shift(self) -> float:
        """Median of long − short boundary over the pairs where both are defined."""
        d = self.shifts()
        return float(np.median(d)) if d.size else float("nan")

    def shift_interval(self) -> tuple[float, float, float]:
        """(mean, lo, hi) of the paired shift, bootstrap over pairs (nan without pairs)."""
        d = self.shifts()
        if not d.size:
            return float("nan"), float("nan"), float("nan")
        if d.size < 2:
            return float(d[0]), float(d[0]), float(d[0])
        return bootstrap_ci(d)

    def table(self):
        import pandas as pd

        rows = []
        for p, it in enumerate(self.items):
            rows.append({"set": it.get("set", ""), "answer": it["answer"], "alternative": it["alternative"],
                         **{f"boundary ({s})": self.boundary[s][p] for s in SETS},
                         **{f"α*₀ ({s})": self.alpha0[s][p] for s in SETS}})
        return pd.DataFrame(rows)

    def summary(self):
        import pandas as pd

        _, p = self.wilcoxon()
        return pd.DataFrame([{
            "set": s, "prompts": len(self.items), "defined": int(self.defined(s).size),
            "excluded (native = alternative)": int(self.native_alt[s].sum()),
            "median boundary": self.median(s), "median fraction of depth": self.median(s) / self.n_layer,
            "native top-1 = answer": float(self.native_answer[s].mean()),
        } for s in SETS]).assign(**{"pairs defined in both": self.n_pairs_defined, "Wilcoxon p (paired)": p})


@torch.no_grad()
def crystallisation_boundary(model, items: list[dict] | None = None, *, alpha: float | None = None,
                             margin: float = 1.5, alpha_max_rel: float = 16.0, n_iter: int = 16,
                             positions=None) -> BoundaryResult:
    """Flip / no-flip at every layer state for every prompt of both sets, at one fixed α (see module docstring).

    ``alpha`` overrides the calibration; otherwise α = ``margin`` × median over prompts of the layer-0 critical α
    (searched up to ``alpha_max_rel`` × median ‖h‖).  Cost: 2·P bisections of ``n_iter + 2`` forwards at layer 0 and
    2·P·(L+1) single forwards.
    """
    items = boundary_pairs() if items is None else items
    # a compact vocabulary steers and reads only words with a row of their own: a pair whose answer or alternative
    # has none is left out and reported, never silently mapped onto the shared tail row
    own = model.vocab.has_own_row(token_ids([w for it in items for w in (it["answer"], it["alternative"])])[0])
    dropped = [it for i, it in enumerate(items) if not (own[2 * i] and own[2 * i + 1])]
    items = [it for it in items if it not in dropped]
    L1 = n_states(model)
    ans = token_ids([it["answer"] for it in items])[0]
    alt = token_ids([it["alternative"] for it in items])[0]
    prompts = {s: [it[s] for it in items] for s in SETS}
    unit = median_residual_norm(model, prompts["short"] + prompts["long"])
    dirs = [concept_direction(model, a) for a in alt]
    alpha0 = {s: np.zeros(len(items)) for s in SETS}
    native_alt = {s: np.zeros(len(items), dtype=bool) for s in SETS}
    native_answer = {s: np.zeros(len(items), dtype=bool) for s in SETS}
    for s in SETS:
        for p, prompt in enumerate(prompts[s]):
            idx = encode_prompt(model, prompt)
            top = int(last_logits(model, idx).argmax(-1))
            native_alt[s][p], native_answer[s][p] = top == alt[p], top == ans[p]
            alpha0[s][p] = batched_critical_alpha(model, idx, 0, dirs[p][None], [alt[p]], alpha_max_rel * unit,
                                                  n_iter)[0]
    if alpha is None:
        a0 = np.concatenate([alpha0[s][~native_alt[s]] for s in SETS])
        a0 = a0[np.isfinite(a0)]
        alpha = float(margin * np.median(a0)) if a0.size else float(alpha_max_rel * unit)
    flips = {s: np.zeros((len(items), L1), dtype=bool) for s in SETS}
    for s in SETS:
        for p, prompt in enumerate(prompts[s]):
            idx = encode_prompt(model, prompt)
            for layer in range(L1):
                with injected(model, dirs[p], layer, alpha, positions):
                    flips[s][p, layer] = int(last_logits(model, idx).argmax(-1)) == alt[p]
    return BoundaryResult(items=items, n_layer=model.config.n_layer, alpha=alpha, unit_norm=unit, alpha0=alpha0,
                          flips=flips, native_alt=native_alt, native_answer=native_answer,
                          alpha_max_rel=alpha_max_rel, dropped=dropped)


def plot_boundary(result: BoundaryResult):
    """Left: share of prompts flipped per injection layer, per set.  Right: boundary (fraction of depth) per prompt,
    short vs long, pairs joined."""
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    colours = {"short": "#4c72b0", "long": "#dd8452"}
    L1 = result.n_layer + 1
    for s in SETS:
        a1.plot(range(L1), result.flip_rate(s), "o-", color=colours[s], label=f"{s} contexts")
    a1.set_ylim(-0.05, 1.05)
    a1.set_xlabel("injection layer state l"); a1.set_ylabel("share of prompts flipped")
    a1.set_title(f"fixed α = {result.alpha:.3g} ({result.alpha / result.unit_norm:.2g}× median ‖h‖)", fontsize=10)
    a1.legend(fontsize=8)
    fs, fl = result.fraction("short"), result.fraction("long")
    for p in range(len(result.items)):
        if np.isfinite(fs[p]) and np.isfinite(fl[p]):
            a2.plot([0, 1], [fs[p], fl[p]], color="0.75", lw=0.8, zorder=1)
    rng = np.random.default_rng(0)
    for x, (s, f) in enumerate((("short", fs), ("long", fl))):
        ok = np.isfinite(f)
        a2.scatter(x + rng.uniform(-0.06, 0.06, ok.sum()), f[ok], color=colours[s], s=18, zorder=2)
        if ok.any():
            a2.hlines(np.median(f[ok]), x - 0.2, x + 0.2, color="k", lw=2, zorder=3)
    a2.axhline(PAPER_SHORT / PAPER_DEPTH, color=colours["short"], ls=":", lw=1, label="thread: L18/36")
    a2.axhline(PAPER_LONG / PAPER_DEPTH, color=colours["long"], ls=":", lw=1, label="thread: L28/36")
    a2.set_xticks([0, 1], ["short", "long"]); a2.set_xlim(-0.5, 1.5); a2.set_ylim(-0.05, 1.05)
    a2.set_ylabel("boundary (fraction of depth)"); a2.legend(fontsize=8)
    fig.suptitle("Crystallisation boundary: last layer where a fixed injection still flips the answer", fontsize=11)
    fig.tight_layout()
    return fig


def expected_shift_layers(n_layer: int) -> float:
    """The thread's shift (L18 → L28 of 36) scaled to ``n_layer`` layers."""
    return (PAPER_LONG - PAPER_SHORT) / PAPER_DEPTH * n_layer


def calibration_control(result: BoundaryResult) -> Control:
    """The injection flips the answer at some layer for enough pairs in both contexts (bar ``boundary_calibration``
    in ``assets/controls.json``: fewer than 6 pairs cannot give a two-sided Wilcoxon p below 0.05)."""
    from reflow_core.experiments.controls import settings

    need = int(settings()["boundary_calibration"]["min_pairs"])
    n = result.n_pairs_defined
    return Control("prompts calibrated: the injection flips both contexts of a pair at some layer", n >= need,
                   f"{n} of {len(result.items)} pairs have a boundary in both contexts ({result.n_calibrated} of "
                   f"{2 * len(result.items)} prompts flip at layer 0); bar {need}", value=float(n),
                   threshold=float(need))


def resolution_control(n_layer: int) -> Control:
    """The thread's shift (10 of 36 layers) scaled to this depth spans at least :data:`MIN_RESOLVABLE_SHIFT` layers."""
    shift = expected_shift_layers(n_layer)
    return Control("depth resolves the thread's shift", shift >= MIN_RESOLVABLE_SHIFT,
                   f"10/36 of depth is {shift:.1f} layers in a {n_layer}-layer model (bar {MIN_RESOLVABLE_SHIFT:g})",
                   value=shift, threshold=MIN_RESOLVABLE_SHIFT)


def shift_outcome(result: BoundaryResult) -> tuple[str, float]:
    """(outcome, Wilcoxon p) of the paired shift against ``thread.boundary_shift``'s criterion (module docstring)."""
    crit = criterion("thread.boundary_shift")
    _, p = result.wilcoxon()
    mean, lo, hi = result.shift_interval()
    if not np.isfinite(mean):
        return MISSED, float("nan")
    if np.isfinite(p) and p < crit["alpha"] and result.paired_shift() > crit["threshold"]:
        return MET, p
    if hi <= crit["threshold"]:
        return MISSED, p
    return STRADDLES, p


def scorecard_rows(result: BoundaryResult, scale: str, checkpoint: str, control: Control) -> list[Row]:
    """thread.boundary_shift; ``control`` is the claim's competence gate (the expected answer is the model's top-1),
    combined here with the calibration and depth-resolution controls."""
    L = result.n_layer
    outcome, p = shift_outcome(result)
    mean, lo, hi = result.shift_interval()
    ms, ml = result.median("short"), result.median("long")
    at = f"{L} layers, fixed α {result.alpha / result.unit_norm:.2g}× median ‖h‖"
    if np.isfinite(ms) or np.isfinite(ml):
        ours = (f"median boundary short L{ms:g} ({ms / L:.2f} of depth) vs long L{ml:g} ({ml / L:.2f}); paired shift "
                f"median {result.paired_shift():+g}, mean {mean:+.2g} [{lo:+.2g}, {hi:+.2g}] layers over "
                f"{result.n_pairs_defined} pairs; Wilcoxon p = {p:.3g} ({at})")
    else:
        ours = f"no prompt flips to the alternative at any layer ({at}; {result.n_calibrated} prompts calibrated)"
    control = combined(f"{control.name} + calibration + depth resolution",
                       [control, calibration_control(result), resolution_control(L)])
    crit = criterion("thread.boundary_shift")
    return [Row(claim_id="thread.boundary_shift",
                ours=ours, verdict=decide(outcome, control),
                why=(f"criterion: paired shift long − short above {crit['threshold']:g} with two-sided Wilcoxon "
                     f"signed-rank p < {crit['alpha']} over the pairs; missed when the bootstrap interval of the mean "
                     f"shift lies at or below {crit['threshold']:g}; {len(result.items)} prompt pairs"
                     + (f" ({len(result.dropped)} more left out: answer or alternative {NOT_IN_VOCABULARY})"
                        if result.dropped else "")),
                scale=scale, checkpoint=checkpoint, control=control,
                p_value=p if np.isfinite(p) else None)]
