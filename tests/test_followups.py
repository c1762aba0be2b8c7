"""Thread follow-ups: the crystallisation-boundary finder and the generation coherence monitor, on planted structure.

Everything runs on tiny models built here (no training data, no checkpoints)."""

import numpy as np
import pytest
import torch
from chapter_checks import check_chapter

from reflow_core import tokenizer
from reflow_core.config import get_config
from reflow_core.experiments import boundary
from reflow_core.model import GPT, build_model
from reflow_core.experiments import loop_monitor
from reflow_core.experiments.loop_monitor import MonitorEval, evaluate_monitor
from reflow_core.monitor import CoherenceMonitor, NgramMonitor, loop_onset
from reflow_core.sample import sample
from reflow_core.scorecard import INCONCLUSIVE, NOT_REPRODUCED, NOT_TESTABLE, REPRODUCED, Control

PASSED, FAILED = Control("planted control", True), Control("planted control", False)

torch.set_num_threads(1)


class InertAfter(GPT):
    """A GPT whose output reads layer state h_K only: blocks K … L−1 still run (and their hooks fire), but nothing
    written into the residual stream at layer states > K can reach the logits."""

    def __init__(self, config, K: int) -> None:
        super().__init__(config)
        self.K = K

    def residual(self, idx, *, stop_at=None):
        x, rope, kept = self.vocab.embed(idx), self._rope(), None
        for i, block in enumerate(self.blocks):
            x = self.hooks(f"blocks.{i}.resid_pre", x)
            if i == self.K:
                kept = x  # = h_K, after any injection at layer state K
            x = block(x, rope)
            x = self.hooks(f"blocks.{i}.resid_post", x)
        return x if kept is None else kept


def planted(K: int, n_layer: int = 4):
    torch.manual_seed(0)
    # d_model = 128: in 32 dimensions a random token's own direction need not make it top-1 among 50k rows.
    return InertAfter(get_config("reflow@test", n_layer=n_layer, d_model=128, n_signals=64), K).eval()


# ----------------------------------------------------------------------------------------------
# Boundary


def test_boundary_pairs_are_single_tokens_and_paired():
    items = boundary.boundary_pairs()
    assert len(items) >= 12
    for it in items:
        assert tokenizer.single_token_id(it["answer"]) is not None
        assert tokenizer.single_token_id(it["alternative"]) is not None
        assert it["answer"] != it["alternative"]
        assert len(tokenizer.encode(it["long"])) >= 2 * len(tokenizer.encode(it["short"]))
        assert len(tokenizer.encode(it["long"])) <= 64  # fits the test-scale context


def test_boundary_layer_helper():
    assert boundary.boundary_layer([True, True, False, True, False]) == 3
    assert np.isnan(boundary.boundary_layer([False, False]))


@pytest.mark.parametrize("K", [1, 2])
def test_boundary_finder_returns_the_planted_layer(K):
    model = planted(K)
    items = boundary.boundary_pairs()[:3]
    r = boundary.crystallisation_boundary(model, items, margin=4.0, n_iter=12)
    for s in boundary.SETS:
        assert not r.flips[s][:, K + 1:].any()  # inert after K: nothing can flip there
        np.testing.assert_array_equal(r.boundary[s], np.full(len(items), float(K)))
        np.testing.assert_allclose(r.fraction(s), K / model.config.n_layer)
    _, p = r.wilcoxon()
    assert p == 1.0 and r.paired_shift() == 0
    # an untrained model, 4 layers: the depth cannot resolve the shift, the control fails, the miss is not a verdict
    rows = boundary.scorecard_rows(r, "test", "planted", FAILED)
    assert rows[0].claim_id == "thread.boundary_shift" and rows[0].verdict == NOT_TESTABLE
    assert "depth resolves the thread's shift: failed" in rows[0].control.detail
    assert boundary.scorecard_rows(r, "test", "planted", PASSED)[0].verdict == NOT_TESTABLE


