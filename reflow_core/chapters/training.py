"""Chapter 02, Training: reFlow, GPT-2-New and GPT-2 trained under one budget (same data, tokens, schedule and seed);
their loss curves, final losses, throughput and samples.  The checkpoints it leaves are the models every later
chapter analyses."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from reflow_core.chapters import ChapterResult
from reflow_core.results import read_metrics
from reflow_core.runs import ensure_model
from reflow_core.sample import sample
from reflow_core.scales import checkpoint_dir, get_scale, preset_for
from reflow_core.scorecard import NOT_REPRODUCED, NOT_TESTABLE, NOT_YET, REPRODUCED, Row

NAME = "training"
FAMILIES = ("reflow", "gpt2-new", "gpt2")
PROMPTS = ("The capital of France is", "In 1905, Albert Einstein", "The king and the queen")
COLOURS = {"reflow": "#4c72b0", "gpt2-new": "#dd8452", "gpt2": "#55a868"}
SAMPLE_TOKENS = 24

# The paper reports reFlow ~1% above GPT-2-New at matched depth. One seed of a small model moves by a
# few tenths of a percent to a few percent between seeds, so a gap up to this many percentage points
# above the paper's figure (or any negative gap) counts as the same result.
VAL_GAP_TOLERANCE_PCT = 2.0
PAPER_VAL_GAP_PCT = 1.0


def relative_gap_pct(loss: float, baseline: float) -> float:
    """(loss − baseline) / baseline in percent: the paper's way of stating the validation gap."""
    return 100 * (loss - baseline) / baseline


@dataclass(kw_only=True)
class Result(ChapterResult):
    summaries: dict  # family -> the training run's summary.json
    metrics: dict  # family -> metrics.jsonl as a DataFrame
    samples: list  # {"model", "prompt", "continuation"}
    seed: int
    data_source: str
    max_steps: int
    tokens_per_step: int

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
                "data": self.data_source}

    def prose(self) -> dict[str, object]:
        p = {"scale": self.scale, "train_steps": f"{self.max_steps:,}",
             "train_tokens": f"{self.max_steps * self.tokens_per_step:,}", "train_data": self.data_source}
        for family, s in self.summaries.items():
            key = family.replace("-", "_")
            p[f"val_loss_{key}"] = f"{s['final_val_loss']:.3f}"
            p[f"tokens_per_s_{key}"] = f"{round(s['tokens_per_s']):,.0f}"
        gaps = self.gaps_pct()
        if "reflow_vs_gpt2_new_pct" in gaps:
            p["gap_reflow_gpt2_new"] = f"{gaps['reflow_vs_gpt2_new_pct']:+.1f}%"
        if "gpt2_vs_gpt2_new_pct" in gaps:
            p["gap_gpt2_gpt2_new"] = f"{gaps['gpt2_vs_gpt2_new_pct']:+.1f}%"
        return p


def run(scale: str, results_dir=None, *, families=FAMILIES, nproc: int | None = None, prompts=PROMPTS) -> Result:
    spec = get_scale(scale)
    summaries = {family: ensure_model(scale, family, results_dir, nproc=nproc) for family in families}
    runs = {family: checkpoint_dir(scale, family, results_dir) for family in families}
    samples = []
    for family in families:
        for prompt in prompts:
            text = sample(runs[family], prompt, max_new_tokens=SAMPLE_TOKENS, temperature=0.0, num_samples=1)[0]
            samples.append({"model": family, "prompt": prompt,
                            "continuation": text[len(prompt):] if text.startswith(prompt) else text})
    checkpoint = ", ".join(f"{f}-seed{spec.seeds[0]}@step{summaries[f]['steps']}" for f in families)
    return Result(scale=scale, checkpoint=checkpoint, summaries=summaries,
                  metrics={f: read_metrics(run) for f, run in runs.items()}, samples=samples, seed=spec.seeds[0],
                  data_source=spec.data_source, max_steps=spec.train["max_steps"],
                  tokens_per_step=spec.train["tokens_per_step"])


def plot(result: Result) -> dict:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for family, m in result.metrics.items():
        ax.plot(m["tokens"], m["train_loss"], color=COLOURS.get(family), alpha=0.45, lw=1.2)
        val = m.dropna(subset=["val_loss"])
        ax.plot(val["tokens"], val["val_loss"], "o-", color=COLOURS.get(family), label=f"{family} (validation)")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(f"Loss curves at scale {result.scale} (faint: training loss)")
    ax.legend()
    stamp = ", ".join(f"{f}-seed{result.seed}" for f in result.summaries)
    return {"fig-training-loss-curves": (fig, stamp)}


def samples_table(result: Result) -> pd.DataFrame:
    pd.set_option("display.max_colwidth", 120)
    return pd.DataFrame(result.samples)


def scorecard_rows(result: Result, n_seeds: int = 1) -> list[Row]:
    scale, checkpoint, val_loss = result.scale, result.checkpoint, result.val_loss
    rows = []
    if "reflow" in val_loss and "gpt2-new" in val_loss:
        gap = relative_gap_pct(val_loss["reflow"], val_loss["gpt2-new"])
        held = gap <= PAPER_VAL_GAP_PCT + VAL_GAP_TOLERANCE_PCT
        rows.append(Row(
            claim_id="training.val_gap",
            ours=f"{gap:+.2f}% (val {val_loss['reflow']:.3f} vs {val_loss['gpt2-new']:.3f}, same depth and budget)",
            verdict=REPRODUCED if held else NOT_REPRODUCED,
            why=(f"{n_seeds} seed(s); tolerance {VAL_GAP_TOLERANCE_PCT:g} points above the paper's gap for seed noise"
                 if held else f"gap exceeds the paper's +1% by more than {VAL_GAP_TOLERANCE_PCT:g} points ({n_seeds} seed(s))"),
            scale=scale, checkpoint=checkpoint,
        ))
    rows.append(Row(
        claim_id="training.scaling",
        ours="—",
        verdict=NOT_TESTABLE if scale != "paper" else NOT_YET,
        why="needs the 464M and 515M models on OpenWebText (paper scale)",
        scale=scale, checkpoint=checkpoint,
    ))
    return rows
