"""Experiments 10–12 and the steering panel on tiny models with PLANTED structure.

Planted model: reFlow@test with identity blocks (output projections zeroed), W_basis = I and final-norm weight 1, so
the next-token logits are W_recipe · RMSNorm(h_L) and h_L is the last token's recipe row plus whatever we inject.
Positive sentiment words are written along +signal 0, negative ones along −signal 0: the sentiment direction is
known (≈ e_0), and a random direction has only ≈ 1/√32 of its norm along it.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from chapter_checks import check_chapter
from planted import identity_model

from reflow_core import hooks, steering, stimuli
from reflow_core.tokenizer import single_token_id as tid
from reflow_core.experiments import emotion, hijack, inception


def sentiment_model(n_layer: int = 4, seed: int = 0):
    m = identity_model(n_layer, seed=seed)
    pos, neg = stimuli.sentiment_ids()
    with torch.no_grad():
        R = m.vocab.recipe
        R[pos, 0] = 2.0
        R[neg, 0] = -2.0
        R[neg, 1] = 3.0  # negative words also lean on signal 1 ...
        for p in stimuli.load_stimuli("sentiment")["prompts"] + stimuli.load_stimuli("sentiment")["negative_prompts"]:
            last = hooks.encode_prompt(m, p)[0, -1]
            R[last, 1] = 1.0  # ... which every prompt's last token reads: unsteered, the model leans negative
    return m


def inert_after(m, layer: int, token: str = " the"):
    """Hooks overwriting layer state ``layer`` with a constant: nothing written at layers < ``layer`` survives."""
    const = m.vocab.recipe[tid(token)].detach().clone()
    return {hooks.layer_hook_name(m, layer): lambda x: const.expand_as(x).clone()}


# ----------------------------------------------------------------------------------------------
# Experiment 10


def test_sentiment_direction_is_the_planted_axis():
    m = sentiment_model()
    v = steering.sentiment_direction(m)
    assert abs(float(v.norm()) - 1) < 1e-5
    assert float(v[0]) > 0.75 and float(v[1]) < -0.5  # mean(pos) − mean(neg) ≈ 4·e_0 − 3·e_1


def test_emotion_surgery_responds_only_where_the_stream_is_not_overwritten():
    m = sentiment_model(n_layer=4)
    with m.hooks.attach(inert_after(m, 2)):  # layer state 2 is overwritten: injections at 0, 1 must vanish
        r = emotion.emotion_surgery(m, rel_alpha=2.0, n_random=16, gen_tokens=2,
                                    prompts=stimuli.load_stimuli("sentiment")["prompts"][:6])
    eff = r.effect.mean(axis=1)
    assert np.allclose(r.effect[:2], 0, atol=1e-5) and np.allclose(r.null_effect[:2], 0, atol=1e-5)
    assert r.responds == [False, False, True, True, True]
    assert all(eff[2:] > 1.0)
    # the planted direction beats every random direction of the same norm where the stream listens
    assert (eff[2:, None] > r.null_effect[2:].mean(axis=1)).all()


def test_emotion_flip_early_not_late_when_late_layers_are_overwritten():
    """An injection range before an inert layer must not flip; one after it must (seed: L0–L12 flips)."""
    m = sentiment_model(n_layer=6)
    short = stimuli.load_stimuli("sentiment")["negative_prompts"][:2]
    r = emotion.emotion_surgery(m, rel_alpha=0.5, n_random=8, gen_tokens=3, prompts=short)
    assert emotion.layer_ranges(6) == {"early": (0, 2), "late": (3, 6)}
    assert r.flip_rate["early"] == 1.0 and r.null_flip_rate["early"] < 0.5
    rows = emotion.scorecard_rows(r, "test", "x", 6)
    assert rows[0].verdict == "reproduced"
    # layer state 6 is overwritten by a constant that leans negative (' was' reads signal 1): the early range, wholly
    # before it, cannot flip anything; the late range (3–6) still reaches the read-out through its push at layer 6
    with m.hooks.attach(inert_after(m, 6, " was")):
        r2 = emotion.emotion_surgery(m, rel_alpha=0.5, n_random=8, gen_tokens=2, prompts=short)
    assert r2.n_start_negative["early"] == 4
    assert r2.flip_rate["early"] == 0.0 and r2.flip_rate["late"] == 1.0
    assert r2.responds == [False] * 6 + [True]
    assert emotion.scorecard_rows(r2, "test", "x", 6)[0].verdict == "not reproduced"


# ----------------------------------------------------------------------------------------------
# Experiment 11


def analytic_alpha(m, prompt: str, concept: int) -> float:
    """Identity blocks, W_basis = I: c is top-1 iff (R_c − R_o)·(h0 + αv) > 0 for all o — linear in α."""
    R = m.vocab.recipe.detach()[: m.config.real_vocab_size].double()
    h0 = R[hooks.encode_prompt(m, prompt)[0, -1]]
    v = R[concept] / R[concept].norm()
    d = R[concept] - R
    a, b = d @ h0, d @ v
    mask = torch.ones(len(R), dtype=torch.bool)
    mask[concept] = False
    a, b = a[mask], b[mask]
    assert not ((b <= 0) & (a <= 0)).any()  # reachable
    need = torch.where(b > 0, -a / b, torch.full_like(a, -math.inf))
    return max(0.0, float(need.max()))


def test_bisection_finds_the_analytic_alpha_at_every_layer():
    m = identity_model(n_layer=3, noise=0.3)
    prompt, concepts = "In the morning, the", [" cat", " dog", " river"]
    ids = [tid(c) for c in concepts]
    expected = [analytic_alpha(m, prompt, c) for c in ids]
    assert all(x > 0.5 for x in expected)  # not trivially top-1 at α = 0
    res = inception.concept_inception(m, concepts=concepts, prompts=[prompt], alpha_max_rel=1000, n_iter=30,
                                      n_random=2)
    for layer in range(4):
        assert np.allclose(res.alpha[layer, 0], expected, rtol=1e-4)
    assert res.found.all()
    # random directions of the same norm almost never make the concept top-1 (null)
    assert res.null_found_rate < 0.5
    idx = hooks.encode_prompt(m, prompt)
    below = inception.batched_critical_alpha(m, idx, 0, m.vocab.embed(torch.as_tensor(ids)).detach(), ids,
                                             alpha_max=0.9 * min(expected))
    assert np.isinf(below).all()  # censored when α_max is below the threshold


# ----------------------------------------------------------------------------------------------
# Experiment 12


def test_edited_recipe_restores_exactly():
    m = identity_model(4)
    before = m.vocab.recipe.detach().clone()
    with hijack.edited_recipe(m, swaps=[(1, 2)], blends=[(3, 4, 0.5)], column_scales={0: -1.0}):
        assert torch.equal(m.vocab.recipe[1, 1:], before[2, 1:]) and torch.equal(m.vocab.recipe[2, 1:], before[1, 1:])
        assert torch.allclose(m.vocab.recipe[3, 1:], 0.5 * (before[3, 1:] + before[4, 1:]))
        assert torch.allclose(m.vocab.recipe[5, 0], -before[5, 0])
    assert torch.equal(m.vocab.recipe.detach(), before)


def test_frequency_matched_null_picks_nearest_counts():
    counts = np.array([0, 5, 100, 101, 99, 7, 102, 50])
    rng = np.random.default_rng(0)
    picks = hijack.frequency_matched(counts, 2, 20, exclude={3}, generator=rng, pool=2)
    assert set(picks) <= {4, 6}


def test_genetic_hijack_flips_planted_sentiment_without_collateral():
    m = sentiment_model(n_layer=2)
    stim = stimuli.load_stimuli("sentiment")
    pairs = [[p, n] for p, n in zip(stim["positive"], stim["negative"])]  # every positive row ↔ a negative row
    # validation text that never uses a sentiment word: swapping their rows cannot change its loss
    rng = np.random.default_rng(0)
    banned = set(sum(stimuli.sentiment_ids(), []))
    vocab = np.array([t for t in rng.integers(0, 50257, 400) if t not in banned])
    val = rng.choice(vocab, 1000).astype(np.uint16)
    r = hijack.genetic_hijack(m, val, pairs=pairs, n_null=2, max_batches=1, batch_size=4, gen_tokens=2)
    assert (r.score_before < 0).all() and r.flip_rate == 1.0  # every prompt flips to positive
    assert r.null_flip_rate == 0.0  # frequency-matched random swaps leave sentiment alone
    assert abs(r.delta_loss) < 1e-4
    assert hijack.scorecard_rows(r, "test", "x")[0].verdict == "reproduced"
    # deleting the sentiment signal's column (0) removes the lean: the score moves toward 0
    assert r.column["signal"] == 0


# ----------------------------------------------------------------------------------------------
# Live steering: pure function and panel


def test_steer_pure_function_planted_concept():
    m = identity_model(n_layer=2, noise=0.3)
    spec = steering.SteeringSpec("In the morning, the", layers=(0, 0), alpha=0.0, kind="concept", word=" cat",
                                 max_new_tokens=3, top_k=5)
    base = steering.steer(m, spec)
    assert base.top_tokens == base.baseline_top_tokens and base.continuation == base.baseline_continuation
    spec.alpha = 3 * analytic_alpha(m, spec.prompt, tid(" cat"))
    out = steering.steer(m, spec)
    assert out.top_tokens[0] == " cat" and out.continuation.startswith(" cat")
    assert base.top_tokens[0] != " cat"
    # a signal direction raises that signal's tokens: signal 3 with a planted token
    with torch.no_grad():
        m.vocab.recipe[tid(" ocean"), 3] = 6.0
    sig = steering.steer(m, steering.SteeringSpec("In the morning, the", (0, 1), 50.0, kind="signal", signal=3,
                                                  max_new_tokens=1))
    assert sig.top_tokens[0] == " ocean"
    with pytest.raises(ValueError):
        steering.direction_for(m, "concept", word=" notawordatallxyz")


def test_injection_range_adds_up_per_layer():
    m = identity_model(n_layer=3)
    v = torch.randn(m.config.d_model)
    idx = hooks.encode_prompt(m, "The movie was")
    h0 = hooks.residual_states(m, idx)[-1]
    with hooks.injected(m, v, (1, 3), 2.0):
        h1 = hooks.residual_states(m, idx)[-1]
    assert torch.allclose(h1 - h0, (3 * 2.0 * v / v.norm()).expand_as(h0), atol=1e-5)


def test_steering_panel_regenerates_on_change_and_matches_pure_function():
    pytest.importorskip("ipywidgets")
    m = sentiment_model(n_layer=2)
    panel = steering.steering_panel(m, prompt="The movie was", layers=(0, 2), alpha=0.0, max_new_tokens=3, top_k=5)
    first = panel.last_result
    chart0, text0 = panel.chart.value, panel.text.value
    assert first is not None and len(chart0) > 100 and "unsteered" in text0
    assert first.top_tokens[0].strip() in ("bad", "terrible", "awful", "horrible", "poor", "sad", "hate", "worst",
                                           "ugly", "disappointing", "boring", "dreadful", "nasty", "unpleasant",
                                           "mediocre", "worse")
    panel.alpha.value = 6.0  # as a user dragging the slider would
    second = panel.last_result
    assert second is not first and panel.chart.value != chart0 and panel.text.value != text0
    ref = steering.steer(m, panel.spec())
    assert second.top_tokens == ref.top_tokens and second.continuation == ref.continuation
    assert np.allclose(second.top_probs, ref.top_probs)
    assert second.top_tokens[0].strip() in [w.strip() for w in stimuli.load_stimuli("sentiment")["positive"]]
    with torch.no_grad():
        m.vocab.recipe[tid(" river")] *= 5
    panel.kind.value = "concept"
    panel.word.value = " river"
    panel.alpha.value = 40.0
    assert panel.last_result.spec["kind"] == "concept" and panel.last_result.top_tokens[0] == " river"
    panel.word.value = "notawordatallxyz"  # an invalid word: the panel says so and keeps the last result
    assert panel.error and "single GPT-2 token" in panel.text.value
    assert panel.last_result.top_tokens[0] == " river"
    panel.kind.value = "signal"
    panel.signal.value = 0
    assert panel.error is None and panel.last_result.spec["signal"] == 0
    panel.layers.value = (1, 1)
    assert panel.last_result.spec["layers"] == (1, 1)


# ----------------------------------------------------------------------------------------------
# The chapter notebook at scale="test"

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_steering_notebook_executes_with_widget_state(real_book):
    nb = check_chapter(real_book, "06_steering",
                       ["fig-steering-emotion", "fig-steering-inception", "fig-steering-hijack", "fig-steering-panel"],
                       "scorecard-steering", {"emotion.flip", "inception.alpha", "hijack.sentiment"})
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    assert any(w.get("model_name") == "FloatSliderModel" for w in state.values())
