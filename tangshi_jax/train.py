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
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from tangshi_jax import checkpoint, data
from tangshi_jax.config import ModelConfig, TrainConfig
from tangshi_jax.devices import (
    Cluster,
    Feed,
    compile_for_mesh,
    describe_devices,
    describe_feed,
    make_feed,
    make_mesh,
    place_state,
    replicated,
    use_platform,
)
from tangshi_jax.errors import TangshiError, run_cli
from tangshi_jax.guards import DivergenceGuard, StopRequest
from tangshi_jax.loss import HEAD_STEPS, HEAD_TRANSPOSED, nll_of_logits
from tangshi_jax.metrics import append_metrics, epoch_line, epoch_record, eval_sums, mean_nll, summed_nll, trim_metrics
from tangshi_jax.model import PoemModel, describe_head, init_params, initial_carry
from tangshi_jax.profile import StepTrace
from tangshi_jax.train_flags import DEFAULT_DATA, add_flags, configs_from_args


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


def make_batch_nll(
    model_config: ModelConfig,
    train_config: TrainConfig,
    fused_head: bool = True,
    head_steps: int = HEAD_STEPS,
    transposed: bool = HEAD_TRANSPOSED,
    wavefront: bool = False,
    hand_gradients: bool = True,
):
    """batch_nll(params, batch, dropout_key=None): the sum of -log p(target) over a batch's
    masked positions, and their count; with a dropout key, as in training. The other arguments
    make the variants `bench --variants` measures side by side, all with the same mathematics:
    fused_head=False builds all logits and a plain log-softmax; head_steps and transposed set
    the fused head's loop (loss.py); wavefront runs the stacked layers in one scan (model.py);
    hand_gradients=False differentiates the LSTM layers by autodiff of their scan (model.py)."""
    dtype = jnp.dtype(train_config.dtype)
    model = PoemModel(model_config, dtype, wavefront=wavefront, hand_gradients=hand_gradients)

    def batch_nll(params, batch, dropout_key=None):
        carry = initial_carry(model_config, batch["inputs"].shape[0])
        targets, mask = batch["targets"], batch["mask"]
        train = dropout_key is not None
        rngs = {"dropout": dropout_key} if train else {}
        if fused_head:
            _, features = model.apply(
                {"params": params}, batch["inputs"], carry, features_only=True, train=train, rngs=rngs
            )
            nll_sum = summed_nll(model_config, params, features.astype(dtype), targets, mask, head_steps, transposed)
        else:
            _, logits = model.apply({"params": params}, batch["inputs"], carry, train=train, rngs=rngs)
            nll_sum = jnp.sum(nll_of_logits(logits, targets)[0] * mask)
        return nll_sum, jnp.sum(mask)

    return batch_nll


def make_steps(model_config: ModelConfig, train_config: TrainConfig, steps_per_epoch: int = 1, **variant):
    """The pure train and eval steps of one model (`variant`: make_batch_nll's keywords)."""
    batch_nll = make_batch_nll(model_config, train_config, **variant)
    optimizer = make_optimizer(train_config, steps_per_epoch)

    def mean_batch_nll(params, batch, dropout_key):
        nll_sum, tokens = batch_nll(params, batch, dropout_key)
        return nll_sum / jnp.maximum(tokens, 1.0), (nll_sum, tokens)

    def train_step(state, batch):
        # A key of its own for every step, so a resumed run draws what an uninterrupted one would.
        dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        (_, (nll_sum, tokens)), grads = jax.value_and_grad(mean_batch_nll, has_aux=True)(
            state["params"], batch, dropout_key
        )
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1)
        if train_config.ema_decay:
            new_state["ema"] = optax.incremental_update(params, state["ema"], 1 - train_config.ema_decay)
        return new_state, {"nll_sum": nll_sum, "tokens": tokens}

    def eval_step(params, batch):
        return eval_sums(model_config, params, batch)

    return train_step, eval_step


def init_state(model_config: ModelConfig, train_config: TrainConfig, seed: int | None = None) -> dict:
    """Everything that changes during training; the data position lives in `progress`."""
    seed = train_config.seed if seed is None else seed
    init_key, rng = jax.random.split(jax.random.key(seed))
    params = init_params(model_config, init_key)
    state = {
        "params": params,
        "opt_state": make_optimizer(train_config).init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(rng),
    }
    if train_config.ema_decay:  # the weights' moving average starts at the weights
        state["ema"] = jax.tree_util.tree_map(jnp.copy, params)
    return state


