"""Training: one function for a notebook, the shell, and every rank under ``torchrun``.

    from reflow_core.config import TrainConfig
    from reflow_core.train import train
    summary = train(TrainConfig(model="reflow@smoke", data_dir="data/wiki-offline", out_dir="results/runs/x"))

    python -m reflow_core train --preset reflow@smoke --data-dir data/wiki-offline --out-dir results/runs/x
    torchrun --standalone --nproc_per_node=8 -m reflow_core train --config run.json

The loop is nanoGPT's: AdamW (weight decay on 2-D weights only), linear warmup then cosine decay to ``min_lr``,
gradient clipping, gradient accumulation up to a *token* batch size, bf16 autocast on CUDA, DDP with ``no_sync`` on
all but the last micro-step.  Three properties are designed in and tested:

* **World-size invariance.**  Step ``s`` trains on ``W·A`` micro-batches; micro-batch ``j`` (``j = rank·A + m``)
  draws its windows from a generator seeded by ``(seed, s, j)`` alone.  The global batch of a step is therefore the
  same set of sequences whether one process accumulates ``A = 2`` micro-batches or two processes take one each,
  which is what lets a test show that 2 DDP processes and 1 process follow the same losses.
* **Exact resume.**  Batches and dropout depend only on ``(seed, step, rank)``, not on RNG state carried across
  steps, so restoring weights, the AdamW moments and the step count puts a run back on the very same trajectory.
* **Safety.**  One run per output folder (:mod:`reflow_core.runlock`).  Checkpoints are atomic safetensors
  (:mod:`reflow_core.checkpoint`).  :class:`DivergenceGuard` judges every step — a non-finite or far too high loss,
  a sudden spike, a vanishing gradient, a dead model — and a checkpoint is written only after the val loss of the
  very weights it saves passed the same judgement; a tripped check stops the run with :class:`TrainingDiverged`
  before anything of the bad state is written, and names a checkpoint as the last good one only if it is.

Host syncs are kept out of the step: losses stay on the device and are read (one sync) only at log, eval and
checkpoint steps, where every step since the last sync is checked (so a divergence is named at the exact step it
happened, and always before a checkpoint is written).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from reflow_core import checkpoint as ckpt_io
from reflow_core.config import ConfigError, ModelConfig, TrainConfig
from reflow_core.data import get_batch, iter_eval_batches, load_tokens, most_frequent_ids, token_coverage
from reflow_core.device import (Dist, all_reduce_sum, autocast_for, peak_flops, resolve_device, resolve_dtype,
                                setup_distributed, torch_threads)
from reflow_core.divergence import HISTORY, DivergenceGuard, TrainingDiverged, weights_problem
from reflow_core.errors import UserError
from reflow_core.fileio import write_json_atomic
from reflow_core.fused_loss import calibrate_chunk, chunk_for, default_chunk
from reflow_core.model import build_model
from reflow_core.runlock import RunLock, RunLockedError

# Environment variables read by train() (set by launch(), by torchrun, or by tests).
ENV_PROGRESS = "REFLOW_PROGRESS"  # "lines": no tqdm bar, one printed line per log step (for piped output)
ENV_KILL_AT_STEP = "REFLOW_KILL_AT_STEP"  # test hook: SIGKILL this process right after that optimizer step

INIT_DIR = "init"  # out_dir/init: the model at step 0

# A time-budgeted run (TrainConfig.time_budget_s) fixes its max_steps after PLAN_AFTER_STEPS steps of the process
# that has no plan yet, from the step time measured over all but the first PLAN_WARM_STEPS of them: those pay for the
# CUDA context, cuBLAS heuristics and the caching allocator's growth, and would make the plan too short.
PLAN_AFTER_STEPS = 20
PLAN_WARM_STEPS = 5
PLAN_MARGIN = 0.97  # plan for 97% of what is left: step times drift a little (clock boosts, allocator, other loads)
FORWARD_SHARE = 1 / 3  # a forward pass costs about a third of forward + backward (the eval cost estimate)
SNAPSHOT_DIR = "snapshots"  # out_dir/snapshots/step-<N>: weights at every checkpoint step (config.snapshots)


def snapshot_name(step: int) -> str:
    return f"step-{step:06d}"


# ======================================================================================================================
# Pieces of the loop
# ======================================================================================================================


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for the update that takes the model from ``step`` to ``step + 1`` (nanoGPT's schedule)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / (config.warmup_steps + 1)
    decay_steps = config.lr_decay_steps if config.lr_decay_steps is not None else config.max_steps
    if step >= decay_steps or decay_steps == config.warmup_steps:
        return config.min_lr
    ratio = (step - config.warmup_steps) / (decay_steps - config.warmup_steps)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (config.lr - config.min_lr)


def stream_seed(seed: int, step: int, index: int, stream: int) -> int:
    """A 63-bit seed from (run seed, step, micro-batch or rank index, stream id), well mixed by SeedSequence."""
    a, b = np.random.SeedSequence([seed, step, index, stream]).generate_state(2, dtype=np.uint32)
    return (int(a) << 31) ^ int(b)


DATA_STREAM, DROPOUT_STREAM = 0, 1


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D tensors only (matmul weights, embeddings) — never on norms or 1-D params."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {}
    # Fused AdamW (one kernel over all tensors), on CPU too: the bench measured its optimizer step several times
    # faster than the foreach implementation there (the two differ only in float rounding).
    if config.fused and device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        kwargs["fused"] = True
    try:
        return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), **kwargs)
    except RuntimeError:  # a torch build without the fused kernel for this device: the default implementation
        return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


def evaluate(model: torch.nn.Module, tokens: np.ndarray, config: TrainConfig, device: torch.device, autocast,
             d: Dist) -> float:
    """Mean loss over fixed validation windows; ranks share the batches and all-reduce (sum, count)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i, (x, y) in enumerate(iter_eval_batches(tokens, config.micro_batch_size, config.seq_len(),
                                                 config.eval_batches, device="cpu")):
        if i % d.world_size != d.rank:
            continue
        x, y = x.to(device), y.to(device)
        with autocast():
            _, loss = model(x, y, return_logits=False)
        total[0] += loss.double() * y.numel()
        total[1] += y.numel()
    all_reduce_sum(total, d)
    model.train(was_training)
    return (total[0] / total[1]).item()


