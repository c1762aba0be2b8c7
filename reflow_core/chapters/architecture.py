"""Chapter 01, Architecture: the model family, the paper's parameter counts, and the two exact orders of the
factored head."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from reflow_core.chapters import ChapterResult
from reflow_core.config import FAMILIES, PAPER_PRESETS, PUBLISHED_PARAMS_M, SIZES, get_config
from reflow_core.model import build_model, parameter_breakdown
from reflow_core.scales import get_scale
from reflow_core.scorecard import Row, against, criterion, decide, no_control_possible
from reflow_core.vocab import head_costs

NAME = "architecture"
PARTS = ("vocabulary", "positions", "attention", "mlp", "norms")
HEAD_ORDER_TOKENS = np.unique(np.logspace(0, 6, 60).astype(int))  # N, tokens in one forward pass


@dataclass(kw_only=True)
class Result(ChapterResult):
    presets: pd.DataFrame  # one row per paper preset: shape, our count, the published count, where it lives
    families: pd.DataFrame  # every family at every size of our scales
    head_costs: dict  # label -> {"signals_first": [...], "embedding_first": [...]} per token, over HEAD_ORDER_TOKENS

    @property
    def n_match(self) -> int:
        return int(self.presets["match"].sum())

    def crossover(self, label: str) -> int | None:
        """The smallest N at which the embedding-first order is cheaper (None: never in the range)."""
        c = self.head_costs[label]
        cheaper = np.asarray(c["embedding_first"]) < np.asarray(c["signals_first"])
        return int(HEAD_ORDER_TOKENS[np.argmax(cheaper)]) if cheaper.any() else None

    def to_json(self) -> dict:
        return {"paper_presets": self.presets.to_dict(orient="records"), "n_match": self.n_match,
                "families": self.families.to_dict(orient="records")}

    def prose(self) -> dict[str, object]:
        p = {"scale": self.scale, "arch_params_match": f"{self.n_match} of {len(self.presets)}",
             "arch_crossover_paper": f"{self.crossover('reflow-1-big (paper)'):,}"}
        for _, row in self.presets.iterrows():
            p[f"params_{row['preset'].replace('-', '_')}"] = f"{row['ours (M)']:.2f}M"
        return p


def preset_table() -> pd.DataFrame:
    rows = []
    for name in PAPER_PRESETS:
        config = get_config(name)
        model = build_model(config, "meta")
        n = model.num_params()
        rows.append({
            "preset": name, "layers": config.n_layer, "d_model": config.d_model,
            "signals S": config.n_signals or "—", "kv heads": config.kv_heads, "MLP width": config.hidden_dim,
            "vocabulary": config.vocab_style, "parameters": n, "ours (M)": round(n / 1e6, 2),
            "published (M)": PUBLISHED_PARAMS_M[name],
            **{f"{k} (M)": round(v / 1e6, 2) for k, v in parameter_breakdown(model).items()},
        })
    table = pd.DataFrame(rows)
    table["match"] = table["ours (M)"] == table["published (M)"]
    return table


def family_table() -> pd.DataFrame:
    rows = []
    for size in SIZES:
        for family in FAMILIES:
            config = get_config(f"{family}@{size}")
            rows.append({
                "preset": f"{family}@{size}", "layers": config.n_layer, "d_model": config.d_model,
                "heads (kv)": f"{config.n_head} ({config.kv_heads})", "signals S": config.n_signals or "—",
                "block": config.block_style, "vocabulary": config.vocab_style,
                "parameters (M)": round(build_model(config, "meta").num_params() / 1e6, 2),
            })
    return pd.DataFrame(rows)


def run(scale: str, results_dir=None) -> Result:
    paper = get_config("reflow-1-big")
    size = get_scale(scale).size
    ours = get_config(f"reflow@{size}") if size != "paper" else paper
    costs = {}
    for config, label in ((paper, "reflow-1-big (paper)"), (ours, f"reflow at scale {scale}")):
        per = [head_costs(config.vocab_size, config.n_signals, config.d_model, int(n)) for n in HEAD_ORDER_TOKENS]
        costs[label] = {order: (np.array([c[order] for c in per]) / HEAD_ORDER_TOKENS).tolist()
                        for order in ("signals_first", "embedding_first")}
    return Result(scale=scale, checkpoint="none (meta device)", presets=preset_table(), families=family_table(),
                  head_costs=costs)


def shown_presets(result: Result) -> pd.DataFrame:
    return result.presets[["preset", "layers", "d_model", "signals S", "kv heads", "MLP width", "vocabulary",
                           "parameters", "ours (M)", "published (M)", "match"]]


def plot(result: Result) -> dict:
    import matplotlib.pyplot as plt

    table = result.presets
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    left = np.zeros(len(table))
    for part, colour in zip(PARTS, ["#4c72b0", "#8172b3", "#dd8452", "#55a868", "#937860"]):
        ax.barh(table["preset"], table[f"{part} (M)"], left=left, label=part, color=colour)
        left += table[f"{part} (M)"].to_numpy()
    for y, (ours, pub) in enumerate(zip(table["ours (M)"], table["published (M)"])):
        ax.text(ours + 5, y, f"{ours:.2f}M (paper {pub:.2f}M)", va="center", fontsize=8)
    ax.set_xlabel("parameters (millions)")
    ax.set_xlim(0, table["ours (M)"].max() * 1.45)
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Where the parameters of the paper's configurations live")
    breakdown = fig

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for (label, costs), style in zip(result.head_costs.items(), ("-", "--")):
        ax.loglog(HEAD_ORDER_TOKENS, costs["signals_first"], style, color="#4c72b0", label=f"signals first — {label}")
        ax.loglog(HEAD_ORDER_TOKENS, costs["embedding_first"], style, color="#dd8452",
                  label=f"embedding first — {label}")
    ax.set_xlabel("tokens in one forward pass (N)")
    ax.set_ylabel("multiply-adds per token")
    ax.legend(fontsize=7.5)
    ax.set_title("Cost of the two exact orders of the factored head")
    return {"fig-architecture-param-breakdown": breakdown, "fig-architecture-head-order": (fig, "none (analytic)")}


def scorecard_rows(result: Result) -> list[Row]:
    n_total = len(result.presets)
    share = result.n_match / n_total
    return [Row(
        claim_id="arch.params",
        ours=f"{result.n_match}/{n_total} exact to two decimals",
        verdict=decide(against(share, share, criterion("arch.params")["threshold"]),
                       no_control_possible("a parameter count is exact, not an effect a test could miss")),
        why="counted by instantiating each config on the meta device (nanoGPT conventions, SwiGLU width rule)",
        scale=result.scale, checkpoint=result.checkpoint,
        control=no_control_possible("a parameter count is exact, not an effect a test could miss"),
    )]
