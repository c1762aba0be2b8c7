"""Bench: what a training step and a forward pass cost on this machine, and how our loop compares.

    python -m reflow_core bench --preset reflow@smoke                       # our training step
    python -m reflow_core bench --preset reflow@smoke --mode infer          # forward pass (no grad)
    python -m reflow_core bench --preset reflow@smoke --mode side-by-side   # ours vs the plain reference loop
    python -m reflow_core bench --preset reflow@smoke --mode factorisation  # reflow vs gpt2-new, same d and depth
    python -m reflow_core bench --preset reflow@smoke --mode all            # the three loops above, interleaved
    python -m reflow_core bench --preset reflow@smoke --mode recipe         # the scale's recipe vs full vocab, fp32

Method.  Every loop first runs ``warmup`` steps (not timed: allocator, caches, and ``torch.compile`` when asked, whose
time is reported separately as ``compile_s``).  Then ``repeats`` timed repeats of ``steps`` steps each; a repeat's
throughput is ``steps · batch · block / seconds``, and the table reports its median, min and max over repeats.
Batches are synthetic (uniform GPT-2 ids, a fixed seed), built on the device before timing, so data loading
never enters the measurement; both loops of a comparison see the same batches and start from the same weights.
When two loops are compared, their repeats are *interleaved* (A B A B …) so that machine noise (other processes,
frequency changes) falls on both, and the ratio is taken repeat by repeat (median, min, max of the per-repeat ratios).

MFU = tokens/s · FLOPs per token / peak FLOP/s, with FLOPs per token from :meth:`reflow_core.model.GPT.flops_per_token`
(forward + backward, factored head included, in the order our head actually uses).  The peak comes from
:func:`reflow_core.device.peak_flops` (a table of GPUs, or ``REFLOW_PEAK_FLOPS``); on a CPU it is null unless that
variable is set.  For the reference loop we state the *same* model FLOPs (it does the same useful work, slower); for
inference MFU uses a third of the training FLOPs (forward only).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` per loop; on CPU the process's peak resident set size
(``getrusage``), which covers the whole process and only ever grows — read it as an upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from reflow_core.config import ConfigError, get_config
from reflow_core.model import GPT, build_model
from reflow_core.reference_loop import ReferenceLoop
from reflow_core.device import autocast_for, peak_flops
from reflow_core.train import make_optimizer

SCHEMA_VERSION = 1
MODES = ("train", "infer", "side-by-side", "factorisation", "all", "recipe")
ASSETS_BENCH = Path(__file__).resolve().parent / "assets" / "bench"


# ======================================================================================================================
# The machine
# ======================================================================================================================


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on: CPU model, cores, threads, torch, GPU, load at the start."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "load_average": load,
    }
    return info


def auto_threads() -> int:
    """Threads for a CPU run on a shared machine: the cores not already busy (1-minute load average), at least 1.

    Torch's intra-op pool waits for its slowest thread, so on an oversubscribed machine more threads than free cores
    is slower, not faster (measured here: reflow@smoke ran about 2× faster on 1 thread than on 2 at load ≈ 5 on 2
    cores).  On an idle machine this is every core.
    """
    cores = os.cpu_count() or 1
    try:
        busy = int(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, min(torch.get_num_threads(), cores - busy))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024), "process_rss_peak"


# ======================================================================================================================
# The loops being timed
# ======================================================================================================================


class OurLoop:
    """The step of :func:`reflow_core.train.train`, one micro-batch: autocast forward, backward, clip, AdamW.

    ``fused`` is :class:`reflow_core.config.TrainConfig`'s field (default: fused AdamW on CPU as well as CUDA);
    ``--no-fused`` times the foreach implementation instead.
    """

    name = "ours"

    def __init__(self, model: GPT, device: torch.device, dtype: torch.dtype, *, compile: bool = False,
                 grad_clip: float = 1.0, fused: bool = True) -> None:
        from reflow_core.config import TrainConfig

        self.raw_model = model
        self.model = torch.compile(model) if compile else model
        self.grad_clip = grad_clip
        self.optimizer = make_optimizer(model, TrainConfig(model="reflow@test", grad_clip=grad_clip, fused=fused),
                                        device.type)
        self.autocast = autocast_for(device.type, dtype)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.model.train()
        with self.autocast():
            _, loss = self.model(x, y, return_logits=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(),
                                       self.grad_clip if self.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        with self.autocast():
            return self.model(x)[0]


class RefLoop(ReferenceLoop):
    """The reference loop with the bench's interface."""

    name = "reference"


