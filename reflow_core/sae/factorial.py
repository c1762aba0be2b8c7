"""The seed's 2×2 factorial intervention (formal/informal × emotional/neutral), done with held-out stimuli and a proper
two-way ANOVA.

1. **Discovery** (``assets/stimuli/factorial_discovery.json``): every sentence's residual stream at the SAE's hook is
   encoded (normalised, code z and NFM bi-interaction pool averaged over positions). The *primary* latents are the
   SAE latents with the largest main effect of formality and of emotion (Welch t); the *interaction feature* is the
   dimension of the NFM's pooled vector whose two-way ANOVA interaction F is largest; the *control* is the pooled
   dimension with the most similar spread across discovery sentences among those with no interaction (p > 0.5).
2. **Test** (``factorial_test.json``, other sentences, and four buckets of target words): the feature is clamped to
   ``alpha`` × its largest discovery value at every position; the change it makes to the NFM's output (normalisation
   undone) is added to the residual stream, so the SAE's error is preserved. The response of a target word is the
   change of its next-token log-probability at the last position, averaged over test prompts; a two-way ANOVA over
   words, ``y ~ C(formal) * C(emotional)`` (statsmodels ``ols`` + ``anova_lm``, type II), asks whether the clamp's
   effect on word classes is additive. The same is done for the control feature, and the primary latents' main
   effects are checked on the test sentences.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from reflow_core import tokenizer
from reflow_core.stimuli import token_ids

CELLS = ("formal_emotional", "formal_neutral", "informal_emotional", "informal_neutral")


@lru_cache(maxsize=None)
def load(which: str) -> dict:
    """``discovery`` or ``test`` stimuli: {"cells": {cell: [sentences]}, "words": {cell: [words]} (test only)}."""
    return json.loads(files("reflow_core").joinpath(f"assets/stimuli/factorial_{which}.json").read_text())


def design(cells: dict) -> pd.DataFrame:
    rows = [{"text": t, "cell": c, "formal": int(c.startswith("formal")), "emotional": int(c.endswith("emotional"))}
            for c in CELLS for t in cells[c]]
    return pd.DataFrame(rows)


def word_design() -> pd.DataFrame:
    rows = []
    for c in CELLS:
        ids, _ = token_ids(load("test")["words"][c], strict=False)
        rows += [{"id": i, "word": tokenizer.decode([i]), "cell": c, "formal": int(c.startswith("formal")),
                  "emotional": int(c.endswith("emotional"))} for i in ids]
    return pd.DataFrame(rows)


def _encode(model, text: str) -> torch.Tensor:
    ids = tokenizer.encode(text)[-model.config.block_size:]
    return torch.tensor([ids], dtype=torch.long)


@torch.no_grad()
def codes(lm, recon, acts, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per sentence: SAE code z and NFM pooled vector, each averaged over positions (normalised units)."""
    from reflow_core.hooks import read_hook

    zs, pools = [], []
    for t in texts:
        h = acts.normalize(read_hook(lm, _encode(lm, t), acts.hook)[0].float())
        z = recon.parts(h)["z"]
        zs.append(z.mean(0))
        pools.append(recon.head.pool(z, recon.sae.k).mean(0))
    return torch.stack(zs).numpy(), torch.stack(pools).numpy()


def anova(df: pd.DataFrame, y: str = "y") -> pd.DataFrame:
    """Two-way ANOVA table (type II) of ``y ~ C(formal) * C(emotional)``."""
    import statsmodels.api as sm
    from statsmodels.formula.api import ols

    fit = ols(f"{y} ~ C(formal) * C(emotional)", data=df).fit()
    return sm.stats.anova_lm(fit, typ=2)


def _interaction_row(table: pd.DataFrame) -> tuple[float, float]:
    row = table.loc["C(formal):C(emotional)"]
    return float(row["F"]), float(row["PR(>F)"])


def _welch_t(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    a, b = values[groups == 1], values[groups == 0]
    se = np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b)) + 1e-12
    return (a.mean(0) - b.mean(0)) / se


@dataclass
class FactorialResult:
    primary: dict  # factor -> {"latent", "t_discovery", "t_test"}
    feature: int  # pooled dimension picked on discovery
    control: int
    F_discovery: np.ndarray  # interaction F of every pooled dimension on discovery
    alpha: float
    responses: pd.DataFrame  # per word: id, word, cell, formal, emotional, y_feature, y_control
    anova_feature: pd.DataFrame
    anova_control: pd.DataFrame
    cell_means: pd.DataFrame  # mean response per word cell, feature and control
    summary: dict = field(default_factory=dict)


