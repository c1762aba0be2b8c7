"""Experiment 9 — Causal Ablation: knocking out the signals that carry a prediction.

For a prompt and a target token t, the final read-out s (S numbers, last position) gives t's logit as
Σ_j s_j W_recipe[t, j].  We rank signals by their contribution c_j = s_j W_recipe[t, j] (largest positive first) and
knock out the top-k, k = 1, 2, 4, 8, … :

* ``readout`` mode — zero s_j before the recipe projection (the seed's experiment; exact, one matrix product);
* ``residual`` mode — at *every* layer state, project the residual stream off the directions u_j = g ⊙ b_j that the
  final RMSNorm (weight g) and basis row b_j read signal j from, so the signal is removed from the whole computation
  and not only from the read-out (its read-out is exactly 0 at every layer).

Null: k signals drawn at random (many draws); we report where the top-k knock-out falls in that distribution.  The
codebook of a signal j is the set of tokens it promotes most when active with the sign it has here: the largest
sign(s_j)·W_recipe[v, j].  The seed found a function-word channel; the null is the function-word share of the
codebooks of random signals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from reflow_core import tokenizer
from reflow_core.experiments.common import Interval, seed_interval
from reflow_core.scorecard import NOT_REPRODUCED, REPRODUCED, Row
from reflow_core.hooks import encode_prompt, layer_hook_name, n_states
from reflow_core.stimuli import load_stimuli

PAPER_PROMPT = "The capital of France is"
PAPER_TARGET = " Paris"
FOLD_FOR_COLLAPSE = 10.0  # a single knock-out "collapses" the target when it divides p by at least this


def function_words() -> set[str]:
    return set(load_stimuli("function_words")["words"])


def is_function_word(token: str) -> bool:
    return token.strip().lower() in function_words()


def default_ks(n_signals: int) -> list[int]:
    ks, k = [], 1
    while k < n_signals:
        ks.append(k)
        k *= 2
    return ks + [n_signals]


@torch.no_grad()
def final_readout(model, prompt: str) -> torch.Tensor:
    """s_L at the last position (S numbers)."""
    idx = encode_prompt(model, prompt)
    h = model.residual(idx)[0, -1]
    return model.signal_readout(h)


def target_probs(model, s: torch.Tensor, target: int) -> torch.Tensor:
    """p(target) for a batch of read-outs (…, S) through W_recipe (padding ids excluded)."""
    R = model.vocab.recipe_matrix()[: model.config.real_vocab_size]
    return F.softmax((s @ R.t()).float(), dim=-1)[..., target]


def random_masks(n: int, k: int, S: int, generator: torch.Generator) -> torch.Tensor:
    """(n, S) boolean masks, each with k signals chosen uniformly without replacement."""
    order = torch.rand(n, S, generator=generator).argsort(dim=1)
    return torch.zeros(n, S, dtype=torch.bool).scatter(1, order[:, :k], True)


@torch.no_grad()
def codebook(model, signal: int, sign: float = 1.0, n: int = 6) -> list[str]:
    """The ``n`` real-vocabulary tokens with the largest sign·W_recipe[v, signal]."""
    col = model.vocab.recipe_matrix()[: model.config.real_vocab_size, signal] * (1.0 if sign >= 0 else -1.0)
    return [tokenizer.decode([i]) for i in col.topk(n).indices.tolist()]


def function_share(tokens: list[str]) -> float:
    return float(np.mean([is_function_word(t) for t in tokens])) if tokens else 0.0


@dataclass
class AblationResult:
    prompt: str
    target: int
    target_token: str
    p_before: float
    ks: list[int]
    order: list[int]  # signals by contribution, largest first
    p_top: list[float]  # p(target) after knocking out the top-k (read-out mode)
    p_random: np.ndarray  # (len(ks), n_random) p(target) after k random signals
    p_top_residual: list[float] = field(default_factory=list)  # residual mode (if run)
    p_random_residual: np.ndarray | None = None
    codebook: list[str] = field(default_factory=list)  # of the top signal
    codebook_function_share: float = 0.0
    null_function_share: float = 0.0  # mean share over random signals' codebooks

    @property
    def fold_drop_1(self) -> float:
        return self.p_before / max(self.p_top[0], 1e-12)

    @property
    def beyond_random_1(self) -> float:
        """Share of random single-signal knock-outs that leave p(target) higher than the top-1 knock-out does."""
        return float(np.mean(self.p_random[0] > self.p_top[0]))


def _span_projector(model, signals: list[int]) -> torch.Tensor:
    """Orthonormal basis Q (d × k) of the directions u_j = g ⊙ b_j that the read-out of signal j uses."""
    g = model.norm_final.weight
    U = model.vocab.basis[signals] * g  # (k, d)
    Q, _ = torch.linalg.qr(U.t())
    return Q


@torch.no_grad()
def residual_knockout_prob(model, prompt: str, signals: list[int], target: int) -> float:
    """p(target) with ``signals`` projected out of every layer state (their read-out is 0 everywhere)."""
    Q = _span_projector(model, signals)

    def remove(x):
        return x - (x @ Q) @ Q.t()

    idx = encode_prompt(model, prompt)
    hooks = {layer_hook_name(model, l): remove for l in range(n_states(model))}
    with model.hooks.attach(hooks):
        logits, _ = model(idx, last_only=True)
    return float(F.softmax(logits[0, -1, : model.config.real_vocab_size].float(), -1)[target])


@torch.no_grad()
def causal_ablation(model, prompt: str = PAPER_PROMPT, target_id: int | None = None, *, ks: list[int] | None = None,
                    n_random: int = 200, residual: bool = False, n_random_residual: int = 10, n_null_codebooks: int = 64,
                    seed: int = 0) -> AblationResult:
    """Experiment 9 for one prompt; target = the model's final top-1 unless given."""
    S = model.config.n_signals
    ks = default_ks(S) if ks is None else ks
    s = final_readout(model, prompt)
    R = model.vocab.recipe_matrix()[: model.config.real_vocab_size]
    if target_id is None:
        target_id = int((s @ R.t()).argmax())
    c = s * R[target_id]
    order = c.argsort(descending=True)
    p_before = float(target_probs(model, s, target_id))
    g = torch.Generator().manual_seed(seed)
    p_top, p_rand = [], []
    for k in ks:
        keep = torch.ones(S, dtype=torch.bool)
        keep[order[:k]] = False
        p_top.append(float(target_probs(model, s * keep, target_id)))
        masks = random_masks(n_random, k, S, g)
        p_rand.append(target_probs(model, s * ~masks, target_id).cpu().numpy())
    top = int(order[0])
    book = codebook(model, top, float(s[top]))
    rand_sig = torch.randint(S, (n_null_codebooks,), generator=g).tolist()
    null_share = float(np.mean([function_share(codebook(model, j, float(s[j]))) for j in rand_sig]))
    result = AblationResult(
        prompt=prompt, target=target_id, target_token=tokenizer.decode([target_id]), p_before=p_before, ks=list(ks),
        order=order.tolist(), p_top=p_top, p_random=np.stack(p_rand), codebook=book,
        codebook_function_share=function_share(book), null_function_share=null_share,
    )
    if residual:
        result.p_top_residual = [residual_knockout_prob(model, prompt, order[:k].tolist(), target_id) for k in ks]
        result.p_random_residual = np.array([
            [residual_knockout_prob(model, prompt, torch.randperm(S, generator=g)[:k].tolist(), target_id)
             for _ in range(n_random_residual)] for k in ks
        ])
    return result


