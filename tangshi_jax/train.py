"""Training: pure jitted steps, a loop over bucketed batches, Orbax checkpoints, resume.

    python -m tangshi_jax.train [--epochs 30] [--cell lstm|gru|rnn] [--platform cpu|gpu|tpu] ...
    python -m tangshi_jax.train --coordinator HOST:PORT --num-processes N --process-id I ...   (one per host)

Every run is data-parallel over a mesh of devices (one device is a mesh of one): each batch's rows
are split across the devices, parameters and optimizer state are replicated, and XLA adds the
gradient reduction. Several processes share one global batch; each feeds only its own rows.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from tangshi_jax import checkpoint, data
from tangshi_jax.config import (
    CELLS,
    DATA_ORDER_FIELDS,
    DEFAULT_PRESET,
    DTYPES,
    OPTIMIZERS,
    PRESETS,
    SCHEDULES,
    ModelConfig,
    TrainConfig,
    differences,
    preset_configs,
)
from tangshi_jax.devices import (
    PLATFORMS,
    Cluster,
    describe_devices,
    describe_mesh,
    make_mesh,
    peak_rss_mb,
    replicated,
    split_rows,
    use_platform,
)
from tangshi_jax.errors import Diverged, TangshiError, run_cli
from tangshi_jax.loss import HEAD_STEPS, HEAD_TRANSPOSED, head_nll, nll_of_logits
from tangshi_jax.metrics import eval_sums, logged_epoch, mean_nll, perplexity
from tangshi_jax.model import PoemModel, head_weights, init_params, initial_carry
from tangshi_jax.profile import PROFILE_STEPS, StepTrace

DEFAULT_DATA = "poems.txt"
STOP_CHECK_EVERY = 10  # batches between the processes' agreement on whether to stop


def learning_rate(train_config: TrainConfig, steps_per_epoch: int):
    """The peak rate, or a schedule: linear warm-up from 0, a cosine down to lr × lr_floor at
    the end of decay_epochs, then the floor for any epochs after (so --epochs can be raised)."""
    if train_config.schedule == "constant":
        return train_config.lr
    decay_steps = max(train_config.decay_epochs * steps_per_epoch - train_config.warmup_steps, 1)
    return optax.warmup_cosine_decay_schedule(
        0.0,
        train_config.lr,
        train_config.warmup_steps,
        train_config.warmup_steps + decay_steps,
        end_value=train_config.lr * train_config.lr_floor,
    )


def make_optimizer(train_config: TrainConfig, steps_per_epoch: int = 1) -> optax.GradientTransformation:
    """Global-norm clipping at 1, then RMSprop as PyTorch defines it (smoothing 0.99, eps 1e-8
    added outside the square root, mean square starting at 0) or Adam (optax's defaults)."""
    lr = learning_rate(train_config, steps_per_epoch)
    if train_config.optimizer == "adam":
        update = optax.adam(lr)
    else:
        update = optax.rmsprop(lr, decay=0.99, eps=1e-8, eps_in_sqrt=False)
    return optax.chain(optax.clip_by_global_norm(1.0), update)


def make_steps(
    model_config: ModelConfig,
    train_config: TrainConfig,
    steps_per_epoch: int = 1,
    fused_head: bool = True,
    head_steps: int = HEAD_STEPS,
    transposed: bool = HEAD_TRANSPOSED,
    wavefront: bool = False,
    hand_gradients: bool = True,
):
    """The pure train and eval steps of one model; jit them (or compile them per shape) once.

    The other arguments make the variants that `bench --variants` measures side by side, all
    with the same mathematics: fused_head=False builds all logits and a plain log-softmax;
    head_steps and transposed set the fused head's loop (loss.py); wavefront runs the stacked
    layers in one scan (model.py); hand_gradients=False differentiates the LSTM layers by
    autodiff of their scan instead of lstm_sequence's own backward pass (model.py)."""
    dtype = jnp.dtype(train_config.dtype)
    model = PoemModel(model_config, dtype, wavefront=wavefront, hand_gradients=hand_gradients)
    optimizer = make_optimizer(train_config, steps_per_epoch)

    def batch_nll(params, batch, dropout_key=None):
        """Sum of -log p(target) over the masked positions, and their count."""
        carry = initial_carry(model_config, batch["inputs"].shape[0])
        targets, mask = batch["targets"], batch["mask"]
        train = dropout_key is not None
        rngs = {"dropout": dropout_key} if train else {}
        if fused_head:
            _, features = model.apply(
                {"params": params}, batch["inputs"], carry, features_only=True, train=train, rngs=rngs
            )
            kernel, bias = head_weights(params, model_config)
            nll_sum = head_nll(
                features.astype(dtype), kernel, bias, targets, mask, model_config.relu_head, head_steps, transposed
            )
        else:
            _, logits = model.apply({"params": params}, batch["inputs"], carry, train=train, rngs=rngs)
            nll_sum = jnp.sum(nll_of_logits(logits, targets)[0] * mask)
        return nll_sum, jnp.sum(mask)

    def mean_nll(params, batch, dropout_key):
        nll_sum, tokens = batch_nll(params, batch, dropout_key)
        return nll_sum / jnp.maximum(tokens, 1.0), (nll_sum, tokens)

    def train_step(state, batch):
        # A key of its own for every step, so a resumed run draws what an uninterrupted one would.
        dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        (_, (nll_sum, tokens)), grads = jax.value_and_grad(mean_nll, has_aux=True)(state["params"], batch, dropout_key)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        new_state = dict(
            state, params=optax.apply_updates(state["params"], updates), opt_state=opt_state, step=state["step"] + 1
        )
        return new_state, {"nll_sum": nll_sum, "tokens": tokens}

    def eval_step(params, batch):
        return eval_sums(model_config, params, batch)

    return train_step, eval_step


def init_state(model_config: ModelConfig, train_config: TrainConfig, seed: int | None = None) -> dict:
    """Everything that changes during training; the data position lives in `progress`."""
    seed = train_config.seed if seed is None else seed
    init_key, rng = jax.random.split(jax.random.key(seed))
    params = init_params(model_config, init_key)
    return {
        "params": params,
        "opt_state": make_optimizer(train_config).init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(rng),
    }


def batch_spec(batch_size: int, length: int, sharding=None) -> dict:
    ints = jax.ShapeDtypeStruct((batch_size, length), jnp.int32, sharding=sharding)
    floats = jax.ShapeDtypeStruct((batch_size, length), jnp.float32, sharding=sharding)
    return {"inputs": ints, "targets": ints, "mask": floats, "chars": floats}


class Feed(NamedTuple):
    """How batches reach a mesh: `rows` per global batch (the batch size rounded up to a multiple
    of the devices; the extra rows are masked) and the block of them this process feeds."""

    mesh: Mesh
    rows: int
    local: slice

    def batch(self, bucketed: data.BucketedData, bucket_index: int, poems: np.ndarray) -> dict:
        """The global batch of `poems` (rows of one bucket), built from this process's rows only."""
        local = data.make_batch(bucketed, bucket_index, poems[self.local], self.local.stop - self.local.start)
        shape = (self.rows, bucketed.buckets[bucket_index])
        return {
            key: jax.make_array_from_process_local_data(split_rows(self.mesh), value, shape)
            for key, value in local.items()
        }


def make_feed(mesh: Mesh, batch_size: int) -> Feed:
    rows = -(-batch_size // mesh.size) * mesh.size
    blocks = split_rows(mesh).addressable_devices_indices_map((rows,)).values()
    local = slice(min(block[0].start or 0 for block in blocks), max(block[0].stop or rows for block in blocks))
    return Feed(mesh, rows, local)


def place_state(state, mesh: Mesh):
    """The state replicated on every device of the mesh (in every process, from its own copy)."""
    sharding = replicated(mesh)

    def place(leaf):
        value = np.asarray(leaf)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree_util.tree_map(place, state)


class Compiling:
    """Programs still compiling on a thread pool, looked up by bucket length; each lookup
    waits for its own program only."""

    def __init__(self, futures: dict):
        self.futures = futures

    def __getitem__(self, length):
        return self.futures[length].result()

    def cancel(self):
        """Drop the programs not yet started (a stopped run needs no more)."""
        for future in self.futures.values():
            future.cancel()


def compile_steps(model_config, train_config, steps_per_epoch, state, buckets, feed: Feed):
    """Ahead-of-time compile both steps for every bucket: these are all the shapes a run uses.

    Batches come split along the mesh's data axis, state and metrics replicated; XLA partitions
    the step and sums the gradients across devices. Programs are built on a thread pool (on 2
    cores that saves only ~15%: XLA's CPU compiler does most of its work on one thread,
    PERFORMANCE.md). The train steps are returned compiled; the eval steps, a third of the
    compile time and first needed at the end of an epoch, are returned still compiling
    (`Compiling`), so training starts without waiting for them."""
    train_step, eval_step = make_steps(model_config, train_config, steps_per_epoch)
    whole, rows = replicated(feed.mesh), split_rows(feed.mesh)
    train_jit = jax.jit(train_step, in_shardings=(whole, rows), out_shardings=(whole, whole), donate_argnums=0)
    eval_jit = jax.jit(eval_step, in_shardings=(whole, rows), out_shardings=whole)
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    train_programs = {
        length: pool.submit(lambda n: train_jit.lower(state, batch_spec(feed.rows, n, rows)).compile(), length)
        for length in buckets
    }
    eval_programs = Compiling(
        {
            length: pool.submit(
                lambda n: eval_jit.lower(state["params"], batch_spec(feed.rows, n, rows)).compile(), length
            )
            for length in buckets
        }
    )
    pool.shutdown(wait=False)  # its threads end when the last program is built
    try:
        return {length: future.result() for length, future in train_programs.items()}, eval_programs
    except BaseException:
        eval_programs.cancel()
        raise


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


def load_poems(train_config: TrainConfig, log) -> data.Corpus:
    path = Path(train_config.data)
    if not path.exists() and train_config.data == DEFAULT_DATA and jax.process_count() > 1:
        raise TangshiError(
            f"{path} not found; build it once before a run of several processes: "
            "python -m tangshi_jax.corpus (on a filesystem every host reads)"
        )
    if not path.exists() and train_config.data == DEFAULT_DATA:
        from tangshi_jax import corpus

        log(f"{path} not found: building it from the chinese-poetry package (downloaded once)")
        corpus.build_corpus(path)
    return data.read_corpus(path)


def check_resumable(saved_model, model_config, saved_train, train_config, directory):
    changed = differences(saved_model, model_config)
    if changed:
        raise TangshiError(
            f"{directory} holds a run with another model ({'; '.join(changed)}); "
            "pass the same --preset and model flags to resume it (a run made before presets existed: "
            "--preset original with --epochs N for the total you want), or choose a new --checkpoint-dir"
        )
    changed = differences(saved_train, train_config, DATA_ORDER_FIELDS)
    if changed:
        raise TangshiError(
            f"{directory} holds a run with another data order or schedule ({'; '.join(changed)}); "
            "pass the same flags to resume it, or choose a new --checkpoint-dir"
        )


def trim_metrics(path: Path, epoch: int) -> None:
    """Drop epochs logged after the checkpoint being resumed: they are trained again."""
    if not path.exists():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if logged_epoch(line) <= epoch]
    temporary = path.with_suffix(".tmp")
    temporary.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    temporary.replace(path)


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


def abstract_state(model_config: ModelConfig, train_config: TrainConfig, mesh: Mesh):
    """Shapes, types and shardings (replicated on the mesh) of a run's state, for restoring it."""
    return jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated(mesh)),
        jax.eval_shape(lambda: init_state(model_config, train_config)),
    )


