"""What ends a training run early: a loss that runs away (DivergenceGuard: nothing of it is
saved, the last good checkpoint stays the newest), and Ctrl-C or SIGTERM (StopRequest: the loop
saves, then stops, at a step every process agrees on)."""

import math
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

from tangshi_jax.config import TrainConfig
from tangshi_jax.errors import Diverged

STOP_CHECK_EVERY = 10  # batches between the processes' agreement on whether to stop
DIVERGED_FACTOR = 2  # a loss above this × ln V (a uniform guess over V characters costs ln V) runs away
DIVERGED_STEPS = 10  # ... for this many steps running, or at the end of an epoch, stops training


class DivergenceGuard:
    """Stops a run whose loss is not finite, or stays above DIVERGED_FACTOR × ln V for
    DIVERGED_STEPS steps running or at the end of an epoch (a healthy run starts near ln V and
    falls), before anything of it is logged or saved: the last good checkpoint stays the newest.

    Each step's loss is read when the next step has been dispatched, so the check never waits
    for the step in flight."""

    def __init__(self, vocab_size: int, manager=None, lr: float | None = None):
        self.vocab_size, self.limit = vocab_size, DIVERGED_FACTOR * math.log(vocab_size)
        self.manager, self.lr = manager, lr
        self.above, self.last, self.pending = 0, None, None

    def limit_text(self) -> str:
        return (
            f"{self.limit:.1f} ({DIVERGED_FACTOR} × ln {self.vocab_size:,}: a uniform guess over the vocabulary "
            f"costs ln {self.vocab_size:,})"
        )

    def check(self, loss: float, step: int, epoch: int) -> None:
        self.above, self.last = (self.above + 1 if not loss <= self.limit else 0), loss
        if not math.isfinite(loss):
            self.stop(f"the loss is {loss}", step, epoch)
        if self.above >= DIVERGED_STEPS:
            self.stop(f"the loss stayed above {self.limit_text()} for {self.above} steps, now {loss:.3g}", step, epoch)

    def observe(self, step_metrics, step: int, epoch: int, bar=None) -> None:
        """Check the previous step's loss and hold this one's (bar: a progress bar to close first)."""
        previous, self.pending = self.pending, (step_metrics, step, epoch, bar)
        if previous:
            self.check_metrics(*previous)

    def check_metrics(self, step_metrics, step, epoch, bar=None) -> None:
        try:
            self.check(float(step_metrics["nll_sum"]) / max(float(step_metrics["tokens"]), 1.0), step, epoch)
        except Diverged:
            if bar is not None:
                bar.close()
            raise

    def settle(self, step: int | None = None, epoch: int | None = None) -> None:
        """Before an epoch is logged or a state saved: every loss checked, the last one not running away."""
        previous, self.pending = self.pending, None
        if previous:
            self.check_metrics(*previous)
            step, epoch = previous[1], previous[2]
        if self.above:
            self.stop(f"the loss is {self.last:.3g}, above {self.limit_text()}, at the end of an epoch", step, epoch)

    def stop(self, what: str, step, epoch) -> None:
        where = f" at step {step:,} (epoch {epoch})" if step is not None else ""
        lower = f" (e.g. --lr {min(self.lr / 10, TrainConfig.lr):g})" if self.lr else ""
        kept = "no checkpoint was saved; start again with a lower --lr" + lower
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.reload()
            if self.manager.latest_step() is not None:
                kept = (
                    f"nothing of it was saved: the newest checkpoint in {self.manager.directory} is still step "
                    f"{self.manager.latest_step():,}; run the command again with a lower --lr{lower} to resume from it"
                )
        raise Diverged(f"training diverged{where}: {what}; {kept}")


class StopRequest:
    """Ctrl-C or SIGTERM asks the loop to save and stop after the current step; a second
    Ctrl-C stops at once.

    Under several processes a request reaches one of them, and all must stop at the same step.
    JAX's distributed runtime takes SIGTERM itself (a scheduler's preemption notice) and names
    a step for every process to stop at; a Ctrl-C is shared every STOP_CHECK_EVERY batches and
    at each epoch's end."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def agreed(self, step: int, batch: int, epoch_end: bool = False) -> bool:
        """Whether every process stops now; all processes call it at the same steps."""
        if jax.process_count() == 1:
            return self.requested
        if not epoch_end and multihost_utils.reached_preemption_sync_point(step):
            self.requested = True  # kept for the epoch's end, should this be its last batch
            return True
        if batch % STOP_CHECK_EVERY and not epoch_end:
            return False
        return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))
