import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tangshi_jax.config import ModelConfig, TrainConfig
from tangshi_jax.loss import head_nll, nll_of_logits
from tangshi_jax.model import (
    LSTMCell,
    PoemModel,
    RecurrentLayer,
    head_weights,
    init_params,
    initial_carry,
    lstm_sequence,
)
from tangshi_jax.train import init_state, make_optimizer, make_steps

FLOAT32_EPS = np.finfo(np.float32).eps


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def numpy_step(cell, params, carry, x):
    """One step of each cell, written from the seed's formulas with the layer's weights."""
    wi, b = np.asarray(params["input"]["kernel"]), np.asarray(params["input"]["bias"])
    cell_params = {name: np.asarray(value["kernel"]) for name, value in params["cell"].items()}
    x_proj = x @ wi + b
    if cell == "lstm":
        h, c = carry
        i, f, g, o = np.split(x_proj + h @ cell_params["recurrent"], 4, axis=-1)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        return (sigmoid(o) * np.tanh(c), c)
    if cell == "gru":
        h = carry
        x_z, x_r, x_n = np.split(x_proj, 3, axis=-1)
        u_z, u_r = np.split(cell_params["recurrent_gates"], 2, axis=-1)
        z, r = sigmoid(x_z + h @ u_z), sigmoid(x_r + h @ u_r)
        candidate = np.tanh(x_n + (r * h) @ cell_params["recurrent_candidate"])
        return (1 - z) * h + z * candidate  # h = (1-z)⊙h₋₁ + z⊙h̃, the seed's convention
    return np.tanh(x_proj + carry @ cell_params["recurrent"])


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_each_cell_step_matches_numpy_formulas(cell):
    hidden, width = 6, 5
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, width)).astype(np.float32)
    h = rng.normal(size=(3, hidden)).astype(np.float32)
    carry = (h, rng.normal(size=(3, hidden)).astype(np.float32)) if cell == "lstm" else h
    layer = RecurrentLayer(cell, hidden)
    params = layer.init(jax.random.key(1), carry, x[:, None])["params"]
    # Non-zero biases, so a bias dropped or misplaced shows.
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * jnp.arange(p.size).reshape(p.shape) / p.size, params)
    new_carry, outputs = layer.apply({"params": params}, carry, x[:, None])
    expected = numpy_step(cell, params, carry, x)
    np.testing.assert_allclose(
        np.asarray(jax.tree_util.tree_leaves(new_carry)),
        np.asarray(jax.tree_util.tree_leaves(expected)),
        rtol=1e-5,
        atol=1e-6,
    )
    expected_h = expected[0] if cell == "lstm" else expected
    np.testing.assert_allclose(outputs[:, 0], expected_h, rtol=1e-5, atol=1e-6)


def test_initialisation_follows_the_original():
    config = ModelConfig(vocab_size=300, layers=1, hidden=8, embed=50)
    params = init_params(config, jax.random.key(0))
    embedding = np.asarray(params["embed"]["embedding"])
    assert embedding.min() >= -1 and embedding.max() <= 1 and embedding.min() < -0.9 and embedding.max() > 0.9
    head = np.asarray(params["head"]["kernel"])
    limit = np.sqrt(6 / (8 + 300))  # Xavier-uniform bound
    assert np.abs(head).max() <= limit and np.abs(head).max() > 0.9 * limit
    assert not np.asarray(params["head"]["bias"]).any()


def test_relu_head_makes_logits_non_negative():
    tokens = jnp.array([[0, 1, 2, 3]])
    for relu_head in (False, True):
        config = ModelConfig(vocab_size=20, hidden=8, embed=4, relu_head=relu_head)
        params = init_params(config, jax.random.key(0))
        _, logits = PoemModel(config).apply({"params": params}, tokens, initial_carry(config, 1))
        assert bool((logits >= 0).all()) == relu_head


