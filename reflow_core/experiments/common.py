"""Helpers shared by all twelve experiments: word lists, token checks, vocabulary rows, statistics, seeds.

Keep this module stable: experiments 1–12 import from it.

* **Word lists** live as package data (``assets/words/<name>.json``); :func:`load_words` reads one.
* **Token checks** — experiments that compare rows of per-token matrices need each word to be exactly one GPT-2
  token. :func:`check_tokens` returns the ids of the words that are, and for every word that is not, *why* it was
  dropped (it splits into several tokens, or duplicates an earlier word), so a chapter can print what it measured.
* **Vocabulary rows** — :func:`vocab_rows` gives the per-token rows the book compares: the effective recipe rows
  (V×S) of a factored model, the embedding rows (V×d) of a tied model; :func:`embedding_rows` always gives E.
  Both are restricted to the real GPT-2 vocabulary (ids ≥ 50257 are padding and never compared).
* **Statistics** — cosine matrices, the Gini coefficient, bootstrap CIs and intervals over training seeds.
* **Models** — :func:`load_models` loads a family at every training seed of a scale (trained, or at initialisation
  through :func:`initial_model`, which rebuilds step-0 weights from the run's seed when no ``init`` checkpoint exists).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from reflow_core import tokenizer

# ----------------------------------------------------------------------------------------------
# Word lists and token checks


@lru_cache(maxsize=None)
def _read_words(name: str) -> str:
    return files("reflow_core").joinpath(f"assets/words/{name}.json").read_text()


def load_words(name: str) -> dict:
    """``assets/words/<name>.json`` (``categories``, ``analogies``, ``typos``) as a fresh dict."""
    return json.loads(_read_words(name))


@dataclass
class TokenCheck:
    """The outcome of checking a word list against the GPT-2 vocabulary."""

    ids: dict[str, int]  # word -> its single token id, in input order
    dropped: dict[str, str]  # word -> why it was dropped

    @property
    def words(self) -> list[str]:
        return list(self.ids)

    def report(self) -> str:
        if not self.dropped:
            return f"all {len(self.ids)} words are single GPT-2 tokens"
        why = "; ".join(f"{w!r}: {r}" for w, r in self.dropped.items())
        return f"{len(self.ids)} kept, {len(self.dropped)} dropped ({why})"


def check_tokens(words: Iterable[str]) -> TokenCheck:
    """Keep the words that are exactly one GPT-2 token; say why each other word is dropped.

    Mind the leading space: ``" king"`` (inside text) and ``"king"`` (start of text) are different tokens.
    """
    ids: dict[str, int] = {}
    dropped: dict[str, str] = {}
    seen: dict[int, str] = {}
    for w in words:
        if w in ids or w in dropped:  # the same word twice: judged once
            continue
        toks = tokenizer.encode(w)
        if len(toks) != 1:
            pieces = [tokenizer.decode([t]) for t in toks]
            dropped[w] = f"splits into {len(toks)} tokens {pieces}" if toks else "empty"
        elif toks[0] in seen:
            dropped[w] = f"same token as {seen[toks[0]]!r}"
        else:
            seen[toks[0]] = w
            ids[w] = toks[0]
    return TokenCheck(ids, dropped)


def category_ids(categories: dict[str, list[str]]) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
    """Single-token ids per category, and the dropped words (with why) over all categories.

    A word listed in two categories is kept in the first only (a row cannot carry two labels).
    """
    check = check_tokens(w for ws in categories.values() for w in ws)
    out: dict[str, dict[str, int]] = {}
    taken: set[str] = set()
    for cat, ws in categories.items():
        out[cat] = {w: check.ids[w] for w in ws if w in check.ids and w not in taken}
        taken.update(out[cat])
    return out, check.dropped


def word_token_ids(word: str) -> list[int]:
    """All token ids of ``word`` (for experiments that handle multi-token words explicitly)."""
    ids = tokenizer.encode(word)
    if not ids:
        raise ValueError(f"empty word {word!r}")
    return ids


def token_str(i: int) -> str:
    return tokenizer.decode([int(i)])


# ----------------------------------------------------------------------------------------------
# Vocabulary rows


def is_factored(model) -> bool:
    return bool(getattr(model, "is_factored", False))


@torch.no_grad()
def vocab_rows(model) -> torch.Tensor:
    """The per-token rows the book compares, real vocabulary only, float32 on the CPU.

    Factored (reFlow) models: the effective recipe rows ``recipe_matrix()`` (V×S; Top-K variants are sparsified as
    the model uses them). Tied (GPT-2-New) models: the embedding rows (V×d), the baseline's nearest equivalent.
    """
    V = model.config.real_vocab_size
    M = model.vocab.recipe_matrix() if is_factored(model) else model.vocab.embedding_matrix()
    return M[:V].detach().float().cpu()


@torch.no_grad()
def embedding_rows(model) -> torch.Tensor:
    """E = W_recipe·W_basis (factored) or the tied E, real vocabulary only (V×d)."""
    V = model.config.real_vocab_size
    return model.vocab.embedding_matrix()[:V].detach().float().cpu()


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
            chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine neighbours of each query among ``rows`` -> (values, indices), each (Q, k).

    ``exclude[q]`` lists row indices never returned for query q (the query word itself, analogy inputs …).
    """
    Q = unit_rows(queries.float())
    R = unit_rows(rows.float())
    sims = torch.cat([Q @ R[i:i + chunk].t() for i in range(0, R.shape[0], chunk)], dim=1)
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
# Models at every seed of a scale


def initial_model(scale: str, family: str = "reflow", results_dir=None, seed: int | None = None):
    """The model at step 0: the stored ``init`` checkpoint, or the same weights rebuilt from the run's config and seed
    exactly as training builds them (seed, then ``build_model`` on the CPU)."""
    from reflow_core.checkpoint import CheckpointNotFoundError
    from reflow_core.model import build_model
    from reflow_core.scales import load_initial, train_config

    try:
        return load_initial(scale, family, results_dir, seed)
    except (CheckpointNotFoundError, FileNotFoundError):
        config = train_config(scale, family, results_dir, seed)
        torch.manual_seed(config.seed)
        model = build_model(config.model_config(), "cpu").eval()
        return model, f"{family}-seed{config.seed}@init"


def load_models(scale: str, family: str, results_dir=None, *, initial: bool = False,
                seeds: Sequence[int] | None = None) -> tuple[list, list[str]]:
    """``family`` at every training seed of ``scale`` (trained, or at initialisation): (models, labels)."""
    from reflow_core.scales import get_scale, load_trained

    seeds = get_scale(scale).seeds if seeds is None else seeds
    models, labels = [], []
    for seed in seeds:
        m, label = initial_model(scale, family, results_dir, seed) if initial else load_trained(
            scale, family, results_dir, seed)
        models.append(m)
        labels.append(label)
    return models, labels


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
