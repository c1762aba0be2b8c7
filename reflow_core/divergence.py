"""Is a run still training? The checks that stop it before a diverged or dead state is saved.

:class:`DivergenceGuard` judges every optimizer step's loss and gradient norm, and the val loss of the weights a
checkpoint is about to save; :func:`weights_problem` looks at the weights themselves. A tripped check stops the run
with :class:`TrainingDiverged` (reflow_core.train), which names the last checkpoint whose loss was sane.
"""

from __future__ import annotations

import math
import statistics

import torch

from reflow_core.errors import UserError


class TrainingDiverged(UserError, RuntimeError):
    """The run stopped at ``step`` without saving the bad state; ``checkpoint`` is the last good one, or None."""

    def __init__(self, message: str, *, step: int, loss: float, checkpoint: str | None) -> None:
        super().__init__(message)
        self.step, self.loss, self.checkpoint = step, loss, checkpoint


# DivergenceGuard's thresholds (losses in nats)
SPIKE_FACTOR = 3.0  # after warmup, a loss above 3x the median of the recent losses...
SPIKE_MIN_NATS = 2.0  # ...and at least 2 nats above it is a divergence, not a hard batch
SPIKE_MIN_HISTORY = 20  # losses needed before their median means anything
HISTORY = 100  # recent losses kept, and stored in every checkpoint so a resumed run judges as the original would
DEAD_LOSS_TOL = 0.05  # |loss - ln V| below this...
DEAD_GRAD = 1e-5  # ...with a gradient norm below this...
DEAD_STEPS = 3  # ...for this many steps in a row: the model predicts a uniform distribution and cannot learn
WEIGHT_LIMIT = 1e4  # no healthy weight comes near this (init std 0.02, norm gains ~1); checked before every save


class DivergenceGuard:
    """Says whether a step's loss and gradient norm are still training, or why not.

    Finite is not enough: with a learning rate far too high the loss can sit at 1e3-1e10 and stay finite, or the
    weights can blow up until every logit saturates, the loss reads ln V (a uniform guess, like a fresh model's) and
    the gradient is 0, after which nothing ever changes again.  :meth:`check` names the first of

    * a non-finite loss or gradient norm;
    * a loss above 2·ln V: twice what a uniform guess costs, where no model that learns (or a fresh one) ever is;
    * a gradient norm of exactly 0;
    * after warmup, a loss above SPIKE_FACTOR × the median of the recent losses and SPIKE_MIN_NATS above it;
    * loss ≈ ln V with gradient norm ≈ 0 for DEAD_STEPS steps in a row (a dead model, e.g. one resumed from a bad
      checkpoint).

    Only losses that pass go into the history, so one trip does not move the median.  After a trip,
    ``first_bad_step`` is the step where the evidence began (for a dead streak, its first step).
    """

    def __init__(self, vocab_size: float, warmup_steps: int, history: list[float] | None = None) -> None:
        # vocab_size: how many equally likely outcomes a uniform guess spreads over (a compact vocabulary's effective
        # size), so ln V is what a uniform guess costs
        self.ln_v = math.log(vocab_size)
        self.ceiling = 2 * self.ln_v
        self.warmup_steps = warmup_steps
        self.history = list(history or [])[-HISTORY:]
        self.dead_streak = 0
        self.first_bad_step: int | None = None

    def check(self, step: int, loss: float, gnorm: float) -> str | None:
        self.first_bad_step = step
        why = self._why(step, loss, gnorm)
        if why is None:
            self.history = (self.history + [loss])[-HISTORY:]
        return why

    def _why(self, step: int, loss: float, gnorm: float) -> str | None:
        if not math.isfinite(loss):
            return f"loss={loss}"
        if not math.isfinite(gnorm):
            return f"loss={loss:.4f} but grad norm={gnorm}"
        if loss > self.ceiling:
            return f"loss={loss:.4g}, above 2·ln V = {self.ceiling:.2f} (a uniform guess costs ln V = {self.ln_v:.2f})"
        if gnorm == 0.0:
            return f"loss={loss:.4f} with a gradient norm of exactly 0: the model is dead, no weight can change"
        if step > self.warmup_steps and len(self.history) >= SPIKE_MIN_HISTORY:
            median = statistics.median(self.history)
            if loss > SPIKE_FACTOR * median and loss - median > SPIKE_MIN_NATS:
                return (f"loss={loss:.4f}, {loss / median:.1f}x the median {median:.4f} of the last "
                        f"{len(self.history)} steps")
        if abs(loss - self.ln_v) < DEAD_LOSS_TOL and gnorm < DEAD_GRAD:
            self.dead_streak += 1
            if self.dead_streak >= DEAD_STEPS:
                self.first_bad_step = step - DEAD_STEPS + 1
                return (f"loss={loss:.4f} ≈ ln V with grad norm {gnorm:.1e} for {DEAD_STEPS} steps: the model is "
                        "dead (it predicts a uniform distribution and no gradient flows back)")
        else:
            self.dead_streak = 0
        return None

    def check_val(self, val_loss: float) -> str | None:
        """The val loss of the current weights (evaluated before every checkpoint): finite and below 2·ln V."""
        if not math.isfinite(val_loss):
            return f"val loss={val_loss}"
        if val_loss > self.ceiling:
            return f"val loss={val_loss:.4g}, above 2·ln V = {self.ceiling:.2f} (a uniform guess costs ln V = " \
                   f"{self.ln_v:.2f})"
        return None

    def sane(self, loss: float | None) -> bool:
        """Whether a loss recorded in a checkpoint could come from a model that trains (None: not recorded)."""
        return loss is None or (math.isfinite(loss) and loss <= self.ceiling)


def weights_problem(model: torch.nn.Module) -> str | None:
    """Why the weights must not be saved (non-finite, or blown up past WEIGHT_LIMIT), or None; one host sync."""
    with torch.no_grad():
        biggest = torch.stack([p.detach().abs().max().float() for p in model.parameters()]).max().item()
    if not math.isfinite(biggest):
        return "a weight is not finite"
    if biggest > WEIGHT_LIMIT:
        return f"the weights blew up (max |w| = {biggest:.3g}; healthy weights stay far below {WEIGHT_LIMIT:g})"
    return None
