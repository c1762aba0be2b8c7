"""Model configurations and the named presets (paper sizes and our small scales).

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
import math
from dataclasses import dataclass

GPT2_VOCAB_SIZE = 50257
PADDED_VOCAB_SIZE = 50304  # next multiple of 64: faster matmuls, as nanoGPT

BLOCK_STYLES = ("gpt2", "new")
VOCAB_STYLES = ("tied", "factored", "topk", "rmg", "routed")


class ConfigError(ValueError):
    """A configuration field is unknown or has a bad value; the message names the field."""


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
    vocab_size: int = PADDED_VOCAB_SIZE
    real_vocab_size: int = GPT2_VOCAB_SIZE  # ids at or above this are padding, never sampled
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
        if not self.real_vocab_size <= self.vocab_size:
            raise bad("real_vocab_size", f"must be <= vocab_size={self.vocab_size}")
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
    "smoke": dict(n_layer=6, n_head=4, d_model=128, n_signals=128, block_size=128, topk=16),
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
