"""Positive controls: has a model learned what a claim's test presumes, and can the test see the effect at all?

A claim may be called **not reproduced** only when a positive control of the same test passed on the same build
(:class:`reflow_core.scorecard.Row` refuses it otherwise).  This module holds the controls a chapter gates on:

* **competence gates** — one model at a time: its validation loss is clearly below the corpus's unigram entropy,
  it recalls the expected answer of factual prompts, its negative prompts lean negative, the expected answer becomes
  its top-1 at all (crystallisation needs a layer where it does);
* **effect gates** — the same statistic a claim tests, on the *embedding rows* E of any model (reFlow's product
  W_recipe·W_basis, GPT-2-New's tied E), against the test's own null: are three↔four near neighbours, are the top-20
  pairs same-category beyond chance, do categories cluster, does vector algebra beat random targets, do misspellings
  read like their words?  When the baseline trained on the same budget shows the effect, the scale can test the
  claim; when no model shows it, the scale cannot;
* **spike-ins** — a known structure of realistic size planted into a copy of the trained model (two recipe rows
  blended to a known cosine, an analogy offset written into the rows, one signal given a large causal weight): the
  share of plants the test detects is its measured power at this scale.

Every control's bar lives in ``assets/controls.json`` (not in code), with what it protects.  :func:`evaluate`
computes every model-level control of one model; the scorecard chapter runs it on intermediate checkpoints to show
how much training each claim needs before it can be judged (``fig-scorecard-competence``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from reflow_core import data, tokenizer
from reflow_core.checkpoint import load_model
from reflow_core.experiments import algebra, atlas, galaxy, sparsity, typo
from reflow_core.experiments.common import embedding_rows, unit_rows, vocab_rows
from reflow_core.fileio import read_json, write_json_atomic
from reflow_core.hooks import encode_prompt, last_logits
from reflow_core.runs import checkpoint_identity, ensure_model, snapshot_dirs
from reflow_core.scales import checkpoint_dir, data_dir_for, get_scale, results_dir_for
from reflow_core.scorecard import Control, criterion
from reflow_core.steering import sentiment_score
from reflow_core.stimuli import load_stimuli, sentiment_ids


@functools.cache
def settings() -> dict[str, dict]:
    """``assets/controls.json``: each control's bar and what it protects."""
    return json.loads(files("reflow_core").joinpath("assets/controls.json").read_text())["controls"]


def _bar(name: str, key: str = "threshold") -> float:
    return settings()[name][key]


# ----------------------------------------------------------------------------------------------
# Competence gates (one model)


@torch.no_grad()
def validation_loss(model, data_dir, *, block_size: int | None = None, batch_size: int = 16,
                    max_batches: int = 20) -> float:
    """Mean next-token loss over the fixed validation windows of a prepared dataset."""
    T = min(block_size or model.config.block_size, model.config.block_size)
    tokens = data.load_tokens(data_dir, "val")
    total, count = 0.0, 0
    for x, y in data.iter_eval_batches(tokens, batch_size, T, max_batches, device=model.device):
        _, loss = model(x, y, return_logits=False)
        total += float(loss) * y.numel()
        count += y.numel()
    return total / count


def loss_below_unigram(model, data_dir, *, block_size: int | None = None) -> Control:
    """Validation loss at least ``margin`` nats below the unigram entropy of the corpus (the loss of the best model
    that ignores context): below it, the model has learned something beyond word frequencies."""
    margin = _bar("loss_below_unigram", "margin_nats")
    h = data.unigram_entropy(data_dir)
    loss = validation_loss(model, data_dir, block_size=block_size)
    return Control("competence: val loss below unigram entropy", loss <= h - margin,
                   f"val loss {loss:.3f} vs unigram entropy {h:.3f} nats (bar: {margin:g} below)",
                   value=h - loss, threshold=margin)


