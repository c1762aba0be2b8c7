"""NFM pooling, a planted interaction, splicing into the model, the analysis helpers and the chapter's rows."""

import itertools

import numpy as np
import pytest
import torch
from chapter_checks import check_chapter

from reflow_core import hooks
from reflow_core.device import torch_threads
from reflow_core.sae import metrics
from reflow_core.sae.nfm import NFM, bi_interaction, bi_interaction_dense
from reflow_core.sae.topk import topk_relu


def test_bi_interaction_equals_explicit_pairwise_sum():
    torch.manual_seed(0)
    width, E, k = 12, 5, 4
    V = torch.randn(width, E)
    z, values, idx = topk_relu(torch.randn(7, width), k)
    explicit = torch.zeros(7, E)
    for b in range(7):
        for i, j in itertools.combinations(range(width), 2):
            explicit[b] += z[b, i] * z[b, j] * V[i] * V[j]
    assert torch.allclose(bi_interaction(values, idx, V), explicit, atol=1e-5)
    assert torch.allclose(bi_interaction_dense(z, V), explicit, atol=1e-5)


def test_nfm_fits_planted_pairwise_interaction_linear_cannot():
    g = torch.Generator().manual_seed(0)
    width, d, n = 8, 4, 1500
    z = (torch.rand(n, width, generator=g) < 0.4).float() * (torch.rand(n, width, generator=g) + 0.5)
    target = torch.zeros(n, d)
    target[:, 0] = 2.0 * z[:, 0] * z[:, 1]  # a pure pairwise interaction
    target[:, 1] = z[:, 2]  # and a linear part

    def fit(model):
        torch.manual_seed(0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(400):
            opt.zero_grad()
            loss = (model(z) - target).pow(2).mean()
            loss.backward()
            opt.step()
        return metrics.fvu(target, model(z).detach())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread avoids oversubscription on a shared machine
    try:
        torch.manual_seed(0)
        fvu_nfm = fit(NFM(width, d, 8))
        torch.manual_seed(0)
        fvu_lin = fit(NFM(width, d, 8, interaction=False))
    finally:
        torch.set_num_threads(threads)
    assert fvu_nfm < 0.05
    assert fvu_lin > 0.15
    assert fvu_nfm < fvu_lin / 4


@pytest.fixture(scope="module")
def tiny_lm():
    from reflow_core.config import get_config
    from reflow_core.model import build_model

    torch.manual_seed(0)
    m = build_model(get_config("reflow@test"))
    m.eval()
    return m


def windows(n=2, T=16):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 50000, (n, T), generator=g)
    return x, torch.roll(x, -1, 1)


