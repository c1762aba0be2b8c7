"""Positive controls of the SAE rows (the scorecard's rule: a row may say "not reproduced" only when a control of the
same test passed on the same build; see :mod:`reflow_core.scorecard`).  Bars live in ``assets/controls.json``.

* :func:`competence` — **the SAEs were trained properly**: every compared variant, every seed, has fewer than the bar
  (10%) of its latents dead (firing on none of 65,536 train vectors).  A comparison against a mostly dead SAE
  compares parameter counts, not live capacity, so this gate protects both directions: without it a gain over a
  crippled baseline is no evidence either.
* :func:`spike_interaction` — **a planted interaction the test must find**: vectors built as a sparse code over known
  atoms plus a factorization-machine interaction of that code (x = D z + U·pool(z)); the chapter's own pipeline (same
  width, k, embedding size, steps, learning rate, seeds) trains the joint SAE+NFM and the SAE + MLP without FM pooling
  on them, and the test of sae.nfm_contribution (joint's FVU below SAE+MLP's, interval over seeds) must detect it.
* :func:`spike_bimodal` — **planted bimodal norms the test must find**: as many values as the model has live latents,
  drawn from the seed's two modes (≈0.04 and ≈0.37); the bimodality test must call them bimodal.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import replace
from importlib.resources import files

import numpy as np
import pandas as pd
import torch

from reflow_core.scorecard import Control
from reflow_core.sae import activations, metrics
from reflow_core.sae.nfm import bi_interaction
from reflow_core.sae.train import SAEConfig, VARIANT_LABELS, build_variant, train_reconstructor


@functools.cache
def _settings() -> dict:
    """``assets/controls.json`` (read here, not through :mod:`reflow_core.experiments.controls`: the SAE library sits
    below the experiments layer)."""
    return json.loads(files("reflow_core").joinpath("assets/controls.json").read_text())["controls"]


def _bar(name: str, key: str):
    return _settings()[name][key]


def max_dead() -> float:
    """The competence bar: the largest share of dead latents (on train vectors) a compared SAE may have."""
    return float(_bar("sae_live_latents", "max_dead_frac"))


def competence(per_seed: pd.DataFrame, variants: tuple[str, ...], *, column: str = "dead_train") -> Control:
    """Every seed of every variant in ``variants`` has < :func:`max_dead` of its latents dead (``column`` of the
    chapter's per-seed table); the detail lists each variant's worst seed and its live latents beside its parameters."""
    bar = max_dead()
    parts, worst = [], 0.0
    for v in variants:
        g = per_seed[per_seed.variant == v]
        if g.empty:
            parts.append(f"{VARIANT_LABELS.get(v, v)}: not trained")
            worst = math.inf
            continue
        d = float(g[column].max())
        worst = max(worst, d)
        live = f", {g['live'].min():.0f} of {int(g['width'].iloc[0])} latents live" if "live" in g else ""
        parts.append(f"{VARIANT_LABELS.get(v, v)}: up to {100 * d:.1f}% dead{live}, {int(g['params'].iloc[0]):,} params")
    return Control(f"SAE competence: < {100 * bar:.0f}% dead latents ({', '.join(variants)})", worst < bar,
                   "; ".join(parts) + f" (dead = fires on none of {metrics.DEAD_CHECK_VECTORS:,} train vectors)",
                   value=worst, threshold=bar)


# ----------------------------------------------------------------------------------------------
# Planted interaction


def planted_interactions(n: int, d: int, n_atoms: int, k: int, embed_dim: int, strength: float,
                         seed: int = 0) -> tuple[torch.Tensor, float]:
    """(x, share of x's variance that is interaction): n vectors x = D z + U·pool(z).  z has k active atoms
    (coefficients in [0.5, 1.5]) of ``n_atoms`` unit atoms D, pool is the FM bi-interaction of z with random
    embeddings V (``embed_dim``), U a random map to d, and the interaction term is scaled to ``strength`` × the mean
    norm of the linear part."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_atoms, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    V = torch.randn(n_atoms, embed_dim, generator=g) / embed_dim ** 0.25
    U = torch.randn(embed_dim, d, generator=g) / d ** 0.5
    idx = torch.stack([torch.randperm(n_atoms, generator=g)[:k] for _ in range(n)])
    val = torch.rand(n, k, generator=g) + 0.5
    lin = (val.unsqueeze(-1) * D[idx]).sum(1)
    inter = bi_interaction(val, idx, V) @ U
    inter = inter * (strength * lin.norm(dim=-1).mean() / inter.norm(dim=-1).mean().clamp_min(1e-12))
    x = lin + inter
    return x, float(inter.var(0).sum() / x.var(0).sum())


def spike_interaction(d: int, cfg: SAEConfig, seeds: list[int], *, n: int = 24000) -> tuple[Control, dict]:
    """Train joint SAE+NFM and SAE + MLP (no FM pooling) with the chapter's config — at half its steps and without
    extra phases, to keep the chapter's cost: a miss then only keeps the row from saying "not reproduced", a find shows
    that the test can see such an effect — on planted FM interactions
    (:func:`planted_interactions`; atoms = width / 2, k_true = k / 2, interaction at ``strength`` of the linear part)
    and ask the test of sae.nfm_contribution whether joint's FVU is lower (t-interval of the paired change over seeds
    below 0).  Returns the control and the per-seed FVUs."""
    from reflow_core.scorecard import MET, against

    strength = float(_bar("spike_sae_interaction", "strength"))
    cfg = replace(cfg, steps=max(1, cfg.steps // 2), warmup_steps=max(1, cfg.warmup_steps // 2), until_dead=None)
    x, share = planted_interactions(n, d, max(2, cfg.width // 2), max(1, cfg.k // 2), 8, strength)
    cut = int(0.9 * n)
    acts = activations.from_arrays(x[:cut].numpy(), x[cut:])
    rows = []
    for seed in seeds:
        for v in ("sae_mlp", "joint"):
            m = build_variant(v, d, cfg, seed=seed)
            train_reconstructor(m, acts, cfg, seed=seed, progress=False)
            rows.append({"variant": v, "seed_index": seed, "fvu": metrics.fvu(acts.val_normalized(),
                                                                              m(acts.val_normalized()))})
    df = pd.DataFrame(rows)
    red = metrics.paired_reduction(df, "fvu", "joint", "sae_mlp")
    change = (-red[0], -red[2], -red[1])
    lo, hi = (change[1], change[2]) if math.isfinite(change[1]) else (change[0], change[0])
    found = against(lo, hi, 0.0, "<=") == MET
    fvus = {v: df[df.variant == v].fvu.round(4).tolist() for v in ("joint", "sae_mlp")}
    detail = (f"planted FM interaction ({100 * share:.0f}% of the variance is interaction; atoms "
              f"{max(2, cfg.width // 2)}, k {max(1, cfg.k // 2)}), chapter's config at {cfg.steps} steps, "
              f"{len(seeds)} seeds: joint vs "
              f"SAE+MLP FVU change {change[0]:+.1f}%" + (f" [{change[1]:+.1f}, {change[2]:+.1f}]"
                                                          if math.isfinite(change[1]) else "")
              + f" (joint FVU {fvus['joint']}, SAE+MLP {fvus['sae_mlp']})")
    return (Control("spike-in: planted FM interaction found by joint vs SAE+MLP", found, detail, value=change[0],
                    threshold=0.0), {"fvu": fvus, "change": list(change), "interaction_share": share})


# ----------------------------------------------------------------------------------------------
# Planted bimodal norms


def spike_bimodal(n: int, seed: int = 0) -> Control:
    """``n`` values from the seed's two modes (low ≈ 0.04, high ≈ 0.37; weights and spreads in controls.json): the
    bimodality test (:func:`reflow_core.sae.metrics.bimodality`) must call them bimodal with Ashman's D interval above 2.
    This is the test's power at the number of live latents the model has."""
    s = {k: _bar("spike_bimodal_norms", k) for k in ("low", "high", "low_sd", "high_sd", "low_weight")}
    rng = np.random.default_rng(seed)
    n_low = int(round(s["low_weight"] * n))
    v = np.concatenate([rng.normal(s["low"], s["low_sd"], n_low), rng.normal(s["high"], s["high_sd"], n - n_low)])
    v = np.abs(v)
    b = metrics.bimodality(v, n_boot=100)
    found = bool(b["bimodal"] and b["ashman_lo"] >= 2)
    return Control("spike-in: decoder norms planted at the seed's two modes", found,
                   f"{n} values at {s['low']:g} ({100 * s['low_weight']:.0f}%) and {s['high']:g}: bimodal={b['bimodal']}, "
                   f"Ashman's D {b['ashman_d']:.1f} [{b['ashman_lo']:.1f}, {b['ashman_hi']:.1f}]",
                   value=b["ashman_lo"], threshold=2.0)
