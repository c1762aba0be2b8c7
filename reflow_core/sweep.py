"""A small learning-rate × batch sweep at one token budget: which recipe learns most per token at a scale?

The smoke scale's recipe (``reflow_core.scales``) is chosen by this measurement, not guessed.  Every point trains the
same model preset on the same data for the same number of tokens (steps = tokens / tokens_per_step, warm-up a fixed
share of the steps, cosine to a tenth of the peak) and records its final validation loss, tokens/s and wall time::

    python -m reflow_core sweep --preset reflow@smoke --data-dir data/smoke-mix --tokens 600000 \\
        --lr 1e-3,3e-3,6e-3 --tokens-per-step 2048,8192 --out reflow_core/assets/sweeps/smoke.json

The result is stored as package data and drawn by the Cost chapter (``fig-cost-sweep``), stamped with the machine and
date it ran on: a reader's book shows the sweep that chose the recipe, without rerunning it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path

import torch

from reflow_core.config import TrainConfig
from reflow_core.fileio import write_json_atomic
from reflow_core.train import train

WARMUP_SHARE = 0.1  # warm-up steps as a share of the run


@dataclass
class SweepPoint:
    lr: float
    tokens_per_step: int
    steps: int
    val_loss: float
    train_loss: float
    tokens_per_s: float
    wall_s: float


def sweep_config(preset: str, data_dir, out_dir, *, lr: float, tokens_per_step: int, tokens: int,
                 micro_batch_size: int = 16, block_size: int = 128, seed: int = 1337) -> TrainConfig:
    steps = max(1, tokens // tokens_per_step)
    return TrainConfig(model=preset, data_dir=str(data_dir), out_dir=str(out_dir), max_steps=steps,
                       tokens_per_step=tokens_per_step, micro_batch_size=micro_batch_size, block_size=block_size,
                       lr=lr, min_lr=lr / 10, warmup_steps=max(1, round(WARMUP_SHARE * steps)), eval_interval=0,
                       eval_batches=20, ckpt_interval=0, log_interval=max(1, steps // 10), seed=seed,
                       save_init=False, progress=False)


def run_sweep(preset: str, data_dir, *, lrs, tokens_per_steps, tokens: int, micro_batch_size: int = 16,
              block_size: int = 128, seed: int = 1337, work_dir=None) -> dict:
    """Train every (lr, tokens_per_step) point for ``tokens`` tokens; return the sweep record."""
    points = []
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        for i, (lr, tps) in enumerate(itertools.product(lrs, tokens_per_steps)):
            config = sweep_config(preset, data_dir, Path(tmp) / f"point-{i}", lr=lr, tokens_per_step=tps,
                                  tokens=tokens, micro_batch_size=micro_batch_size, block_size=block_size, seed=seed)
            t0 = time.perf_counter()
            summary = train(config)
            points.append(SweepPoint(lr=lr, tokens_per_step=tps, steps=config.max_steps,
                                     val_loss=summary["final_val_loss"], train_loss=summary["final_train_loss"],
                                     tokens_per_s=summary["tokens_per_s"], wall_s=time.perf_counter() - t0))
            print(f"sweep {i + 1}: lr {lr:g}, {tps} tokens/step -> val loss {points[-1].val_loss:.4f}", flush=True)
    best = min(points, key=lambda p: p.val_loss)
    return {
        "preset": preset, "data_dir": Path(data_dir).name, "tokens": tokens, "block_size": block_size,
        "micro_batch_size": micro_batch_size, "seed": seed, "warmup_share": WARMUP_SHARE,
        "points": [asdict(p) for p in points], "best": asdict(best),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "date": _dt.date.today().isoformat(),
    }


def stored_sweep(scale: str) -> dict | None:
    """The sweep stored for ``scale`` (``reflow_core/assets/sweeps/<scale>.json``), or None."""
    path = files("reflow_core").joinpath(f"assets/sweeps/{scale}.json")
    return json.loads(path.read_text()) if path.is_file() else None


def plot_sweep(record: dict):
    """Final validation loss against the learning rate, one line per batch size (tokens per step)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 3.6))
    by_batch: dict[int, list] = {}
    for p in record["points"]:
        by_batch.setdefault(p["tokens_per_step"], []).append(p)
    for tps, pts in sorted(by_batch.items()):
        pts = sorted(pts, key=lambda p: p["lr"])
        ax.plot([p["lr"] for p in pts], [p["val_loss"] for p in pts], "o-", label=f"{tps:,} tokens/step")
    best = record["best"]
    ax.scatter([best["lr"]], [best["val_loss"]], s=160, facecolor="none", edgecolor="k", zorder=5, label="chosen")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss (nats)")
    ax.set_title(f"{record['preset']}: {record['tokens']:,} tokens per point", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def add_sweep_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--preset", default="reflow@smoke")
    parser.add_argument("--data-dir", required=True, type=Path, help="a prepared dataset")
    parser.add_argument("--tokens", type=int, default=600_000, help="training tokens per point")
    parser.add_argument("--lr", default="1e-3,3e-3,6e-3", help="comma-separated peak learning rates")
    parser.add_argument("--tokens-per-step", default="2048,8192", help="comma-separated batch sizes in tokens")
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--out", type=Path, required=True, help="where the sweep record (JSON) goes")
    return parser


def run_sweep_cli(args: argparse.Namespace) -> dict:
    record = run_sweep(args.preset, args.data_dir, lrs=[float(x) for x in args.lr.split(",")],
                       tokens_per_steps=[int(x) for x in args.tokens_per_step.split(",")], tokens=args.tokens,
                       micro_batch_size=args.micro_batch_size, block_size=args.block_size)
    write_json_atomic(args.out, record)
    print(f"sweep: best lr {record['best']['lr']:g} at {record['best']['tokens_per_step']} tokens/step "
          f"(val loss {record['best']['val_loss']:.4f}) -> {args.out}")
    return record
