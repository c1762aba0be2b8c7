"""Experiment 6 — Typo Resilience: does a misspelt word look like the word it misspells?

Pairs of (correct, misspelt) words come from ``assets/words/typos.json``. A misspelling usually splits into several
GPT-2 tokens (" goverment" → " gover" "ment"), so no single recipe row stands for it. We handle that explicitly:

* **recipe similarity** — cosine between the mean recipe rows of the two words' tokens (embedding rows for a tied model);
* **read-out similarity** — each word is placed at the end of short context templates ("I wrote about the{w}") and we
  read the last token of the word at the final layer: the signal read-out s_L = RMSNorm(h_L)·W_basisᵀ for reFlow,
  RMSNorm(h_L) for a tied model (which has no signals). By then the model has seen all of the word's tokens. The
  read-outs are centred per template (the mean over all words is subtracted) so that the part every word shares in
  a context does not make all pairs look alike;
* **next-token agreement** — whether the two next-token distributions after the word share their top-1 token, and the
  overlap of their top-10 sets.

Null: the same measures for **random pairs** — each correct word set against the misspelling of a different word
(shuffled pairings, many draws). Resilience means matched pairs are closer than random ones; the effect size is the
matched mean minus the null mean, with a permutation p-value. GPT-2-New and reFlow at initialisation are baselines.

The verdict (:func:`scorecard_rows`) follows the scorecard's rule: the registered criterion (``typo.resilience``:
read-out effect ≥ 0 beyond the shuffled-pair null at α) on every seed; a "not reproduced" only where the positive
control — misspellings read like their words in some model at this scale — passed; inconclusive where reFlow at
initialisation meets the criterion too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from reflow_core import tokenizer
from reflow_core.stimuli import load_words
from reflow_core.experiments.common import permutation_p, seed_interval, unit_rows, vocab_rows
from reflow_core.scorecard import MET, MISSED, STRADDLES, Control, Row, criterion, decide

MEASURES = ("recipe", "readout", "top1", "top10")
TOP_N = 10


def typo_pairs() -> tuple[list[tuple[str, str]], list[str]]:
    data = load_words("typos")
    return [tuple(p) for p in data["pairs"]], list(data["templates"])


@dataclass
class WordFeatures:
    recipe: torch.Tensor  # (n, D) mean vocabulary row over the word's tokens
    readout: torch.Tensor  # (n, T, D') last-token read-out per template
    top: torch.Tensor  # (n, T, TOP_N) next-token top ids per template
    n_tokens: list[int]


@torch.no_grad()
def word_features(model, words: list[str], templates: list[str]) -> WordFeatures:
    """Recipe mean, last-token read-out and next-token top ids of each word in each template (one batched pass)."""
    rows = vocab_rows(model)
    V = model.config.real_vocab_size
    word_ids = [tokenizer.encode(w) for w in words]
    prefixes = [tokenizer.encode(tpl.split("{w}")[0]) for tpl in templates]
    # the word's own tokens after the prefix, whatever BPE would do across the boundary
    seqs = [(p + ids)[-model.config.block_size:] for ids in word_ids for p in prefixes]
    T = max(len(q) for q in seqs)
    idx = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, q in enumerate(seqs):
        idx[b, :len(q)] = torch.tensor(q)  # right padding: causal attention never lets it reach the word
    last = torch.tensor([len(q) - 1 for q in seqs])
    h = model.residual(idx.to(model.device))[torch.arange(len(seqs)), last.to(model.device)]
    read = model.signal_readout(h) if model.is_factored else model.norm_final(h)
    top = model.lens_logits(h)[:, :V].topk(TOP_N, dim=-1).indices
    n, t = len(words), len(templates)
    recipe = torch.stack([rows[ids].mean(0) for ids in word_ids])
    return WordFeatures(recipe, read.float().cpu().view(n, t, -1), top.cpu().view(n, t, TOP_N),
                        [len(ids) for ids in word_ids])


def pair_scores(fc: WordFeatures, ft: WordFeatures, perm: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-pair measures between correct word i and misspelling perm[i] (identity: the matched pairs)."""
    n = fc.recipe.shape[0]
    j = torch.as_tensor(np.arange(n) if perm is None else perm)
    rec = (unit_rows(fc.recipe) * unit_rows(ft.recipe[j])).sum(-1)
    ro = (unit_rows(fc.readout) * unit_rows(ft.readout[j])).sum(-1).mean(-1)
    top1 = (fc.top[:, :, 0] == ft.top[j][:, :, 0]).float().mean(-1)
    inter = (fc.top[:, :, :, None] == ft.top[j][:, :, None, :]).any(-1).float().sum(-1) / TOP_N
    return {"recipe": rec.numpy(), "readout": ro.numpy(), "top1": top1.numpy(), "top10": inter.mean(-1).numpy()}


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    while True:
        p = rng.permutation(n)
        if not (p == np.arange(n)).any():
            return p


@dataclass
class TypoResult:
    pairs: list[tuple[str, str]]
    n_typo_tokens: list[int]
    matched: dict[str, np.ndarray]  # per pair
    null: dict[str, np.ndarray]  # per shuffle: the mean over pairs
    null_pairs: dict[str, np.ndarray]  # per-pair values of the first shuffle (for the figure)

    def mean(self, m: str) -> float:
        return float(self.matched[m].mean())

    def null_mean(self, m: str) -> float:
        return float(self.null[m].mean())

    def effect(self, m: str) -> float:
        return self.mean(m) - self.null_mean(m)

    def p_value(self, m: str) -> float:
        return permutation_p(self.mean(m), self.null[m])


