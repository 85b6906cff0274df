"""Orbax checkpoints that describe themselves: arrays, configs, vocabulary and data position.

A checkpoint directory holds one numbered step folder per save (Orbax writes each to a
temporary folder and renames it when complete, so a crash mid-save leaves the previous one
intact, and a reader never lists a half-written step), plus `metrics.jsonl`. Every step folder
alone is enough to sample from or resume; a step that no longer reads completely (a truncated
or missing file, arrays of the wrong shape) is passed over for the one before it, never deleted.
A save that cannot be written (a full disk, a read-only directory) ends the run in one line
that names the step still intact; a run resumes only with the configs and poems it began with.
"""

import contextlib
import gc
import logging
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from tangshi_jax import data
from tangshi_jax.config import (
    DATA_ORDER_FIELDS,
    ModelConfig,
    TrainConfig,
    differences,
    from_dict,
    to_dict,
    training_flags,
)
from tangshi_jax.errors import TangshiError
from tangshi_jax.model import abstract_params

# Orbax reports routine events through absl at WARNING, and a failed write or read as a screen
# of ERROR lines besides the exception it raises; the exception is turned into one line.
logging.getLogger("absl").setLevel(logging.CRITICAL)
logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # its "exception never retrieved" of the same


def open_manager(directory: str | Path, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    return ocp.CheckpointManager(
        Path(directory).resolve(), options=options, item_names=("state", "model", "train", "vocab", "progress")
    )


def retried(listing, tries: int = 10):
    """listing() again when a step vanished while Orbax listed the steps (a run saving into the
    same directory rotates its old checkpoints away). Orbax reports that as a missing file or,
    in newer releases, as "Path is not a directory" for the step folder just removed."""
    for attempt in range(tries):
        try:
            return listing()
        except (FileNotFoundError, NotADirectoryError):
            if attempt == tries - 1:
                raise
            time.sleep(0.05)


def open_reader(directory: str | Path) -> ocp.CheckpointManager:
    """A manager that only reads: it never creates the directory and copes with a writer beside it."""
    return retried(lambda: open_manager(directory, create=False))


def save(
    manager, state, model_config: ModelConfig, train_config: TrainConfig, vocab: list[str], progress: dict
) -> None:
    """Save (asynchronously) under the global step; progress holds epoch and batch position."""
    manager.save(
        int(progress["step"]),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            model=ocp.args.JsonSave(to_dict(model_config)),
            train=ocp.args.JsonSave(to_dict(train_config)),
            vocab=ocp.args.JsonSave({"chars": list(vocab)}),
            progress=ocp.args.JsonSave(progress),
        ),
        force=True,
    )


class Meta(NamedTuple):
    model_config: ModelConfig
    train_config: TrainConfig
    vocab: list[str]
    progress: dict


def restore_meta(manager, step: int) -> Meta:
    """Configs, vocabulary and progress of a checkpoint, without reading its arrays."""
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            model=ocp.args.JsonRestore(),
            train=ocp.args.JsonRestore(),
            vocab=ocp.args.JsonRestore(),
            progress=ocp.args.JsonRestore(),
        ),
    )
    return Meta(
        from_dict(ModelConfig, restored["model"]),
        from_dict(TrainConfig, restored["train"]),
        list(restored["vocab"]["chars"]),
        dict(restored["progress"]),
    )


def restore_state(manager, step: int, like, partial: bool = False):
    """The arrays of a checkpoint, shaped, typed and placed like the pytree `like` (real or
    abstract); leaves without a placement go to the default device, whatever devices or
    processes wrote the checkpoint. With `partial`, `like` may name a part of the saved state
    (the parameters without the optimizer state) and only that part is read."""
    device = jax.config.jax_default_device
    default = jax.sharding.SingleDeviceSharding(device if isinstance(device, jax.Device) else jax.devices()[0])

    def abstract_leaf(leaf):
        struct = ocp.utils.to_shape_dtype_struct(leaf)
        return (
            struct
            if struct.sharding is not None
            else jax.ShapeDtypeStruct(struct.shape, struct.dtype, sharding=default)
        )

    abstract = jax.tree_util.tree_map(abstract_leaf, like)
    if partial:
        args = ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True
        )
    else:
        args = ocp.args.StandardRestore(abstract)
    return manager.restore(step, args=ocp.args.Composite(state=args))["state"]


