"""Soft-sparsity vocabularies (Relative Mean Gating, Learned Signal Routing): rate control, gradients, selection rule,
training with the ordinary loss, checkpoints.  Everything on tiny models built here (no training data needed)."""

import pytest
import torch

from reflow_core.checkpoint import load_model, save_checkpoint
from reflow_core.config import ConfigError, get_config
from reflow_core.vocab import VOCAB_MODULES, TopKVocab
from reflow_core.model import build_model
from reflow_core.vocab.gated import (
    RelativeMeanGatedVocab,
    RoutedVocab,
    active_per_token,
    measured_rate,
    quantile_threshold,
    routing_divergence,
)

FAMILIES = ["reflow-rmg", "reflow-routed"]


def tiny(family, seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(get_config(f"{family}@test", **overrides))


def test_presets_registry_and_rate_matched_to_topk():
    assert VOCAB_MODULES["rmg"] is RelativeMeanGatedVocab and VOCAB_MODULES["routed"] is RoutedVocab
    for size in ("test", "smoke", "small", "paper"):
        topk = get_config(f"reflow-topk@{size}")
        for family in FAMILIES:
            c = get_config(f"{family}@{size}")
            assert c.target_rate == pytest.approx(topk.topk / topk.n_signals)  # equal activation rate by design
            assert (c.n_layer, c.d_model, c.n_signals) == (topk.n_layer, topk.d_model, topk.n_signals)
    with pytest.raises(ConfigError, match="target_rate"):
        get_config("reflow-rmg@test", target_rate=0.0)
    with pytest.raises(ConfigError, match="target_rate"):
        get_config("reflow-rmg@test", target_rate=1.5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rate", [0.03, 0.125, 0.4])
def test_gate_holds_the_target_rate_on_random_weights(family, rate):
    model = tiny(family, target_rate=rate)
    if family == "reflow-routed":  # a router that is not the identity: the quantile must still hold the rate
        with torch.no_grad():
            for p in (model.vocab.route_signed, model.vocab.route_abs, model.vocab.route_bias):
                p.normal_(0, 0.3)
    V = model.config.real_vocab_size
    assert model.vocab.active_rate() == pytest.approx(rate, abs=2e-3)
    # and the rows the model actually uses are that sparse (straight-through: exact zeros elsewhere)
    R = model.vocab.recipe_matrix()[:V]
    assert (R != 0).float().mean().item() == pytest.approx(rate, abs=2e-3)
    assert measured_rate(model) == pytest.approx(rate, abs=2e-3)
    # the gathered rows used by the embedding agree with the full matrix
    idx = torch.tensor([[0, 5, 1234, 50256]])
    assert torch.allclose(model.vocab.recipe_rows(idx)[0], R[idx[0]])


def test_quantile_threshold_counts_exactly():
    s = torch.arange(1000.0).reshape(10, 100)
    for rate in (0.001, 0.1, 0.5, 1.0):
        assert int((s > quantile_threshold(s, rate)).sum()) == round(rate * 1000)


def test_rate_is_held_after_the_weights_move_and_the_cache_follows():
    model = tiny("reflow-rmg", target_rate=0.1)
    theta0 = float(model.vocab.threshold())
    with torch.no_grad():  # a tracked in-place edit: heavy-tailed rows move the threshold
        model.vocab.recipe.mul_(torch.randn_like(model.vocab.recipe).abs() ** 3)
    assert float(model.vocab.threshold()) != pytest.approx(theta0)
    assert model.vocab.active_rate() == pytest.approx(0.1, abs=2e-3)


def test_rmg_is_relative_to_the_row_mean_and_lets_counts_vary_per_token():
    model = tiny("reflow-rmg", target_rate=0.05)
    S = model.config.n_signals
    with torch.no_grad():
        R = model.vocab.recipe
        R.copy_(torch.randn_like(R) * 0.01)
        R[7] = 0.01
        R[7, :4] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # four strong signals (signs kept: no ReLU)
        R[8] = 0.01
        R[8, 3] = 1.0  # one strong signal
        R[9] = R[7] * 1000.0  # the same row at another scale: the same gates (relative rule)
    counts = active_per_token(model)
    assert counts[7] == 4 and counts[8] == 1  # Top-K would force the same K on every row
    gated = model.vocab.recipe_matrix()
    assert torch.equal(gated[7] != 0, gated[9] != 0)
    assert (gated[7, :4] == R[7, :4]).all() and gated[7, 4:].abs().sum() == 0
    assert gated[7, 1] < 0  # negative entries survive
    assert counts.float().std() > 0 and S > 4


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_inactive_entries_through_the_soft_gate(family):
    model = tiny(family)
    idx = torch.randint(0, 1000, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    V = model.config.real_vocab_size
    inactive = ~model.vocab.active_mask()
    g = model.vocab.recipe.grad[:V]
    # entries near the threshold but switched off still receive gradient (the sigmoid surrogate)
    assert (g[inactive] != 0).float().mean() > 0.3
    if family == "reflow-routed":
        for p in (model.vocab.route_signed, model.vocab.route_abs, model.vocab.route_bias):
            assert p.grad is not None and p.grad.abs().sum() > 0
    # contrast: hard Top-K gives the dropped entries no gradient at all
    torch.manual_seed(0)
    topk = build_model(get_config("reflow-topk@test"))
    _, loss = topk(idx, idx)
    loss.backward()
    dropped = topk.vocab.recipe_matrix()[:V] == 0
    assert topk.vocab.recipe.grad[:V][dropped].abs().sum() == 0
    assert isinstance(topk.vocab, TopKVocab)


def test_soft_mode_is_differentiable_in_the_forward_pass_too():
    torch.manual_seed(0)
    config = get_config("reflow-rmg@test", target_rate=0.1)
    vocab = RelativeMeanGatedVocab(config, straight_through=False)
    vocab.reset_parameters(config)
    rows = vocab.recipe_rows(torch.tensor([1, 2, 3]))
    raw = vocab.recipe[torch.tensor([1, 2, 3])]
    ratio = (rows / raw)  # the gate itself
    assert ((ratio > 0) & (ratio < 1)).all()  # a sigmoid, not 0/1
    rows.sum().backward()
    assert (vocab.recipe.grad[1:4] != 0).all()
    assert vocab.active_rate() == pytest.approx(0.1, abs=2e-3)  # g > 1/2 is still held at the rate


@pytest.mark.parametrize("family", FAMILIES)
def test_ordinary_training_lowers_the_loss_at_constant_rate(family, tmp_path):
    model = tiny(family, target_rate=0.2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 300, (4, 33), generator=g)
    x, y = batch[:, :-1], batch[:, 1:]
    losses = []
    for _ in range(25):
        _, loss = model(x, y)  # no auxiliary loss: the rate is held by the threshold, not a penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
    assert model.vocab.active_rate() == pytest.approx(0.2, abs=2e-3)
    if family == "reflow-routed":
        assert routing_divergence(model) > 0  # the router has learned something RMG would not do
    # checkpoint round trip through safetensors rebuilds the same module and the same outputs
    save_checkpoint(tmp_path, model, step=25)
    loaded, _ = load_model(tmp_path)
    assert type(loaded.vocab) is type(model.vocab)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x)[0], model(x)[0], atol=1e-5)


def _metrics(family, cos, mrr, sil, spread=0.01):
    """A variant's metrics with the collapse statistics as intervals of half-width ``spread`` (one seed: a bootstrap
    over analogies / words; the three↔four pair a point)."""
    from reflow_core.chapters.sparsity_variants import VariantMetrics
    from reflow_core.experiments.common import Interval

    collapse = {"three↔four cosine": Interval(cos, float("nan"), float("nan"), 1, [cos]),
                "algebra MRR": Interval(mrr, mrr - spread, mrr + spread, 26, [mrr]),
                "silhouette": Interval(sil, sil - spread, sil + spread, 40, [sil])}
    return VariantMetrics(family=family, val_loss=3.0, rate=0.0625, active_mean=8.0, active_sd=1.0, rate_at_2=0.1,
                          gini=0.1, three_four=cos, purity=0.5, silhouette=sil, silhouette_p=0.01, mrr=mrr,
                          paper_hits=1, ms_per_step=10.0, tokens_per_s=1000.0, collapse=collapse)


def _structure(passed=True):
    from reflow_core.scorecard import Control

    return Control("dense reFlow shows the three structures", passed, "planted")


def test_soft_sparsity_row_verdicts():
    """Planted: dense shows the structure, Top-K loses it; RMG keeps it (reproduced) or keeps none of it (not
    reproduced); a structureless build or a Top-K that loses nothing is not testable; a partial keep is
    inconclusive."""
    from reflow_core.scorecard import INCONCLUSIVE, NOT_REPRODUCED, NOT_TESTABLE, REPRODUCED
    from reflow_core.chapters.sparsity_variants import soft_sparsity_row

    dense, topk = _metrics("reflow", 0.7, 0.5, 0.1), _metrics("reflow-topk", 0.3, 0.1, -0.02)
    keeps = {"reflow": dense, "reflow-topk": topk, "reflow-rmg": _metrics("reflow-rmg", 0.6, 0.4, 0.08),
             "reflow-routed": _metrics("reflow-routed", 0.2, 0.05, -0.05)}
    row = soft_sparsity_row(keeps, "paper", "x", _structure())
    assert row.verdict == REPRODUCED and row.control.passed
    loses = dict(keeps, **{"reflow-rmg": _metrics("reflow-rmg", 0.25, 0.05, -0.05)})
    assert soft_sparsity_row(loses, "paper", "x", _structure()).verdict == NOT_REPRODUCED
    partly = dict(loses, **{"reflow-rmg": _metrics("reflow-rmg", 0.6, 0.05, 0.08)})
    assert soft_sparsity_row(partly, "paper", "x", _structure()).verdict == INCONCLUSIVE
    # the same numbers on a model that shows no structure (its competence gate failed): not testable
    row = soft_sparsity_row(keeps, "test", "x", _structure(False))
    assert row.verdict == NOT_TESTABLE and not row.control.passed
    # Top-K loses nothing (higher than dense on the cosine): nothing to keep, not testable whatever RMG does
    no_collapse = dict(keeps, **{"reflow-topk": _metrics("reflow-topk", 0.8, 0.1, -0.02)})
    row = soft_sparsity_row(no_collapse, "test", "x", _structure())
    assert row.verdict == NOT_TESTABLE and row.claim_id == "thread.soft_sparsity"
    assert "Top-K loses the structure (collapse rule, dense vs Top-K): failed" in row.control.detail
    # differences inside the statistics' spread are no loss either
    noisy = {n: _metrics(n, m.three_four, m.mrr, m.silhouette, spread=1.0) for n, m in keeps.items()}
    assert soft_sparsity_row(noisy, "paper", "x", _structure()).verdict == NOT_TESTABLE
