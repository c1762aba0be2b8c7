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
sign(s_j)·W_recipe[v, j], **the target itself left out** (the signal was chosen for carrying the target, so finding
the target in its codebook would be selection, not a finding).  The seed found a function-word channel; the null is
the function-word share of the codebooks of random signals.

The target is the **expected answer** (" Paris" after "The capital of France is"), as in the seed, not the model's
own top-1 (at small scales " the"): the claim is that one signal carries a fact.  The scorecard rows
(:func:`scorecard_rows`) are measured over the factual prompts the model recalls — the expected answer among its
top-k next tokens (k of the ``factual_recall`` control) — with a bootstrap over prompts; their positive control is
that reFlow recalls enough of them (``factual_recall``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from reflow_core import tokenizer
from reflow_core.experiments.common import Interval, own_mask, seed_interval
from reflow_core.experiments.evolution import prompt_bootstrap
from reflow_core.scorecard import MET, NOT_TESTABLE, STRADDLES, Control, Row, against, criterion, decide
from reflow_core.hooks import encode_prompt, last_logits, layer_hook_name, n_states
from reflow_core.stimuli import load_stimuli

PAPER_PROMPT = "The capital of France is"
PAPER_TARGET = " Paris"
FOLD_FOR_COLLAPSE = 10.0  # a single knock-out "collapses" the target when it divides p by at least this (the figure)
BEYOND_RANDOM = 0.95  # the top signal's knock-out must beat this share of random single-signal knock-outs (median)
RECALL_TOP_K = 10  # a prompt is "recalled" when its expected answer is among the model's top-k next tokens


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


def readout_logits(model, s: torch.Tensor) -> torch.Tensor:
    """Logits over GPT-2 ids (padding excluded) of read-outs s (…, S) through W_recipe."""
    return model.vocab.expand(s @ model.vocab.recipe_matrix().t())[..., : model.config.real_vocab_size]


def target_probs(model, s: torch.Tensor, target: int) -> torch.Tensor:
    """p(target) for a batch of read-outs (…, S) through W_recipe (padding ids excluded)."""
    return F.softmax(readout_logits(model, s).float(), dim=-1)[..., target]


def random_masks(n: int, k: int, S: int, generator: torch.Generator) -> torch.Tensor:
    """(n, S) boolean masks, each with k signals chosen uniformly without replacement."""
    order = torch.rand(n, S, generator=generator).argsort(dim=1)
    return torch.zeros(n, S, dtype=torch.bool).scatter(1, order[:, :k], True)


@torch.no_grad()
def codebook(model, signal: int, sign: float = 1.0, n: int = 6, exclude=()) -> list[str]:
    """The ``n`` tokens with the largest sign·W_recipe[v, signal] among those with rows of their own, the ids in
    ``exclude`` left out."""
    col = model.vocab.by_id(model.vocab.recipe_matrix()[:, signal]).float() * (1.0 if sign >= 0 else -1.0)
    col[~own_mask(model)] = -float("inf")
    if len(exclude):
        col[torch.as_tensor(list(exclude), dtype=torch.long)] = -float("inf")
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
    codebook: list[str] = field(default_factory=list)  # of the top signal, the target left out
    codebook_function_share: float = 0.0
    null_function_share: float = 0.0  # mean share over random signals' codebooks (the target left out too)

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
    """Experiment 9 for one prompt; target = the model's final top-1 unless given (the chapter gives the expected
    answer).  Codebooks leave the target out."""
    S = model.config.n_signals
    ks = default_ks(S) if ks is None else ks
    s = final_readout(model, prompt)
    if target_id is None:
        target_id = int(readout_logits(model, s).argmax())
    c = s * model.vocab.recipe_matrix()[model.vocab.rows_of(torch.tensor(target_id))]
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
    book = codebook(model, top, float(s[top]), exclude=[target_id])
    rand_sig = torch.randint(S, (n_null_codebooks,), generator=g).tolist()
    null_share = float(np.mean([function_share(codebook(model, j, float(s[j]), exclude=[target_id]))
                                for j in rand_sig]))
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


def fold_over_seeds(models: list, prompt: str = PAPER_PROMPT, target: str = PAPER_TARGET,
                    n_random: int = 50) -> Interval:
    """log10 of the single-signal fold drop of ``target`` on ``prompt`` over training seeds."""
    tid = tokenizer.single_token_id(target)
    return seed_interval([math.log10(causal_ablation(m, prompt, tid, ks=[1], n_random=n_random,
                                                     n_null_codebooks=4).fold_drop_1) for m in models])


@torch.no_grad()
def answer_rank(model, prompt: str, target: int) -> int:
    """Rank (1 = top) of ``target`` in the model's next-token output after ``prompt``."""
    logits = last_logits(model, encode_prompt(model, prompt))[0, : model.config.real_vocab_size]
    return int((logits > logits[target]).sum()) + 1


def ablation_over_prompts(model, items: list[dict], *, n_random: int = 100, seed: int = 0,
                          recall_top_k: int = RECALL_TOP_K) -> dict:
    """Single-signal knock-out of each factual prompt's *expected answer*, on the prompts the model recalls (answer
    among its top ``recall_top_k``): fold drop vs random single signals, and the top signal's codebook (target left
    out) with its function-word share vs random signals'."""
    out = {k: [] for k in ("prompts", "targets", "index", "rank", "fold_top1", "fold_random_median", "beyond_random",
                           "codebook", "codebook_function_share", "null_function_share")}
    for i, it in enumerate(items):
        target = tokenizer.single_token_id(it["target"])
        rank = answer_rank(model, it["prompt"], target)
        if rank > recall_top_k:
            continue
        r = causal_ablation(model, it["prompt"], target, ks=[1], n_random=n_random, n_null_codebooks=8, seed=seed + i)
        for key, value in (("prompts", it["prompt"]), ("targets", it["target"]), ("index", i), ("rank", rank),
                           ("fold_top1", r.fold_drop_1),
                           ("fold_random_median", float(np.median(r.p_before / np.maximum(r.p_random[0], 1e-12)))),
                           ("beyond_random", r.beyond_random_1), ("codebook", r.codebook),
                           ("codebook_function_share", r.codebook_function_share),
                           ("null_function_share", r.null_function_share)):
            out[key].append(value)
    n = len(out["fold_top1"])
    out.update(n_items=len(items), n_recalled=n, recall_top_k=recall_top_k,
               median_fold_top1=float(np.median(out["fold_top1"])) if n else float("nan"),
               median_fold_random=float(np.median(out["fold_random_median"])) if n else float("nan"),
               frac_collapse=float(np.mean(np.array(out["fold_top1"]) >= FOLD_FOR_COLLAPSE)) if n else float("nan"))
    return out


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


def _pooled(over_seeds: list[dict], key: str) -> list[tuple[int, float]]:
    """(prompt index, value) of ``key`` over every seed's :func:`ablation_over_prompts`: records for a bootstrap that
    resamples prompts."""
    return [(i, float(v)) for o in over_seeds for i, v in zip(o["index"], o[key])]


def scorecard_rows(paper_prompt: AblationResult, over_seeds: list[dict], scale: str, checkpoint: str,
                   controls: dict[str, Control]) -> list[Row]:
    """ablation.single and ablation.codebook over the factual prompts the model recalls (``over_seeds``: one
    :func:`ablation_over_prompts` per training seed), target = the expected answer, each with a bootstrap over
    prompts against its registered criterion; ``paper_prompt`` (the seed's prompt and " Paris") is reported beside
    them.  ``controls`` (claim id → its positive control): reFlow recalls the expected answers (``factual_recall``).

    * single: the median fold drop must reach the threshold and the top signal's knock-out must beat
      :data:`BEYOND_RANDOM` of random single-signal knock-outs (median over prompts); where random single signals
      alone reach the threshold (median), the null meets the figure.
    * codebook: the mean function-word share of the top signals' codebooks (target left out) against the threshold;
      where random signals' codebooks reach it, the null meets the figure."""
    r = paper_prompt
    n_items = over_seeds[0]["n_items"]
    n_recalled = [o["n_recalled"] for o in over_seeds]
    k = over_seeds[0]["recall_top_k"]
    recall = f"{'/'.join(map(str, n_recalled))} of {n_items} factual prompts recalled (answer in the top {k})"
    paper_txt = (f"{r.prompt!r}: p({r.target_token!r}) {100 * r.p_before:.3g}% → {100 * r.p_top[0]:.3g}% "
                 f"(÷{r.fold_drop_1:.3g}; random single signal: median ÷"
                 f"{float(np.median(r.p_before / np.maximum(r.p_random[0], 1e-12))):.3g})")
    book_txt = "{" + ", ".join(t.strip() or repr(t) for t in r.codebook) + "}"
    folds = _pooled(over_seeds, "fold_top1")
    if not folds:
        why = f"no factual prompt's expected answer is among the model's top {k}: there is no recalled fact to ablate"
        return [Row(claim_id="ablation.single", ours=f"{recall}; {paper_txt}", verdict=NOT_TESTABLE, why=why,
                    scale=scale, checkpoint=checkpoint, control=controls["ablation.single"]),
                Row(claim_id="ablation.codebook", ours=f"{recall}; {book_txt} on the seed's prompt",
                    verdict=NOT_TESTABLE, why=why, scale=scale, checkpoint=checkpoint,
                    control=controls["ablation.codebook"])]
    n_seeds = len(over_seeds)

    control = controls["ablation.single"]
    crit = criterion("ablation.single")
    est, lo, hi = prompt_bootstrap(folds)
    lo, hi = (est, est) if not np.isfinite(lo) else (lo, hi)
    beyond = float(np.median([v for _, v in _pooled(over_seeds, "beyond_random")]))
    random_fold = float(np.median([v for _, v in _pooled(over_seeds, "fold_random_median")]))
    outcome = against(lo, hi, crit["threshold"], crit["direction"])
    if outcome == MET and beyond < BEYOND_RANDOM:
        outcome = STRADDLES
    null_meets = random_fold >= crit["threshold"]
    rows = [Row(
        claim_id="ablation.single",
        ours=(f"{recall}: median ÷{est:.3g} [{lo:.3g}, {hi:.3g}] (random single signal: median ÷{random_fold:.3g}; "
              f"top signal beats {100 * beyond:.0f}% of random ones); {paper_txt}"),
        verdict=decide(outcome, control, null_meets_paper=null_meets),
        why=(f"criterion: median fold drop of the expected answer ≥ {crit['threshold']:g} when its top contributing "
             f"signal is knocked out, beyond {100 * BEYOND_RANDOM:.0f}% of random single signals; 95% bootstrap over "
             f"prompts, {n_seeds} seed(s)"
             + (f"; random single signals alone reach ÷{random_fold:.3g}" if null_meets else "")),
        scale=scale, checkpoint=checkpoint, control=control,
    )]

    control = controls["ablation.codebook"]
    crit = criterion("ablation.codebook")
    est, lo, hi = prompt_bootstrap(_pooled(over_seeds, "codebook_function_share"), stat=np.mean)
    lo, hi = (est, est) if not np.isfinite(lo) else (lo, hi)
    null = float(np.mean([v for _, v in _pooled(over_seeds, "null_function_share")]))
    rows.append(Row(
        claim_id="ablation.codebook",
        ours=(f"{100 * est:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}] function words in the top signals' codebooks over "
              f"{sum(n_recalled)} recalled prompt×seed (random signals {100 * null:.0f}%); seed's prompt: {book_txt} "
              f"({100 * r.codebook_function_share:.0f}%)"),
        verdict=decide(against(lo, hi, crit["threshold"], crit["direction"]), control,
                       null_meets_paper=null >= crit["threshold"]),
        why=(f"criterion: function-word share of the top-6 codebook of the signal that carries the expected answer, "
             f"the answer itself left out, ≥ {100 * crit['threshold']:.0f}%; 95% bootstrap over prompts; random "
             f"signals' codebooks give {100 * null:.0f}%"),
        scale=scale, checkpoint=checkpoint, control=control,
    ))
    return rows
