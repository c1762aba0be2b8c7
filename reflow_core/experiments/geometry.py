"""Experiment 3 — Basis Geometry: how many directions do the signals really span?

For W_basis (S×d), the product E = W_recipe·W_basis (V×d, real vocabulary) and the recipe (V×S) we compute the
singular spectrum and two effective dimensions:

* **effective rank** (Roy & Vetterli 2007): exp(H(p)), p_i = σ_i / Σσ — equals r for r equal singular values;
* **participation ratio**: (Σλ)² / Σλ², λ = σ² — the number of directions that carry the variance;

and the pairwise cosines of the basis rows (low redundancy ⇔ small |cos|). Nulls: the same at initialisation and for
a Gaussian matrix of the same shape (whose spectrum is Marchenko–Pastur, not flat); GPT-2-New's E for the product.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from reflow_core.experiments.common import cosine_matrix, embedding_rows, own_mask, seed_interval, vocab_rows


def singular_values(M: torch.Tensor) -> np.ndarray:
    """Singular values, largest first; tall matrices go through the small Gram matrix (fast for V×d)."""
    M = M.double()
    if M.shape[0] > 4 * M.shape[1]:
        ev = torch.linalg.eigvalsh(M.t() @ M).clamp_min(0).sqrt()
        return ev.flip(0).numpy()
    return torch.linalg.svdvals(M).numpy()


def effective_rank(sv: np.ndarray) -> float:
    p = np.asarray(sv, dtype=np.float64)
    p = p[p > 0] / p.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def participation_ratio(sv: np.ndarray) -> float:
    lam = np.asarray(sv, dtype=np.float64) ** 2
    return float(lam.sum() ** 2 / (lam ** 2).sum())


@dataclass
class Spectrum:
    name: str
    shape: tuple[int, int]
    sv: np.ndarray
    effective_rank: float
    participation_ratio: float

    @classmethod
    def of(cls, name: str, M: torch.Tensor) -> "Spectrum":
        sv = singular_values(M)
        return cls(name, tuple(M.shape), sv, effective_rank(sv), participation_ratio(sv))


@dataclass
class GeometryResult:
    spectra: dict[str, Spectrum]  # "basis", "product", "recipe" (factored) / "product" (tied); "+ gaussian" nulls
    basis_cos: np.ndarray | None  # off-diagonal pairwise cosines of basis rows
    basis_cos_null: np.ndarray | None  # the same for a Gaussian basis of the same shape
    mean_abs_cos: float = float("nan")
    mean_abs_cos_null: float = float("nan")


def _offdiag(C: torch.Tensor) -> np.ndarray:
    n = C.shape[0]
    return C[~torch.eye(n, dtype=torch.bool)].numpy()


@torch.no_grad()
def basis_geometry(model, seed: int = 0) -> GeometryResult:
    """Spectra, effective ranks and basis-row cosines for one model, with Gaussian nulls of the same shapes."""
    g = torch.Generator().manual_seed(seed)
    spectra = {}
    own = own_mask(model)
    E = embedding_rows(model)[own]
    spectra["product"] = Spectrum.of("product E", E)
    spectra["product (gaussian)"] = Spectrum.of("Gaussian V×d", torch.randn(E.shape, generator=g))
    if not getattr(model, "is_factored", False):
        return GeometryResult(spectra, None, None)
    B = model.vocab.basis.detach().float().cpu()
    spectra["basis"] = Spectrum.of("W_basis", B)
    Bg = torch.randn(B.shape, generator=g)
    spectra["basis (gaussian)"] = Spectrum.of("Gaussian S×d", Bg)
    spectra["recipe"] = Spectrum.of("W_recipe", vocab_rows(model)[own])
    cos, cos_null = _offdiag(cosine_matrix(B)), _offdiag(cosine_matrix(Bg))
    return GeometryResult(spectra, cos, cos_null, float(np.abs(cos).mean()), float(np.abs(cos_null).mean()))


def summary_table(results: dict[str, list[GeometryResult]]):
    import pandas as pd

    rows = []
    for name, rs in results.items():
        for key in rs[0].spectra:
            sp = [r.spectra[key] for r in rs]
            rows.append({
                "model": name, "matrix": key, "shape": "×".join(map(str, sp[0].shape)),
                "effective rank": seed_interval([s.effective_rank for s in sp]).fmt(".1f"),
                "participation ratio": seed_interval([s.participation_ratio for s in sp]).fmt(".1f"),
                "of max": min(sp[0].shape),
            })
    return pd.DataFrame(rows).set_index(["model", "matrix"])


def plot_geometry(results: dict[str, list[GeometryResult]]):
    """Normalised singular spectra of W_basis and E per model (with Gaussian nulls), and basis-row cosines."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, key in zip(axes[:2], ("basis", "product")):
        for x, (name, rs) in enumerate(results.items()):
            if key not in rs[0].spectra:
                continue
            sv = rs[0].spectra[key].sv
            ax.semilogy(np.arange(1, sv.size + 1), sv / sv[0], color=f"C{x}",
                        label=f"{name} (eff. rank {rs[0].spectra[key].effective_rank:.0f})")
        first = next(rs for rs in results.values() if f"{key} (gaussian)" in rs[0].spectra)[0]
        sv = first.spectra[f"{key} (gaussian)"].sv
        ax.semilogy(np.arange(1, sv.size + 1), sv / sv[0], "k--", lw=1,
                    label=f"Gaussian (eff. rank {first.spectra[f'{key} (gaussian)'].effective_rank:.0f})")
        ax.set_xlabel("index")
        ax.set_ylabel("σ_i / σ_1")
        ax.set_title("W_basis spectrum" if key == "basis" else "E = W_recipe·W_basis spectrum", fontsize=10)
        ax.legend(fontsize=7)
    ax = axes[2]
    bins = np.linspace(-1, 1, 81)
    for x, (name, rs) in enumerate(results.items()):
        if rs[0].basis_cos is not None:
            ax.hist(rs[0].basis_cos, bins=bins, histtype="step", density=True, color=f"C{x}", label=name)
    first = next((rs[0] for rs in results.values() if rs[0].basis_cos_null is not None), None)
    if first is not None:
        ax.hist(first.basis_cos_null, bins=bins, histtype="step", density=True, color="k", ls="--", label="Gaussian")
    ax.set_xlabel("cosine between basis rows")
    ax.set_title("Basis redundancy", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
