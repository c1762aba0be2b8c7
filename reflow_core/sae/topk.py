"""A Top-K sparse autoencoder (Gao et al. 2024; SAELens' ``topk`` architecture), in one file.

    z = TopK_k(ReLU(W_enc (x − b_dec) + b_enc))        (exactly k non-zeros per row)
    x̂ = W_dec z + b_dec

Two training details matter and are both here:

* **Unit-norm decoder columns.** Without them the loss can shrink z and grow W_dec (or the reverse) at no cost, so a
  latent's "decoder norm" would say nothing about the latent. After every optimiser step :meth:`normalize_decoder`
  re-projects the columns onto the unit sphere, and before every step :meth:`remove_parallel_grad` removes the
  component of each column's gradient parallel to the column (the step then moves along the sphere).
* **Aux-k against dead latents.** A latent that has not fired for ``dead_steps`` steps is "dead"; the auxiliary loss
  asks the top ``aux_k`` dead latents to reconstruct the main reconstruction's error, which gives them gradient again
  (weighted by ``aux_coef``, normalised by the error's variance as in Gao et al.).

``init="paper"`` reproduces the seed's recipe instead (free decoder norms, default ``nn.Linear`` decoder init,
encoder = decoderᵀ, no aux-k): the chapter needs it to test the seed's decoder-norm claim, which is vacuous for a
unit-norm decoder.
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
                 aux_coef: float = 1 / 32, dead_steps: int = 200) -> None:
        super().__init__()
        if not 0 < k <= width:
            raise ValueError(f"k={k} must be in 1..width={width}")
        if init not in ("careful", "paper"):
            raise ValueError(f"init must be 'careful' or 'paper', got {init!r}")
        self.d, self.width, self.k, self.init = d, width, k, init
        self.unit_norm = init == "careful"
        self.aux_k = (min(2 * k, width) if aux_k is None else aux_k) if self.unit_norm else 0
        self.aux_coef, self.dead_steps = aux_coef, dead_steps
        self.W_enc = nn.Parameter(torch.empty(width, d))
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.W_dec = nn.Parameter(torch.empty(d, width))  # column i = latent i's direction
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("steps_since_fired", torch.zeros(width, dtype=torch.long))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.unit_norm:
            # SAELens / Gao et al.: random unit-norm decoder columns, encoder initialised to the transpose
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
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - self.b_dec if self.unit_norm else x  # the seed's SAE does not subtract b_dec
        return F.linear(centred, self.W_enc, self.b_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return topk_relu(self.pre_activations(x), self.k)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z, self.W_dec, self.b_dec)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decode(z), z

    # -- training helpers ----------------------------------------------------------------------
    def aux_loss(self, x: torch.Tensor, pre: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """Aux-k: the top ``aux_k`` *dead* latents reconstruct the residual x − x̂ (zero when none is dead)."""
        dead = self.steps_since_fired >= self.dead_steps
        if self.aux_k == 0 or not bool(dead.any()):
            return x.new_zeros(())
        k_aux = min(self.aux_k, int(dead.sum()))
        masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
        z_aux = topk_relu(masked, k_aux)[0].nan_to_num(0.0)
        err = (x - x_hat).detach()
        err_hat = F.linear(z_aux, self.W_dec)
        denom = (err - err.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-8)
        return (err_hat - err).pow(2).sum(-1).mean() / denom

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
