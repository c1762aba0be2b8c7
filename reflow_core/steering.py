"""Steering a reFlow model by writing into its residual stream, and the live control panel.

Everything here works on the *layer states* h_0 … h_L of :mod:`reflow_core.hooks`. Injecting at layer l means
h_l ← h_l + α·v̂ at every position, v̂ a unit direction in model space; injecting over a layer range does it at each
layer of the range (the pushes add up along the residual stream).

Directions come from the model's own vocabulary module, so they are expressed in the signal basis the book reads:

* ``sentiment`` — mean recipe of positive words minus mean recipe of negative words, mapped to model space through
  W_basis (the difference of their mean embeddings; for a tied model the embeddings themselves);
* ``concept`` — the embedding row of one word (its recipe times W_basis);
* ``signal`` — one basis row b_j of W_basis (pushing along it raises signal j's read-out).

The pure function :func:`steer` applies a :class:`SteeringSpec` and returns the generated text and the next-token
top-k distribution (steered and unsteered); :func:`steering_panel` wraps it in ipywidgets for a live kernel.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from reflow_core import tokenizer
from reflow_core.hooks import encode_prompt, injected, last_logits
from reflow_core.stimuli import NOT_IN_VOCABULARY, sentiment_ids

DIRECTION_KINDS = ("sentiment", "concept", "signal")


# ----------------------------------------------------------------------------------------------
# Directions


@torch.no_grad()
def sentiment_direction(model, positive: list[int] | None = None, negative: list[int] | None = None) -> torch.Tensor:
    """Mean embedding(positive) − mean embedding(negative), unit norm. For reFlow this is the mean recipe difference
    mapped to model space by W_basis (the embedding of a token is its recipe row times W_basis)."""
    if positive is None or negative is None:
        positive, negative = sentiment_ids(model.vocab)
    v = model.vocab.embed(torch.as_tensor(positive, device=model.device)).mean(0)
    v = v - model.vocab.embed(torch.as_tensor(negative, device=model.device)).mean(0)
    return (v / v.norm().clamp_min(1e-12)).detach()


@torch.no_grad()
def concept_direction(model, token_id: int) -> torch.Tensor:
    """The unit embedding row of one token (refused for a token without a row of its own)."""
    if not bool(model.vocab.has_own_row([token_id])[0]):
        raise ValueError(f"{tokenizer.decode([token_id])!r} is {NOT_IN_VOCABULARY}")
    v = model.vocab.embed(torch.as_tensor([token_id], device=model.device))[0]
    return (v / v.norm().clamp_min(1e-12)).detach()


@torch.no_grad()
def signal_direction(model, signal: int) -> torch.Tensor:
    if not model.is_factored:
        raise TypeError("a signal direction needs a factored (reFlow) vocabulary")
    b = model.vocab.basis[signal]
    return (b / b.norm().clamp_min(1e-12)).detach()


def random_directions(n: int, d: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
    """``n`` unit directions uniform on the sphere: the null for every steering effect."""
    g = torch.randn(n, d, generator=generator)
    return (g / g.norm(dim=1, keepdim=True)).to(device)


def direction_for(model, kind: str, *, word: str | None = None, signal: int | None = None) -> torch.Tensor:
    """The unit direction a steering spec names (see module docstring)."""
    if kind == "sentiment":
        return sentiment_direction(model)
    if kind == "concept":
        if not word:
            raise ValueError("a concept direction needs a word")
        tid = tokenizer.single_token_id(word) or tokenizer.single_token_id(" " + word.strip())
        if tid is None:
            raise ValueError(f"{word!r} is not a single GPT-2 token (try a leading space, e.g. ' cat')")
        return concept_direction(model, tid)
    if kind == "signal":
        if signal is None or not 0 <= int(signal) < model.config.n_signals:
            raise ValueError(f"signal must be in 0..{model.config.n_signals - 1}")
        return signal_direction(model, int(signal))
    raise ValueError(f"direction kind must be one of {DIRECTION_KINDS}, got {kind!r}")


# ----------------------------------------------------------------------------------------------
# Measurements under steering


def log_mass(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """log Σ_{i∈ids} p_i for the last dimension of ``logits``."""
    return torch.logsumexp(F.log_softmax(logits.float(), dim=-1)[..., ids], dim=-1)


def sentiment_score(logits: torch.Tensor, positive: list[int], negative: list[int]) -> torch.Tensor:
    """Positive minus negative next-token log-mass: > 0 means the model leans positive."""
    return log_mass(logits, positive) - log_mass(logits, negative)


@dataclass
class SteeringSpec:
    prompt: str
    layers: tuple[int, int] = (0, 0)
    alpha: float = 0.0
    kind: str = "sentiment"
    word: str = ""
    signal: int = 0
    max_new_tokens: int = 16
    top_k: int = 10


@dataclass
class SteeringOutput:
    spec: dict
    text: str  # prompt + steered greedy continuation
    continuation: str
    baseline_continuation: str
    top_tokens: list[str] = field(default_factory=list)
    top_probs: list[float] = field(default_factory=list)
    baseline_top_tokens: list[str] = field(default_factory=list)
    baseline_top_probs: list[float] = field(default_factory=list)


def _topk(logits: torch.Tensor, k: int) -> tuple[list[str], list[float]]:
    p = F.softmax(logits.float(), dim=-1)[0]
    vals, ids = p.topk(k)
    return [tokenizer.decode([i]) for i in ids.tolist()], [float(v) for v in vals]


@torch.no_grad()
def steer(model, spec: SteeringSpec) -> SteeringOutput:
    """Apply ``spec``: greedy continuation and next-token top-k with and without the injection (deterministic)."""
    idx = encode_prompt(model, spec.prompt)
    v = direction_for(model, spec.kind, word=spec.word, signal=spec.signal)
    n0 = idx.shape[1]
    base_logits = last_logits(model, idx)
    base = model.generate(idx, spec.max_new_tokens, temperature=0.0)
    with injected(model, v, tuple(spec.layers), spec.alpha):
        logits = last_logits(model, idx)
        out = model.generate(idx, spec.max_new_tokens, temperature=0.0)
    cont = tokenizer.decode(out[0, n0:])
    top_t, top_p = _topk(logits, spec.top_k)
    btop_t, btop_p = _topk(base_logits, spec.top_k)
    return SteeringOutput(
        spec=asdict(spec), text=spec.prompt + cont, continuation=cont,
        baseline_continuation=tokenizer.decode(base[0, n0:]),
        top_tokens=top_t, top_probs=top_p, baseline_top_tokens=btop_t, baseline_top_probs=btop_p,
    )


def plot_steering(result: SteeringOutput, ax=None):
    """Bar chart of the steered next-token top-k, with the unsteered probability of the same tokens."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.2))
    base = dict(zip(result.baseline_top_tokens, result.baseline_top_probs))
    y = range(len(result.top_tokens))[::-1]
    ax.barh(list(y), result.top_probs, color="#4c72b0", label="steered")
    ax.scatter([base.get(t, float("nan")) for t in result.top_tokens], list(y), color="#dd8452", zorder=3,
               label="unsteered (if in its top-k)")
    ax.set_yticks(list(y), [repr(t) for t in result.top_tokens])
    ax.set_xlabel("next-token probability")
    s = result.spec
    ax.set_title(f"{s['kind']} α={s['alpha']:g} layers {s['layers'][0]}–{s['layers'][1]}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    return ax.figure


# ----------------------------------------------------------------------------------------------
# The live panel


class SteeringPanel:
    """ipywidgets controls around :func:`steer`; ``panel.widget`` is what a notebook displays.

    The panel regenerates on every change of a control (``continuous_update`` off for sliders, so dragging does not
    queue dozens of generations). ``last_result`` holds the latest :class:`SteeringOutput`, ``text`` (HTML) and
    ``chart`` (PNG Image) its rendering — both plain widget values, so saved widget state shows them in a static page.
    """

    def __init__(self, model, *, prompt: str = "The movie was", layers=(0, 1), alpha: float = 8.0,
                 kind: str = "sentiment", word: str = " cat", signal: int = 0, max_new_tokens: int = 16,
                 top_k: int = 10, alpha_max: float | None = None) -> None:
        import ipywidgets as W

        self.model = model
        L = model.config.n_layer
        alpha_max = alpha_max or max(4 * abs(alpha), 1.0)
        self.prompt = W.Text(value=prompt, description="prompt", continuous_update=False,
                             layout=W.Layout(width="95%"))
        self.layers = W.IntRangeSlider(value=tuple(layers), min=0, max=L, description="layers", continuous_update=False)
        self.alpha = W.FloatSlider(value=alpha, min=-alpha_max, max=alpha_max, step=alpha_max / 100,
                                   description="α", continuous_update=False)
        self.kind = W.Dropdown(options=list(DIRECTION_KINDS), value=kind, description="direction")
        self.word = W.Text(value=word, description="word", continuous_update=False)
        self.signal = W.BoundedIntText(value=signal, min=0, max=model.config.n_signals - 1, description="signal")
        self.text = W.HTML()
        self.chart = W.Image(format="png", layout=W.Layout(max_width="640px"))
        self.max_new_tokens, self.top_k = max_new_tokens, top_k
        self.last_result: SteeringOutput | None = None
        self.error: str | None = None
        controls = [self.prompt, self.layers, self.alpha, self.kind, self.word, self.signal]
        for w in controls:
            w.observe(lambda _change: self.update(), names="value")
        self.widget = W.VBox([self.prompt, W.HBox([self.layers, self.alpha]), W.HBox([self.kind, self.word, self.signal]),
                              self.text, self.chart])
        self.update()

    def spec(self) -> SteeringSpec:
        return SteeringSpec(prompt=self.prompt.value, layers=tuple(self.layers.value), alpha=float(self.alpha.value),
                            kind=self.kind.value, word=self.word.value, signal=int(self.signal.value),
                            max_new_tokens=self.max_new_tokens, top_k=self.top_k)

    def update(self) -> SteeringOutput | None:
        import html

        import matplotlib.pyplot as plt

        try:
            result = steer(self.model, self.spec())
        except ValueError as e:  # a bad word or empty prompt: say so in the panel, keep the last chart
            self.error = str(e)
            self.text.value = f"<p style='color:#b00'>{html.escape(str(e))}</p>"
            return None
        self.error = None
        self.last_result = result
        fig = plot_steering(result)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80, bbox_inches="tight", metadata={"Software": None})
        plt.close(fig)
        self.chart.value = buf.getvalue()
        self.text.value = (
            f"<p><b>steered:</b> {html.escape(result.spec['prompt'])}<b>{html.escape(result.continuation)}</b></p>"
            f"<p><b>unsteered:</b> {html.escape(result.spec['prompt'])}{html.escape(result.baseline_continuation)}</p>"
            "<p class='reflow-next-tokens'><b>next token, steered:</b> "
            + " · ".join(f"{html.escape(repr(t))} {p:.3g}" for t, p in zip(result.top_tokens[:5], result.top_probs[:5]))
            + "</p>"
        )
        return result


def steering_panel(model, **kwargs) -> SteeringPanel:
    """Build the live steering panel; display ``panel.widget`` in a notebook (see :class:`SteeringPanel`)."""
    return SteeringPanel(model, **kwargs)