class _Progress:
    """A tqdm bar on a terminal or in a notebook, or plain log lines when output is piped (launch sets this)."""

    def __init__(self, config: TrainConfig, d: Dist, start: int) -> None:
        self.lines = os.environ.get(ENV_PROGRESS, "") == "lines" or not config.progress
        self.enabled = d.master
        self.bar = None
        if self.enabled and not self.lines:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=config.max_steps, initial=start, desc=Path(config.out_dir).name, unit="step",
                            dynamic_ncols=True)

    def set_total(self, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def update(self, n: int, record: dict | None) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if record is not None:
                self.bar.set_postfix(loss=f"{record['train_loss']:.4f}", tok_s=f"{record['tokens_per_s'] or 0:.0f}",
                                     refresh=False)
        elif record is not None:
            self.write(_format_record(record))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _format_record(r: dict) -> str:
    parts = [f"step {r['step']}", f"loss {r['train_loss']:.4f}"]
    if r.get("val_loss") is not None:
        parts.append(f"val {r['val_loss']:.4f}")
    parts += [f"lr {r['lr']:.2e}", f"{r['tokens_per_s'] or 0:.0f} tok/s"]
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    return " | ".join(parts)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _trim_metrics(path: Path, last_step: int) -> None:
    """On resume, drop lines a killed run wrote after its last checkpoint, so the file reads as one trajectory."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by the crash
    path.write_text("".join(k + "\n" for k in kept))


def _check_compatible(meta: dict, model_config: ModelConfig, config: TrainConfig) -> None:
    if meta.get("model_config") != model_config.to_dict():
        raise ConfigError(
            f"train config field 'out_dir': {config.out_dir} holds a checkpoint of a different model "
            f"({meta.get('train_config', {}).get('model')!r}); use another out_dir, or resume='never' to overwrite it"
        )


# ======================================================================================================================
# The loop
# ======================================================================================================================


def train(config: TrainConfig | dict, **overrides) -> dict:
    """Train (or resume) a model as ``config`` says; returns the run summary (also written to out_dir/summary.json).

    Runs in this process, or as one rank of a ``torchrun`` job (RANK/WORLD_SIZE in the environment).
    Keyword overrides change config fields for this call: ``train(cfg, max_steps=50)``.
    """
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    if overrides:
        config = config.replace(**overrides)
    config.validate()
    device_type = "cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu"
    with torch_threads(config.threads):
        d = setup_distributed(device_type)
        lock = None
        try:
            t_entry = time.perf_counter()
            lock = _lock_out_dir(config, d, device_type)
            run = _setup(config, d)
            run.t_entry = t_entry
            _resume(run)
            with chunk_for(run.device.type, run.loss_chunk):
                _train_loop(run)
            return _finish(run)
        finally:
            if lock is not None:
                lock.release()
            if d.owns_group and dist.is_initialized():
                dist.destroy_process_group()


def _lock_out_dir(config: TrainConfig, d: Dist, device_type: str) -> RunLock | None:
    """Rank 0 (the only writer) locks out_dir; every rank learns whether it could, so all ranks stop together
    instead of some waiting forever in a collective for a rank that has quit."""
    lock, error = None, None
    if d.master:
        try:
            lock = RunLock(config.out_dir).acquire()
        except UserError as e:
            error = e
    if d.enabled:
        failed = torch.tensor([float(error is not None)],
                              device=torch.device("cuda", d.local_rank) if device_type == "cuda" else "cpu")
        all_reduce_sum(failed, d)
        if failed.item() and error is None:
            raise RunLockedError(f"rank 0 could not take {config.out_dir} (see its error); rank {d.rank} stops too")
    if error is not None:
        raise error
    return lock


@dataclass
class _Run:
    """One run's state, shared by the pieces of the loop (setup, resume, step, log, checkpoint, finish)."""

    config: TrainConfig
    d: Dist
    device: torch.device
    dtype: torch.dtype
    autocast: Any
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    raw_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    seq_len: int
    accum: int
    tokens_per_step: int
    model: torch.nn.Module | None = None  # raw_model, possibly compiled and DDP-wrapped
    step: int = 0
    start_step: int = 0
    tokens_seen: int = 0
    wall_before: float = 0.0  # wall seconds of the earlier runs this one resumes
    resumed_from: int | None = None
    checkpoint_path: str | None = None
    ckpt_step: int | None = None
    last: dict = field(default_factory=lambda: {"train_loss": None, "val_loss": None})
    t_start: float = 0.0
    train_seconds: float = 0.0  # wall seconds spent in training steps (not eval or checkpoints) this run
    tokens_this_run: int = 0
    train_s_before: float = 0.0  # the same two totals over the earlier runs this one resumes (from the checkpoint),
    tokens_timed_before: int = 0  # so that even a zero-step resume reports the run's throughput
    guard: DivergenceGuard | None = None
    last_ckpt_losses: tuple = (None, None)  # (train, val) losses recorded in checkpoint_path
    t_entry: float = 0.0  # perf_counter when train() was called: a time budget counts from there
    plan: dict | None = None  # how a time-budgeted run fixed its max_steps (also in every checkpoint after it)
    plan_at: int = 0  # the step after which this process plans (time budget, no plan in the checkpoint)
    warm_at: int = 0  # ...measuring the step time from this step on
    t_warm: float | None = None
    init_save_s: float | None = None  # seconds the step-0 weights took to save: what a checkpoint's cost is scaled from
    loss_chunk: int | None = None  # positions per chunk of the fused loss (calibrated on CUDA, kept across resumes)

    @property
    def out_dir(self) -> Path:
        return Path(self.config.out_dir)

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    def wall_s(self) -> float:
        return self.wall_before + time.perf_counter() - self.t_start


def _setup(config: TrainConfig, d: Dist) -> _Run:
    """Device, precision, data and a freshly initialised model with its optimizer."""
    config.validate(d.world_size)
    device = resolve_device(config, d)
    dtype = resolve_dtype(config, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    T = config.seq_len()
    accum = config.grad_accum_steps(d.world_size)

    # data first: a missing dataset should fail before any model is built
    train_tokens = load_tokens(config.data_dir, "train")
    val_tokens = load_tokens(config.data_dir, "val")
    for split, toks in (("train", train_tokens), ("val", val_tokens)):
        if len(toks) <= T:
            raise ConfigError(f"train config field 'block_size': the {split} split of {config.data_dir} has "
                              f"{len(toks)} tokens, too few for windows of {T}+1")

    # Initialise on the CPU from the seed, then move: the same initial weights on every rank and on every kind of
    # device, so a step-0 model can be rebuilt anywhere from (preset, seed) alone.
    torch.manual_seed(config.seed)
    raw_model = build_model(config.model_config(), "cpu").to(device)
    uniform_outcomes = raw_model.config.vocab_size
    if raw_model.config.compact_vocab:  # its own rows for the corpus's most frequent ids, a shared tail row for the rest
        kept = most_frequent_ids(train_tokens, raw_model.config.compact_vocab)
        raw_model.vocab.set_kept_ids(torch.from_numpy(kept))
        tail_share = 1.0 - token_coverage(train_tokens, kept)
        # a uniform guess over the rows costs ln(rows) + (tail share)·ln(tail size) nats over GPT-2 ids
        uniform_outcomes = math.exp(math.log(raw_model.config.n_rows) + tail_share * raw_model.vocab.tail_log_size())
        if d.master:
            print(f"compact vocabulary: {len(kept):,} own rows cover {100 * (1 - tail_share):.1f}% of the train tokens",
                  flush=True)
    return _Run(config=config, d=d, device=device, dtype=dtype, autocast=autocast_for(device.type, dtype),
                train_tokens=train_tokens, val_tokens=val_tokens, raw_model=raw_model,
                optimizer=make_optimizer(raw_model, config, device.type), seq_len=T, accum=accum,
                tokens_per_step=config.micro_batch_size * T * accum * d.world_size,
                guard=DivergenceGuard(uniform_outcomes, config.warmup_steps))


def _resume(run: _Run) -> None:
    """Continue from out_dir's checkpoint if there is one (and resume allows it), else keep the step-0 weights;
    then wrap the model for compile / DDP and open the metrics file."""
    config, d = run.config, run.d
    found = ckpt_io.find_checkpoint(run.out_dir) if config.resume != "never" else None
    if config.resume == "must" and found is None:
        raise ckpt_io.CheckpointNotFoundError(f"resume='must' but there is no checkpoint in {run.out_dir}")
    if found is not None:
        state, opt_tensors, meta = ckpt_io.load_checkpoint(found)
        _check_compatible(meta, run.raw_model.config, config)
        run.raw_model.load_state_dict(state, strict=True)
        ckpt_io.load_optimizer_state(run.optimizer, run.raw_model, opt_tensors or {}, meta)
        ckpt_io.restore_rng_state(meta["rng"])
        run.start_step, run.tokens_seen = meta["step"], meta["tokens_seen"]
        run.wall_before = meta["extra"].get("wall_s", 0.0)
        run.train_s_before = meta["extra"].get("train_s", 0.0)  # absent in checkpoints from before these totals
        run.tokens_timed_before = meta["extra"].get("tokens_timed", 0)
        run.guard.history = list(meta["extra"].get("recent_losses", []))[-HISTORY:]
        run.last = {k: meta["extra"].get(k) for k in run.last}
        run.resumed_from, run.checkpoint_path, run.ckpt_step = run.start_step, str(found), run.start_step
        run.last_ckpt_losses = (run.last["train_loss"], run.last["val_loss"])
        run.loss_chunk = meta["extra"].get("loss_chunk")  # the same chunks, the same float sums: an exact resume
        if config.time_budget_s is not None and meta["extra"].get("plan"):  # keep the plan it was trained under
            run.plan = meta["extra"]["plan"]
            config = run.config = _planned_config(config, run.plan)
        current = config.to_dict()
        changed = {k: (v, current[k]) for k, v in (meta.get("train_config") or {}).items()
                   if k in current and current[k] != v and k not in ("resume", "progress")}
        if d.master and changed:
            print(f"note: resuming with changed settings {changed}", flush=True)
        del state, opt_tensors
    elif config.save_init and d.master:
        t0 = time.perf_counter()
        ckpt_io.save_checkpoint(run.out_dir, run.raw_model, None, step=0, config=config, name=INIT_DIR,
                                extra={"note": "weights at initialisation, before any training step"})
        run.init_save_s = time.perf_counter() - t0
    run.step = run.start_step
    if config.time_budget_s is not None and run.plan is None:
        run.plan_at = min(run.start_step + PLAN_AFTER_STEPS, config.max_steps)
        run.warm_at = run.start_step + min(PLAN_WARM_STEPS, run.plan_at - run.start_step - 1)
    if run.loss_chunk is None:
        run.loss_chunk = _loss_chunk(run)

    model = torch.compile(run.raw_model) if config.compile else run.raw_model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[d.local_rank] if run.device.type == "cuda" else None)
    run.model = model

    if d.master:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        if run.resumed_from is None:
            run.metrics_path.write_text("")
        else:
            _trim_metrics(run.metrics_path, run.resumed_from)
        print(f"train {config.model}: {run.raw_model.num_params():,} params | device {run.device} "
              f"{str(run.dtype)[6:]} | world {d.world_size} × accum {run.accum} × micro {config.micro_batch_size} × "
              f"{run.seq_len} = {run.tokens_per_step:,} tokens/step | steps {run.start_step}->{config.max_steps}"
              + (f" (resumed from {run.checkpoint_path})" if run.resumed_from is not None else ""), flush=True)


def _loss_chunk(run: _Run) -> int:
    """Positions per chunk of the fused loss: measured on CUDA (the fastest of a few sizes for this head, this batch
    and this device, :func:`reflow_core.fused_loss.calibrate_chunk`), the table elsewhere. Rank 0 decides for all."""
    if run.device.type != "cuda":
        return default_chunk(run.device.type)
    with torch.no_grad():
        x, weight = run.raw_model.vocab.head(torch.zeros(1, 1, run.raw_model.config.d_model, device=run.device))
    chunk, timings = calibrate_chunk(run.device, x.shape[-1], weight.shape[0], run.config.micro_batch_size * run.seq_len,
                                     run.dtype)
    chunk = int(all_reduce_sum(torch.tensor([chunk if run.d.master else 0], device=run.device), run.d).item())
    if run.d.master:
        print("fused loss chunk: " + ", ".join(f"{n}: {1000 * s:.1f} ms" for n, s in timings.items())
              + f" -> {chunk} positions", flush=True)
    return chunk


def _planned_config(config: TrainConfig, plan: dict) -> TrainConfig:
    """The run's config with the max_steps its time budget allowed (the warmup shortened if it does not fit)."""
    return config.replace(max_steps=plan["max_steps"], warmup_steps=min(config.warmup_steps, plan["max_steps"]))


def _sync_device(run: _Run) -> None:
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)


