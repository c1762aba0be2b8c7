"""Chapter 10, Cost: the training step and forward pass of the scale's models timed against a reference loop and
GPT-2-New (:mod:`reflow_core.bench`, interleaved repeats), stored GPU bench results, and the wall time of every
chapter of the book run (``RUN.json``).  It runs last, so that the book runner's record is complete."""

from __future__ import annotations

from dataclasses import dataclass

from reflow_core.bench import chapter_times, plot_bench, rows_frame, run_bench, stored_gpu_results
from reflow_core.chapters import ChapterResult
from reflow_core.config import ModelConfig, get_config
from reflow_core.scales import budget, get_scale, results_dir_for
from reflow_core.sweep import plot_sweep, stored_sweep

NAME = "cost"
REFERENCE_TARGET = 1.3  # the target: our step at least 1.3× the reference loop's throughput
FACTORISATION_TARGET = 1.0  # reFlow at least as fast as GPT-2-New
UNTRAINED = "untrained (timing only)"  # what the throughput figure is stamped with
BOOK_RUN = "book run"  # what the chapter-time figure is stamped with
SWEEP_SCALE = "smoke"  # the default scale, whose recipe a stored sweep chose; shown at every scale


def bench_verdict(r: dict, target: float) -> str:
    """What a bench ratio ``{"median", "min", "max"}`` (ours / other, per repeat) says against ``target``."""
    if r["median"] >= target:
        return f"meets the issue's {target:g}× target on this run"
    if r["min"] > 1.0:
        return f"faster in every repeat, but short of the issue's {target:g}× target"
    if r["max"] < 1.0:
        return f"slower in every repeat: the issue's {target:g}× target is missed"
    return (f"within this machine's noise of parity (the per-repeat ratios straddle 1): the issue's {target:g}× "
            "target is missed")


@dataclass(kw_only=True)
class Result(ChapterResult):
    preset: str  # the benched model, e.g. reflow@smoke
    bench: list  # [training step, forward pass, and (compact-vocabulary scales) recipe] results of run_bench
    gpu_bench: list  # stored GPU bench results (reflow_core/assets/bench/), [] when there are none
    chapter_times: dict | None  # reflow_core.bench.chapter_times (None: the chapter ran alone)
    bench_config: ModelConfig
    sweep: dict | None = None  # the scale's learning-rate × batch sweep (reflow_core/assets/sweeps/), if stored

    @property
    def recipe(self) -> dict | None:
        """The bench of the scale's training recipe against its shape over the full vocabulary in fp32."""
        return next((b for b in self.bench if b["mode"] == "recipe"), None)

    def to_json(self) -> dict:
        return {"scale": self.scale, "bench": self.bench, "gpu_bench": self.gpu_bench,
                "chapter_times": self.chapter_times, "sweep": self.sweep}

    def prose(self) -> dict[str, object]:
        train, infer = self.bench[:2]
        machine, s = train["machine"], train["settings"]
        ratio_ref, ratio_fact = train["ratios"]
        ours = train["rows"][0]
        c = self.bench_config
        return {
            "scale": self.scale,
            "machine": (f"{machine['cpu']} ({machine['cpu_count']} cores, {s['threads']} torch threads, torch "
                        f"{machine['torch']})" if machine["gpu"] is None
                        else f"{machine['gpu']} (torch {machine['torch']})"),
            "load": ", ".join(str(x) for x in machine["load_average"] or []) or "unknown",
            "shape": f"{s['batch']} × {s['block']}",
            "repeats": f"{s['repeats']} repeats of {s['steps']} steps",
            "ratio_ref": f"{ratio_ref['median']:.2f}×",
            "ratio_ref_range": f"{ratio_ref['min']:.2f}–{ratio_ref['max']:.2f}×",
            "ratio_fact": f"{ratio_fact['median']:.2f}×",
            "ratio_fact_range": f"{ratio_fact['min']:.2f}–{ratio_fact['max']:.2f}×",
            "ratio_ref_verdict": bench_verdict(ratio_ref, REFERENCE_TARGET),
            "ratio_fact_verdict": bench_verdict(ratio_fact, FACTORISATION_TARGET),
            "ours_tok_s": f"{ours['tokens_per_s']['median']:,.0f}",
            "infer_tok_s": f"{infer['rows'][0]['tokens_per_s']['median']:,.0f}",
            "gflop_token": f"{ours['flops_per_token'] / 1e9:.3f}",
            "mfu_note": ("not computed: no peak FLOP/s is known for this CPU (set REFLOW_PEAK_FLOPS to state one)"
                         if ours["mfu"] is None else f"{100 * ours['mfu']:.1f}%"),
            "head_shape": f"a {c.vocab_size:,}-token (padded) vocabulary and d = {c.d_model}, S = {c.n_signals}",
            **self._recipe_prose(), **self._sweep_prose(),
        }

    def _recipe_prose(self) -> dict[str, object]:
        compact = get_config(f"reflow@{SWEEP_SCALE}").compact_vocab
        out = {"compact_k": f"{compact:,}"}
        if self.recipe is None:
            return {**out, "recipe_summary": f"Scale {self.scale} trains over the full vocabulary, so this run "
                                             "timed no second recipe."}
        full, chosen = self.recipe["rows"]
        ratio = self.recipe["ratios"][0]
        return {**out, "recipe_summary": (
            f"In the same interleaved run, a training step of the scale's recipe, {chosen['label']}, does "
            f"{chosen['tokens_per_s']['median']:,.0f} tokens/s against {full['tokens_per_s']['median']:,.0f} for "
            f"{full['label']}: {ratio['median']:.2f}× (per-repeat range {ratio['min']:.2f}–{ratio['max']:.2f}×).")}

    def _sweep_prose(self) -> dict[str, object]:
        if self.sweep is None:
            return {"sweep_summary": f"no learning-rate sweep is stored for scale {SWEEP_SCALE}."}
        best, sw = self.sweep["best"], self.sweep
        return {"sweep_summary": (
            f"{len(sw['points'])} runs of {sw['preset']} on {sw['data_dir']}, {sw['tokens']:,} tokens each "
            f"({sw['machine']['threads']} thread, {sw['date']}); the lowest validation loss, {best['val_loss']:.3f}, "
            f"came from a peak learning rate of {best['lr']:g} at {best['tokens_per_step']:,} tokens per step, "
            "the recipe the smoke scale trains with.")}