def compile_steps(model_config, train_config, steps_per_epoch, state, buckets, feed: Feed):
    """This model's train and eval steps compiled for every bucket on the feed's mesh: the train
    steps ready, the eval steps still compiling (devices.compile_for_mesh)."""
    train_step, eval_step = make_steps(model_config, train_config, steps_per_epoch)
    return compile_for_mesh(train_step, eval_step, state, buckets, feed)


def load_poems(train_config: TrainConfig, log) -> data.Corpus:
    return data.load_corpus(
        train_config.data,
        train_config.corpus,
        build=train_config.data == DEFAULT_DATA,
        several_processes=jax.process_count() > 1,
        log=log,
    )


def abstract_state(model_config: ModelConfig, train_config: TrainConfig, mesh: Mesh):
    """Shapes, types and shardings (replicated on the mesh) of a run's state, for restoring it."""
    return jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated(mesh)),
        jax.eval_shape(lambda: init_state(model_config, train_config)),
    )


@dataclasses.dataclass
class Run:
    """A run as its loop and its checkpoints see it: what it trains, where it saves, how far it is."""

    directory: Path
    manager: Any  # Orbax's CheckpointManager of `directory`
    model_config: ModelConfig
    train_config: TrainConfig
    dataset: data.Dataset
    feed: Feed
    state: dict  # replaced by every step
    progress: dict  # the epoch and batch to train next, the global step, the fingerprint of the poems
    guard: DivergenceGuard
    log: Callable[[str], None]
    lead: bool  # process 0: it writes metrics.jsonl and speaks


def open_run(directory: Path, train_config: TrainConfig, mesh: Mesh, log) -> tuple:
    """The run's checkpoint manager and its newest step that reads (None for a new run). A step
    that does not read is set aside by the lead process (log None in the others)."""
    manager = checkpoint.open_manager(directory, keep=train_config.keep)
    restored = checkpoint.restore_newest(
        manager,
        lambda meta: abstract_state(meta.model_config, meta.train_config, mesh),
        on_skip=lambda step, reason: checkpoint.set_aside_unreadable(directory, step, reason, log),
    )
    if jax.process_count() > 1:  # every process sees the steps the lead set aside
        multihost_utils.sync_global_devices("tangshi_jax: unreadable steps set aside")
    manager.reload()
    return manager, restored


def settled_config(train_config: TrainConfig, model_settings: dict, saved, directory: Path) -> TrainConfig:
    """The config to train with: an unset cosine decay filled in, and a resumed run's checked
    against the one it began with."""
    if train_config.schedule == "cosine" and not train_config.decay_epochs:
        # Unset: a new run decays over the epochs it is asked for; a resumed run keeps its own.
        decay_epochs = saved.train_config.decay_epochs if saved else train_config.epochs
        train_config = dataclasses.replace(train_config, decay_epochs=decay_epochs)
    if saved:  # before reading any data: a mismatch is named, not met as an odd character later
        model_config = ModelConfig(vocab_size=len(saved.vocab), **model_settings)
        checkpoint.check_resumable(saved.model_config, model_config, saved.train_config, train_config, directory)
    return train_config


def read_poems(train_config: TrainConfig, saved, directory: Path, log) -> tuple:
    """The corpus, its dataset (in the vocabulary of the run resumed) and the progress the run
    starts from, which names the poems read."""
    corpus = load_poems(train_config, log)
    poems_read = data.fingerprint(corpus, train_config)
    checkpoint.check_same_poems(saved and saved.progress.get("data"), poems_read, train_config.data, directory)
    dataset = data.make_dataset(corpus, train_config, saved.vocab if saved else None)
    progress = dict(saved.progress if saved else {"epoch": 0, "batch": 0, "step": 0}, data=poems_read)
    return corpus, dataset, progress


