"""`--profile DIR` of train and bench: a jax.profiler trace of a few training steps.

The trace lands in DIR as TensorBoard's profile plugin (xprof) reads it, plus a
`perfetto_trace.json.gz` that https://ui.perfetto.dev opens without installing anything;
each step is marked, so its XLA operations (the loops, products, fusions) line up under it.
"""

from pathlib import Path

import jax

PROFILE_STEPS = 5  # steps traced: enough for each part of a step to repeat, small enough to read


class StepTrace:
    """Traces the `steps` training steps after it starts; does nothing without a directory."""

    def __init__(self, directory: str | Path | None, steps: int = PROFILE_STEPS):
        self.directory, self.left, self.running, self.annotation = directory, steps, False, None

    def before_step(self, step: int) -> None:
        if self.directory is None or self.left <= 0:
            return
        if not self.running:
            Path(self.directory).mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
            self.running = True
        self.annotation = jax.profiler.StepTraceAnnotation("train", step_num=step)
        self.annotation.__enter__()

    def after_step(self, result) -> None:
        if not self.running or self.annotation is None:
            return
        jax.block_until_ready(result)  # the step's work, not just its dispatch, inside the mark
        self.annotation.__exit__(None, None, None)
        self.annotation = None
        self.left -= 1
        if self.left <= 0:
            self.stop()

    def stop(self) -> None:
        if self.running:
            if self.annotation is not None:
                self.annotation.__exit__(None, None, None)
                self.annotation = None
            jax.profiler.stop_trace()
            self.running = False
