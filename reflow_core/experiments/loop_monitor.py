"""Does a hidden-state cosine flag generation loops? (the forum thread's follow-up; chapter ``09_thread_followups``)

Generate, label each generation with an objective loop criterion (:func:`reflow_core.monitor.loop_onset`), and score
the streaming :class:`~reflow_core.monitor.CoherenceMonitor` at several layers against a text-only baseline
(:class:`~reflow_core.monitor.NgramMonitor`) — precision, recall, and lead time (loop onset − firing step; positive =
the warning came before the loop started).
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
from reflow_core.scorecard import NOT_REPRODUCED, NOT_TESTABLE, REPRODUCED, Row


@dataclass
class MonitorEval:
    layers: list[int]
    texts: list[str]
    settings: list[str]  # "greedy" / "T=…" per generation
    onset: np.ndarray  # (N,) loop onset (generated-token index), −1 = no loop
    fire: dict  # name -> (N,) firing step, −1 = never; names "L{l} state", "L{l} step", "n-gram"
    trajectories: dict = field(default_factory=dict)  # name -> (N, steps) similarity trajectories
    threshold: float = 0.95
    patience: int = 3
    window: int = 16

    @property
    def looped(self) -> np.ndarray:
        return self.onset >= 0

    def scores(self, name: str) -> dict:
        f, y = self.fire[name] >= 0, self.looped
        tp = int((f & y).sum())
        lead = (self.onset - self.fire[name])[f & y]
        return {
            "detector": name, "fired": int(f.sum()), "loops": int(y.sum()), "generations": int(y.size),
            "precision": tp / f.sum() if f.sum() else float("nan"),
            "recall": tp / y.sum() if y.sum() else float("nan"),
            "median lead (tokens)": float(np.median(lead)) if lead.size else float("nan"),
            "share fired before onset": float((lead > 0).mean()) if lead.size else float("nan"),
        }

    def table(self):
        import pandas as pd

        return pd.DataFrame([self.scores(n) for n in self.fire])


def evaluate_monitor(model, prompts: list[str], layers: list[int], *, max_new_tokens: int = 64,
                     temperatures=(0.0, 1.0), seeds=(0, 1), top_k: int | None = 50, window: int = 16,
                     threshold: float = 0.95, patience: int = 3, ngram: int = 4, max_period: int = 8,
                     min_tokens: int = 12) -> MonitorEval:
    """Generate from every prompt (greedy once, each other temperature once per seed), with a ``state`` and a
    ``step`` monitor at each of ``layers``, label loops with :func:`loop_onset`, and collect firing steps."""
    names = [f"L{l} {s}" for l in layers for s in SIGNALS] + ["n-gram"]
    fire = {n: [] for n in names}
    traj = {n: [] for n in names if n != "n-gram"}
    onset, texts, settings = [], [], []
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
                fire["n-gram"].append(NgramMonitor(ngram).fire_step(gen))
                onset.append(loop_onset(gen, max_period=max_period, min_tokens=min_tokens))
                texts.append(prompt + tokenizer.decode(gen))
                settings.append("greedy" if T == 0 else f"T={T:g}")
    return MonitorEval(layers=list(layers), texts=texts, settings=settings, onset=np.array(onset),
                       fire={n: np.array(v) for n, v in fire.items()},
                       trajectories={n: np.stack(v) for n, v in traj.items()}, threshold=threshold,
                       patience=patience, window=window)


@contextmanager
def _attach_all(model, monitors: list[CoherenceMonitor]):
    with ExitStack() as stack:
        for m in monitors:
            stack.enter_context(m.attach(model))
        yield


def plot_monitor(ev: MonitorEval, layer: int | None = None):
    """Left: similarity trajectories (state and step cosine) of looping vs non-looping generations at one layer,
    aligned on the loop onset.  Right: precision and recall of each detector."""
    import matplotlib.pyplot as plt

    layer = ev.layers[-1] if layer is None else layer
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for which, ls in (("state", "-"), ("step", "--")):
        tr = ev.trajectories[f"L{layer} {which}"]
        for looped, colour in ((True, "#c44e52"), (False, "#4c72b0")):
            rows = tr[ev.looped == looped]
            if len(rows):
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # steps where every row is nan (no history yet)
                    mean = np.nanmean(rows, 0)
                a1.plot(mean, ls, color=colour,
                        label=f"{which} cos, {'looping' if looped else 'no loop'} (n={len(rows)})")
    if ev.looped.any():
        a1.axvline(np.median(ev.onset[ev.looped]), color="0.4", ls=":", lw=1, label="median loop onset")
    a1.axhline(0.95, color="k", lw=0.8, ls=":")
    a1.set_xlabel("generated token"); a1.set_ylabel(f"max cos over window (layer {layer})")
    a1.legend(fontsize=7)
    t = ev.table()
    x = np.arange(len(t))
    a2.bar(x - 0.2, t["precision"].fillna(0), 0.4, label="precision", color="#4c72b0")
    a2.bar(x + 0.2, t["recall"].fillna(0), 0.4, label="recall", color="#dd8452")
    a2.set_xticks(x, t["detector"], rotation=45, ha="right", fontsize=8)
    a2.set_ylim(0, 1.05); a2.legend(fontsize=8)
    fig.suptitle("Hidden-state loop monitor vs a text-only n-gram rule", fontsize=11)
    fig.tight_layout()
    return fig


def scorecard_rows(ev: MonitorEval, scale: str, checkpoint: str) -> list[Row]:
    deep = ev.layers[-1]
    s, b = ev.scores(f"L{deep} state"), ev.scores("n-gram")
    ours = (f"state cos > {ev.threshold:g} at layer {deep}: precision {s['precision']:.2f}, recall "
            f"{s['recall']:.2f}, median lead {s['median lead (tokens)']:g} tokens; n-gram rule: precision {b['precision']:.2f}, recall "
            f"{b['recall']:.2f}, lead {b['median lead (tokens)']:g} ({s['loops']} loops in {s['generations']} "
            "generations)")
    n_loop, n_clean = int(ev.looped.sum()), int((~ev.looped).sum())
    if n_loop < 3 or n_clean < 3:
        verdict, why = NOT_TESTABLE, (f"{n_loop} looping and {n_clean} non-looping generations: too few of one kind "
                                      "to estimate precision and recall")
    else:
        held = s["precision"] >= 0.8 and s["recall"] >= 0.8
        verdict = REPRODUCED if held else NOT_REPRODUCED
        why = (f"reproduced = precision and recall both ≥ 0.8 for the thread's rule (cos > {ev.threshold:g}, "
               f"sustained {ev.patience} steps, window {ev.window}) at the deepest layer monitored; loops labelled "
               "by repeated n-grams")
    return [Row(claim_id="thread.loop_monitor",
                ours=ours,
                verdict=verdict, why=why, scale=scale, checkpoint=checkpoint)]

