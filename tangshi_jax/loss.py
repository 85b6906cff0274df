"""The output layer and its cross-entropy, fused and computed one time step at a time.

The head (hidden -> vocabulary) is about 80% of a training step's arithmetic, and a plain
log-softmax over (batch × length × 7k) logits writes and re-reads a 100+ MB tensor several
times per step. Here the logits of one time step at a time (batch × vocabulary, a few MB)
are made, reduced to their loss and turned straight into gradients inside one `lax.scan`;
the full logits never exist. The gradients are computed in the forward pass (no logits are
kept or recomputed for the backward pass), so the arithmetic is the same three products as
the unfused layer.
"""

import functools

import jax
import jax.numpy as jnp


def _time_major(features, targets, mask):
    return jnp.swapaxes(features, 0, 1), jnp.swapaxes(targets, 0, 1), jnp.swapaxes(mask, 0, 1)


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


def head_nll_positions(features, kernel, bias, targets, relu=False):
    """-log p(target) at every position (B, T), one time step's logits at a time (no gradient)."""
    def step(_, xs):
        h, t = xs
        logits, _ = _step_logits(h, kernel, bias, relu)
        return None, nll_of_logits(logits, t)[0]
    _, nll = jax.lax.scan(step, None, (jnp.swapaxes(features, 0, 1), jnp.swapaxes(targets, 0, 1)))
    return jnp.swapaxes(nll, 0, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def head_nll(features, kernel, bias, targets, mask, relu=False):
    """Sum over real positions of -log p(target), p = softmax(features @ kernel + bias)
    (with the original's ReLU on the logits when `relu`). features (B, T, H); targets, mask (B, T)."""
    def step(total, xs):
        h, t, m = xs
        logits, _ = _step_logits(h, kernel, bias, relu)
        nll, _ = nll_of_logits(logits, t)
        return total + jnp.sum(nll * m), None
    total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), _time_major(features, targets, mask))
    return total


def _head_nll_forward(features, kernel, bias, targets, mask, relu):
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
        carry = (total + jnp.sum(nll * m), d_kernel + _product(h.T, d_logits), d_bias + jnp.sum(d_logits, axis=0))
        return carry, _product(d_logits.astype(h.dtype), kernel.T).astype(h.dtype)
    init = (jnp.zeros((), jnp.float32), jnp.zeros_like(kernel), jnp.zeros_like(bias))
    (total, d_kernel, d_bias), d_features = jax.lax.scan(step, init, _time_major(features, targets, mask))
    return total, (jnp.swapaxes(d_features, 0, 1), d_kernel, d_bias)


def _head_nll_backward(relu, residuals, cotangent):
    d_features, d_kernel, d_bias = residuals
    return (cotangent * d_features).astype(d_features.dtype), cotangent * d_kernel, cotangent * d_bias, None, None


head_nll.defvjp(_head_nll_forward, _head_nll_backward)
