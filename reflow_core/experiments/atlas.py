"""Experiment 1 — Recipe Atlas: which tokens have similar recipes?

For a factored model every token is a recipe row r_v (S mixing weights over the signal basis). If training organises
recipe space semantically, words of one category (numbers, countries, …) should be each other's cosine nearest
neighbours. We measure, on curated single-token word lists (``assets/words/categories.json``):

* **category purity@k** — the share of each word's k nearest curated neighbours that share its category, against
  the chance share a random neighbour would give;
* **top-20 pairs** — the 20 most similar pairs among all curated words and how many are same-category (the seed's
  "top-20 nearest-neighbour pairs all semantically valid");
* **named pairs** — three↔four, king↔queen, France↔Germany, each with its percentile among random vocabulary pairs;
* **whole-vocabulary neighbours** — each curated word's nearest tokens among all 50,257, and whether the first is a
  same-category word or a spelling variant of the word itself (" three" ↔ " Three", "three").

The same statistics on GPT-2-New's embedding rows (trained under the same budget) and on the recipe at
initialisation say whether the structure is reFlow's or just what any trained (or untrained) table shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from reflow_core.stimuli import category_ids, load_words, token_str
from reflow_core.experiments.common import cosine_matrix, nearest, own_mask, seed_interval, vocab_rows
from reflow_core.scorecard import MET, MISSED, STRADDLES, Control, Row, against, criterion, decide

PAPER_THREE_FOUR = 0.7551
TOP_PAIRS = 20


@dataclass
class AtlasResult:
    words: list[str]
    labels: list[str]
    cos: np.ndarray  # curated × curated cosine
    k: int
    purity: float  # mean share of same-category words among each word's k nearest curated neighbours
    chance: float  # the share a random neighbour gives
    top_pairs: list[tuple[str, str, float, bool]]
    named: dict[str, float]  # "three↔four" -> cosine
    named_percentile: dict[str, float]  # percentile among random vocabulary pairs
    random_pair_cos: np.ndarray
    vocab_neighbours: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    vocab_top1_valid: float = float("nan")
    dropped: dict[str, str] = field(default_factory=dict)

    @property
    def top_pairs_valid(self) -> int:
        return int(sum(p[3] for p in self.top_pairs))


def _is_variant(a: str, b: str) -> bool:
    return a.strip().lower() == b.strip().lower()


def curated(categories: dict[str, list[str]] | None = None, vocab=None):
    """(words, labels, ids, dropped) from the curated category lists: single-token words only, and (given a model's
    ``vocab``) only words with a row of their own in it."""
    categories = load_words("categories")["categories"] if categories is None else categories
    per_cat, dropped = category_ids(categories, vocab)
    words, labels, ids = [], [], []
    for cat, wids in per_cat.items():
        for w, i in wids.items():
            words.append(w)
            labels.append(cat)
            ids.append(i)
    return words, labels, ids, dropped


def pair_name(a: str, b: str) -> str:
    return f"{a.strip()}↔{b.strip()}"


@torch.no_grad()
def recipe_atlas(model, categories: dict[str, list[str]] | None = None, named_pairs=None, *, k: int = 5,
                 n_vocab_neighbours: int = 5, n_random_pairs: int = 20000, seed: int = 0,
                 rows: torch.Tensor | None = None) -> AtlasResult:
    """The atlas statistics for one model (recipe rows; embedding rows for a tied model; or explicit ``rows``)."""
    rows = vocab_rows(model) if rows is None else rows.float()
    words, labels, ids, dropped = curated(categories, model.vocab)
    own = own_mask(model)
    own_ids = own.nonzero().squeeze(1)
    named_pairs = load_words("categories")["named_pairs"] if named_pairs is None else named_pairs
    ids_t = torch.tensor(ids)
    C = cosine_matrix(rows[ids_t]).numpy()
    n = len(words)
    lab = np.array(labels)
    same = lab[:, None] == lab[None, :]
    off = ~np.eye(n, dtype=bool)
    # purity@k among curated words
    Cm = np.where(off, C, -np.inf)
    nn_idx = np.argsort(-Cm, axis=1)[:, :k]
    purity = float(np.mean(same[np.arange(n)[:, None], nn_idx]))
    chance = float(np.mean((same.sum(1) - 1) / (n - 1)))
    # top pairs among curated words
    iu = np.triu_indices(n, 1)
    order = np.argsort(-C[iu])[:TOP_PAIRS]
    top_pairs = [(words[iu[0][o]], words[iu[1][o]], float(C[iu][o]), bool(same[iu[0][o], iu[1][o]])) for o in order]
    # named pairs against random vocabulary pairs
    g = torch.Generator().manual_seed(seed)
    a = own_ids[torch.randint(0, own_ids.numel(), (n_random_pairs,), generator=g)]
    b = own_ids[torch.randint(0, own_ids.numel(), (n_random_pairs,), generator=g)]
    keep = a != b
    U = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    rand = (U[a[keep]] * U[b[keep]]).sum(1).numpy()
    named, pct = {}, {}
    for pair in named_pairs:
        w1, w2 = pair[0], pair[1]
        i1, i2 = (tokenizer_id(w) for w in (w1, w2))
        if i1 is None or i2 is None or not bool(own[i1] and own[i2]):
            continue
        c = float((U[i1] * U[i2]).sum())
        named[pair_name(w1, w2)] = c
        pct[pair_name(w1, w2)] = float(100 * np.mean(rand < c))
    # whole-vocabulary neighbours of each curated word
    vals, idx = nearest(rows, rows[ids_t], n_vocab_neighbours, exclude=[[i] for i in ids], allowed=own)
    id_to_word = dict(zip(ids, words))
    vocab_nn, valid = {}, []
    for q, w in enumerate(words):
        toks = [(token_str(int(j)), float(v)) for v, j in zip(vals[q], idx[q])]
        vocab_nn[w] = toks
        j0 = int(idx[q, 0])
        valid.append(_is_variant(token_str(j0), w) or
                     (j0 in id_to_word and labels[words.index(id_to_word[j0])] == labels[q]))
    return AtlasResult(words, labels, C, k, purity, chance, top_pairs, named, pct, rand, vocab_nn,
                       float(np.mean(valid)), dropped)


def tokenizer_id(word: str) -> int | None:
    from reflow_core.tokenizer import single_token_id

    return single_token_id(word)


# ----------------------------------------------------------------------------------------------
# Summaries, plots, scorecard


def summary_table(results: dict[str, list[AtlasResult]]):
    """One row per model group: purity@k vs chance, top-20 valid, whole-vocab top-1 valid, named pairs (mean over seeds)."""
    import pandas as pd

    rows = []
    for name, rs in results.items():
        row = {
            "model": name, "seeds": len(rs),
            f"purity@{rs[0].k}": seed_interval([r.purity for r in rs]).fmt(),
            "chance": f"{rs[0].chance:.3f}",
            f"top-{TOP_PAIRS} pairs same-category": seed_interval([r.top_pairs_valid for r in rs]).fmt(".1f"),
            "vocab top-1 valid": seed_interval([r.vocab_top1_valid for r in rs]).fmt(),
        }
        for pair in rs[0].named:
            row[pair] = seed_interval([r.named[pair] for r in rs]).fmt()
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


def top_pairs_table(result: AtlasResult):
    """The top cosine pairs among the curated words, and whether each is same-category."""
    import pandas as pd

    return pd.DataFrame(result.top_pairs, columns=["word", "word ", "cosine", "same category"]).round(3)


SHOWN_NEIGHBOURS = (" three", " king", " France", " Paris", " red", " dog", " walked", " March")


def neighbours_table(result: AtlasResult, words=SHOWN_NEIGHBOURS):
    """Whole-vocabulary nearest tokens of a few curated words (those the single-token check kept)."""
    import pandas as pd

    shown = [w for w in words if w in result.vocab_neighbours]
    return pd.DataFrame({w.strip(): [f"{t!r} {c:.2f}" for t, c in result.vocab_neighbours[w]] for w in shown})


def plot_heatmap(result: AtlasResult, categories: tuple[str, ...] = ("numbers", "royalty", "countries", "capitals"),
                 title: str = "Recipe cosine similarity"):
    import matplotlib.pyplot as plt

    sel = [i for i, lab in enumerate(result.labels) if lab in categories]
    C = result.cos[np.ix_(sel, sel)]
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    im = ax.imshow(C, cmap="RdBu_r", vmin=-1, vmax=1)
    ticks = [result.words[i].strip() for i in sel]
    ax.set_xticks(range(len(sel)), ticks, rotation=90, fontsize=6.5)
    ax.set_yticks(range(len(sel)), ticks, fontsize=6.5)
    ax.grid(False)
    # category boundaries
    labs = [result.labels[i] for i in sel]
    for b in [i for i in range(1, len(labs)) if labs[i] != labs[i - 1]]:
        ax.axhline(b - 0.5, color="k", lw=0.6)
        ax.axvline(b - 0.5, color="k", lw=0.6)
    fig.colorbar(im, ax=ax, shrink=0.8, label="cosine")
    ax.set_title(title)
    return fig


def plot_purity(results: dict[str, list[AtlasResult]]):
    """Purity@k and top-20 same-category pairs per model group (dots: seeds), against chance."""
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    for ax, (key, label) in zip(axes, [("purity", "category purity@k"), ("top_pairs_valid", f"same-category of top-{TOP_PAIRS} pairs"),
                                       ("vocab_top1_valid", "whole-vocab top-1 valid")]):
        for x, name in enumerate(names):
            vals = [getattr(r, key) for r in results[name]]
            ax.bar(x, np.mean(vals), color=f"C{x}", alpha=0.7)
            ax.scatter([x] * len(vals), vals, color="k", s=12, zorder=3)
        if key == "purity":
            ax.axhline(results[names[0]][0].chance, ls="--", color="0.4", label="chance")
            ax.legend()
        if key == "top_pairs_valid":
            ax.axhline(TOP_PAIRS * results[names[0]][0].chance, ls="--", color="0.4")
            ax.axhline(TOP_PAIRS, ls=":", color="C3", label="paper: 20/20")
            ax.legend()
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_title(label, fontsize=10)
    fig.tight_layout()
    return fig


def scorecard_rows(results: dict[str, list[AtlasResult]], scale: str, checkpoint: str,
                   controls: dict[str, Control]) -> list[Row]:
    """atlas.three_four and atlas.top20 from the ``reflow`` group's recipe rows, against the registered criteria;
    ``controls`` gives each claim's positive control (a model at this scale shows the effect in its E, and the
    test finds a planted three↔four)."""
    rs = results["reflow"]
    bar = criterion("atlas.three_four")["threshold"]
    tf = seed_interval([r.named.get("three↔four", float("nan")) for r in rs])
    pct = seed_interval([r.named_percentile.get("three↔four", float("nan")) for r in rs])
    others = ", ".join(f"{p} {seed_interval([r.named[p] for r in rs]).fmt('.2f')}" for p in rs[0].named if p != "three↔four")
    base = {name: seed_interval([r.named.get("three↔four", float("nan")) for r in results[name]]).mean
            for name in results if name != "reflow"}
    base_txt = "; ".join(f"{n} {v:.2f}" for n, v in base.items())
    lo, hi = (tf.lo, tf.hi) if tf.n > 1 else (tf.mean, tf.mean)
    outcomes = {against(lo, hi, bar["cosine"]), against(pct.mean, pct.mean, bar["percentile"])}
    outcome = MISSED if MISSED in outcomes else STRADDLES if STRADDLES in outcomes else MET
    control = controls["atlas.three_four"]
    rows = [Row(
        claim_id="atlas.three_four",
        ours=f"three↔four {tf.fmt('.2f')} ({pct.mean:.1f}th pct of random pairs); {others}",
        verdict=decide(outcome, control),
        why=(f"criterion: cos ≥ {bar['cosine']} and above the {bar['percentile']:g}th percentile of random "
             f"vocabulary pairs; baselines three↔four: {base_txt}; {len(rs)} seed(s)"),
        scale=scale, checkpoint=checkpoint, control=control,
    )]
    top = criterion("atlas.top20")["threshold"]
    valid = seed_interval([r.top_pairs_valid for r in rs])
    chance = TOP_PAIRS * rs[0].chance
    base_valid = "; ".join(f"{n} {seed_interval([r.top_pairs_valid for r in results[n]]).mean:.1f}/20"
                           for n in results if n != "reflow")
    lo, hi = (valid.lo, valid.hi) if valid.n > 1 else (valid.mean, valid.mean)
    control = controls["atlas.top20"]
    rows.append(Row(
        claim_id="atlas.top20",
        ours=f"{valid.fmt('.1f')}/20 same-category (chance {chance:.1f}/20)",
        verdict=decide(against(lo, hi, top), control),
        why=(f"criterion: ≥ {top}/20 of the top-20 cosine pairs among {len(rs[0].words)} curated single-token words "
             f"are same-category; baselines: {base_valid}"),
        scale=scale, checkpoint=checkpoint, control=control,
    ))
    return rows