@pytest.mark.slow  # two gradients and two train steps, on two batch shapes
def test_padding_changes_neither_loss_nor_gradients():
    config = ModelConfig(vocab_size=12, hidden=8, embed=4)
    params = init_params(config, jax.random.key(0))
    train_step, eval_step = make_steps(config, TrainConfig())
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 12, size=(2, 7)).astype(np.int32)
    mask = np.array([[1] * 6, [1] * 4 + [0] * 2], np.float32)
    tight = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask, "chars": mask}
    # The same two poems in a longer bucket, with two empty rows and garbage in the padding.
    loose_tokens = rng.integers(0, 12, size=(4, 11)).astype(np.int32)
    loose_tokens[:2, :7] = tokens
    loose_mask = np.zeros((4, 10), np.float32)
    loose_mask[:2, :6] = mask
    loose = {"inputs": loose_tokens[:, :-1], "targets": loose_tokens[:, 1:], "mask": loose_mask, "chars": loose_mask}

    def loss_and_grads(batch):
        def loss(p):
            metrics = eval_step(p, batch)
            return metrics["nll_sum"] / metrics["tokens"]

        return jax.value_and_grad(loss)(params)

    (tight_loss, tight_grads), (loose_loss, loose_grads) = loss_and_grads(tight), loss_and_grads(loose)
    assert float(tight_loss) == pytest.approx(float(loose_loss), rel=1e-6)
    # The two batches sum the same terms in other orders (other shapes, other XLA kernels): equal
    # up to float32 rounding, which for a sum scales with its largest terms, not with its result.
    for a, b in zip(jax.tree_util.tree_leaves(tight_grads), jax.tree_util.tree_leaves(loose_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=32 * FLOAT32_EPS * np.abs(b).max())
    state = {
        "params": params,
        "opt_state": make_optimizer(TrainConfig()).init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(0)),
    }
    tight_state, tight_metrics = train_step(state, tight)
    loose_state, loose_metrics = train_step(state, loose)
    assert float(tight_metrics["tokens"]) == float(loose_metrics["tokens"]) == 10
    # RMSprop's first step moves every weight by about lr/√(1−0.99) = 0.1 whatever its gradient's
    # size, so a gradient within rounding of zero can take a slightly other step: the steps must
    # agree to 1e-4 of their size.
    first_step = TrainConfig().lr / np.sqrt(1 - 0.99)
    for a, b in zip(jax.tree_util.tree_leaves(tight_state["params"]), jax.tree_util.tree_leaves(loose_state["params"])):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * first_step)


@pytest.mark.parametrize("tied", [False, True])
def test_loss_is_the_masked_mean_nll_of_a_numpy_log_softmax(tied):
    config = ModelConfig(vocab_size=9, hidden=4, embed=3, tied=tied)
    params = init_params(config, jax.random.key(3))
    _, eval_step = make_steps(config, TrainConfig())
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 9, size=(3, 6)).astype(np.int32)
    mask = (rng.random((3, 5)) < 0.7).astype(np.float32)
    chars = mask * (rng.random((3, 5)) < 0.6)
    metrics = eval_step(params, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask, "chars": chars})
    _, logits = PoemModel(config).apply({"params": params}, tokens[:, :-1], initial_carry(config, 3))
    logits = np.asarray(logits, np.float64)
    if tied:  # the head is the embedding, read through a projection of the last layer
        assert set(params) == {"embed", "layer_0", "layer_1", "project", "head_bias"}
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_softmax, tokens[:, 1:, None], -1)[..., 0]
    assert float(metrics["nll_sum"]) == pytest.approx((nll * mask).sum(), rel=1e-5)
    assert float(metrics["tokens"]) == mask.sum()
    assert float(metrics["char_nll_sum"]) == pytest.approx((nll * chars).sum(), rel=1e-5)
    assert float(metrics["chars"]) == chars.sum()


