"""The adaptive output layer (Grave et al. 2017, "Efficient softmax approximation for GPUs").

The vocabulary is sorted by frequency, so its first ids are most of the text. The head
cluster is a softmax over the commonest characters plus one entry per tail cluster; each
tail cluster is a softmax over its own rarer characters, read through a narrower projection
of the features. The probability of a tail character is p(its cluster) × p(it | cluster),
so log p is exact, never approximated:

    log p(w) = head_log_softmax[w]                                 w in the head
    log p(w) = head_log_softmax[cluster] + tail_log_softmax[w]     w in a tail cluster

The weights are one pytree (`AdaptiveWeights`), however the model makes them (untied, or
tied to the embedding: model.adaptive_weights), so one loss and one log-probability serve
both. With no tail bias and tails `width // div**(i+1)` wide it is PyTorch's
`nn.AdaptiveLogSoftmaxWithLoss` (head bias on), which tests/test_torch_model.py checks.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tangshi_jax.loss import HEAD_STEPS, _batch_major, _product, _time_major, nll_of_logits


class AdaptiveWeights(NamedTuple):
    head_kernel: jax.Array  # (features, shortlist + tails): the head cluster's logits
    head_bias: jax.Array  # (shortlist + tails,)
    tail_projections: tuple  # per tail cluster, (features, its width)
    tail_kernels: tuple  # per tail cluster, (its width, its characters)


def cluster_bounds(vocab_size: int, cutoffs) -> tuple[int, ...]:
    """Where each cluster starts, then the vocabulary's end: (0, c1, ..., vocab_size).
    Cut-offs at or past the vocabulary's end make no cluster."""
    inside = [cutoff for cutoff in cutoffs if 0 < cutoff < vocab_size]
    return (0, *inside, vocab_size)


def tail_widths(features: int, num_tails: int, div: float) -> tuple[int, ...]:
    """PyTorch's sizing: tail i reads features // div**(i+1) (at least 1) of the features."""
    return tuple(max(1, int(features // div ** (index + 1))) for index in range(num_tails))


def _head_logits(h, weights):
    return _product(h, weights.head_kernel) + weights.head_bias


def _tail_logits(h, projection, kernel):
    return _product(_product(h, projection).astype(h.dtype), kernel)


def log_probs(h, weights: AdaptiveWeights):
    """The normalised log-probability of every character, (..., vocab), from features (..., F)."""
    head = jax.nn.log_softmax(_head_logits(h, weights), axis=-1)
    shortlist = head.shape[-1] - len(weights.tail_kernels)
    parts = [head[..., :shortlist]]
    for index, (projection, kernel) in enumerate(zip(weights.tail_projections, weights.tail_kernels)):
        tail = jax.nn.log_softmax(_tail_logits(h, projection, kernel), axis=-1)
        parts.append(tail + head[..., shortlist + index, None])
    return jnp.concatenate(parts, axis=-1)


def _picked(logits, index):
    """-log softmax(logits)[index] per row."""
    return nll_of_logits(logits, index)[0]


# Rows of a trip whose tail term is made, as a share of the trip's rows, by tail: the tails
# hold 16% and 2% of the Tang poems' characters. A trip with more rows in a tail than this
# makes that tail for every row, so the loss stays exact whatever the text.
TAIL_SHARES = (0.25, 0.0625)


def _tail_nll(h, projection, kernel, local, inside, share):
    """The tail term -log p(target | cluster) at the rows `inside` the cluster (0 elsewhere).
    As PyTorch's adaptive softmax does, only the cluster's rows are gathered before the
    products, up to `share` of the rows (a fixed shape); more of them, and every row is made."""
    rows = h.shape[0]
    capacity = min(rows, max(1, int(rows * share)))

    def every_row():
        return jnp.where(inside, _picked(_tail_logits(h, projection, kernel), local), 0.0)

    if capacity == rows:
        return every_row()

    def gathered():
        (picked,) = jnp.nonzero(inside, size=capacity, fill_value=rows)  # rows: past the end, dropped
        taken = jnp.minimum(picked, rows - 1)
        nll = _picked(_tail_logits(h[taken], projection, kernel), local[taken])
        return jnp.zeros(rows, jnp.float32).at[picked].add(nll, mode="drop")

    return jax.lax.cond(jnp.sum(inside) <= capacity, gathered, every_row)


def target_nll(h, weights: AdaptiveWeights, targets, shares=None):
    """-log p(target) per row of h (rows, F), targets (rows,): the head term, plus the tail
    term of the target's cluster. Each tail is made for the rows whose target it holds
    (gathered up to `shares` of the rows, TAIL_SHARES by default; None in a share: every row)."""
    shortlist = weights.head_kernel.shape[-1] - len(weights.tail_kernels)
    shares = TAIL_SHARES if shares is None else shares
    start, head_index = shortlist, targets
    nll_tail = jnp.zeros(targets.shape, jnp.float32)
    for index, (projection, kernel) in enumerate(zip(weights.tail_projections, weights.tail_kernels)):
        size = kernel.shape[-1]
        inside = (targets >= start) & (targets < start + size)
        head_index = jnp.where(inside, shortlist + index, head_index)
        local = jnp.clip(targets - start, 0, size - 1)
        share = shares[index] if index < len(shares) and shares[index] is not None else 1.0
        nll_tail += _tail_nll(h, projection, kernel, local, inside, share)
        start += size
    return _picked(_head_logits(h, weights), head_index) + nll_tail


def nll_positions(features, weights: AdaptiveWeights, targets, steps=HEAD_STEPS):
    """-log p(target) at every position (B, T), `steps` time steps at a time (no gradient)."""

    def step(_, xs):
        h, t, _ = xs
        return None, target_nll(h, weights, t)

    _, nll = jax.lax.scan(step, None, _time_major(features, targets, jnp.zeros(targets.shape), steps))
    return _batch_major(nll, *targets.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def fused_nll(features, weights: AdaptiveWeights, targets, mask, steps=HEAD_STEPS):
    """Sum over real positions of -log p(target), `steps` time steps' logits at a time, as
    loss.head_nll does for the full head: each loop trip's gradients are made in the forward
    pass (autodiff of that trip alone), so no logits are kept for a backward pass."""

    def step(total, xs):
        h, t, m = xs
        return total + _trip_nll(h, weights, t, m), None

    total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), _time_major(features, targets, mask, steps))
    return total


def _trip_nll(h, weights, t, m):
    return jnp.sum(target_nll(h, weights, t) * m)


def _fused_forward(features, weights, targets, mask, steps):
    def step(carry, xs):
        total, d_weights = carry
        h, t, m = xs
        nll, (d_h, d_trip) = jax.value_and_grad(_trip_nll, argnums=(0, 1))(h, weights, t, m)
        return (total + nll, jax.tree_util.tree_map(jnp.add, d_weights, d_trip)), d_h

    init = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, weights))
    (total, d_weights), d_features = jax.lax.scan(step, init, _time_major(features, targets, mask, steps))
    return total, (_batch_major(d_features, *targets.shape), d_weights)


def _fused_backward(steps, residuals, cotangent):
    d_features, d_weights = residuals
    d_weights = jax.tree_util.tree_map(lambda d: cotangent * d, d_weights)
    return (cotangent * d_features).astype(d_features.dtype), d_weights, None, None


fused_nll.defvjp(_fused_forward, _fused_backward)
