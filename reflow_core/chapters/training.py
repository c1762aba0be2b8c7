"""Chapter 02, Training: reFlow, GPT-2-New and GPT-2 trained under one budget (same data, tokens, schedule and seed);
their loss curves, final losses, throughput and samples.  The checkpoints it leaves are the models every later
chapter analyses.

**The validation gap** (``training.val_gap``) is judged against its registered criterion with its measured noise, not a
fixed tolerance: where the scale trains at least :data:`MIN_SEEDS_T` seeds, a t-interval of the relative gap over
seeds; with fewer, a **paired bootstrap over validation windows** — both final models evaluated on the same fixed
windows, per-window losses, windows resampled together (:func:`paired_bootstrap_gap`).  Its positive control is the
competence gate: both models' validation loss clearly below the corpus's unigram entropy.  Two models that learned
nothing have the same loss, so a gap within the criterion says nothing about them either: where the gate fails the
row is not testable at this scale whatever the gap (:func:`val_gap_verdict`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from reflow_core import data
from reflow_core.chapters import ChapterResult
from reflow_core.experiments import controls
from reflow_core.experiments.common import seed_interval
from reflow_core.results import read_metrics
from reflow_core.runs import ensure_model, load_trained
from reflow_core.sample import sample
from reflow_core.scales import chapter_families, checkpoint_dir, data_dir_for, get_scale
from reflow_core.scorecard import NOT_TESTABLE, NOT_YET, Control, Row, against, criterion, decide

NAME = "training"
FAMILIES = ("reflow", "gpt2-new", "gpt2")
PROMPTS = ("The capital of France is", "In 1905, Albert Einstein", "The king and the queen")
COLOURS = {"reflow": "#4c72b0", "gpt2-new": "#dd8452", "gpt2": "#55a868"}
SAMPLE_TOKENS = 24
# greedy shows what a small model loops on; sampling (fixed seed, so the book is reproducible) shows the text it
# assigns probability to, which greedy decoding hides
DECODINGS = {"greedy": dict(temperature=0.0, top_k=None), "sampled (T = 0.8, top-40)": dict(temperature=0.8, top_k=40)}
MIN_SEEDS_T = 3  # a t-interval over training seeds from this many seeds; fewer: the paired window bootstrap
N_BOOT = 2000


def relative_gap_pct(loss: float, baseline: float) -> float:
    """(loss − baseline) / baseline in percent: the paper's way of stating the validation gap."""
    return 100 * (loss - baseline) / baseline


# ----------------------------------------------------------------------------------------------
# The validation gap with its measured noise


@dataclass
class GapEstimate:
    """The relative validation gap (%) of reFlow over GPT-2-New with a 95% interval, and where the interval is from."""

    gap_pct: float
    lo: float
    hi: float
    method: str  # "t-interval over 3 seeds" / "paired bootstrap over 320 validation windows (1 seed)"
    per_seed: list[float]

    def fmt(self) -> str:
        return f"{self.gap_pct:+.2f}% [{self.lo:+.2f}, {self.hi:+.2f}]"


def gap_over_seeds(reflow_losses: list[float], baseline_losses: list[float]) -> GapEstimate:
    """The gap of each seed's pair of models, as a t-interval over seeds."""
    gaps = [relative_gap_pct(r, b) for r, b in zip(reflow_losses, baseline_losses, strict=True)]
    iv = seed_interval(gaps)
    return GapEstimate(iv.mean, iv.lo, iv.hi, f"t-interval over {iv.n} seeds", gaps)