class Restored(NamedTuple):
    step: int
    meta: Meta
    state: Any


def unreadable_reason(error: BaseException) -> str:
    """Why a step could not be read, in a few words: truncated, missing, wrong shapes, or the error's first line."""
    chain = []
    while error is not None and len(chain) < 8:
        chain.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    text = "\n".join(chain)
    array = re.search(r'Error (?:reading|opening) "(?:zarr" driver: Metadata at ")?([^"/]+)', text)
    where = f" ({array.group(1)})" if array else ""
    if re.search(r"byte range|Truncated|OUT_OF_RANGE|DATA_LOSS|cut short", text):
        return f"a data file is truncated{where}"
    shapes = re.search(r"Requested shape: (\([^)]*\)) is not compatible with the stored shape: (\([^)]*\))", text)
    if shapes:
        return f"wrong shapes: its configs ask for {shapes.group(1)} where {shapes.group(2)} is stored"
    missing = re.search(r"File (\S+) not found|Item .(\w+). was not found", text)
    if missing or re.search(r"NOT_FOUND|does not exist|No such file|FileNotFoundError", text):
        name = (
            "/".join(Path(missing.group(1)).parts[-2:])
            if missing and missing.group(1)
            else missing.group(2)
            if missing
            else ""
        )
        return f"files are missing{f' ({name})' if name else where}"
    if "JSONDecodeError" in text:
        return "a JSON file in it is cut short or garbled"
    return chain[0].splitlines()[0][:200]


def skipped_line(directory: Path, step: int, reason: str) -> str:
    return (
        f"warning: skipping step {step} of {directory}: {reason}; it is left as it is: remove it with "
        f"`rm -r {directory / str(step)}` once you no longer need it"
    )


def collect_quietly() -> None:
    """Orbax reads and writes arrays in coroutines; when one fails, the others' errors are never
    retrieved and Python would print each as a traceback when it frees them, some only later
    ("Event loop is closed" from a thread that finished after its loop). The failure is reported
    once, by its reason: free them now without the tracebacks, and from now on pass over the
    late ones."""
    previous, sys.unraisablehook = sys.unraisablehook, (lambda unraisable: None)
    try:
        with warnings.catch_warnings():  # "coroutine ... was never awaited", of the same failure
            warnings.simplefilter("ignore", RuntimeWarning)
            gc.collect()
    finally:
        sys.unraisablehook = previous
    if not getattr(sys.unraisablehook, "orbax_leftovers", False):
        sys.unraisablehook = quiet_leftovers(sys.unraisablehook)
        sys.excepthook = quiet_loop_closed(sys.excepthook)


def loop_closed(error) -> bool:
    return isinstance(error, RuntimeError) and "Event loop is closed" in str(error)


def quiet_leftovers(previous):
    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)  # one of Orbax's coroutines
        if not (code is not None and "orbax" in code.co_filename) and not loop_closed(unraisable.exc_value):
            previous(unraisable)

    hook.orbax_leftovers = True
    return hook


def quiet_loop_closed(previous):
    """TensorStore's late callbacks into a closed loop are printed through sys.excepthook."""

    def hook(kind, error, traceback):
        if not loop_closed(error):
            previous(kind, error, traceback)

    return hook


