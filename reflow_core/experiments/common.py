"""Helpers shared by the experiments: vocabulary rows, statistics, results over seeds.

Word lists, prompts and single-token checks are in :mod:`reflow_core.stimuli`; loading models per scale and seed in
:mod:`reflow_core.runs`.

* **Vocabulary rows** — :func:`vocab_rows` gives the per-token rows the book compares: the effective recipe rows
  (V×S) of a factored model, the embedding rows (V×d) of a tied model; :func:`embedding_rows` always gives E.
  Both are restricted to the real GPT-2 vocabulary (ids ≥ 50257 are padding and never compared).
* **Statistics** — cosine matrices, the Gini coefficient, bootstrap CIs and intervals over training seeds.
* **Groups** — :func:`over_models` applies an experiment to every model of every named group (one per seed),
  :func:`summarise` and :func:`fmt_group` turn the results into intervals and prose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from reflow_core.scorecard import MET, MISSED, STRADDLES

# ----------------------------------------------------------------------------------------------
# Vocabulary rows


def is_factored(model) -> bool:
    return bool(getattr(model, "is_factored", False))


@torch.no_grad()
def vocab_rows(model) -> torch.Tensor:
    """The per-token rows the book compares, one per GPT-2 id (V_real rows), float32 on the CPU.

    Factored (reFlow) models: the effective recipe rows ``recipe_matrix()`` (V×S; Top-K variants are sparsified as
    the model uses them). Tied (GPT-2-New) models: the embedding rows (V×d), the baseline's nearest equivalent.  In a
    compact vocabulary the ids without a row of their own share its tail row: whole-vocabulary statistics keep to
    :func:`own_mask`.
    """
    M = model.vocab.recipe_matrix() if is_factored(model) else model.vocab.embedding_matrix()
    return model.vocab.by_id(M).detach().float().cpu()


@torch.no_grad()
def embedding_rows(model) -> torch.Tensor:
    """E = W_recipe·W_basis (factored) or the tied E, one row per GPT-2 id (V_real×d); see :func:`vocab_rows`."""
    return model.vocab.by_id(model.vocab.embedding_matrix()).detach().float().cpu()


def own_mask(model) -> torch.Tensor:
    """(V_real,) bool: the GPT-2 ids with a row of their own (all of them in a full vocabulary)."""
    return model.vocab.has_own_row(torch.arange(model.config.real_vocab_size))


def unit_rows(M: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return M / M.norm(dim=-1, keepdim=True).clamp_min(eps)


def cosine_matrix(A: torch.Tensor, B: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarities between the rows of A and the rows of B (default: A with itself)."""
    A = unit_rows(A.float())
    B = A if B is None else unit_rows(B.float())
    return A @ B.t()


