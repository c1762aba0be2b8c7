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

Verdict (:func:`scorecard_rows`): the claim's criterion (``emotion.flip`` in ``assets/claims.json``) on the early-range
flip rate among the negative prompts that start clearly negative — an interval over training seeds, or a
bootstrap over those prompts with one seed — beyond the random directions (one-sided Fisher exact test of the
direction's flips against the random directions' flips).  Its positive control: the model's negative prompts lean
negative before surgery (:func:`reflow_core.experiments.controls.negative_lean`) and some start negative on the
top-word measure too; where random directions already flip half of them, the null meets the claim and the row is
inconclusive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from reflow_core import tokenizer
from reflow_core.experiments.common import Interval, bootstrap_ci, seed_interval
from reflow_core.scorecard import (FAMILY_ALPHA, MET, STRADDLES, Control, Row, against, combined, criterion,
                                   decide)
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
    hits: dict = field(default_factory=dict)  # range -> per prompt starting negative: did it flip (sentiment direction)
    null_hits: dict = field(default_factory=dict)  # range -> the same for each (prompt, random direction)

    def flip_p_value(self, name: str = "early") -> float:
        """One-sided Fisher exact p: does the sentiment direction flip more of the prompts starting negative than
        random directions of the same norm do?  1 when no prompt starts negative."""
        from scipy.stats import fisher_exact

        k, n = int(np.sum(self.hits.get(name, []))), len(self.hits.get(name, []))
        k0, n0 = int(np.sum(self.null_hits.get(name, []))), len(self.null_hits.get(name, []))
        if n == 0 or n0 == 0:
            return 1.0
        return float(fisher_exact([[k, n - k], [k0, n0 - k0]], alternative="greater")[1])


def _top_sentiment_word(logits: torch.Tensor, pos, neg) -> tuple[str, bool]:
    ids = pos + neg
    best = ids[int(logits[0, ids].argmax())]
    return tokenizer.decode([best]), best in pos


