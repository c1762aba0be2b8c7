"""Training: one function for a notebook, the shell, and every rank under ``torchrun``.

    from reflow_core.train import TrainConfig, train
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
* **Safety.**  Checkpoints are atomic safetensors (:mod:`reflow_core.checkpoint`).  A non-finite loss stops the
  run with :class:`TrainingDiverged` before anything of the bad state is written; the last good checkpoint stays.

Host syncs are kept out of the step: losses stay on the device and are read (one sync) only at log, eval and
checkpoint steps, which is also where a divergence is detected (at the exact step it happened).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import signal
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from reflow_core import checkpoint as ckpt_io
from reflow_core.config import ConfigError, ModelConfig, config_from_dict, get_config
from reflow_core.data import get_batch, iter_eval_batches, load_tokens
from reflow_core.model import build_model

# Environment variables read by train() (set by launch(), by torchrun, or by tests).
ENV_PROGRESS = "REFLOW_PROGRESS"  # "lines": no tqdm bar, one printed line per log step (for piped output)
ENV_PEAK_FLOPS = "REFLOW_PEAK_FLOPS"  # peak FLOP/s of one device, for MFU where the table below has none
ENV_KILL_AT_STEP = "REFLOW_KILL_AT_STEP"  # test hook: SIGKILL this process right after that optimizer step

# Dense peak FLOP/s per GPU (no sparsity), matched against torch.cuda.get_device_name().
PEAK_FLOPS = {
    "H100": {"bfloat16": 989e12, "float32": 494.5e12},  # SXM; float32 means TF32 tensor cores
    "H200": {"bfloat16": 989e12, "float32": 494.5e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
}

INIT_DIR = "init"  # out_dir/init: the model at step 0
RESUME_MODES = ("auto", "never", "must")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; the run stopped without saving the bad state."""

    def __init__(self, message: str, *, step: int, loss: float, checkpoint: str | None) -> None:
        super().__init__(message)
        self.step, self.loss, self.checkpoint = step, loss, checkpoint


# ======================================================================================================================
# Configuration
# ======================================================================================================================