def gaussian_like(M: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A Gaussian matrix of M's shape whose rows have exactly M's row norms (the sparsity/geometry null)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(M.shape, generator=g)
    return unit_rows(Z) * M.norm(dim=-1, keepdim=True)


def nearest(rows: torch.Tensor, queries: torch.Tensor, k: int, exclude: Sequence[Sequence[int]] | None = None,
            chunk: int = 4096, allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine neighbours of each query among ``rows`` -> (values, indices), each (Q, k).

    ``exclude[q]`` lists row indices never returned for query q (the query word itself, analogy inputs …);
    ``allowed`` (a bool mask over rows) restricts every query to those rows (e.g. the ids with rows of their own).
    """
    Q = unit_rows(queries.float())
    R = unit_rows(rows.float())
    sims = torch.cat([Q @ R[i:i + chunk].t() for i in range(0, R.shape[0], chunk)], dim=1)
    if allowed is not None:
        sims[:, ~allowed] = -float("inf")
    if exclude is not None:
        for q, ex in enumerate(exclude):
            if len(ex):
                sims[q, torch.as_tensor(list(ex), dtype=torch.long)] = -float("inf")
    return sims.topk(k, dim=1)


def rank_of(sims: torch.Tensor, target: int, exclude: Sequence[int] = ()) -> int:
    """1-based rank of ``target`` in one row of similarities, with ``exclude`` removed (ties count against)."""
    s = sims.clone()
    if len(exclude):
        s[torch.as_tensor(list(exclude), dtype=torch.long)] = -float("inf")
    return int((s > s[target]).sum().item()) + 1


# ----------------------------------------------------------------------------------------------
# Statistics


def gini(x) -> float:
    """Gini coefficient of non-negative values: 0 = perfectly even, → 1 = all mass on one element."""
    x = np.sort(np.abs(np.asarray(x, dtype=np.float64)).ravel())
    n = x.size
    if n == 0 or x.sum() == 0:
        return 0.0
    cum = np.cumsum(x)
    return float((n + 1 - 2 * (cum / cum[-1]).sum()) / n)


def lorenz(x) -> tuple[np.ndarray, np.ndarray]:
    """Lorenz curve (share of elements, share of mass), from 0 to 1, for plotting usage inequality."""
    x = np.sort(np.abs(np.asarray(x, dtype=np.float64)).ravel())
    cum = np.concatenate([[0.0], np.cumsum(x)])
    return np.linspace(0, 1, x.size + 1), cum / max(cum[-1], 1e-300)


def bootstrap_ci(values, stat: Callable = np.mean, n_boot: int = 2000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float, float]:
    """(statistic, lower, upper): percentile bootstrap over the items in ``values``."""
    v = np.asarray(values, dtype=np.float64)
    est = float(stat(v))
    if v.size < 2:
        return est, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = np.array([stat(v[rng.integers(0, v.size, v.size)]) for _ in range(n_boot)])
    return est, float(np.quantile(boots, alpha / 2)), float(np.quantile(boots, 1 - alpha / 2))


@dataclass
class Interval:
    """A statistic over training seeds: mean and a t-interval (nan bounds with one seed)."""

    mean: float
    lo: float
    hi: float
    n: int
    values: list[float] = field(default_factory=list)

    def fmt(self, spec: str = ".3f") -> str:
        if self.n < 2 or not math.isfinite(self.lo):
            return format(self.mean, spec)
        return f"{format(self.mean, spec)} [{format(self.lo, spec)}, {format(self.hi, spec)}]"


def seed_interval(values, level: float = 0.95) -> Interval:
    """Mean over seeds with a Student-t interval; one seed gives the value and no interval."""
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    if v.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0, [])
    m = float(v.mean())
    if v.size < 2:
        return Interval(m, float("nan"), float("nan"), 1, v.tolist())
    from scipy import stats

    half = float(stats.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return Interval(m, m - half, m + half, int(v.size), v.tolist())


def permutation_p(observed: float, null: np.ndarray, greater: bool = True) -> float:
    """One-sided permutation p-value with the +1 correction (never exactly 0)."""
    null = np.asarray(null)
    hits = (null >= observed).sum() if greater else (null <= observed).sum()
    return float((1 + hits) / (1 + null.size))


# ----------------------------------------------------------------------------------------------
# Results over the models of a group (one per seed)


def over_models(fn: Callable, models: dict[str, list], **kwargs) -> dict[str, list]:
    """Apply an experiment ``fn(model, **kwargs)`` to every model of every named group (one per seed)."""
    return {name: [fn(m, **kwargs) for m in ms] for name, ms in models.items()}


def summarise(results: dict[str, list], getter: Callable) -> dict[str, Interval]:
    """``getter(result)`` over the seeds of each named group, as intervals."""
    return {name: seed_interval([getter(r) for r in rs]) for name, rs in results.items() if rs}


def fmt_group(results: dict[str, list], name: str, getter: Callable, spec: str = ".3f", suffix: str = "",
              missing: str = "— (not run)") -> str:
    """``getter`` over the seeds of group ``name`` formatted as mean [interval] + ``suffix``, or ``missing`` if the
    group is absent (e.g. a variant that was not trained at this scale) — for glued prose numbers."""
    if not results.get(name):
        return missing
    return seed_interval([getter(r) for r in results[name]]).fmt(spec) + suffix


def lower_beyond_noise(reference: Interval, other: Interval) -> bool | None:
    """Is ``other`` below ``reference``?  True / False when their intervals (over seeds; a point with one seed) do not
    overlap, None when they do: the data cannot tell."""
    ref_lo, ref_hi = (reference.lo, reference.hi) if reference.n > 1 else (reference.mean, reference.mean)
    oth_lo, oth_hi = (other.lo, other.hi) if other.n > 1 else (other.mean, other.mean)
    if oth_hi < ref_lo:
        return True
    if oth_lo >= ref_hi:
        return False
    return None


def collapse_outcome(reference: dict[str, Interval], other: dict[str, Interval]) -> tuple[str, list[str]]:
    """The one rule for "a sparsified variant loses the recipe structure of dense reFlow" (topk.collapse) and "a soft
    variant keeps what Top-K loses" (thread.soft_sparsity): over the named statistics (three↔four cosine, algebra MRR,
    silhouette), ``other`` is lower on all of them beyond noise → "met"; not lower on any → "missed"; otherwise
    "straddles".  Returns the outcome and the statistics found lower.  Whether the comparison can be made at all is
    the claim's control: the reference model must show the structure first."""
    lower = {name: lower_beyond_noise(reference[name], other[name]) for name in reference}
    lost = [n for n, v in lower.items() if v]
    if len(lost) == len(lower):
        return MET, lost
    if all(v is False for v in lower.values()):
        return MISSED, lost
    return STRADDLES, lost