def paired_bootstrap_gap(reflow_windows: list[np.ndarray], baseline_windows: list[np.ndarray], *,
                         n_boot: int = N_BOOT, alpha: float = 0.05, seed: int = 0) -> GapEstimate:
    """The gap from per-window losses of both models on the *same* validation windows (one array per seed, windows
    in the same order): each draw resamples the windows, the same ones for both models and every seed, and averages
    the seeds' relative gaps — the interval holds the noise of which text was held out, not seed noise."""
    R, B = np.stack(reflow_windows).astype(np.float64), np.stack(baseline_windows).astype(np.float64)
    if R.shape != B.shape:
        raise ValueError(f"window losses must pair up: {R.shape} vs {B.shape}")
    n = R.shape[1]

    def gap(idx) -> float:
        r, b = R[:, idx].mean(1), B[:, idx].mean(1)
        return float(np.mean(100 * (r - b) / b))

    rng = np.random.default_rng(seed)
    boots = np.array([gap(rng.integers(0, n, n)) for _ in range(n_boot)])
    per_seed = [relative_gap_pct(r.mean(), b.mean()) for r, b in zip(R, B)]
    return GapEstimate(gap(np.arange(n)), float(np.quantile(boots, alpha / 2)), float(np.quantile(boots, 1 - alpha / 2)),
                       f"paired bootstrap over {n} validation windows ({R.shape[0]} seed(s))", per_seed)


def val_gap_verdict(estimate: GapEstimate, control: Control) -> str:
    """The verdict of ``training.val_gap``: where the gap's interval lies against the registered criterion
    (:func:`reflow_core.scorecard.against`), decided by :func:`reflow_core.scorecard.decide` — but only where both
    models passed the competence gate: models that learned nothing have equal losses and would meet the criterion
    by default (the gate is needed for either verdict, not only for "not reproduced")."""
    if not control.passed:
        return NOT_TESTABLE
    crit = criterion("training.val_gap")
    return decide(against(estimate.lo, estimate.hi, crit["threshold"], crit["direction"]), control)


@torch.no_grad()
def window_losses(model, tokens, block_size: int, batch_size: int, max_batches: int) -> np.ndarray:
    """Mean next-token loss of each fixed validation window (:func:`reflow_core.data.iter_eval_batches`), in order."""
    out = []
    for x, y in data.iter_eval_batches(tokens, batch_size, block_size, max_batches, device=model.device):
        h = model.norm_final(model.residual(x))
        out.extend(float(model.loss_from_hidden(h[i], y[i])) for i in range(x.shape[0]))
    return np.array(out)


def measure_val_gap(scale: str, results_dir=None, seeds=None, nproc: int | None = None) -> GapEstimate:
    """reFlow's gap to GPT-2-New at ``scale``: over its seeds (t-interval) where it trains :data:`MIN_SEEDS_T` or more,
    else by the paired window bootstrap on the training run's own validation windows (its batch size, block size and
    number of evaluation batches)."""
    spec = get_scale(scale)
    seeds = list(spec.seeds if seeds is None else seeds)
    if len(seeds) >= MIN_SEEDS_T:
        losses = {f: [ensure_model(scale, f, results_dir, seed, nproc)["final_val_loss"] for seed in seeds]
                  for f in ("reflow", "gpt2-new")}
        return gap_over_seeds(losses["reflow"], losses["gpt2-new"])
    tokens = data.load_tokens(data_dir_for(scale), "val")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = spec.train
    windows = {f: [] for f in ("reflow", "gpt2-new")}
    for seed in seeds:
        for f in windows:
            model, _ = load_trained(scale, f, results_dir, seed, device=device)
            windows[f].append(window_losses(model, tokens, t["block_size"], t["micro_batch_size"], t["eval_batches"]))
            del model
    return paired_bootstrap_gap(windows["reflow"], windows["gpt2-new"])


