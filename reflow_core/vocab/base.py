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
    """A vocabulary module: ``embed`` for the input, ``head`` for the output projection as (inputs, weight)."""

    def head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        inputs, weight = self.head(h)
        return inputs @ weight.t()


class TiedVocab(Vocab):
    """GPT-2's tied embedding: one V×d matrix is the input embedding and the output projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.vocab_size, config.d_model))

    def embedding_matrix(self) -> torch.Tensor:
        return self.weight

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight)

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
        super().__init__()
        self.recipe = nn.Parameter(torch.empty(config.vocab_size, config.n_signals))
        self.basis = nn.Parameter(torch.empty(config.n_signals, config.d_model))

    def recipe_matrix(self) -> torch.Tensor:
        """The recipe rows as the model uses them (sparsified variants override this)."""
        return self.recipe

    def recipe_rows(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.recipe)

    def embedding_matrix(self) -> torch.Tensor:
        return self.recipe_matrix() @ self.basis

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.recipe_rows(idx) @ self.basis

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

    def recipe_rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self._sparsify(F.embedding(idx, self.recipe))
