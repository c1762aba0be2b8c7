"""Experiment 12 — Genetic Hijack: edit W_recipe globally and watch behaviour and collateral damage.

Because W_recipe is both the input embedding (through W_basis) and the output read-out, one edit changes how a token
is read *and* how it is predicted, everywhere.  :func:`edited_recipe` applies edits in place for the duration of a
``with`` block (swap two rows, blend a row toward another, scale a signal column, or move every row along a direction
of recipe space) and restores W_recipe exactly.

**The edit.**  Every recipe row is reflected along the sentiment axis û of recipe space (the unit mean recipe of the
positive words minus that of the negative words): r ← r − 2(r·û)û.  It is global — every token's sentiment component
changes sign, listed or not — and it is not a swap of rows.

**What could fail.**  Two parts of the paper's claim, "modifying W_recipe globally flips sentiment while maintaining
grammatical coherence", are by construction for any edit of the output rows: reversing the positive−negative
difference of the output rows reverses the sentiment of the logits for an unchanged state, and a pure swap of two rows
leaves the loss on text without those two words exactly unchanged.  We therefore measure:

* **the read flip** — does the model *read* its edited context as positive?  The negative prompts are run with the
  edited embeddings of their context, but with the original read-out rows and the original embedding at the position
  that predicts (so neither the read-out nor the residual path of the last token can flip anything by construction):
  the share of prompts that start clearly negative (score ≤ −ln 2) whose sentiment score turns positive, against
  random edits of the same Frobenius size (r ← r − s(r·u)u along random unit directions u of recipe space, s matched
  to ‖ΔW‖ of the sentiment edit; permutation p on the mean score change);
* **the collateral damage** — the change of loss on validation windows that contain none of the sentiment words, for
  the sentiment edit against the same random edits: the percentile of its Δloss among theirs, with a bootstrap over
  windows.

Greedy continuations of the negative prompts before and after the whole edit are shown as an illustration (their
flip is partly by construction).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from reflow_core import tokenizer
from reflow_core.experiments.common import permutation_p
from reflow_core.hooks import encode_prompt, last_logits, layer_hook_name
from reflow_core.scorecard import MISSED, STRADDLES, Control, Row, against, combined, criterion, decide
from reflow_core.steering import sentiment_score
from reflow_core.stimuli import load_stimuli, sentiment_ids


@contextmanager
def edited_recipe(model, *, swaps: list[tuple[int, int]] = (), blends: list[tuple[int, int, float]] = (),
                  column_scales: dict[int, float] | None = None,
                  projections: list[tuple[torch.Tensor, float]] = ()) -> Iterator[None]:
    """Apply global edits to W_recipe in place for the duration of the block, then restore it exactly.

    ``projections``: (u, s) moves every row along the unit direction u of recipe space, r ← r − s(r·u)u (s = 2 is a
    reflection)."""
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
            for u, s in projections:
                u = (u / u.norm()).to(W.device, W.dtype)
                W -= s * (W @ u)[:, None] * u[None, :]
        yield
    finally:
        with torch.no_grad():
            W.copy_(saved)


def _rows(model, ids: list[int]) -> torch.Tensor:
    """The vocabulary rows of GPT-2 ids (themselves for a full vocabulary; see ``Vocab.rows_of``)."""
    return model.vocab.rows_of(torch.as_tensor(ids, dtype=torch.long, device=model.device))


@torch.no_grad()
def sentiment_axis(model) -> torch.Tensor:
    """û: unit mean recipe of the positive words minus that of the negative words (recipe space)."""
    pos, neg = sentiment_ids(model.vocab)
    R = model.vocab.recipe_matrix().detach().float()
    d = R[_rows(model, pos)].mean(0) - R[_rows(model, neg)].mean(0)
    return d / d.norm().clamp_min(1e-12)


@torch.no_grad()
def matched_strength(model, u: torch.Tensor, size: float) -> float:
    """s such that r ← r − s(r·u)u changes the token rows of W_recipe by ``size`` (Frobenius)."""
    R = model.vocab.recipe.detach()[: model.config.n_rows].float()  # token rows, padding left out
    return float(size / (R @ (u / u.norm()).to(R)).norm().clamp_min(1e-12))


@torch.no_grad()
def clean_windows(tokens: np.ndarray, block_size: int, banned: set[int], n: int) -> np.ndarray:
    """Start offsets of up to ``n`` non-overlapping windows of ``block_size`` + 1 tokens that contain no ``banned``
    token, evenly spread over the clean ones."""
    tokens = np.asarray(tokens)
    n_slots = (len(tokens) - 1) // block_size
    starts = np.arange(n_slots) * block_size
    bad = np.isin(tokens[: n_slots * block_size + 1], np.fromiter(banned, dtype=np.int64))
    clean = [s for s in starts if not bad[s:s + block_size + 1].any()]
    if len(clean) > n:
        clean = [clean[i] for i in (np.arange(n) * len(clean) // n)]
    return np.asarray(clean, dtype=np.int64)


@torch.no_grad()
def window_losses(model, tokens: np.ndarray, starts: np.ndarray, block_size: int) -> np.ndarray:
    """Mean next-token loss of each window (one number per window, the model's fused loss), for bootstraps over
    windows."""
    out = []
    for a in starts:
        x = torch.as_tensor(tokens[a:a + block_size][None].astype(np.int64), device=model.device)
        y = torch.as_tensor(tokens[a + 1:a + block_size + 1][None].astype(np.int64), device=model.device)
        out.append(float(model(x, y, return_logits=False)[1]))
    return np.asarray(out, dtype=np.float64)


@torch.no_grad()
def full_scores(model, prompts: list[str]) -> np.ndarray:
    """Next-token sentiment score (log Σ_pos p − log Σ_neg p) of each prompt, as the model stands."""
    pos, neg = sentiment_ids()
    return np.array([float(sentiment_score(last_logits(model, encode_prompt(model, p)), pos, neg)[0]) for p in prompts])


@torch.no_grad()
def context_states(model, prompts: list[str], h0_last: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Final normed state at the last position of each prompt; with ``h0_last`` the last position's layer-0 state is
    replaced by the given one (the original embedding, under an edit)."""
    out = []
    for i, p in enumerate(prompts):
        idx = encode_prompt(model, p)
        hooks = {}
        if h0_last is not None:
            keep = h0_last[i]

            def fix(x, keep=keep):
                x = x.clone()
                x[:, -1] = keep.to(x.dtype)
                return x
            hooks = {layer_hook_name(model, 0): fix}
        with model.hooks.attach(hooks):
            out.append(model.norm_final(model.residual(idx))[:, -1].detach())
    return out


@torch.no_grad()
def last_embeddings(model, prompts: list[str]) -> list[torch.Tensor]:
    """Layer-0 state of each prompt's last position."""
    out = []
    for p in prompts:
        cache = {}
        with model.hooks.attach({layer_hook_name(model, 0): lambda x: cache.__setitem__("x", x[:, -1].detach())}):
            model.residual(encode_prompt(model, p), stop_at=1)
        out.append(cache["x"])
    return out


@torch.no_grad()
def read_scores(model, states: list[torch.Tensor]) -> np.ndarray:
    """Sentiment score of normed final states through the model's *current* read-out rows: log Σ_pos e^logit −
    log Σ_neg e^logit, the softmax normaliser cancelling (only the sentiment words' logits are computed)."""
    pos, neg = sentiment_ids(model.vocab)

    def id_logits(inputs, weight, ids):
        logits = inputs @ weight[_rows(model, ids)].t()
        if model.vocab.compact:  # an id sharing the tail row gets its share of it (Vocab.expand)
            shared = ~model.vocab.has_own_row(ids).to(logits.device)
            logits = logits - shared.to(logits.dtype) * model.vocab.tail_log_size()
        return logits.float()

    out = []
    for h in states:
        inputs, weight = model.vocab.head(h)
        lp, ln = id_logits(inputs, weight, pos), id_logits(inputs, weight, neg)
        out.append(float(torch.logsumexp(lp, -1)[0] - torch.logsumexp(ln, -1)[0]))
    return np.array(out)


@torch.no_grad()
def greedy(model, prompts: list[str], n: int) -> list[str]:
    outs = []
    for p in prompts:
        idx = encode_prompt(model, p)
        outs.append(tokenizer.decode(model.generate(idx, n, temperature=0.0)[0, idx.shape[1]:]))
    return outs


@dataclass
class HijackResult:
    prompts: list[str]  # the negative prompts
    edit_size: float  # ‖ΔW_recipe‖ (Frobenius, real vocabulary) of the sentiment edit; the random edits match it
    read_before: np.ndarray  # (P,) sentiment score of each negative prompt, unedited
    read_after: np.ndarray  # (P,) the same with the edited context (original read-out and last embedding)
    null_read_after: np.ndarray  # (n_null_read, P) the same for random edits of the same size
    full_after: np.ndarray  # (P,) score under the whole edit (read-out included: flips by construction)
    loss_before: np.ndarray  # (W,) loss per clean validation window, unedited
    loss_after: np.ndarray  # (W,) under the sentiment edit
    null_loss_after: np.ndarray  # (n_null, W) under random edits of the same size
    generations: list = field(default_factory=list)
    start_margin: float = 0.693  # a prompt starts negative when its score is at most −this (criterion's start_margin)

    @property
    def start_negative(self) -> np.ndarray:
        """Prompts that start clearly negative: an untrained model's scores lie within a few tenths of a nat of 0."""
        return self.read_before <= -self.start_margin

    @property
    def read_flip_rate(self) -> float:
        """Share of the prompts starting negative whose read score turns positive under the sentiment edit."""
        s = self.start_negative
        return float((self.read_after[s] > 0).mean()) if s.any() else 0.0

    @property
    def null_read_flip_rates(self) -> np.ndarray:
        """The same share for each random edit."""
        s = self.start_negative
        if not s.any() or not len(self.null_read_after):
            return np.zeros(len(self.null_read_after))
        return (self.null_read_after[:, s] > 0).mean(1)

    @property
    def read_p_value(self) -> float:
        """Permutation p: do random edits of the same size raise the negative prompts' mean read score as much?"""
        if not len(self.null_read_after):
            return 1.0
        obs = float(np.mean(self.read_after - self.read_before))
        return permutation_p(obs, (self.null_read_after - self.read_before[None]).mean(1))

    @property
    def full_flip_rate(self) -> float:
        s = self.start_negative
        return float((self.full_after[s] > 0).mean()) if s.any() else 0.0

    @property
    def delta_loss(self) -> float:
        return float(np.mean(self.loss_after - self.loss_before)) if self.loss_before.size else float("nan")

    @property
    def null_delta_loss(self) -> np.ndarray:
        if not self.loss_before.size:
            return np.full(len(self.null_loss_after), np.nan)
        return (self.null_loss_after - self.loss_before[None]).mean(1)

    def damage_percentile(self, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
        """(percentile, lo, hi): where the sentiment edit's Δloss lies among the random edits' (100 = more damage than
        every one of them), with a 95% bootstrap interval over the clean windows."""
        if not self.loss_before.size or not len(self.null_loss_after):
            return float("nan"), float("nan"), float("nan")
        d = self.loss_after - self.loss_before
        dn = self.null_loss_after - self.loss_before[None]

        def pct(ix):
            return 100.0 * float(np.mean(dn[:, ix].mean(1) < d[ix].mean()))

        est = pct(np.arange(d.size))
        if d.size < 2:
            return est, est, est
        rng = np.random.default_rng(seed)
        boots = [pct(rng.integers(0, d.size, d.size)) for _ in range(n_boot)]
        return est, float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def genetic_hijack(model, val_tokens: np.ndarray, *, n_null: int = 8, n_null_read: int = 99, n_windows: int = 32,
                   block_size: int | None = None, gen_tokens: int = 12, prompts: list[str] | None = None,
                   seed: int = 0) -> HijackResult:
    """Experiment 12: reflect every recipe row along the sentiment axis (module docstring); the read flip against
    ``n_null_read`` random edits of the same size, the collateral damage on ``n_windows`` sentiment-free validation
    windows against the first ``n_null`` of them."""
    prompts = load_stimuli("sentiment")["negative_prompts"] if prompts is None else prompts
    pos, neg = sentiment_ids()
    T = min(block_size or model.config.block_size, model.config.block_size)
    val_tokens = np.asarray(val_tokens, dtype=np.int64)
    starts = clean_windows(val_tokens, T, set(pos) | set(neg), n_windows)
    u = sentiment_axis(model)
    edit = [(u, 2.0)]
    size = 2.0 / matched_strength(model, u, 1.0)  # ‖2·R û‖
    g = torch.Generator().manual_seed(seed)
    rand = torch.randn(max(n_null, n_null_read), u.numel(), generator=g)
    rand = rand / rand.norm(dim=1, keepdim=True)

    h0 = last_embeddings(model, prompts)
    read0 = read_scores(model, context_states(model, prompts))
    full0_loss = window_losses(model, val_tokens, starts, T)
    gen0 = greedy(model, prompts, gen_tokens)

    def read_under(projections):
        with edited_recipe(model, projections=projections):
            states = context_states(model, prompts, h0)
        return read_scores(model, states)  # the original read-out rows

    read1 = read_under(edit)
    with edited_recipe(model, projections=edit):
        full1 = full_scores(model, prompts)
        loss1 = window_losses(model, val_tokens, starts, T)
        gen1 = greedy(model, prompts, gen_tokens)
    null_read, null_loss = [], []
    for i in range(max(n_null, n_null_read)):
        r = rand[i].to(u)
        proj = [(r, matched_strength(model, r, size))]
        if i < n_null_read:
            null_read.append(read_under(proj))
        if i < n_null:
            with edited_recipe(model, projections=proj):
                null_loss.append(window_losses(model, val_tokens, starts, T))
    return HijackResult(
        prompts=list(prompts), edit_size=size, read_before=read0, read_after=read1,
        null_read_after=np.array(null_read).reshape(len(null_read), len(prompts)), full_after=full1,
        loss_before=full0_loss, loss_after=loss1,
        null_loss_after=np.array(null_loss).reshape(len(null_loss), len(starts)),
        generations=[{"prompt": p, "before": a, "after": b} for p, a, b in zip(prompts, gen0, gen1)],
        start_margin=criterion("hijack.sentiment")["start_margin"],
    )


def generations_table(result: HijackResult):
    """Greedy continuations of the negative prompts before and after the whole edit."""
    import pandas as pd

    pd.set_option("display.max_colwidth", 90)
    return pd.DataFrame(result.generations)


def plot_hijack(result: HijackResult):
    """Left: sentiment score per negative prompt before the edit, reading the edited context, and under the whole edit.
    Right: Δ loss on sentiment-free windows, sentiment edit vs random edits of the same size."""
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1.4, 1]})
    x = np.arange(len(result.prompts))
    a1.bar(x - 0.27, result.read_before, 0.27, label="before", color="0.6")
    a1.bar(x, result.read_after, 0.27, label="edited context, original read-out", color="#c44e52")
    a1.bar(x + 0.27, result.full_after, 0.27, label="whole edit (read-out too)", color="#dd8452")
    a1.axhline(0, color="k", lw=0.6)
    a1.set_xticks(x, [p[:22] + "…" for p in result.prompts], rotation=30, fontsize=7, ha="right")
    a1.set_ylabel("log p_pos − log p_neg")
    a1.legend(fontsize=7, ncol=2, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    null = result.null_delta_loss
    if np.isfinite(null).any():
        a2.hist(null[np.isfinite(null)], bins=max(5, len(null) // 2), color="0.7",
                label="random edits of the same size")
    if np.isfinite(result.delta_loss):
        a2.axvline(result.delta_loss, color="#c44e52", lw=2, label="sentiment reflection")
    a2.set_xlabel("Δ loss on sentiment-free windows (nats)")
    if a2.get_legend_handles_labels()[0]:
        a2.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    else:
        a2.text(0.5, 0.5, "no validation window free of sentiment words", ha="center", va="center",
                transform=a2.transAxes, fontsize=8)
    fig.suptitle("Genetic hijack: reflect every recipe row along the sentiment axis", fontsize=11, y=1.06)
    fig.tight_layout()
    return fig


def start_negative_control(result: HijackResult) -> Control:
    n = int(result.start_negative.sum())
    return Control("negative prompts start clearly negative", n > 0,
                   f"{n} of {len(result.prompts)} with a sentiment score ≤ −{result.start_margin:.2f} nats",
                   value=float(n), threshold=1.0)


def hijack_outcome(result: HijackResult) -> tuple[str, dict]:
    """The claim's outcome (module docstring): the read flip must reach the criterion's share beyond random edits
    (permutation p < α), else missed; then the damage percentile's bootstrap interval against the criterion's bar."""
    crit = criterion("hijack.sentiment")
    bar = crit["threshold"]
    p = result.read_p_value
    flip = result.read_flip_rate
    pct, lo, hi = result.damage_percentile()
    info = {"flip": flip, "p": p, "pct": pct, "lo": lo, "hi": hi}
    if not (flip >= bar["read_flip"] and p < crit["alpha"]):
        return MISSED, info
    if not np.isfinite(pct):
        return STRADDLES, info
    return against(lo, hi, bar["damage_percentile"], crit["direction"]), info


def scorecard_rows(result: HijackResult, scale: str, checkpoint: str, control: Control) -> list[Row]:
    """hijack.sentiment against its registered criterion; ``control`` is the claim's competence gate (the model has
    learned beyond unigrams and its negative prompts lean negative), combined with "some prompt starts negative".
    Random edits of the same size that flip the read as often as the claim asks meet the claim themselves:
    inconclusive."""
    crit = criterion("hijack.sentiment")
    bar = crit["threshold"]
    outcome, o = hijack_outcome(result)
    null_flip = float(np.median(result.null_read_flip_rates)) if len(result.null_read_flip_rates) else 0.0
    null_meets = bool(result.start_negative.any()) and null_flip >= bar["read_flip"]
    control = combined(f"{control.name} + prompts start negative", [control, start_negative_control(result)])
    n_neg, P = int(result.start_negative.sum()), len(result.prompts)
    if result.loss_before.size:
        damage = (f"Δ loss on {result.loss_before.size} sentiment-free windows {result.delta_loss:+.4f} nats, "
                  f"{o['pct']:.0f}th percentile [{o['lo']:.0f}, {o['hi']:.0f}] of {len(result.null_loss_after)} "
                  f"random edits of the same size (median {np.median(result.null_delta_loss):+.4f})")
    else:
        damage = "no validation window free of sentiment words: damage not measured"
    return [Row(
        claim_id="hijack.sentiment",
        ours=(f"reflecting every recipe row along the sentiment axis: {100 * o['flip']:.0f}% of the {n_neg} of {P} "
              f"negative prompts that start clearly negative read as positive (random edits of the same size: median "
              f"{100 * null_flip:.0f}%, permutation p = {o['p']:.3g}); with the read-out edited too "
              f"{100 * result.full_flip_rate:.0f}% (partly by construction, not counted); {damage}"),
        verdict=decide(outcome, control, null_meets_paper=null_meets),
        why=(f"criterion: the edited context reads positive on ≥ {bar['read_flip']:.0%} of the prompts starting "
             f"negative, beyond random edits of the same size (p < {crit['alpha']}), and the damage on text without "
             f"sentiment words is at most the {bar['damage_percentile']:g}th percentile of theirs (bootstrap over "
             "windows); the read-out's own flip is partly by construction and not counted"
             + (f"; random edits alone flip {100 * null_flip:.0f}%: the null meets the claim" if null_meets else "")),
        scale=scale, checkpoint=checkpoint, control=control, p_value=o["p"] if n_neg else None,
    )]