@dataclass
class Timed:
    """One loop under test: a label, the callable for one step, and the model it runs."""

    label: str
    preset: str
    loop: str  # "ours" | "reference"
    model: GPT
    run: Callable[[torch.Tensor, torch.Tensor], object]
    samples: list  # tokens/s per repeat
    compile_s: float | None = None
    warmup_s: float = 0.0
    peak_memory: int | None = None
    peak_memory_kind: str | None = None
    batches: list | None = None  # its own batches (the same sequences in other ids); None: the shared ones


def make_batches(n: int, batch: int, block: int, vocab: int, device: torch.device, seed: int = 0):
    """``n`` synthetic (x, y) batches of uniform token ids, built up front on the device."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(vocab, (batch, block + 1), generator=gen)
        out.append((tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)))
    return out


def _resolve(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench --device cuda but no CUDA device is available")
    dev = torch.device(device)
    if dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    return dev, dt


def default_shape(preset: str) -> tuple[int, int]:
    """(batch, block) of one micro-batch: the scale's training settings for ``family@size``, else 16 × block_size."""
    from reflow_core.scales import get_scale

    config = get_config(preset)
    if "@" in preset:
        try:
            spec = get_scale(preset.split("@", 1)[1]).train
            return spec["micro_batch_size"], spec.get("block_size") or config.block_size
        except Exception:  # noqa: BLE001 - a size without a book scale: fall back
            pass
    return 16, config.block_size


# ======================================================================================================================
# Running
# ======================================================================================================================


def _build(preset: str, device: torch.device, seed: int) -> GPT:
    torch.manual_seed(seed)
    model = build_model(get_config(preset), "cpu").to(device)
    if model.config.compact_vocab:  # which ids own the rows changes nothing in a step's cost
        model.vocab.set_kept_ids(torch.arange(model.config.compact_vocab))
    return model


def full_vocabulary_preset(preset: str) -> str:
    """The preset's shape over the full GPT-2 vocabulary: ``reflow@smoke`` → ``reflow@smoke-full``."""
    return preset if get_config(preset).compact_vocab == 0 else f"{preset}-full"


def _vocab_label(preset: str) -> str:
    k = get_config(preset).compact_vocab
    return f"compact vocabulary, {k:,} own rows + tail" if k else "full vocabulary"


def _time_interleaved(timed: list[Timed], batches, *, phase: str, steps: int, warmup: int, repeats: int,
                      device: torch.device) -> None:
    """Warm each loop up, then time repeats A B A B …, appending tokens/s to each loop's samples."""
    tokens_per_step = batches[0][0].numel()
    shared = batches
    for t in timed:
        batches = t.batches or shared
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for i in range(warmup):
            x, y = batches[i % len(batches)]
            t1 = time.perf_counter()
            t.run(x, y) if phase == "train" else t.run(x)
            _sync(device)
            if i == 0 and t.compile_s is not None:
                t.compile_s = time.perf_counter() - t1  # first call of a compiled model: tracing + codegen
        t.warmup_s = time.perf_counter() - t0
    for _ in range(repeats):
        for t in timed:
            batches = t.batches or shared
            _sync(device)
            t0 = time.perf_counter()
            for i in range(steps):
                x, y = batches[i % len(batches)]
                t.run(x, y) if phase == "train" else t.run(x)
            _sync(device)
            t.samples.append(steps * tokens_per_step / (time.perf_counter() - t0))
            t.peak_memory, t.peak_memory_kind = _peak_memory(device)


