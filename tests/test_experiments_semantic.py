"""Experiments 4–6 (Semantic Galaxy, Semantic Algebra, Typo Resilience) on tiny models with PLANTED structure.

Each test plants the answer into the recipe matrix and checks that the experiment finds it while the same model
without the plant (or the experiment's own null) does not; and that each verdict follows the scorecard's rule: the
planted structure is reproduced, its absence is "not reproduced" only with a passed positive control (else "not
testable at this scale"), and a null that meets the criterion makes the row inconclusive.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from chapter_checks import check_chapter
from planted import plant_categories

from reflow_core.chapters import semantic_properties
from reflow_core.config import get_config
from reflow_core.experiments import algebra, atlas, controls, galaxy, typo
from reflow_core.model import build_model
from reflow_core.scorecard import INCONCLUSIVE, NOT_REPRODUCED, NOT_TESTABLE, REPRODUCED, Control
from reflow_core.tokenizer import encode, single_token_id

PASSED = Control("planted control", True, "the test sees the effect on this build")
FAILED = Control("planted control", False, "no model shows the effect on this build")


def tiny(family: str = "reflow", seed: int = 0):
    torch.manual_seed(seed)
    return build_model(get_config(f"{family}@test")).eval()


# ----------------------------------------------------------------------------------------------
# 4 Semantic Galaxy


def plant_galaxy(model, spread: float = 0.1, seed: int = 1):
    return plant_categories(model, spread, seed, categories=galaxy.galaxy_categories())


def test_planted_clusters_have_high_silhouette_and_the_permutation_null_is_near_zero():
    planted = galaxy.semantic_galaxy(plant_galaxy(tiny()), n_perm=99)
    assert planted.silhouette > 0.8 and planted.silhouette_pca > 0.2
    assert planted.p_value == pytest.approx(0.01)  # beyond all 99 shuffles
    # shuffled labels never make clusters: the null sits at or below zero (negative when the data are clustered)
    assert planted.null.max() < 0.05 and planted.null.mean() < 0.0
    rand = galaxy.semantic_galaxy(tiny(), n_perm=99)
    assert rand.silhouette < 0.05 and rand.p_value > 0.05
    assert planted.per_word.mean() == pytest.approx(planted.silhouette)


def test_galaxy_verdict_follows_the_rule():
    planted = galaxy.semantic_galaxy(plant_galaxy(tiny()), n_perm=99)
    rand = galaxy.semantic_galaxy(tiny(), n_perm=99)
    row = galaxy.scorecard_rows({"reflow": [planted]}, "test", "x", PASSED)[0]
    assert row.verdict == REPRODUCED and row.p_value == pytest.approx(planted.p_value)
    assert galaxy.scorecard_rows({"reflow": [planted]}, "test", "x", FAILED)[0].verdict == REPRODUCED
    # a random model: no clusters; "not reproduced" only where the control passed
    assert galaxy.scorecard_rows({"reflow": [rand]}, "test", "x", FAILED)[0].verdict == NOT_TESTABLE
    assert galaxy.scorecard_rows({"reflow": [rand]}, "test", "x", PASSED)[0].verdict == NOT_REPRODUCED
    # seeds that disagree: the interval straddles
    assert galaxy.scorecard_rows({"reflow": [planted, rand]}, "test", "x", PASSED)[0].verdict == INCONCLUSIVE
    # the model at initialisation clusters too: the null meets the criterion
    row = galaxy.scorecard_rows({"reflow": [planted], "reflow (init)": [planted]}, "test", "x", PASSED)[0]
    assert row.verdict == INCONCLUSIVE and "initialisation" in row.why


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


def plant_only_c(model):
    """The paper's three analogies 'solved' without arithmetic: b = a (the offset is zero) and d = c, so d is the
    nearest row to c alone."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        R = model.vocab.recipe
        for a, b, c, d, _ in algebra.load_words("analogies")["paper"]:
            ia, ib, ic, idd = (single_token_id(w) for w in (a, b, c, d))
            R[ib] = R[ia] + 1e-3 * torch.randn(R.shape[1], generator=g)
            R[idd] = R[ic] + 1e-3 * torch.randn(R.shape[1], generator=g)
    return model


