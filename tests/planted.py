"""Tiny models with structure planted by hand, shared by the experiment tests."""

import torch

from reflow_core.config import get_config
from reflow_core.model import build_model


def identity_model(n_layer: int, noise: float = 0.1, seed: int = 0):
    """A reflow@test model whose blocks add nothing (zeroed output projections) and whose basis is the identity.

    The residual stream then carries the token's recipe row unchanged to the head, so every experiment's answer
    is set by the recipe rows a test writes into it.
    """
    torch.manual_seed(seed)
    cfg = get_config("reflow@test", n_layer=n_layer)
    m = build_model(cfg).eval()
    with torch.no_grad():
        for b in m.blocks:
            b.attn.proj.weight.zero_()
            b.mlp.proj.weight.zero_()
        m.vocab.basis.copy_(torch.eye(cfg.n_signals, cfg.d_model))
        m.norm_final.weight.fill_(1.0)
        m.vocab.recipe.normal_(0, noise)
    return m


def plant_categories(model, spread: float = 0.05, seed: int = 1, categories=None):
    """Every curated word (of ``categories``, default the atlas's) gets its category's centre plus small noise in its
    recipe row, hence in E (the basis stays fixed)."""
    from reflow_core.experiments import atlas

    g = torch.Generator().manual_seed(seed)
    _, labels, ids, _ = atlas.curated(categories) if categories is not None else atlas.curated()
    S = model.vocab.recipe.shape[1]
    centres = {c: torch.randn(S, generator=g) for c in dict.fromkeys(labels)}
    with torch.no_grad():
        for lab, i in zip(labels, ids):
            model.vocab.recipe[i] = centres[lab] + spread * torch.randn(S, generator=g)
    return model