def restore_newest(manager, like_of: Callable[[Meta], Any], on_skip=None, partial: bool = False) -> Restored | None:
    """The newest step that reads completely: configs, vocabulary, progress and the arrays,
    restored like `like_of(meta)` (an abstract or real pytree; with `partial`, a part of the
    state: restore_state). None when there is no step.

    A step that fails to read is reported through on_skip(step, reason) (by default one warning
    line on stderr) and left on disk. A step that disappears while it is read was rotated away
    by a run saving into the same directory: it is passed over quietly and the steps listed again."""
    directory = Path(manager.directory)
    on_skip = on_skip or (lambda step, reason: print(skipped_line(directory, step, reason), file=sys.stderr))
    skipped = set()
    for _ in range(5):
        retried(manager.reload)
        steps = [step for step in sorted(retried(manager.all_steps), reverse=True) if step not in skipped]
        vanished = False
        for step in steps:
            for attempt in range(2):
                try:
                    meta = restore_meta(manager, step)
                    return Restored(step, meta, restore_state(manager, step, like_of(meta), partial))
                except Exception as error:  # any fault of the files, reported by its reason
                    failure = unreadable_reason(error)
                collect_quietly()
                if attempt or not (directory / str(step)).exists():
                    break
                time.sleep(0.1)  # a rotation may be removing it right now: look again
            if (directory / str(step)).exists():
                skipped.add(step)
                on_skip(step, failure)
            else:
                vanished = True
        if not vanished:
            break
    if skipped:
        raise TangshiError(
            f"no checkpoint in {directory} can be read (steps {', '.join(map(str, sorted(skipped)))}, "
            "each named above); train again into a new --checkpoint-dir"
        )
    return None


def load_newest(directory: str | Path, like_of: Callable[[Meta], Any], on_skip=None, partial: bool = False) -> Restored:
    """restore_newest for a reader (sample, evaluate): it never creates or changes the directory."""
    manager = open_reader(directory) if Path(directory).is_dir() else None
    restored = restore_newest(manager, like_of, on_skip, partial) if manager else None
    if restored is None:
        raise TangshiError(
            f"no checkpoint in {directory}; train first with `python -m tangshi_jax.train --checkpoint-dir {directory}`"
        )
    return restored


def load_params(directory: str | Path, on_skip=None) -> Restored:
    """The newest readable step's configs, vocabulary, progress and parameters, read without
    the optimizer state (or the trainer's code that describes it): what sampling, evaluation
    and serving need. Its state is {"params": ...}: the weights' average where the run keeps one."""

    def like_of(meta: Meta):
        return {inference_weights(meta.train_config): abstract_params(meta.model_config)}

    restored = load_newest(directory, like_of, on_skip, partial=True)
    return restored._replace(state={"params": restored.state[inference_weights(restored.meta.train_config)]})


def inference_weights(train_config) -> str:
    """The part of a run's state that validation, sampling and export read: the moving average of
    the weights when the run keeps one, else the weights."""
    return "ema" if train_config.ema_decay else "params"


def set_aside(directory: str | Path, step: int) -> Path:
    """Rename an unreadable step out of the way of new saves (Orbax lists only numbered folders)."""
    source = Path(directory) / str(step)
    target = source.with_name(f"{step}.unreadable")
    suffix = 1
    while target.exists():
        suffix += 1
        target = source.with_name(f"{step}.unreadable-{suffix}")
    source.rename(target)
    return target


def require_checkpoint(directory: str | Path) -> tuple[ocp.CheckpointManager, int]:
    """The manager of an existing run and its latest step, or an error that says to train first."""
    manager = open_reader(directory) if Path(directory).is_dir() else None
    step = manager.latest_step() if manager else None
    if step is None:
        raise TangshiError(
            f"no checkpoint in {directory}; train first with `python -m tangshi_jax.train --checkpoint-dir {directory}`"
        )
    return manager, step


def writable_directory(directory: Path) -> Path:
    """The checkpoint directory, created if needed and checked by a test write, so that a path
    under a file or a directory that cannot be written is one line before any work is done."""
    for parent in (directory, *directory.parents):
        if parent.exists() and not parent.is_dir():
            raise TangshiError(
                f"--checkpoint-dir {directory}: {parent} is a file, not a directory; choose another --checkpoint-dir"
            )
        if parent.exists():
            break
    probe = directory / f".write-test-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"tangshi")
        probe.unlink()
    except OSError as error:
        raise TangshiError(
            f"cannot write checkpoints in {directory}: {error.strerror or error}; make it writable, "
            "free some space or choose another --checkpoint-dir"
        ) from None
    return directory


def set_aside_unreadable(directory: Path, step: int, reason: str, log) -> None:
    """A step that cannot be read is renamed out of the way of the steps this run will save, never
    deleted. Only the lead process renames (log None in the others)."""
    if log is None:
        return
    target = set_aside(directory, step)
    log(
        f"warning: step {step} of {directory} cannot be read ({reason}); set aside as {target.name} and resuming "
        f"from the step before it; remove it with `rm -r {target}` once you no longer need it"
    )