@dataclass(kw_only=True)
class Result(ChapterResult):
    summaries: dict  # family -> the training run's summary.json
    metrics: dict  # family -> metrics.jsonl as a DataFrame
    samples: list  # {"model", "prompt", "continuation"}
    seed: int
    data_source: str
    max_steps: int
    tokens_per_step: int
    val_gap: GapEstimate | None = None  # reFlow vs GPT-2-New with its measured noise (None: one of them not trained)
    not_trained: tuple = ()  # families the chapter compares that this scale does not train (its `families` budget)
    controls: dict = dataclasses.field(default_factory=dict)  # claim id -> its positive control
    unigram_entropy: float | None = None  # nats/token on the val split: the loss of a model that ignores context

    @property
    def val_loss(self) -> dict[str, float]:
        return {f: s["final_val_loss"] for f, s in self.summaries.items()}

    def gaps_pct(self) -> dict[str, float]:
        v, gaps = self.val_loss, {}
        if "reflow" in v and "gpt2-new" in v:
            gaps["reflow_vs_gpt2_new_pct"] = relative_gap_pct(v["reflow"], v["gpt2-new"])
        if "gpt2" in v and "gpt2-new" in v:
            gaps["gpt2_vs_gpt2_new_pct"] = relative_gap_pct(v["gpt2"], v["gpt2-new"])
        return gaps

    def table(self) -> pd.DataFrame:
        rows = [{
            "model": f, "preset": s["model"], "parameters (M)": round(s["num_params"] / 1e6, 2),
            "final val loss": round(s["final_val_loss"], 4), "final train loss": round(s["final_train_loss"], 4),
            "tokens/s": round(s["tokens_per_s"]), "wall (s)": round(s["wall_s"], 1),
            "MFU": None if s.get("mfu") is None else round(s["mfu"], 3),
        } for f, s in self.summaries.items()]
        return pd.DataFrame(rows).set_index("model")

    def to_json(self) -> dict:
        return {"scale": self.scale, "summaries": self.summaries, "gaps_pct": self.gaps_pct(), "seed": self.seed,
                "data": self.data_source, "unigram_entropy": self.unigram_entropy,
                "val_gap": dataclasses.asdict(self.val_gap) if self.val_gap else None,
                "controls": {claim: dataclasses.asdict(c) for claim, c in self.controls.items()}}

    def prose(self) -> dict[str, object]:
        p = {"scale": self.scale, "train_steps": f"{self.max_steps:,}",
             "train_tokens": f"{self.max_steps * self.tokens_per_step:,}", "train_data": self.data_source,
             "unigram_entropy": "not computed" if self.unigram_entropy is None else f"{self.unigram_entropy:.3f}"}
        for family in self.not_trained:  # the text still names them: say why there is no number
            key = family.replace("-", "_")
            p[f"val_loss_{key}"] = f"not trained at scale {self.scale}"
            p[f"tokens_per_s_{key}"] = "—"
        if "gpt2" in self.not_trained:
            p["gap_gpt2_gpt2_new"] = "no gap measured"
        for family, s in self.summaries.items():
            key = family.replace("-", "_")
            p[f"val_loss_{key}"] = f"{s['final_val_loss']:.3f}"
            p[f"tokens_per_s_{key}"] = f"{round(s['tokens_per_s']):,.0f}"
        gaps = self.gaps_pct()
        if "reflow_vs_gpt2_new_pct" in gaps:
            p["gap_reflow_gpt2_new"] = f"{gaps['reflow_vs_gpt2_new_pct']:+.1f}%"
        if "gpt2_vs_gpt2_new_pct" in gaps:
            p["gap_gpt2_gpt2_new"] = f"{gaps['gpt2_vs_gpt2_new_pct']:+.1f}%"
        if self.val_gap is not None:
            p["gap_interval"] = self.val_gap.fmt()
            p["gap_method"] = self.val_gap.method
        return p