def _checkpoint_seconds(run: _Run) -> float:
    """What one checkpoint costs: three times the step-0 save (weights + AdamW's two moments, written and hashed),
    plus the snapshot; without a timed step-0 save, the bytes at 200 MB/s."""
    params = sum(p.numel() for p in run.raw_model.parameters())
    weights_s = run.init_save_s if run.init_save_s is not None else params * 4 / 200e6
    return weights_s * (3 + (1 if run.config.snapshots else 0))


def plan_steps(*, step: int, step_s: float, elapsed_s: float, budget_s: float, max_steps: int, eval_s: float,
               eval_interval: int, ckpt_s: float, ckpt_interval: int) -> int:
    """The max_steps that ends a run on ``budget_s``: ``step`` steps done after ``elapsed_s`` seconds, each further
    one ``step_s``, an evaluation every ``eval_interval`` steps (``eval_s`` each) and a checkpoint every
    ``ckpt_interval`` (``ckpt_s`` each), plus the final evaluation and checkpoint. Never above ``max_steps``, never
    below ``step`` (a budget already spent ends the run at once)."""
    per_step = step_s + (eval_s / eval_interval if eval_interval else 0.0) + (ckpt_s / ckpt_interval if ckpt_interval
                                                                              else 0.0)
    left = PLAN_MARGIN * (budget_s - elapsed_s) - eval_s - ckpt_s
    more = math.floor(left / per_step + 1e-9) if left > 0 and per_step > 0 else 0  # (9.7 / 0.1 is 96.999…)
    return max(step, min(max_steps, step + more))


