"""Trained models per scale: prepare the data, train a family once, and load it (trained or at initialisation).

:func:`ensure_model` trains a model through :func:`reflow_core.launch.launch` only when its checkpoint is not already in
``results/<scale>/checkpoints``, so chapters can be run alone or in book order and share the same trained models.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor  # train_all's runs are subprocesses: its threads only wait
from pathlib import Path
from typing import Sequence

import torch

from reflow_core import data
from reflow_core.checkpoint import CheckpointNotFoundError, load_model, read_meta
from reflow_core.launch import launch, stop_all
from reflow_core.model import build_model
from reflow_core.scales import (CORE_FAMILIES, checkpoint_dir, data_dir_for, get_scale, train_config,
                                trained_families)
from reflow_core.train import SNAPSHOT_DIR


def ensure_data(scale: str) -> Path:
    """Prepare the scale's corpus once (the embedded sources need no network)."""
    path = data_dir_for(scale)
    try:
        data.load_tokens(path, "val")
    except data.DatasetNotPreparedError:
        print(f"preparing {get_scale(scale).data_source} into {path} …", flush=True)
        data.prepare(get_scale(scale).data_source, path)
    return path


ENV_EVAL_DEVICE = "REFLOW_EVAL_DEVICE"  # cpu | cuda | auto: overrides the scale's `device` for the chapters' models
REFERENCE_FAMILY = CORE_FAMILIES[0]  # under a time budget, reFlow's first seed fixes the steps of every other run


