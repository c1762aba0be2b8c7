"""Experiment 10 — Emotion Surgery: push a sentiment direction into one layer at a time.

Direction: mean recipe of the positive words minus mean recipe of the negative words
(``assets/prompts/sentiment.json``), mapped to model space by W_basis (:func:`reflow_core.steering.sentiment_direction`).
It is injected as h_l ← h_l + α·v̂ at every position of layer state l, one layer at a time, and we measure the change
of the next-token *sentiment score* = log Σ_pos p − log Σ_neg p on a prompt set, plus greedy generations when the
injection covers an early or a late layer range.

α is stated in absolute units and also relative to the median norm of the residual stream (last position, all layers,
all prompts), so that models of different width can be compared.

Null: random unit directions injected with the same α at the same layer.  A layer *responds* when the sentiment
direction's effect exceeds the 95th percentile of the random directions' |effect|.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from reflow_core import tokenizer
from reflow_core.experiments.common import Interval, seed_interval
from reflow_core.scorecard import NOT_REPRODUCED, NOT_TESTABLE, REPRODUCED, Row
from reflow_core.hooks import encode_prompt, injected, last_logits, layer_hook_name, n_states, residual_states
from reflow_core.stimuli import load_stimuli, sentiment_ids
from reflow_core.steering import random_directions, sentiment_direction, sentiment_score


@torch.no_grad()
def median_residual_norm(model, prompts: list[str]) -> float:
    """Median ‖h_l‖ at the last position over all layer states and prompts: the unit for α."""
    norms = [residual_states(model, encode_prompt(model, p))[:, 0, -1].norm(dim=-1) for p in prompts]
    return float(torch.cat(norms).median())


@torch.no_grad()
def _batched_scores(model, idx: torch.Tensor, layer: int, vectors: torch.Tensor, pos, neg) -> torch.Tensor:
    """Sentiment score with a different added vector per batch row (vectors: n × d), injected at ``layer``."""
    n = vectors.shape[0]
    batch = idx.expand(n, -1)
    add = vectors[:, None, :]
    with model.hooks.attach({layer_hook_name(model, layer): lambda x: x + add.to(x.dtype)}):
        logits = last_logits(model, batch)
    return sentiment_score(logits, pos, neg)


def layer_ranges(n_layer: int) -> dict[str, tuple[int, int]]:
    """The seed's L0–L12 ("early", first third) and beyond L18 ("late", second half) of 36, scaled to n_layer."""
    third = max(0, round(n_layer / 3))
    half = min(n_layer, max(third + 1, round(n_layer / 2)))
    return {"early": (0, third), "late": (half, n_layer)}


@dataclass
class EmotionResult:
    alpha: float
    rel_alpha: float
    unit_norm: float
    prompts: list[str]
    baseline: np.ndarray  # (P,) sentiment score without injection
    effect: np.ndarray  # (L+1, P) score change, sentiment direction
    null_effect: np.ndarray  # (L+1, P, n_random) score change, random directions
    responds: list[bool]  # per layer: mean effect beyond the 95th pct of random |effect|
    flips: dict = field(default_factory=dict)  # range -> per negative prompt: (baseline word, steered word)
    n_start_negative: dict = field(default_factory=dict)  # negative prompts whose unsteered top word is negative
    flip_rate: dict = field(default_factory=dict)  # among negative prompts whose unsteered top word is negative
    null_flip_rate: dict = field(default_factory=dict)
    generations: list = field(default_factory=list)


def _top_sentiment_word(logits: torch.Tensor, pos, neg) -> tuple[str, bool]:
    ids = pos + neg
    best = ids[int(logits[0, ids].argmax())]
    return tokenizer.decode([best]), best in pos