def _plan(run: _Run) -> None:
    """Fix a time-budgeted run's max_steps from the step time measured since ``warm_at`` (rank 0 decides for all)."""
    _sync_device(run)
    now = time.perf_counter()
    config = run.config
    step_s = (now - run.t_warm) / max(run.step - run.warm_at, 1)
    eval_s = step_s * FORWARD_SHARE * config.eval_batches / run.accum
    elapsed = run.wall_before + now - run.t_entry
    planned = plan_steps(step=run.step, step_s=step_s, elapsed_s=elapsed, budget_s=config.time_budget_s,
                         max_steps=config.max_steps, eval_s=eval_s, eval_interval=config.eval_interval,
                         ckpt_s=_checkpoint_seconds(run), ckpt_interval=config.ckpt_interval)
    planned = int(all_reduce_sum(torch.tensor([planned if run.d.master else 0], device=run.device), run.d).item())
    run.plan = {"max_steps": planned, "at_step": run.step, "step_s": step_s,
                "tokens_per_s": run.tokens_per_step / step_s, "elapsed_s": elapsed,
                "time_budget_s": config.time_budget_s, "max_steps_allowed": config.max_steps}
    run.config = _planned_config(config, run.plan)
    if run.d.master:
        print(f"time budget {config.time_budget_s:.0f} s: {run.tokens_per_step / step_s:,.0f} tok/s over steps "
              f"{run.warm_at + 1}-{run.step}, {elapsed:.1f} s spent -> max_steps {planned}"
              + (f" (the most allowed: {config.max_steps})" if planned == config.max_steps else "")
              + (f"; warmup cut to {run.config.warmup_steps} steps" if run.config.warmup_steps < config.warmup_steps
                 else ""), flush=True)