def run(scale: str, results_dir=None, *, threads="auto") -> Result:
    """Bench a training step (ours, reference, GPT-2-New) and a forward pass of ``reflow`` at the scale's size with
    ``budget(scale, "bench")``; read the stored GPU results and the book run's chapter times."""
    results_dir = results_dir_for(scale, results_dir)
    settings = budget(scale, "bench")
    preset = f"reflow@{get_scale(scale).size}"
    config = get_config(preset)
    modes = ("all", "infer") + (("recipe",) if config.compact_vocab else ())
    bench = [run_bench(preset, mode, steps=settings["steps"], warmup=settings["warmup"], repeats=settings["repeats"],
                       batch=settings["batch"], threads=threads) for mode in modes]
    return Result(scale=scale, checkpoint=UNTRAINED, preset=preset, bench=bench, gpu_bench=stored_gpu_results(),
                  chapter_times=chapter_times(results_dir), bench_config=config,
                  sweep=stored_sweep(SWEEP_SCALE))


def bench_table(result: Result):
    """Every bench row (training step and forward pass) as one table."""
    return rows_frame(result.bench)


def gpu_table(result: Result):
    """The stored GPU bench results as a table, or None (after saying so) when the book was built without one."""
    if not result.gpu_bench:
        print("No GPU bench result is stored in reflow_core/assets/bench/: this book was built without a GPU run, "
              "so it reports no GPU throughput and no GPU MFU.")
        return None
    print("Stored GPU bench results (reflow_core/assets/bench/):")
    return rows_frame(result.gpu_bench)


def chapter_seconds(result: Result):
    """Wall seconds per chapter of the book run, longest first (a pandas Series), or None when the chapter ran
    alone."""
    import pandas as pd

    if result.chapter_times is None:
        return None
    return pd.Series(result.chapter_times["chapters"], name="seconds").sort_values(ascending=False)


def chapter_times_table(result: Result):
    """The book run's wall time per chapter in seconds and minutes, or None (after saying so) when the chapter ran
    on its own."""
    split = chapter_seconds(result)
    if split is None:
        print("No RUN.json in the results folder: this chapter ran on its own, not through the book runner, "
              "so there is no per-chapter wall time to show.")
        return None
    return split.to_frame().assign(minutes=lambda d: (d.seconds / 60).round(2))


def plot(result: Result) -> dict:
    import matplotlib.pyplot as plt

    machine = result.bench[0]["machine"]
    fig = plot_bench(result.bench)
    fig.axes[0].set_title(f"Throughput at scale {result.scale} on {machine['gpu'] or machine['cpu']}")
    figures = {"fig-cost-throughput": fig}
    if result.sweep is not None:
        figures["fig-cost-sweep"] = (plot_sweep(result.sweep), "sweep runs (" + result.sweep["date"] + ")")
    split = chapter_seconds(result)
    if split is not None:
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(split) + 1.2))
        ax.barh(split.index, split.values / 60, color="#55a868")
        ax.invert_yaxis()
        ax.set_xlabel("wall time (minutes)")
        ax.set_title(f"Book at scale {result.chapter_times['scale']}: "
                     f"{result.chapter_times['total_seconds'] / 60:.1f} min in all")
        fig.tight_layout()
        figures["fig-cost-chapters"] = (fig, BOOK_RUN)
    return figures


def scorecard_rows(result: Result) -> list:
    """The Cost chapter measures; it decides no claim of the paper."""
    return []
