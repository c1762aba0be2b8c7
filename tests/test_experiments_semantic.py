"""Experiments 4–6 (Semantic Galaxy, Semantic Algebra, Typo Resilience) on tiny models with PLANTED structure.

Each test plants the answer into the recipe matrix and checks that the experiment finds it while the same model
without the plant (or the experiment's own null) does not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from chapter_checks import check_chapter

from reflow_core.config import get_config
from reflow_core.experiments import algebra, atlas, galaxy, typo
from reflow_core.model import build_model
from reflow_core.scorecard import NOT_REPRODUCED, NOT_TESTABLE, REPRODUCED
from reflow_core.tokenizer import encode, single_token_id


def tiny(family: str = "reflow", seed: int = 0):
    torch.manual_seed(seed)
    return build_model(get_config(f"{family}@test")).eval()


# ----------------------------------------------------------------------------------------------
# 4 Semantic Galaxy


def plant_galaxy(model, spread: float = 0.1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    words, labels, ids, _ = atlas.curated(galaxy.galaxy_categories())
    S = model.vocab.recipe.shape[1]
    centres = {c: torch.randn(S, generator=g) for c in dict.fromkeys(labels)}
    with torch.no_grad():
        for lab, i in zip(labels, ids):
            model.vocab.recipe[i] = centres[lab] + spread * torch.randn(S, generator=g)
    return model


def test_planted_clusters_have_high_silhouette_and_the_permutation_null_is_near_zero():
    planted = galaxy.semantic_galaxy(plant_galaxy(tiny()), n_perm=99)
    assert planted.silhouette > 0.8 and planted.silhouette_pca > 0.2
    assert planted.p_value == pytest.approx(0.01)  # beyond all 99 shuffles
    # shuffled labels never make clusters: the null sits at or below zero (negative when the data are clustered)
    assert planted.null.max() < 0.05 and planted.null.mean() < 0.0
    rand = galaxy.semantic_galaxy(tiny(), n_perm=99)
    assert rand.silhouette < 0.05 and rand.p_value > 0.05
    assert galaxy.scorecard_rows({"reflow": [planted]}, "test", "x")[0].verdict == REPRODUCED
    assert galaxy.scorecard_rows({"reflow": [rand]}, "test", "x")[0].verdict == NOT_REPRODUCED


def test_silhouette_with_null_on_plain_arrays():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 0.1, (20, 5)) + 3 * np.eye(5)[k] for k in range(3)])
    labels = np.repeat(["a", "b", "c"], 20)
    obs, null, p = galaxy.silhouette_with_null(X, labels, n_perm=50)
    assert obs > 0.7 and p == pytest.approx(1 / 51) and null.max() < 0.05


# ----------------------------------------------------------------------------------------------
# 5 Semantic Algebra


def plant_analogies(model):
    """Unit-norm rows for a, b, c and r_d = r_b − r_a + r_c for the paper's three analogies."""
    with torch.no_grad():
        for a, b, c, d, _ in algebra.load_words("analogies")["paper"]:
            ia, ib, ic, idd = (single_token_id(w) for w in (a, b, c, d))
            for i in (ia, ib, ic):
                model.vocab.recipe[i] /= model.vocab.recipe[i].norm()
            model.vocab.recipe[idd] = model.vocab.recipe[ib] - model.vocab.recipe[ia] + model.vocab.recipe[ic]
    return model


def test_planted_analogy_is_solved_at_rank_one_and_random_rows_are_not():
    planted = algebra.semantic_algebra(plant_analogies(tiny()))
    ranks = [rank for _, rank, _ in algebra.paper_ranks(planted)]
    assert ranks == [1, 1, 1]
    assert planted.p_value < 0.05  # the planted targets beat random targets
    rand = algebra.semantic_algebra(tiny())
    assert all(rank > 100 for _, rank, _ in algebra.paper_ranks(rand))
    assert rand.hits(5) < 0.1 and rand.mrr < 0.05
    assert algebra.scorecard_rows({"reflow": [planted]}, "test", "x")[0].verdict == REPRODUCED
    assert algebra.scorecard_rows({"reflow": [rand]}, "test", "x")[0].verdict == NOT_REPRODUCED