def _train_step(run: _Run) -> torch.Tensor:
    """One optimizer step (all micro-batches of this rank); returns [loss, grad norm] on the device, unsynced."""
    config, d, model = run.config, run.d, run.model
    lr = lr_at(run.step, config)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    torch.manual_seed(stream_seed(config.seed, run.step, d.rank, DROPOUT_STREAM))
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(run.accum):
        gen = torch.Generator().manual_seed(stream_seed(config.seed, run.step, d.rank * run.accum + micro, DATA_STREAM))
        x, y = get_batch(run.train_tokens, config.micro_batch_size, run.seq_len, gen, run.device)
        no_sync = model.no_sync() if d.enabled and micro < run.accum - 1 else contextlib.nullcontext()
        with no_sync:
            with run.autocast():
                _, loss = model(x, y, return_logits=False)
            loss = loss / run.accum
            loss.backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(
        run.raw_model.parameters(), config.grad_clip if config.grad_clip > 0 else float("inf"))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.tokens_seen += run.tokens_per_step
    run.tokens_this_run += run.tokens_per_step
    return torch.stack([loss_sum.float(), grad_norm.float()])


def _sync_losses(run: _Run, pending: list[tuple[int, torch.Tensor]]) -> tuple[float, float]:
    """The one host sync: read the pending [loss, grad norm] pairs and let the guard judge every one of them."""
    values = torch.stack([v for _, v in pending])
    all_reduce_sum(values, run.d)  # every rank sees the same values, so every rank stops at the same step
    values = (values / run.d.world_size).tolist()
    for (s, _), (loss, gnorm) in zip(pending, values):
        why = run.guard.check(s, loss, gnorm)
        if why is not None:  # the loss of step s is computed with the weights after step s - 1
            _diverged(run, s, why, loss, weights_step=run.guard.first_bad_step - 1)
    return values[-1][0], values[-1][1]