@torch.no_grad()
def emotion_surgery(model, *, rel_alpha: float = 1.0, alpha: float | None = None, n_random: int = 32,
                    gen_tokens: int = 12, prompts: list[str] | None = None, seed: int = 0,
                    start_margin: float | None = None) -> EmotionResult:
    """Experiment 10: per-layer effect of the sentiment direction vs random directions; flips and generations.

    A negative prompt *starts negative* when its top sentiment word is negative and its sentiment score is at most
    −``start_margin`` (default: the criterion's, ln 2 — negative words at least twice as likely as positive ones): an
    untrained model's scores lie within a few tenths of a nat of 0, where any push of this size flips the top word.

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

    margin = criterion("emotion.flip")["start_margin"] if start_margin is None else float(start_margin)
    flips, flip_rate, null_rate, n_neg, gens, all_hits, all_null = {}, {}, {}, {}, [], {}, {}
    for name, rng in layer_ranges(model.config.n_layer).items():
        rows, hits, null_hits = [], [], []
        for prompt in stim["negative_prompts"]:
            idx = encode_prompt(model, prompt)
            logits0 = last_logits(model, idx)
            w0, pos0 = _top_sentiment_word(logits0, pos, neg)
            lean = float(sentiment_score(logits0, pos, neg)[0])
            with injected(model, v, rng, alpha):
                w1, pos1 = _top_sentiment_word(last_logits(model, idx), pos, neg)
                out = model.generate(idx, gen_tokens, temperature=0.0)
            if not pos0 and lean <= -margin:  # a flip needs a clearly negative start
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
        all_hits[name], all_null[name] = [bool(h) for h in hits], [bool(h) for h in null_hits]
    return EmotionResult(alpha=alpha, rel_alpha=alpha / unit, unit_norm=unit, prompts=prompts,
                         baseline=np.array(base), effect=effect, null_effect=null, responds=responds,
                         flips=flips, n_start_negative=n_neg, flip_rate=flip_rate, null_flip_rate=null_rate,
                         generations=gens, hits=all_hits, null_hits=all_null)


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


def start_negative_control(result: EmotionResult, name: str = "early") -> Control:
    """The flip needs prompts that start clearly negative (top sentiment word negative, score ≤ −start_margin)."""
    n_neg, n_all = result.n_start_negative.get(name, 0), len(result.flips.get(name, []))
    margin = criterion("emotion.flip")["start_margin"]
    return Control("negative prompts start clearly negative", n_neg > 0,
                   f"{n_neg} of {n_all} negative prompts have a negative top sentiment word and a score ≤ "
                   f"−{margin:.2f} nats", value=float(n_neg), threshold=1.0)


def flip_outcome(result: EmotionResult, flip_seeds: Interval | None = None) -> tuple[str, tuple[float, float], float]:
    """Where the early-range flip rate lies against ``emotion.flip``'s criterion: (outcome, interval, Fisher p).

    The interval is the t-interval over training seeds when there are two or more, else a bootstrap over the prompts
    that start negative; a rate whose interval meets the threshold but does not beat the random directions
    (Fisher p ≥ α) straddles: the direction is not shown to matter."""
    crit = criterion("emotion.flip")
    hits = np.asarray(result.hits.get("early", []), dtype=float)
    if flip_seeds is not None and flip_seeds.n > 1 and np.isfinite(flip_seeds.lo):
        lo, hi = flip_seeds.lo, flip_seeds.hi
    elif hits.size >= 2:
        _, lo, hi = bootstrap_ci(hits)
    else:
        lo = hi = float(hits.mean()) if hits.size else 0.0
    p = result.flip_p_value("early")
    outcome = against(lo, hi, crit["threshold"], crit["direction"])
    if outcome == MET and p >= FAMILY_ALPHA:
        outcome = STRADDLES
    return outcome, (float(lo), float(hi)), p


def scorecard_rows(result: EmotionResult, scale: str, checkpoint: str, n_layer: int, control: Control,
                   flip_seeds: Interval | None = None) -> list[Row]:
    """emotion.flip against its registered criterion (module docstring); ``control`` is the claim's competence gate
    (negative prompts lean negative before surgery), combined here with "some prompt starts on a negative top
    word"."""
    rng = layer_ranges(n_layer)
    crit = criterion("emotion.flip")
    early, late = result.flip_rate["early"], result.flip_rate["late"]
    null_early = result.null_flip_rate["early"]
    examples = ", ".join(f"{a.strip()}→{b.strip()}" for a, b in result.flips["early"][:3])
    n_neg, n_all = result.n_start_negative.get("early", 0), len(result.flips["early"])
    control = combined(f"{control.name} + prompts start negative", [control, start_negative_control(result)])
    outcome, (lo, hi), p = flip_outcome(result, flip_seeds)
    null_meets = n_neg > 0 and null_early >= crit["threshold"]
    interval = f" [{100 * lo:.0f}%, {100 * hi:.0f}%]" if hi > lo else ""
    spread = ("t-interval over seeds" if flip_seeds is not None and flip_seeds.n > 1 else
              "bootstrap over the prompts that start negative")
    return [Row(
        claim_id="emotion.flip",
        ours=(f"L{rng['early'][0]}–L{rng['early'][1]} injection flips the top sentiment word on {100 * early:.0f}%"
              f"{interval} of the {n_neg} of {n_all} negative prompts that start clearly negative ({examples}); random "
              f"directions {100 * null_early:.0f}% (Fisher p = {p:.3g}); late L{rng['late'][0]}–L{rng['late'][1]}: "
              f"{100 * late:.0f}%; α = {result.rel_alpha:.2g}× median ‖h‖"),
        verdict=decide(outcome, control, null_meets_paper=null_meets),
        why=(f"criterion: flip rate ≥ {crit['threshold']:.0%} ({spread}) and beyond random directions of the same "
             f"norm (one-sided Fisher p < {FAMILY_ALPHA})"
             + (f"; random directions alone flip {100 * null_early:.0f}%, so the null meets the claim" if null_meets
                else "")
             + ("" if n_neg else "; no prompt starts negative, so there is nothing to flip")),
        scale=scale, checkpoint=checkpoint, control=control, p_value=p if n_neg else None,
    )]
