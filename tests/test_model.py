"""Model family: published parameter counts, shapes, tying, the factored head, Top-K, GQA, hooks."""

import pytest
import torch

from reflow_core.config import (
    PAPER_PRESETS, PUBLISHED_PARAMS_M, ConfigError, ModelConfig, get_config, preset_names,
)
from reflow_core.model import GPT, build_model
from reflow_core.vocab import FactoredVocab


@pytest.mark.parametrize("name", sorted(PAPER_PRESETS))
def test_paper_presets_reproduce_published_parameter_counts(name):
    model = build_model(get_config(name), "meta")
    assert round(model.num_params() / 1e6, 2) == PUBLISHED_PARAMS_M[name]


def test_exact_counts_of_the_paper_presets():
    # exact integers, so that a change of convention (biases, padding) cannot hide inside the rounding
    exact = {name: build_model(get_config(name), "meta").num_params() for name in PAPER_PRESETS}
    assert exact["gpt2"] == 505_619_456
    assert exact["gpt2-new"] == 514_008_064
    assert exact["reflow-1"] == 463_668_224
    assert exact["reflow-1-big"] == 515_056_640
    assert exact["reflow-1-small"] == 46_471_680


def test_bare_family_names_mean_the_paper_size():
    assert get_config("reflow") == get_config("reflow-1-big")
    assert get_config("reflow@paper") == get_config("reflow-1-big")
    assert "reflow@smoke" in preset_names()


def tiny(family, **overrides):
    torch.manual_seed(0)
    return build_model(get_config(f"{family}@test", **overrides))


@pytest.mark.parametrize("family", ["gpt2", "gpt2-new", "reflow", "reflow-topk", "reflow-lite"])
def test_forward_shapes_and_initial_loss(family):
    model = tiny(family)
    idx = torch.randint(0, 50257, (3, 17))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 17, model.config.vocab_size)
    # at initialisation the loss is close to uniform over the vocabulary (ln 50304 ≈ 10.83)
    assert 9.0 < loss.item() < 11.5
    last, none = model(idx, last_only=True)
    assert none is None and last.shape == (3, 1, model.config.vocab_size)
    torch.testing.assert_close(last[:, 0], logits[:, -1], rtol=1e-4, atol=1e-4)


