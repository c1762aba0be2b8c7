"""Configurations: models and their named presets (paper sizes and our small scales), and training runs.

Presets are addressed as ``family@size`` (``reflow@smoke``, ``gpt2-new@test``) or by the paper's
own names (``reflow-1``, ``reflow-1-big``, ``reflow-1-small``, ``gpt2``, ``gpt2-new``, …).  A bare
family name means its paper-size preset.

The paper's parameter counts follow nanoGPT conventions: vocabulary padded to 50304, no biases,
norms with a weight only.  The MLP width rule that reproduces all published counts is
``hidden = 4d`` for GPT-2 and ``hidden = 256·ceil((8d/3)/256)`` (SwiGLU, rounded up to a multiple of
256) for the new-style blocks; ``tests/test_model.py`` checks each count exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reflow_core.errors import ConfigError
from reflow_core.fileio import write_json_atomic

GPT2_VOCAB_SIZE = 50257
PADDED_VOCAB_SIZE = 50304  # next multiple of 64: faster matmuls, as nanoGPT

BLOCK_STYLES = ("gpt2", "new")
VOCAB_STYLES = ("tied", "factored", "topk", "rmg", "routed")


def swiglu_hidden(d_model: int, multiple_of: int = 256) -> int:
    return multiple_of * math.ceil((8 * d_model / 3) / multiple_of)


@dataclass
class ModelConfig:
    n_layer: int
    n_head: int
    d_model: int
    block_style: str = "new"
    vocab_style: str = "factored"
    n_signals: int = 0  # S, the number of signals (factored vocabularies only)
    n_kv_head: int | None = None  # grouped-query attention when < n_head
    mlp_hidden: int | None = None  # None: the block style's rule (4d or the SwiGLU rule)
    block_size: int = 1024
    vocab_size: int = PADDED_VOCAB_SIZE  # rows of the vocabulary matrices (padded to a multiple of 64)
    real_vocab_size: int = GPT2_VOCAB_SIZE  # GPT-2 ids; ids at or above this are padding, never sampled
    compact_vocab: int = 0  # K > 0: own rows for K ids (the corpus's most frequent) + one shared tail row; 0: all
    topk: int = 64
    target_rate: float = 0.0625  # activation rate held by the soft-sparsity vocabularies (rmg, routed)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    init_std: float = 0.02

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def n_rows(self) -> int:
        """Rows of the vocabulary matrices that stand for tokens: every GPT-2 id, or K own rows plus the tail row."""
        return self.compact_vocab + 1 if self.compact_vocab else self.real_vocab_size

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return 4 * self.d_model if self.block_style == "gpt2" else swiglu_hidden(self.d_model)

    def validate(self) -> "ModelConfig":
        def bad(field_name: str, why: str) -> ConfigError:
            return ConfigError(f"model config field '{field_name}': {why} (got {getattr(self, field_name)!r})")

        for name in ("n_layer", "n_head", "d_model", "block_size", "vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise bad(name, "must be a positive integer")
        if self.block_style not in BLOCK_STYLES:
            raise bad("block_style", f"must be one of {BLOCK_STYLES}")
        if self.vocab_style not in VOCAB_STYLES:
            raise bad("vocab_style", f"must be one of {VOCAB_STYLES}")
        if self.d_model % self.n_head:
            raise bad("n_head", f"must divide d_model={self.d_model}")
        if self.block_style == "new" and (self.d_model // self.n_head) % 2:
            raise bad("n_head", "RoPE needs an even head dimension")
        if self.n_kv_head is not None and (self.n_kv_head <= 0 or self.n_head % self.n_kv_head):
            raise bad("n_kv_head", f"must be a positive divisor of n_head={self.n_head}")
        if self.vocab_style != "tied" and self.n_signals <= 0:
            raise bad("n_signals", "a factored vocabulary needs n_signals > 0")
        if self.vocab_style == "topk" and not 0 < self.topk <= self.n_signals:
            raise bad("topk", f"must be in 1..n_signals={self.n_signals}")
        if not (isinstance(self.target_rate, (int, float)) and 0.0 < self.target_rate <= 1.0):
            raise bad("target_rate", "must be in (0, 1]")
        if self.block_style == "gpt2" and self.n_kv_head not in (None, self.n_head):
            raise bad("n_kv_head", "grouped-query attention is only defined for new-style blocks")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "must be in [0, 1)")
        if not isinstance(self.compact_vocab, int) or not 0 <= self.compact_vocab < self.real_vocab_size:
            raise bad("compact_vocab", f"must be 0 (the full vocabulary) or in 1..{self.real_vocab_size - 1}")
        if not self.n_rows <= self.vocab_size:
            raise bad("vocab_size", f"must hold the {self.n_rows} token rows")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return config_from_dict(cls, data, "model config").validate()

    def replace(self, **overrides) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(self)}
        for key in overrides:
            if key not in known:
                raise ConfigError(f"unknown model config field '{key}'; known fields: {sorted(known)}")
        return dataclasses.replace(self, **overrides).validate()


def config_from_dict(cls, data: dict, what: str):
    """Build a dataclass from a dict, naming any unknown or missing field in the error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {what} field(s) {unknown}; known fields: {sorted(fields)}")
    missing = [
        name for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and name not in data
    ]
    if missing:
        raise ConfigError(f"{what} is missing required field(s) {missing}")
    return cls(**data)


