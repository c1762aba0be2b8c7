"""Positive controls: each passes on a model with the structure planted and fails on one without it."""

import pytest
import torch
from planted import identity_model, plant_categories

from reflow_core.config import get_config
from reflow_core.experiments import controls
from reflow_core.model import build_model
from reflow_core.scorecard import Control
from reflow_core.stimuli import sentiment_ids
from reflow_core.tokenizer import single_token_id


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(get_config("reflow@test")).eval()


def test_effect_gates_pass_on_planted_categories_and_fail_on_a_random_model():
    planted, rand = plant_categories(tiny()), tiny()
    for gate in (controls.number_neighbours, controls.category_neighbours, controls.category_clusters):
        assert gate(planted).passed, gate.__name__
        failed = gate(rand)
        assert not failed.passed and failed.detail, gate.__name__


def test_vector_algebra_gate_sees_planted_offsets_only():
    m = tiny()
    assert not controls.vector_algebra(m).passed
    with torch.no_grad():  # the spike-in's planting, written into the model itself
        rows = controls._rows_copy(m)
        U = rows / rows.norm(dim=1, keepdim=True)
        for a, b, c, d in controls.algebra.analogy_set()[0]:
            ia, ib, ic, idd = (single_token_id(w) for w in (a, b, c, d))
            m.vocab.recipe[idd] = U[ib] - U[ia] + U[ic]
    assert controls.vector_algebra(m).passed


def test_spike_ins_measure_power_where_the_planted_effect_is_large_enough():
    m = tiny()
    assert controls.spike_number_neighbours(m).passed  # the paper's cosine stands out among random recipe pairs
    assert controls.spike_analogies(m).passed
    assert not controls.spike_analogies(m, strength=0.0).passed  # nothing planted, nothing found
    assert controls.spike_sparsity(128).passed and controls.spike_uneven_usage(128).passed


def test_blend_rows_plants_the_requested_cosine():
    rows = torch.randn(10, 16)
    out = controls.blend_rows(rows, 2, 5, 0.75)
    cos = torch.nn.functional.cosine_similarity(out[2], out[5], dim=0)
    assert float(cos) == pytest.approx(0.75, abs=1e-5)
    assert float(out[5].norm()) == pytest.approx(float(rows[5].norm()), rel=1e-5)


def test_factual_recall_needs_the_answer_in_the_models_top_k():
    items = [{"prompt": "The capital of France is", "target": " Paris"}]
    m = identity_model(n_layer=2, noise=0.01)  # the output reads the last token's recipe row
    assert not controls.factual_recall(m, items).passed
    with torch.no_grad():  # the state after " is" points at " Paris", whose row is long: its logit dominates
        paris = single_token_id(" Paris")
        m.vocab.recipe[paris] *= 100
        m.vocab.recipe[single_token_id(" is")] = m.vocab.recipe[paris]
    recalled = controls.factual_recall(m, items)
    assert recalled.passed and controls.answer_top1(m, items).passed
    assert "100%" in recalled.detail and recalled.value == 1.0


def test_negative_lean_follows_the_prompts_last_state():
    pos, neg = sentiment_ids()
    m = identity_model(n_layer=2, noise=0.01)
    was = single_token_id(" was")  # every negative prompt of the data file ends in " was"
    with torch.no_grad():
        m.vocab.recipe[was] = 50 * m.vocab.recipe[neg].mean(0)
    assert controls.negative_lean(m).passed
    with torch.no_grad():
        m.vocab.recipe[was] = 50 * m.vocab.recipe[pos].mean(0)
    assert not controls.negative_lean(m).passed


def test_loss_gate_fails_for_an_untrained_model(tmp_path):
    from reflow_core import data

    data.prepare("tiny", tmp_path / "tiny")
    c = controls.loss_below_unigram(tiny(), tmp_path / "tiny")
    assert not c.passed and "unigram entropy" in c.detail
    assert c.value < 0  # an untrained model is worse than unigram: ln V against the corpus entropy


def test_claim_control_combines_gates_and_spike_ins():
    ok = Control("x", True, "fine")
    bad = Control("x", False, "not there")
    gates = {"reflow": controls.ModelControls("reflow", dict.fromkeys(controls.MODEL_CONTROLS, bad)),
             "gpt2-new": controls.ModelControls("gpt2-new", dict.fromkeys(controls.MODEL_CONTROLS, ok))}
    assert controls.claim_control("atlas.top20", gates).passed  # "any": the baseline shows it
    assert not controls.claim_control("ablation.single", gates).passed  # reFlow itself must recall
    assert not controls.claim_control("training.val_gap", gates).passed  # "all" models must beat unigram
    spiked = controls.claim_control("atlas.three_four", gates, spike_model=tiny())
    assert spiked.passed and "spike-in" in spiked.name


def test_every_claim_gate_names_known_controls():
    for claim, gate in controls.CLAIM_GATES.items():
        assert set(gate.controls) <= set(controls.MODEL_CONTROLS), claim
        assert set(gate.spikes) <= set(controls.SPIKES), claim
        assert set(gate.controls) <= set(controls.settings()), claim
