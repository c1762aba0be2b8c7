"""Top-K SAE: exact sparsity, unit-norm decoder, aux-k revival of dead latents, decoder-bias init, recovery of planted
atoms, FVU, activations' normalisation."""

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


def _killed_half(aux_coef: float, steps: int = 600):
    """32 planted atoms, an SAE of width 32 whose first 16 latents start dead (b_enc = -3: they never reach the top-k
    and get no gradient from the reconstruction)."""
    x, _ = planted(n=8000, d=16, n_atoms=32, k=2)
    acts = activations.from_arrays(x[:7000].numpy(), x[7000:])
    cfg = SAEConfig(width=32, k=2, steps=steps, batch_size=128, lr=3e-3, warmup_steps=10, dead_steps=20,
                    aux_coef=aux_coef)
    m = build_variant("sae", 16, cfg, seed=0)
    with torch.no_grad():
        m.sae.b_enc[:16] = -3.0
    with torch_threads(1):
        train_reconstructor(m, acts, cfg, seed=0, progress=False)
    xv = acts.val_normalized()
    revived = float((metrics.fired_on(m, xv)[:16] > 0).float().mean())
    return revived, metrics.reconstruction_metrics(m, xv)


def test_aux_k_revives_latents_dead_at_init_and_nothing_else_does():
    revived_off, off = _killed_half(0.0)
    revived_on, on = _killed_half(1.0)
    assert revived_off == 0.0 and off["dead_frac"] >= 0.5  # without aux-k a dead latent gets no gradient: stays dead
    assert revived_on >= 0.5 and on["dead_frac"] < 0.3  # aux-k gives the dead latents the residual to fit
    assert on["fvu"] < off["fvu"]  # and the revived latents are used


def test_training_goes_on_until_dead_latents_are_under_the_bar():
    """until_dead: extra phases (half the steps each) while too many latents never fire on the train check."""
    x, _ = planted(n=8000, d=16, n_atoms=32, k=2)
    acts = activations.from_arrays(x[:7000].numpy(), x[7000:])
    cfg = SAEConfig(width=32, k=2, steps=100, batch_size=128, lr=3e-3, warmup_steps=10, dead_steps=20,
                    until_dead=0.05, max_extra_phases=3)
    m = build_variant("sae", 16, cfg, seed=0)
    with torch.no_grad():
        m.sae.b_enc[:16] = -3.0  # half dead at init: 100 steps do not revive them all
    with torch_threads(1):
        s = train_reconstructor(m, acts, cfg, seed=0, progress=False)
    assert s["extra_phases"] >= 1 and s["steps"] == 100 + 50 * s["extra_phases"]
    assert s["dead_train"] < 0.05 or s["extra_phases"] == 3
    assert s["dead_train"] == metrics.dead_share(m, metrics.train_check(acts))
    fixed_cfg = SAEConfig(width=32, k=2, steps=100, batch_size=128)  # until_dead=None: the budget only
    fixed = build_variant("sae", 16, fixed_cfg, seed=0)
    with torch_threads(1):
        assert train_reconstructor(fixed, acts, fixed_cfg, seed=0, progress=False)["steps"] == 100


def test_aux_loss_follows_saelens_scale():
    """k_aux = d // 2, coefficient 1, scaled by min(n_dead / k_aux, 1); raw pre-activations; Σ_d error, mean over
    tokens; zero when no latent is dead."""
    torch.manual_seed(0)
    sae = TopKSAE(8, 32, 2, dead_steps=1)
    assert sae.aux_k == 4 and sae.aux_coef == 1.0
    x, x_hat = torch.randn(5, 8), torch.randn(5, 8)
    pre = torch.randn(5, 32)
    assert float(sae.aux_loss(x, pre, x_hat)) == 0.0
    sae.steps_since_fired[:2] = 5  # two dead latents: k_aux = 2, scale 2/4
    z_aux = torch.zeros(5, 32)
    z_aux[:, :2] = pre[:, :2]  # negative pre-activations included (no ReLU)
    expected = 0.5 * (z_aux @ sae.W_dec.detach().t() - (x - x_hat)).pow(2).sum(-1).mean()
    assert float(sae.aux_loss(x, pre, x_hat).detach()) == pytest.approx(float(expected), rel=1e-5)


def test_decoder_bias_starts_at_geometric_median():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 4, generator=g) + torch.tensor([5.0, -3.0, 0.0, 1.0])
    x[:50] += 1000.0  # outliers move the mean, not the median
    sae = TopKSAE(4, 8, 2)
    sae.init_b_dec(x)
    assert torch.allclose(sae.b_dec.detach(), torch.tensor([5.0, -3.0, 0.0, 1.0]), atol=0.15)
    paper = TopKSAE(4, 8, 2, init="paper")  # the seed centres its inputs: b_dec fixed at the mean
    paper.init_b_dec(x)
    assert torch.allclose(paper.b_dec.detach(), x.mean(0)) and not paper.b_dec.requires_grad


def test_fvu_of_perfect_reconstruction_is_zero():
    x = torch.randn(100, 8)
    assert metrics.fvu(x, x) == 0.0
    assert metrics.fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0)


def test_normalisation_gives_mean_norm_sqrt_d():
    """SAELens' expected_average_only_in: c = √d / E‖x‖, robust to a few rows of large norm."""
    x = np.random.default_rng(0).normal(size=(4000, 16)) * 7.0
    x[:20] *= 50.0  # a few huge rows (the residual stream's first positions)
    acts = activations.from_arrays(x, torch.from_numpy(x[:10]).float())
    xn = acts.normalize(torch.from_numpy(x).float())
    assert xn.norm(dim=-1).mean().item() == pytest.approx(4.0, rel=1e-3)
    assert xn[20:].norm(dim=-1).median().item() > 2.0  # typical rows keep a usable scale (√(d/E‖x‖²) gives ~1.3)
    assert torch.allclose(acts.denormalize(xn), torch.from_numpy(x).float(), atol=1e-3)


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
    assert xn.norm(dim=-1).mean().item() == pytest.approx(32 ** 0.5, rel=0.1)
    # the val vectors are the hook's values on the held-out windows
    h = hooks.read_hook(model, a.val_windows[:1], hook).reshape(-1, 32)
    assert torch.allclose(h, a.val[: len(h)], atol=1e-5)