# ----------------------------------------------------------------------------------------------
# Presets

FAMILIES = {
    # family: (block_style, vocab_style, extra fields)
    "gpt2": ("gpt2", "tied", {}),
    "gpt2-new": ("new", "tied", {}),
    "reflow": ("new", "factored", {}),
    "reflow-topk": ("new", "topk", {}),
    "reflow-lite": ("new", "factored", {"lite": True}),
    "reflow-rmg": ("new", "rmg", {}),
    "reflow-routed": ("new", "routed", {}),
}

# Sizes for our scales.  `n_signals` equals `d_model` at every size, as in the paper's configs.
SIZES = {
    "test": dict(n_layer=2, n_head=2, d_model=32, n_signals=32, block_size=64, topk=8),
    # smoke: a compact vocabulary, own rows for the 8,192 ids most frequent in its corpus + one tail row (≈2.9× the
    # tokens/s of the full GPT-2 vocabulary at this width on a CPU, where the head is most of the work)
    "smoke": dict(n_layer=6, n_head=4, d_model=128, n_signals=128, block_size=128, topk=16,
                  compact_vocab=8192, vocab_size=8193),
    # the same shape over the full vocabulary: the smoke recipe before the compact vocabulary (the bench compares)
    "smoke-full": dict(n_layer=6, n_head=4, d_model=128, n_signals=128, block_size=128, topk=16),
    "small": dict(n_layer=6, n_head=8, d_model=512, n_signals=512, block_size=1024, topk=64),
}

# The paper's published configurations, named as the reFlow repository names them.
PAPER_PRESETS: dict[str, ModelConfig] = {
    "gpt2": ModelConfig(n_layer=36, n_head=16, d_model=1024, block_style="gpt2", vocab_style="tied"),
    "gpt2-new": ModelConfig(n_layer=36, n_head=16, d_model=1024, vocab_style="tied"),
    "reflow-1": ModelConfig(n_layer=32, n_head=16, d_model=1024, n_signals=1024),
    "reflow-1-big": ModelConfig(n_layer=36, n_head=16, d_model=1024, n_signals=1024),
    "reflow-1-topk-big": ModelConfig(n_layer=36, n_head=16, d_model=1024, n_signals=1024, vocab_style="topk"),
    # GQA 16:4 reproduces the published 413.34M exactly with the SwiGLU width rule.
    "reflow-1-lite": ModelConfig(n_layer=32, n_head=16, d_model=1024, n_signals=1024, n_kv_head=4),
    "reflow-1-small": ModelConfig(n_layer=6, n_head=8, d_model=512, n_signals=512),
}

# Published totals (millions, two decimals) — what `PAPER_PRESETS` must reproduce.
PUBLISHED_PARAMS_M = {
    "gpt2": 505.62,
    "gpt2-new": 514.01,
    "reflow-1": 463.67,
    "reflow-1-big": 515.06,
    "reflow-1-topk-big": 515.06,
    "reflow-1-lite": 413.34,
    "reflow-1-small": 46.47,
}

FAMILY_AT_PAPER_SIZE = {
    "gpt2": "gpt2",
    "gpt2-new": "gpt2-new",
    "reflow": "reflow-1-big",  # depth-matched to GPT-2-New, the paper's interpretability model
    "reflow-topk": "reflow-1-topk-big",
    "reflow-lite": "reflow-1-lite",
    # not published: the soft-sparsity follow-ups take the Top-K model's size and its rate K/S (64/1024 = 6.25%)
    "reflow-rmg": "reflow-1-topk-big",
    "reflow-routed": "reflow-1-topk-big",
}


def _paper_config(family: str) -> ModelConfig:
    config = PAPER_PRESETS[FAMILY_AT_PAPER_SIZE[family]]
    vocab_style = FAMILIES[family][1]
    if vocab_style in ("rmg", "routed"):
        config = config.replace(vocab_style=vocab_style, target_rate=config.topk / config.n_signals)
    return config


