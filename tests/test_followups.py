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
from reflow_core.experiments.loop_monitor import MonitorEval, evaluate_monitor
from reflow_core.monitor import CoherenceMonitor, NgramMonitor, loop_onset
from reflow_core.sample import sample
from reflow_core.scorecard import NOT_TESTABLE, REPRODUCED

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
    u, p = r.mann_whitney()
    assert p == 1.0 and r.paired_shift() == 0
    rows = boundary.scorecard_rows(r, "test", "planted")
    assert rows[0].claim_id == "thread.boundary_shift" and rows[0].verdict == NOT_TESTABLE  # 4 layers: too shallow


def test_boundary_injection_leaves_no_hook_behind():
    model = planted(1, n_layer=2)
    boundary.crystallisation_boundary(model, boundary.boundary_pairs()[:1], alpha=1.0)
    assert not model.hooks.active


def test_boundary_stats_and_verdict_on_a_deep_synthetic_result():
    items = [{"answer": " Paris", "alternative": " Berlin", "short": "a", "long": "b"}] * 8
    L = 36
    flips = {s: np.zeros((8, L + 1), dtype=bool) for s in boundary.SETS}
    for p in range(8):
        flips["short"][p, : 18 + p % 2] = True
        flips["long"][p, : 28 + p % 3] = True
    zeros = {s: np.zeros(8, dtype=bool) for s in boundary.SETS}
    r = boundary.BoundaryResult(items=items, n_layer=L, alpha=1.0, unit_norm=1.0,
                                alpha0={s: np.ones(8) for s in boundary.SETS}, flips=flips, native_alt=zeros,
                                native_answer=zeros)
    assert r.median("short") in (17, 17.5, 18) and r.median("long") >= 27
    assert r.mann_whitney()[1] < 0.01
    assert boundary.scorecard_rows(r, "paper", "synthetic")[0].verdict == REPRODUCED


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


def test_monitor_scores_and_lead_time():
    ev = MonitorEval(layers=[1], texts=[""] * 4, settings=["greedy"] * 4, onset=np.array([10, 20, -1, -1]),
                     fire={"a": np.array([6, 25, -1, 3]), "n-gram": np.array([-1, 21, -1, -1])})
    s = ev.scores("a")
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == 1.0
    assert s["median lead (tokens)"] == pytest.approx(-0.5)  # leads 4 and −5
    assert ev.scores("n-gram")["recall"] == 0.5


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
    assert ev.trajectories["L2 step"].shape == (2, 24)
    assert len(ev.table()) == 5


@pytest.mark.slow
def test_sparsity_variants_chapter(real_book):
    check_chapter(real_book, "08_sparsity_variants", ["fig-sparsity-variants-metrics"],
                  "scorecard-sparsity-variants", {"thread.soft_sparsity"})


@pytest.mark.slow
def test_thread_followups_chapter(real_book):
    check_chapter(real_book, "09_thread_followups", ["fig-followups-boundary", "fig-followups-monitor"],
                  "scorecard-followups", {"thread.boundary_shift", "thread.loop_monitor"})
