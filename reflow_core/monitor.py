"""A streaming coherence monitor: flag looping or stagnating generation from a layer's hidden states.

The forum thread reports that the cosine similarity of a deep layer's hidden state to its recent past rises above
≈ 0.95 when generation starts to loop.  :class:`CoherenceMonitor` reads the layer state h_t of the position that
predicts each new token (the layer numbering of :mod:`reflow_core.hooks`) and keeps,
per sequence and step, two trajectories over a window of the last ``window`` states:

* ``state_sim`` — max_k cos(h_t, h_{t−k}), k = 1 … window: the thread's signal, as is;
* ``step_sim`` — max_k cos(Δ_t, Δ_{t−k}) with Δ_t = h_t − h_{t−1}: do the *moves* of the state repeat?  A loop of
  period p repeats its moves (Δ_t = Δ_{t−p}) exactly; a stagnating state (‖Δ_t‖ ≤ ``stall`` · ‖h_t‖) counts as 1.

The raw state cosine has a blind spot the step cosine does not: any slowly drifting state — a random walk, whose
consecutive positions share almost all of their history — has cos(h_t, h_{t−1}) → 1 without ever repeating.  The
monitor fires (once per sequence, at ``fire_step``) when the chosen ``signal`` stays above ``threshold`` for
``patience`` consecutive steps; the whole trajectory is kept, not only the cut-off.

It streams: :meth:`CoherenceMonitor.update` takes one (B, d) state per step; :meth:`CoherenceMonitor.attach` reads
the states from a model's forward passes (``reflow_core.sample.sample(..., monitor=m)`` uses it).

Also here: an objective loop criterion (:func:`loop_onset`: a span of period p ≤ ``max_period`` repeated
consecutively, covering ≥ ``min_tokens`` tokens) and a text-only baseline (:class:`NgramMonitor`: fires when the last
n generated tokens already occurred in the generation).  The evaluation against them is the experiment
:mod:`reflow_core.experiments.loop_monitor`, where the detectors read the first part of a generation and the loop
criterion labels the held-out rest, so that no detector is scored against the very tokens it read.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from reflow_core.hooks import layer_hook_name

SIGNALS = ("state", "step")


class CoherenceMonitor:
    """Streaming monitor over one layer state (see module docstring)."""

    def __init__(self, layer: int, *, window: int = 16, threshold: float = 0.95, patience: int = 3,
                 signal: str = "step", stall: float = 0.02) -> None:
        if signal not in SIGNALS:
            raise ValueError(f"signal must be one of {SIGNALS}, got {signal!r}")
        self.layer, self.window, self.threshold = int(layer), int(window), float(threshold)
        self.patience, self.signal, self.stall = int(patience), signal, float(stall)
        self.reset()

    def reset(self) -> None:
        self._states: list[torch.Tensor] = []  # (B, d) per step, at most window + 1 kept
        self._steps: list[torch.Tensor] = []
        self.state_sim: list[np.ndarray] = []  # per step, (B,)
        self.step_sim: list[np.ndarray] = []
        self._run: np.ndarray | None = None
        self.fire_step: np.ndarray | None = None  # (B,), -1 = not fired
        self.n = 0

    # -- streaming ---------------------------------------------------------------------------------
    @staticmethod
    def _max_cos(x: torch.Tensor, past: list[torch.Tensor]) -> torch.Tensor:
        if not past:
            return torch.full((x.shape[0],), float("nan"))
        P = torch.stack(past, 1)  # (B, k, d)
        cos = torch.nn.functional.cosine_similarity(x[:, None, :], P, dim=-1, eps=1e-12)
        return cos.max(1).values

    def update(self, h: torch.Tensor) -> np.ndarray:
        """Feed one state per sequence, shape (B, d) (or (d,)); returns the current fired flags (B,)."""
        h = h.detach().float().cpu()
        if h.ndim == 1:
            h = h[None]
        B = h.shape[0]
        if self.fire_step is None:
            self.fire_step = np.full(B, -1)
            self._run = np.zeros(B, dtype=int)
        s_state = self._max_cos(h, self._states[-self.window:])
        if self._states:
            d = h - self._states[-1]
            s_step = self._max_cos(d, self._steps[-self.window:]) if self._steps else torch.full((B,), float("nan"))
            stalled = d.norm(dim=-1) <= self.stall * h.norm(dim=-1)
            s_step = torch.where(stalled, torch.ones_like(s_step), s_step)
            self._steps.append(d)
            self._steps = self._steps[-self.window:]
        else:
            s_step = torch.full((B,), float("nan"))
        self._states.append(h)
        self._states = self._states[-(self.window + 1):]
        self.state_sim.append(s_state.numpy())
        self.step_sim.append(s_step.numpy())
        score = (s_state if self.signal == "state" else s_step).numpy()
        above = np.nan_to_num(score, nan=-1.0) > self.threshold
        self._run = np.where(above, self._run + 1, 0)
        newly = (self._run >= self.patience) & (self.fire_step < 0)
        self.fire_step[newly] = self.n
        self.n += 1
        return self.fired

    @property
    def fired(self) -> np.ndarray:
        return np.zeros(0, dtype=bool) if self.fire_step is None else self.fire_step >= 0

    def trajectory(self, which: str | None = None) -> np.ndarray:
        """(steps, B) similarity trajectory of ``which`` (default: the firing signal)."""
        which = which or self.signal
        t = self.state_sim if which == "state" else self.step_sim
        return np.stack(t) if t else np.zeros((0, 0))

    # -- reading a model ---------------------------------------------------------------------------
    @contextmanager
    def attach(self, model, *, prefill: bool = False):
        """Feed the monitor from every forward pass of ``model`` inside the block: the state at the last position
        (the one that predicts the next token).  With ``prefill``, the first pass also feeds the prompt's earlier
        positions, so the window starts full.  ``generate`` recomputes the whole context each step (no KV cache), so
        one forward = one generated token."""
        first = [True]

        def read(x: torch.Tensor):
            if first[0] and prefill:
                for t in range(x.shape[1] - 1):
                    self.update(x[:, t])
                self.n = 0
                self.fire_step[:] = -1
                self._run[:] = 0
                self.state_sim.clear(); self.step_sim.clear()
            first[0] = False
            self.update(x[:, -1])
            return None

        with model.hooks.attach({layer_hook_name(model, self.layer): read}):
            yield self


class NgramMonitor:
    """Text-only baseline: fires at step t when the last ``n`` tokens already occurred earlier in the generation."""

    def __init__(self, n: int = 4) -> None:
        self.n = int(n)

    def fire_step(self, tokens) -> int:
        """First generated-token index at which the rule fires (the step *after* the repeated n-gram), or −1."""
        seen: set[tuple] = set()
        toks = list(tokens)
        for t in range(self.n, len(toks) + 1):
            g = tuple(toks[t - self.n:t])
            if g in seen:
                return t
            seen.add(g)
        return -1


def loop_onset(tokens, *, max_period: int = 8, min_tokens: int = 12, min_repeats: int = 3) -> int:
    """Start of the earliest loop in ``tokens``, or −1.

    A loop is a span of period p (1 ≤ p ≤ ``max_period``: tok[i] == tok[i−p] throughout) that covers at least
    ``max(min_tokens, min_repeats · p)`` tokens, i.e. an n-gram (n = p) repeated back to back; its onset is the first
    token of its first copy.
    """
    toks = np.asarray(list(tokens))
    T = toks.size
    best = -1
    for p in range(1, max_period + 1):
        need = max(min_tokens, min_repeats * p)
        run_start = None
        for i in range(p, T + 1):
            same = i < T and toks[i] == toks[i - p]
            if same and run_start is None:
                run_start = i - p
            if not same and run_start is not None:
                if i - run_start >= need and (best < 0 or run_start < best):
                    best = run_start
                run_start = None
    return best
