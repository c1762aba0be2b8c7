"""Top-K SAE: exact sparsity, unit-norm decoder, recovery of planted atoms, FVU, activations' normalisation."""

import numpy as np
import pytest
import torch

from reflow_core import hooks
from reflow_core.sae import activations, metrics
from reflow_core.device import torch_threads
from reflow_core.sae.topk import TopKSAE
from reflow_core.sae.train import Reconstructor, SAEConfig, build_variant, train_reconstructor


def test_topk_keeps_exactly_k():
    torch.manual_seed(0)
    sae = TopKSAE(16, 64, 5)
    z = sae.encode(torch.randn(200, 16) * 3)
    assert ((z > 0).sum(-1) <= 5).all()
    # pre-activations are positive for many latents here, so exactly k survive
    assert (((z > 0).sum(-1)) == 5).float().mean() > 0.95
    assert (z >= 0).all()


def test_unit_norm_decoder_after_steps():
    torch.manual_seed(0)
    sae = TopKSAE(8, 32, 4)
    acts = activations.from_arrays(np.random.default_rng(0).normal(size=(512, 8)), torch.randn(64, 8))
    with torch_threads(1):
        train_reconstructor(Reconstructor(sae), acts, SAEConfig(width=32, k=4, steps=30, batch_size=64, lr=1e-2),
                            seed=0, progress=False)
    assert torch.allclose(sae.decoder_norms(), torch.ones(32), atol=1e-5)


def test_parallel_gradient_removed():
    sae = TopKSAE(8, 16, 4)
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(0).abs().max() < 1e-5


def planted(n=20000, d=32, n_atoms=64, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(n_atoms, generator=g)[:k] for _ in range(n)])
    coef = torch.rand(n, k, generator=g) + 0.5
    x = (coef.unsqueeze(-1) * atoms[idx]).sum(1)
    return x, atoms


def test_sae_recovers_planted_atoms():
    x, atoms = planted()
    acts = activations.from_arrays(x[:18000].numpy(), x[18000:])
    cfg = SAEConfig(width=128, k=3, steps=1500, batch_size=256, lr=3e-3, dead_steps=50)
    m = build_variant("sae", 32, cfg, seed=0)
    with torch_threads(1):  # small matmuls: one thread avoids oversubscription on a shared machine
        train_reconstructor(m, acts, cfg, seed=0, progress=False)
    cos = (atoms @ m.sae.W_dec.detach()).max(dim=1).values
    assert (cos > 0.9).float().mean() > 0.8, cos
    assert metrics.fvu(acts.val_normalized(), m(acts.val_normalized())) < 0.2


def test_fvu_of_perfect_reconstruction_is_zero():
    x = torch.randn(100, 8)
    assert metrics.fvu(x, x) == 0.0
    assert metrics.fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0)


def test_normalisation_gives_expected_squared_norm_d():
    x = np.random.default_rng(0).normal(size=(4000, 16)) * 7.0
    acts = activations.from_arrays(x, torch.from_numpy(x[:10]).float())
    xn = acts.normalize(torch.from_numpy(x).float())
    assert xn.pow(2).sum(-1).mean().item() == pytest.approx(16, rel=1e-3)
    assert torch.allclose(acts.denormalize(xn), torch.from_numpy(x).float(), atol=1e-4)


def test_widened_sae_matches_parameter_count():
    d, w = 32, 128
    cfg = SAEConfig(width=w, k=4, embed_dim=16)
    joint = build_variant("joint", d, cfg, seed=0)
    wide = build_variant("sae_wide", d, cfg, seed=0)
    assert abs(wide.num_params() - joint.num_params()) <= 2 * d + 1


def test_activations_stream_from_memmap(tmp_path):
    from reflow_core.config import get_config
    from reflow_core.model import build_model
    from reflow_core.scales import data_dir_for
    from reflow_core.runs import ensure_data

    ensure_data("test")
    torch.manual_seed(0)
    model = build_model(get_config("reflow@test"))
    hook = hooks.layer_hook_name(model, 1)  # h_1, the output of block 0
    a = activations.collect(model, hook, data_dir_for("test"), n_train=2000, n_val=256, block_size=32, max_bytes=1000,
                            cache_dir=tmp_path, progress=False)
    assert a.on_disk and isinstance(a.train, np.memmap)
    assert a.val.shape[1] == 32 and 0 < len(a.val) <= 256  # the tiny corpus' val split may hold fewer
    xn = a.sample(4000, torch.Generator().manual_seed(0))
    assert xn.pow(2).sum(-1).mean().item() == pytest.approx(32, rel=0.1)
    # the val vectors are the hook's values on the held-out windows
    h = hooks.read_hook(model, a.val_windows[:1], hook).reshape(-1, 32)
    assert torch.allclose(h, a.val[: len(h)], atol=1e-5)