@torch.no_grad()
def clamp_response(lm, recon, acts, texts: list[str], word_ids: list[int], dim: int, value: float) -> np.ndarray:
    """Mean over prompts of Δ log p(word) at the last position when pooled dimension ``dim`` is clamped to ``value``."""
    k = recon.sae.k
    mlp = recon.head.mlp

    def hook(x):
        flat = acts.normalize(x.reshape(-1, x.shape[-1]).float())
        pool = recon.head.pool(recon.parts(flat)["z"], k)
        clamped = pool.clone()
        clamped[:, dim] = value
        delta = acts.denormalize(mlp(clamped) - mlp(pool))
        return x + delta.reshape(x.shape).to(x.dtype)

    out = []
    for t in texts:
        idx = _encode(lm, t)
        clean = F.log_softmax(lm(idx, last_only=True)[0][0, -1].float(), -1)
        with lm.hooks.attach({acts.hook: hook}):
            clamped = F.log_softmax(lm(idx, last_only=True)[0][0, -1].float(), -1)
        out.append((clamped - clean)[word_ids].numpy())
    return np.mean(out, axis=0)


def factorial_experiment(lm, recon, acts, *, alpha: float = 4.0) -> FactorialResult:
    """The whole procedure above for one model with an NFM head (``recon``)."""
    disc = design(load("discovery")["cells"])
    test = design(load("test")["cells"])
    z_d, pool_d = codes(lm, recon, acts, disc.text.tolist())
    z_t, _ = codes(lm, recon, acts, test.text.tolist())

    primary = {}
    for factor in ("formal", "emotional"):
        t_d = np.nan_to_num(_welch_t(z_d, disc[factor].to_numpy()))
        latent = int(np.abs(t_d).argmax())
        t_t = float(np.nan_to_num(_welch_t(z_t[:, [latent]], test[factor].to_numpy()))[0])
        primary[factor] = {"latent": latent, "t_discovery": float(t_d[latent]), "t_test": t_t}

    F_d, p_d = [], []
    for j in range(pool_d.shape[1]):
        df = disc.assign(y=pool_d[:, j])
        if df.y.std() < 1e-12:
            F_d.append(0.0)
            p_d.append(1.0)
            continue
        f, p = _interaction_row(anova(df))
        F_d.append(f)
        p_d.append(p)
    F_d, p_d = np.nan_to_num(np.array(F_d)), np.nan_to_num(np.array(p_d), nan=1.0)
    feature = int(F_d.argmax())
    spread = pool_d.std(0)
    candidates = np.where((p_d > 0.5) & (np.arange(len(F_d)) != feature))[0]
    if len(candidates) == 0:
        candidates = np.setdiff1d(np.arange(len(F_d)), [feature])
    control = int(candidates[np.abs(np.log(spread[candidates] + 1e-12) - np.log(spread[feature] + 1e-12)).argmin()])

    words = word_design()
    ids = words.id.tolist()
    prompts = test.text.tolist()
    for name, dim in (("feature", feature), ("control", control)):
        value = alpha * float(np.abs(pool_d[:, dim]).max())
        words[f"y_{name}"] = clamp_response(lm, recon, acts, prompts, ids, dim, value)
    a_f = anova(words, "y_feature")
    a_c = anova(words, "y_control")
    means = words.groupby("cell")[["y_feature", "y_control"]].mean().reindex(list(CELLS))
    F_f, p_f = _interaction_row(a_f)
    F_c, p_c = _interaction_row(a_c)
    summary = {"F_feature": F_f, "p_feature": p_f, "F_control": F_c, "p_control": p_c, "n_words": len(words),
               "n_discovery": len(disc), "n_test": len(test),
               "primary_replicates": {f: bool(np.sign(v["t_test"]) == np.sign(v["t_discovery"]) and abs(v["t_test"]) > 2)
                                      for f, v in primary.items()}}
    return FactorialResult(primary=primary, feature=feature, control=control, F_discovery=F_d, alpha=alpha,
                           responses=words, anova_feature=a_f, anova_control=a_c, cell_means=means, summary=summary)


def plot_factorial(results: dict):
    """Interaction plots: mean Δ log p per word class, lines = emotional/neutral, for each model × (feature, control)."""
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(1, 2 * n, figsize=(3.2 * 2 * n, 3.2), sharey=False, squeeze=False)
    for c, (label, r) in enumerate(results.items()):
        for j, kind in enumerate(("feature", "control")):
            ax = axes[0, 2 * c + j]
            w = r.responses
            for emo, style in ((1, "-o"), (0, "--s")):
                sub = w[w.emotional == emo].groupby("formal")[f"y_{kind}"]
                m, se = sub.mean(), sub.sem()
                ax.errorbar([0, 1], [m.get(0, np.nan), m.get(1, np.nan)], yerr=[se.get(0, 0), se.get(1, 0)],
                            fmt=style, capsize=3, label="emotional words" if emo else "neutral words")
            p = r.summary[f"p_{kind}"]
            dim = r.feature if kind == "feature" else r.control
            ax.set_title(f"{label}: {kind} (dim {dim})\ninteraction p = {p:.3g}", fontsize=9)
            ax.set_xticks([0, 1], ["informal", "formal"])
            ax.axhline(0, color="0.7", lw=0.8)
            if c == 0 and j == 0:
                ax.set_ylabel("Δ log p(word) under clamp")
                ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