def log_summary(log, corpus, dataset, model_config, train_config, steps_per_epoch: int, feed: Feed) -> None:
    """The lines a run starts with: its poems, model, optimizer, buckets and devices."""
    train_data, val_data = dataset.train, dataset.val
    kept = len(corpus.used(train_config.max_poems))
    used = f"{kept:,} of {len(corpus.poems):,} usable" if kept < len(corpus.poems) else f"{kept:,} usable"
    log(
        f"poems: {used} ({train_data.num_poems:,} train, {val_data.num_poems:,} validation), "
        f"{corpus.skipped:,} skipped by the rules, {corpus.unparsable:,} unparsable lines"
        + (f" (first at line {corpus.first_unparsable} of {train_config.data})" if corpus.first_unparsable else "")
    )
    if train_config.split == "grouped":
        log(data.describe_split(dataset.counts, train_config.corpus[1:]))
    log(
        f"vocabulary: {len(dataset.vocab):,} characters; model: {model_config.layers}×{model_config.hidden} "
        f"{model_config.cell}, embed {model_config.embed}{describe_head(model_config)}"
        f"{', relu head' if model_config.relu_head else ''}"
        f"{f', dropout {model_config.dropout}' if model_config.dropout else ''}"
        f"{', titles' if train_config.titles else ''}"
        + (
            f"; validation and sampling read the weights' average (decay {train_config.ema_decay})"
            if train_config.ema_decay
            else ""
        )
    )
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
        f"buckets: {len(train_data.buckets)} lengths {list(train_data.buckets)}, "
        f"{data.padded_share(train_data, train_config.batch_size):.1%} of trained positions are padding"
    )
    log(f"platform: {describe_devices()}")
    log(
        describe_feed(feed, train_config.batch_size)
        + (f"; {train_config.dtype} activations and products" if train_config.dtype != "float32" else "")
    )


def train_epoch(run: Run, epoch: int, programs: dict, stop: StopRequest, trace: StepTrace, show_progress: bool):
    """Train the epoch's batches from where the run stands; the summed loss, the tokens and the
    seconds. A stop agreed on before the epoch's last batch saves and ends the run."""
    train_data, progress = run.dataset.train, run.progress
    plan = data.epoch_plan(train_data, run.train_config.batch_size, run.train_config.seed, epoch)
    epoch_started, sums = time.perf_counter(), []
    bar = tqdm(
        total=len(plan),
        initial=progress["batch"],
        desc=f"epoch {epoch + 1}/{run.train_config.epochs}",
        unit="batch",
        disable=not show_progress,
        leave=False,
        file=sys.stderr,
    )
    for bucket_index, rows in plan[progress["batch"] :]:
        batch = run.feed.batch(train_data, bucket_index, rows)
        trace.before_step(progress["step"])
        run.state, step_metrics = programs[train_data.buckets[bucket_index]](run.state, batch)
        trace.after_step(run.state)
        sums.append(step_metrics)
        progress["batch"] += 1
        progress["step"] += 1
        run.guard.observe(step_metrics, progress["step"], epoch + 1, bar)
        bar.update()
        if progress["batch"] % 20 == 0 and run.guard.last is not None:  # read by the guard: no extra wait
            bar.set_postfix(loss=f"{run.guard.last:.3f}")
        if stop.agreed(progress["step"], progress["batch"]) and progress["batch"] < len(plan):
            bar.close()  # (a stop at the last batch waits for the epoch's end: evaluated, logged, saved)
            stop_run(run)
    bar.close()
    run.guard.settle()
    nll_sum = sum(float(m["nll_sum"]) for m in sums)
    tokens = sum(float(m["tokens"]) for m in sums)
    return nll_sum, tokens, time.perf_counter() - epoch_started


def end_epoch(run: Run, epoch: int, trained: tuple, eval_programs, started: float) -> dict:
    """Evaluate, record the epoch in metrics.jsonl (the lead process) and log its line; the record."""
    nll_sum, tokens, train_seconds = trained
    weights = run.state[checkpoint.inference_weights(run.train_config)]
    val = mean_nll(eval_programs, weights, run.dataset.val, run.train_config.batch_size, run.feed.batch)
    run.progress.update(epoch=epoch + 1, batch=0)
    record = epoch_record(
        epoch + 1, run.progress["step"], nll_sum, tokens, val, train_seconds, time.perf_counter() - started
    )
    if run.lead:
        append_metrics(run.directory / "metrics.jsonl", record)
    run.log(epoch_line(record, run.train_config.epochs))
    return record