@torch.no_grad()
def emotion_surgery(model, *, rel_alpha: float = 1.0, alpha: float | None = None, n_random: int = 32,
                    gen_tokens: int = 12, prompts: list[str] | None = None, seed: int = 0) -> EmotionResult:
    """Experiment 10: per-layer effect of the sentiment direction vs random directions; flips and generations.

    ``prompts`` (default: all sentiment prompts of the data file) are those of the per-layer effect; the flips and
    generations always use the file's negative prompts.
    """
    stim = load_stimuli("sentiment")
    pos, neg = sentiment_ids()
    prompts = stim["prompts"] + stim["negative_prompts"] if prompts is None else prompts
    v = sentiment_direction(model)
    unit = median_residual_norm(model, prompts)
    alpha = rel_alpha * unit if alpha is None else float(alpha)
    g = torch.Generator().manual_seed(seed)
    rand = random_directions(n_random, model.config.d_model, g, model.device)
    L1 = n_states(model)
    base, effect, null = [], np.zeros((L1, len(prompts))), np.zeros((L1, len(prompts), n_random))
    for p_i, prompt in enumerate(prompts):
        idx = encode_prompt(model, prompt)
        b = float(sentiment_score(last_logits(model, idx), pos, neg)[0])
        base.append(b)
        for layer in range(L1):
            vecs = torch.cat([v[None], rand]) * alpha
            sc = _batched_scores(model, idx, layer, vecs, pos, neg).cpu().numpy() - b
            effect[layer, p_i], null[layer, p_i] = sc[0], sc[1:]
    thr = np.percentile(np.abs(null).mean(axis=1), 95, axis=1)  # per layer, over random directions
    responds = (effect.mean(axis=1) > thr).tolist()

    flips, flip_rate, null_rate, n_neg, gens = {}, {}, {}, {}, []
    for name, rng in layer_ranges(model.config.n_layer).items():
        rows, hits, null_hits = [], [], []
        for prompt in stim["negative_prompts"]:
            idx = encode_prompt(model, prompt)
            w0, pos0 = _top_sentiment_word(last_logits(model, idx), pos, neg)
            with injected(model, v, rng, alpha):
                w1, pos1 = _top_sentiment_word(last_logits(model, idx), pos, neg)
                out = model.generate(idx, gen_tokens, temperature=0.0)
            if not pos0:  # a flip needs a negative word to start from
                hits.append(pos1)
                for r in rand[:8]:
                    with injected(model, r, rng, alpha):
                        null_hits.append(_top_sentiment_word(last_logits(model, idx), pos, neg)[1])
            rows.append((w0, w1))
            if name == "early":
                base_out = model.generate(idx, gen_tokens, temperature=0.0)
                gens.append({"prompt": prompt, "unsteered": tokenizer.decode(base_out[0, idx.shape[1]:]),
                             "steered": tokenizer.decode(out[0, idx.shape[1]:])})
        # share of the prompts starting negative whose top sentiment word turns positive (0 when none starts negative)
        flips[name], n_neg[name] = rows, len(hits)
        flip_rate[name] = float(np.mean(hits)) if hits else 0.0
        null_rate[name] = float(np.mean(null_hits)) if null_hits else 0.0
    return EmotionResult(alpha=alpha, rel_alpha=alpha / unit, unit_norm=unit, prompts=prompts,
                         baseline=np.array(base), effect=effect, null_effect=null, responds=responds,
                         flips=flips, n_start_negative=n_neg, flip_rate=flip_rate, null_flip_rate=null_rate, generations=gens)


def flip_rate_over_seeds(models: list, rel_alpha: float = 1.0, n_random: int = 8) -> Interval:
    """Early-range flip rate of the sentiment direction, over training seeds."""
    short = load_stimuli("sentiment")["negative_prompts"]
    return seed_interval([emotion_surgery(m, rel_alpha=rel_alpha, n_random=n_random, gen_tokens=1,
                                          prompts=short).flip_rate["early"] for m in models])


def generations_table(result: EmotionResult):
    """Greedy continuations of the negative prompts without and with the early-range injection."""
    import pandas as pd

    pd.set_option("display.max_colwidth", 90)
    return pd.DataFrame(result.generations)


def plot_emotion(result: EmotionResult):
    """Mean score change per injection layer: sentiment direction vs random directions (5–95% band)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    layers = np.arange(result.effect.shape[0])
    rmean = result.null_effect.mean(axis=1)  # (L+1, n_random): mean over prompts per random direction
    lo, hi = np.percentile(rmean, [5, 95], axis=1)
    ax.fill_between(layers, lo, hi, color="0.75", alpha=0.6, label="random directions, same α (5–95%)")
    ax.plot(layers, result.effect.mean(axis=1), "o-", color="#55a868", label="sentiment direction")
    for l, r in zip(layers, result.responds):
        if r:
            ax.plot(l, result.effect.mean(axis=1)[l], "o", ms=11, mfc="none", color="k")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("injection layer (circled: responds beyond the null)")
    ax.set_ylabel("Δ (log p_pos − log p_neg), mean over prompts")
    ax.set_title(f"Emotion surgery, α = {result.alpha:.3g} ({result.rel_alpha:.2g}× median |h|)", fontsize=11)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def scorecard_rows(result: EmotionResult, scale: str, checkpoint: str, n_layer: int) -> list[Row]:
    rng = layer_ranges(n_layer)
    early, late = result.flip_rate["early"], result.flip_rate["late"]
    ok = early >= 0.5 and early > result.null_flip_rate["early"]
    examples = ", ".join(f"{a.strip()}→{b.strip()}" for a, b in result.flips["early"][:3])
    n_neg, n_all = result.n_start_negative.get("early", 0), len(result.flips["early"])
    if n_neg == 0:
        return [Row(
            claim_id="emotion.flip",
            ours=f"none of the {n_all} negative prompts makes the model prefer a negative word ({examples})",
            verdict=NOT_TESTABLE, why="nothing to flip: the unsteered model never leans negative on these prompts",
            scale=scale, checkpoint=checkpoint,
        )]
    return [Row(
        claim_id="emotion.flip",
        ours=(f"L{rng['early'][0]}–L{rng['early'][1]} injection flips the top sentiment word on {100 * early:.0f}% of "
              f"the {n_neg} of {n_all} negative prompts that start negative ({examples}); late L{rng['late'][0]}–L{rng['late'][1]}: {100 * late:.0f}%; "
              f"α = {result.rel_alpha:.2g}× median ‖h‖"),
        verdict=REPRODUCED if ok else NOT_REPRODUCED,
        why=(f"random directions of the same norm flip {100 * result.null_flip_rate['early']:.0f}% (early range); "
             "reproduced = sentiment direction flips ≥50% and more than the null"),
        scale=scale, checkpoint=checkpoint,
    )]
