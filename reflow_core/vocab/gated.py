"""Soft sparsity for the recipe matrix: Relative Mean Gating and Learned Signal Routing.

The seed reports that hard Top-K on recipe rows (keep the K largest ReLU'd entries of every row) collapses the
semantic structure of recipe space, and the forum thread announces two softer mechanisms that were "still in
training" and never published.  This module implements both, as vocabulary modules of the model family
(``vocab_style="rmg"`` / ``"routed"``; presets ``reflow-rmg@…`` / ``reflow-routed@…``), so that they train with the
ordinary loop and every experiment of the book reads them exactly as it reads Top-K: through ``recipe_matrix()``.

Both are *gates* over the entries of a recipe row, r̃_vj = r_vj · g_vj, with a **global** threshold on a per-entry
score, so a token may use more or fewer signals than another (Top-K forces exactly K each):

* **Relative Mean Gating** (:class:`RelativeMeanGatedVocab`, ``rmg``): score_vj = |r_vj| / mean_j |r_vj| — an entry's
  intensity relative to the mean of its row's signal pool, the same ratio the Sparsity Profile thresholds at c = 2.
* **Learned Signal Routing** (:class:`RoutedVocab`, ``routed``): score_vj = |z_vj| + (z_v W_s + |z_v| W_a + b)_j with
  z_v = r_v / mean|r_v| — a learned linear router over the whole (scale-free) row, so which signals a token routes
  through can depend on its other signals ("attention over signals").  W_s, W_a, b start at zero: the router starts
  as RMG and training moves it away only where the loss asks for it (:func:`routing_divergence` measures how far).

**Rate control without an auxiliary loss.**  The threshold θ is the (1 − target_rate) quantile of the scores over the
real vocabulary, recomputed (without gradient) whenever a parameter changes, so exactly ``target_rate`` of the
entries are active at every step — no penalty term, nothing to add to ``model(idx, targets)``.  (The quantile is
cached on the parameters' version counters: one ``kthvalue`` per optimizer step, none during evaluation.)

**Soft, differentiable gates.**  g = σ((score − θ)/T).  In the default *straight-through* mode the forward pass uses
the hard gate 1[score > θ] (so the recipe is exactly as sparse as Top-K at the same rate, and "equal activation rate"
means what it says) while the backward pass uses σ's gradient: every entry, active or not, hears the loss, and an
entry below the threshold can grow across it.  With ``straight_through=False`` the forward pass uses σ itself (then
entries below θ are small, not zero, and the measured rate counts g > ½).  Top-K, by contrast, gives dropped entries
no gradient at all and clips negative entries with a ReLU.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from reflow_core.config import ModelConfig
from reflow_core.vocab.base import FactoredVocab

DEFAULT_TEMPERATURE = 0.5  # in score units: |r|/mean|r| is ≈ 1 on average, the threshold ≈ 2 at 6–12% rates


def quantile_threshold(scores: torch.Tensor, rate: float) -> torch.Tensor:
    """θ such that exactly round(rate · N) of the N scores are > θ (ties aside): the (N − n_active)-th smallest."""
    flat = scores.detach().reshape(-1).float()
    n_active = int(round(rate * flat.numel()))
    k = flat.numel() - n_active
    if k <= 0:
        return torch.tensor(-math.inf, device=flat.device)
    return flat.kthvalue(k).values


class GatedVocab(FactoredVocab):
    """A factored vocabulary whose recipe entries pass through a gate with a rate-holding global threshold.

    Subclasses define :meth:`scores` (per-entry gate scores of some recipe rows).  The threshold is computed over the
    real vocabulary (padding rows excluded) and cached until a parameter changes.
    """

    def __init__(self, config: ModelConfig, *, temperature: float = DEFAULT_TEMPERATURE,
                 straight_through: bool = True) -> None:
        super().__init__(config)
        self.target_rate = float(config.target_rate)
        self.temperature = float(temperature)
        self.straight_through = bool(straight_through)
        self._cache: dict = {}

    # -- to be defined by subclasses ----------------------------------------------------------------------------------
    def scores(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- threshold and gates ------------------------------------------------------------------------------------------
    def _version(self) -> tuple:
        return tuple((id(p), p._version, p.device) for p in self.parameters())

    def _cached(self, name: str, make):
        key = self._version()
        entry = self._cache.get(name)
        if entry is None or entry[0] != key:
            entry = (key, make())
            self._cache[name] = entry
        return entry[1]

    def threshold(self) -> torch.Tensor:
        """θ: the (1 − target_rate) quantile of the scores over the real vocabulary (no gradient)."""

        def make():
            with torch.no_grad():
                return quantile_threshold(self.scores(self.recipe[: self.n_rows]), self.target_rate)

        return self._cached("threshold", make)

    def gate(self, rows: torch.Tensor) -> torch.Tensor:
        """The gate of each entry of ``rows``: hard in the forward pass (straight-through) or σ itself."""
        s = self.scores(rows)
        theta = self.threshold().to(s.dtype)
        soft = torch.sigmoid((s - theta) / self.temperature)
        if not self.straight_through:
            return soft
        hard = (s > theta).to(soft.dtype)
        return hard + soft - soft.detach()

    def _gated(self, rows: torch.Tensor) -> torch.Tensor:
        return rows * self.gate(rows)

    def recipe_matrix(self) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self._gated(self.recipe)
        return self._cached("matrix", lambda: self._gated(self.recipe))  # evaluation: once per weight version

    def recipe_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self._gated(F.embedding(rows, self.recipe))

    # -- measurement --------------------------------------------------------------------------------------------------
    def clear_cache(self) -> None:
        """Forget the cached threshold and matrix.  Needed only after editing weights through ``.data`` (which
        PyTorch does not count as a change); edits under ``torch.no_grad()`` are noticed automatically."""
        self._cache.clear()

    @torch.no_grad()
    def active_mask(self) -> torch.Tensor:
        """(V_real, S) bool: the entries the model actually uses (hard gate on; g > ½ in soft mode)."""
        return self.scores(self.recipe[: self.n_rows]) > self.threshold()

    @torch.no_grad()
    def active_rate(self) -> float:
        """Measured fraction of active recipe entries over the real vocabulary (≈ ``target_rate`` by construction)."""
        return float(self.active_mask().float().mean())

    @torch.no_grad()
    def mean_gate(self) -> float:
        """Mean soft gate σ((score − θ)/T) — the "soft" rate, which counts half-open entries fractionally."""
        s = self.scores(self.recipe[: self.n_rows])
        return float(torch.sigmoid((s - self.threshold()) / self.temperature).mean())


class RelativeMeanGatedVocab(GatedVocab):
    """Relative Mean Gating: an entry survives when |r_vj| / mean_j |r_vj| passes a global, rate-holding threshold."""

    def scores(self, rows: torch.Tensor) -> torch.Tensor:
        a = rows.abs()
        return a / a.mean(dim=-1, keepdim=True).clamp_min(1e-12)


class RoutedVocab(GatedVocab):
    """Learned Signal Routing: a learned linear router over the scale-free recipe row decides the gates.

    score_v = |z_v| + z_v W_s + |z_v| W_a + b,  z_v = r_v / mean|r_v|.  Parameters: 2·S² + S (≈ 2% of the recipe's
    V·S at S = 512).  At initialisation W_s = W_a = 0, b = 0, so the module starts as Relative Mean Gating.
    """

    def __init__(self, config: ModelConfig, **kwargs) -> None:
        super().__init__(config, **kwargs)
        S = config.n_signals
        self.route_signed = nn.Parameter(torch.empty(S, S))
        self.route_abs = nn.Parameter(torch.empty(S, S))
        self.route_bias = nn.Parameter(torch.empty(S))

    def scores(self, rows: torch.Tensor) -> torch.Tensor:
        z = rows / rows.abs().mean(dim=-1, keepdim=True).clamp_min(1e-12)
        a = z.abs()
        return a + z @ self.route_signed + a @ self.route_abs + self.route_bias

    def reset_parameters(self, config: ModelConfig) -> None:
        super().reset_parameters(config)
        nn.init.zeros_(self.route_signed)
        nn.init.zeros_(self.route_abs)
        nn.init.zeros_(self.route_bias)


# ----------------------------------------------------------------------------------------------------------------------
# Measurements of any factored vocabulary


@torch.no_grad()
def measured_rate(model) -> float:
    """Fraction of nonzero entries of the effective recipe rows (real vocabulary); 1.0 for a dense reFlow.

    Top-K: at most K/S (fewer where a row has fewer than K positive entries); RMG/routed: ``active_rate()``.
    """
    vocab = model.vocab
    if isinstance(vocab, GatedVocab):
        return vocab.active_rate()
    R = vocab.recipe_matrix()[: vocab.n_rows]
    return float((R != 0).float().mean())


@torch.no_grad()
def active_per_token(model) -> torch.Tensor:
    """Number of nonzero effective recipe entries of every real token (Top-K: ≤ K for all; gated: varies)."""
    vocab = model.vocab
    if isinstance(vocab, GatedVocab):
        return vocab.active_mask().sum(1)
    return (vocab.recipe_matrix()[: vocab.n_rows] != 0).sum(1)


@torch.no_grad()
def routing_divergence(model) -> float:
    """For a routed model: share of its active entries that plain RMG at the same rate would not keep (0 at init)."""
    vocab = model.vocab
    if not isinstance(vocab, RoutedVocab):
        return float("nan")
    R = vocab.recipe[: vocab.n_rows]
    a = R.abs()
    ratio = a / a.mean(dim=-1, keepdim=True).clamp_min(1e-12)
    rmg = ratio > quantile_threshold(ratio, vocab.target_rate)
    routed = vocab.active_mask()
    return float((routed & ~rmg).sum() / routed.sum().clamp_min(1))