@pytest.mark.slow  # compiles two gradients
def test_tied_head_gradients_through_the_fused_loss_match_a_plain_log_softmax():
    config = ModelConfig(vocab_size=11, hidden=6, embed=5, tied=True)
    params = init_params(config, jax.random.key(1))
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 11, size=(2, 7)).astype(np.int32)
    mask = (rng.random((2, 6)) < 0.8).astype(np.float32)
    model, carry = PoemModel(config), initial_carry(config, 2)

    def fused(p):
        _, features = model.apply({"params": p}, tokens[:, :-1], carry, features_only=True)
        return head_nll(features, *head_weights(p, config), tokens[:, 1:], mask)

    def plain(p):
        _, logits = model.apply({"params": p}, tokens[:, :-1], carry)
        return jnp.sum(nll_of_logits(logits, tokens[:, 1:])[0] * mask)

    (fused_loss, fused_grads), (plain_loss, plain_grads) = (
        jax.value_and_grad(fused)(params),
        jax.value_and_grad(plain)(params),
    )
    assert float(fused_loss) == pytest.approx(float(plain_loss), rel=1e-5)
    # The embedding's gradient gathers both of its uses: the input lookup and the output layer.
    for a, b in zip(jax.tree_util.tree_leaves(fused_grads), jax.tree_util.tree_leaves(plain_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_dropout_acts_in_training_only_and_follows_its_key():
    config = ModelConfig(vocab_size=12, hidden=8, embed=6, dropout=0.5)
    params = init_params(config, jax.random.key(0))
    model, tokens, carry = PoemModel(config), jnp.array([[1, 2, 3, 4]]), initial_carry(config, 1)
    apply = lambda **kwargs: np.asarray(model.apply({"params": params}, tokens, carry, **kwargs)[1])
    plain = ModelConfig(vocab_size=12, hidden=8, embed=6)
    np.testing.assert_array_equal(apply(), PoemModel(plain).apply({"params": params}, tokens, carry)[1])
    first = apply(train=True, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(first, apply())
    np.testing.assert_array_equal(first, apply(train=True, rngs={"dropout": jax.random.key(1)}))
    assert not np.allclose(first, apply(train=True, rngs={"dropout": jax.random.key(2)}))


def test_optimizer_follows_pytorch_rmsprop_with_clipping():
    """PyTorch's RMSprop (alpha 0.99, eps 1e-8 outside the root, square average from 0)
    after clip_grad_norm_(1.0), in numpy, against the optax chain over 200 steps."""
    rng = np.random.default_rng(0)
    params = {"a": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
    optimizer = make_optimizer(TrainConfig())
    state = optimizer.init(params)
    reference = {key: value.astype(np.float64) for key, value in params.items()}
    square_avg = {key: np.zeros_like(value) for key, value in reference.items()}
    update = jax.jit(optimizer.update)
    for step in range(200):
        scale = 10.0 if step % 3 == 0 else 0.05  # some steps clipped, some not
        grads = {key: (scale * rng.normal(size=value.shape)).astype(np.float32) for key, value in params.items()}
        updates, state = update(grads, state, params)
        params = jax.tree_util.tree_map(lambda p, u: np.asarray(p + u), params, updates)
        norm = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads.values()))
        for key, grad in grads.items():
            grad = grad.astype(np.float64) * min(1.0, 1.0 / norm)
            square_avg[key] = 0.99 * square_avg[key] + 0.01 * grad**2
            reference[key] -= 0.01 * grad / (np.sqrt(square_avg[key]) + 1e-8)
    for key in params:
        np.testing.assert_allclose(params[key], reference[key], atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.slow  # compiles train steps in two dtypes
def test_bfloat16_step_is_near_float32_and_keeps_float32_parameters(tied):
    config = ModelConfig(vocab_size=40, hidden=16, embed=8, tied=tied)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 40, size=(4, 13)).astype(np.int32)
    mask = np.ones((4, 12), np.float32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask, "chars": mask}
    losses = {}
    for dtype in ("float32", "bfloat16"):
        train_config = TrainConfig(dtype=dtype)
        train_step, _ = make_steps(config, train_config)
        state, metrics = jax.jit(train_step)(init_state(config, train_config), batch)
        losses[dtype] = float(metrics["nll_sum"] / metrics["tokens"])
        assert {leaf.dtype for leaf in jax.tree_util.tree_leaves((state["params"], state["opt_state"]))} == {
            np.dtype(np.float32)
        }
    assert losses["bfloat16"] != losses["float32"]  # the products really ran in bfloat16
    assert losses["bfloat16"] == pytest.approx(losses["float32"], abs=1e-2)


@pytest.mark.parametrize("cell, layers", [("lstm", 2), ("gru", 3)])
@pytest.mark.slow  # gradients of both layer orders, in two cells
def test_wavefront_matches_the_layers_scanned_in_turn_dropout_included(cell, layers):
    """The reference is the default layer-by-layer scan (each layer over the whole sequence in
    turn): same outputs, carry and gradients, with the same dropout."""
    config = ModelConfig(vocab_size=30, cell=cell, layers=layers, hidden=8, embed=5, dropout=0.3)
    params = init_params(config, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 30, (3, 7)), jnp.int32)
    carry = jax.tree_util.tree_map(lambda z: z + 0.5, initial_carry(config, 3))  # a carry that is not zero
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(3, 7, 8)), jnp.float32)

    def run(layer_by_layer, key):
        def loss(p):
            new_carry, features = PoemModel(config, wavefront=not layer_by_layer).apply(
                {"params": p}, tokens, carry, features_only=True, train=True, rngs={"dropout": key}
            )
            return jnp.sum(features * weights), (new_carry, features)

        return jax.value_and_grad(loss, has_aux=True)(params)

    (_, (carry_a, features_a)), grads_a = run(True, jax.random.key(5))
    (_, (carry_b, features_b)), grads_b = run(False, jax.random.key(5))
    (_, (_, features_c)), _ = run(False, jax.random.key(6))
    assert not np.allclose(features_b, features_c)  # dropout really acts
    np.testing.assert_allclose(features_b, features_a, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves((carry_b, grads_b)), jax.tree_util.tree_leaves((carry_a, grads_a))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.slow  # trains three steps of three step variants
def test_the_faster_step_trains_as_the_step_before_it(tied):
    """Three training steps of the default step (the LSTM's own backward pass) and of the other
    levers of PERFORMANCE.md together (the wavefront, 3 time steps per head trip, the transposed weight
    gradient) against the step before the LSTM's own backward pass (autodiff of the scanned
    cell): the same losses and parameters to float32 rounding. The time (7) is not a multiple
    of 3, so a padded trip is included."""
    config = ModelConfig(vocab_size=40, hidden=16, embed=8, tied=tied, dropout=0.2)
    train_config = TrainConfig()
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 40, size=(5, 8)).astype(np.int32)
    mask = (rng.random((5, 7)) < 0.8).astype(np.float32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask, "chars": mask}
    results = []
    before = {"head_steps": 1, "transposed": False, "hand_gradients": False}
    for settings in ({}, {"wavefront": True, "head_steps": 3, "transposed": True}, before):
        train_step, _ = make_steps(config, train_config, **settings)
        state, losses = init_state(config, train_config), []
        for _ in range(3):
            state, metrics = jax.jit(train_step)(state, batch)
            losses.append(float(metrics["nll_sum"]))
        results.append((losses, state["params"]))
    losses, params = results[-1]
    for fast_losses, fast_params in results[:-1]:
        np.testing.assert_allclose(fast_losses, losses, rtol=1e-5)
        # RMSprop moves a weight by ~0.1 a step whatever its gradient's size, so a gradient within
        # rounding of zero may step otherwise: the weights agree to 1e-3 of a step (a wrong
        # gradient or dropout mask moves them by whole steps).
        for a, b in zip(jax.tree_util.tree_leaves(fast_params), jax.tree_util.tree_leaves(params)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * train_config.lr / np.sqrt(1 - 0.99))