def write_failure(error: BaseException) -> str | None:
    """The operating system's reason when a checkpoint write failed (a full disk, a read-only
    directory, a file-size limit), whether Python or Orbax's C++ writers met it; None otherwise."""
    if isinstance(error, OSError) and error.errno:
        return error.strerror
    code = re.search(r"os_error_code='?(\d+)", str(error))
    return os.strerror(int(code.group(1))) if code else None


def write_checkpoint(manager, directory: Path, write=None) -> None:
    """Run a checkpoint write, or (write None) wait for the ones in flight. One that fails is one
    line naming the intact step; what it had half-written is removed (it is no step)."""
    try:
        (write or manager.wait_until_finished)()
        return
    except Exception as error:
        reason = write_failure(error)
        if reason is None:
            raise
    with contextlib.suppress(Exception):  # let the writes still in flight end before cleaning up
        manager.close()
    collect_quietly()
    failed = ", ".join(remove_half_written(directory))
    manager.reload()
    intact = (
        f"the newest complete checkpoint, step {manager.latest_step():,}, is intact"
        if manager.latest_step() is not None
        else "no complete checkpoint was written before it"
    )
    raise TangshiError(
        f"could not write checkpoint{f' step {failed}' if failed else ''} in {directory}: {reason}; "
        f"{intact}; free some space (or choose another --checkpoint-dir) and run the same "
        "command again to resume"
    )


def remove_half_written(directory: Path, quiet_for: float = 1.0, at_most: float = 10.0) -> list[str]:
    """Remove the temporary folders of a failed save (they are no step); the steps they were for.

    Orbax's C++ writers may still be finishing writes of the failed save (each failing in turn)
    and create the folder again: wait until none has reappeared for `quiet_for` seconds."""
    steps, started, last_seen = set(), time.monotonic(), time.monotonic()
    while time.monotonic() - started < at_most and time.monotonic() - last_seen < quiet_for:
        for path in directory.glob("*.orbax-checkpoint-tmp*"):
            steps.add(path.name.split(".")[0])
            shutil.rmtree(path, ignore_errors=True)
            last_seen = time.monotonic()
        time.sleep(0.05)
    return sorted(steps, key=int)


def check_resumable(saved_model, model_config, saved_train, train_config, directory) -> None:
    """A resumed run keeps its model and the settings that decide its batches and learning rates."""

    def refuse(what: str, changed: list[str], otherwise: str) -> TangshiError:
        # The flags it was trained with (a preset may have changed since), when flags alone can say them.
        command, unflagged = training_flags(saved_model, saved_train)
        resume = otherwise if unflagged else f"resume it with `{command} --checkpoint-dir {directory}`"
        return TangshiError(
            f"{directory} holds a run with another {what} ({'; '.join(changed)}); {resume}, "
            "or choose a new --checkpoint-dir"
        )

    changed = differences(saved_model, model_config)
    if changed:
        raise refuse("model", changed, "pass the same --preset and model flags to resume it")
    changed = differences(saved_train, train_config, DATA_ORDER_FIELDS)
    if changed:
        raise refuse("data order or schedule", changed, "pass the same flags to resume it")


def check_same_poems(saved: dict | None, current: dict, data_path, directory) -> None:
    """A resumed run must read the poems it was started on: same text, same order."""
    if not saved or saved == current:
        return
    if saved["poems"] != current["poems"]:
        differs = f"{data_path} gives {current['poems']:,} poems where the run was trained on {saved['poems']:,}"
    else:
        block = next(i for i, (a, b) in enumerate(zip(saved["blocks"], current["blocks"])) if a != b)
        first = block * data.FINGERPRINT_BLOCK + 1
        differs = (
            f"{data_path} has as many poems ({current['poems']:,}) but other poems or another order from "
            f"poem {first:,} to {min(first + data.FINGERPRINT_BLOCK - 1, current['poems']):,}"
        )
    raise TangshiError(
        f"{directory} was trained on other poems: {differs}; resume with the poems file it was "
        "trained on, or start a new run with a new --checkpoint-dir"
    )
