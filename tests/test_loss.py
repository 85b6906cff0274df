import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tangshi_jax.loss import head_nll, head_nll_positions


def plain_nll(features, kernel, bias, targets, mask, relu):
    logits = features @ kernel + bias
    if relu:
        logits = jax.nn.relu(logits)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0] * mask)


@pytest.mark.parametrize(
    "relu, steps, transposed",
    [(False, 1, False), (True, 1, False), (False, 2, True), (True, 3, False), (False, 5, False)],
)
def test_fused_head_matches_plain_log_softmax_and_its_gradients(relu, steps, transposed):
    """Any number of time steps per trip (2 and 3 leave a padded trip over the 5 steps) and
    either layout of the weight gradient."""
    rng = np.random.default_rng(0)
    features = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(4, 11)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=11), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, size=(3, 5)), jnp.int32)
    mask = jnp.asarray(rng.random((3, 5)) < 0.7, jnp.float32)
    args = (features, kernel, bias, targets, mask)
    np.testing.assert_allclose(head_nll(*args, relu, steps, transposed), plain_nll(*args, relu), rtol=1e-5)
    positions = head_nll_positions(features, kernel, bias, targets, relu, steps)
    np.testing.assert_allclose(jnp.sum(positions * mask), plain_nll(*args, relu), rtol=1e-5)
    # A scaled loss, as the mean over tokens is, checks that the cotangent is applied.
    fused = jax.grad(lambda f, k, b: 0.3 * head_nll(f, k, b, targets, mask, relu, steps, transposed), argnums=(0, 1, 2))
    plain = jax.grad(lambda f, k, b: 0.3 * plain_nll(f, k, b, targets, mask, relu), argnums=(0, 1, 2))
    for a, b in zip(fused(features, kernel, bias), plain(features, kernel, bias)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
