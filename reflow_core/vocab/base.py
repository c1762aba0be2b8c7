"""Vocabulary modules: how token ids become vectors and how the final hidden state becomes logits, with one set
of weights for both (the only place where reFlow differs from GPT-2-New).

* :class:`TiedVocab` — GPT-2's tied embedding, one V×d matrix E;
* :class:`FactoredVocab` — reFlow's E = W_recipe (V×S) · W_basis (S×d);
* :class:`TopKVocab` — reFlow-TopK: each recipe row keeps its K largest ReLU'd entries.

The soft-sparsity vocabularies (Relative Mean Gating, learned routing) are in :mod:`reflow_core.vocab.gated`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from reflow_core.config import ModelConfig


def head_costs(vocab_size: int, n_signals: int, d_model: int, n_tokens: int) -> dict[str, int]:
    """Multiply-adds of the two exact orders of the factored output projection for ``n_tokens`` positions."""
    V, S, d = vocab_size, n_signals, d_model
    return {
        "signals_first": n_tokens * d * S + n_tokens * S * V,  # (H·Bᵀ)·Rᵀ
        "embedding_first": V * S * d + n_tokens * V * d,  # H·(R·B)ᵀ
    }


class Vocab(nn.Module):
    """A vocabulary module: ``embed`` for the input, ``head`` for the output projection as (inputs, weight).

    Token ids are GPT-2 ids everywhere outside this module.  A **compact** vocabulary (``config.compact_vocab = K``)
    has its own row for K ids (its training corpus's most frequent, :meth:`set_kept_ids`) and one shared *tail* row
    for every other id; ``rows_of`` maps ids to rows.  Its distribution over GPT-2 ids gives each tail id an equal
    share of the tail row's probability, so its logits (:meth:`logits`), losses and probabilities live in the same
    space as a full vocabulary's, and every experiment keeps asking by GPT-2 id.  :meth:`has_own_row` says which ids
    have a row of their own: a word without one is "not in this model's vocabulary", never mapped silently.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.compact = int(config.compact_vocab)
        self.real_vocab_size = int(config.real_vocab_size)
        self.n_rows = config.n_rows  # rows that stand for tokens (padding rows after them are never used)
        if self.compact:
            self.register_buffer("kept_ids", torch.arange(self.compact))
            self.register_buffer("to_row", torch.full((self.real_vocab_size,), self.compact))
            self.to_row[: self.compact] = torch.arange(self.compact)

    @torch.no_grad()
    def set_kept_ids(self, ids) -> None:
        """The GPT-2 ids that get rows of their own, in row order (a compact vocabulary only)."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.to_row.device)
        if not self.compact or ids.numel() != self.compact or ids.unique().numel() != self.compact:
            raise ValueError(f"a compact vocabulary of {self.compact} rows needs {self.compact} distinct ids")
        self.kept_ids.copy_(ids)
        self.to_row.fill_(self.compact)
        self.to_row[ids] = torch.arange(self.compact, device=ids.device)

    def rows_of(self, idx: torch.Tensor) -> torch.Tensor:
        """The row of each GPT-2 id (itself for a full vocabulary; the tail row for an id without its own)."""
        return self.to_row[idx] if self.compact else idx

    def has_own_row(self, idx) -> torch.Tensor:
        """Which GPT-2 ids have a row of their own (all of them in a full vocabulary)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        if not self.compact:
            return (idx >= 0) & (idx < self.real_vocab_size)
        return self.to_row.cpu()[idx] < self.compact

    def by_id(self, rows: torch.Tensor) -> torch.Tensor:
        """A per-row matrix (rows × …) as one row per GPT-2 id (V_real × …): tail ids share the tail row."""
        return rows[self.to_row] if self.compact else rows[: self.real_vocab_size]

    def row_targets(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        """Targets over GPT-2 ids (-1 = ignore) as targets over rows, and what a mean cross-entropy over rows misses
        of the one over ids: log(tail size) for each target on the tail row, averaged (0 for a full vocabulary)."""
        valid = targets >= 0
        rows = torch.where(valid, self.rows_of(targets.clamp_min(0)), -1)
        if not self.compact:
            return rows, 0.0
        tail = (rows == self.compact) & valid
        return rows, tail.sum() / valid.sum().clamp_min(1) * self.tail_log_size()

    def tail_log_size(self) -> float:
        """log of the number of ids that share the tail row (0 for a full vocabulary)."""
        return math.log(self.real_vocab_size - self.compact) if self.compact else 0.0

    def expand(self, row_logits: torch.Tensor) -> torch.Tensor:
        """Logits over rows → logits over GPT-2 ids: each tail id gets the tail row's logit minus log(tail size)."""
        if not self.compact:
            return row_logits
        tail = row_logits[..., self.compact : self.compact + 1] - self.tail_log_size()
        out = tail.expand(*row_logits.shape[:-1], self.real_vocab_size).clone()
        out[..., self.kept_ids] = row_logits[..., : self.compact]
        return out

    def head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Next-token logits over GPT-2 ids (padded to ``vocab_size`` for a full vocabulary)."""
        inputs, weight = self.head(h)
        return self.expand(inputs @ weight.t())


class TiedVocab(Vocab):
    """GPT-2's tied embedding: one V×d matrix is the input embedding and the output projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.weight = nn.Parameter(torch.empty(config.vocab_size, config.d_model))

    def embedding_matrix(self) -> torch.Tensor:
        return self.weight

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """The input vectors of GPT-2 ids ``idx``."""
        return F.embedding(self.rows_of(idx), self.weight)

    def head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The output projection as (inputs, weight): logits = inputs · weightᵀ."""
        return h, self.weight

    def reset_parameters(self, config: ModelConfig) -> None:
        nn.init.normal_(self.weight, std=config.init_std)


class FactoredVocab(Vocab):
    """reFlow's vocabulary: E = W_recipe (V×S) · W_basis (S×d), used for input and output.

    The output logits are ``signals · W_recipeᵀ`` where ``signals = h · W_basisᵀ`` (S numbers per
    position); experiments read those signals as the model's native, named coordinates.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.recipe = nn.Parameter(torch.empty(config.vocab_size, config.n_signals))
        self.basis = nn.Parameter(torch.empty(config.n_signals, config.d_model))

    def recipe_matrix(self) -> torch.Tensor:
        """The recipe rows as the model uses them (sparsified variants override this)."""
        return self.recipe

    def recipe_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The recipe rows ``rows`` (row indices, see :meth:`Vocab.rows_of`) as the model uses them."""
        return F.embedding(rows, self.recipe)

    def embedding_matrix(self) -> torch.Tensor:
        return self.recipe_matrix() @ self.basis

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """The input vectors of GPT-2 ids ``idx``: their recipes mixed by the signal basis."""
        return self.recipe_rows(self.rows_of(idx)) @ self.basis

    def signals(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.basis.t()

    def head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The output projection as (inputs, weight), logits = inputs · weightᵀ, in the cheaper of two exact orders
        for these shapes: signals first, (H·Bᵀ)·Rᵀ, or embedding first, H·(R·B)ᵀ."""
        recipe = self.recipe_matrix()
        cost = head_costs(*recipe.shape, self.basis.shape[1], h.numel() // h.shape[-1])
        if cost["signals_first"] <= cost["embedding_first"]:
            return self.signals(h), recipe
        return h, recipe @ self.basis

    def reset_parameters(self, config: ModelConfig) -> None:
        # std(E) = sqrt(S)·std(recipe)·std(basis) = init_std: same scale as a GPT-2 embedding.
        nn.init.normal_(self.recipe, std=1.0 / math.sqrt(config.n_signals))
        nn.init.normal_(self.basis, std=config.init_std)


class TopKVocab(FactoredVocab):
    """reFlow-TopK: each recipe row passes through ReLU and keeps only its K largest entries."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.k = config.topk

    def _sparsify(self, rows: torch.Tensor) -> torch.Tensor:
        rows = F.relu(rows)
        values, indices = rows.topk(self.k, dim=-1)
        return torch.zeros_like(rows).scatter(-1, indices, values)

    def recipe_matrix(self) -> torch.Tensor:
        return self._sparsify(self.recipe)

    def recipe_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self._sparsify(F.embedding(rows, self.recipe))