@torch.no_grad()
def expected_answer_ranks(model, items: list[dict] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rank (1 = top) and probability of each factual prompt's expected answer in the model's next-token output."""
    items = load_stimuli("factual")["items"] if items is None else items
    ranks, probs = [], []
    for it in items:
        logits = last_logits(model, encode_prompt(model, it["prompt"]))[0]
        target = tokenizer.single_token_id(it["target"])
        ranks.append(int((logits > logits[target]).sum()) + 1)
        probs.append(float(F.softmax(logits, -1)[target]))
    return np.array(ranks), np.array(probs)


def factual_recall(model, items: list[dict] | None = None) -> Control:
    """The expected answer of factual prompts ("The capital of France is" → " Paris") is among the model's top-k
    next tokens for a share of the prompts: the causal-ablation test needs an answer the model actually predicts."""
    k, share = int(_bar("factual_recall", "top_k")), _bar("factual_recall")
    ranks, probs = expected_answer_ranks(model, items)
    got = float(np.mean(ranks <= k))
    return Control("competence: factual recall", got >= share,
                   f"expected answer in the top {k} for {100 * got:.0f}% of {len(ranks)} factual prompts "
                   f"(bar {100 * share:.0f}%); median p(answer) {100 * float(np.median(probs)):.3g}%",
                   value=got, threshold=share)


def answer_top1(model, items: list[dict] | None = None) -> Control:
    """The expected answer is the model's final top-1 for a share of the factual prompts: a crystallisation layer of
    the expected answer exists only where it is."""
    share = _bar("answer_top1")
    ranks, _ = expected_answer_ranks(model, items)
    got = float(np.mean(ranks == 1))
    return Control("competence: expected answer is top-1", got >= share,
                   f"top-1 for {100 * got:.0f}% of {len(ranks)} factual prompts (bar {100 * share:.0f}%)",
                   value=got, threshold=share)


@torch.no_grad()
def negative_lean(model) -> Control:
    """Prompts that start negative ("The service was terrible and the food was") lean negative before any surgery:
    a flip to positive needs a negative start."""
    share = _bar("negative_lean")
    pos, neg = sentiment_ids()
    prompts = load_stimuli("sentiment")["negative_prompts"]
    scores = [float(sentiment_score(last_logits(model, encode_prompt(model, p)), pos, neg)[0]) for p in prompts]
    got = float(np.mean(np.array(scores) < 0))
    return Control("competence: negative prompts lean negative", got >= share,
                   f"{sum(s < 0 for s in scores)} of {len(scores)} negative prompts lean negative "
                   f"(bar {100 * share:.0f}%)", value=got, threshold=share)


# ----------------------------------------------------------------------------------------------
# Effect gates: a claim's statistic on a model's embedding rows E, against the test's own null


def number_neighbours(model, rows: torch.Tensor | None = None) -> Control:
    """three↔four among the most similar random vocabulary pairs of E (percentile ≥ the bar)."""
    bar = _bar("number_neighbours")
    r = atlas.recipe_atlas(model, rows=embedding_rows(model) if rows is None else rows, n_vocab_neighbours=1)
    pct = r.named_percentile["three↔four"]
    return Control("effect: three↔four are near neighbours in E", pct >= bar,
                   f"three↔four cos {r.named['three↔four']:.2f}, {pct:.1f}th percentile of random pairs "
                   f"(bar {bar:g})", value=pct, threshold=bar)


def category_neighbours(model, rows: torch.Tensor | None = None) -> Control:
    """More same-category pairs among the top-20 cosine pairs of E than chance (binomial test at α)."""
    alpha = _bar("category_neighbours", "alpha")
    r = atlas.recipe_atlas(model, rows=embedding_rows(model) if rows is None else rows, n_vocab_neighbours=1)
    n = len(r.top_pairs)
    p = float(stats.binomtest(r.top_pairs_valid, n, r.chance, alternative="greater").pvalue)
    return Control("effect: top-20 pairs same-category beyond chance in E", p < alpha,
                   f"{r.top_pairs_valid}/{n} same-category (chance {n * r.chance:.1f}), binomial p={p:.2g}",
                   value=p, threshold=alpha)


def category_clusters(model, rows: torch.Tensor | None = None, *, n_perm: int = 200) -> Control:
    """Word categories cluster in E: silhouette beyond its label-permutation null (p < α)."""
    alpha = _bar("category_clusters", "alpha")
    r = galaxy.semantic_galaxy(model, rows=embedding_rows(model) if rows is None else rows, n_perm=n_perm)
    return Control("effect: categories cluster in E", r.p_value < alpha,
                   f"silhouette {r.silhouette:+.3f} (null mean {r.null.mean():+.3f}), permutation p={r.p_value:.3f}",
                   value=r.p_value, threshold=alpha)


def vector_algebra(model, rows: torch.Tensor | None = None, *, n_null: int = 200) -> Control:
    """b − a + c finds d in E better than random targets (MRR permutation p < α) and better than c alone."""
    alpha = _bar("vector_algebra", "alpha")
    r = algebra.semantic_algebra(model, rows=embedding_rows(model) if rows is None else rows, n_null=n_null)
    passed = r.p_value < alpha and r.mrr > r.mrr_only_c
    return Control("effect: vector algebra beats random targets in E", passed,
                   f"MRR {r.mrr:.3f} vs random targets {r.null_mrr.mean():.3f} (p={r.p_value:.3f}), "
                   f"c alone {r.mrr_only_c:.3f}", value=r.p_value, threshold=alpha)


def typo_readout(model, *, n_null: int = 200) -> Control:
    """Misspelt words and their correct forms leave similar final states (matched beat shuffled pairs, p < α)."""
    alpha = _bar("typo_readout", "alpha")
    r = typo.typo_resilience(model, n_null=n_null)
    p = r.p_value("readout")
    return Control("effect: misspellings read like their words", p < alpha,
                   f"final read-out cos {r.mean('readout'):.3f} vs shuffled pairs {r.null_mean('readout'):.3f}, "
                   f"p={p:.3f}", value=p, threshold=alpha)


# ----------------------------------------------------------------------------------------------
# Spike-ins: plant a known structure into a copy and check that the test finds it


def _rows_copy(model) -> torch.Tensor:
    """The rows the claim's test reads (recipe rows of a reFlow model), as a copy to plant into."""
    return vocab_rows(model).clone()


def blend_rows(rows: torch.Tensor, a: int, b: int, cosine: float) -> torch.Tensor:
    """Rows with row b replaced by a unit-norm blend of rows a and b whose cosine with row a is ``cosine`` (row b's
    norm kept): the planted 'similar recipes' of two words."""
    ua, ub = unit_rows(rows[a:a + 1])[0], unit_rows(rows[b:b + 1])[0]
    ortho = ub - (ub @ ua) * ua
    ortho = ortho / ortho.norm().clamp_min(1e-12)
    out = rows.clone()
    out[b] = (cosine * ua + math.sqrt(max(0.0, 1 - cosine ** 2)) * ortho) * rows[b].norm()
    return out


def spike_number_neighbours(model) -> Control:
    """Plant three↔four at the paper's cosine (0.7551) into the recipe rows and check that the atlas test ranks the
    pair as near neighbours (the percentile bar of :func:`number_neighbours`)."""
    cosine, bar = _bar("spike_number_neighbours", "cosine"), _bar("number_neighbours")
    three, four = tokenizer.single_token_id(" three"), tokenizer.single_token_id(" four")
    planted = blend_rows(_rows_copy(model), three, four, cosine)
    r = atlas.recipe_atlas(model, rows=planted, n_vocab_neighbours=1)
    pct = r.named_percentile["three↔four"]
    return Control("spike-in: three↔four planted at the paper's cosine", pct >= bar,
                   f"planted cos {cosine:g} found at the {pct:.1f}th percentile (bar {bar:g})", value=pct,
                   threshold=bar)


def spike_analogies(model, *, strength: float | None = None) -> Control:
    """Write each analogy's offset into the recipe rows (d ← d + s·(b − a + c − d) for the unit rows) and check that
    the algebra test finds it beyond random targets: the test's power at this scale."""
    s = _bar("spike_analogies", "strength") if strength is None else strength
    alpha = _bar("vector_algebra", "alpha")
    analogies, _ = algebra.analogy_set()
    rows = _rows_copy(model)
    U = unit_rows(rows)
    for a, b, c, d in analogies:
        ia, ib, ic, idd = (tokenizer.single_token_id(w) for w in (a, b, c, d))
        target = U[ib] - U[ia] + U[ic]
        rows[idd] = (U[idd] + s * (target - U[idd])) * rows[idd].norm()
    r = algebra.semantic_algebra(model, rows=rows)
    return Control("spike-in: analogy offsets planted", r.p_value < alpha,
                   f"offset strength {s:g}: MRR {r.mrr:.3f} vs random targets {r.null_mrr.mean():.3f} "
                   f"(p={r.p_value:.3f})", value=r.p_value, threshold=alpha)


def _planted_sparse(n_rows: int, n_signals: int, rate: float, *, even: bool, seed: int = 0) -> torch.Tensor:
    """Rows with ``rate`` of their entries large (N(0,1)) and the rest small (N(0, 0.05²)); ``even=False`` draws the
    large entries from a fifth of the signals only (uneven usage)."""
    g = torch.Generator().manual_seed(seed)
    R = 0.05 * torch.randn(n_rows, n_signals, generator=g)
    k = max(1, round(rate * n_signals))
    pool = n_signals if even else max(k, n_signals // 5)
    for v in range(n_rows):
        cols = torch.randperm(pool, generator=g)[:k]
        R[v, cols] = torch.randn(k, generator=g)
    return R


def spike_sparsity(n_signals: int, *, n_rows: int = 4000) -> Control:
    """Planted sparsity at the paper's rate (11.38% large entries per row): the c = 2 profile must measure it within
    the claim's tolerance — the test can see sparsity of that size."""
    paper = criterion("sparsity.rate")["threshold"]
    got = sparsity.profile(_planted_sparse(n_rows, n_signals, paper, even=True), with_null=False).rate_at_2
    return Control("spike-in: rows planted 11.38% sparse", abs(got - paper) <= sparsity.RATE_TOL,
                   f"measured {100 * got:.2f}% of entries active at c=2 (planted {100 * paper:.2f}%)", value=got,
                   threshold=paper)


def spike_uneven_usage(n_signals: int, *, n_rows: int = 4000) -> Control:
    """Planted uneven signal usage (large entries only in a fifth of the signals): the Gini test must call it uneven."""
    even = criterion("sparsity.gini")["threshold"]
    g = sparsity.profile(_planted_sparse(n_rows, n_signals, 0.1138, even=False), with_null=False).gini
    return Control("spike-in: usage planted on a fifth of the signals", g > even,
                   f"Gini {g:.3f} (bar: above {even})", value=g, threshold=even)


# ----------------------------------------------------------------------------------------------
# All model-level controls of one model (the competence figure)

ModelControl = Callable[..., Control]

MODEL_CONTROLS: dict[str, ModelControl] = {
    "loss_below_unigram": loss_below_unigram,
    "factual_recall": factual_recall,
    "answer_top1": answer_top1,
    "negative_lean": negative_lean,
    "number_neighbours": number_neighbours,
    "category_neighbours": category_neighbours,
    "category_clusters": category_clusters,
    "vector_algebra": vector_algebra,
    "typo_readout": typo_readout,
}
SEMANTIC_CONTROLS = ("number_neighbours", "category_neighbours", "category_clusters", "vector_algebra",
                     "typo_readout", "answer_top1", "factual_recall", "negative_lean")
"""The controls of the semantic claims (atlas, galaxy, algebra, typo, crystallisation, ablation, emotion)."""


@dataclass
class ModelControls:
    label: str  # the checkpoint, e.g. "reflow-seed1337@step150"
    controls: dict[str, Control]
    step: int = 0
    tokens: int = 0

    def passed(self) -> list[str]:
        return [n for n, c in self.controls.items() if c.passed]

    def to_json(self) -> dict:
        return {"label": self.label, "step": self.step, "tokens": self.tokens,
                "controls": {n: dataclasses.asdict(c) for n, c in self.controls.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "ModelControls":
        return cls(d["label"], {n: Control(**c) for n, c in d["controls"].items()}, d["step"], d["tokens"])


def evaluate(model, data_dir, label: str, *, block_size: int | None = None, step: int = 0,
             tokens: int = 0) -> ModelControls:
    """Every model-level control of ``model`` (the data-dependent ones on ``data_dir``)."""
    out = {}
    for name, fn in MODEL_CONTROLS.items():
        out[name] = fn(model, data_dir, block_size=block_size) if name == "loss_below_unigram" else fn(model)
    return ModelControls(label, out, step, tokens)


def checkpoint_controls(checkpoint: Path, label: str, data_dir, cache_dir: Path, *,
                        block_size: int | None = None) -> ModelControls:
    """:func:`evaluate` on the checkpoint at ``checkpoint``, kept in ``cache_dir/<label>.json`` and reused while the
    weights are the same (their sha256): chapters and the competence figure share one evaluation per checkpoint."""
    identity = checkpoint_identity(checkpoint)
    path = Path(cache_dir) / f"{label}.json"
    cached = read_json(path)
    if cached and cached.get("sha256") == identity["sha256"] and set(cached["controls"]) == set(MODEL_CONTROLS):
        return ModelControls.from_json(cached)
    model, _ = load_model(checkpoint)
    result = evaluate(model, data_dir, label, block_size=block_size, step=identity["step"],
                      tokens=identity["tokens"])
    write_json_atomic(path, {**result.to_json(), "sha256": identity["sha256"]})
    return result


def trained_controls(scale: str, family: str, results_dir=None, *, seed: int | None = None) -> ModelControls:
    """The model-level controls of ``family``'s final checkpoint at ``scale`` (cached under ``data/controls``)."""
    run = checkpoint_dir(scale, family, results_dir, seed)
    ensure_model(scale, family, results_dir, seed)
    return checkpoint_controls(run, f"{run.name}@final", data_dir_for(scale),
                               results_dir_for(scale, results_dir) / "data" / "controls",
                               block_size=get_scale(scale).train.get("block_size"))


def training_controls(scale: str, family: str, results_dir=None, *, seed: int | None = None) -> list[ModelControls]:
    """The model-level controls at every snapshot of ``family``'s run (step order), for the competence figure."""
    run = checkpoint_dir(scale, family, results_dir, seed)
    cache = results_dir_for(scale, results_dir) / "data" / "controls"
    snapshots = snapshot_dirs(scale, family, results_dir, seed)
    drop_stale_snapshot_controls(cache, run.name, [snap.name for snap in snapshots])
    return [checkpoint_controls(snap, f"{run.name}@{snap.name}", data_dir_for(scale), cache,
                                block_size=get_scale(scale).train.get("block_size"))
            for snap in snapshots]


def drop_stale_snapshot_controls(cache_dir: Path, run_name: str, snapshot_names: list[str]) -> list[Path]:
    """Delete the cached controls of ``run_name``'s snapshots that its run no longer has (an earlier run with other
    steps left them), so the record's ``data/controls`` holds only checkpoints that exist; returns what went."""
    keep = {f"{run_name}@{name}.json" for name in snapshot_names}
    stale = [p for p in Path(cache_dir).glob(f"{run_name}@step-*.json") if p.name not in keep]
    for path in stale:
        path.unlink()
    return stale


def any_model(controls: dict[str, Control], name: str) -> Control:
    """One gate from several models' results of the same control: passed when any model passed (the scale can show
    the effect), detail naming each."""
    passed = [m for m, c in controls.items() if c.passed]
    detail = "; ".join(f"{m}: {c.detail}" for m, c in controls.items())
    first = next(iter(controls.values()))
    return Control(f"{name} ({' or '.join(controls)})", bool(passed), detail, value=first.value,
                   threshold=first.threshold)


# ----------------------------------------------------------------------------------------------
# Which controls gate which claim

@dataclass(frozen=True)
class Gate:
    """A claim's positive control: model-level controls (``mode`` "any": some model of ``families`` passes — the
    scale can show the effect; "all": every one does; a family name: that model must) and spike-ins."""

    controls: tuple[str, ...]
    mode: str = "any"
    families: tuple[str, ...] = ("reflow", "gpt2-new")
    spikes: tuple[str, ...] = ()


SPIKES: dict[str, Callable[..., Control]] = {
    "spike_number_neighbours": spike_number_neighbours,
    "spike_analogies": spike_analogies,
}

CLAIM_GATES: dict[str, Gate] = {
    "training.val_gap": Gate(("loss_below_unigram",), mode="all"),
    "atlas.three_four": Gate(("number_neighbours",), spikes=("spike_number_neighbours",)),
    "atlas.top20": Gate(("category_neighbours",)),
    "galaxy.silhouette": Gate(("category_clusters",)),
    "algebra.hits": Gate(("vector_algebra",), spikes=("spike_analogies",)),
    "typo.resilience": Gate(("typo_readout",)),
    # the collapse compares three structures (three↔four, clusters, algebra): dense reFlow must show all three first
    "topk.collapse": Gate(("number_neighbours", "category_clusters", "vector_algebra"), mode="reflow"),
    # the soft variants must keep what Top-K loses: dense reFlow must show the same three structures first
    "thread.soft_sparsity": Gate(("number_neighbours", "category_clusters", "vector_algebra"), mode="reflow"),
    "ablation.single": Gate(("factual_recall",), mode="reflow"),
    "ablation.codebook": Gate(("factual_recall",), mode="reflow"),
    "evolution.crystallisation": Gate(("answer_top1",), mode="reflow"),
    "thread.boundary_shift": Gate(("answer_top1",), mode="reflow"),
    "emotion.flip": Gate(("negative_lean",), mode="reflow"),
    "inception.alpha": Gate(("loss_below_unigram",), mode="reflow"),
    "hijack.sentiment": Gate(("loss_below_unigram", "negative_lean"), mode="reflow"),
    "thread.loop_monitor": Gate(("loss_below_unigram",), mode="reflow"),
    # the SAE claims are about feature interactions a model computes: a model at unigram level computes none, and the
    # factorial's clamp reads next-token log-probabilities of word classes it must predict beyond unigrams
    **{claim: Gate(("loss_below_unigram",), mode="reflow") for claim in (
        "sae.recon", "sae.kl", "sae.nfm_contribution", "sae.joint_vs_sequential", "sae.bimodal", "sae.factorial")},
}


def claim_control(claim_id: str, gates: dict[str, ModelControls], spike_model=None) -> Control:
    """The positive control of ``claim_id`` (:data:`CLAIM_GATES`) from the final checkpoints' controls ``gates``
    (family → :func:`trained_controls`), plus its spike-ins planted into ``spike_model`` (a trained reFlow)."""
    gate = CLAIM_GATES[claim_id]
    parts = []
    for name in gate.controls:
        if gate.mode in ("any", "all"):
            per_model = {f: gates[f].controls[name] for f in gate.families if f in gates}
            if gate.mode == "any":
                parts.append(any_model(per_model, name))
            else:
                parts.extend(Control(f"{c.name} ({f})", c.passed, c.detail, c.value, c.threshold)
                             for f, c in per_model.items())
        else:
            c = gates[gate.mode].controls[name]
            parts.append(Control(f"{c.name} ({gate.mode})", c.passed, c.detail, c.value, c.threshold))
    if spike_model is not None:
        parts += [SPIKES[name](spike_model) for name in gate.spikes]
    if len(parts) == 1:
        return parts[0]
    return Control(" + ".join(p.name for p in parts), all(p.passed for p in parts),
                   "; ".join(f"{p.name}: {'passed' if p.passed else 'FAILED'} ({p.detail})" for p in parts))


def final_gates(scale: str, results_dir=None, families=("reflow", "gpt2-new")) -> dict[str, ModelControls]:
    """:func:`trained_controls` of each family's first seed: what the chapters gate their claims on."""
    return {f: trained_controls(scale, f, results_dir) for f in families}