def _diverged(run: _Run, step: int, why: str, loss: float, *, weights_step: int):
    """Raise TrainingDiverged; name the last checkpoint as good only if it was saved before ``weights_step`` (the
    step whose weights first showed ``why``) and the losses it recorded are sane."""
    ckpt, at = run.checkpoint_path, f"{run.checkpoint_path} (step {run.ckpt_step})"
    good = None
    if ckpt is None:
        saved = "no checkpoint was written before it" + (
            f" ({run.out_dir / INIT_DIR} holds the step-0 weights)" if (run.out_dir / INIT_DIR).is_dir() else "")
    elif run.ckpt_step >= weights_step:
        saved = (f"the checkpoint {at} holds the weights that gave this, so it is not a good one: resuming from it "
                 "would stop the same way. Start again with resume='never' (or another out_dir)")
    elif not (run.guard.sane(run.last_ckpt_losses[0]) and run.guard.sane(run.last_ckpt_losses[1])):
        saved = (f"the checkpoint {at} recorded losses {run.last_ckpt_losses} and is not a good one either. "
                 "Start again with resume='never' (or another out_dir)")
    else:
        good = ckpt
        saved = f"the last good checkpoint is {at}"
    raise TrainingDiverged(
        f"training diverged at step {step}: {why}. Nothing was saved after it; {saved}. Try a lower lr (now "
        f"{run.config.lr:g}), a longer warmup (now {run.config.warmup_steps} steps) or gradient clipping "
        f"(grad_clip now {run.config.grad_clip:g}).", step=step, loss=loss, checkpoint=good)


