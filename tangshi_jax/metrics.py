"""What the model's predictions cost, as training logs it and evaluation reports it: -log p
of every target, the eval step's sums and their mean over a bucketed set, perplexity, and the
lines of a run's metrics.jsonl. Training, evaluation and export share these; none of them
needs the optimizer, so evaluation never imports the trainer."""

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp

from tangshi_jax import data, head
from tangshi_jax.cache import write_atomically
from tangshi_jax.config import ModelConfig
from tangshi_jax.devices import peak_rss_mb
from tangshi_jax.errors import TangshiError
from tangshi_jax.loss import HEAD_STEPS, head_nll, head_nll_positions
from tangshi_jax.model import PoemModel, adaptive_weights, head_weights, initial_carry


def position_nll(model_config: ModelConfig, params, inputs, targets):
    """-log p(target) at every position (batch, time), no dropout, one time step's logits at a time."""
    _, features = PoemModel(model_config).apply(
        {"params": params}, inputs, initial_carry(model_config, inputs.shape[0]), features_only=True
    )
    if model_config.head == "adaptive":
        return head.nll_positions(features, adaptive_weights(params, model_config), targets)
    kernel, bias = head_weights(params, model_config)
    return head_nll_positions(features, kernel, bias, targets, model_config.relu_head)


def summed_nll(model_config: ModelConfig, params, features, targets, mask, steps=HEAD_STEPS, transposed=False):
    """Sum of -log p(target) over the masked positions, through the model's head fused with its
    loss (gradients made in the forward pass, loss.py and head.py); what training differentiates."""
    if model_config.head == "adaptive":
        return head.fused_nll(features, adaptive_weights(params, model_config), targets, mask, steps)
    kernel, bias = head_weights(params, model_config)
    return head_nll(features, kernel, bias, targets, mask, model_config.relu_head, steps, transposed)


def eval_sums(model_config: ModelConfig, params, batch) -> dict:
    """The eval step: sums over all loss targets and over Chinese characters only (no
    punctuation, no E), so that a set's mean divides once at the end."""
    nll = position_nll(model_config, params, batch["inputs"], batch["targets"])
    return {
        "nll_sum": jnp.sum(nll * batch["mask"]),
        "tokens": jnp.sum(batch["mask"]),
        "char_nll_sum": jnp.sum(nll * batch["chars"]),
        "chars": jnp.sum(batch["chars"]),
    }


def mean_nll(eval_programs, params, bucketed: data.BucketedData, batch_size: int, batch_of=None) -> dict | None:
    """Mean NLL per target over a whole bucketed set, and per Chinese character (None when empty).

    eval_programs: the eval step by bucket length. batch_of(bucketed, bucket_index, rows) makes
    each batch (training's feed, for a mesh); by default plain host arrays for one device."""
    batch_of = batch_of or (
        lambda bucketed, bucket_index, rows: data.make_batch(bucketed, bucket_index, rows, batch_size)
    )
    totals = [
        eval_programs[bucketed.buckets[bucket_index]](params, batch_of(bucketed, bucket_index, rows))
        for bucket_index, rows in data.epoch_plan(bucketed, batch_size, 0, 0, shuffle=False)
    ]
    if not totals:
        return None
    total = {key: sum(float(part[key]) for part in totals) for key in totals[0]}
    return {"nll": total["nll_sum"] / total["tokens"], "char_nll": total["char_nll_sum"] / max(total["chars"], 1.0)}


def validation_nll(params, model_config: ModelConfig, train_config, val_data: data.BucketedData) -> dict | None:
    """Mean NLL per target and per Chinese character of a bucketed validation set (None when empty)."""
    eval_jit = jax.jit(functools.partial(eval_sums, model_config))
    return mean_nll({length: eval_jit for length in val_data.buckets}, params, val_data, train_config.batch_size)


def perplexity(nll: float) -> float:
    """exp(nll), or inf where that would overflow a float (no warning); nan stays nan."""
    try:
        return math.exp(nll)
    except OverflowError:
        return float("inf")


def logged_epoch(line: str) -> float:
    """The epoch of a metrics.jsonl line; a line cut short by a kill counts as past every epoch."""
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def epoch_record(
    epoch: int, step: int, nll_sum: float, tokens: float, val: dict | None, seconds: float, elapsed: float
) -> dict:
    """The metrics.jsonl line of an epoch: its training loss (summed over its steps, divided
    here), the validation set's (mean_nll; None without one) with perplexities, its speed, and
    the run's time and peak memory so far."""
    return {
        "epoch": epoch,
        "step": step,
        "train_loss": nll_sum / max(tokens, 1.0),
        "val_loss": val and val["nll"],
        "val_ppl": val and perplexity(val["nll"]),
        "val_char_loss": val and val["char_nll"],
        "val_char_ppl": val and perplexity(val["char_nll"]),
        "tokens_per_s": tokens / seconds,
        "epoch_s": seconds,
        "elapsed_s": elapsed,
        "peak_rss_mb": peak_rss_mb(),
    }


def epoch_line(record: dict, epochs: int) -> str:
    """What training logs of an epoch's record; before the last, the minutes the epochs left will
    take at this epoch's pace (the same command takes 1.5x as long on one 2-core machine as on
    another, so the README's minutes cannot tell a user what to expect)."""
    val = (
        f"val {record['val_loss']:.3f} (ppl {record['val_ppl']:.1f}; characters {record['val_char_loss']:.3f}, "
        f"ppl {record['val_char_ppl']:.1f})  "
        if record["val_loss"] is not None
        else ""
    )
    return (
        f"epoch {record['epoch']}/{epochs}: train {record['train_loss']:.3f}  {val}"
        f"{record['tokens_per_s']:,.0f} tokens/s  {record['epoch_s']:.0f} s  {record['peak_rss_mb']:,.0f} MB"
        f"{time_to_go(record['epoch_s'], epochs - record['epoch'])}"
    )


def time_to_go(epoch_s: float, epochs_left: int) -> str:
    """'  about N min to go' for the epochs left at epoch_s seconds each (nothing after the last)."""
    if epochs_left <= 0:
        return ""
    minutes = epoch_s * epochs_left / 60
    return f"  about {minutes:.0f} min to go" if minutes >= 1 else "  under a minute to go"


def trim_metrics(path: Path, epoch: int) -> None:
    """Drop epochs logged after the checkpoint being resumed: they are trained again."""
    if not path.exists():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if logged_epoch(line) <= epoch]
    write_atomically(path, "".join(line + "\n" for line in lines))


def append_metrics(path: Path, record: dict) -> None:
    try:
        with path.open("a", encoding="utf-8") as metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
    except OSError as error:
        raise TangshiError(
            f"cannot write {path}: {error.strerror}; free some space and run the same command again to resume"
        ) from None


def read_metrics(path: Path) -> list[dict]:
    """The epochs a run logged, in order, without a last line cut short by a kill."""
    return [
        json.loads(line)
        for line in Path(path).read_text(encoding="utf-8").splitlines()
        if logged_epoch(line) != float("inf")
    ]
