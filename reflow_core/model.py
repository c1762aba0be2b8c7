"""One transformer backbone, several vocabulary modules: the whole reFlow model family in one file.

Models differ along two axes:

* block style — ``gpt2`` (LayerNorm, GELU MLP of width 4d, learned positions) or ``new``
  (RMSNorm, RoPE, SwiGLU), optionally with grouped-query attention (``n_kv_head < n_head``);
* vocabulary module (:mod:`reflow_core.vocab`) — how token ids become vectors and how the final hidden state
  becomes logits: ``tied`` (one V×d matrix E, as GPT-2) or ``factored`` (reFlow: E = W_recipe · W_basis, V×S times
  S×d), and sparsified factored variants (``topk``, ``rmg``, ``routed``).  The vocabulary module is the *only* place
  where reFlow differs from GPT-2-New, which is what makes the comparison clean.

Every layer's residual stream passes through named hook points (``blocks.{i}.resid_pre`` /
``blocks.{i}.resid_post``) that experiments and SAEs read and write; see :class:`HookPoints`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from reflow_core.config import ModelConfig
from reflow_core.fused_loss import linear_cross_entropy
from reflow_core.vocab import VOCAB_MODULES, FactoredVocab, head_costs

Hook = Callable[[torch.Tensor], "torch.Tensor | None"]


class HookPoints:
    """Named places on the residual stream where callers can read or replace the activation.

    A hook is ``fn(x) -> x_new | None``; returning None leaves ``x`` as it was (a read-only hook).
    Hooks are attached for the duration of a ``with`` block so that no experiment can leak an
    intervention into the next one.
    """

    def __init__(self) -> None:
        self._hooks: dict[str, list[Hook]] = defaultdict(list)
        self.names: list[str] = []

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        for fn in self._hooks.get(name, ()):
            out = fn(x)
            if out is not None:
                x = out
        return x

    @contextmanager
    def attach(self, hooks: dict[str, Hook]) -> Iterator[None]:
        unknown = set(hooks) - set(self.names)
        if unknown:
            raise KeyError(f"unknown hook point(s) {sorted(unknown)}; known: {self.names}")
        for name, fn in hooks.items():
            self._hooks[name].append(fn)
        try:
            yield
        finally:
            for name, fn in hooks.items():
                self._hooks[name].remove(fn)

    @property
    def active(self) -> bool:
        return any(self._hooks.values())


# ----------------------------------------------------------------------------------------------
# Block components


def make_norm(config: ModelConfig) -> nn.Module:
    if config.block_style == "gpt2":
        return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=False)
    return nn.RMSNorm(config.d_model, eps=config.norm_eps)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :hd/2], x[..., hd/2:]) — the "half-split" RoPE convention."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.kv_heads
        self.head_dim = config.d_model // config.n_head
        qkv_out = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.qkv = nn.Linear(config.d_model, qkv_out, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.use_rope = config.block_style == "new"
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.use_rope:
            cos, sin = rope
            q, k = apply_rope(q, cos[:T], sin[:T]), apply_rope(k, cos[:T], sin[:T])
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class GeluMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.hidden_dim, bias=False)
        self.proj = nn.Linear(config.hidden_dim, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # gate and up projections share one matmul; parameter count is the usual 3·d·h
        self.gate_up = nn.Linear(config.d_model, 2 * config.hidden_dim, bias=False)
        self.proj = nn.Linear(config.hidden_dim, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm_attn = make_norm(config)
        self.attn = Attention(config)
        self.norm_mlp = make_norm(config)
        self.mlp = GeluMLP(config) if config.block_style == "gpt2" else SwiGLU(config)

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        x = x + self.attn(self.norm_attn(x), rope)
        return x + self.mlp(self.norm_mlp(x))


# ----------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.vocab = VOCAB_MODULES[config.vocab_style](config)
        self.pos = nn.Embedding(config.block_size, config.d_model) if config.block_style == "gpt2" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_final = make_norm(config)
        if config.block_style == "new":
            cos, sin = rope_tables(config.d_model // config.n_head, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.hooks = HookPoints()
        self.hooks.names = [f"blocks.{i}.{where}" for i in range(config.n_layer) for where in ("resid_pre", "resid_post")]
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    # -- initialisation ------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                # residual projections scaled down with depth, as GPT-2 / nanoGPT
                scale = 1 / math.sqrt(2 * self.config.n_layer) if name.endswith(".proj") else 1.0
                nn.init.normal_(module.weight, std=std * scale)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.ones_(module.weight)
        if self.pos is not None:
            nn.init.normal_(self.pos.weight, std=std)
        self.vocab.reset_parameters(self.config)

    # -- accounting ----------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def is_factored(self) -> bool:
        return isinstance(self.vocab, FactoredVocab)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- forward -------------------------------------------------------------------------------
    def _rope(self):
        return (self.rope_cos, self.rope_sin) if self.config.block_style == "new" else None

    def residual(self, idx: torch.Tensor, *, stop_at: int | None = None) -> torch.Tensor:
        """Run the backbone; returns the residual stream after layer ``stop_at - 1`` (default: all)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        x = self.vocab.embed(idx)
        if self.pos is not None:
            x = x + self.pos(torch.arange(T, device=idx.device))
        x = self.drop(x)
        rope = self._rope()
        hooked = self.hooks.active
        n = self.config.n_layer if stop_at is None else stop_at
        for i, block in enumerate(self.blocks[:n]):
            if hooked:
                x = self.hooks(f"blocks.{i}.resid_pre", x)
            x = block(x, rope)
            if hooked:
                x = self.hooks(f"blocks.{i}.resid_post", x)
        return x

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, last_only: bool = False,
        return_logits: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits over GPT-2 ids, and the mean cross-entropy against ``targets`` (GPT-2 ids, -1 = ignore) when given.

        ``return_logits=False`` (training) computes the loss without materialising the N×V logits
        (:func:`reflow_core.fused_loss.linear_cross_entropy`) and returns ``(None, loss)``.
        """
        h = self.norm_final(self.residual(idx))
        if targets is None:
            if last_only:
                h = h[:, -1:, :]
            return self.vocab.logits(h), None
        if not return_logits:
            return None, self.loss_from_hidden(h, targets)
        logits = self.vocab.logits(h)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def loss_from_hidden(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over GPT-2 ids of final-normed states ``h`` against ``targets`` (-1 = ignore), computed
        over the vocabulary's rows without the N×V logits: for a compact vocabulary a target without its own row is
        the tail row, plus log(tail size) (a constant, no gradient)."""
        rows, tail_nats = self.vocab.row_targets(targets)
        return linear_cross_entropy(*self.vocab.head(h), rows, ignore_index=-1) + tail_nats

    # -- the lens ------------------------------------------------------------------------------
    def signal_readout(self, h: torch.Tensor) -> torch.Tensor:
        """s_l = RMSNorm_final(h_l) · W_basisᵀ: the native signal coordinates of any residual state."""
        if not self.is_factored:
            raise TypeError("signal read-out needs a factored (reFlow) vocabulary")
        return self.vocab.signals(self.norm_final(h))

    def lens_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits the model would emit if the residual stream stopped here (logit lens)."""
        return self.vocab.logits(self.norm_final(h))

    @torch.no_grad()
    def run_with_cache(self, idx: torch.Tensor, names: list[str] | None = None) -> tuple[torch.Tensor, dict]:
        """Forward pass that also returns the residual stream at the named hook points."""
        names = self.hooks.names if names is None else names
        cache: dict[str, torch.Tensor] = {}

        def reader(name):
            return lambda x: cache.__setitem__(name, x.detach())

        with self.hooks.attach({name: reader(name) for name in names}):
            logits, _ = self(idx)
        return logits, cache

    # -- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        on_token: Callable[[int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Sample continuations; ``temperature=0`` is greedy. ``on_token(step, idx)`` sees each step."""
        for step in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]
            logits, _ = self(context, last_only=True)
            logits = logits[:, -1, : self.config.real_vocab_size].float()
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat((idx, next_id), dim=1)
            if on_token is not None:
                on_token(step, idx)
        return idx

    # -- cost ----------------------------------------------------------------------------------
    def flops_per_token(self, seq_len: int | None = None, tokens_per_forward: int | None = None) -> float:
        """Training FLOPs per token (forward + backward = 3× forward), factored head included.

        The factored head's cost depends on which order :meth:`FactoredVocab.logits` picks, which
        depends on how many tokens one forward pass holds (default: one sequence of ``seq_len``).
        """
        c = self.config
        T = c.block_size if seq_len is None else seq_len
        N = T if tokens_per_forward is None else tokens_per_forward
        block_matmul = sum(
            m.weight.numel() for b in self.blocks for m in b.modules() if isinstance(m, nn.Linear)
        )
        attention = 2 * c.n_layer * T * c.d_model  # QKᵀ and AV, per token, causal mask not discounted
        if self.is_factored:
            head = min(head_costs(c.vocab_size, c.n_signals, c.d_model, N).values()) / N  # the order head() uses
            embed = c.n_signals * c.d_model
        else:
            head, embed = c.vocab_size * c.d_model, 0
        forward = 2 * (block_matmul + head + embed + attention)
        return 3.0 * forward


def build_model(config: ModelConfig, device: str | torch.device = "cpu") -> GPT:
    """Instantiate a model; ``device="meta"`` builds the structure without allocating weights."""
    with torch.device(device):
        return GPT(config)


def parameter_breakdown(model: GPT) -> dict[str, int]:
    """Where the parameters live: vocabulary (recipe, basis or tied E), positions, blocks, norms."""
    parts = {"vocabulary": 0, "positions": 0, "attention": 0, "mlp": 0, "norms": 0}
    for name, p in model.named_parameters():
        if name.startswith("vocab."):
            parts["vocabulary"] += p.numel()
        elif name.startswith("pos."):
            parts["positions"] += p.numel()
        elif ".attn." in name:
            parts["attention"] += p.numel()
        elif ".mlp." in name:
            parts["mlp"] += p.numel()
        else:
            parts["norms"] += p.numel()
    return parts