def _row(t: Timed, *, phase: str, batch: int, block: int, peak: float | None) -> dict:
    s = t.samples
    fpt = t.model.flops_per_token(block, tokens_per_forward=batch * block)
    if phase == "infer":
        fpt = fpt / 3.0
    med = statistics.median(s)
    return {
        "label": t.label,
        "preset": t.preset,
        "loop": t.loop,
        "phase": phase,
        "num_params": t.model.num_params(),
        "tokens_per_s": {"median": med, "min": min(s), "max": max(s), "samples": s},
        "step_s_median": batch * block / med,
        "flops_per_token": fpt,
        "mfu": fpt * med / peak if peak else None,
        "peak_memory_bytes": t.peak_memory,
        "peak_memory_kind": t.peak_memory_kind,
        "compile_s": t.compile_s,
        "warmup_s": t.warmup_s,
    }


def _ratio(name: str, a: Timed, b: Timed) -> dict:
    r = [x / y for x, y in zip(a.samples, b.samples)]
    return {"name": name, "numerator": a.label, "denominator": b.label,
            "median": statistics.median(r), "min": min(r), "max": max(r), "samples": r}


def run_bench(preset: str = "reflow@smoke", mode: str = "train", *, steps: int = 10, warmup: int = 3,
              repeats: int = 5, batch: int | None = None, block: int | None = None, device: str = "auto",
              dtype: str = "auto", compile: bool = False, threads: int | str | None = None, seed: int = 1337,
              fused: bool = True) -> dict:
    """Run one bench mode; returns the JSON-ready result (machine, settings, rows, ratios)."""
    if mode not in MODES:
        raise ConfigError(f"bench --mode must be one of {MODES}, got {mode!r}")
    if min(steps, repeats) < 1 or warmup < 0:
        raise ConfigError("bench needs steps >= 1, repeats >= 1 and warmup >= 0")
    previous_threads = torch.get_num_threads()
    if threads == "auto":
        threads = auto_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        dev, dt = _resolve(device, dtype)
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        config = get_config(preset)
        B0, T0 = default_shape(preset)
        B, T = batch or B0, block or T0
        if T > config.block_size:
            raise ConfigError(f"bench --block {T} exceeds the model's block_size {config.block_size}")
        phase = "infer" if mode == "infer" else "train"
        batches = make_batches(min(steps, 8), B, T, config.real_vocab_size, dev, seed)

        def ours(p: str, label: str, dtype: torch.dtype | None = None) -> Timed:
            m = _build(p, dev, seed)
            loop = OurLoop(m, dev, dtype or dt, compile=compile, fused=fused)
            return Timed(label, p, "ours", m, loop.step if phase == "train" else loop.infer, [],
                         compile_s=0.0 if compile else None)

        def reference(p: str, label: str) -> Timed:
            m = _build(p, dev, seed)
            loop = RefLoop(m, dtype=dt)
            return Timed(label, p, "reference", m, loop.step if phase == "train" else loop.infer, [])

        ratios = []
        if mode in ("train", "infer"):
            timed = [ours(preset, "ours")]
        elif mode == "side-by-side":
            timed = [ours(preset, "ours"), reference(preset, "reference")]
        else:
            family, _, size = preset.partition("@")
            other = f"gpt2-new@{size}" if size else "gpt2-new"
            if family == "gpt2-new" and mode != "recipe":
                raise ConfigError(f"bench --mode {mode} compares a reFlow preset with gpt2-new; "
                                  "pass e.g. --preset reflow@smoke")
            if mode == "recipe":
                # the preset as its scale trains it (a compact vocabulary at smoke, in the precision `auto` picks)
                # against the same shape over the full GPT-2 vocabulary in float32: the smoke recipe before
                full = ours(full_vocabulary_preset(preset), f"{full_vocabulary_preset(preset)} (full vocabulary, fp32)",
                            dtype=torch.float32)
                chosen = ours(preset, f"{preset} ({_vocab_label(preset)}, {str(dt).removeprefix('torch.')})")
                timed = [full, chosen]
            elif mode == "factorisation":
                timed = [ours(preset, preset), ours(other, other)]
            else:
                timed = [ours(preset, "ours"), reference(preset, "reference"), ours(other, other)]
        _time_interleaved(timed, batches, phase=phase, steps=steps, warmup=warmup, repeats=repeats, device=dev)
        if mode in ("side-by-side", "all"):
            ratios.append(_ratio("ours / reference", timed[0], timed[1]))
        if mode in ("factorisation", "all"):
            ratios.append(_ratio(f"{preset} / {timed[-1].label}", timed[0], timed[-1]))
        if mode == "recipe":
            ratios.append(_ratio("recipe / full vocabulary fp32", timed[1], timed[0]))
        peak = peak_flops(dev, dt)
        return {
            "schema_version": SCHEMA_VERSION,
            "mode": mode,
            "preset": preset,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine_info(dev),
            "settings": {"steps": steps, "warmup": warmup, "repeats": repeats, "batch": B, "block": T,
                         "tokens_per_step": B * T, "dtype": str(dt).removeprefix("torch."), "compile": compile,
                         "threads": torch.get_num_threads(), "seed": seed, "fused": fused,
                         "data": "synthetic uniform token ids, pre-built on the device"},
            "peak_flops": peak,
            "rows": [_row(t, phase=phase, batch=B, block=T, peak=peak) for t in timed],
            "ratios": ratios,
        }
    finally:
        torch.set_num_threads(previous_threads)


