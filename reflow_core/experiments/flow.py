"""Experiment 8 — Signal Flow: which signals drive a prediction, at which layer and position.

The target logit is a sum over signals: logit_t = Σ_j s_j · W_recipe[t, j], with s the read-out of the final state.
Reading any layer state h_l (and any position) through the same lens gives c_{l,p,j} = s_{l,p,j} · W_recipe[t, j],
the contribution signal j *would* make to the target logit if the stream stopped there.  At the final layer and the
last position the contributions add up exactly to the model's target logit.

Figures: layer × signal (last position) and position × signal (final layer) heatmaps of c for the top-n signals
(ranked by |c| at the final layer, last position).

Baseline: how concentrated the target's logit is in its top-n signals (share of Σ|c|) against the same share for
random other tokens at the same position — a prediction "carried by a few signals" should be more concentrated than
an arbitrary token's logit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from reflow_core import tokenizer
from reflow_core.experiments.common import own_mask
from reflow_core.hooks import encode_prompt, residual_states


@dataclass
class FlowResult:
    prompt: str
    tokens: list[str]
    target: int
    target_token: str
    signals: list[int]  # the top-n signals, by |contribution| at (L, last)
    layer_by_signal: np.ndarray  # (L+1, n) contributions at the last position
    position_by_signal: np.ndarray  # (T, n) contributions at the final layer
    final_contrib: np.ndarray  # (S,) contributions at (L, last): sums to the target logit
    target_logit: float
    top_share: float  # share of Σ|c| carried by the top-n signals, for the target
    null_top_share: np.ndarray  # the same share for random other tokens


def contributions(model, signals: torch.Tensor, target: int) -> torch.Tensor:
    """c = s ⊙ W_recipe[target] for any batch of read-outs ``signals`` (…, S); ``target`` a GPT-2 id."""
    return signals * model.vocab.recipe_matrix()[model.vocab.rows_of(torch.tensor(target))]


def _share(c: torch.Tensor, n: int) -> torch.Tensor:
    a = c.abs()
    return a.topk(n, dim=-1).values.sum(-1) / a.sum(-1).clamp_min(1e-12)


@torch.no_grad()
def signal_flow(model, prompt: str, target_id: int | None = None, *, top_n: int = 12, n_null: int = 256,
                seed: int = 0) -> FlowResult:
    """Experiment 8 for one prompt (target: the model's final top-1 unless given)."""
    idx = encode_prompt(model, prompt)
    states = residual_states(model, idx)[:, 0]  # (L+1, T, d)
    s = model.signal_readout(states)  # (L+1, T, S)
    logits = model.vocab.expand(s[-1, -1] @ model.vocab.recipe_matrix().t())[: model.config.real_vocab_size]
    target = int(logits.argmax()) if target_id is None else int(target_id)
    c = contributions(model, s, target)  # (L+1, T, S)
    final = c[-1, -1]
    top = final.abs().topk(min(top_n, final.numel())).indices
    g = torch.Generator().manual_seed(seed)
    own = own_mask(model).nonzero().squeeze(1)
    others = own[torch.randint(own.numel(), (n_null,), generator=g)]  # random tokens with rows of their own
    null_c = s[-1, -1] * model.vocab.recipe_matrix()[model.vocab.rows_of(others)]  # (n_null, S)
    return FlowResult(
        prompt=prompt, tokens=[tokenizer.decode([i]) for i in idx[0].tolist()], target=target,
        target_token=tokenizer.decode([target]), signals=top.tolist(),
        layer_by_signal=c[:, -1, top].cpu().numpy(), position_by_signal=c[-1][:, top].cpu().numpy(),
        final_contrib=final.cpu().numpy(), target_logit=float(logits[target]),
        top_share=float(_share(final, len(top))), null_top_share=_share(null_c, len(top)).cpu().numpy(),
    )


def plot_flow(result: FlowResult):
    """Two heatmaps (diverging colour, shared scale): layer × signal and position × signal."""
    import matplotlib.pyplot as plt

    lim = float(max(np.abs(result.layer_by_signal).max(), np.abs(result.position_by_signal).max(), 1e-9))
    T = len(result.tokens)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.2 + 0.12 * T),
                                 gridspec_kw={"width_ratios": [1, 1]})
    kw = dict(cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    im = a1.imshow(result.layer_by_signal, **kw)
    a1.set_ylabel("layer"); a1.set_xlabel("signal")
    a1.set_title("last position, every layer", fontsize=10)
    a2.imshow(result.position_by_signal, **kw)
    a2.set_yticks(range(T), [repr(t) for t in result.tokens], fontsize=7)
    a2.set_xlabel("signal"); a2.set_title("final layer, every position", fontsize=10)
    for a in (a1, a2):
        a.set_xticks(range(len(result.signals)), result.signals, rotation=90, fontsize=7)
        a.grid(False)
    fig.colorbar(im, ax=[a1, a2], label=f"contribution to logit of {result.target_token!r}", shrink=0.9)
    fig.suptitle(f"Signal flow for {result.prompt!r} → {result.target_token!r}", fontsize=11)
    return fig