def test_algebra_verdict_follows_the_rule():
    planted = algebra.semantic_algebra(plant_analogies(tiny()))
    rand = algebra.semantic_algebra(tiny())
    row = algebra.scorecard_rows({"reflow": [planted]}, "test", "x", PASSED)[0]
    assert row.verdict == REPRODUCED and row.p_value == pytest.approx(planted.p_value) and row.p_value < 0.05
    assert algebra.scorecard_rows({"reflow": [rand]}, "test", "x", FAILED)[0].verdict == NOT_TESTABLE
    assert algebra.scorecard_rows({"reflow": [rand]}, "test", "x", PASSED)[0].verdict == NOT_REPRODUCED
    assert algebra.scorecard_rows({"reflow": [planted, rand]}, "test", "x", PASSED)[0].verdict == INCONCLUSIVE
    # only-c already finds d: the three hits are no evidence of arithmetic
    only_c = algebra.semantic_algebra(plant_only_c(tiny()))
    assert algebra.paper_hits(only_c) == 3 and algebra.paper_hits(only_c, only_c=True) == 3
    row = algebra.scorecard_rows({"reflow": [only_c]}, "test", "x", PASSED)[0]
    assert row.verdict == INCONCLUSIVE and "only-c" in row.why
    row = algebra.scorecard_rows({"reflow": [planted], "reflow (init)": [planted]}, "test", "x", PASSED)[0]
    assert row.verdict == INCONCLUSIVE and "initialisation" in row.why


def fake_gates(passed: bool) -> dict:
    """Model-level controls of both families with every control at ``passed``."""
    c = Control("fake", passed)
    return {f: controls.ModelControls(f, {n: c for n in controls.MODEL_CONTROLS}) for f in ("reflow", "gpt2-new")}


def test_algebra_control_needs_the_gate_and_the_planted_offsets_found():
    model = tiny()
    assert controls.spike_analogies(model).passed  # the test finds offsets planted into random rows
    assert controls.claim_control("algebra.hits", fake_gates(True), model).passed
    assert not controls.claim_control("algebra.hits", fake_gates(False), model).passed


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
    # one seed: MRR and silhouette carry a bootstrap interval over analogies / words
    stats = algebra.collapse_statistics(at["reflow"], al["reflow"], ga["reflow"])
    assert stats["algebra MRR"].n > 1 and stats["algebra MRR"].lo < stats["algebra MRR"].mean < stats["algebra MRR"].hi
    assert algebra.topk_collapse_row(at, al, ga, "test", "x", PASSED).verdict == REPRODUCED
    swapped = {k: {"reflow": v["reflow-topk"], "reflow-topk": v["reflow"]} for k, v in (("at", at), ("al", al), ("ga", ga))}
    # Top-K keeps (here: has more of) the structure: not lower on any statistic
    assert algebra.topk_collapse_row(swapped["at"], swapped["al"], swapped["ga"], "test", "x",
                                     PASSED).verdict == NOT_REPRODUCED
    assert algebra.topk_collapse_row(swapped["at"], swapped["al"], swapped["ga"], "test", "x",
                                     FAILED).verdict == NOT_TESTABLE
    # the same model on both sides: lower on none beyond its spread, and not higher on all → straddles
    same = {k: {"reflow": v["reflow"], "reflow-topk": v["reflow"]} for k, v in (("at", at), ("al", al), ("ga", ga))}
    assert algebra.topk_collapse_row(same["at"], same["al"], same["ga"], "test", "x", PASSED).verdict == INCONCLUSIVE
    # dense reFlow without the structure (its control failed): nothing to lose, whatever the comparison says
    assert algebra.topk_collapse_row(at, al, ga, "test", "x", FAILED).verdict == NOT_TESTABLE
    rand2 = tiny(seed=4)
    structureless = {"reflow": [rand2], "reflow-topk": [rand]}
    assert algebra.topk_collapse_row({k: [atlas.recipe_atlas(m[0])] for k, m in structureless.items()},
                                     {k: [algebra.semantic_algebra(m[0])] for k, m in structureless.items()},
                                     {k: [galaxy.semantic_galaxy(m[0], n_perm=20)] for k, m in structureless.items()},
                                     "test", "x", FAILED).verdict == NOT_TESTABLE
    assert algebra.topk_collapse_row({}, {"reflow": al["reflow"]}, {}, "test", "x", PASSED).verdict == NOT_TESTABLE
    # the chapter's control: dense reFlow's recipe rows must show the three structures first
    assert semantic_properties.reference_structure(at["reflow"], al["reflow"], ga["reflow"]).passed
    assert not semantic_properties.reference_structure(at["reflow-topk"], al["reflow-topk"], ga["reflow-topk"]).passed


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
    row = typo.scorecard_rows({"reflow": [planted]}, "test", "x", PASSED)[0]
    assert row.verdict == REPRODUCED and row.p_value == pytest.approx(planted.p_value("readout"))
    assert rand.p_value("readout") > 0.05  # the random model shows nothing: the control decides
    assert typo.scorecard_rows({"reflow": [rand]}, "test", "x", FAILED)[0].verdict == NOT_TESTABLE
    assert typo.scorecard_rows({"reflow": [rand]}, "test", "x", PASSED)[0].verdict == NOT_REPRODUCED
    assert typo.scorecard_rows({"reflow": [planted, rand]}, "test", "x", PASSED)[0].verdict == INCONCLUSIVE
    row = typo.scorecard_rows({"reflow": [planted], "reflow (init)": [planted]}, "test", "x", PASSED)[0]
    assert row.verdict == INCONCLUSIVE and "initialisation" in row.why


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
