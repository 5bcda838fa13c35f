"""Telling a run that diverges from one that is only noisy.

A run diverges when the mean loss of a log window stays far above the run's early loss (above ``factor`` times the
first window's mean) or sits at ln V, the loss of predicting every one of the V tokens with probability 1/V, for
``patience`` windows in a row. The second is how a far too large learning rate often ends: the activations overflow,
the final RMSNorm maps them to zero and every logit is equal, so the loss is exactly ln V on every batch while
nothing is NaN; a model at the start of fine-tuning is never that uniform (a random one is within a few hundredths,
a pretrained one far below). A gradient-norm explosion counts too: the logged (pre-clipping) gradient norm above
``grad_factor`` times the first window's. A single spike is not divergence; a NaN or Inf loss is handled by the loop
at once, and so is a window at ln V with a gradient norm of exactly 0 (nothing can move the model any more). At the
end of the run the final windows are judged as they stand (`finish`): a streak the end cut short still counts, unless
its windows were only near ln V (where a random model's loss also is). While
a streak of high windows is under way the state is *suspect*: the loop saves no checkpoint then, so the newest
checkpoint is always one taken before the trouble started.
"""

from __future__ import annotations

import dataclasses
import math

FACTOR = 3.0  # a window whose mean loss is this many times the early loss is "high"
PATIENCE = 3  # this many high windows in a row are divergence
UNIFORM_TOL = 1e-3  # nats: a window mean this close to ln V is the uniform distribution
GRAD_FACTOR = 100.0  # a gradient norm this many times the first window's is an explosion


@dataclasses.dataclass
class DivergenceMonitor:
    factor: float = FACTOR
    patience: int = PATIENCE
    uniform_loss: float | None = None  # ln V, when the vocabulary size is known
    grad_factor: float = GRAD_FACTOR
    early_loss: float | None = None  # the first log window's mean loss
    early_grad_norm: float | None = None  # the gradient norm logged with the first window
    streak: int = 0  # high windows in a row
    streak_start: int | None = None  # the step the streak began after
    streak_strong: bool = False  # whether a window of the streak was high or exploded (not only near ln V)

    @property
    def suspect(self) -> bool:
        return self.streak > 0

    def update(self, step: int, window_loss: float, window_start: int, grad_norm: float | None = None
               ) -> str | None:
        """Feed one log window (its mean loss and the last gradient norm, ending at ``step``, starting after
        ``window_start``); returns why the run diverged, or None."""
        if not math.isfinite(window_loss):
            return f"the loss is {window_loss}"
        uniform = self.uniform_loss is not None and abs(window_loss - self.uniform_loss) < UNIFORM_TOL
        if uniform and grad_norm == 0:  # (every logit equal and nothing left to learn from: dead, not noisy)
            self.streak_start = window_start if self.streak == 0 else self.streak_start
            self.streak += 1
            return (f"the model's predictions collapsed to the uniform distribution (loss {window_loss:.4f} = ln V) "
                    f"with a gradient norm of exactly 0 since step {self.streak_start}")
        if self.early_loss is None:
            self.early_loss = window_loss
            self.early_grad_norm = grad_norm
            return None
        exploded = (grad_norm is not None and self.early_grad_norm is not None and self.early_grad_norm > 0
                    and not grad_norm <= self.grad_factor * self.early_grad_norm)  # (NaN norms count)
        high = window_loss > self.factor * self.early_loss
        if high or uniform or exploded:
            if self.streak == 0:
                self.streak_start, self.streak_strong = window_start, False
            self.streak += 1
            self.streak_strong = self.streak_strong or high or exploded
        else:
            self.streak, self.streak_start = 0, None
        if self.streak >= self.patience and exploded:
            return (f"the gradient norm ({grad_norm:.4g}) has been above {self.grad_factor:g}x its early value "
                    f"({self.early_grad_norm:.4g}) for {self.streak} log windows since step {self.streak_start}")
        if self.streak >= self.patience and uniform:
            return (f"the model's predictions collapsed to the uniform distribution (loss {window_loss:.4f} = ln V) "
                    f"for {self.streak} log windows since step {self.streak_start}")
        if self.streak >= self.patience:
            return (f"the loss ({window_loss:.4g}) has been above {self.factor:g}x its early value "
                    f"({self.early_loss:.4g}) for {self.streak} log windows since step {self.streak_start}")
        return None

    def finish(self) -> str | None:
        """At the end of the run: the final windows judged as they stand. A streak of high windows that the run's end
        cut short of ``patience`` is divergence too: its state is not one to export as if all were well."""
        if self.streak == 0 or not self.streak_strong:  # (a window near ln V alone: a random model's loss is too)
            return None
        return (f"its final {self.streak} log window(s), since step {self.streak_start}, had the loss far above its "
                "early value or an exploding gradient norm")

    def state(self) -> dict:
        return {"early_loss": self.early_loss, "early_grad_norm": self.early_grad_norm}

    def restore(self, state: dict | None) -> None:
        self.early_loss = (state or {}).get("early_loss")
        self.early_grad_norm = (state or {}).get("early_grad_norm")
        self.streak, self.streak_start = 0, None