def run(scale: str, results_dir=None, *, families=FAMILIES, nproc: int | None = None, prompts=PROMPTS) -> Result:
    """Train (once) and compare ``families``, those of them that the scale trains (its ``families`` budget)."""
    spec = get_scale(scale)
    not_trained = tuple(f for f in families if f not in chapter_families(scale, "training", families))
    families = chapter_families(scale, "training", families)
    summaries = {family: ensure_model(scale, family, results_dir, nproc=nproc) for family in families}
    runs = {family: checkpoint_dir(scale, family, results_dir) for family in families}
    samples = []
    for family in families:
        for prompt in prompts:
            for decoding, settings in DECODINGS.items():
                text = sample(runs[family], prompt, max_new_tokens=SAMPLE_TOKENS, num_samples=1, **settings)[0]
                samples.append({"model": family, "prompt": prompt, "decoding": decoding,
                                "continuation": text[len(prompt):] if text.startswith(prompt) else text})
    checkpoint = ", ".join(f"{f}-seed{spec.seeds[0]}@step{summaries[f]['steps']}" for f in families)
    gap, claim_controls = None, {"training.scaling": scaling_control(scale)}
    if "reflow" in families and "gpt2-new" in families:
        gap = measure_val_gap(scale, results_dir, nproc=nproc)
        claim_controls["training.val_gap"] = controls.claim_control("training.val_gap",
                                                                    controls.final_gates(scale, results_dir))
    return Result(scale=scale, checkpoint=checkpoint, summaries=summaries,
                  metrics={f: read_metrics(run) for f, run in runs.items()}, samples=samples, seed=spec.seeds[0],
                  data_source=spec.data_source, max_steps=summaries[families[0]]["steps"],  # one budget: same steps
                  tokens_per_step=spec.train["tokens_per_step"], val_gap=gap, controls=claim_controls,
                  not_trained=not_trained, unigram_entropy=data.unigram_entropy(data_dir_for(scale)))


def scaling_control(scale: str) -> Control:
    """training.scaling compares the paper's three model sizes (46M, 464M, 515M on OpenWebText); a scale that trains
    one size cannot show a scaling law, and no control at such a scale could say otherwise."""
    return Control("needs the paper's three sizes", passed=False,
                   detail=f"scale {scale} trains one size per family on {get_scale(scale).data_source}")


def plot(result: Result) -> dict:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for family, m in result.metrics.items():
        ax.plot(m["tokens"], m["train_loss"], color=COLOURS.get(family), alpha=0.45, lw=1.2)
        val = m.dropna(subset=["val_loss"])
        ax.plot(val["tokens"], val["val_loss"], "o-", color=COLOURS.get(family), label=f"{family} (validation)")
    if result.unigram_entropy is not None:
        ax.axhline(result.unigram_entropy, color="0.3", ls="--", lw=1,
                   label=f"unigram entropy of the corpus ({result.unigram_entropy:.2f})")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(f"Loss curves at scale {result.scale} (faint: training loss)")
    ax.legend()
    stamp = ", ".join(f"{f}-seed{result.seed}" for f in result.summaries)
    return {"fig-training-loss-curves": (fig, stamp)}


def samples_table(result: Result) -> pd.DataFrame:
    pd.set_option("display.max_colwidth", 120)
    return pd.DataFrame(result.samples)


def scorecard_rows(result: Result) -> list[Row]:
    scale, checkpoint, val_loss = result.scale, result.checkpoint, result.val_loss
    rows = []
    if result.val_gap is not None:
        g, control = result.val_gap, result.controls["training.val_gap"]
        crit = criterion("training.val_gap")
        verdict = val_gap_verdict(g, control)
        rows.append(Row(
            claim_id="training.val_gap",
            ours=(f"{g.fmt()} (val {val_loss['reflow']:.3f} vs {val_loss['gpt2-new']:.3f}, same depth and budget; "
                  f"{g.method})"),
            verdict=verdict,
            why=(f"criterion: gap {crit['direction']} {crit['threshold']:g}% with its 95% interval ({g.method})"
                 + ("" if control.passed else "; both models must first be clearly below the unigram entropy — "
                    "models that learned nothing have equal losses and would meet any gap criterion")),
            scale=scale, checkpoint=checkpoint, control=control,
        ))
    rows.append(Row(
        claim_id="training.scaling",
        ours="—",
        verdict=NOT_TESTABLE if scale != "paper" else NOT_YET,
        why="needs the 46M, 464M and 515M models on OpenWebText (the paper's three sizes)",
        scale=scale, checkpoint=checkpoint, control=result.controls.get("training.scaling", scaling_control(scale)),
    ))
    return rows