def test_lstm_hand_gradients_match_autodiff_of_the_scanned_cell():
    """lstm_sequence's own backward pass against autodiff of LSTMCell scanned over time, with a
    carry that is not zero and cotangents on every output (each h, the last h and the last c)."""
    hidden, batch, steps = 6, 3, 5
    rng = np.random.default_rng(4)
    kernel = jnp.asarray(rng.normal(size=(hidden, 4 * hidden)) * 0.5, jnp.float32)
    x_proj = jnp.asarray(rng.normal(size=(steps, batch, 4 * hidden)), jnp.float32)
    h, c = (jnp.asarray(rng.normal(size=(batch, hidden)), jnp.float32) for _ in range(2))
    weights = [
        jnp.asarray(rng.normal(size=shape), jnp.float32)
        for shape in ((steps, batch, hidden), (batch, hidden), (batch, hidden))
    ]

    def by_cell(kernel, x_proj, h, c):
        def step(carry, x):
            return LSTMCell(hidden).apply({"params": {"recurrent": {"kernel": kernel}}}, carry, x)

        return jax.lax.scan(step, (h, c), x_proj)

    def loss(sequence):
        def value(*args):
            (h_last, c_last), hs = sequence(*args)
            return sum(jnp.sum(w * out) for w, out in zip(weights, (hs, h_last, c_last)))

        return jax.value_and_grad(value, argnums=(0, 1, 2, 3))(kernel, x_proj, h, c)

    (hand_loss, hand_grads), (auto_loss, auto_grads) = loss(lstm_sequence), loss(by_cell)
    assert float(hand_loss) == pytest.approx(float(auto_loss), rel=1e-6)
    for name, a, b in zip(("kernel", "x_proj", "h", "c"), hand_grads, auto_grads):
        assert np.abs(b).max() > 0.1, name  # every gradient is really exercised
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max(), err_msg=name)