def test_boundary_injection_leaves_no_hook_behind():
    model = planted(1, n_layer=2)
    boundary.crystallisation_boundary(model, boundary.boundary_pairs()[:1], alpha=1.0)
    assert not model.hooks.active


def synthetic_boundary(short: list[int], long: list[int], L: int = 36) -> boundary.BoundaryResult:
    """A deep boundary result whose per-pair boundaries are the given layers (−1: never flips)."""
    n = len(short)
    items = [{"answer": " Paris", "alternative": " Berlin", "short": "a", "long": "b"}] * n
    flips = {s: np.zeros((n, L + 1), dtype=bool) for s in boundary.SETS}
    for p in range(n):
        flips["short"][p, : short[p] + 1] = True
        flips["long"][p, : long[p] + 1] = True
    zeros = {s: np.zeros(n, dtype=bool) for s in boundary.SETS}
    return boundary.BoundaryResult(items=items, n_layer=L, alpha=1.0, unit_norm=1.0,
                                   alpha0={s: np.ones(n) for s in boundary.SETS}, flips=flips, native_alt=zeros,
                                   native_answer=zeros)


def test_boundary_stats_and_verdict_on_a_deep_synthetic_result():
    r = synthetic_boundary([17 + p % 2 for p in range(8)], [27 + p % 3 for p in range(8)])
    assert r.median("short") in (17, 17.5, 18) and r.median("long") >= 27
    _, p = r.wilcoxon()
    assert p == pytest.approx(2 / 2 ** 8)  # exact two-sided signed-rank p: all 8 pairs shift the same way
    row = boundary.scorecard_rows(r, "paper", "synthetic", PASSED)[0]
    assert row.verdict == REPRODUCED and row.p_value == p
    # the thread's claim holds whatever the control: a met criterion is reproduced
    assert boundary.scorecard_rows(r, "paper", "synthetic", FAILED)[0].verdict == REPRODUCED


def test_boundary_verdicts_no_shift_opposite_and_noise():
    same = synthetic_boundary([18] * 8, [18] * 8)
    assert boundary.scorecard_rows(same, "paper", "x", PASSED)[0].verdict == NOT_REPRODUCED
    assert boundary.scorecard_rows(same, "paper", "x", FAILED)[0].verdict == NOT_TESTABLE
    earlier = synthetic_boundary([20 + p % 2 for p in range(8)], [14 + p % 3 for p in range(8)])
    assert boundary.scorecard_rows(earlier, "paper", "x", PASSED)[0].verdict == NOT_REPRODUCED
    # shifts of both signs, not significant: the interval of the mean shift straddles 0
    noisy = synthetic_boundary([18] * 8, [18 + d for d in (3, -2, 1, -1, 4, -3, 2, 0)])
    assert boundary.shift_outcome(noisy)[0] == "straddles"
    assert boundary.scorecard_rows(noisy, "paper", "x", PASSED)[0].verdict == INCONCLUSIVE
    # too few pairs with a boundary in both contexts: the calibration control fails
    few = synthetic_boundary([18] * 3, [18] * 3)
    row = boundary.scorecard_rows(few, "paper", "x", PASSED)[0]
    assert row.verdict == NOT_TESTABLE and "prompts calibrated" in row.control.detail


# ----------------------------------------------------------------------------------------------
# Monitor


