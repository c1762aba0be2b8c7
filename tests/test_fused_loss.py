"""The chunked linear cross-entropy equals the textbook path: loss and both gradients."""

import pytest
import torch
import torch.nn.functional as F

from reflow_core.config import get_config
from reflow_core.fused_loss import linear_cross_entropy
from reflow_core.model import build_model


def textbook(x, w, t):
    return F.cross_entropy((x @ w.t()).float().reshape(-1, w.shape[0]), t.reshape(-1), ignore_index=-1)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_loss_and_gradients_match_the_textbook_path(chunk):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 11, 16, generator=gen, requires_grad=True)
    w = torch.randn(97, 16, generator=gen, requires_grad=True)
    t = torch.randint(0, 97, (3, 11), generator=gen)
    t[0, :4] = -1  # ignored positions count neither in the loss nor in the mean
    expected = textbook(x, w, t)
    gx, gw = torch.autograd.grad(expected * 2.5, (x, w))
    got = linear_cross_entropy(x, w, t, chunk=chunk)
    fx, fw = torch.autograd.grad(got * 2.5, (x, w))  # the incoming gradient scales both
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fx, gx, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fw, gw, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_matches_within_bf16_rounding_and_keeps_dtypes():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 32, generator=gen, requires_grad=True)
    w = (0.2 * torch.randn(300, 32, generator=gen)).requires_grad_()
    t = torch.randint(0, 300, (40,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = textbook(x, w, t)
        got = linear_cross_entropy(x, w, t, chunk=16)
    gx, gw = torch.autograd.grad(expected, (x, w))
    fx, fw = torch.autograd.grad(got, (x, w))
    assert fx.dtype == x.dtype and fw.dtype == w.dtype
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(fw, gw, rtol=5e-2, atol=5e-3)


def test_without_grad_only_the_loss_and_all_ignored_is_nan():
    x, w, t = torch.randn(5, 4, requires_grad=True), torch.randn(9, 4), torch.randint(0, 9, (5,))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, t), textbook(x, w, t))
    assert torch.isnan(linear_cross_entropy(x, w, torch.full((5,), -1)))
    with pytest.raises(ValueError, match="do not match"):
        linear_cross_entropy(x, w, t[:3])


@pytest.mark.parametrize("family", ["gpt2", "reflow", "reflow-topk"])
def test_model_training_loss_is_the_same_without_logits(family):
    torch.manual_seed(0)
    model = build_model(get_config(f"{family}@test"))
    idx = torch.randint(0, 50257, (2, 24))
    logits, loss = model(idx, idx)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    none, fused = model(idx, idx, return_logits=False)
    fused_grads = torch.autograd.grad(fused, list(model.parameters()), allow_unused=True)
    assert none is None
    torch.testing.assert_close(fused, loss, rtol=1e-6, atol=1e-6)
    for g, f in zip(grads, fused_grads):
        if g is not None:
            torch.testing.assert_close(f, g, rtol=1e-4, atol=1e-6)