def fold_over_seeds(models: list, prompt: str = PAPER_PROMPT, n_random: int = 50) -> Interval:
    """log10 of the single-signal fold drop on ``prompt`` (each model's own top-1) over training seeds."""
    return seed_interval([math.log10(causal_ablation(m, prompt, ks=[1], n_random=n_random, n_null_codebooks=4).fold_drop_1)
                          for m in models])


def ablation_over_prompts(model, items: list[dict], *, n_random: int = 100, seed: int = 0) -> dict:
    """Single-signal knock-out of each prompt's decision (model's top-1): fold drop vs random, per prompt."""
    folds, rand_folds, pct, shares = [], [], [], []
    for i, it in enumerate(items):
        r = causal_ablation(model, it["prompt"], ks=[1], n_random=n_random, n_null_codebooks=8, seed=seed + i)
        folds.append(r.fold_drop_1)
        rand_folds.append(float(np.median(r.p_before / np.maximum(r.p_random[0], 1e-12))))
        pct.append(r.beyond_random_1)
        shares.append(r.codebook_function_share)
    return {"prompts": [it["prompt"] for it in items], "fold_top1": folds, "fold_random_median": rand_folds,
            "beyond_random": pct, "codebook_function_share": shares,
            "median_fold_top1": float(np.median(folds)), "median_fold_random": float(np.median(rand_folds)),
            "frac_collapse": float(np.mean(np.array(folds) >= FOLD_FOR_COLLAPSE))}


