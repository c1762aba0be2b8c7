"""A Neural Factorization Machine (He & Chua 2017) over an SAE code z, and the heads the baselines use.

    NFM(z) = W_lin z  +  MLP( ½ ((Σ_i z_i v_i)² − Σ_i (z_i v_i)²) )

The middle term is *bi-interaction pooling*: it equals Σ_{i<j} z_i z_j (v_i ⊙ v_j) — every pairwise product of active
latents, each pair through the elementwise product of two learned E-dimensional embeddings — computed in O(k·E)
instead of O(k²·E). With Top-K codes only k latents are non-zero, so pooling gathers their k embeddings.

The chapter's controls are heads of the same shape: linear only (``interaction=False``), and an MLP on z of the NFM's
nonlinear parameter count without FM pooling (:class:`MLPHead`). Note that W_lin z sits beside the SAE's own W_dec z:
the two are one linear map (W_dec + W_lin) z, which is why "SAE + linear" is the control that isolates what the
nonlinear part adds.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def bi_interaction(values: torch.Tensor, indices: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """½((Σ z_i v_i)² − Σ (z_i v_i)²) from the k active (values, indices) per row; V is (width, E)."""
    e = values.unsqueeze(-1) * V[indices]  # (B, k, E)
    return 0.5 * (e.sum(1).pow(2) - e.pow(2).sum(1))


def bi_interaction_dense(z: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """The same pooling on a dense code (any number of non-zeros)."""
    s = z @ V
    return 0.5 * (s.pow(2) - z.pow(2) @ V.pow(2))


def active(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries of a Top-K code (the non-zeros, ties with 0 harmless)."""
    return z.topk(k, dim=-1)


class NFM(nn.Module):
    def __init__(self, width: int, d: int, embed_dim: int, *, linear: bool = True, interaction: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.width, self.d, self.embed_dim = width, d, embed_dim
        self.linear = nn.Linear(width, d, bias=False) if linear else None
        if interaction:
            self.V = nn.Parameter(torch.randn(width, embed_dim) * 0.05)  # seed: std 0.05
            self.mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(embed_dim, embed_dim), nn.ReLU(),
                                     nn.Linear(embed_dim, d))
        else:
            self.V, self.mlp = None, None
        if self.linear is not None:
            nn.init.normal_(self.linear.weight, std=0.01)  # seed: std 0.01
        if self.mlp is not None:
            for m in self.mlp:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.01)
                    nn.init.zeros_(m.bias)

    def pool(self, z: torch.Tensor, k: int | None = None) -> torch.Tensor:
        if k is None:
            return bi_interaction_dense(z, self.V)
        return bi_interaction(*active(z, k), self.V)

    def parts(self, z: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(linear part, interaction part), each (B, d); a missing part is zeros."""
        zero = z.new_zeros(z.shape[0], self.d)
        lin = self.linear(z) if self.linear is not None else zero
        inter = self.mlp(self.pool(z, k)) if self.V is not None else zero
        return lin, inter

    def forward(self, z: torch.Tensor, k: int | None = None) -> torch.Tensor:
        lin, inter = self.parts(z, k)
        return lin + inter

    def nonlinear_params(self) -> int:
        if self.V is None:
            return 0
        return self.V.numel() + sum(p.numel() for p in self.mlp.parameters())


class MLPHead(nn.Module):
    """The no-pooling control: W_lin z + MLP(z) with the MLP sized to ``n_params`` (the NFM's nonlinear part)."""

    def __init__(self, width: int, d: int, n_params: int) -> None:
        super().__init__()
        self.width, self.d = width, d
        hidden = max(1, round((n_params - d) / (width + 1 + d)))
        self.linear = nn.Linear(width, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, d))
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.normal_(self.mlp[2].weight, std=0.01)
        nn.init.zeros_(self.mlp[2].bias)

    def parts(self, z: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(z), self.mlp(z)

    def forward(self, z: torch.Tensor, k: int | None = None) -> torch.Tensor:
        lin, inter = self.parts(z, k)
        return lin + inter

    def nonlinear_params(self) -> int:
        return sum(p.numel() for p in self.mlp.parameters())