def test_inputs_are_excluded_from_the_ranking():
    m = tiny()
    man, king, woman, queen = (single_token_id(w) for w in (" man", " king", " woman", " queen"))
    with torch.no_grad():  # make the query point at "king" itself: it must not count
        m.vocab.recipe[man] = 0.0001 * m.vocab.recipe[man]
        m.vocab.recipe[woman] = 0.0001 * m.vocab.recipe[woman]
    res = algebra.semantic_algebra(m, [(" man", " king", " woman", " queen")], n_null=10)
    assert res.top[0] != " king" and res.ranks[0] > 1


def test_topk_collapse_row():
    planted = plant_analogies(plant_galaxy(tiny()))
    with torch.no_grad():
        planted.vocab.recipe[single_token_id(" four")] = planted.vocab.recipe[single_token_id(" three")]
    rand = tiny(seed=3)
    at = {"reflow": [atlas.recipe_atlas(planted)], "reflow-topk": [atlas.recipe_atlas(rand)]}
    al = {"reflow": [algebra.semantic_algebra(planted)], "reflow-topk": [algebra.semantic_algebra(rand)]}
    ga = {"reflow": [galaxy.semantic_galaxy(planted, n_perm=20)], "reflow-topk": [galaxy.semantic_galaxy(rand, n_perm=20)]}
    assert algebra.topk_collapse_row(at, al, ga, "test", "x").verdict == REPRODUCED
    swapped = {k: {"reflow": v["reflow-topk"], "reflow-topk": v["reflow"]} for k, v in (("at", at), ("al", al), ("ga", ga))}
    assert algebra.topk_collapse_row(swapped["at"], swapped["al"], swapped["ga"], "test", "x").verdict == NOT_REPRODUCED
    assert algebra.topk_collapse_row({}, {"reflow": al["reflow"]}, {}, "test", "x").verdict == NOT_TESTABLE


# ----------------------------------------------------------------------------------------------
# 6 Typo Resilience

PAIRS = [(" king", " queen"), (" dog", " cat"), (" red", " blue"), (" one", " two"), (" France", " Paris"),
         (" walked", " ran"), (" government", " goverment")]
TEMPLATES = ["I wrote about the{w}", "She said that{w}"]


def plant_typos(model):
    """Every token of the 'misspelling' gets the recipe row of the correct word."""
    with torch.no_grad():
        for correct, wrong in PAIRS:
            for t in encode(wrong):
                model.vocab.recipe[t] = model.vocab.recipe[single_token_id(correct)]
    return model


def test_typo_with_the_correct_recipe_is_found_resilient():
    assert len(encode(" goverment")) > 1  # one multi-token misspelling, handled explicitly
    planted = typo.typo_resilience(plant_typos(tiny()), PAIRS, TEMPLATES, n_null=100)
    np.testing.assert_allclose(planted.matched["recipe"], 1.0, atol=1e-5)
    np.testing.assert_allclose(planted.matched["readout"][:-1], 1.0, atol=1e-4)  # single-token pairs: identical
    np.testing.assert_allclose(planted.matched["top1"][:-1], 1.0)
    assert planted.p_value("readout") < 0.05 and planted.effect("readout") > 0.5
    assert planted.mean("top10") > planted.null_mean("top10")
    rand = typo.typo_resilience(tiny(), PAIRS, TEMPLATES, n_null=100)
    assert abs(rand.effect("recipe")) < 0.2 and rand.effect("readout") < 0.3
    assert typo.scorecard_rows({"reflow": [planted]}, "test", "x")[0].verdict == REPRODUCED


def test_typo_features_read_the_last_token_of_the_word():
    m = tiny()
    f = typo.word_features(m, [" goverment"], ["She said that{w}"])
    idx = torch.tensor([encode("She said that") + encode(" goverment")])
    with torch.no_grad():
        expected = m.signal_readout(m.residual(idx)[0, -1])
    torch.testing.assert_close(f.readout[0, 0], expected)
    assert f.n_tokens == [len(encode(" goverment"))]


# ----------------------------------------------------------------------------------------------
# The chapter notebook at scale="test"

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_semantic_notebook_executes(real_book):
    check_chapter(real_book, "04_semantic_properties",
                  ["fig-semantic-galaxy", "fig-semantic-algebra", "fig-semantic-typo"],
                  "scorecard-semantic", {"galaxy.silhouette", "algebra.hits", "topk.collapse", "typo.resilience"})