def _log(run: _Run, *, train_loss: float, gnorm: float, do_eval: bool, elapsed: float, tokens_interval: int,
         metrics_file, progress: "_Progress") -> dict:
    """Evaluate (when due), write one metrics line and return it."""
    val_loss = None
    if do_eval:
        val_loss = evaluate(run.raw_model, run.val_tokens, run.config, run.device, run.autocast, run.d)
        why = run.guard.check_val(val_loss)
        if why is not None:  # the val loss is that of the current weights, the ones a checkpoint now would save
            _diverged(run, run.step, f"{why} (train loss {train_loss:.4f})", val_loss, weights_step=run.step)
        run.last["val_loss"] = val_loss
    tok_s = tokens_interval / elapsed if elapsed > 0 and tokens_interval else None
    record = {
        "step": run.step, "tokens": run.tokens_seen, "lr": lr_at(run.step - 1, run.config), "train_loss": train_loss,
        "val_loss": val_loss, "grad_norm": gnorm, "tokens_per_s": tok_s, "mfu": _mfu(run, tok_s), "wall_s": run.wall_s(),
    }
    if metrics_file is not None:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
    if do_eval and progress.bar is not None:
        progress.write(_format_record(record))
    return record


def _checkpoint(run: _Run) -> None:
    """Save the current state — after its val loss (evaluated at every checkpoint step) and its weights passed."""
    why = weights_problem(run.raw_model)
    if why is not None:
        _diverged(run, run.step, why, run.last["train_loss"], weights_step=run.step)
    if run.d.master:
        extra = {**run.last, "wall_s": run.wall_s(), "world_size": run.d.world_size, "device": str(run.device),
                 "dtype": str(run.dtype), "train_s": run.train_s_before + run.train_seconds,
                 "tokens_timed": run.tokens_timed_before + run.tokens_this_run, "recent_losses": run.guard.history,
                 "plan": run.plan, "loss_chunk": run.loss_chunk}
        run.checkpoint_path = str(ckpt_io.save_checkpoint(
            run.out_dir, run.raw_model, run.optimizer, step=run.step, config=run.config, tokens_seen=run.tokens_seen,
            extra=extra))
        if run.config.snapshots:  # weights only: what a curve over training (e.g. the competence figure) reads
            ckpt_io.save_checkpoint(run.out_dir / SNAPSHOT_DIR, run.raw_model, None, step=run.step, config=run.config,
                                    tokens_seen=run.tokens_seen, extra=extra, name=snapshot_name(run.step))
    else:
        run.checkpoint_path = str(run.out_dir / ckpt_io.CKPT_DIR)
    run.ckpt_step = run.step
    run.last_ckpt_losses = (run.last["train_loss"], run.last["val_loss"])


def _mfu(run: _Run, tokens_per_s: float | None) -> float | None:
    peak = peak_flops(run.device, run.dtype)
    if not (peak and tokens_per_s):
        return None
    return run.raw_model.flops_per_token(run.seq_len) * tokens_per_s / (peak * run.d.world_size)


