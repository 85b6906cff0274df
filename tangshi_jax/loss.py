"""The output layer and its cross-entropy, fused and computed one time step at a time.

The head (hidden -> vocabulary) is about 80% of a training step's arithmetic, and a plain
log-softmax over (batch × length × 7k) logits writes and re-reads a 100+ MB tensor several
times per step. Here the logits of one time step at a time (batch × vocabulary, a few MB)
are made, reduced to their loss and turned straight into gradients inside one `lax.scan`;
the full logits never exist. The gradients are computed in the forward pass (no logits are
kept or recomputed for the backward pass), so the arithmetic is the same three products as
the unfused layer.

`steps` time steps go through each loop trip together (their rows stacked), so that the
products are taller and the loop shorter; `transposed` makes the weight gradient as
(d_logitsᵀ h)ᵀ, a layout XLA's CPU backend runs at another speed than hᵀ d_logits.
Measured (PERFORMANCE.md): 2 steps a trip gained 3–9% (half the loop trips, and half the
accumulations of the weight gradient, which XLA does not fold into its product), so it is
the default; the transposed layout gained nothing on the development machine.
"""

import functools

import jax
import jax.numpy as jnp

HEAD_STEPS = 2  # time steps per loop trip of the head (2: 3–9% faster than 1, PERFORMANCE.md)
HEAD_TRANSPOSED = False  # the weight gradient as (d_logitsᵀ h)ᵀ


def _time_major(features, targets, mask, steps=1):
    """(trips, steps × batch, ...): time-major, the time padded to a multiple of `steps` with
    masked positions, `steps` time steps of rows per trip."""
    arrays = [jnp.swapaxes(a, 0, 1) for a in (features, targets, mask)]
    length = arrays[0].shape[0]
    padded = -(-length // steps) * steps
    arrays = [jnp.pad(a, [(0, padded - length)] + [(0, 0)] * (a.ndim - 1)) for a in arrays]
    return tuple(a.reshape((padded // steps, steps * a.shape[1]) + a.shape[2:]) for a in arrays)


def _batch_major(rows, batch, length):
    """The inverse of _time_major for one (trips, steps × batch, ...) result."""
    rows = rows.reshape((-1, batch) + rows.shape[2:])[:length]
    return jnp.swapaxes(rows, 0, 1)


def _product(a, b):
    """a @ b in a's dtype (bfloat16 under mixed precision), accumulated and returned in float32."""
    return jnp.dot(a, b.astype(a.dtype), preferred_element_type=jnp.float32)


def _step_logits(h, kernel, bias, relu):
    pre = _product(h, kernel) + bias
    return (jax.nn.relu(pre) if relu else pre), pre


def nll_of_logits(logits, targets):
    """-log softmax(logits)[target] at every position (any leading shape), and the log-normaliser."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0], lse


def head_nll_positions(features, kernel, bias, targets, relu=False, steps=HEAD_STEPS):
    """-log p(target) at every position (B, T), `steps` time steps' logits at a time (no gradient)."""

    def step(_, xs):
        h, t, _ = xs
        logits, _ = _step_logits(h, kernel, bias, relu)
        return None, nll_of_logits(logits, t)[0]

    _, nll = jax.lax.scan(step, None, _time_major(features, targets, jnp.zeros(targets.shape), steps))
    return _batch_major(nll, *targets.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def head_nll(features, kernel, bias, targets, mask, relu=False, steps=HEAD_STEPS, transposed=HEAD_TRANSPOSED):
    """Sum over real positions of -log p(target), p = softmax(features @ kernel + bias)
    (with the original's ReLU on the logits when `relu`). features (B, T, H); targets, mask (B, T)."""

    def step(total, xs):
        h, t, m = xs
        logits, _ = _step_logits(h, kernel, bias, relu)
        nll, _ = nll_of_logits(logits, t)
        return total + jnp.sum(nll * m), None

    total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), _time_major(features, targets, mask, steps))
    return total


def _head_nll_forward(features, kernel, bias, targets, mask, relu, steps, transposed):
    def step(carry, xs):
        total, d_kernel, d_bias = carry
        h, t, m = xs
        logits, pre = _step_logits(h, kernel, bias, relu)
        nll, lse = nll_of_logits(logits, t)
        # d(nll)/d(logits) = softmax - onehot(target), for real positions only.
        d_logits = jnp.exp(logits - lse[:, None]) * m[:, None]
        d_logits = d_logits.at[jnp.arange(t.shape[0]), t].add(-m)
        if relu:
            d_logits = jnp.where(pre > 0, d_logits, 0.0)
        d_kernel += _product(d_logits.astype(h.dtype).T, h) if transposed else _product(h.T, d_logits)
        carry = (total + jnp.sum(nll * m), d_kernel, d_bias + jnp.sum(d_logits, axis=0))
        return carry, _product(d_logits.astype(h.dtype), kernel.T).astype(h.dtype)

    d_kernel = jnp.zeros_like(kernel.T if transposed else kernel)
    init = (jnp.zeros((), jnp.float32), d_kernel, jnp.zeros_like(bias))
    (total, d_kernel, d_bias), d_features = jax.lax.scan(step, init, _time_major(features, targets, mask, steps))
    return total, (_batch_major(d_features, *targets.shape), d_kernel.T if transposed else d_kernel, d_bias)


def _head_nll_backward(relu, steps, transposed, residuals, cotangent):
    d_features, d_kernel, d_bias = residuals
    return (cotangent * d_features).astype(d_features.dtype), cotangent * d_kernel, cotangent * d_bias, None, None


head_nll.defvjp(_head_nll_forward, _head_nll_backward)