# ======================================================================================================================
# Reading and showing results
# ======================================================================================================================


def format_table(result: dict) -> str:
    """A plain-text table of one bench result (what the CLI prints)."""
    lines = [f"bench {result['mode']} | {result['preset']} | {result['machine']['device']}"
             f" ({result['machine']['gpu'] or result['machine']['cpu']}, {result['settings']['threads']} threads) | "
             f"batch {result['settings']['batch']} × block {result['settings']['block']} | "
             f"{result['settings']['repeats']} repeats × {result['settings']['steps']} steps"]
    head = f"{'label':<18} {'phase':<6} {'tok/s median':>13} {'min':>10} {'max':>10} {'MFU':>7} {'peak mem':>10}"
    lines += [head, "-" * len(head)]
    for r in result["rows"]:
        t = r["tokens_per_s"]
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_memory_bytes'] / 2**20:.0f} MiB" if r["peak_memory_bytes"] else "n/a"
        lines.append(f"{r['label']:<18} {r['phase']:<6} {t['median']:>13,.0f} {t['min']:>10,.0f} {t['max']:>10,.0f} "
                     f"{mfu:>7} {mem:>10}" + (f"  (compile {r['compile_s']:.1f} s)" if r["compile_s"] else ""))
    for q in result["ratios"]:
        lines.append(f"ratio {q['name']}: {q['median']:.2f}× (min {q['min']:.2f}, max {q['max']:.2f})")
    return "\n".join(lines)


def rows_frame(results: list[dict]):
    """All rows of several bench results as one pandas table (for the Cost chapter)."""
    import pandas as pd

    records = []
    for res in results:
        for r in res["rows"]:
            records.append({"mode": res["mode"], "label": r["label"], "preset": r["preset"], "loop": r["loop"],
                            "phase": r["phase"], "params (M)": round(r["num_params"] / 1e6, 2),
                            "tokens/s (median)": round(r["tokens_per_s"]["median"]),
                            "min": round(r["tokens_per_s"]["min"]), "max": round(r["tokens_per_s"]["max"]),
                            "MFU": r["mfu"], "GFLOP/token": round(r["flops_per_token"] / 1e9, 4),
                            "device": res["machine"]["gpu"] or res["machine"]["cpu"]})
    return pd.DataFrame(records)