# ----------------------------------------------------------------------------------------------
# Figures and scorecard


def plot_ablation(result: AblationResult):
    """p(target) after knocking out the top-k signals vs k random signals (median, 5–95% band)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ks = np.array(result.ks)
    lo, med, hi = np.percentile(result.p_random, [5, 50, 95], axis=1)
    ax.fill_between(ks, lo, hi, color="0.7", alpha=0.5, label="k random signals (5–95%)")
    ax.plot(ks, med, color="0.4", label="k random signals (median)")
    ax.plot(ks, result.p_top, "o-", color="#c44e52", label="top-k contributing (read-out)")
    if result.p_top_residual:
        ax.plot(ks, result.p_top_residual, "s--", color="#8172b2", label="top-k, removed at every layer")
    ax.axhline(result.p_before, color="k", lw=0.8, ls=":", label="no ablation")
    ax.set_xscale("log", base=2); ax.set_yscale("log")
    ax.set_xlabel("signals knocked out (k)"); ax.set_ylabel(f"p({result.target_token!r})")
    ax.set_title(f"Causal ablation on {result.prompt!r}", fontsize=11)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def scorecard_rows(paper_prompt: AblationResult, over_prompts: dict, scale: str, checkpoint: str,
                   paris: AblationResult | None = None) -> list[Row]:
    r = paper_prompt
    fold = r.fold_drop_1
    collapse = fold >= FOLD_FOR_COLLAPSE and r.beyond_random_1 >= 0.95
    paris_text = ""
    if paris is not None:
        paris_text = f"; p(' Paris') {100 * paris.p_before:.3g}% → {100 * paris.p_top[0]:.3g}%"
    rows = [Row(
        claim_id="ablation.single",
        ours=(f"{r.prompt!r}: p({r.target_token!r}) {100 * r.p_before:.3g}% → {100 * r.p_top[0]:.3g}% "
              f"(÷{fold:.3g}; random single signal: median ÷"
              f"{float(np.median(r.p_before / np.maximum(r.p_random[0], 1e-12))):.3g}){paris_text}; "
              f"{len(over_prompts['fold_top1'])} prompts: median ÷{over_prompts['median_fold_top1']:.3g}"),
        verdict=REPRODUCED if collapse else NOT_REPRODUCED,
        why=(f"collapse = ≥{FOLD_FOR_COLLAPSE:g}-fold drop from one signal, larger than 95% of random single-signal "
             f"knock-outs (null); target = the model's own top-1"),
        scale=scale, checkpoint=checkpoint,
    )]
    fw = r.codebook_function_share
    rows.append(Row(
        claim_id="ablation.codebook",
        ours="{" + ", ".join(t.strip() or repr(t) for t in r.codebook) + "}" + f" ({100 * fw:.0f}% function words)",
        verdict=REPRODUCED if fw >= 0.5 and fw > r.null_function_share else NOT_REPRODUCED,
        why=f"function-word share vs {100 * r.null_function_share:.0f}% in codebooks of random signals (null)",
        scale=scale, checkpoint=checkpoint,
    ))
    return rows
