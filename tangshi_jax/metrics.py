"""What the model's predictions cost, as training logs it and evaluation reports it: -log p
of every target, the eval step's sums and their mean over a bucketed set, perplexity, and the
lines of a run's metrics.jsonl. Training, evaluation and export share these; none of them
needs the optimizer, so evaluation never imports the trainer."""

import json
import math
from pathlib import Path

import jax.numpy as jnp

from tangshi_jax import data
from tangshi_jax.config import ModelConfig
from tangshi_jax.loss import head_nll_positions
from tangshi_jax.model import PoemModel, head_weights, initial_carry


def position_nll(model_config: ModelConfig, params, inputs, targets):
    """-log p(target) at every position (batch, time), no dropout, one time step's logits at a time."""
    _, features = PoemModel(model_config).apply(
        {"params": params}, inputs, initial_carry(model_config, inputs.shape[0]), features_only=True
    )
    kernel, bias = head_weights(params, model_config)
    return head_nll_positions(features, kernel, bias, targets, model_config.relu_head)


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


def read_metrics(path: Path) -> list[dict]:
    """The epochs a run logged, in order, without a last line cut short by a kill."""
    return [
        json.loads(line)
        for line in Path(path).read_text(encoding="utf-8").splitlines()
        if logged_epoch(line) != float("inf")
    ]