def eval_device(scale: str) -> str:
    """Where chapters put trained models at ``scale``: REFLOW_EVAL_DEVICE if set, else the scale's ``device``;
    "auto" is CUDA when torch sees a GPU, else the CPU."""
    choice = os.environ.get(ENV_EVAL_DEVICE) or get_scale(scale).device
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def run_threads(position: int, n_runs: int, parallel: int, cores: int) -> int:
    """Threads for the run at ``position`` of ``n_runs`` trained ``parallel`` at a time on ``cores``. Runs of one
    scale take about the same time, so they go in waves of ``parallel``; the cores are shared by the runs of a wave,
    and a last wave with fewer runs splits them among those, so an odd last run does not train on one core beside an
    idle one."""
    wave_start = position // parallel * parallel
    return max(1, cores // min(parallel, n_runs - wave_start))


def run_config(scale: str, family: str, results_dir=None, seed: int | None = None):
    """The TrainConfig of one run at ``scale``. Under a time budget (``time_budget_s``), only the reference run
    (reFlow, first seed) sizes its steps from its measured throughput; every other family and seed trains exactly
    the steps that run took (trained first if needed), so that comparisons between them stay at one token budget."""
    config = train_config(scale, family, results_dir, seed)
    reference = family == REFERENCE_FAMILY and (seed is None or seed == get_scale(scale).seeds[0])
    if config.time_budget_s is None or reference:
        return config
    steps = ensure_model(scale, REFERENCE_FAMILY, results_dir)["steps"]
    return config.replace(max_steps=steps, warmup_steps=min(config.warmup_steps, steps), time_budget_s=None)


def finished(summary: dict, config) -> bool:
    """Whether a stored run summary is the finished run of ``config``: all its steps, which under a time budget are
    the steps the run planned (its summary's ``max_steps``, at most ``config.max_steps``)."""
    if config.time_budget_s is not None:
        planned = summary.get("max_steps")
        return bool(summary.get("plan")) and planned is not None and planned <= config.max_steps \
            and summary.get("steps") == planned
    return summary.get("steps") == config.max_steps


def stored_run(config) -> dict | None:
    """The summary of the finished run of ``config`` stored in its out_dir, or None."""
    summary_path = Path(config.out_dir) / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if finished(summary, config):
            return summary
    return None


def ensure_model(scale: str, family: str, results_dir=None, seed: int | None = None, nproc: int | None = None):
    """Train ``family`` at ``scale`` unless a finished run is already stored; return its summary."""
    config = run_config(scale, family, results_dir, seed)
    if (summary := stored_run(config)) is not None:
        return summary
    ensure_data(scale)
    return launch(config, nproc=nproc)


def train_all(scale: str, results_dir=None, *, parallel: int | None = None) -> dict[str, float]:
    """Train every run the book needs at ``scale`` (each family of :func:`scales.trained_families` at each seed) that
    is not already stored, ``parallel`` runs at a time; returns each run's wall seconds (0 when it was stored).

    On the CPU, ``parallel`` defaults to the number of cores, each run on one thread (a last, smaller wave shares them:
    :func:`run_threads`): the runs are independent, and models this small use a core each better than they share two
    (reflow@smoke on 2 cores: two one-thread runs 2,970 + 2,921 tok/s, one two-thread run 5,371 tok/s). On CUDA, one
    run at a time. Under a time budget the reference run (reFlow, first seed) trains first, alone, because it fixes
    every other run's steps (:func:`run_config`)."""
    cuda = eval_device(scale) == "cuda"
    if parallel is None:
        parallel = 1 if cuda else max(1, os.cpu_count() or 1)
    runs = [(f, s) for f in trained_families(scale) for s in get_scale(scale).seeds]
    seconds: dict[str, float] = {}

    def one(run: tuple[str, int], threads: int | None = None) -> None:
        family, seed = run
        t0 = time.perf_counter()
        config = run_config(scale, family, results_dir, seed)
        if stored_run(config) is not None:
            seconds[f"{family}-seed{seed}"] = 0.0
            return
        if parallel > 1 and threads is not None:
            config = config.replace(threads=threads)
        launch(config, echo=lambda line: print(f"[{family}-seed{seed}] {line}", flush=True))
        seconds[f"{family}-seed{seed}"] = round(time.perf_counter() - t0, 1)

    ensure_data(scale)
    if get_scale(scale).train.get("time_budget_s") is not None:
        one(runs.pop(0))  # the reference run: (REFERENCE_FAMILY, first seed)
    pool = ThreadPoolExecutor(max_workers=parallel)
    try:
        cores = os.cpu_count() or 1
        for future in [pool.submit(one, run, run_threads(i, len(runs), parallel, cores)) for i, run in enumerate(runs)]:
            future.result()
    except BaseException:  # Ctrl-C (seen by this thread only) or a failed run: stop the others, queue nothing more
        pool.shutdown(wait=False, cancel_futures=True)
        stop_all()
        raise
    pool.shutdown()
    return seconds


def load_trained(scale: str, family: str, results_dir=None, seed: int | None = None, *, device: str | None = None,
                 train_if_missing: bool = True):
    """The trained model of ``family`` at ``scale`` (training it first if needed), in eval mode.

    Returns ``(model, label)`` where ``label`` names the checkpoint for figure stamps and captions. ``device``
    None: the scale's (:func:`eval_device`).
    """
    run = checkpoint_dir(scale, family, results_dir, seed)
    if train_if_missing:
        ensure_model(scale, family, results_dir, seed)
    model, meta = load_model(run, device=device or eval_device(scale))
    model.eval()
    return model, f"{run.name}@step{meta['step']}"


def load_initial(scale: str, family: str, results_dir=None, seed: int | None = None, *, device: str | None = None):
    """The same model at initialisation (step 0), the null for every "did training create this?" question.

    The stored ``init`` checkpoint, or the same weights rebuilt from the run's config and seed exactly as training
    builds them (seed, then ``build_model`` on the CPU) when there is none.
    """
    run = checkpoint_dir(scale, family, results_dir, seed)
    device = device or eval_device(scale)
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


def snapshot_dirs(scale: str, family: str, results_dir=None, seed: int | None = None) -> list[Path]:
    """The weights a run kept at each checkpoint step (``TrainConfig.snapshots``), in step order; empty if none."""
    root = checkpoint_dir(scale, family, results_dir, seed) / SNAPSHOT_DIR
    return sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def checkpoint_identity(path) -> dict:
    """What identifies a checkpoint's weights: step, tokens seen and the weight file's sha256 (from its checked
    meta.json), so a cache of anything computed from them can tell when the weights changed."""
    meta = read_meta(path)
    return {"step": meta["step"], "tokens": meta["tokens_seen"], "sha256": meta["files"]["model.safetensors"]["sha256"]}


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
