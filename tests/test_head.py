"""The adaptive output layer: exact log-probabilities against numpy, its fused loss and
gradients against autodiff of the plain formula, and the model built on it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tangshi_jax import head
from tangshi_jax.config import ModelConfig
from tangshi_jax.model import PoemModel, adaptive_weights, init_params, initial_carry

VOCAB = 40
CUTOFFS = (9, 23)  # clusters: 0-8 in the head, 9-22 and 23-39 in two tails


def numpy_probabilities(features, weights) -> np.ndarray:
    """p(w) by the definition, in float64: the head's softmax for the head's characters, p(cluster) ×
    p(w | cluster) for a tail's."""
    f = np.asarray(features, np.float64)

    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    head_p = softmax(f @ np.asarray(weights.head_kernel, np.float64) + np.asarray(weights.head_bias, np.float64))
    shortlist = head_p.shape[-1] - len(weights.tail_kernels)
    parts = [head_p[..., :shortlist]]
    for index, (projection, kernel) in enumerate(zip(weights.tail_projections, weights.tail_kernels)):
        tail_p = softmax(f @ np.asarray(projection, np.float64) @ np.asarray(kernel, np.float64))
        parts.append(head_p[..., shortlist + index, None] * tail_p)
    return np.concatenate(parts, axis=-1)


HEADS = {  # the ways a model holds the adaptive head's weights
    "untied": dict(tied=False),
    "tied": dict(tied=True),  # the head cluster is the embedding's first rows, tails have their own weights
    "tied, tails through the embedding": dict(tied=True, tied_tails=True),
}


def model_and_features(form: str, cutoffs=CUTOFFS):
    config = ModelConfig(
        vocab_size=VOCAB, hidden=12, embed=8, head="adaptive", cutoffs=cutoffs, head_div=2.0, **HEADS[form]
    )
    params = init_params(config, jax.random.key(3))
    # Larger biases and head weights than at initialisation, so that every cluster's share matters.
    params = dict(params, head_bias=jax.random.normal(jax.random.key(4), params["head_bias"].shape))
    tokens = jax.random.randint(jax.random.key(5), (3, 8), 0, VOCAB)
    _, features = PoemModel(config).apply({"params": params}, tokens, initial_carry(config, 3), features_only=True)
    return config, params, tokens, features


@pytest.mark.parametrize("form", HEADS)
def test_log_probs_are_exact_in_every_cluster(form):
    config, params, tokens, features = model_and_features(form)
    weights = adaptive_weights(params, config)
    # Tails read width // 2**(i+1) features: of the projected 8 when tied, of the 12 hidden units when not.
    assert [k.shape for k in weights.tail_kernels] == ([(4, 14), (2, 17)] if config.tied else [(6, 14), (3, 17)])
    assert ("tail_0_embed" in params) == config.tied_tails and ("tail_0_kernel" in params) != config.tied_tails
    expected = numpy_probabilities(features, weights)
    np.testing.assert_allclose(expected.sum(-1), 1.0, atol=1e-12)
    _, model_log_probs = PoemModel(config).apply({"params": params}, tokens, initial_carry(config, 3))
    np.testing.assert_allclose(np.exp(np.asarray(model_log_probs, np.float64)), expected, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(model_log_probs, np.log(expected), atol=2e-5)
    # Every cluster holds probability, so a mistake in any cluster's term would show.
    for start, end in zip((0, *CUTOFFS), (*CUTOFFS, VOCAB)):
        assert expected[..., start:end].sum(-1).min() > 1e-3


@pytest.mark.parametrize("form", HEADS)
def test_target_nll_and_fused_gradients_match_autodiff_of_the_plain_formula(form):
    config, params, tokens, features = model_and_features(form)
    weights = adaptive_weights(params, config)
    targets = jnp.roll(tokens, -1, axis=1)
    mask = jnp.asarray(np.random.default_rng(0).random(targets.shape) < 0.7, jnp.float32)
    expected = -np.log(numpy_probabilities(features, weights))
    picked = np.take_along_axis(expected, np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(head.nll_positions(features, weights, targets), picked, rtol=1e-5)
    # Targets reach the head and both tails.
    clusters = np.searchsorted(CUTOFFS, np.asarray(targets), side="right")
    assert set(clusters[np.asarray(mask) > 0].tolist()) == {0, 1, 2}

    def plain(features, weights):
        log_p = jax.nn.log_softmax(head.log_probs(features, weights), axis=-1)
        return -jnp.sum(jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0] * mask)

    for steps in (1, 3):  # 8 time steps: 3 a trip pads the last trip with masked positions
        fused = jax.value_and_grad(lambda f, w, steps=steps: head.fused_nll(f, w, targets, mask, steps), argnums=(0, 1))
        (value, grads), (expected_value, expected_grads) = (
            fused(features, weights),
            jax.value_and_grad(plain, argnums=(0, 1))(features, weights),
        )
        assert float(value) == pytest.approx(float(expected_value), rel=1e-5)
        for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(expected_grads)):
            np.testing.assert_allclose(got, want, atol=2e-6)
            assert np.abs(want).max() > 0


