"""Reading and writing the residual stream: one layer numbering, prompts as ids, and intervention hooks.

**Layer numbering (the one the whole book uses).**  A model with L blocks has L + 1 *layer states*:

* h_0 is the embedding output, the input of block 0 — hook point ``blocks.0.resid_pre``;
* h_l (1 ≤ l ≤ L) is the output of block l − 1 — hook point ``blocks.{l-1}.resid_post``; h_L is what the final
  norm and the head read.

"Layer l" anywhere in the book (experiments, figures, the SAE's layer, steering ranges) means h_l;
:func:`layer_hook_name` is the only place that turns it into a hook point name.

Interventions are hooks attached for the duration of a ``with`` block (:meth:`reflow_core.model.HookPoints.attach`),
so no experiment can leak an intervention into the next one.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from reflow_core import tokenizer


def n_states(model) -> int:
    """Number of layer states h_0 … h_L (= n_layer + 1)."""
    return model.config.n_layer + 1


def layer_hook_name(model, layer: int) -> str:
    """The hook point whose tensor is the layer state h_layer (see the module docstring)."""
    L = model.config.n_layer
    if not 0 <= layer <= L:
        raise ValueError(f"layer must be in 0..{L}, got {layer}")
    return "blocks.0.resid_pre" if layer == 0 else f"blocks.{layer - 1}.resid_post"


def middle_layer(model) -> int:
    """The middle layer state h_{L/2} (the SAE's default; the SAE+NFM seed read a middle layer, 16 of 26)."""
    return max(1, model.config.n_layer // 2)


def encode_prompt(model, prompt: str) -> torch.Tensor:
    """``prompt`` as a (1, T) batch of GPT-2 ids on the model's device, cut to its last block_size tokens."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("empty prompt")
    return torch.tensor([ids[-model.config.block_size:]], dtype=torch.long, device=model.device)


@torch.no_grad()
def residual_states(model, idx: torch.Tensor) -> torch.Tensor:
    """All layer states, shape (L+1, B, T, d), from one forward pass (hooks already attached still apply)."""
    names = [layer_hook_name(model, l) for l in range(n_states(model))]
    _, cache = model.run_with_cache(idx, names)
    return torch.stack([cache[n] for n in names])


@torch.no_grad()
def read_hook(model, idx: torch.Tensor, hook: str) -> torch.Tensor:
    """The residual stream at hook point ``hook`` for a batch of windows, (B, T, d); the forward pass stops at the
    block that produces it."""
    block = int(hook.split(".")[1])
    cache = {}
    with model.hooks.attach({hook: lambda x: cache.__setitem__("x", x.detach())}):
        model.residual(idx, stop_at=block + 1)
    return cache["x"]


@torch.no_grad()
def last_logits(model, idx: torch.Tensor) -> torch.Tensor:
    """Next-token logits after the last position, real vocabulary only, float32: (B, V)."""
    logits, _ = model(idx, last_only=True)
    return logits[:, -1, : model.config.real_vocab_size].float()


def add_hook(vector: torch.Tensor, positions: slice | int | None = None):
    """A hook that adds ``vector`` (shape d) to the residual stream at ``positions`` (default: all)."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        v = vector.to(x.dtype)
        if positions is None:
            return x + v
        x = x.clone()
        x[:, positions] = x[:, positions] + v
        return x

    return fn


def expand_layers(layers) -> list[int]:
    """An int, an inclusive ``(lo, hi)`` range or a list of layers, as a list."""
    if isinstance(layers, int):
        return [layers]
    if isinstance(layers, tuple) and len(layers) == 2:
        lo, hi = layers
        return list(range(int(lo), int(hi) + 1))
    return [int(l) for l in layers]


def injection_hooks(model, direction: torch.Tensor, layers, alpha: float, positions=None) -> dict:
    """Hooks adding α·v̂ to the layer states ``layers`` (an int, an inclusive ``(lo, hi)`` range, or a list)."""
    v = direction / direction.norm().clamp_min(1e-12)
    return {layer_hook_name(model, l): add_hook(alpha * v, positions) for l in expand_layers(layers)}


@contextmanager
def injected(model, direction: torch.Tensor, layers, alpha: float, positions=None) -> Iterator[None]:
    """``with injected(model, v, (0, 3), 8.0): …`` — every forward inside is steered."""
    with model.hooks.attach(injection_hooks(model, direction, layers, alpha, positions)):
        yield