def set_aside_unreadable(directory: Path, step: int, reason: str, log) -> None:
    """A step that cannot be read is renamed out of the way of the steps this run will save, never
    deleted. Only the lead process renames (log None in the others)."""
    if log is None:
        return
    target = checkpoint.set_aside(directory, step)
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
    checkpoint.collect_quietly()
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


def append_metrics(path: Path, record: dict) -> None:
    try:
        with path.open("a", encoding="utf-8") as metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
    except OSError as error:
        raise TangshiError(
            f"cannot write {path}: {error.strerror}; free some space and run the same command again to resume"
        ) from None


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


def train(
    train_config: TrainConfig,
    model_settings: dict,
    checkpoint_dir: str | Path,
    log=print,
    show_progress: bool = True,
    mesh: Mesh | None = None,
    profile_dir: str | None = None,
) -> dict:
    """Train (or resume) into checkpoint_dir on `mesh` (default: every local device of the
    default platform, in every process); returns the last epoch's metrics. With profile_dir,
    the first few steps go to a jax.profiler trace there (profile.py)."""
    directory = writable_directory(Path(checkpoint_dir))
    mesh = mesh or make_mesh()
    lead = jax.process_index() == 0  # the process that writes metrics.jsonl
    manager = checkpoint.open_manager(directory, keep=train_config.keep)
    restored = checkpoint.restore_newest(
        manager,
        lambda meta: abstract_state(meta.model_config, meta.train_config, mesh),
        on_skip=lambda step, reason: set_aside_unreadable(directory, step, reason, log if lead else None),
    )
    if jax.process_count() > 1:  # every process sees the steps the lead set aside
        multihost_utils.sync_global_devices("tangshi_jax: unreadable steps set aside")
    manager.reload()
    saved = restored and restored.meta

    if train_config.schedule == "cosine" and not train_config.decay_epochs:
        # Unset: a new run decays over the epochs it is asked for; a resumed run keeps its own.
        decay_epochs = saved.train_config.decay_epochs if saved else train_config.epochs
        train_config = dataclasses.replace(train_config, decay_epochs=decay_epochs)
    if saved:  # before reading any data: a mismatch is named, not met as an odd character later
        check_resumable(
            saved.model_config,
            ModelConfig(vocab_size=len(saved.vocab), **model_settings),
            saved.train_config,
            train_config,
            directory,
        )
    corpus = load_poems(train_config, log)
    poems_read = data.fingerprint(corpus, train_config)
    check_same_poems(saved and saved.progress.get("data"), poems_read, train_config.data, directory)
    dataset = data.make_dataset(corpus, train_config, saved.vocab if saved else None)
    vocab, train_data, val_data = dataset.vocab, dataset.train, dataset.val
    model_config = ModelConfig(vocab_size=len(vocab), **model_settings)
    progress = dict(saved.progress if saved else {"epoch": 0, "batch": 0, "step": 0}, data=poems_read)
    if progress["epoch"] >= train_config.epochs:
        log(f"{directory} is already trained for {progress['epoch']} epochs; raise --epochs to train on")
        return {}

    if not train_data.num_poems:
        raise TangshiError(
            f"all {len(dataset.val_poems)} poems fell into the validation split; use more poems (--max-poems)"
        )
    buckets = train_data.buckets
    kept = len(corpus.poems[: train_config.max_poems])
    used = f"{kept:,} of {len(corpus.poems):,} usable" if kept < len(corpus.poems) else f"{kept:,} usable"
    log(
        f"poems: {used} ({train_data.num_poems:,} train, {val_data.num_poems:,} validation), "
        f"{corpus.skipped:,} skipped by the rules, {corpus.unparsable:,} unparsable lines"
        + (f" (first at line {corpus.first_unparsable})" if corpus.unparsable else "")
    )
    if train_config.split == "grouped":
        counts = dataset.counts
        log(
            f"split: {counts.near_poems:,} poems in {counts.near_groups:,} groups of near-repeats kept on one side; "
            f"{counts.exact_repeats:,} exact repeats not trained again"
        )
    log(
        f"vocabulary: {len(vocab):,} characters; model: {model_config.layers}×{model_config.hidden} "
        f"{model_config.cell}, embed {model_config.embed}{', tied head' if model_config.tied else ''}"
        f"{', relu head' if model_config.relu_head else ''}"
        f"{f', dropout {model_config.dropout}' if model_config.dropout else ''}"
        f"{', titles' if train_config.titles else ''}"
    )
    steps_per_epoch = len(data.epoch_plan(train_data, train_config.batch_size, train_config.seed, 0))
    schedule = (
        f"peak {train_config.lr}, warm-up {train_config.warmup_steps} steps, cosine to "
        f"{train_config.lr * train_config.lr_floor:.2g} by epoch {train_config.decay_epochs}"
        if train_config.schedule == "cosine"
        else f"{train_config.lr} constant"
    )
    log(
        f"optimizer: {train_config.optimizer}, learning rate {schedule}, batch {train_config.batch_size}, "
        f"{steps_per_epoch:,} steps an epoch"
    )
    log(
        f"buckets: {len(buckets)} lengths {list(buckets)}, "
        f"{data.padded_share(train_data, train_config.batch_size):.1%} of trained positions are padding"
    )
    log(f"platform: {describe_devices()}")
    feed = make_feed(mesh, train_config.batch_size)
    padding = feed.rows - train_config.batch_size
    log(
        describe_mesh(mesh, feed.rows)
        + (f" (each batch padded with {padding} masked row{'s' * (padding != 1)} to split evenly)" if padding else "")
        + (f"; {train_config.dtype} activations and products" if train_config.dtype != "float32" else "")
    )

    state = restored.state if saved else place_state(init_state(model_config, train_config), mesh)
    if saved:
        log(f"resuming from step {progress['step']:,}: epoch {progress['epoch'] + 1}, batch {progress['batch']}")
    record = {}
    # From here on Ctrl-C or SIGTERM means: finish the step, save, stop.
    with StopRequest() as stop, contextlib.ExitStack() as on_exit:
        started = time.perf_counter()
        train_programs, eval_programs = compile_steps(model_config, train_config, steps_per_epoch, state, buckets, feed)
        on_exit.callback(eval_programs.cancel)
        log(
            f"compiled {len(buckets)} training programs in {time.perf_counter() - started:.1f} s "
            f"(the {len(buckets)} evaluation programs compile as the first epoch runs)"
        )

        metrics_path = directory / "metrics.jsonl"
        trace = StepTrace(profile_dir if lead else None)
        if lead:
            trim_metrics(metrics_path, progress["epoch"])

        guard = DivergenceGuard(len(vocab), manager, train_config.lr)

        def save_now():
            guard.settle()
            write_checkpoint(
                manager,
                directory,
                lambda: checkpoint.save(manager, state, model_config, train_config, vocab, dict(progress)),
            )

        def stop_now():
            if manager.latest_step() != progress["step"]:
                save_now()
            write_checkpoint(manager, directory)
            message = (
                f"stopped: saved step {progress['step']:,} (epoch {progress['epoch'] + 1}, batch "
                f"{progress['batch']}); run the same command to resume"
            )
            if lead:
                log(message)
            else:  # every process says where it stopped: the one that was signalled may be any
                print(f"process {jax.process_index()}: {message}", file=sys.stderr)
            raise KeyboardInterrupt

        for epoch in range(progress["epoch"], train_config.epochs):
            plan = data.epoch_plan(train_data, train_config.batch_size, train_config.seed, epoch)
            epoch_started, sums = time.perf_counter(), []
            bar = tqdm(
                total=len(plan),
                initial=progress["batch"],
                desc=f"epoch {epoch + 1}/{train_config.epochs}",
                unit="batch",
                disable=not show_progress,
                leave=False,
                file=sys.stderr,
            )
            for bucket_index, rows in plan[progress["batch"] :]:
                batch = feed.batch(train_data, bucket_index, rows)
                trace.before_step(progress["step"])
                state, step_metrics = train_programs[train_data.buckets[bucket_index]](state, batch)
                trace.after_step(state)
                sums.append(step_metrics)
                progress["batch"] += 1
                progress["step"] += 1
                guard.observe(step_metrics, progress["step"], epoch + 1, bar)
                bar.update()
                if progress["batch"] % 20 == 0 and guard.last is not None:  # read by the guard: no extra wait
                    bar.set_postfix(loss=f"{guard.last:.3f}")
                if stop.agreed(progress["step"], progress["batch"]) and progress["batch"] < len(
                    plan
                ):  # at the last batch, finish the epoch
                    bar.close()
                    stop_now()
            bar.close()
            guard.settle()
            nll_sum = sum(float(m["nll_sum"]) for m in sums)
            tokens = sum(float(m["tokens"]) for m in sums)
            train_seconds = time.perf_counter() - epoch_started
            val = mean_nll(eval_programs, state["params"], val_data, train_config.batch_size, feed.batch)
            progress.update(epoch=epoch + 1, batch=0)
            record = {
                "epoch": epoch + 1,
                "step": progress["step"],
                "train_loss": nll_sum / max(tokens, 1.0),
                "val_loss": val and val["nll"],
                "val_ppl": val and perplexity(val["nll"]),
                "val_char_loss": val and val["char_nll"],
                "val_char_ppl": val and perplexity(val["char_nll"]),
                "tokens_per_s": tokens / train_seconds,
                "epoch_s": train_seconds,
                "elapsed_s": time.perf_counter() - started,
                "peak_rss_mb": peak_rss_mb(),
            }
            if lead:
                append_metrics(metrics_path, record)
            log(
                f"epoch {epoch + 1}/{train_config.epochs}: train {record['train_loss']:.3f}  "
                + (
                    f"val {val['nll']:.3f} (ppl {record['val_ppl']:.1f}; characters {val['char_nll']:.3f}, "
                    f"ppl {record['val_char_ppl']:.1f})  "
                    if val
                    else ""
                )
                + f"{record['tokens_per_s']:,.0f} tokens/s  {train_seconds:.0f} s  {record['peak_rss_mb']:,.0f} MB"
            )
            if (epoch + 1) % train_config.save_every == 0 or epoch + 1 == train_config.epochs:
                save_now()
                log(f"saved checkpoint at epoch {epoch + 1} (step {progress['step']:,}) in {directory}")
            if stop.agreed(progress["step"], progress["batch"], epoch_end=True) and epoch + 1 < train_config.epochs:
                stop_now()
        trace.stop()
    write_checkpoint(manager, directory)
    return record