def test_splice_identity_gives_zero_kl_and_zero_delta_ce(tiny_lm):
    x, y = windows()
    hook = hooks.layer_hook_name(tiny_lm, 1)  # h_1, the output of block 0
    seen = {}

    def spy(h):
        seen["x"] = h.clone()
        return h

    r = metrics.splice_eval(tiny_lm, hook, {"identity": metrics.identity_fn, "spy": spy,
                                            "zero": metrics.zero_fn}, x, y)
    assert r["identity"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert r["identity"]["delta_ce"] == pytest.approx(0.0, abs=1e-5)
    # the hook reads the very tensor the model computes there
    assert torch.allclose(seen["x"], hooks.read_hook(tiny_lm, x, hook), atol=1e-6)
    assert r["zero"]["kl"] > 100 * max(r["identity"]["kl"], 1e-6)
    assert r["zero"]["kl"] > 1e-3


def test_splice_writes_at_the_same_hook(tiny_lm):
    """A reconstruction spliced at blocks.0.resid_post equals running the rest of the model from that state."""
    x, y = windows(1)
    hook = hooks.layer_hook_name(tiny_lm, 1)  # h_1, the output of block 0
    h = hooks.read_hook(tiny_lm, x, hook)
    noise = torch.randn_like(h) * 0.1
    with tiny_lm.hooks.attach({hook: lambda t: t + noise}):
        spliced, _ = tiny_lm(x)
    # by hand: block 1 on (h + noise), then the head
    z = tiny_lm.blocks[1](h + noise, tiny_lm._rope())
    by_hand = tiny_lm.vocab.logits(tiny_lm.norm_final(z))
    assert torch.allclose(spliced, by_hand, atol=1e-5)


def test_bimodality_detects_two_modes_and_not_one():
    rng = np.random.default_rng(0)
    two = np.concatenate([rng.normal(0.05, 0.01, 300), rng.normal(0.4, 0.05, 700)])
    one = rng.normal(0.4, 0.05, 1000)
    b = metrics.bimodality(two, n_boot=50)
    assert b["bimodal"] and b["ashman_lo"] > 2
    assert not metrics.bimodality(one)["bimodal"]


def test_paired_reduction_and_seed_style():
    import pandas as pd

    df = pd.DataFrame({"variant": ["joint"] * 3 + ["sae"] * 3, "seed_index": [0, 1, 2] * 2,
                       "fvu": [0.5, 0.5, 0.5, 1.0, 1.0, 1.0], "fvu_sae_only": [2.0] * 6})
    m, lo, hi = metrics.paired_reduction(df, "fvu", "joint", "sae")
    assert m == pytest.approx(50.0)
    assert metrics.seed_style_reduction(df, "fvu")[0] == pytest.approx(75.0)


def test_contribution_interaction_matches_leave_one_out_by_hand():
    from reflow_core.sae.train import SAEConfig, build_variant

    cfg = SAEConfig(width=16, k=3, embed_dim=4)
    m = build_variant("joint", 8, cfg, seed=0)
    for p in m.head.mlp.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(1, 8) * 3
    c = metrics.contributions(m, x, min_fires=1)
    z = m.parts(x)["z"]
    i = int(c.index[0])
    z_minus = z.clone()
    z_minus[0, i] = 0
    by_hand = (m.head.mlp(m.head.pool(z)) - m.head.mlp(m.head.pool(z_minus))).norm().detach()
    assert c.loc[i, "inter"] == pytest.approx(float(by_hand), rel=1e-4)


# ----------------------------------------------------------------------------------------------
# Positive controls, scorecard rows and the chapter notebook


def _control(passed=True, name="SAE competence"):
    import dataclasses

    from reflow_core.scorecard import Control

    return dataclasses.asdict(Control(name, passed, "planted"))


def _bim(bimodal, d, lo, hi, bic=50.0, w=0.3, n=300):
    return {"bimodal": bimodal, "ashman_d": d, "ashman_lo": lo, "ashman_hi": hi, "bic_gain": bic, "min_weight": w,
            "means": [0.04, 0.37], "n": n}


def fake_results(recon=(45.0, 30.0, 60.0), kl=(10.0, -5.0, 25.0), mlp=(5.0, 2.0, 8.0), seq=(-3.0, -5.0, -1.0),
                 joint_bim=None, sae_bim=None, p=0.01, pc=0.6, passed=True, spike=True, lm=True):
    """A chapter record as :meth:`Result.to_json` writes it; reductions in % (positive = joint lower)."""
    comps = {f"{m}:{c}": (1.0, 0.0, 2.0) for m in ("fvu", "kl") for c in (
        "joint_vs_sae", "joint_vs_sae_linear", "joint_vs_sae_mlp", "seed_style", "sequential_vs_sae",
        "sae_mlp_vs_sae_linear", "joint_vs_sequential")}
    comps["fvu:joint_vs_sae_wide"], comps["kl:joint_vs_sae_wide"] = recon, kl
    comps["fvu:joint_vs_sae_mlp"], comps["fvu:joint_vs_sequential"] = mlp, seq
    fact = {"F_feature": 5.0, "p_feature": p, "p_control": pc, "n_discovery": 48, "n_test": 40, "n_words": 44}
    sae_claims = ("sae.recon", "sae.kl", "sae.nfm_contribution", "sae.joint_vs_sequential", "sae.factorial")
    sae_gates = {c: _control(passed) for c in sae_claims}
    controls = {c: _control(passed and lm, "language-model competence + SAE competence") for c in sae_claims}
    controls["sae.nfm_contribution"] = _control(passed and spike and lm)
    controls["sae.bimodal"] = _control(spike and lm, "planted modes")
    return {
        "config": {"seeds": [0, 1, 2]}, "comparisons": comps, "controls": controls, "sae_gates": sae_gates,
        "p_values": {"fvu:joint_vs_sae_mlp": 0.004, "fvu:joint_vs_sequential": 0.02},
        "summary": [{"variant": v, "live": 480.0, "width": 512, "params": 1000} for v in ("joint", "sae_wide")],
        "bimodality": {"joint_paper": joint_bim or _bim(True, 4.0, 3.0, 5.0),
                       "sae_paper": sae_bim or _bim(False, 0.8, 0.5, 1.2, bic=-5.0),
                       "joint_paper (all latents)": _bim(True, 6.0, 6.0, 6.0)},
        "low_mode": {"low_never_fired": 0.9},
        "factorial": {"sequential": {"summary": fact}, "joint": {"summary": fact}},
    }


def rows(**kw):
    from reflow_core.chapters.posthoc import rows_from_record

    return {r.claim_id: r for r in rows_from_record(fake_results(**kw), "test", "ckpt")}


def test_rows_cover_the_registered_claims():
    from reflow_core.scorecard import load_claims

    got = rows()
    assert set(got) == {"sae.recon", "sae.kl", "sae.nfm_contribution", "sae.joint_vs_sequential", "sae.bimodal",
                        "sae.factorial"}
    assert set(got) <= set(load_claims().claim_id)
    assert "param-matched SAE -45.0% [-60.0, -30.0]" in got["sae.recon"].ours  # a change in error, as the paper's
    assert "480/512 live" in got["sae.recon"].ours  # live capacity beside parameters


def test_competent_saes_give_the_planted_truth():
    from reflow_core.scorecard import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED

    r = rows()
    assert r["sae.recon"].verdict == REPRODUCED  # −45% [−60, −30] wholly below −20.65%
    assert r["sae.kl"].verdict == NOT_REPRODUCED  # −10% [−25, +5] wholly above −25.8%
    assert r["sae.nfm_contribution"].verdict == REPRODUCED and r["sae.nfm_contribution"].p_value == 0.004
    assert r["sae.joint_vs_sequential"].verdict == NOT_REPRODUCED  # joint worse than sequential
    assert rows(kl=(26.0, 20.0, 32.0))["sae.kl"].verdict == INCONCLUSIVE  # the interval straddles −25.8%
    assert rows(mlp=(1.0, -2.0, 4.0))["sae.nfm_contribution"].verdict == INCONCLUSIVE


def test_saes_that_are_mostly_dead_make_every_comparison_not_testable():
    """A gain over a crippled baseline is no evidence either: the gate holds in both directions."""
    from reflow_core.scorecard import NOT_TESTABLE, REPRODUCED

    r = rows(passed=False)
    for claim in ("sae.recon", "sae.kl", "sae.nfm_contribution", "sae.joint_vs_sequential", "sae.factorial"):
        assert r[claim].verdict == NOT_TESTABLE, claim
    # a test that misses a planted FM interaction cannot refute the claim when it misses the real one
    assert rows(spike=False, mlp=(-5.0, -8.0, -2.0))["sae.nfm_contribution"].verdict == NOT_TESTABLE
    assert rows(spike=False)["sae.nfm_contribution"].verdict == REPRODUCED  # an effect it did find still counts


def test_competence_gate_reads_dead_latents_of_every_compared_seed():
    import pandas as pd

    from reflow_core.sae import gates

    df = pd.DataFrame({"variant": ["joint", "joint", "sae_wide", "sae_wide"], "seed_index": [0, 1, 0, 1],
                       "dead_train": [0.02, 0.05, 0.04, 0.3], "live": [500, 490, 900, 660], "width": 512,
                       "params": 1000})
    c = gates.competence(df, ("joint", "sae_wide"))
    assert not c.passed and c.value == pytest.approx(0.3) and "30.0% dead" in c.detail
    assert gates.competence(df[df.dead_train < 0.1], ("joint", "sae_wide")).passed
    assert not gates.competence(df, ("joint", "sequential")).passed  # a variant not trained cannot pass


def test_bimodal_row_verdicts():
    from reflow_core.scorecard import INCONCLUSIVE, NOT_REPRODUCED, NOT_TESTABLE, REPRODUCED

    assert rows()["sae.bimodal"].verdict == REPRODUCED
    # the baseline trained the same way is bimodal too: the null meets the figure
    assert rows(sae_bim=_bim(True, 3.0, 2.5, 3.5))["sae.bimodal"].verdict == INCONCLUSIVE
    # Ashman's D on the knife-edge: its interval straddles 2
    assert rows(joint_bim=_bim(False, 1.99, 1.7, 2.4))["sae.bimodal"].verdict == INCONCLUSIVE
    # one component explains the fired latents
    assert rows(joint_bim=_bim(False, 1.0, 0.6, 1.4, bic=-3.0))["sae.bimodal"].verdict == NOT_REPRODUCED
    assert rows(joint_bim=_bim(False, 1.0, 0.6, 1.4, bic=-3.0), spike=False)["sae.bimodal"].verdict == NOT_TESTABLE


def test_never_fired_latents_make_a_low_mode_that_exclusion_removes():
    """The artefact: latents that never fire keep their initial norm and form a low mode of their own."""
    from reflow_core.sae import metrics

    rng = np.random.default_rng(0)
    fired = rng.normal(0.37, 0.05, 150)
    never = np.abs(rng.normal(0.01, 0.003, 350))  # initialisation's norm, left untouched
    assert metrics.bimodality(np.concatenate([fired, never]))["bimodal"]
    b = metrics.bimodality(fired, n_boot=50)
    assert not b["bimodal"] and b["ashman_lo"] <= b["ashman_d"] <= b["ashman_hi"]


def test_spike_ins_have_power_where_there_are_enough_latents():
    from reflow_core.sae import gates

    assert gates.spike_bimodal(300).passed
    assert not gates.spike_bimodal(6).passed  # too few live latents to see two modes


def test_spike_interaction_runs_the_chapter_pipeline():
    from reflow_core.sae import gates
    from reflow_core.sae.train import SAEConfig

    x, share = gates.planted_interactions(500, 8, 16, 2, 4, 0.5)
    assert x.shape == (500, 8) and 0.05 < share < 0.6
    cfg = SAEConfig(width=16, k=2, embed_dim=4, steps=20, batch_size=64, warmup_steps=2, dead_steps=5)
    with torch_threads(1):
        c, numbers = gates.spike_interaction(8, cfg, [0, 1], n=2000)
    assert c.name.startswith("spike-in") and len(numbers["fvu"]["joint"]) == 2 and "FVU change" in c.detail


def test_a_model_at_unigram_level_cannot_refute_but_a_gain_still_counts():
    """The language model's competence gates "not reproduced" (a model that computes nothing has no interactions to
    find); a measured gain over properly trained SAEs is reproduced all the same."""
    from reflow_core.scorecard import NOT_TESTABLE, REPRODUCED

    r = rows(lm=False)
    assert r["sae.recon"].verdict == REPRODUCED
    assert r["sae.kl"].verdict == NOT_TESTABLE  # missed, but the control failed
    assert r["sae.joint_vs_sequential"].verdict == NOT_TESTABLE
    assert r["sae.bimodal"].verdict == REPRODUCED


def test_paired_p_is_one_sided_on_log_ratios():
    import pandas as pd

    df = pd.DataFrame({"variant": ["joint"] * 3 + ["sae"] * 3, "seed_index": [0, 1, 2] * 2,
                       "fvu": [0.50, 0.52, 0.49, 1.0, 1.02, 0.99]})
    assert metrics.paired_p(df, "fvu", "joint", "sae") < 0.01
    assert metrics.paired_p(df, "fvu", "sae", "joint") > 0.99
    assert np.isnan(metrics.paired_p(df[df.seed_index == 0], "fvu", "joint", "sae"))


def test_factorial_row_verdicts():
    from reflow_core.scorecard import INCONCLUSIVE, NOT_REPRODUCED, NOT_TESTABLE, REPRODUCED

    assert rows()["sae.factorial"].verdict == REPRODUCED and rows()["sae.factorial"].p_value == 0.01
    assert rows(pc=0.01)["sae.factorial"].verdict == INCONCLUSIVE  # the matched control shows it too
    assert rows(p=0.3)["sae.factorial"].verdict == NOT_REPRODUCED
    assert rows(p=0.3, lm=False)["sae.factorial"].verdict == NOT_TESTABLE  # a model at unigram level
    assert rows(p=0.01, passed=False)["sae.factorial"].verdict == NOT_TESTABLE  # mostly dead SAEs


def test_factorial_stimuli_are_disjoint_and_balanced():
    from reflow_core.sae import factorial

    disc, test = factorial.load("discovery")["cells"], factorial.load("test")["cells"]
    assert set(disc) == set(test) == set(factorial.CELLS)
    all_disc = {s for c in disc.values() for s in c}
    assert not all_disc & {s for c in test.values() for s in c}
    words = factorial.word_design()
    assert words.groupby("cell").size().min() >= 8
    assert words.id.is_unique


REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_posthoc_notebook_executes(real_book):
    check_chapter(real_book, "07_posthoc",
                  [f"fig-posthoc-{name}" for name in
                   ("training", "fidelity", "norms", "contributions", "factorial", "native")],
                  "scorecard-posthoc", {"sae.recon", "sae.kl", "sae.nfm_contribution", "sae.joint_vs_sequential",
                                        "sae.bimodal", "sae.factorial"})