def test_factored_vocabulary_ties_input_and_output():
    model = tiny("reflow")
    assert isinstance(model.vocab, FactoredVocab)
    names = {name for name, _ in model.named_parameters()}
    assert "vocab.recipe" in names and "vocab.basis" in names
    assert not any("head" in name for name in names)  # no separate LM head
    idx = torch.tensor([[5, 9]])
    E = model.vocab.recipe @ model.vocab.basis
    torch.testing.assert_close(model.vocab.embed(idx)[0], E[[5, 9]])
    h = torch.randn(2, 3, model.config.d_model)
    torch.testing.assert_close(model.vocab.logits(h), h @ E.t(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_tokens", [1, 4096])
def test_both_head_orders_agree_and_the_cheaper_one_is_chosen(n_tokens, monkeypatch):
    config = get_config("reflow@test", n_signals=8)
    vocab = FactoredVocab(config)
    vocab.reset_parameters(config)
    h = torch.randn(n_tokens, config.d_model, dtype=torch.float64)
    vocab = vocab.double()
    signals_first = (h @ vocab.basis.t()) @ vocab.recipe.t()
    embedding_first = h @ (vocab.recipe @ vocab.basis).t()
    torch.testing.assert_close(signals_first, embedding_first)
    torch.testing.assert_close(vocab.logits(h), signals_first)
    # which order ran: count calls of `signals`
    calls = []
    original = vocab.signals
    monkeypatch.setattr(vocab, "signals", lambda x: calls.append(1) or original(x))
    vocab.logits(h)
    V, S, d = config.vocab_size, config.n_signals, config.d_model
    expect_signals_first = n_tokens * d * S + n_tokens * S * V <= V * S * d + n_tokens * V * d
    assert bool(calls) == expect_signals_first


def test_topk_recipes_keep_exactly_k_nonnegative_entries():
    model = tiny("reflow-topk")
    recipe = model.vocab.recipe_matrix()
    active = (recipe != 0).sum(dim=1)
    assert (active <= model.config.topk).all() and (recipe >= 0).all()
    # rows with at least k positive raw entries keep exactly k
    rich = (model.vocab.recipe > 0).sum(dim=1) >= model.config.topk
    assert (active[rich] == model.config.topk).all()
    idx = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(model.vocab.recipe_rows(idx)[0], recipe[[1, 2, 3]])


def test_grouped_query_attention_has_fewer_kv_parameters():
    lite, full = tiny("reflow-lite"), tiny("reflow")
    assert lite.config.kv_heads < lite.config.n_head
    assert lite.blocks[0].attn.qkv.weight.shape[0] < full.blocks[0].attn.qkv.weight.shape[0]
    logits, loss = lite(torch.randint(0, 100, (2, 9)), torch.randint(0, 100, (2, 9)))
    assert torch.isfinite(loss)


def test_causality_future_tokens_do_not_change_past_logits():
    for family in ("gpt2", "reflow"):
        model = tiny(family)
        a = torch.randint(0, 50257, (1, 12))
        b = a.clone()
        b[0, 8:] = torch.randint(0, 50257, (4,))
        la, _ = model(a)
        lb, _ = model(b)
        torch.testing.assert_close(la[0, :8], lb[0, :8], rtol=1e-4, atol=1e-5)


def test_hooks_read_and_write_the_residual_stream():
    model = tiny("reflow").eval()
    idx = torch.randint(0, 50257, (1, 6))
    logits, cache = model.run_with_cache(idx)
    assert set(cache) == set(model.hooks.names)
    # the output of block i is the input of block i+1
    torch.testing.assert_close(cache["blocks.0.resid_post"], cache["blocks.1.resid_pre"])
    # the last residual, normalised and projected, gives the logits
    torch.testing.assert_close(model.lens_logits(cache["blocks.1.resid_post"]), logits, rtol=1e-4, atol=1e-5)
    # writing: zeroing the final residual makes every position's logits identical
    with model.hooks.attach({"blocks.1.resid_post": lambda x: torch.zeros_like(x)}):
        zeroed, _ = model(idx)
    torch.testing.assert_close(zeroed[0, 0], zeroed[0, -1])
    assert not torch.allclose(zeroed, logits)
    # hooks are gone after the with-block
    again, _ = model(idx)
    torch.testing.assert_close(again, logits)
    with pytest.raises(KeyError, match="unknown hook point"):
        with model.hooks.attach({"blocks.9.resid_post": lambda x: x}):
            pass


def test_signal_readout_is_the_lens():
    model = tiny("reflow").eval()
    h = torch.randn(1, 4, model.config.d_model)
    s = model.signal_readout(h)
    assert s.shape == (1, 4, model.config.n_signals)
    torch.testing.assert_close(s @ model.vocab.recipe.t(), model.lens_logits(h), rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError):
        tiny("gpt2-new").signal_readout(h)


def test_bad_config_fields_are_named():
    with pytest.raises(ConfigError, match="n_head"):
        get_config("reflow@test", n_head=3)
    with pytest.raises(ConfigError, match="'colour'"):
        get_config("reflow@test", colour="blue")
    with pytest.raises(ConfigError, match="vocab_style"):
        ModelConfig(n_layer=1, n_head=1, d_model=8, vocab_style="nope").validate()
    with pytest.raises(ConfigError, match="unknown preset"):
        get_config("reflow@huge")
    with pytest.raises(ConfigError, match=r"unknown model config field\(s\) \['bogus'\]"):
        ModelConfig.from_dict({**get_config("reflow@test").to_dict(), "bogus": 1})


def test_greedy_generation_is_deterministic_and_stays_in_the_real_vocabulary():
    model = tiny("reflow").eval()
    idx = torch.tensor([[464, 3139]])
    a = model.generate(idx, 5, temperature=0)
    b = model.generate(idx, 5, temperature=0)
    assert torch.equal(a, b) and a.shape == (1, 7)
    g = torch.Generator().manual_seed(0)
    c = model.generate(idx, 20, temperature=1.0, top_k=50, generator=g)
    assert (c < model.config.real_vocab_size).all()


def test_flops_per_token_counts_the_factored_head():
    reflow = build_model(get_config("reflow-1-big"), "meta")
    gpt2_new = build_model(get_config("gpt2-new"), "meta")
    # same backbone and S = d: the factored head costs d·S more per token, never less than the tied one
    assert reflow.flops_per_token() >= gpt2_new.flops_per_token()
    assert reflow.flops_per_token() == pytest.approx(6 * reflow.num_params() + 12 * 36 * 1024 * 1024, rel=0.05)
    assert GPT  # the class is importable for users who subclass it


def test_params_command_prints_the_exact_count_without_allocating():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "reflow_core", "params", "reflow-1-big"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "515056640"
    bad = subprocess.run([sys.executable, "-m", "reflow_core", "params", "reflow@huge"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown preset 'reflow@huge'" in bad.stderr  # a user error, not a bug (1)