def _family_config(family: str, size: str) -> ModelConfig:
    block_style, vocab_style, extra = FAMILIES[family]
    fields = dict(SIZES[size])
    if vocab_style in ("rmg", "routed"):  # soft sparsity at the Top-K variant's activation rate: K / S
        fields["target_rate"] = fields["topk"] / fields["n_signals"]
    if block_style == "gpt2":
        fields.pop("n_signals")
    if vocab_style != "topk":
        fields.pop("topk")
    if extra.get("lite"):
        fields["n_kv_head"] = max(1, fields["n_head"] // 4)
    if vocab_style == "tied":
        fields.pop("n_signals", None)
    return ModelConfig(block_style=block_style, vocab_style=vocab_style, **fields).validate()


def preset_names() -> list[str]:
    sized = [f"{family}@{size}" for family in FAMILIES for size in (*SIZES, "paper")]
    return sorted(set(PAPER_PRESETS) | set(FAMILIES) | set(sized))


def get_config(name: str, **overrides) -> ModelConfig:
    """Resolve a preset name (``reflow@smoke``, ``reflow-1-big``, ``gpt2``…) to a validated config."""
    family, _, size = name.partition("@")
    if not size:
        config = PAPER_PRESETS.get(name) or (
            _paper_config(name) if name in FAMILY_AT_PAPER_SIZE else None
        )
    elif family in FAMILIES and size == "paper":
        config = _paper_config(family)
    elif family in FAMILIES and size in SIZES:
        config = _family_config(family, size)
    else:
        config = None
    if config is None:
        raise ConfigError(f"unknown preset '{name}'; known presets: {', '.join(preset_names())}")
    return config.replace(**overrides) if overrides else config.validate()


# ----------------------------------------------------------------------------------------------
# Training runs: what a run needs, validated field by field

RESUME_MODES = ("auto", "never", "must")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class TrainConfig:
    """Everything a run needs; stored in every checkpoint, so a run directory says how it was made."""

    model: str = "reflow@smoke"  # preset name, see reflow_core.config.get_config
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields to change, e.g. {"dropout": 0.1}
    data_dir: str = "data/wiki-offline"  # a prepared dataset (python -m reflow_core prepare)
    out_dir: str = "results/runs/default"  # checkpoint ckpt/, metrics.jsonl, summary.json
    max_steps: int = 1000  # optimizer steps (with time_budget_s: the most the run may take)
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
    eval_interval: int = 250  # val loss every this many steps (0: only at the end), and at every checkpoint
    eval_batches: int = 20  # micro-batches of fixed validation windows per evaluation
    ckpt_interval: int = 500  # checkpoint every this many steps (0: only at the end)
    log_interval: int = 10  # metrics line (and the only host sync) every this many steps
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA and on CPUs with native bf16, else fp32) | float32 | bfloat16
    compile: bool = False  # torch.compile the model
    # Wall seconds for the whole run (from train() until its final checkpoint). Set: after the first
    # reflow_core.train.PLAN_AFTER_STEPS steps the measured step time fixes max_steps (never above the configured one)
    # so that the run *ends* on budget, the cosine decaying over the steps it will really take; the checkpoint
    # stores the planned max_steps and a resume keeps it. None: run max_steps.
    time_budget_s: float | None = None
    fused: bool = True  # fused AdamW wherever torch has the kernel (CUDA, and CPU since torch 2.4); False: foreach
    threads: int | None = None  # torch CPU threads for this run; None leaves torch's default
    resume: str = "auto"  # auto: continue from out_dir's checkpoint if there is one | never | must
    save_init: bool = True  # also keep the weights at step 0 as out_dir/init/ (the "before training" null)
    snapshots: bool = False  # also keep the weights of every checkpoint step as out_dir/snapshots/step-<N>/
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
        except FileNotFoundError:
            raise ConfigError(f"train config {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"train config {path} cannot be read: {e}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, self.to_dict())
        return path

    def replace(self, **changes) -> "TrainConfig":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown train config field(s) {unknown}; known fields: {sorted(train_field_types())}")
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
        types = train_field_types()
        for name, tp in types.items():
            value = getattr(self, name)
            if not _is_instance(value, tp):
                raise ConfigError(f"train config field '{name}' must be {type_name(tp)}, got {value!r} "
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
        if self.time_budget_s is not None and not (math.isfinite(self.time_budget_s) and self.time_budget_s > 0):
            raise bad("time_budget_s", "must be a positive number of seconds or None")
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


def train_field_types() -> dict[str, Any]:
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


def type_name(tp) -> str:
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
        raise ConfigError(f"--set {what}={text!r}: cannot parse as {type_name(tp)}") from None


def parse_overrides(items: list[str], base: TrainConfig | None = None) -> dict:
    """``["lr=3e-4", "max_steps=200", "model_overrides.dropout=0.1"]`` → field values of the right types."""
    types = train_field_types()
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

