"""A Top-K sparse autoencoder (Gao et al. 2024), in one file.

    z = TopK_k(ReLU(W_enc (x − b_dec) + b_enc))        (exactly k non-zeros per row)
    x̂ = W_dec z + b_dec

Three training details matter and are all here:

* **The decoder bias starts at the data's geometric median** (Gao et al.; SAELens' ``b_dec_init_method=
  "geometric_median"`` option; :meth:`TopKSAE.init_b_dec`).  A residual stream has a large common component: with
  b_dec = 0 every token's x − b_dec points the same way, the same few latents win the top-k for every token, and the
  rest never fire (at ``smoke``, b_dec = 0 left about 90% of the latents dead).
* **Unit-norm decoder columns.** Without them the loss can shrink z and grow W_dec (or the reverse) at no cost, so a
  latent's "decoder norm" would say nothing about the latent. After every optimiser step :meth:`normalize_decoder`
  re-projects the columns onto the unit sphere, and before every step :meth:`remove_parallel_grad` removes the
  component of each column's gradient parallel to the column (the step then moves along the sphere).
* **Aux-k against dead latents**, as SAELens 6.x computes it (``TopKTrainingSAE.calculate_topk_aux_loss``): a latent
  that has not fired for ``dead_steps`` steps is dead; the ``k_aux = d // 2`` dead latents with the largest
  pre-activations (no ReLU: a dead latent's pre-activation is usually negative, and the loss must be able to raise it)
  reconstruct the detached error x − x̂ of the whole model, and the loss
  ``scale · Σ_d (W_dec z_aux − (x − x̂))²`` (mean over tokens) is added with coefficient ``aux_coef`` = 1, where
  ``scale = min(n_dead / k_aux, 1)`` shrinks it while few latents are dead.  The main loss of
  :func:`reflow_core.sae.train.train_reconstructor` is the same kind of quantity (Σ_d of the squared error, mean over
  tokens), so the two terms are on one scale.  (Our earlier aux term divided by the error's variance while the main
  MSE did not — Gao et al. normalise *both* — which left aux-k about d times too weak to revive anything.)

**Where this differs from SAELens** (kept on purpose; each is named so that a reader can tell):

* decoder norms: SAELens' Top-K SAE initialises decoder rows at norm 0.1 (``decoder_init_norm``) and may rescale
  activations by the decoder norm; we keep Gao et al.'s unit-norm columns with projected gradients, because the
  chapter's decoder-norm analysis needs the careful models' norms fixed (the seed's free norms are ``init="paper"``);
* the aux reconstruction: SAELens decodes the aux code with the decoder bias (``decode`` adds b_dec); we leave b_dec
  out — the error x − x̂ has no bias to reproduce;
* everything else of aux-k (k_aux = d // 2, coefficient 1 scaled by min(n_dead / k_aux, 1), top-k of raw
  pre-activations, error detached, squared error summed over d and averaged over tokens) is SAELens';
* gradient clipping (global norm 1.0, as SAELens' trainer) and activation scaling (√d / E‖x‖, SAELens'
  ``expected_average_only_in``) live in :mod:`reflow_core.sae.train` and :mod:`reflow_core.sae.activations`.

``init="paper"`` reproduces the seed's recipe instead (free decoder norms, default ``nn.Linear`` decoder init,
encoder = decoderᵀ, no aux-k — ``part15_joint_SAENFM_training.py`` of the seed's repository): the chapter needs it to
test the seed's decoder-norm claim, which is vacuous for a unit-norm decoder.  The seed standardises every chunk of
activations per dimension before training (``collect_activations_chunk``: ``(activations - mean) / std``) and its
decoder has no bias; here the paper recipe subtracts the train mean (b_dec fixed at the mean, not trained) and keeps the
single-scalar normalisation of :mod:`reflow_core.sae.activations` instead of a per-dimension std.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def topk_relu(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the k largest entries of ReLU(pre) per row: (dense z, values, indices)."""
    values, indices = F.relu(pre).topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, indices, values)
    return z, values, indices