def require_positive(args, names) -> None:
    """Flags that count something must be at least 1 (None means: not given)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise TangshiError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def build_parser() -> argparse.ArgumentParser:
    """Flags default to None: the preset decides, and the preset's gaps are the dataclass defaults."""
    parser = argparse.ArgumentParser(prog="python -m tangshi_jax.train", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        default=DEFAULT_PRESET,
        help=f"a named configuration (default {DEFAULT_PRESET}; original: the course exercise's)",
    )
    parser.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help="poems file of title:content lines (built from the corpus package if the default is missing)",
    )
    parser.add_argument("--checkpoint-dir", default="checkpoints", help="where checkpoints and metrics.jsonl go")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--optimizer", choices=OPTIMIZERS)
    parser.add_argument("--schedule", choices=SCHEDULES)
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument(
        "--decay-epochs", type=int, help="epochs of the cosine decay (default: the epochs of a new run)"
    )
    parser.add_argument("--cell", choices=CELLS)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--embed", type=int)
    parser.add_argument(
        "--dropout", type=float, help="share dropped at the embeddings, between layers and before the head"
    )
    parser.add_argument(
        "--tied",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the head reuses the embedding through a projection",
    )
    parser.add_argument(
        "--titles",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="read each poem after its title, so that `sample --title` can steer it",
    )
    parser.add_argument("--split", choices=("hash", "grouped"), help="grouped keeps near-repeat poems on one side")
    parser.add_argument("--relu-head", action="store_true", default=None, help="the original's ReLU on the logits")
    parser.add_argument("--save-every", type=int, help="epochs between checkpoints")
    parser.add_argument("--max-poems", type=int, default=None, help="train on the first N poems only")
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--dtype", choices=DTYPES, help="activations and matrix products (parameters and optimizer state stay float32)"
    )
    parser.add_argument("--platform", choices=PLATFORMS, default=None, help="default: the best JAX finds")
    parser.add_argument("--devices", type=int, help="use the first N local devices of each process (default: all)")
    parser.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="several processes make one run: process 0's address, the same for all",
    )
    parser.add_argument("--num-processes", type=int, help="processes in the run (with --coordinator)")
    parser.add_argument("--process-id", type=int, help="this process's number, 0 to N-1 (with --coordinator)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar within epochs")
    parser.add_argument(
        "--profile", metavar="DIR", help=f"write a jax.profiler trace of the first {PROFILE_STEPS} steps to DIR"
    )
    return parser


