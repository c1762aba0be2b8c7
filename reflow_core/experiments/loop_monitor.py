"""Does a hidden-state cosine flag generation loops? (the forum thread's follow-up; chapter ``09_thread_followups``)

Generate, and score the streaming :class:`~reflow_core.monitor.CoherenceMonitor` at several layers against a text-only
baseline (:class:`~reflow_core.monitor.NgramMonitor`).  The label must not be what a detector reads: every detector
sees only the first ``visible`` tokens of a generation (a firing after them does not count), and a generation is
labelled **looping** by the objective criterion :func:`reflow_core.monitor.loop_onset` applied to the *held-out* rest
of it.  The question is then whether the signal read on the visible part says that the generation is (and stays) in a
loop — a text-only rule on the visible part is a fair baseline, no longer the label itself.

Generations that loop from their first tokens (onset before ``degenerate_within``: greedy "the the the …" of a weak
model) are **degenerate**: any detector flags them, and they would decide precision and recall alone.  We report
their share and the base rates, and score the detectors on the non-degenerate generations only, with percentile
bootstrap intervals over generations.

Verdict (:func:`scorecard_rows`, criterion ``thread.loop_monitor`` in ``assets/claims.json``): precision and recall of
the thread's rule (state cos > threshold, sustained, at the deepest layer monitored) both at or above the bar, each
judged by its bootstrap interval.  A detector that fires on every generation has precision = the loop base rate and
recall 1: where that base rate meets the bar, the null meets the claim and the row is inconclusive.  Positive control:
the model is beyond unigram level, and there are enough looping and non-looping non-degenerate generations to
estimate both numbers (:func:`sample_control`).
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from reflow_core import tokenizer
from reflow_core.hooks import encode_prompt
from reflow_core.monitor import SIGNALS, CoherenceMonitor, NgramMonitor, loop_onset
from reflow_core.scorecard import MET, MISSED, STRADDLES, Control, Row, against, combined, criterion, decide

DEGENERATE_WITHIN = 4  # a loop starting within the first this many generated tokens makes a generation degenerate


@dataclass
class MonitorEval:
    layers: list[int]
    texts: list[str]
    settings: list[str]  # "greedy" / "T=…" per generation
    visible: int  # generated tokens the detectors see; the rest is held out for the label
    onset: np.ndarray  # (N,) loop onset over the whole generation (generated-token index), −1 = no loop
    heldout_onset: np.ndarray  # (N,) loop onset within the held-out part (index into it), −1 = no loop: the label
    fire: dict  # name -> (N,) first firing step, −1 = never; names "L{l} state", "L{l} step", "n-gram"
    trajectories: dict = field(default_factory=dict)  # name -> (N, steps) similarity trajectories
    threshold: float = 0.95
    patience: int = 3
    window: int = 16
    degenerate_within: int = DEGENERATE_WITHIN

    @property
    def looped(self) -> np.ndarray:
        """The label: the held-out part of the generation loops."""
        return self.heldout_onset >= 0

    @property
    def degenerate(self) -> np.ndarray:
        """Generations that loop from their first tokens."""
        return (self.onset >= 0) & (self.onset < self.degenerate_within)

    def fired(self, name: str) -> np.ndarray:
        """Did ``name`` fire within the visible part?"""
        f = self.fire[name]
        return (f >= 0) & (f < self.visible)

    def base_rates(self) -> dict:
        keep = ~self.degenerate
        return {"generations": int(self.looped.size), "looping": float(self.looped.mean()) if self.looped.size else 0.0,
                "degenerate": float(self.degenerate.mean()) if self.looped.size else 0.0,
                "non-degenerate": int(keep.sum()), "looping (non-degenerate)": int((self.looped & keep).sum()),
                "non-looping (non-degenerate)": int((~self.looped & keep).sum()),
                "loop rate (non-degenerate)": float(self.looped[keep].mean()) if keep.any() else float("nan")}

    def scores(self, name: str, *, n_boot: int = 1000, seed: int = 0) -> dict:
        """Precision and recall of ``name`` on the non-degenerate generations, with 95% bootstrap intervals over
        generations, and its lead time (whole-generation loop onset − firing step) on the true positives."""
        keep = ~self.degenerate
        f, y = self.fired(name)[keep], self.looped[keep]
        lead = (self.onset[keep] - self.fire[name][keep])[f & y & (self.onset[keep] >= 0)]
        prec, rec = _precision(f, y), _recall(f, y)
        rng = np.random.default_rng(seed)
        pb, rb = [], []
        for _ in range(n_boot if y.size >= 2 else 0):
            ix = rng.integers(0, y.size, y.size)
            pb.append(_precision(f[ix], y[ix]))
            rb.append(_recall(f[ix], y[ix]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-nan bootstraps (no fires / no loops at all)
            p_lo, p_hi = (np.nanquantile(pb, [0.025, 0.975]) if pb else (prec, prec))
            r_lo, r_hi = (np.nanquantile(rb, [0.025, 0.975]) if rb else (rec, rec))
        return {
            "detector": name, "fired": int(f.sum()), "loops": int(y.sum()), "generations": int(y.size),
            "precision": prec, "precision lo": float(p_lo), "precision hi": float(p_hi),
            "recall": rec, "recall lo": float(r_lo), "recall hi": float(r_hi),
            "median lead (tokens)": float(np.median(lead)) if lead.size else float("nan"),
            "share fired before onset": float((lead > 0).mean()) if lead.size else float("nan"),
        }

    def table(self):
        import pandas as pd

        return pd.DataFrame([self.scores(n) for n in self.fire])


def _precision(fired: np.ndarray, looped: np.ndarray) -> float:
    return float((fired & looped).sum() / fired.sum()) if fired.sum() else float("nan")


def _recall(fired: np.ndarray, looped: np.ndarray) -> float:
    return float((fired & looped).sum() / looped.sum()) if looped.sum() else float("nan")


def evaluate_monitor(model, prompts: list[str], layers: list[int], *, max_new_tokens: int = 64,
                     visible: int | None = None, temperatures=(0.0, 1.0), seeds=(0, 1), top_k: int | None = 50,
                     window: int = 16, threshold: float = 0.95, patience: int = 3, ngram: int = 4,
                     max_period: int = 8, min_tokens: int = 12,
                     degenerate_within: int = DEGENERATE_WITHIN) -> MonitorEval:
    """Generate from every prompt (greedy once, each other temperature once per seed), with a ``state`` and a
    ``step`` monitor at each of ``layers``; the detectors' window is the first ``visible`` generated tokens (default:
    half), the label :func:`loop_onset` of the rest (module docstring)."""
    visible = max_new_tokens // 2 if visible is None else int(visible)
    names = [f"L{l} {s}" for l in layers for s in SIGNALS] + ["n-gram"]
    fire = {n: [] for n in names}
    traj = {n: [] for n in names if n != "n-gram"}
    onset, held, texts, settings = [], [], [], []
    for prompt in prompts:
        idx = encode_prompt(model, prompt)
        n0 = idx.shape[1]
        for T in temperatures:
            for seed in (seeds[:1] if T == 0 else seeds):
                mons = {f"L{l} {s}": CoherenceMonitor(l, window=window, threshold=threshold, patience=patience,
                                                      signal=s) for l in layers for s in SIGNALS}
                g = torch.Generator(device=model.device).manual_seed(int(seed))
                with _attach_all(model, list(mons.values())):
                    out = model.generate(idx, max_new_tokens, temperature=T, top_k=top_k if T else None, generator=g)
                gen = out[0, n0:].tolist()
                for n, m in mons.items():
                    fire[n].append(int(m.fire_step[0]))
                    traj[n].append(m.trajectory()[:, 0])
                fire["n-gram"].append(NgramMonitor(ngram).fire_step(gen[:visible]))
                onset.append(loop_onset(gen, max_period=max_period, min_tokens=min_tokens))
                held.append(loop_onset(gen[visible:], max_period=max_period, min_tokens=min_tokens))
                texts.append(prompt + tokenizer.decode(gen[:visible]) + " ‖ " + tokenizer.decode(gen[visible:]))
                settings.append("greedy" if T == 0 else f"T={T:g}")
    return MonitorEval(layers=list(layers), texts=texts, settings=settings, visible=visible, onset=np.array(onset),
                       heldout_onset=np.array(held), fire={n: np.array(v) for n, v in fire.items()},
                       trajectories={n: np.stack(v) for n, v in traj.items()}, threshold=threshold,
                       patience=patience, window=window, degenerate_within=degenerate_within)


@contextmanager
def _attach_all(model, monitors: list[CoherenceMonitor]):
    with ExitStack() as stack:
        for m in monitors:
            stack.enter_context(m.attach(model))
        yield


def plot_monitor(ev: MonitorEval, layer: int | None = None):
    """Left: similarity trajectories (state and step cosine) at one layer of the non-degenerate generations whose
    held-out part loops or not, with the end of the visible part.  Right: precision and recall of each detector on the
    non-degenerate generations, with bootstrap intervals."""
    import matplotlib.pyplot as plt

    layer = ev.layers[-1] if layer is None else layer
    keep = ~ev.degenerate
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for which, ls in (("state", "-"), ("step", "--")):
        tr = ev.trajectories[f"L{layer} {which}"]
        for looped, colour in ((True, "#c44e52"), (False, "#4c72b0")):
            rows = tr[keep & (ev.looped == looped)]
            if len(rows):
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # steps where every row is nan (no history yet)
                    mean = np.nanmean(rows, 0)
                a1.plot(mean, ls, color=colour,
                        label=f"{which} cos, {'loops later' if looped else 'no loop later'} (n={len(rows)})")
    a1.axvline(ev.visible - 0.5, color="0.4", ls=":", lw=1, label="end of the visible part")
    a1.axhline(ev.threshold, color="k", lw=0.8, ls=":")
    a1.set_xlabel("generated token"); a1.set_ylabel(f"max cos over window (layer {layer})")
    a1.legend(fontsize=7)
    t = ev.table()
    x = np.arange(len(t))
    for off, what, colour in ((-0.2, "precision", "#4c72b0"), (0.2, "recall", "#dd8452")):
        v = t[what].fillna(0).to_numpy()
        err = np.stack([v - t[f"{what} lo"].fillna(0).to_numpy(), t[f"{what} hi"].fillna(0).to_numpy() - v])
        a2.bar(x + off, v, 0.4, yerr=np.clip(err, 0, None), capsize=2, label=what, color=colour)
    a2.axhline(criterion("thread.loop_monitor")["threshold"], color="k", lw=0.8, ls=":")
    a2.set_xticks(x, t["detector"], rotation=45, ha="right", fontsize=8)
    a2.set_ylim(0, 1.05); a2.legend(fontsize=8)
    fig.suptitle("Hidden-state loop monitor vs a text-only n-gram rule (non-degenerate generations)", fontsize=11)
    fig.tight_layout()
    return fig


def sample_control(ev: MonitorEval) -> Control:
    """Enough looping and non-looping non-degenerate generations to estimate precision and recall (bar in
    ``assets/controls.json``)."""
    from reflow_core.experiments.controls import settings

    need = int(settings()["loop_monitor_sample"]["min_each"])
    b = ev.base_rates()
    n_loop, n_clean = b["looping (non-degenerate)"], b["non-looping (non-degenerate)"]
    return Control("enough looping and non-looping non-degenerate generations", min(n_loop, n_clean) >= need,
                   f"{n_loop} looping and {n_clean} non-looping of {b['non-degenerate']} non-degenerate generations "
                   f"({b['generations']} in all, {100 * b['degenerate']:.0f}% degenerate); bar {need} of each",
                   value=float(min(n_loop, n_clean)), threshold=float(need))


def monitor_outcome(s: dict, bar: float) -> str:
    """Precision and recall (their bootstrap intervals) against the bar: both met → met, either missed → missed; an
    undefined number (no firing, no loop) counts as missed."""
    outs = []
    for what in ("precision", "recall"):
        if not np.isfinite(s[what]):
            outs.append(MISSED)
            continue
        lo, hi = s[f"{what} lo"], s[f"{what} hi"]
        lo, hi = (s[what], s[what]) if not (np.isfinite(lo) and np.isfinite(hi)) else (lo, hi)
        outs.append(against(lo, hi, bar, ">="))
    return MISSED if MISSED in outs else STRADDLES if STRADDLES in outs else MET


def scorecard_rows(ev: MonitorEval, scale: str, checkpoint: str, control: Control) -> list[Row]:
    """thread.loop_monitor (module docstring); ``control`` is the claim's competence gate, combined here with
    :func:`sample_control`."""
    bar = criterion("thread.loop_monitor")["threshold"]
    deep = ev.layers[-1]
    s, b = ev.scores(f"L{deep} state"), ev.scores("n-gram")
    rates = ev.base_rates()
    base = rates["loop rate (non-degenerate)"]

    def pr(x: dict) -> str:
        return (f"precision {x['precision']:.2f} [{x['precision lo']:.2f}, {x['precision hi']:.2f}], recall "
                f"{x['recall']:.2f} [{x['recall lo']:.2f}, {x['recall hi']:.2f}]")

    ours = (f"state cos > {ev.threshold:g} at layer {deep} on the first {ev.visible} tokens: {pr(s)}; n-gram rule: "
            f"{pr(b)}; {s['loops']} of {s['generations']} non-degenerate generations loop in the held-out part "
            f"(base rate {base:.2f}); {100 * rates['degenerate']:.0f}% of all {rates['generations']} generations "
            "degenerate from the first tokens (left out)")
    control = combined(f"{control.name} + generation sample", [control, sample_control(ev)])
    null_meets = bool(np.isfinite(base) and base >= bar)
    return [Row(claim_id="thread.loop_monitor", ours=ours,
                verdict=decide(monitor_outcome(s, bar), control, null_meets_paper=null_meets),
                why=(f"criterion: precision and recall both ≥ {bar} (bootstrap over generations) for the thread's rule "
                     f"(cos > {ev.threshold:g}, sustained {ev.patience} steps, window {ev.window}) read on the first "
                     f"{ev.visible} generated tokens; loops labelled on the held-out rest"
                     + (f"; firing on every generation would give precision {base:.2f} and recall 1: the null meets "
                        "the claim" if null_meets else "")),
                scale=scale, checkpoint=checkpoint, control=control)]
