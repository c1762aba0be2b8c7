"""The plain reference loop: the same model math, written the simple way a nanoGPT-style script does it.

It exists so that the bench (:mod:`reflow_core.bench`) can say how much faster our loop is than the obvious code,
on the same weights and the same batches.  Nothing here is used for training the book's models.

What "the simple way" means, point by point (each is the textbook form, and each is exact — the loss agrees with
:class:`reflow_core.model.GPT` to float rounding, which ``tests/test_bench.py`` checks):

* eager PyTorch, no ``torch.compile``;
* attention written out: ``softmax(QKᵀ/√d_h + causal mask) V`` with an explicit (T×T) mask, instead of
  ``F.scaled_dot_product_attention``;
* the factored head in the naive, embedding-first order ``H · (R·B)ᵀ``: materialise the V×d embedding, then project
  (for a tied model there is only one order);
* the loss as ``F.cross_entropy`` over the materialised (N×V) logits;
* AdamW with the single-tensor implementation (``foreach=False, fused=False``): one small kernel per parameter;
* the rest of the step as nanoGPT's: forward under the run's autocast dtype (the same as ours, so a ratio never
  compares bf16 with fp32), backward, global-norm gradient clipping, optimizer step, zero grads.

The reference *reuses our modules' weights* (norms, MLPs, linear layers, embeddings), so "same model" is literal:
only the execution differs.
"""

from __future__ import annotations


import math

import torch
import torch.nn.functional as F

from reflow_core.model import GPT, apply_rope
from reflow_core.vocab import FactoredVocab
from reflow_core.device import autocast_for


def reference_attention(attn, x: torch.Tensor, rope, mask: torch.Tensor) -> torch.Tensor:
    """Causal self-attention written out; ``mask`` is a (T, T) lower-triangular boolean matrix."""
    B, T, _ = x.shape
    hd = attn.head_dim
    q, k, v = attn.qkv(x).split([attn.n_head * hd, attn.n_kv_head * hd, attn.n_kv_head * hd], dim=-1)
    q = q.view(B, T, attn.n_head, hd).transpose(1, 2)
    k = k.view(B, T, attn.n_kv_head, hd).transpose(1, 2)
    v = v.view(B, T, attn.n_kv_head, hd).transpose(1, 2)
    if attn.use_rope:
        cos, sin = rope
        q, k = apply_rope(q, cos[:T], sin[:T]), apply_rope(k, cos[:T], sin[:T])
    if attn.n_kv_head != attn.n_head:  # grouped-query attention: repeat each K/V head for its query heads
        k = k.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)
        v = v.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
    att = att.masked_fill(~mask[:T, :T], float("-inf"))
    att = F.softmax(att, dim=-1)
    if attn.training and attn.dropout > 0:
        att = F.dropout(att, p=attn.dropout)
    y = att @ v
    return attn.proj(y.transpose(1, 2).reshape(B, T, -1))


def reference_logits(model: GPT, h: torch.Tensor) -> torch.Tensor:
    """The naive head: for a factored vocabulary, build E = R·B (V×d) first, then H·Eᵀ."""
    if isinstance(model.vocab, FactoredVocab):
        return h @ (model.vocab.recipe_matrix() @ model.vocab.basis).t()
    return h @ model.vocab.embedding_matrix().t()


def reference_forward(model: GPT, idx: torch.Tensor, targets: torch.Tensor | None = None):
    """``model``'s forward pass the simple way; returns (logits, loss) like ``GPT.forward``."""
    B, T = idx.shape
    mask = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    x = model.vocab.embed(idx)
    if model.pos is not None:
        x = x + model.pos(torch.arange(T, device=idx.device))
    x = model.drop(x)
    rope = model._rope()
    for block in model.blocks:
        x = x + reference_attention(block.attn, block.norm_attn(x), rope, mask)
        x = x + block.mlp(block.norm_mlp(x))
    logits = reference_logits(model, model.norm_final(x))
    if targets is None:
        return logits, None
    rows, tail_nats = model.vocab.row_targets(targets)  # a compact vocabulary's targets are rows (vocab/base.py)
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), rows.reshape(-1), ignore_index=-1) + tail_nats
    return logits, loss


def reference_optimizer(model: torch.nn.Module, lr: float = 1e-3, weight_decay: float = 0.1,
                        betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """nanoGPT's AdamW groups (decay on 2-D weights), single-tensor implementation."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=False, fused=False)


class ReferenceLoop:
    """One training step the simple way: forward, backward, clip, AdamW (single-tensor), zero grads."""

    def __init__(self, model: GPT, *, lr: float = 1e-3, weight_decay: float = 0.1, grad_clip: float = 1.0,
                 dtype: torch.dtype = torch.float32) -> None:
        self.model = model
        self.grad_clip = grad_clip
        self.optimizer = reference_optimizer(model, lr=lr, weight_decay=weight_decay)
        self.autocast = autocast_for(next(model.parameters()).device.type, dtype)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.model.train()
        with self.autocast():
            _, loss = reference_forward(self.model, x, y)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=False)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        with self.autocast():
            return reference_forward(self.model, x)[0]