@dataclass
class TrainConfig:
    """Everything a run needs; stored in every checkpoint, so a run directory says how it was made."""

    model: str = "reflow@smoke"  # preset name, see reflow_core.config.get_config
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields to change, e.g. {"dropout": 0.1}
    data_dir: str = "data/wiki-offline"  # a prepared dataset (python -m reflow_core prepare)
    out_dir: str = "results/runs/default"  # checkpoint ckpt/, metrics.jsonl, summary.json
    max_steps: int = 1000  # optimizer steps
    tokens_per_step: int | None = None  # global batch in tokens; None: micro_batch_size·block_size·world_size
    micro_batch_size: int = 16  # sequences per forward/backward on one device
    block_size: int | None = None  # training context length; None: the model's block_size
    lr: float = 1e-3
    min_lr: float = 1e-4  # the cosine ends here
    warmup_steps: int = 100
    lr_decay_steps: int | None = None  # step where the cosine reaches min_lr; None: max_steps
    weight_decay: float = 0.1  # on 2-D weights (matmuls, embeddings) only; norms and 1-D params are not decayed
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_interval: int = 250  # evaluate val loss every this many steps (0: only at the end)
    eval_batches: int = 20  # micro-batches of fixed validation windows per evaluation
    ckpt_interval: int = 500  # checkpoint every this many steps (0: only at the end)
    log_interval: int = 10  # metrics line (and the only host sync) every this many steps
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    compile: bool = False  # torch.compile the model
    fused: bool = True  # fused AdamW wherever torch has the kernel (CUDA, and CPU since torch 2.4); False: foreach
    threads: int | None = None  # torch CPU threads for this run; None leaves torch's default
    resume: str = "auto"  # auto: continue from out_dir's checkpoint if there is one | never | must
    save_init: bool = True  # also keep the weights at step 0 as out_dir/init/ (the "before training" null)
    progress: bool = True  # tqdm bar on rank 0

    def __post_init__(self) -> None:
        self.validate()

    # -- construction ------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a train config must be a JSON object / dict, got {type(data).__name__}")
        return config_from_dict(cls, data, "train config")

    @classmethod
    def from_json(cls, path: str | Path) -> "TrainConfig":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"train config {path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        ckpt_io.write_json_atomic(path, self.to_dict())
        return path

    def replace(self, **changes) -> "TrainConfig":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown train config field(s) {unknown}; known fields: {sorted(_field_types())}")
        return dataclasses.replace(self, **changes)

    def with_overrides(self, items: list[str] | None) -> "TrainConfig":
        """Apply ``key=value`` strings (the CLI's ``--set``), each parsed with its field's type."""
        return self.replace(**parse_overrides(items or [], self)) if items else self

    # -- derived values ----------------------------------------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        try:
            return get_config(self.model, **self.model_overrides)
        except ConfigError as e:
            field_name = "model_overrides" if self.model_overrides and "unknown preset" not in str(e) else "model"
            raise ConfigError(f"train config field '{field_name}': {e}") from None

    def seq_len(self) -> int:
        return self.block_size if self.block_size is not None else self.model_config().block_size

    def grad_accum_steps(self, world_size: int = 1) -> int:
        """Micro-batches per rank per step; tokens_per_step must split evenly over ranks and micro-batches."""
        per_micro = self.micro_batch_size * self.seq_len() * world_size
        tokens = self.tokens_per_step if self.tokens_per_step is not None else per_micro
        if tokens % per_micro:
            raise ConfigError(
                f"train config field 'tokens_per_step': {tokens} is not a multiple of micro_batch_size × block_size × "
                f"world_size = {self.micro_batch_size} × {self.seq_len()} × {world_size} = {per_micro}; "
                f"try {max(per_micro, tokens // per_micro * per_micro)}"
            )
        return tokens // per_micro

    # -- validation --------------------------------------------------------------------------------------------------
    def validate(self, world_size: int = 1) -> "TrainConfig":
        """Check every field; the ConfigError names the first bad one.  Returns self."""
        types = _field_types()
        for name, tp in types.items():
            value = getattr(self, name)
            if not _is_instance(value, tp):
                raise ConfigError(f"train config field '{name}' must be {_type_name(tp)}, got {value!r} "
                                  f"({type(value).__name__})")
            if _base_type(tp) is float and isinstance(value, int):
                object.__setattr__(self, name, float(value))

        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"train config field '{name}' {why} (got {getattr(self, name)!r})")

        for name in ("max_steps", "micro_batch_size", "eval_batches", "log_interval"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be a positive integer")
        for name in ("warmup_steps", "eval_interval", "ckpt_interval", "seed"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        for name in ("tokens_per_step", "block_size", "lr_decay_steps", "threads"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise bad(name, "must be a positive integer or None")
        if not self.model:
            raise bad("model", "must name a preset")
        if not self.data_dir:
            raise bad("data_dir", "must be a path")
        if not self.out_dir:
            raise bad("out_dir", "must be a path")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", "must be a positive finite number")
        if not (0 <= self.min_lr <= self.lr):
            raise bad("min_lr", f"must be in [0, lr={self.lr}]")
        if self.warmup_steps > self.max_steps:
            raise bad("warmup_steps", f"must be <= max_steps={self.max_steps}")
        if self.lr_decay_steps is not None and self.lr_decay_steps < self.warmup_steps:
            raise bad("lr_decay_steps", f"must be >= warmup_steps={self.warmup_steps}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise bad("weight_decay", "must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise bad(name, "must be in [0, 1)")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise bad("grad_clip", "must be >= 0 (0 disables clipping)")
        if self.device not in DEVICES:
            raise bad("device", f"must be one of {DEVICES}")
        if self.dtype not in DTYPES:
            raise bad("dtype", f"must be one of {DTYPES} (float16 would need loss scaling; use bfloat16)")
        if self.resume not in RESUME_MODES:
            raise bad("resume", f"must be one of {RESUME_MODES}")
        model_block = self.model_config().block_size
        if self.block_size is not None and self.block_size > model_block:
            raise bad("block_size", f"must be <= the model's block_size {model_block}")
        self.grad_accum_steps(world_size)
        return self


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def _base_type(tp) -> type:
    """int for ``int | None``, etc."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _is_instance(value, tp) -> bool:
    optional = type(None) in typing.get_args(tp)
    if value is None:
        return optional
    base = _base_type(tp)
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, base)


def _type_name(tp) -> str:
    name = _base_type(tp).__name__
    return f"{name} or None" if type(None) in typing.get_args(tp) else name


def _parse_value(text: str, tp, what: str):
    """A CLI string as a value of type ``tp`` (bool: true/false/1/0/yes/no; None: none/null; dict: JSON)."""
    if type(None) in typing.get_args(tp) and text.strip().lower() in ("none", "null"):
        return None
    base = _base_type(tp)
    try:
        if base is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        if base is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError
            return value
        return base(text)
    except ValueError:
        raise ConfigError(f"--set {what}={text!r}: cannot parse as {_type_name(tp)}") from None


def parse_overrides(items: list[str], base: TrainConfig | None = None) -> dict:
    """``["lr=3e-4", "max_steps=200", "model_overrides.dropout=0.1"]`` → field values of the right types."""
    types = _field_types()
    model_types = typing.get_type_hints(ModelConfig)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        if key.startswith("model_overrides."):
            sub = key.split(".", 1)[1]
            if sub not in model_types:
                raise ConfigError(f"--set {key}: unknown model config field '{sub}'; known: {sorted(model_types)}")
            overrides = dict(out.get("model_overrides", base.model_overrides if base else {}))
            overrides[sub] = _parse_value(text, model_types[sub], key)
            out["model_overrides"] = overrides
        elif key in types:
            out[key] = _parse_value(text, types[key], key)
        else:
            raise ConfigError(f"--set: unknown train config field '{key}'; known fields: {sorted(types)}")
    return out


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


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of one device for MFU: REFLOW_PEAK_FLOPS if set, else the table for known GPUs, else None."""
    env = os.environ.get(ENV_PEAK_FLOPS)
    if env:
        return float(env)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, by_dtype in PEAK_FLOPS.items():
        if key in name:
            return by_dtype["bfloat16" if dtype == torch.bfloat16 else "float32"]
    return None


@dataclass
class Dist:
    """Where this process sits in a (possibly one-process) job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # we called init_process_group, so we destroy it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_type: str) -> Dist:
    """Read torchrun's RANK/LOCAL_RANK/WORLD_SIZE; join the process group (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return Dist(dist.get_rank(), local_rank, dist.get_world_size(), owns_group=False)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    return Dist(rank, local_rank, world, owns_group=True)


def _resolve_device(config: TrainConfig, d: Dist) -> torch.device:
    cuda = torch.cuda.is_available()
    if config.device == "cuda" and not cuda:
        raise ConfigError("train config field 'device' is 'cuda' but no CUDA device is available "
                          f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
    if config.device == "cpu" or not cuda:
        return torch.device("cpu")
    return torch.device("cuda", d.local_rank)


def _resolve_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "float32":
        return torch.float32
    if config.dtype == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return t


@torch.no_grad()
def autocast_for(device_type: str, dtype: torch.dtype):
    """A factory of the forward pass's context: autocast to ``dtype``, or nothing at float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type, dtype=dtype)


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
    _all_reduce_sum(total, d)
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
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device_type = "cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu"
    d = _setup_distributed(device_type)
    try:
        return _train(config, d)
    finally:
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(previous_threads)


def _train(config: TrainConfig, d: Dist) -> dict:
    config.validate(d.world_size)
    device = _resolve_device(config, d)
    dtype = _resolve_dtype(config, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = autocast_for(device.type, dtype)
    out_dir = Path(config.out_dir)
    metrics_path = out_dir / "metrics.jsonl"
    T = config.seq_len()
    accum = config.grad_accum_steps(d.world_size)
    tokens_per_step = config.micro_batch_size * T * accum * d.world_size

    # data first: a missing dataset should fail before any model is built
    train_tokens = load_tokens(config.data_dir, "train")
    val_tokens = load_tokens(config.data_dir, "val")
    for split, toks in (("train", train_tokens), ("val", val_tokens)):
        if len(toks) <= T:
            raise ConfigError(f"train config field 'block_size': the {split} split of {config.data_dir} has "
                              f"{len(toks)} tokens, too few for windows of {T}+1")

    model_config = config.model_config()
    # Initialise on the CPU from the seed, then move: the same initial weights on every rank and on every kind of
    # device, so a step-0 model can be rebuilt anywhere from (preset, seed) alone.
    torch.manual_seed(config.seed)
    model = build_model(model_config, "cpu").to(device)
    raw_model = model
    optimizer = make_optimizer(raw_model, config, device.type)

    # resume
    start_step, tokens_seen, wall_before, resumed_from = 0, 0, 0.0, None
    last = {"train_loss": None, "val_loss": None}
    found = ckpt_io.find_checkpoint(out_dir) if config.resume != "never" else None
    if config.resume == "must" and found is None:
        raise ckpt_io.CheckpointNotFoundError(f"resume='must' but there is no checkpoint in {out_dir}")
    checkpoint_path = None
    if found is not None:
        state, opt_tensors, meta = ckpt_io.load_checkpoint(found)
        _check_compatible(meta, model_config, config)
        raw_model.load_state_dict(state, strict=True)
        ckpt_io.load_optimizer_state(optimizer, raw_model, opt_tensors or {}, meta)
        ckpt_io.restore_rng_state(meta["rng"])
        start_step, tokens_seen = meta["step"], meta["tokens_seen"]
        wall_before = meta["extra"].get("wall_s", 0.0)
        last = {k: meta["extra"].get(k) for k in last}
        resumed_from, checkpoint_path = start_step, str(found)
        changed = {k: (v, config.to_dict()[k]) for k, v in (meta.get("train_config") or {}).items()
                   if k in config.to_dict() and config.to_dict()[k] != v and k not in ("resume", "progress")}
        if d.master and changed:
            print(f"note: resuming with changed settings {changed}", flush=True)
        del state, opt_tensors

    if resumed_from is None and config.save_init and d.master:
        ckpt_io.save_checkpoint(out_dir, raw_model, None, step=0, config=config, name=INIT_DIR,
                                extra={"note": "weights at initialisation, before any training step"})

    if config.compile:
        model = torch.compile(model)
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[d.local_rank] if device.type == "cuda" else None)

    flops_per_token = raw_model.flops_per_token(T)
    peak = peak_flops(device, dtype)
    if d.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resumed_from is None:
            metrics_path.write_text("")
        else:
            _trim_metrics(metrics_path, resumed_from)
        print(f"train {config.model}: {raw_model.num_params():,} params | device {device} {str(dtype)[6:]} | "
              f"world {d.world_size} × accum {accum} × micro {config.micro_batch_size} × {T} = "
              f"{tokens_per_step:,} tokens/step | steps {start_step}->{config.max_steps}"
              + (f" (resumed from {checkpoint_path})" if resumed_from is not None else ""), flush=True)
    metrics_file = open(metrics_path, "a") if d.master else None
    progress = _Progress(config, d, start_step)
    kill_at = int(os.environ.get(ENV_KILL_AT_STEP, "0") or 0)

    pending: list[tuple[int, torch.Tensor]] = []  # (step, [loss, grad_norm]) on the device, read at sync points
    t_start = time.perf_counter()
    t_interval, tokens_interval = time.perf_counter(), 0  # restarted after eval/checkpoint: tokens/s is training only
    train_seconds, tokens_this_run = 0.0, 0
    step = start_step
    model.train()

    def sync_losses() -> tuple[float, float]:
        """The one host sync: read pending losses, stop on the first non-finite one."""
        nonlocal pending
        steps = [s for s, _ in pending]
        values = torch.stack([v for _, v in pending])
        _all_reduce_sum(values, d)
        values = (values / d.world_size).tolist()
        pending = []
        for s, (loss, gnorm) in zip(steps, values):
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                what = f"loss={loss}" if not math.isfinite(loss) else f"loss={loss:.4f} but grad norm={gnorm}"
                saved = f"{checkpoint_path} (step {ckpt_step})" if checkpoint_path else "none was written"
                raise TrainingDiverged(
                    f"training diverged at step {s}: {what}. Nothing was saved after it; the last good checkpoint "
                    f"is {saved}. Try a lower lr (now {config.lr:g}), a longer warmup (now {config.warmup_steps} "
                    f"steps) or gradient clipping (grad_clip now {config.grad_clip:g}).",
                    step=s, loss=loss, checkpoint=checkpoint_path)
        return values[-1][0], values[-1][1]

    ckpt_step = start_step if resumed_from is not None else None
    try:
        while step < config.max_steps:
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(stream_seed(config.seed, step, d.rank, DROPOUT_STREAM))
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                gen = torch.Generator().manual_seed(
                    stream_seed(config.seed, step, d.rank * accum + micro, DATA_STREAM))
                x, y = get_batch(train_tokens, config.micro_batch_size, T, gen, device)
                last_micro = micro == accum - 1
                no_sync = model.no_sync() if d.enabled and not last_micro else contextlib.nullcontext()
                with no_sync:
                    with autocast():
                        _, loss = model(x, y, return_logits=False)
                    loss = loss / accum
                    loss.backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                raw_model.parameters(), config.grad_clip if config.grad_clip > 0 else float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            tokens_interval += tokens_per_step
            tokens_this_run += tokens_per_step
            pending.append((step, torch.stack([loss_sum.float(), grad_norm.float()])))
            if step == kill_at:  # test hook: die the hard way, mid-run, as a crash or an OOM kill would
                os.kill(os.getpid(), signal.SIGKILL)

            final = step == config.max_steps
            do_log = step % config.log_interval == 0 or final
            do_eval = (config.eval_interval > 0 and step % config.eval_interval == 0) or final
            do_ckpt = (config.ckpt_interval > 0 and step % config.ckpt_interval == 0) or final
            record = None
            if do_log or do_eval or do_ckpt:
                train_loss, gnorm = sync_losses()
                last["train_loss"] = train_loss
                elapsed = time.perf_counter() - t_interval
                train_seconds += elapsed
                if do_log or do_eval:
                    val_loss = evaluate(raw_model, val_tokens, config, device, autocast, d) if do_eval else None
                    if val_loss is not None:
                        last["val_loss"] = val_loss
                        if not math.isfinite(val_loss):
                            raise TrainingDiverged(
                                f"training diverged at step {step}: val loss={val_loss} (train loss {train_loss}). "
                                f"Try a lower lr (now {config.lr:g}).",
                                step=step, loss=val_loss, checkpoint=checkpoint_path)
                    tok_s = tokens_interval / elapsed if elapsed > 0 and tokens_interval else None
                    record = {
                        "step": step, "tokens": tokens_seen, "lr": lr, "train_loss": train_loss,
                        "val_loss": val_loss, "grad_norm": gnorm, "tokens_per_s": tok_s,
                        "mfu": flops_per_token * tok_s / (peak * d.world_size) if peak and tok_s else None,
                        "wall_s": wall_before + time.perf_counter() - t_start,
                    }
                    if metrics_file is not None:
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                    if do_eval and progress.bar is not None:
                        progress.write(_format_record(record))
                if do_ckpt:
                    if d.master:
                        extra = {**last, "wall_s": wall_before + time.perf_counter() - t_start,
                                 "world_size": d.world_size, "device": str(device), "dtype": str(dtype)}
                        checkpoint_path = str(ckpt_io.save_checkpoint(
                            out_dir, raw_model, optimizer, step=step, config=config, tokens_seen=tokens_seen,
                            extra=extra))
                    else:
                        checkpoint_path = str(out_dir / ckpt_io.CKPT_DIR)
                    ckpt_step = step
                t_interval, tokens_interval = time.perf_counter(), 0
            progress.update(1, record)
    finally:
        progress.close()
        if metrics_file is not None:
            metrics_file.close()

    if d.enabled:
        dist.barrier()
    tokens_per_s = tokens_this_run / train_seconds if train_seconds > 0 else None
    summary = {
        "model": config.model,
        "num_params": raw_model.num_params(),
        "final_train_loss": last["train_loss"],
        "final_val_loss": last["val_loss"],
        "steps": step,
        "steps_this_run": step - start_step,
        "tokens": tokens_seen,
        "tokens_per_step": tokens_per_step,
        "wall_s": wall_before + time.perf_counter() - t_start,
        "wall_s_this_run": time.perf_counter() - t_start,
        "tokens_per_s": tokens_per_s,
        "mfu": flops_per_token * tokens_per_s / (peak * d.world_size) if peak and tokens_per_s else None,
        "flops_per_token": flops_per_token,
        "peak_flops_per_device": peak,
        "checkpoint": checkpoint_path,
        "resumed_from": resumed_from,
        "world_size": d.world_size,
        "grad_accum_steps": accum,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "out_dir": str(out_dir),
        "metrics": str(metrics_path),
    }
    if d.master:
        ckpt_io.write_json_atomic(out_dir / "summary.json", summary)
        print(f"done {config.model}: step {step} | train loss {_fmt(summary['final_train_loss'])} | val loss "
              f"{_fmt(summary['final_val_loss'])} | "
              + (f"{tokens_per_s:,.0f} tok/s" if tokens_per_s else "no steps run")
              + (f" | mfu {100 * summary['mfu']:.1f}%" if summary["mfu"] else ""), flush=True)
    return summary


# ======================================================================================================================
# Command line (wired into `python -m reflow_core train` by cli.py)
# ======================================================================================================================


def _fields_help() -> str:
    defaults = TrainConfig(model="reflow@test").to_dict()
    defaults["model"] = TrainConfig.model
    return "config fields (--set KEY=VALUE; defaults in brackets):\n" + "\n".join(
        f"  {name:<18} {_type_name(tp):<14} [{defaults[name]!r}]" for name, tp in _field_types().items())


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _fields_help()
    parser.add_argument("--config", type=Path, default=None, help="a TrainConfig as JSON (e.g. from launch())")
    parser.add_argument("--preset", default=None, help="model preset, e.g. reflow@smoke (sets 'model')")
    parser.add_argument("--data-dir", default=None, help="prepared dataset directory (sets 'data_dir')")
    parser.add_argument("--out-dir", default=None, help="run directory (sets 'out_dir')")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, parsed with its type; repeatable "
                             "(e.g. --set max_steps=200 --set lr=3e-4 --set model_overrides.dropout=0.1)")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    config = TrainConfig.from_json(args.config) if args.config else TrainConfig()
    changes = {k: v for k, v in (("model", args.preset), ("data_dir", args.data_dir), ("out_dir", args.out_dir))
               if v is not None}
    return config.replace(**changes).with_overrides(args.overrides)


def run_train_cli(args: argparse.Namespace) -> dict:
    summary = train(config_from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:
        print("summary: " + json.dumps(summary), flush=True)
    return summary
