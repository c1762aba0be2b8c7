"""Experiments 1–3 (Recipe Atlas, Sparsity Profile, Basis Geometry) on tiny models with PLANTED structure.

Every test plants an answer into the weights and checks the experiment finds it — and that the same statistic on an
unplanted (random) model does not, so no test here would pass on a random model.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from chapter_checks import check_chapter
from planted import plant_categories

from reflow_core.config import get_config
from reflow_core import stimuli
from reflow_core.experiments import atlas, common, geometry, sparsity
from reflow_core.model import build_model
from reflow_core.scorecard import INCONCLUSIVE, NOT_REPRODUCED, NOT_TESTABLE, REPRODUCED, Control

PASSED = Control("planted effect found", True)
FAILED = Control("no model shows the effect", False)
SPARSITY_PASSED = dict.fromkeys(("sparsity.rate", "sparsity.gini"), PASSED)
from reflow_core.tokenizer import single_token_id


def tiny(family: str = "reflow", seed: int = 0):
    torch.manual_seed(seed)
    return build_model(get_config(f"{family}@test")).eval()


# ----------------------------------------------------------------------------------------------
# common.py


def test_check_tokens_reports_why_words_are_dropped():
    check = stimuli.check_tokens([" king", " goverment", " king", "king", "\u2009king"])
    assert check.ids == {" king": single_token_id(" king"), "king": single_token_id("king")}
    assert check.dropped[" goverment"] == "splits into 3 tokens [' go', 'ver', 'ment']"
    assert " king" not in check.dropped
    assert "1 kept" not in check.report() and "dropped" in check.report()


def test_curated_lists_keep_enough_words():
    cats, dropped = stimuli.category_ids(stimuli.load_words("categories")["categories"])
    assert all(len(ws) >= 8 for ws in cats.values()), {c: len(ws) for c, ws in cats.items()}
    assert len(dropped) <= 3
    from reflow_core.experiments import algebra, typo

    kept, _ = algebra.analogy_set()
    assert len(kept) >= 20
    paper = {tuple(a[:4]) for a in stimuli.load_words("analogies")["paper"]}
    assert paper <= set(kept)
    pairs, templates = typo.typo_pairs()
    assert len(pairs) >= 30 and all("{w}" in t for t in templates)
    assert all(single_token_id(c) is not None for c, _ in pairs)  # the correct word is one token


def test_gini_and_intervals():
    assert common.gini(np.ones(100)) == pytest.approx(0.0, abs=1e-12)
    assert common.gini(np.eye(1, 100).ravel()) == pytest.approx(0.99, abs=1e-9)
    iv = common.seed_interval([1.0, 2.0, 3.0])
    assert iv.lo < 2.0 < iv.hi and iv.n == 3
    one = common.seed_interval([0.5])
    assert one.mean == 0.5 and math.isnan(one.lo) and one.fmt(".1f") == "0.5"
    est, lo, hi = common.bootstrap_ci(np.arange(100.0))
    assert lo < est < hi


def test_vocab_rows_exclude_padding_and_follow_the_vocabulary():
    m, b = tiny("reflow"), tiny("gpt2-new")
    assert common.vocab_rows(m).shape == (50257, m.config.n_signals)
    assert common.vocab_rows(b).shape == (50257, b.config.d_model)
    torch.testing.assert_close(common.embedding_rows(m), (m.vocab.recipe @ m.vocab.basis)[:50257].detach())


def test_gaussian_like_keeps_row_norms():
    M = torch.randn(50, 16) * torch.arange(1, 51)[:, None]
    G = common.gaussian_like(M)
    torch.testing.assert_close(G.norm(dim=1), M.norm(dim=1))


# ----------------------------------------------------------------------------------------------
# 1 Recipe Atlas


def test_identical_recipes_are_each_others_nearest_neighbours():
    m = tiny()
    three, four = single_token_id(" three"), single_token_id(" four")
    with torch.no_grad():
        m.vocab.recipe[four] = m.vocab.recipe[three]
    r = atlas.recipe_atlas(m)
    assert r.named["three↔four"] == pytest.approx(1.0, abs=1e-5)
    assert r.named_percentile["three↔four"] == 100.0
    assert r.vocab_neighbours[" three"][0][0] == " four" and r.vocab_neighbours[" four"][0][0] == " three"
    assert r.top_pairs[0][:2] in ((" three", " four"), (" four", " three"))
    # the unplanted model: no such pair
    assert atlas.recipe_atlas(tiny()).named["three↔four"] < 0.5


def test_planted_categories_give_pure_neighbourhoods_and_the_scorecard_says_so():
    planted = atlas.recipe_atlas(plant_categories(tiny()))
    rand = atlas.recipe_atlas(tiny())
    assert planted.purity > 0.95 and planted.top_pairs_valid == 20 and planted.vocab_top1_valid > 0.95
    assert rand.purity < 0.3 and rand.top_pairs_valid < 8
    assert abs(rand.purity - rand.chance) < 0.1  # a random table sits at chance
    passed = dict.fromkeys(("atlas.three_four", "atlas.top20"), PASSED)
    failed = dict.fromkeys(("atlas.three_four", "atlas.top20"), FAILED)
    rows = {r.claim_id: r for r in atlas.scorecard_rows({"reflow": [planted], "reflow (init)": [rand]}, "test", "x",
                                                         failed)}
    assert rows["atlas.top20"].verdict == REPRODUCED and rows["atlas.three_four"].verdict == REPRODUCED
    rows = {r.claim_id: r for r in atlas.scorecard_rows({"reflow": [rand]}, "test", "x", passed)}
    assert rows["atlas.top20"].verdict == NOT_REPRODUCED and rows["atlas.three_four"].verdict == NOT_REPRODUCED
    rows = {r.claim_id: r for r in atlas.scorecard_rows({"reflow": [rand]}, "test", "x", failed)}  # no power: no verdict
    assert rows["atlas.top20"].verdict == NOT_TESTABLE and rows["atlas.three_four"].verdict == NOT_TESTABLE


# ----------------------------------------------------------------------------------------------
# 2 Sparsity Profile


def test_gaussian_rows_give_eleven_percent_at_c2():
    g = torch.Generator().manual_seed(0)
    R = torch.randn(20000, 128, generator=g) * torch.rand(20000, 1, generator=g)  # any row norms
    res = sparsity.profile(R)
    assert res.rate_at_2 == pytest.approx(float(sparsity.gaussian_rate(2.0)), abs=0.003)
    assert float(sparsity.gaussian_rate(2.0)) == pytest.approx(0.1105, abs=5e-4)
    assert abs(res.excess_kurtosis) < 0.1
    # the whole sweep follows the Gaussian curve, and the same-norm null tracks it
    np.testing.assert_allclose(res.rate, sparsity.gaussian_rate(res.cs), atol=0.005)
    np.testing.assert_allclose(res.rate, res.null_rate, atol=0.005)
    rows = {r.claim_id: r for r in sparsity.scorecard_rows({"reflow": [res]}, "test", "x", SPARSITY_PASSED)}
    # structureless rows meet both published figures, and so does their null: the rows cannot show learned sparsity
    assert rows["sparsity.rate"].verdict == INCONCLUSIVE and "Gaussian" in rows["sparsity.rate"].why
    assert rows["sparsity.gini"].verdict == INCONCLUSIVE


def test_planted_sparse_recipes_are_measured_as_sparse_and_uneven():
    V, S, k = 4000, 128, 8
    R = torch.zeros(V, S)
    R[:, :k] = torch.sign(torch.randn(V, k))  # every row uses the same 8 signals
    res = sparsity.profile(R)
    assert res.rate_at_2 == pytest.approx(k / S)
    assert res.active_at_2 == pytest.approx(k)
    assert res.gini > 0.9 and res.excess_kurtosis > 5
    rows = {r.claim_id: r for r in sparsity.scorecard_rows({"reflow": [res]}, "test", "x", SPARSITY_PASSED)}
    assert rows["sparsity.gini"].verdict == NOT_REPRODUCED
    assert rows["sparsity.rate"].verdict == NOT_REPRODUCED  # 6.25% is not 11.38%
    assert res.top_signal_mass > 0.6  # 8 of 128 signals carry all the mass


def test_sparsity_profile_on_a_model_uses_its_recipe_rows():
    m = tiny()
    with torch.no_grad():
        m.vocab.recipe.zero_()
        m.vocab.recipe[:, 0] = 1.0
    res = sparsity.sparsity_profile(m)
    assert res.rate_at_2 == pytest.approx(1 / m.config.n_signals)


# ----------------------------------------------------------------------------------------------
# 3 Basis Geometry


@pytest.mark.parametrize("r", [3, 10])
def test_rank_r_planted_basis_has_effective_rank_r(r):
    m = tiny()
    S, d = m.vocab.basis.shape
    g = torch.Generator().manual_seed(r)
    U, _ = torch.linalg.qr(torch.randn(S, r, generator=g))
    V, _ = torch.linalg.qr(torch.randn(d, r, generator=g))
    with torch.no_grad():
        m.vocab.basis.copy_(U @ V.t())  # r equal singular values, the rest zero
    res = geometry.basis_geometry(m)
    assert res.spectra["basis"].effective_rank == pytest.approx(r, abs=1e-3)
    assert res.spectra["basis"].participation_ratio == pytest.approx(r, abs=1e-3)
    assert res.spectra["product"].effective_rank <= r + 1e-3
    assert res.spectra["basis (gaussian)"].effective_rank > 2 * r  # the null of the same shape is far richer


def test_orthogonal_basis_rows_have_zero_cosines():
    m = tiny()
    with torch.no_grad():
        m.vocab.basis.copy_(torch.eye(m.vocab.basis.shape[0]))
    res = geometry.basis_geometry(m)
    assert res.mean_abs_cos == pytest.approx(0.0, abs=1e-6) and res.mean_abs_cos_null > 0.05
    assert geometry.basis_geometry(tiny("gpt2-new")).basis_cos is None  # a tied model has no basis


# ----------------------------------------------------------------------------------------------
# The chapter notebook at scale="test"

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_signal_identity_notebook_executes(real_book):
    check_chapter(real_book, "03_signal_identity",
                  ["fig-signal-identity-atlas-heatmap", "fig-signal-identity-atlas-purity",
                   "fig-signal-identity-sparsity-sweep", "fig-signal-identity-geometry"],
                  "scorecard-signal-identity", {"atlas.three_four", "atlas.top20", "sparsity.rate", "sparsity.gini"})