def _train_loop(run: _Run) -> None:
    """Steps until max_steps; the host reads losses (and checks them) only at log, eval and checkpoint steps."""
    config = run.config
    metrics_file = open(run.metrics_path, "a") if run.d.master else None
    progress = _Progress(config, run.d, run.start_step)
    kill_at = int(os.environ.get(ENV_KILL_AT_STEP, "0") or 0)
    pending: list[tuple[int, torch.Tensor]] = []  # (step, [loss, grad_norm]) on the device, read at sync points
    run.t_start = time.perf_counter()
    if run.plan is None and config.time_budget_s is not None and run.warm_at == run.step:
        run.t_warm = run.t_start
    t_interval, tokens_interval = time.perf_counter(), 0  # restarted after eval/checkpoint: tokens/s is training only
    run.model.train()
    try:
        while run.step < run.config.max_steps:
            pending.append((run.step + 1, _train_step(run)))
            tokens_interval += run.tokens_per_step
            if run.step == kill_at:  # test hook: die the hard way, mid-run, as a crash or an OOM kill would
                os.kill(os.getpid(), signal.SIGKILL)
            if run.plan is None and config.time_budget_s is not None:
                if run.step == run.warm_at:
                    _sync_device(run)
                    run.t_warm = time.perf_counter()
                elif run.step == run.plan_at:
                    _plan(run)
                    config = run.config
                    progress.set_total(config.max_steps)
            final = run.step == config.max_steps
            do_log = run.step % config.log_interval == 0 or final
            do_ckpt = (config.ckpt_interval > 0 and run.step % config.ckpt_interval == 0) or final
            # every checkpoint is evaluated first: the val loss of the very weights it saves is what makes it good
            do_eval = (config.eval_interval > 0 and run.step % config.eval_interval == 0) or do_ckpt
            record = None
            if do_log or do_eval or do_ckpt:
                train_loss, gnorm = _sync_losses(run, pending)
                pending = []
                run.last["train_loss"] = train_loss
                elapsed = time.perf_counter() - t_interval
                run.train_seconds += elapsed
                if do_log or do_eval:
                    record = _log(run, train_loss=train_loss, gnorm=gnorm, do_eval=do_eval, elapsed=elapsed,
                                  tokens_interval=tokens_interval, metrics_file=metrics_file, progress=progress)
                if do_ckpt:
                    _checkpoint(run)
                t_interval, tokens_interval = time.perf_counter(), 0
            progress.update(1, record)
    finally:
        progress.close()
        if metrics_file is not None:
            metrics_file.close()


def _finish(run: _Run) -> dict:
    """The run summary, written to out_dir/summary.json by rank 0."""
    if run.d.enabled:
        dist.barrier()
    device = run.device
    # Throughput over every run that made this model (this one and those it resumed), from the totals stored in the
    # checkpoint: a resume with no step left to run still reports the run's tokens/s instead of null.
    train_s = run.train_s_before + run.train_seconds
    tokens_timed = run.tokens_timed_before + run.tokens_this_run
    tokens_per_s = tokens_timed / train_s if train_s > 0 else None
    summary = {
        "model": run.config.model,
        "num_params": run.raw_model.num_params(),
        "final_train_loss": run.last["train_loss"],
        "final_val_loss": run.last["val_loss"],
        "steps": run.step,
        "max_steps": run.config.max_steps,  # what the run was to take: its plan under a time budget
        "time_budget_s": run.config.time_budget_s,
        "plan": run.plan,
        "loss_chunk": run.loss_chunk,
        "steps_this_run": run.step - run.start_step,
        "tokens": run.tokens_seen,
        "tokens_per_step": run.tokens_per_step,
        "wall_s": run.wall_s(),
        "wall_s_this_run": time.perf_counter() - run.t_start,
        "train_s": train_s,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_this_run": run.tokens_this_run / run.train_seconds if run.train_seconds > 0 else None,
        "mfu": _mfu(run, tokens_per_s),
        "flops_per_token": run.raw_model.flops_per_token(run.seq_len),
        "peak_flops_per_device": peak_flops(device, run.dtype),
        "checkpoint": run.checkpoint_path,
        "resumed_from": run.resumed_from,
        "world_size": run.d.world_size,
        "grad_accum_steps": run.accum,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(run.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "out_dir": str(run.out_dir),
        "metrics": str(run.metrics_path),
    }
    if run.d.master:
        write_json_atomic(run.out_dir / "summary.json", summary)
        print(f"done {run.config.model}: step {run.step} | train loss {_fmt(summary['final_train_loss'])} | val loss "
              f"{_fmt(summary['final_val_loss'])} | "
              + (f"{tokens_per_s:,.0f} tok/s" if tokens_per_s else "no step timed")
              + (" | nothing left to train" if run.step == run.start_step else "")
              + (f" | mfu {100 * summary['mfu']:.1f}%" if summary["mfu"] else ""), flush=True)
    return summary
