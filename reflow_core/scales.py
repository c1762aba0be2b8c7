"""What each scale of the book trains, on which data, for how long.

One papermill parameter, ``scale``, selects a row of :data:`SCALES`.  Chapters never hard-code sizes
or steps: they ask this module for the data, the models and the training recipe, and
:func:`ensure_model` trains a model through :func:`reflow_core.launch.launch` only when its
checkpoint is not already in ``results/<scale>/checkpoints`` — so chapters can be run alone or in
book order and share the same trained models.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Scale:
    name: str
    data_source: str  # a source known to reflow_core.data.prepare
    size: str  # model size suffix for presets: "<family>@<size>", or "paper" for the paper's configs
    train: dict = field(default_factory=dict)  # TrainConfig fields shared by every model at this scale
    seeds: tuple[int, ...] = (1337,)
    description: str = ""


SCALES: dict[str, Scale] = {
    "test": Scale(
        name="test",
        data_source="tiny",
        size="test",
        train=dict(
            max_steps=30, tokens_per_step=512, micro_batch_size=8, block_size=64,
            lr=3e-3, min_lr=3e-4, warmup_steps=5, eval_interval=10, eval_batches=2,
            ckpt_interval=30, log_interval=5,
        ),
        description="toy models, a few steps: proves every notebook runs (CI)",
    ),
    "smoke": Scale(
        name="smoke",
        data_source="wiki-offline",
        size="smoke",
        train=dict(
            max_steps=150, tokens_per_step=2048, micro_batch_size=16, block_size=128,
            lr=3e-3, min_lr=3e-4, warmup_steps=15, eval_interval=50, eval_batches=20,
            ckpt_interval=50, log_interval=10,
        ),
        description="small models on the embedded Wikipedia corpus; whole book on 2 CPU cores",
    ),
    "small": Scale(
        name="small",
        data_source="small-mix",
        size="small",
        train=dict(
            max_steps=3000, tokens_per_step=65536, micro_batch_size=32, block_size=1024,
            lr=1.5e-3, min_lr=1.5e-4, warmup_steps=200, eval_interval=250, eval_batches=40,
            ckpt_interval=500, log_interval=25,
        ),
        seeds=(1337, 1338, 1339),
        description="reFlow-Small-class models (≈46M) on one GPU in about an hour",
    ),
    "paper": Scale(
        name="paper",
        data_source="openwebtext",
        size="paper",
        train=dict(
            max_steps=50000, tokens_per_step=491520, micro_batch_size=12, block_size=1024,
            lr=6e-4, min_lr=6e-5, warmup_steps=2000, eval_interval=1000, eval_batches=200,
            ckpt_interval=1000, log_interval=50,
        ),
        description="the paper's configurations on OpenWebText (multi-GPU node, network for data)",
    ),
}


def get_scale(name: str) -> Scale:
    if name not in SCALES:
        raise ValueError(f"unknown scale '{name}'; choose one of {list(SCALES)}")
    return SCALES[name]


def results_dir_for(scale: str, results_dir: str | os.PathLike | None = None) -> Path:
    """The per-scale results folder (created); papermill passes an explicit one, "" means the default."""
    from reflow_core.book import resolve_results_dir

    path = resolve_results_dir(results_dir, scale, REPO_ROOT)
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir_for(scale: str) -> Path:
    """Prepared token files live outside results/ so that every scale sharing a corpus shares them."""
    root = Path(os.environ.get("REFLOW_DATA_DIR", REPO_ROOT / "data"))
    return root / get_scale(scale).data_source


def ensure_data(scale: str) -> Path:
    """Prepare the scale's corpus once (the embedded sources need no network)."""
    from reflow_core import data

    path = data_dir_for(scale)
    try:
        data.load_tokens(path, "val")
    except data.DatasetNotPreparedError:
        print(f"preparing {get_scale(scale).data_source} into {path} …", flush=True)
        data.prepare(get_scale(scale).data_source, path)
    return path


def preset_for(scale: str, family: str) -> str:
    return f"{family}@{get_scale(scale).size}"


def checkpoint_dir(scale: str, family: str, results_dir=None, seed: int | None = None) -> Path:
    seed = get_scale(scale).seeds[0] if seed is None else seed
    return results_dir_for(scale, results_dir) / "checkpoints" / f"{family}-seed{seed}"


def train_config(scale: str, family: str, results_dir=None, seed: int | None = None, **overrides):
    from reflow_core.train import TrainConfig

    spec = get_scale(scale)
    seed = spec.seeds[0] if seed is None else seed
    fields = dict(
        spec.train,
        model=preset_for(scale, family),
        data_dir=str(data_dir_for(scale)),
        out_dir=str(checkpoint_dir(scale, family, results_dir, seed)),
        seed=seed,
    )
    fields.update(overrides)
    return TrainConfig.from_dict(fields)


def ensure_model(scale: str, family: str, results_dir=None, seed: int | None = None, nproc: int | None = None):
    """Train ``family`` at ``scale`` unless a finished run is already stored; return its summary."""
    from reflow_core.launch import launch

    config = train_config(scale, family, results_dir, seed)
    summary_path = Path(config.out_dir) / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("steps") == config.max_steps:
            return summary
    ensure_data(scale)
    return launch(config, nproc=nproc)


def load_trained(scale: str, family: str, results_dir=None, seed: int | None = None, *, device: str = "cpu",
                 train_if_missing: bool = True):
    """The trained model of ``family`` at ``scale`` (training it first if needed), in eval mode.

    Returns ``(model, label)`` where ``label`` names the checkpoint for figure stamps and captions.
    """
    from reflow_core.checkpoint import load_model

    run = checkpoint_dir(scale, family, results_dir, seed)
    if train_if_missing:
        ensure_model(scale, family, results_dir, seed)
    model, meta = load_model(run, device=device)
    model.eval()
    return model, f"{run.name}@step{meta['step']}"


def load_initial(scale: str, family: str, results_dir=None, seed: int | None = None, *, device: str = "cpu"):
    """The same model at initialisation (step 0), the null for every "did training create this?" question."""
    from reflow_core.checkpoint import load_model

    run = checkpoint_dir(scale, family, results_dir, seed)
    model, _ = load_model(run / "init", device=device)
    model.eval()
    return model, f"{run.name}@init"
