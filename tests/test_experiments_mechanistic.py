"""Experiments 7–9 (Layer Evolution, Signal Flow, Causal Ablation) on tiny models with PLANTED structure.

The planted models are reFlow@test models whose blocks are made the identity (attention and MLP output projections
zeroed), whose W_basis is the identity (S = d) and whose final norm has weight 1: the read-out of the last position is
then exactly RMSNorm(recipe row of the last token), so we can write into W_recipe which signal carries which token.

The verdict tests follow the scorecard's rule: planted structure is reproduced; its absence is "not reproduced" only
with a passed positive control; a model that recalls no fact (or whose expected answer is never top-1) is "not
testable at this scale"; a null that meets the criterion, or an interval across the threshold, is inconclusive.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from chapter_checks import check_chapter
from planted import identity_model

from reflow_core.config import get_config
from reflow_core.model import build_model
from reflow_core.hooks import layer_hook_name, residual_states
from reflow_core.scorecard import INCONCLUSIVE, NOT_REPRODUCED, NOT_TESTABLE, REPRODUCED, Control
from reflow_core.tokenizer import single_token_id as tid
from reflow_core.experiments import ablation, evolution, flow

PASSED = Control("planted control", True, "the model recalls the facts on this build")
FAILED = Control("planted control", False, "the model recalls no fact on this build")

PROMPT = "The capital of France is"
FUNCTION = [" the", " a", " in", " to", " an", " at"]
ITEMS = [{"prompt": PROMPT, "target": " Paris"}]


def both(control: Control) -> dict:
    return {"ablation.single": control, "ablation.codebook": control}


def e(j, S=32):
    v = torch.zeros(S)
    v[j] = 1.0
    return v


def ablation_model():
    """' is' (last prompt token) reads as signals 5 and 7; ' Paris' is written only through signal 5;
    six function words carry the largest weight on signal 5 but are suppressed through signal 7."""
    m = identity_model(2)
    with torch.no_grad():
        R = m.vocab.recipe
        R[tid(" is")] = 3 * e(5) + 3 * e(7) + 0.3 * torch.randn(32)
        R[tid(" Paris")] = 8 * e(5)
        for i, w in enumerate(FUNCTION):
            R[tid(w)] = (9.0 - 0.1 * i) * e(5) - 12 * e(7)
    return m


# ----------------------------------------------------------------------------------------------
# Experiment 9


def test_single_signal_ablation_removes_planted_target():
    m = ablation_model()
    r = ablation.causal_ablation(m, PROMPT, tid(" Paris"), n_random=64, residual=True, n_random_residual=4)
    assert r.order[0] == 5  # the planted carrier is found as the top contributor
    assert r.p_before > 0.05
    assert r.p_top[0] < r.p_before / 1000  # knocking out signal 5 removes the target
    # residual mode: the signal projected off every layer state has the same effect
    assert r.p_top_residual[0] < r.p_before / 1000
    # random single signals (signal 5 is drawn 1 time in 32) mostly leave p untouched: the null
    assert np.median(r.p_random[0]) > 0.5 * r.p_before
    assert r.beyond_random_1 >= 0.9
    # codebook of the carrier = the planted function words; random signals' codebooks hold none
    assert set(r.codebook) == set(FUNCTION)
    assert r.codebook_function_share == 1.0 and r.null_function_share < 0.2
    over = ablation.ablation_over_prompts(m, ITEMS, n_random=64)
    assert over["n_recalled"] == 1 and over["rank"] == [1]
    rows = ablation.scorecard_rows(r, [over], "test", "x", both(PASSED))
    assert [row.verdict for row in rows] == [REPRODUCED, REPRODUCED]


def test_codebook_leaves_the_target_out():
    """The carrier is chosen for carrying the target, so the target tops its codebook by selection: it is left out."""
    m = ablation_model()
    with torch.no_grad():
        m.vocab.recipe[tid(" Paris")] = 20 * e(5)  # now the largest weight on the carrier
    r = ablation.causal_ablation(m, PROMPT, tid(" Paris"), n_random=16)
    assert r.order[0] == 5 and " Paris" not in r.codebook and set(r.codebook) == set(FUNCTION)
    assert ablation.codebook(m, 5)[0] == " Paris"  # without the exclusion it would lead the codebook


def spread_model():
    """' Paris' is the clear top-1, carried evenly by all 32 signals: no single signal holds it."""
    m = identity_model(2)
    with torch.no_grad():
        m.vocab.recipe[tid(" is")] = torch.ones(32)
        m.vocab.recipe[tid(" Paris")] = 0.5 * torch.ones(32)
    return m


def test_ablation_verdict_follows_the_rule():
    spread = spread_model()
    r = ablation.causal_ablation(spread, PROMPT, tid(" Paris"), ks=[1], n_random=16)
    over = ablation.ablation_over_prompts(spread, ITEMS, n_random=16)
    assert over["n_recalled"] == 1 and over["fold_top1"][0] < 2  # recalled, but one signal does not collapse it
    single = ablation.scorecard_rows(r, [over], "test", "x", both(PASSED))[0]
    assert single.verdict == NOT_REPRODUCED
    assert ablation.scorecard_rows(r, [over], "test", "x", both(FAILED))[0].verdict == NOT_TESTABLE
    # a random model recalls no fact: nothing to ablate, not testable whatever the control says
    rand = identity_model(2, seed=1)
    over = ablation.ablation_over_prompts(rand, ITEMS, n_random=8)
    assert over["n_recalled"] == 0
    rows = ablation.scorecard_rows(ablation.causal_ablation(rand, PROMPT, tid(" Paris"), ks=[1], n_random=8),
                                   [over], "test", "x", both(PASSED))
    assert [row.verdict for row in rows] == [NOT_TESTABLE, NOT_TESTABLE]


def planted_over(folds, random_folds, shares, null_share, beyond=1.0) -> dict:
    n = len(folds)
    return {"n_items": n, "n_recalled": n, "recall_top_k": 10, "index": list(range(n)), "fold_top1": folds,
            "fold_random_median": random_folds, "beyond_random": [beyond] * n, "codebook_function_share": shares,
            "null_function_share": [null_share] * n}


def test_ablation_nulls_and_intervals():
    r = ablation.causal_ablation(ablation_model(), PROMPT, tid(" Paris"), ks=[1], n_random=8)
    # random single signals collapse the answer too: the null meets the figure
    over = planted_over([1e3] * 6, [50.0] * 6, [1.0] * 6, 0.9)
    single, book = ablation.scorecard_rows(r, [over], "test", "x", both(PASSED))
    assert single.verdict == INCONCLUSIVE and "random single signals" in single.why
    assert book.verdict == INCONCLUSIVE  # random signals' codebooks are as function-word heavy
    # half the prompts collapse, half do not: the bootstrap interval of the median straddles the threshold
    over = planted_over([1e3, 2.0] * 4, [1.0] * 8, [1.0, 0.0] * 4, 0.0)
    single, book = ablation.scorecard_rows(r, [over], "test", "x", both(PASSED))
    assert single.verdict == INCONCLUSIVE and book.verdict == INCONCLUSIVE
    # a collapse that does not beat random signals is not the claim's collapse
    over = planted_over([1e3] * 6, [1.0] * 6, [1.0] * 6, 0.0, beyond=0.5)
    assert ablation.scorecard_rows(r, [over], "test", "x", both(PASSED))[0].verdict == INCONCLUSIVE
    # several seeds pool their prompts
    over = planted_over([1e3] * 6, [1.0] * 6, [1.0] * 6, 0.0)
    assert [row.verdict for row in ablation.scorecard_rows(r, [over, over], "test", "x", both(FAILED))] == [
        REPRODUCED, REPRODUCED]


def test_readout_ablation_matches_zeroing_by_hand():
    m = ablation_model()
    r = ablation.causal_ablation(m, PROMPT, tid(" Paris"), ks=[1, 2], n_random=4)
    s = ablation.final_readout(m, PROMPT)
    s2 = s.clone()
    s2[r.order[:2]] = 0
    with torch.no_grad():
        p = torch.softmax(s2 @ m.vocab.recipe[: m.config.real_vocab_size].t(), -1)[tid(" Paris")]
    assert math.isclose(r.p_top[1], float(p), rel_tol=1e-4, abs_tol=1e-9)


# ----------------------------------------------------------------------------------------------
# Experiment 8


def test_signal_flow_finds_planted_carrier_and_sums_to_logit():
    m = ablation_model()
    f = flow.signal_flow(m, PROMPT, tid(" Paris"), top_n=4)
    assert f.signals[0] == 5
    assert math.isclose(float(f.final_contrib.sum()), f.target_logit, rel_tol=1e-4)
    # the target's logit sits on one signal; a random token's logit is spread over many
    assert f.top_share > 0.95 and f.top_share > np.percentile(f.null_top_share, 95)
    # identity blocks: every layer reads the same contribution
    assert np.allclose(f.layer_by_signal, f.layer_by_signal[-1:], atol=1e-5)
    assert f.layer_by_signal.shape == (m.config.n_layer + 1, 4)
    assert f.position_by_signal.shape[0] == len(f.tokens)


# ----------------------------------------------------------------------------------------------
# Experiment 7


def test_crystallisation_layer_definition():
    assert evolution.crystallisation_layer([5, 3, 1, 1]) == 2
    assert evolution.crystallisation_layer([1, 2, 1, 1]) == 2  # top-1 early, lost, regained: the last entry counts
    assert evolution.crystallisation_layer([1, 1, 1]) == 0
    assert evolution.crystallisation_layer([1, 1, 2]) is None
    assert evolution.half_probability_layer([0.01, 0.1, 0.3, 0.4]) == 2


def planted_writes(m, target, writes: dict[int, float]):
    """Hooks that add ``scale · e(target's signal)`` at the given layer states: the target wins from there on."""
    direction = m.vocab.recipe[target].detach() / m.vocab.recipe[target].norm()

    def add(scale):
        return lambda x: x + scale * direction

    return {layer_hook_name(m, l): add(s) for l, s in writes.items()}


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_crystallisation_at_planted_layer(k):
    m = identity_model(n_layer=4)
    target = tid(" Paris")
    with torch.no_grad():
        m.vocab.recipe[tid(" is")] = 3 * e(0)
        m.vocab.recipe[target] = 3 * e(1)
    with m.hooks.attach(planted_writes(m, target, {k: 10.0})):
        traj = evolution.lens_trajectory(m, PROMPT)
        res = evolution.layer_evolution(m, [{"prompt": PROMPT, "target": " Paris"}])
    assert traj["target"] == target
    assert evolution.crystallisation_layer(traj["ranks"]) == k
    assert traj["ranks"][k - 1] > 1 and all(r == 1 for r in traj["ranks"][k:])
    assert res.crystal == [k] and res.half == [k]
    assert res.summary["median_crystal_frac"] == k / 4 and res.expected_top1 == 1.0


def test_crystallisation_ignores_an_early_false_start():
    m = identity_model(n_layer=4)
    target = tid(" Paris")
    with torch.no_grad():
        m.vocab.recipe[tid(" is")] = 3 * e(0)
        m.vocab.recipe[target] = 3 * e(1)
    # the target wins at layer 1, is pushed back at layer 2, wins for good at layer 3
    with m.hooks.attach(planted_writes(m, target, {1: 10.0, 2: -10.0, 3: 10.0})):
        traj = evolution.lens_trajectory(m, PROMPT, target)
    assert traj["ranks"][1] == 1 and traj["ranks"][2] > 1
    assert evolution.crystallisation_layer(traj["ranks"]) == 3


def test_lens_at_last_layer_is_the_model_output():
    m = build_model(get_config("reflow@test")).eval()
    from reflow_core.hooks import encode_prompt

    idx = encode_prompt(m, PROMPT)
    traj = evolution.lens_trajectory(m, idx)
    with torch.no_grad():
        logits, _ = m(idx)
    p = torch.softmax(logits[0, -1, : m.config.real_vocab_size], -1)
    assert traj["final_top1"] == int(p.argmax())
    assert math.isclose(traj["probs"][-1], float(p.max()), rel_tol=1e-4)
    states = residual_states(m, idx)
    assert states.shape == (m.config.n_layer + 1, 1, idx.shape[1], m.config.d_model)


def planted_evolution(n_layer: int, layer: int, label: str = "reflow"):
    """' Paris' (the expected answer) written in at ``layer`` of an identity model: it crystallises there."""
    m = identity_model(n_layer=n_layer)
    target = tid(" Paris")
    with torch.no_grad():
        m.vocab.recipe[tid(" is")] = 3 * e(0)
        m.vocab.recipe[target] = 3 * e(1)
    with m.hooks.attach(planted_writes(m, target, {layer: 10.0})):
        return evolution.layer_evolution(m, ITEMS, label=label)


def test_crystallisation_of_the_expected_answer():
    res = planted_evolution(6, 3)
    assert res.crystal_expected == [3] and res.expected_fracs() == [(0, 0.5)]
    assert res.summary["n_expected_top1"] == 1 and res.summary["median_crystal_frac_expected"] == 0.5


def test_evolution_verdict_follows_the_rule():
    in_band = planted_evolution(6, 3)  # 3/6 = 0.50: inside 0.33–0.50
    row = evolution.scorecard_rows({"reflow": in_band}, "test", "x", FAILED)[0]
    assert row.verdict == REPRODUCED
    late = planted_evolution(6, 6)  # only at the last layer
    assert evolution.scorecard_rows({"reflow": late}, "test", "x", PASSED)[0].verdict == NOT_REPRODUCED
    assert evolution.scorecard_rows({"reflow": late}, "test", "x", FAILED)[0].verdict == NOT_TESTABLE
    # a random model: the expected answer is never top-1, there is no crystallisation layer to measure
    rand = evolution.layer_evolution(identity_model(n_layer=6, seed=1), ITEMS)
    assert rand.expected_fracs() == []
    assert evolution.scorecard_rows({"reflow": rand}, "test", "x", PASSED)[0].verdict == NOT_TESTABLE
    # the model at initialisation lands in the band too
    row = evolution.scorecard_rows({"reflow": in_band, "reflow (init)": in_band}, "test", "x", PASSED)[0]
    assert row.verdict == INCONCLUSIVE and "initialisation" in row.why
    # seeds are pooled: a second seed's records count with the first's
    row = evolution.scorecard_rows({"reflow": in_band}, "test", "x", PASSED, seeds=[in_band, late])[0]
    assert "2 seed(s)" in row.why and row.verdict == NOT_REPRODUCED  # one prompt: median 0.75, no interval


def test_prompt_bootstrap_and_band():
    est, lo, hi = evolution.prompt_bootstrap([(i, 0.4) for i in range(10)])
    assert est == lo == hi == 0.4
    est, lo, hi = evolution.prompt_bootstrap([(i, float(i % 2)) for i in range(20)])
    assert lo == 0.0 and hi == 1.0
    # records of one prompt travel together: one prompt gives no interval, whatever the number of seeds
    est, lo, hi = evolution.prompt_bootstrap([(0, 0.1), (0, 0.9)])
    assert est == 0.5 and np.isnan(lo)
    assert evolution.within_band(0.35, 0.45, (1 / 3, 0.5)) == "met"
    assert evolution.within_band(0.6, 0.9, (1 / 3, 0.5)) == "missed"
    assert evolution.within_band(0.2, 0.4, (1 / 3, 0.5)) == "straddles"
    # the interval over prompts decides: half the prompts early, half late → straddles
    res = planted_evolution(6, 3)
    res.crystal_expected = [1, 6] * 5
    assert evolution.scorecard_rows({"reflow": res}, "test", "x", PASSED)[0].verdict == INCONCLUSIVE


def test_seed_intervals_over_planted_models():
    models = [ablation_model(), ablation_model()]
    fold = ablation.fold_over_seeds(models, n_random=8)
    assert fold.n == 2 and fold.mean > 3  # log10 fold drop of the planted carrier
    crystal = evolution.crystallisation_over_seeds(models, [{"prompt": PROMPT, "target": " Paris"}])
    assert crystal.n == 2 and crystal.mean == 0.0  # identity blocks: the embedding already decides


def test_factual_targets_are_single_tokens():
    items = evolution.factual_items()
    assert len(items) >= 30 and items[0] == {"prompt": ablation.PAPER_PROMPT, "target": ablation.PAPER_TARGET}
    assert all(tid(it["target"]) is not None for it in items)


# ----------------------------------------------------------------------------------------------
# The chapter notebook at scale="test"

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_mechanistic_notebook_executes(real_book):
    check_chapter(real_book, "05_mechanistic",
                  ["fig-mechanistic-evolution", "fig-mechanistic-crystallisation", "fig-mechanistic-flow",
                   "fig-mechanistic-ablation"],
                  "scorecard-mechanistic", {"ablation.single", "ablation.codebook", "evolution.crystallisation"})