def periodic_states(T=60, period=5, d=32, seed=0, noise=0.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(period, d, generator=g)
    return torch.stack([base[t % period] + noise * torch.randn(d, generator=g) for t in range(T)])


def random_walk(T=60, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.cumsum(torch.randn(T, d, generator=g), 0)


def feed(mon, states):
    for h in states:
        mon.update(h)
    return mon


@pytest.mark.parametrize("period", [1, 2, 5])
def test_monitor_fires_on_a_periodic_sequence(period):
    prefix = torch.randn(20, 32, generator=torch.Generator().manual_seed(5))  # unrelated states, then the loop
    states = torch.cat([prefix, periodic_states(40, period, noise=0.01)])
    mon = feed(CoherenceMonitor(layer=0), states)
    assert mon.fired.tolist() == [True]
    assert 20 <= mon.fire_step[0] <= 20 + 2 * period + mon.patience + 1  # soon after the loop starts
    assert mon.trajectory("step").shape == (60, 1) and mon.trajectory("state").shape == (60, 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_monitor_does_not_fire_on_a_random_walk(seed):
    walk = random_walk(200, seed=seed)
    assert feed(CoherenceMonitor(layer=0), walk).fired.tolist() == [False]
    # the thread's raw state cosine does: a drifting state is similar to its recent past without repeating
    raw = feed(CoherenceMonitor(layer=0, signal="state"), walk)
    assert raw.fired.tolist() == [True]
    assert np.nanmax(raw.trajectory("state")) > 0.95


def test_monitor_does_not_fire_on_iid_states_and_streams_batches():
    g = torch.Generator().manual_seed(0)
    iid = torch.randn(80, 2, 32, generator=g)
    iid[40:, 1] = periodic_states(40, 3, seed=1)  # second sequence starts looping at 40
    mon = feed(CoherenceMonitor(layer=0, signal="state"), iid)
    assert mon.fired.tolist() == [False, True] and mon.fire_step[1] >= 40


def test_loop_labeller_finds_a_planted_loop():
    rng = np.random.default_rng(0)
    head = rng.permutation(1000)[:30].tolist()  # no repeats
    toks = head + [7, 8, 9] * 6 + [1, 2, 3]
    assert loop_onset(toks) == 30
    assert loop_onset(head) == -1
    assert loop_onset(head + [5] * 12) == 30  # a stuck token is a loop of period 1
    assert loop_onset(head + [5] * 5) == -1  # too short to count
    assert loop_onset(head + [1, 2, 3, 4, 5, 6, 7, 8, 9] * 2) == -1  # one repetition of a long span is not a loop
    assert NgramMonitor(4).fire_step(toks) == 30 + 3 + 4  # first time a 4-gram recurs


def monitor_eval(fire, onset, heldout, visible=32):
    """A MonitorEval with the given firing steps of the deep state rule ("L6 state"), whole-generation onsets and
    held-out onsets (the label)."""
    n = len(onset)
    return MonitorEval(layers=[6], texts=[""] * n, settings=["T=1"] * n, visible=visible, onset=np.asarray(onset),
                       heldout_onset=np.asarray(heldout), fire={"L6 state": np.asarray(fire),
                                                                "n-gram": np.full(n, -1)})


def test_monitor_scores_visible_part_and_degenerate_generations():
    # 0: degenerate (loops from token 1); 1: loops at 20, fired at 18 (lead 2); 2: fired only after the visible part;
    # 3: clean, fired (false positive); 4: clean, silent
    ev = monitor_eval(fire=[2, 18, 40, 10, -1], onset=[1, 20, 24, -1, -1], heldout=[0, 0, 0, -1, -1])
    assert ev.degenerate.tolist() == [True, False, False, False, False]
    assert ev.fired("L6 state").tolist() == [True, True, False, True, False]
    s = ev.scores("L6 state")
    assert s["generations"] == 4 and s["loops"] == 2 and s["fired"] == 2
    assert s["precision"] == 0.5 and s["recall"] == 0.5 and s["median lead (tokens)"] == 2
    assert s["precision lo"] <= 0.5 <= s["precision hi"]
    rates = ev.base_rates()
    assert rates["degenerate"] == 0.2 and rates["looping"] == 0.6 and rates["loop rate (non-degenerate)"] == 0.5


def planted_monitor(n_loop, n_clean, *, hits, false_alarms, n_degenerate=0):
    """``n_loop`` looping and ``n_clean`` clean non-degenerate generations; the detector fires on the first ``hits``
    loops and on ``false_alarms`` clean ones; plus degenerate ones it always flags."""
    fire = [5] * hits + [-1] * (n_loop - hits) + [5] * false_alarms + [-1] * (n_clean - false_alarms) + [1] * n_degenerate
    onset = [10] * n_loop + [-1] * n_clean + [0] * n_degenerate
    held = [0] * n_loop + [-1] * n_clean + [0] * n_degenerate
    return monitor_eval(fire, onset, held)


def test_loop_monitor_verdicts_on_planted_detectors():
    good = planted_monitor(30, 30, hits=30, false_alarms=0, n_degenerate=12)
    row = loop_monitor.scorecard_rows(good, "test", "x", PASSED)[0]
    assert row.verdict == REPRODUCED and "degenerate" in row.ours
    blind = planted_monitor(30, 30, hits=6, false_alarms=2)  # recall 0.2
    assert loop_monitor.scorecard_rows(blind, "test", "x", PASSED)[0].verdict == NOT_REPRODUCED
    # the same detector with a model below the competence gate
    assert loop_monitor.scorecard_rows(blind, "test", "x", FAILED)[0].verdict == NOT_TESTABLE
    # borderline: the bootstrap intervals straddle 0.8
    border = planted_monitor(20, 20, hits=16, false_alarms=4)
    assert loop_monitor.scorecard_rows(border, "test", "x", PASSED)[0].verdict == INCONCLUSIVE
    # loops are so common that firing on everything meets the bar: the null meets the claim
    common = planted_monitor(45, 5, hits=45, false_alarms=5)
    row = loop_monitor.scorecard_rows(common, "test", "x", PASSED)[0]
    assert row.verdict == INCONCLUSIVE and "null meets" in row.why


def test_loop_monitor_degenerate_only_sample_is_not_testable():
    """A weak model: every loop is "the the the …" from the first token, which every detector flags.  Those are
    left out, too few looping generations remain, and the control says so."""
    ev = planted_monitor(1, 20, hits=1, false_alarms=20, n_degenerate=12)
    row = loop_monitor.scorecard_rows(ev, "test", "x", PASSED)[0]
    assert row.verdict == NOT_TESTABLE and not row.control.passed
    assert "1 looping and 20 non-looping" in row.control.detail


def test_monitor_through_sample_and_evaluation_on_a_tiny_model():
    torch.manual_seed(0)
    model = build_model(get_config("reflow@test")).eval()
    mon = CoherenceMonitor(layer=2, window=8)
    plain = sample(model, "The capital of France is", max_new_tokens=12, temperature=0.0, device="cpu")
    texts = sample(model, "The capital of France is", max_new_tokens=12, temperature=0.0, monitor=mon)
    assert texts == plain  # the monitor only reads
    assert mon.n == 12 and mon.trajectory().shape == (12, 1) and not model.hooks.active
    ev = evaluate_monitor(model, ["The capital of France is"], [0, 2], max_new_tokens=24, temperatures=(0.0, 1.0),
                          seeds=(0,))
    assert len(ev.texts) == 2 and set(ev.fire) == {"L0 state", "L0 step", "L2 state", "L2 step", "n-gram"}
    assert ev.trajectories["L2 step"].shape == (2, 24) and ev.visible == 12
    assert len(ev.table()) == 5
    assert (ev.fire["n-gram"] < ev.visible).all()  # the text-only rule reads the visible part only
    row = loop_monitor.scorecard_rows(ev, "test", "x", FAILED)[0]  # an untrained model
    assert row.verdict == NOT_TESTABLE


@pytest.mark.slow
def test_sparsity_variants_chapter(real_book):
    check_chapter(real_book, "08_sparsity_variants", ["fig-sparsity-variants-metrics"],
                  "scorecard-sparsity-variants", {"thread.soft_sparsity"})


@pytest.mark.slow
def test_thread_followups_chapter(real_book):
    check_chapter(real_book, "09_thread_followups", ["fig-followups-boundary", "fig-followups-monitor"],
                  "scorecard-followups", {"thread.boundary_shift", "thread.loop_monitor"})
