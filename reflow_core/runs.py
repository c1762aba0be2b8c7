"""Trained models per scale: prepare the data, train a family once, and load it (trained or at initialisation).

:func:`ensure_model` trains a model through :func:`reflow_core.launch.launch` only when its checkpoint is not already in
``results/<scale>/checkpoints``, so chapters can be run alone or in book order and share the same trained models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from reflow_core import data
from reflow_core.checkpoint import CheckpointNotFoundError, load_model
from reflow_core.launch import launch
from reflow_core.model import build_model
from reflow_core.scales import checkpoint_dir, data_dir_for, get_scale, train_config


def ensure_data(scale: str) -> Path:
    """Prepare the scale's corpus once (the embedded sources need no network)."""
    path = data_dir_for(scale)
    try:
        data.load_tokens(path, "val")
    except data.DatasetNotPreparedError:
        print(f"preparing {get_scale(scale).data_source} into {path} …", flush=True)
        data.prepare(get_scale(scale).data_source, path)
    return path


def ensure_model(scale: str, family: str, results_dir=None, seed: int | None = None, nproc: int | None = None):
    """Train ``family`` at ``scale`` unless a finished run is already stored; return its summary."""
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
    run = checkpoint_dir(scale, family, results_dir, seed)
    if train_if_missing:
        ensure_model(scale, family, results_dir, seed)
    model, meta = load_model(run, device=device)
    model.eval()
    return model, f"{run.name}@step{meta['step']}"


def load_initial(scale: str, family: str, results_dir=None, seed: int | None = None, *, device: str = "cpu"):
    """The same model at initialisation (step 0), the null for every "did training create this?" question.

    The stored ``init`` checkpoint, or the same weights rebuilt from the run's config and seed exactly as training
    builds them (seed, then ``build_model`` on the CPU) when there is none.
    """
    run = checkpoint_dir(scale, family, results_dir, seed)
    try:
        model, _ = load_model(run / "init", device=device)
        label = f"{run.name}@init"
    except (CheckpointNotFoundError, FileNotFoundError):
        config = train_config(scale, family, results_dir, seed)
        torch.manual_seed(config.seed)
        model = build_model(config.model_config(), "cpu").to(device)
        label = f"{family}-seed{config.seed}@init"
    model.eval()
    return model, label


def load_models(scale: str, family: str, results_dir=None, *, initial: bool = False,
                seeds: Sequence[int] | None = None) -> tuple[list, list[str]]:
    """``family`` at every training seed of ``scale`` (trained, or at initialisation): (models, labels)."""
    seeds = get_scale(scale).seeds if seeds is None else seeds
    models, labels = [], []
    for seed in seeds:
        model, label = (load_initial if initial else load_trained)(scale, family, results_dir, seed)
        models.append(model)
        labels.append(label)
    return models, labels


COMPARISON_GROUPS = ("reflow", "gpt2-new", "reflow (init)", "reflow-topk")
"""The groups the recipe-space chapters compare: reFlow and GPT-2-New at every seed of the scale, reFlow at
initialisation (the same seeds), and reFlow-TopK (first seed only)."""


def comparison_models(scale: str, results_dir=None, *, with_topk: bool = True) -> tuple[dict, dict]:
    """``{group: [model per seed]}`` and ``{group: [checkpoint label per seed]}`` for :data:`COMPARISON_GROUPS`."""
    seeds = get_scale(scale).seeds
    models, labels = {}, {}
    models["reflow"], labels["reflow"] = load_models(scale, "reflow", results_dir)
    models["gpt2-new"], labels["gpt2-new"] = load_models(scale, "gpt2-new", results_dir)
    models["reflow (init)"], labels["reflow (init)"] = load_models(scale, "reflow", results_dir, initial=True)
    if with_topk:
        models["reflow-topk"], labels["reflow-topk"] = load_models(scale, "reflow-topk", results_dir, seeds=seeds[:1])
    return models, labels


def seeds_label(labels: list[str]) -> str:
    """The first seed's checkpoint label, and how many more seeds there are: what a figure stamp names."""
    return labels[0] + (f" (+{len(labels) - 1} more seeds)" if len(labels) > 1 else "")
