"""Experiment 4 — Semantic Galaxy: do word categories form clusters in recipe space?

We take the recipe rows of labelled words (``galaxy_categories`` of ``assets/words/categories.json``), compute the
**silhouette** of the category labels (scikit-learn, cosine distance in the full recipe space; also in the 2-D PCA plane
the figure shows, which is what the seed's "PCA silhouette" most likely is), and compare it with a **label-permutation
null**: the same silhouette after shuffling the labels many times. A silhouette is only evidence of clusters when it
beats that null; the p-value is the share of shuffles that reach the observed value. GPT-2-New's embedding rows and
the recipe at initialisation give the baselines.

The verdict (:func:`scorecard_rows`) follows the scorecard's rule: the registered criterion (``galaxy.silhouette``:
silhouette ≥ 0 beyond the permutation null at α) on every seed; a "not reproduced" only where the positive control —
categories cluster in some model's embedding rows E at this scale — passed; inconclusive where reFlow at
initialisation meets the criterion too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from reflow_core.experiments.atlas import curated
from reflow_core.stimuli import load_words
from reflow_core.experiments.common import permutation_p, seed_interval, vocab_rows
from reflow_core.scorecard import MET, MISSED, STRADDLES, Control, Row, criterion, decide

PAPER_SILHOUETTE = 0.1052


@dataclass
class GalaxyResult:
    words: list[str]
    labels: list[str]
    pca: np.ndarray  # (n, 2) coordinates for the figure
    explained: np.ndarray  # explained variance ratio of the two components
    silhouette: float  # full space, cosine
    silhouette_pca: float  # 2-D PCA plane, euclidean
    null: np.ndarray  # permutation null of the full-space silhouette
    p_value: float
    per_word: np.ndarray | None = None  # each word's silhouette (their mean is ``silhouette``), for a bootstrap


def galaxy_categories() -> dict[str, list[str]]:
    data = load_words("categories")
    return {c: data["categories"][c] for c in data["galaxy_categories"]}


def silhouette_with_null(X: np.ndarray, labels, n_perm: int = 200, seed: int = 0, metric: str = "cosine"):
    """(silhouette, null distribution over label permutations, one-sided p-value)."""
    from sklearn.metrics import pairwise_distances, silhouette_score

    D = pairwise_distances(X, metric=metric)
    labels = np.asarray(labels)
    obs = float(silhouette_score(D, labels, metric="precomputed"))
    rng = np.random.default_rng(seed)
    null = np.array([silhouette_score(D, rng.permutation(labels), metric="precomputed") for _ in range(n_perm)])
    return obs, null, permutation_p(obs, null)


@torch.no_grad()
def semantic_galaxy(model, categories: dict[str, list[str]] | None = None, *, n_perm: int = 200, seed: int = 0,
                    rows: torch.Tensor | None = None) -> GalaxyResult:
    """PCA + silhouette of labelled recipe rows (embedding rows for a tied model), with the permutation null."""
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_samples, silhouette_score

    words, labels, ids, _ = curated(galaxy_categories() if categories is None else categories, model.vocab)
    rows = vocab_rows(model) if rows is None else rows.float()
    X = rows[torch.tensor(ids)].numpy().astype(np.float64)
    obs, null, p = silhouette_with_null(X, labels, n_perm, seed)
    per_word = silhouette_samples(X, labels, metric="cosine")
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True).clip(1e-12)  # PCA of directions: cosine geometry
    pca = PCA(n_components=2, random_state=seed).fit(Xn)
    P = pca.transform(Xn)
    sil2 = float(silhouette_score(P, labels))
    return GalaxyResult(words, labels, P, pca.explained_variance_ratio_, obs, sil2, null, p, per_word)


# ----------------------------------------------------------------------------------------------


def summary_table(results: dict[str, list[GalaxyResult]]):
    import pandas as pd

    rows = []
    for name, rs in results.items():
        rows.append({
            "model": name, "seeds": len(rs),
            "silhouette (cosine, full)": seed_interval([r.silhouette for r in rs]).fmt(".4f"),
            "silhouette (PCA 2-D)": seed_interval([r.silhouette_pca for r in rs]).fmt(".4f"),
            "null mean": f"{np.mean([r.null.mean() for r in rs]):.4f}",
            "null 95%": f"{np.mean([np.quantile(r.null, 0.95) for r in rs]):.4f}",
            "p (max over seeds)": f"{max(r.p_value for r in rs):.3f}",
        })
    return pd.DataFrame(rows).set_index("model")


def plot_galaxy(results: dict[str, list[GalaxyResult]], models: tuple[str, ...] | None = None):
    """PCA scatter per model (first seed) and the silhouette against its permutation null."""
    import matplotlib.pyplot as plt

    names = list(models or results)
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4 * (len(names) + 1), 4))
    cats = list(dict.fromkeys(results[names[0]][0].labels))
    for ax, name in zip(axes, names):
        r = results[name][0]
        for ci, cat in enumerate(cats):
            sel = [i for i, l in enumerate(r.labels) if l == cat]
            ax.scatter(r.pca[sel, 0], r.pca[sel, 1], s=14, color=f"C{ci}", label=cat)
            for i in sel[:3]:
                ax.annotate(r.words[i].strip(), r.pca[i], fontsize=6, color=f"C{ci}")
        ax.set_title(f"{name}: silhouette {r.silhouette:+.3f}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(fontsize=6.5, loc="best")
    ax = axes[-1]
    for x, name in enumerate(names):
        r = results[name][0]
        ax.hist(r.null, bins=30, histtype="step", color=f"C{x}", density=True)
        ax.axvline(r.silhouette, color=f"C{x}", lw=2, label=f"{name} (p={r.p_value:.3f})")
    ax.axvline(PAPER_SILHOUETTE, color="k", ls=":", label="paper 0.1052")
    ax.set_xlabel("silhouette (lines) vs label-permutation null (histograms)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def clusters_outcome(rs: list[GalaxyResult]) -> str:
    """Where a group's seeds lie against ``galaxy.silhouette``'s criterion: every seed's silhouette at or above the
    threshold and beyond its permutation null (p < α) → met; no seed beyond its null → missed; seeds that disagree,
    or a silhouette beyond the null but below the threshold on some seed → straddles."""
    crit = criterion("galaxy.silhouette")
    seen = [r.p_value < crit["alpha"] for r in rs]
    above = [r.silhouette >= crit["threshold"] for r in rs]
    if all(seen) and all(above):
        return MET
    if not any(seen) or not any(above):
        return MISSED
    return STRADDLES


def scorecard_rows(results: dict[str, list[GalaxyResult]], scale: str, checkpoint: str,
                   control: Control) -> list[Row]:
    """galaxy.silhouette from the ``reflow`` group (:func:`clusters_outcome`); the p-value is the largest permutation
    p over seeds (every seed must beat its null); ``control`` is the claim's positive control (categories cluster in
    some model's E at this scale); reFlow at initialisation meeting the criterion makes the row inconclusive."""
    crit = criterion("galaxy.silhouette")
    rs = results["reflow"]
    s = seed_interval([r.silhouette for r in rs])
    s2 = seed_interval([r.silhouette_pca for r in rs])
    p = max(r.p_value for r in rs)
    base = "; ".join(f"{n} {seed_interval([r.silhouette for r in results[n]]).mean:+.3f} "
                     f"(p={max(r.p_value for r in results[n]):.3f})" for n in results if n != "reflow")
    init = results.get("reflow (init)")
    init_meets = bool(init) and clusters_outcome(init) == MET
    return [Row(
        claim_id="galaxy.silhouette",
        ours=f"{s.fmt('.4f')} (cosine, full space; 2-D PCA {s2.fmt('.4f')}); permutation p={p:.3f}",
        verdict=decide(clusters_outcome(rs), control, null_meets_paper=init_meets),
        why=(f"criterion: silhouette ≥ {crit['threshold']:g} and beyond the label-permutation null (p < "
             f"{crit['alpha']:g}) on every seed; null mean {np.mean([r.null.mean() for r in rs]):+.3f}"
             + ("; the model at initialisation meets it too" if init_meets else "")
             + f"; baselines: {base}; {len(rs[0].words)} words in {len(set(rs[0].labels))} categories; "
             f"{len(rs)} seed(s)"),
        scale=scale, checkpoint=checkpoint, control=control, p_value=p,
    )]