def test_bfloat16_products_keep_the_lstm_cell_state_in_float32():
    """README: under --dtype bfloat16 the products run in bfloat16 but the carry stays float32
    (a bfloat16 cell state loses the slow memory)."""
    config = ModelConfig(vocab_size=20, hidden=8, embed=4, tied=True)
    params = init_params(config, jax.random.key(0))
    tokens = jnp.arange(12).reshape(2, 6) % 20
    carry, logits = PoemModel(config, jnp.bfloat16).apply({"params": params}, tokens, initial_carry(config, 2))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(carry))
    _, features = PoemModel(config, jnp.bfloat16).apply(
        {"params": params}, tokens, initial_carry(config, 2), features_only=True
    )
    assert features.dtype == jnp.bfloat16  # the projection to the tied head ran in bfloat16
    _, exact = PoemModel(config).apply({"params": params}, tokens, initial_carry(config, 2))
    np.testing.assert_allclose(np.asarray(logits, np.float32), exact, atol=0.1)


def test_the_weights_average_follows_its_recursion_and_leaves_the_weights_alone():
    """With ema_decay d every step sets average ← d·average + (1 − d)·weights, the average starting
    at the initial weights (numpy reference over the weights each step left); the weights and the
    optimizer take the same path as without an average."""
    config = ModelConfig(vocab_size=30, hidden=8, embed=5)
    tokens = np.random.default_rng(3).integers(0, 30, size=(4, 9)).astype(np.int32)
    mask = np.ones((4, 8), np.float32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask, "chars": mask}
    decay = 0.7
    paths = {}
    for ema_decay in (0.0, decay):
        train_config = TrainConfig(ema_decay=ema_decay)
        train_step = jax.jit(make_steps(config, train_config)[0])
        state = init_state(config, train_config)
        assert ("ema" in state) == bool(ema_decay)
        weights = [state["params"]]
        for _ in range(3):
            state, _ = train_step(state, batch)
            weights.append(state["params"])
        paths[ema_decay] = weights
    for plain, averaged in zip(paths[0.0], paths[decay]):
        for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(averaged)):
            np.testing.assert_array_equal(a, b)
    reference = [np.asarray(leaf, np.float64) for leaf in jax.tree_util.tree_leaves(paths[decay][0])]
    for weights in paths[decay][1:]:
        leaves = jax.tree_util.tree_leaves(weights)
        reference = [decay * r + (1 - decay) * np.asarray(w, np.float64) for r, w in zip(reference, leaves)]
    last = jax.tree_util.tree_leaves(state["ema"])
    assert any(not np.allclose(r, w) for r, w in zip(reference, jax.tree_util.tree_leaves(state["params"])))
    for r, e in zip(reference, last):
        np.testing.assert_allclose(e, r, rtol=1e-6, atol=1e-7)