def test_cluster_bounds_and_widths():
    assert head.cluster_bounds(7319, (1000, 3000)) == (0, 1000, 3000, 7319)
    assert head.cluster_bounds(50, (1000, 3000)) == (0, 50)  # a small vocabulary: all in the head
    assert head.cluster_bounds(2000, (1000, 3000)) == (0, 1000, 2000)
    assert head.tail_widths(128, 2, 4.0) == (32, 8)
    assert head.tail_widths(16, 3, 4.0) == (4, 1, 1)


def test_a_vocabulary_inside_the_shortlist_is_the_full_softmax():
    config = ModelConfig(vocab_size=12, hidden=8, embed=4, head="adaptive", cutoffs=(100,))
    params = init_params(config, jax.random.key(0))
    assert not any(name.startswith("tail_") for name in params)
    tokens = jnp.arange(12).reshape(2, 6)
    _, log_p = PoemModel(config).apply({"params": params}, tokens, initial_carry(config, 2))
    _, features = PoemModel(config).apply({"params": params}, tokens, initial_carry(config, 2), features_only=True)
    full = jax.nn.log_softmax(features @ params["head_kernel"] + params["head_bias"])
    np.testing.assert_allclose(log_p, full, atol=1e-6)


@pytest.mark.parametrize("shares", [(0.5, 0.5), (0.05, 0.05), (1.0, 1.0)], ids=["gathered", "overflow", "every row"])
def test_gathering_a_tails_rows_changes_nothing(shares):
    """A tail's term made only for its own rows (up to a share of the rows), made for every row
    when more rows fall in it, or always for every row: the same losses and gradients."""
    config, params, _, features = model_and_features("tied")
    weights = adaptive_weights(params, config)
    h = features.reshape(-1, features.shape[-1])  # 24 rows
    rng = np.random.default_rng(1)
    # 6 rows in the first tail and 3 in the second: within half of the rows, beyond 5% of them.
    targets = np.concatenate([rng.integers(0, 9, 15), rng.integers(9, 23, 6), rng.integers(23, VOCAB, 3)])
    targets = jnp.asarray(rng.permutation(targets))

    def loss(h, weights, shares):
        return jnp.sum(head.target_nll(h, weights, targets, shares) * jnp.arange(1.0, 25.0))

    want_value, want_grads = jax.value_and_grad(loss, argnums=(0, 1))(h, weights, (None, None))
    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(h, weights, shares)
    assert float(value) == pytest.approx(float(want_value), rel=1e-6)
    for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads)):
        np.testing.assert_allclose(got, want, atol=1e-6)
    expected = -np.log(numpy_probabilities(h, weights))[np.arange(24), np.asarray(targets)]
    np.testing.assert_allclose(head.target_nll(h, weights, targets, shares), expected, rtol=1e-5)
