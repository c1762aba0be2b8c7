"""Experiments 10–12 and the steering panel on tiny models with PLANTED structure.

Planted model: reFlow@test with identity blocks (output projections zeroed), W_basis = I and final-norm weight 1, so
the next-token logits are W_recipe · RMSNorm(h_L) and h_L is the last token's recipe row plus whatever we inject.
Positive sentiment words are written along +signal 0, negative ones along −signal 0: the sentiment direction is
known (≈ e_0), and a random direction has only ≈ 1/√32 of its norm along it.
"""

import dataclasses
import html
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from chapter_checks import check_chapter
from planted import identity_model

from reflow_core import hooks, steering, stimuli
from reflow_core.config import get_config
from reflow_core.model import build_model
from reflow_core.scorecard import STRADDLES, Control
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


PASSED, FAILED = Control("planted control", True), Control("planted control", False)


def test_emotion_flip_early_not_late_when_late_layers_are_overwritten():
    """An injection range before an inert layer must not flip; one after it must (seed: L0–L12 flips)."""
    m = sentiment_model(n_layer=6)
    short = stimuli.load_stimuli("sentiment")["negative_prompts"][:2]
    r = emotion.emotion_surgery(m, rel_alpha=0.5, n_random=8, gen_tokens=3, prompts=short)
    assert emotion.layer_ranges(6) == {"early": (0, 2), "late": (3, 6)}
    assert r.n_start_negative["early"] == 4  # the planted lean is far beyond the start margin
    assert r.flip_rate["early"] == 1.0 and r.null_flip_rate["early"] < 0.5 and r.flip_p_value() < 0.05
    row = emotion.scorecard_rows(r, "test", "x", 6, PASSED)[0]
    assert row.verdict == "reproduced" and row.p_value == r.flip_p_value()
    # the outcome does not need the control: met is reproduced either way
    assert emotion.scorecard_rows(r, "test", "x", 6, FAILED)[0].verdict == "reproduced"
    # layer state 6 is overwritten by a constant that leans negative (' was' reads signal 1): the early range, wholly
    # before it, cannot flip anything; the late range (3–6) still reaches the read-out through its push at layer 6
    with m.hooks.attach(inert_after(m, 6, " was")):
        r2 = emotion.emotion_surgery(m, rel_alpha=0.5, n_random=8, gen_tokens=2, prompts=short)
    assert r2.n_start_negative["early"] == 4
    assert r2.flip_rate["early"] == 0.0 and r2.flip_rate["late"] == 1.0
    assert r2.responds == [False] * 6 + [True]
    assert emotion.scorecard_rows(r2, "test", "x", 6, PASSED)[0].verdict == "not reproduced"
    # the same miss without a passed control cannot say "not reproduced"
    assert emotion.scorecard_rows(r2, "test", "x", 6, FAILED)[0].verdict == "not testable at this scale"


def test_emotion_flip_random_model_is_not_testable():
    """An untrained model's sentiment scores sit within tenths of a nat of 0: no prompt starts clearly negative, the
    injection has nothing to flip (the flip is by construction there: any push moves the top word)."""
    torch.manual_seed(0)
    m = build_model(get_config("reflow@test")).eval()
    r = emotion.emotion_surgery(m, n_random=8, gen_tokens=1,
                                prompts=stimuli.load_stimuli("sentiment")["negative_prompts"])
    assert r.n_start_negative["early"] == 0
    row = emotion.scorecard_rows(r, "test", "x", m.config.n_layer, FAILED)[0]
    assert row.verdict == "not testable at this scale" and not row.control.passed