def plot_bench(results: list[dict]):
    """Horizontal bars of median tokens/s with min–max whiskers, one bar per (mode, loop)."""
    import matplotlib.pyplot as plt

    def name(r: dict) -> str:
        label = f"{r['label']} ({r['preset']})" if r["label"] in ("ours", "reference") else r["label"]
        return f"{r['phase']}: {label}"

    bars = [(name(r), r["tokens_per_s"]) for res in results for r in res["rows"]]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(bars) + 1.2))
    y = range(len(bars))
    med = [b[1]["median"] for b in bars]
    err = [[m - b[1]["min"] for m, b in zip(med, bars)], [b[1]["max"] - m for m, b in zip(med, bars)]]
    ax.barh(list(y), med, xerr=err, color="#4c72b0", alpha=0.8, capsize=3)
    ax.set_yticks(list(y), [b[0] for b in bars])
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s (median over repeats; whiskers: min–max)")
    fig.tight_layout()
    return fig


def stored_gpu_results(directory: str | os.PathLike = ASSETS_BENCH) -> list[dict]:
    """Bench JSONs from GPU runs kept in ``reflow_core/assets/bench/`` (empty list when there are none)."""
    out = []
    for path in sorted(Path(directory).glob("*.json")) if Path(directory).is_dir() else []:
        data = json.loads(path.read_text())
        if data.get("machine", {}).get("gpu"):
            out.append(data)
    return out


TRAINING_ENTRY = "training (every model)"


def chapter_times(results_dir: str | os.PathLike) -> dict | None:
    """Per-chapter wall seconds from the book runner's ``RUN.json`` (None when the chapter runs alone)."""
    path = Path(results_dir) / "RUN.json"
    if not path.is_file():
        return None
    run = json.loads(path.read_text())
    chapters = {name: entry.get("seconds", 0.0) for name, entry in run.get("notebooks", {}).items()}
    total = run.get("total_seconds", sum(chapters.values()))
    if run.get("training_seconds"):  # the book trained every model before the chapters (reflow_core.runs.train_all)
        chapters = {TRAINING_ENTRY: run["training_seconds"], **chapters}
        total += run["training_seconds"]
    return {"scale": run.get("scale"), "device": run.get("device"), "date": run.get("date"),
            "total_seconds": total, "chapters": chapters}


# ======================================================================================================================
# Command line (wired into `python -m reflow_core bench` by cli.py)
# ======================================================================================================================


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--preset", default="reflow@smoke", help="model preset, e.g. reflow@smoke")
    parser.add_argument("--mode", choices=MODES, default="train",
                        help="train: our step | infer: forward only | side-by-side: ours vs the reference loop, "
                             "interleaved | factorisation: the preset vs gpt2-new at the same size | all: ours, "
                             "reference and gpt2-new interleaved | recipe: the preset as its scale trains it (compact "
                             "vocabulary at smoke) vs its shape over the full vocabulary in fp32")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile happens here)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: the scale's)")
    parser.add_argument("--block", type=int, default=None, help="sequence length (default: the scale's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32; the reference "
                             "loop uses the same")
    parser.add_argument("--compile", action="store_true", help="torch.compile our model (time reported apart)")
    parser.add_argument("--threads", type=lambda v: v if v == "auto" else int(v), default=None,
                        help="torch CPU threads: a number, or 'auto' (the cores not busy by the load average); "
                             "default: torch's")
    parser.add_argument("--no-fused", dest="fused", action="store_false",
                        help="our loop with foreach AdamW instead of fused AdamW (TrainConfig.fused=False)")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    return parser


def run_bench_cli(args: argparse.Namespace) -> dict:
    result = run_bench(args.preset, args.mode, steps=args.steps, warmup=args.warmup, repeats=args.repeats,
                       batch=args.batch, block=args.block, device=args.device, dtype=args.dtype,
                       compile=args.compile, threads=args.threads, fused=args.fused)
    result["command"] = "python -m reflow_core bench " + " ".join(sys.argv[2:] if len(sys.argv) > 2 else [])
    print(format_table(result), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}", flush=True)
    return result