def configs_from_args(args) -> tuple[dict, TrainConfig]:
    """The preset with the flags given on top, checked."""
    require_positive(
        args,
        ("epochs", "batch_size", "layers", "hidden", "embed", "save_every", "max_poems", "decay_epochs", "devices"),
    )
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise TangshiError(f"--seed must be 0 or more (and below 2^63), got {args.seed}")
    if args.lr is not None and not args.lr > 0:
        raise TangshiError(f"--lr must be positive, got {args.lr}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise TangshiError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise TangshiError(f"--warmup-steps must be 0 or more, got {args.warmup_steps}")
    flags = {
        name: getattr(args, name)
        for name in (
            "epochs",
            "batch_size",
            "lr",
            "optimizer",
            "schedule",
            "warmup_steps",
            "decay_epochs",
            "cell",
            "layers",
            "hidden",
            "embed",
            "dropout",
            "tied",
            "titles",
            "split",
            "relu_head",
            "save_every",
            "max_poems",
            "seed",
            "dtype",
        )
    }
    return preset_configs(args.preset, data=args.data, **flags)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    model_settings, train_config = configs_from_args(args)
    use_platform(args.platform, Cluster(args.coordinator, args.num_processes, args.process_id))
    mesh = make_mesh(args.devices, args.platform)
    lead = jax.process_index() == 0  # only process 0 speaks
    train(
        train_config,
        model_settings,
        args.checkpoint_dir,
        log=print if lead else (lambda message: None),
        show_progress=lead and not args.no_progress,
        mesh=mesh,
        profile_dir=args.profile,
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