def test_emotion_flip_inconclusive_when_random_directions_flip_too():
    m = sentiment_model(n_layer=6)
    r = emotion.emotion_surgery(m, rel_alpha=0.5, n_random=8, gen_tokens=1,
                                prompts=stimuli.load_stimuli("sentiment")["negative_prompts"][:2])
    n0 = len(r.null_hits["early"])
    noisy = dataclasses.replace(r, null_flip_rate={**r.null_flip_rate, "early": 0.75},
                                null_hits={**r.null_hits, "early": [True] * (3 * n0 // 4) + [False] * (n0 // 4)})
    row = emotion.scorecard_rows(noisy, "test", "x", 6, PASSED)[0]
    assert row.verdict == "inconclusive" and "null meets" in row.why
    # a rate whose bootstrap interval straddles the bar is inconclusive too
    half = dataclasses.replace(r, hits={**r.hits, "early": [True, False, True, False]},
                               flip_rate={**r.flip_rate, "early": 0.5})
    assert emotion.flip_outcome(half)[0] == STRADDLES
    assert emotion.scorecard_rows(half, "test", "x", 6, PASSED)[0].verdict == "inconclusive"


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


def synthetic_inception(alpha: float, null_alpha: float = np.inf, *, spread: float = 0.5, found: float = 1.0):
    """A concept-inception result with every critical α near ``alpha`` (a ``found`` share implanted) and random
    directions at ``null_alpha`` (inf: never)."""
    rng = np.random.default_rng(0)
    a = alpha + spread * rng.standard_normal((5, 4, 10))
    a[rng.random(a.shape) >= found] = np.inf
    null = np.full((5, 4, 10, 2), float(null_alpha))
    if np.isfinite(null_alpha):
        null = null + spread * rng.standard_normal(null.shape)
    return inception.InceptionResult(concepts=["c"] * 10, prompts=["p"] * 4, alpha_max=100.0, unit_norm=10.0,
                                     alpha=a, null_alpha=null)


def test_inception_verdict_is_not_testable_below_the_papers_configuration():
    """α is a length in the paper's residual stream: even a value in the band says nothing elsewhere."""
    r = synthetic_inception(18.4)
    for scale, shape in (("smoke", (6, 128)), ("paper", (6, 512)), ("small", (36, 1024))):
        row = inception.scorecard_rows(r, scale, "x", PASSED, n_layer=shape[0], d_model=shape[1])[0]
        assert row.verdict == "not testable at this scale" and not row.control.passed
        assert "comparable" in row.control.name


def test_inception_verdict_at_the_papers_configuration():
    paper = dict(n_layer=36, d_model=1024)
    assert inception.paper_band() == pytest.approx((13.8, 23.0))
    assert inception.scorecard_rows(synthetic_inception(18.0), "paper", "x", PASSED, **paper)[0].verdict == "reproduced"
    far = synthetic_inception(40.0)
    assert inception.scorecard_rows(far, "paper", "x", PASSED, **paper)[0].verdict == "not reproduced"
    # a model that has not learned (failed competence gate) cannot say "not reproduced"
    assert inception.scorecard_rows(far, "paper", "x", FAILED, **paper)[0].verdict == "not testable at this scale"
    # nor one whose concept directions implant no better than random ones
    same = synthetic_inception(40.0, null_alpha=40.0)
    assert inception.scorecard_rows(same, "paper", "x", PASSED, **paper)[0].verdict == "not testable at this scale"
    # random directions landing in the band too: the null meets the figure
    null_in = synthetic_inception(18.0, null_alpha=19.0, found=0.9)
    assert inception.scorecard_rows(null_in, "paper", "x", PASSED, **paper)[0].verdict == "inconclusive"
    # an interval straddling the band's edge
    edge = synthetic_inception(23.0, spread=3.0)
    assert inception.scorecard_rows(edge, "paper", "x", PASSED, **paper)[0].verdict == "inconclusive"


def test_inception_random_model_is_not_testable():
    torch.manual_seed(0)
    m = build_model(get_config("reflow@test")).eval()
    r = inception.concept_inception(m, concepts=[" cat", " river"], prompts=["In the morning, the"], n_random=1,
                                    n_iter=6)
    row = inception.scorecard_rows(r, "test", "x", FAILED, n_layer=m.config.n_layer, d_model=m.config.d_model)[0]
    assert row.verdict == "not testable at this scale"


# ----------------------------------------------------------------------------------------------
# Experiment 12


def test_edited_recipe_restores_exactly():
    m = identity_model(4)
    before = m.vocab.recipe.detach().clone()
    u = torch.zeros(m.config.n_signals)
    u[2] = 1.0
    with hijack.edited_recipe(m, swaps=[(1, 2)], blends=[(3, 4, 0.5)], column_scales={0: -1.0}, projections=[(u, 2.0)]):
        assert torch.equal(m.vocab.recipe[1, 3:], before[2, 3:]) and torch.equal(m.vocab.recipe[2, 3:], before[1, 3:])
        assert torch.allclose(m.vocab.recipe[3, 3:], 0.5 * (before[3, 3:] + before[4, 3:]))
        assert torch.allclose(m.vocab.recipe[5, 0], -before[5, 0])
        assert torch.allclose(m.vocab.recipe[7:, 2], -before[7:, 2])  # reflected along signal 2
    assert torch.equal(m.vocab.recipe.detach(), before)


def test_matched_strength_and_clean_windows():
    m = identity_model(2)
    u = torch.randn(m.config.n_signals)
    s = hijack.matched_strength(m, u, 3.0)
    R = m.vocab.recipe.detach()[: m.config.real_vocab_size].clone()
    with hijack.edited_recipe(m, projections=[(u, s)]):
        moved = (m.vocab.recipe.detach()[: m.config.real_vocab_size] - R).norm()
    assert float(moved) == pytest.approx(3.0, rel=1e-4)
    tokens = np.arange(100) % 50
    tokens[25] = 7777  # banned: only the window starting at 24 (tokens 24 … 32) holds it
    starts = hijack.clean_windows(tokens, 8, {7777}, 100)
    assert all(7777 not in tokens[a:a + 9] for a in starts) and len(starts) == 11  # 12 windows, one touches it


NEG_PROMPTS = ["The service was terrible and the food was", "The film was awful and the ending was",
               "The hotel was horrible and the staff were", "The trip was bad and the weather was"]


def reading_model(route: bool = True):
    """Planted: W_basis = I; only the sentiment words have signals 0/1 (positive +2 on signal 0; negative −2 on 0 and
    +3 on 1); with ``route`` the first block's attention averages the (normed) context into every position (q = k = 0,
    values and output the identity), so the model *reads* a sentiment word in its context; without it, a position
    sees only its own token.  Fifty 'grammar' tokens have rows outside signals 0/1 large enough that the model
    predicts the same token again (its loss on runs of one token is what an edit can damage)."""
    m = identity_model(2)
    d = m.config.d_model
    pos, neg = stimuli.sentiment_ids()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        R = m.vocab.recipe
        R[:, :2] = 0.0
        R[pos, 0] = 2.0
        R[neg, 0], R[neg, 1] = -2.0, 3.0
        R[GRAMMAR] = 0.35 * torch.randn(len(GRAMMAR), d, generator=g)
        R[GRAMMAR, :2] = 0.0
        if route:
            attn = m.blocks[0].attn
            attn.qkv.weight.zero_()
            attn.qkv.weight[2 * d:] = torch.eye(d)  # values
            attn.proj.weight.copy_(torch.eye(d))
    return m


banned_ids = set(sum(stimuli.sentiment_ids(), [])) | {t for p in NEG_PROMPTS for t in hooks.encode_prompt(
    identity_model(1), p)[0].tolist()}
GRAMMAR = [t for t in np.random.default_rng(3).integers(1000, 50000, 80).tolist() if t not in banned_ids][:50]
# runs of one token per 32-token window (no sentiment word anywhere): the planted model predicts them
VAL = np.repeat(np.random.default_rng(4).choice(GRAMMAR, 40), 32)


def test_genetic_hijack_planted_reading_is_reproduced():
    m = reading_model(route=True)
    r = hijack.genetic_hijack(m, VAL, n_null=6, n_null_read=39, n_windows=12, block_size=32, gen_tokens=2,
                              prompts=NEG_PROMPTS)
    assert np.allclose(r.read_before, hijack.full_scores(m, NEG_PROMPTS), atol=1e-4)  # the same score, unedited
    assert r.start_negative.all() and r.read_flip_rate == 1.0  # the edited context now reads positive
    assert r.read_p_value < 0.05 and np.median(r.null_read_flip_rates) == 0.0
    # the grammar tokens have no sentiment component: the reflection cannot touch them, random edits of its size do
    assert abs(r.delta_loss) < 1e-5 and (r.null_delta_loss > 1e-3).all()
    assert r.damage_percentile()[2] == 0.0
    row = hijack.scorecard_rows(r, "test", "x", PASSED)[0]
    assert row.verdict == "reproduced" and row.p_value == r.read_p_value


def test_genetic_hijack_planted_without_reading_is_not_reproduced():
    """Without attention nothing of the context reaches the predicting position: the edited context cannot flip
    the read."""
    m = reading_model(route=False)
    r = hijack.genetic_hijack(m, VAL, n_null=2, n_null_read=19, n_windows=4, block_size=32, gen_tokens=1,
                              prompts=NEG_PROMPTS)
    assert not r.start_negative.any() or r.read_flip_rate == 0.0
    m2 = sentiment_model(n_layer=2)  # leans negative through the last token itself
    r2 = hijack.genetic_hijack(m2, VAL, n_null=2, n_null_read=19, n_windows=4, block_size=32, gen_tokens=1)
    assert r2.start_negative.all() and r2.read_flip_rate == 0.0
    assert hijack.scorecard_rows(r2, "test", "x", PASSED)[0].verdict == "not reproduced"
    assert hijack.scorecard_rows(r2, "test", "x", FAILED)[0].verdict == "not testable at this scale"


def test_genetic_hijack_random_model_is_not_testable():
    torch.manual_seed(0)
    m = build_model(get_config("reflow@test")).eval()
    r = hijack.genetic_hijack(m, VAL, n_null=2, n_null_read=9, n_windows=4, block_size=32, gen_tokens=1)
    assert not r.start_negative.any()
    row = hijack.scorecard_rows(r, "test", "x", FAILED)[0]
    assert row.verdict == "not testable at this scale" and not row.control.passed


def test_hijack_verdict_damage_and_null():
    base = hijack.HijackResult(
        prompts=["a", "b", "c", "d"], edit_size=1.0, read_before=np.full(4, -2.0), read_after=np.full(4, 1.0),
        null_read_after=np.full((39, 4), -2.0) + 0.1 * np.random.default_rng(0).standard_normal((39, 4)),
        full_after=np.full(4, 2.0), loss_before=np.full(20, 3.0), loss_after=np.full(20, 3.5),
        null_loss_after=3.0 + np.linspace(0.01, 0.1, 8)[:, None] * np.ones((8, 20)))
    # the reading flips beyond random edits, but the damage exceeds every random edit of the same size
    assert base.damage_percentile()[1] == 100.0
    assert hijack.scorecard_rows(base, "test", "x", PASSED)[0].verdict == "not reproduced"
    kept = dataclasses.replace(base, loss_after=np.full(20, 3.0))
    assert hijack.scorecard_rows(kept, "test", "x", PASSED)[0].verdict == "reproduced"
    # damage in the middle of the random edits, window by window noisy: the interval straddles the bar
    noisy = dataclasses.replace(base, loss_after=3.09 + 0.2 * np.random.default_rng(1).standard_normal(20))
    assert hijack.scorecard_rows(noisy, "test", "x", PASSED)[0].verdict == "inconclusive"
    # random edits flip the reading as well: the null meets the claim
    flippy = dataclasses.replace(kept, null_read_after=np.full((39, 4), 0.5))
    row = hijack.scorecard_rows(flippy, "test", "x", PASSED)[0]
    assert row.verdict == "inconclusive" and "null meets" in row.why


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
    nb = check_chapter(real_book, "06_steering", ["fig-steering-emotion", "fig-steering-inception", "fig-steering-hijack"],
                       "scorecard-steering", {"emotion.flip", "inception.alpha", "hijack.sentiment"})
    assert not (real_book[1] / "figures" / "fig-steering-panel.png").exists()  # the panel is not a figure twice
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    html_values = [w.get("state", {}).get("value", "") for w in state.values() if w.get("model_name") == "HTMLModel"]
    models = [w.get("model_name") for w in state.values()]
    # the saved panel holds every cell of the stored grid, in Stacks linked to the controls
    from reflow_core.steering_grid import SteeringGrid, cell_html

    stored = json.loads((real_book[1] / "data" / "steering.json").read_text())["panel"]
    grid = SteeringGrid.from_json(stored["grid"])
    assert len(grid.cells) == len(grid.directions) * len(grid.ranges) * len(grid.rel_alphas) >= 100
    assert all(cell_html(grid, c) in html_values for c in grid.cells)
    assert models.count("StackModel") == 1 + len(grid.directions) * (1 + len(grid.ranges))
    assert models.count("LinkModel") == models.count("StackModel")
    # ... and a cell is what steer() gives at its setting on the chapter's model
    from reflow_core.runs import load_models
    from reflow_core.steering_grid import MAX_NEW_TOKENS, TOP_K

    model = load_models("test", "reflow", real_book[1])[0][0]
    cell = grid.cell(0, "early", 2.0)
    settings = {**stored["settings"], "layers": tuple(grid.ranges["early"]), "alpha": cell.alpha,
                "max_new_tokens": MAX_NEW_TOKENS, "top_k": TOP_K}
    out = steering.steer(model, steering.SteeringSpec(**settings))
    assert (out.continuation, out.top_tokens) == (cell.continuation, cell.top_tokens)
    assert out.baseline_continuation == grid.baseline_continuation