class TopKSAE(nn.Module):
    def __init__(self, d: int, width: int, k: int, *, init: str = "careful", aux_k: int | None = None,
                 aux_coef: float = 1.0, dead_steps: int = 200) -> None:
        super().__init__()
        if not 0 < k <= width:
            raise ValueError(f"k={k} must be in 1..width={width}")
        if init not in ("careful", "paper"):
            raise ValueError(f"init must be 'careful' or 'paper', got {init!r}")
        self.d, self.width, self.k, self.init = d, width, k, init
        self.unit_norm = init == "careful"
        self.aux_k = (max(1, d // 2) if aux_k is None else aux_k) if self.unit_norm else 0  # SAELens: d_in // 2
        self.aux_coef, self.dead_steps = aux_coef, dead_steps
        self.W_enc = nn.Parameter(torch.empty(width, d))
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.W_dec = nn.Parameter(torch.empty(d, width))  # column i = latent i's direction
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("steps_since_fired", torch.zeros(width, dtype=torch.long))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.unit_norm:
            # Gao et al.: random unit-norm decoder columns, encoder initialised to the transpose
            nn.init.normal_(self.W_dec)
            with torch.no_grad():
                self.W_dec /= self.W_dec.norm(dim=0, keepdim=True)
                self.W_enc.copy_(self.W_dec.t())
        else:
            # the seed's part15: decoder = nn.Linear(width, d) default init, encoder weight = decoderᵀ
            bound = 1 / math.sqrt(self.width)
            nn.init.uniform_(self.W_dec, -bound, bound)
            with torch.no_grad():
                self.W_enc.copy_(self.W_dec.t())
        nn.init.zeros_(self.b_enc)
        nn.init.zeros_(self.b_dec)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- forward -------------------------------------------------------------------------------
    @torch.no_grad()
    def init_b_dec(self, sample: torch.Tensor, iters: int = 50) -> None:
        """Start b_dec at the geometric median of ``sample`` (Weiszfeld's iteration; Gao et al.), or for the seed's
        recipe fix it at the mean (the seed centres its inputs and has no decoder bias)."""
        sample = sample.float()
        if not self.unit_norm:
            self.b_dec.copy_(sample.mean(0))
            self.b_dec.requires_grad_(False)
            return
        m = sample.mean(0)
        for _ in range(iters):
            w = 1.0 / (sample - m).norm(dim=-1).clamp_min(1e-8)
            m_new = (w[:, None] * sample).sum(0) / w.sum()
            if (m_new - m).norm() <= 1e-6 * m.norm().clamp_min(1e-12):
                m = m_new
                break
            m = m_new
        self.b_dec.copy_(m)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x - self.b_dec, self.W_enc, self.b_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return topk_relu(self.pre_activations(x), self.k)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z, self.W_dec, self.b_dec)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decode(z), z

    # -- training helpers ----------------------------------------------------------------------
    def dead_mask(self) -> torch.Tensor:
        """Latents that have not fired for ``dead_steps`` training steps (the aux-k rule)."""
        return self.steps_since_fired >= self.dead_steps

    def aux_loss(self, x: torch.Tensor, pre: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """Aux-k (SAELens 6.x): the top ``k_aux`` dead latents' raw pre-activations reconstruct the detached residual
        x − x̂; Σ_d squared error, mean over tokens, times min(n_dead / k_aux, 1).  Zero when none is dead.  The caller
        multiplies by ``aux_coef``."""
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if self.aux_k == 0 or n_dead == 0:
            return x.new_zeros(())
        scale = min(n_dead / self.aux_k, 1.0)
        k_aux = min(self.aux_k, n_dead)
        masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
        values, indices = masked.topk(k_aux, dim=-1)
        z_aux = torch.zeros_like(pre).scatter(-1, indices, values)
        err = (x - x_hat).detach()
        return scale * (F.linear(z_aux, self.W_dec) - err).pow(2).sum(-1).mean()

    @torch.no_grad()
    def update_fired(self, z: torch.Tensor) -> None:
        fired = (z > 0).any(0)
        self.steps_since_fired += 1
        self.steps_since_fired[fired] = 0

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.unit_norm:
            self.W_dec /= self.W_dec.norm(dim=0, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the part of each decoder column's gradient along the (unit) column itself."""
        if self.unit_norm and self.W_dec.grad is not None:
            g, W = self.W_dec.grad, self.W_dec
            g -= W * (g * W).sum(0, keepdim=True)

    def decoder_norms(self) -> torch.Tensor:
        return self.W_dec.detach().norm(dim=0)


def width_for_params(d: int, n_params: int) -> int:
    """The Top-K SAE width whose parameter count (2·d·w + w + d) is closest to ``n_params``."""
    return max(1, round((n_params - d) / (2 * d + 1)))