def save_run(run: Run) -> None:
    """Every loss checked, then the state written (asynchronously) as the checkpoint of its step."""
    run.guard.settle()
    checkpoint.write_checkpoint(
        run.manager,
        run.directory,
        lambda: checkpoint.save(
            run.manager, run.state, run.model_config, run.train_config, run.dataset.vocab, dict(run.progress)
        ),
    )


def stop_run(run: Run) -> None:
    """Save where the run stands (unless that step is saved), wait for the writes, say where it
    stopped, and stop."""
    if run.manager.latest_step() != run.progress["step"]:
        save_run(run)
    checkpoint.write_checkpoint(run.manager, run.directory)
    message = (
        f"stopped: saved step {run.progress['step']:,} (epoch {run.progress['epoch'] + 1}, batch "
        f"{run.progress['batch']}); run the same command to resume"
    )
    if run.lead:
        run.log(message)
    else:  # every process says where it stopped: the one that was signalled may be any
        print(f"process {jax.process_index()}: {message}", file=sys.stderr)
    raise KeyboardInterrupt


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
    directory = checkpoint.writable_directory(Path(checkpoint_dir))
    mesh = mesh or make_mesh()
    lead = jax.process_index() == 0  # the process that writes metrics.jsonl
    manager, restored = open_run(directory, train_config, mesh, log if lead else None)
    saved = restored and restored.meta
    train_config = settled_config(train_config, model_settings, saved, directory)
    corpus, dataset, progress = read_poems(train_config, saved, directory, log)
    model_config = ModelConfig(vocab_size=len(dataset.vocab), **model_settings)
    if progress["epoch"] >= train_config.epochs:
        log(f"{directory} is already trained for {progress['epoch']} epochs; raise --epochs to train on")
        return {}
    if not dataset.train.num_poems:
        raise TangshiError(
            f"all {len(dataset.val_poems)} poems fell into the validation split; use more poems (--max-poems)"
        )
    steps_per_epoch = len(data.epoch_plan(dataset.train, train_config.batch_size, train_config.seed, 0))
    feed = make_feed(mesh, train_config.batch_size)
    log_summary(log, corpus, dataset, model_config, train_config, steps_per_epoch, feed)
    state = restored.state if saved else place_state(init_state(model_config, train_config), mesh)
    if saved:
        log(f"resuming from step {progress['step']:,}: epoch {progress['epoch'] + 1}, batch {progress['batch']}")
    guard = DivergenceGuard(len(dataset.vocab), manager, train_config.lr)
    run = Run(directory, manager, model_config, train_config, dataset, feed, state, progress, guard, log, lead)
    record = {}
    # From here on Ctrl-C or SIGTERM means: finish the step, save, stop.
    with StopRequest() as stop, contextlib.ExitStack() as on_exit:
        started = time.perf_counter()
        buckets = dataset.train.buckets
        train_programs, eval_programs = compile_steps(model_config, train_config, steps_per_epoch, state, buckets, feed)
        del state  # run.state from here: each step replaces it, and this one is not held
        on_exit.callback(eval_programs.cancel)
        log(
            f"compiled {len(buckets)} training programs in {time.perf_counter() - started:.1f} s "
            f"(the {len(buckets)} evaluation programs compile as the first epoch runs)"
        )
        trace = StepTrace(profile_dir if lead else None)
        if lead:
            trim_metrics(directory / "metrics.jsonl", progress["epoch"])
        for epoch in range(progress["epoch"], train_config.epochs):
            trained = train_epoch(run, epoch, train_programs, stop, trace, show_progress)
            record = end_epoch(run, epoch, trained, eval_programs, started)
            if (epoch + 1) % train_config.save_every == 0 or epoch + 1 == train_config.epochs:
                save_run(run)
                log(f"saved checkpoint at epoch {epoch + 1} (step {progress['step']:,}) in {directory}")
            if stop.agreed(progress["step"], progress["batch"], epoch_end=True) and epoch + 1 < train_config.epochs:
                stop_run(run)
        trace.stop()
    checkpoint.write_checkpoint(manager, directory)
    return record


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tangshi_jax.train", description=__doc__.splitlines()[0])
    add_flags(parser)
    return parser


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