@torch.no_grad()
def typo_resilience(model, pairs=None, templates=None, *, n_null: int = 200, seed: int = 0) -> TypoResult:
    """Experiment 6 on one model: matched (correct, misspelt) pairs vs shuffled pairings."""
    if pairs is None or templates is None:
        p0, t0 = typo_pairs()
        pairs, templates = pairs or p0, templates or t0
    # a compact vocabulary reads tokens without rows of their own as one shared tail row: such a pair would compare
    # that row with itself, so it is left out (a full vocabulary keeps every pair)
    pairs = [p for p in pairs if all(bool(model.vocab.has_own_row(tokenizer.encode(w)).all()) for w in p)]
    correct, typos = [p[0] for p in pairs], [p[1] for p in pairs]
    fc, ft = word_features(model, correct, templates), word_features(model, typos, templates)
    # centre the read-outs per template over all words: what is shared by every word in a context says nothing
    centre = torch.cat([fc.readout, ft.readout]).mean(0, keepdim=True)
    fc.readout, ft.readout = fc.readout - centre, ft.readout - centre
    matched = pair_scores(fc, ft)
    rng = np.random.default_rng(seed)
    null = {m: [] for m in MEASURES}
    first = None
    for k in range(n_null):
        sc = pair_scores(fc, ft, derangement(len(pairs), rng))
        first = sc if first is None else first
        for m in MEASURES:
            null[m].append(sc[m].mean())
    return TypoResult(list(pairs), ft.n_tokens, matched, {m: np.array(v) for m, v in null.items()}, first)


# ----------------------------------------------------------------------------------------------


def summary_table(results: dict[str, list[TypoResult]]):
    import pandas as pd

    rows = []
    for name, rs in results.items():
        row = {"model": name, "seeds": len(rs)}
        for m in MEASURES:
            row[f"{m} matched"] = seed_interval([r.mean(m) for r in rs]).fmt(".3f")
            row[f"{m} random"] = f"{np.mean([r.null_mean(m) for r in rs]):.3f}"
        row["readout p (max)"] = f"{max(r.p_value('readout') for r in rs):.3f}"
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


def plot_typo(results: dict[str, list[TypoResult]]):
    """Matched vs random-pair similarity for each measure and model (first seed): per-pair dots and means."""
    import matplotlib.pyplot as plt

    titles = {"recipe": "recipe cosine (mean over tokens)", "readout": "final read-out cosine",
              "top1": "next-token top-1 agreement", "top10": f"next-token top-{TOP_N} overlap"}
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(13, 3.8))
    names = list(results)
    rng = np.random.default_rng(0)
    for ax, m in zip(axes, MEASURES):
        for x, name in enumerate(names):
            r = results[name][0]
            for off, vals, colour in ((-0.17, r.matched[m], f"C{x}"), (0.17, r.null_pairs[m], "0.6")):
                ax.scatter(x + off + rng.uniform(-0.06, 0.06, vals.size), vals, s=6, color=colour, alpha=0.6)
                ax.plot([x + off - 0.12, x + off + 0.12], [vals.mean()] * 2, color="k", lw=2)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_title(titles[m], fontsize=9.5)
    axes[0].set_ylabel("colour: matched pairs · grey: random pairs")
    fig.tight_layout()
    return fig


def resilience_outcome(rs: list[TypoResult]) -> str:
    """Where a group's seeds lie against ``typo.resilience``'s criterion: on every seed the matched read-out beats the
    shuffled pairs by at least the threshold with p < α → met; on no seed → missed; seeds that disagree → straddles."""
    crit = criterion("typo.resilience")
    seen = [r.p_value("readout") < crit["alpha"] and r.effect("readout") >= crit["threshold"] for r in rs]
    return MET if all(seen) else MISSED if not any(seen) else STRADDLES


def scorecard_rows(results: dict[str, list[TypoResult]], scale: str, checkpoint: str, control: Control) -> list[Row]:
    """typo.resilience from the ``reflow`` group (:func:`resilience_outcome`); the p-value is the largest read-out
    permutation p over seeds; ``control`` is the claim's positive control; reFlow at initialisation meeting the
    criterion makes the row inconclusive."""
    crit = criterion("typo.resilience")
    rs = results["reflow"]
    ro = seed_interval([r.mean("readout") for r in rs])
    null = float(np.mean([r.null_mean("readout") for r in rs]))
    p = max(r.p_value("readout") for r in rs)
    t1 = seed_interval([r.mean("top1") for r in rs])
    t1n = float(np.mean([r.null_mean("top1") for r in rs]))
    base = "; ".join(f"{n} read-out effect {np.mean([r.effect('readout') for r in results[n]]):+.3f} "
                     f"(p={max(r.p_value('readout') for r in results[n]):.3f})" for n in results if n != "reflow")
    init = results.get("reflow (init)")
    init_meets = bool(init) and resilience_outcome(init) == MET
    split = float(np.mean([t > 1 for t in rs[0].n_typo_tokens]))
    return [Row(
        claim_id="typo.resilience",
        ours=(f"final read-out cos {ro.fmt('.3f')} vs random pairs {null:.3f} (p={p:.3f}); next-token top-1 "
              f"agreement {t1.fmt('.2f')} vs {t1n:.2f}"),
        verdict=decide(resilience_outcome(rs), control, null_meets_paper=init_meets),
        why=(f"criterion: matched pairs' read-out cosine beats shuffled pairs (effect ≥ {crit['threshold']:g}, "
             f"p < {crit['alpha']:g}) on every seed; reFlow effect {np.mean([r.effect('readout') for r in rs]):+.3f}"
             + ("; the model at initialisation meets it too" if init_meets else "")
             + f"; {base}; {100 * split:.0f}% of misspellings split into several tokens; {len(rs)} seed(s)"),
        scale=scale, checkpoint=checkpoint, control=control, p_value=p,
    )]
