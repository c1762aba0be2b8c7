"""Experiment 12 — Genetic Hijack: edit W_recipe globally and watch behaviour and collateral damage.

Because W_recipe is both the input embedding (through W_basis) and the output read-out, one edit changes how a token
is read *and* how it is predicted, everywhere.  Edits (all undone on leaving the ``with`` block):

* swap two rows (``(" good", " bad")``: the model now reads and writes one word where it used to the other);
* blend a row toward another (row_a ← (1−t)·row_a + t·row_b);
* scale a signal column (every token's use of signal j, times a factor; −1 flips it, 0 deletes it).

Effects: the next-token sentiment score (log Σ_pos p − log Σ_neg p) on the sentiment prompts, greedy generations,
and the collateral damage — the change of validation loss on held-out tokens.  Note that swapping two output rows
permutes two logits, so for a context that contains neither word the score flips by construction; the experiment's
content is the collateral damage and what happens in contexts that *contain* the words.

Null: swapping the same number of random row pairs matched in corpus frequency (each random token is drawn from the
tokens whose validation count is nearest the count of the word it stands in for).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from reflow_core import tokenizer
from reflow_core.data import iter_eval_batches
from reflow_core.scorecard import NOT_REPRODUCED, REPRODUCED, Row
from reflow_core.hooks import encode_prompt, last_logits
from reflow_core.stimuli import load_stimuli, sentiment_ids, token_ids
from reflow_core.steering import sentiment_score


LOSS_TOLERANCE = 1e-4  # nats: float noise of a permuted softmax, far below any real collateral damage


@contextmanager
def edited_recipe(model, *, swaps: list[tuple[int, int]] = (), blends: list[tuple[int, int, float]] = (),
                  column_scales: dict[int, float] | None = None) -> Iterator[None]:
    """Apply global edits to W_recipe in place for the duration of the block, then restore it exactly."""
    W = model.vocab.recipe
    saved = W.data.clone()
    try:
        with torch.no_grad():
            for a, b in swaps:
                W[[a, b]] = W[[b, a]].clone()
            for a, b, t in blends:
                W[a] = (1 - t) * W[a] + t * W[b]
            for j, factor in (column_scales or {}).items():
                W[:, j] *= factor
        yield
    finally:
        with torch.no_grad():
            W.copy_(saved)


@torch.no_grad()
def val_loss(model, tokens: np.ndarray, *, batch_size: int = 16, block_size: int | None = None,
             max_batches: int = 8) -> float:
    """Token-weighted mean cross-entropy on fixed validation windows (reflow_core.data.iter_eval_batches)."""
    block_size = block_size or model.config.block_size
    total, n = 0.0, 0
    for x, y in iter_eval_batches(tokens, batch_size, block_size, max_batches, device=model.device):
        _, loss = model(x, y, return_logits=False)
        total += float(loss) * x.numel()
        n += x.numel()
    return total / n


def frequency_matched(counts: np.ndarray, word: int, n: int, exclude: set[int], generator: np.random.Generator,
                      pool: int = 20) -> list[int]:
    """``n`` random tokens among the ``pool`` tokens whose count is nearest ``counts[word]`` (``exclude`` left out)."""
    order = np.argsort(np.abs(counts.astype(np.int64) - int(counts[word])), kind="stable")
    cands = [int(t) for t in order[: pool + len(exclude) + 1] if int(t) not in exclude and int(t) != word][:pool]
    return generator.choice(cands, size=n, replace=len(cands) < n).tolist()


@torch.no_grad()
def sentiment_scores(model, prompts: list[str]) -> np.ndarray:
    pos, neg = sentiment_ids()
    return np.array([float(sentiment_score(last_logits(model, encode_prompt(model, p)), pos, neg)[0]) for p in prompts])


@torch.no_grad()
def greedy(model, prompts: list[str], n: int) -> list[str]:
    outs = []
    for p in prompts:
        idx = encode_prompt(model, p)
        outs.append(tokenizer.decode(model.generate(idx, n, temperature=0.0)[0, idx.shape[1]:]))
    return outs


@dataclass
class HijackResult:
    pairs: list[tuple[str, str]]
    prompts: list[str]
    score_before: np.ndarray
    score_after: np.ndarray
    null_score_after: np.ndarray  # (n_null, P)
    loss_before: float
    loss_after: float
    null_loss_after: np.ndarray  # (n_null,)
    generations: list = field(default_factory=list)
    column: dict = field(default_factory=dict)  # the signal-column edit

    @property
    def flip_rate(self) -> float:
        return float(np.mean(np.sign(self.score_before) != np.sign(self.score_after)))

    @property
    def null_flip_rate(self) -> float:
        return float(np.mean(np.sign(self.score_before)[None] != np.sign(self.null_score_after)))

    @property
    def delta_loss(self) -> float:
        return self.loss_after - self.loss_before

    @property
    def null_delta_loss(self) -> np.ndarray:
        return self.null_loss_after - self.loss_before

    @property
    def loss_percentile(self) -> float:
        """Share of null swaps with a smaller loss change than the sentiment swap."""
        return float(np.mean(self.null_delta_loss < self.delta_loss))


def genetic_hijack(model, val_tokens: np.ndarray, *, pairs: list[list[str]] | None = None, n_null: int = 8,
                   gen_tokens: int = 12, max_batches: int = 8, batch_size: int = 16, column_factor: float = -1.0,
                   seed: int = 0) -> HijackResult:
    """Experiment 12: swap the sentiment antonym rows; sentiment, generations, val loss; frequency-matched null."""
    stim = load_stimuli("sentiment")
    pairs = stim["swap_pairs"] if pairs is None else pairs
    ids = [tuple(token_ids(list(p))[0]) for p in pairs]
    prompts = stim["prompts"] + stim["negative_prompts"]
    counts = np.bincount(np.asarray(val_tokens, dtype=np.int64), minlength=model.config.vocab_size)
    counts[model.config.real_vocab_size:] = -10**9  # never pick padding rows
    rng = np.random.default_rng(seed)
    score0, loss0 = sentiment_scores(model, prompts), val_loss(model, val_tokens, max_batches=max_batches, batch_size=batch_size)
    gen0 = greedy(model, stim["negative_prompts"], gen_tokens)
    with edited_recipe(model, swaps=ids):
        score1, loss1 = sentiment_scores(model, prompts), val_loss(model, val_tokens, max_batches=max_batches, batch_size=batch_size)
        gen1 = greedy(model, stim["negative_prompts"], gen_tokens)
    exclude = {t for p in ids for t in p}
    null_scores, null_losses = [], []
    for _ in range(n_null):
        swaps = [(frequency_matched(counts, a, 1, exclude, rng)[0], frequency_matched(counts, b, 1, exclude, rng)[0])
                 for a, b in ids]
        with edited_recipe(model, swaps=swaps):
            null_scores.append(sentiment_scores(model, prompts))
            null_losses.append(val_loss(model, val_tokens, max_batches=max_batches, batch_size=batch_size))
    result = HijackResult(
        pairs=[tuple(p) for p in pairs], prompts=prompts, score_before=score0, score_after=score1,
        null_score_after=np.array(null_scores), loss_before=loss0, loss_after=loss1,
        null_loss_after=np.array(null_losses),
        generations=[{"prompt": p, "before": a, "after": b} for p, a, b in zip(stim["negative_prompts"], gen0, gen1)],
    )
    if model.is_factored:
        result.column = signal_column_edit(model, val_tokens, prompts, factor=column_factor, max_batches=max_batches,
                                           batch_size=batch_size, rng=rng, score_before=score0, loss_before=loss0)
    return result


@torch.no_grad()
def signal_column_edit(model, val_tokens, prompts, *, factor: float, max_batches: int, rng, score_before, loss_before,
                       batch_size: int = 16, n_null: int = 3) -> dict:
    """Scale the most sentiment-discriminating signal column (largest |mean recipe pos − neg|) by ``factor``."""
    pos, neg = sentiment_ids()
    R = model.vocab.recipe_matrix()
    diff = R[pos].mean(0) - R[neg].mean(0)
    j = int(diff.abs().argmax())
    with edited_recipe(model, column_scales={j: factor}):
        s1, l1 = sentiment_scores(model, prompts), val_loss(model, val_tokens, max_batches=max_batches, batch_size=batch_size)
    null = []
    for jr in rng.choice(model.config.n_signals, size=n_null, replace=False):
        with edited_recipe(model, column_scales={int(jr): factor}):
            null.append(val_loss(model, val_tokens, max_batches=max_batches, batch_size=batch_size))
    return {"signal": j, "factor": factor, "mean_score_change": float(np.mean(s1 - score_before)),
            "delta_loss": l1 - loss_before, "null_delta_loss": (np.array(null) - loss_before).tolist()}


def generations_table(result: HijackResult):
    """Greedy continuations of the negative prompts before and after the swap."""
    import pandas as pd

    pd.set_option("display.max_colwidth", 90)
    return pd.DataFrame(result.generations)


def plot_hijack(result: HijackResult):
    """Left: sentiment score per prompt before/after the swap. Right: Δ val loss vs frequency-matched random swaps."""
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1.4, 1]})
    x = np.arange(len(result.prompts))
    a1.bar(x - 0.2, result.score_before, 0.4, label="before", color="0.6")
    a1.bar(x + 0.2, result.score_after, 0.4, label="after swapping antonym rows", color="#c44e52")
    a1.axhline(0, color="k", lw=0.6)
    a1.set_xticks(x, [p[:22] + "…" for p in result.prompts], rotation=70, fontsize=7, ha="right")
    a1.set_ylabel("log p_pos − log p_neg")
    a1.legend(fontsize=8, ncol=2, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    a2.hist(result.null_delta_loss, bins=max(5, len(result.null_delta_loss) // 2), color="0.7",
            label="random frequency-matched swaps")
    a2.axvline(result.delta_loss, color="#c44e52", lw=2, label="sentiment swap")
    a2.set_xlabel("Δ validation loss (nats)")
    a2.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.suptitle("Genetic hijack: global recipe swap — behaviour and collateral damage", fontsize=11, y=1.06)
    fig.tight_layout()
    return fig


def scorecard_rows(result: HijackResult, scale: str, checkpoint: str) -> list[Row]:
    null_hi = float(np.percentile(result.null_delta_loss, 95)) if len(result.null_delta_loss) else float("inf")
    grammar_kept = result.delta_loss <= max(null_hi, 0.0) + LOSS_TOLERANCE
    ok = result.flip_rate >= 0.5 and grammar_kept
    return [Row(
        claim_id="hijack.sentiment",
        ours=(f"swapping {len(result.pairs)} antonym rows flips the sentiment score on {100 * result.flip_rate:.0f}% of "
              f"prompts (random swaps: {100 * result.null_flip_rate:.0f}%); Δ val loss {result.delta_loss:+.4f} nats "
              f"(random frequency-matched swaps: 95th pct {null_hi:+.4f})"),
        verdict=REPRODUCED if ok else NOT_REPRODUCED,
        why=("grammar intact = val-loss change no larger than the 95th percentile of random frequency-matched swaps "
             "(null); the flip is partly by construction (swapped output rows swap logits)"),
        scale=scale, checkpoint=checkpoint,
    )]
