"""The poem model: embedding -> scanned recurrent layers -> linear head to the vocabulary.

Each layer projects its whole input sequence in one matrix product (all time steps at once)
and scans only the recurrent part over time with `nn.scan`. The same call with a length-1
sequence and the carry is one sampling step, so training and sampling share one code path.

With `wavefront`, the stacked layers run instead as one scan: in loop trip s, layer l takes
time step s − l, so L layers over T steps take T + L − 1 trips instead of L × T. Same
parameters, same cells, same dropout draws; only the order of work changes. It was meant to
halve the loop's overhead, but on 2 CPU cores it was measured no faster (PERFORMANCE.md), so
it is off by default and kept for machines where it may pay (`bench --variants fused,wavefront`).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tangshi_jax import head
from tangshi_jax.config import ModelConfig

GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def uniform_init(low: float, high: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, low, high)

    return init


# Under a narrower compute dtype the products run in it, while the gates' element-wise
# arithmetic and the carry stay float32 (a bfloat16 cell state loses the slow memory).


class LSTMCell(nn.Module):
    """i, f, g, o = σ, σ, tanh, σ of (x W + b + h U); c' = f⊙c + i⊙g; h' = o⊙tanh(c')."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry, x_proj):
        h, c = carry
        z = (
            x_proj
            + nn.Dense(
                4 * self.hidden,
                use_bias=False,
                name="recurrent",
                dtype=self.dtype,
                kernel_init=nn.initializers.orthogonal(),
            )(h)
        ).astype(jnp.float32)
        (_, _, _, o), c, tanh_c = _lstm_gates(z, c)
        h = o * tanh_c
        return (h, c), h


class GRUCell(nn.Module):
    """The seed's GRU: z, r = σ(x W + b + h U); h̃ = tanh(x W_h + b_h + (r⊙h) U_h);
    h' = (1−z)⊙h + z⊙h̃. (Flax's GRUCell gives z the opposite role.)"""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, x_proj):
        x_gates, x_candidate = jnp.split(x_proj, [2 * self.hidden], axis=-1)
        gates = (
            x_gates
            + nn.Dense(
                2 * self.hidden,
                use_bias=False,
                name="recurrent_gates",
                dtype=self.dtype,
                kernel_init=nn.initializers.orthogonal(),
            )(h)
        ).astype(jnp.float32)
        z, r = jnp.split(jax.nn.sigmoid(gates), 2, axis=-1)
        candidate = jnp.tanh(
            (
                x_candidate
                + nn.Dense(
                    self.hidden,
                    use_bias=False,
                    name="recurrent_candidate",
                    dtype=self.dtype,
                    kernel_init=nn.initializers.orthogonal(),
                )(r * h)
            ).astype(jnp.float32)
        )
        h = (1 - z) * h + z * candidate
        return h, h


class RNNCell(nn.Module):
    """The original's plain cell: h' = tanh(x W + b + h U)."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, x_proj):
        h = jnp.tanh(
            (
                x_proj
                + nn.Dense(
                    self.hidden,
                    use_bias=False,
                    name="recurrent",
                    dtype=self.dtype,
                    kernel_init=nn.initializers.orthogonal(),
                )(h)
            ).astype(jnp.float32)
        )
        return h, h


CELLS = {"lstm": LSTMCell, "gru": GRUCell, "rnn": RNNCell}


def _lstm_gates(z, c):
    """σ(i), σ(f), tanh(g), σ(o) of the pre-activations z = [i f g o], the new cell state and its tanh."""
    i, f, g, o = jnp.split(z, 4, axis=-1)
    i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
    c = f * c + i * g
    return (i, f, g, o), c, jnp.tanh(c)


def _lstm_forward(kernel, x_proj, h, c, dtype):
    """The LSTM over time-major x_proj (T, B, 4H), keeping what the backward pass reads."""

    def step(carry, x):
        h, c = carry
        z = x.astype(jnp.float32) + jnp.dot(h.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
        gates, new_c, tanh_c = _lstm_gates(z, c)
        new_h = gates[3] * tanh_c
        return (new_h, new_c), (new_h, c, jnp.concatenate(gates, axis=-1), tanh_c)

    (h_last, c_last), (hs, cs_before, gates, tanh_cs) = jax.lax.scan(step, (h, c), x_proj)
    return (h_last, c_last), hs, (cs_before, gates, tanh_cs)


def lstm_sequence(kernel, x_proj, h, c, dtype=jnp.float32):
    """The LSTM cell (LSTMCell's arithmetic) over time-major x_proj (T, B, 4H) from carry (h, c),
    the products in `dtype`: returns the last (h, c) and every h (T, B, H).

    Its gradient is written by hand: the backward loop makes only d(pre-activations) and one
    product per time step, d h_{t-1} = dz_t Uᵀ, and U's gradient is one product over all time
    steps after the loop (Σ_t h_{t-1}ᵀ dz_t), where autodiff of the scan adds a small product
    and an accumulation to every loop trip (PERFORMANCE.md)."""
    return _lstm_sequence(jnp.dtype(dtype).name)(kernel, x_proj, h, c)


@functools.cache
def _lstm_sequence(dtype_name: str):
    dtype = jnp.dtype(dtype_name)

    @jax.custom_vjp
    def sequence(kernel, x_proj, h, c):
        (h, c), hs, _ = _lstm_forward(kernel, x_proj, h, c, dtype)
        return (h, c), hs

    def forward(kernel, x_proj, h, c):
        (h_last, c_last), hs, saved = _lstm_forward(kernel, x_proj, h, c, dtype)
        return ((h_last, c_last), hs), (kernel, jnp.zeros((), x_proj.dtype), h, hs, saved)

    def backward(residuals, cotangents):
        kernel, x_like, h_first, hs, (cs_before, gates, tanh_cs) = residuals
        (d_h_last, d_c_last), d_hs = cotangents
        kernel_t = kernel.T.astype(dtype)

        def step(carry, xs):
            d_h, d_c = carry
            d_h_out, c_before, step_gates, tanh_c = xs
            i, f, g, o = jnp.split(step_gates, 4, axis=-1)
            d_h = d_h + d_h_out
            d_c = d_c + d_h * o * (1 - tanh_c * tanh_c)
            d_z = jnp.concatenate(
                [
                    d_c * g * i * (1 - i),
                    d_c * c_before * f * (1 - f),
                    d_c * i * (1 - g * g),
                    d_h * tanh_c * o * (1 - o),
                ],
                axis=-1,
            )
            d_h_before = jnp.dot(d_z.astype(dtype), kernel_t, preferred_element_type=jnp.float32)
            return (d_h_before, d_c * f), d_z

        (d_h_first, d_c_first), d_zs = jax.lax.scan(
            step, (d_h_last, d_c_last), (d_hs, cs_before, gates, tanh_cs), reverse=True
        )
        hs_before = jnp.concatenate([h_first[None], hs[:-1]], axis=0)
        d_kernel = jnp.einsum(
            "tbh,tbg->hg", hs_before.astype(dtype), d_zs.astype(dtype), preferred_element_type=jnp.float32
        )
        return d_kernel, d_zs.astype(x_like.dtype), d_h_first, d_c_first

    sequence.defvjp(forward, backward)
    return sequence


class RecurrentKernel(nn.Module):
    """U of a recurrent layer, (hidden, gates × hidden): the parameter a Dense named like this holds."""

    features: int

    @nn.compact
    def __call__(self, hidden: int):
        return self.param("kernel", nn.initializers.orthogonal(), (hidden, self.features))


class LSTMSequence(nn.Module):
    """The LSTM layer's loop through lstm_sequence; its parameters are LSTMCell's under nn.scan
    (cell/recurrent/kernel), so either runs the other's checkpoints."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry, x_proj):
        kernel = RecurrentKernel(4 * self.hidden, name="recurrent")(self.hidden)
        (h, c) = carry
        new_carry, hs = lstm_sequence(kernel, jnp.swapaxes(x_proj, 0, 1), h, c, self.dtype)
        return new_carry, jnp.swapaxes(hs, 0, 1)


class RecurrentLayer(nn.Module):
    cell: str
    hidden: int
    dtype: Any = jnp.float32
    hand_gradients: bool = True  # the LSTM through lstm_sequence; False: nn.scan of LSTMCell and autodiff

    @nn.compact
    def __call__(self, carry, inputs):
        # The input half of every gate, for all steps in one product: only h @ U stays in the loop.
        x_proj = nn.Dense(GATES[self.cell] * self.hidden, name="input", dtype=self.dtype)(inputs)
        if self.cell == "lstm" and self.hand_gradients:
            return LSTMSequence(self.hidden, self.dtype, name="cell")(carry, x_proj)
        scan = nn.scan(
            CELLS[self.cell], variable_broadcast="params", split_rngs={"params": False}, in_axes=1, out_axes=1
        )
        return scan(self.hidden, self.dtype, name="cell")(carry, x_proj)


def wavefront(config: ModelConfig, params, carry, x, keep=None, keep_prob=1.0, dtype=jnp.float32):
    """All layers over x (batch, time, width) in one scan of T + L − 1 trips; the same result
    as running RecurrentLayer after RecurrentLayer (to float rounding).

    params: the model's `layer_i` parameters; keep: for each gap between layers, the dropout
    mask (batch, time, hidden) as bools, drawn as nn.Dropout draws it (or None: no dropout).
    Returns the new carry of every layer and the last layer's outputs (batch, time, hidden)."""
    layers, steps = len(carry), x.shape[1]
    cell = CELLS[config.cell](config.hidden, dtype)
    width = GATES[config.cell] * config.hidden

    def project(index, inputs):
        return nn.Dense(width, dtype=dtype).apply({"params": params[f"layer_{index}"]["input"]}, inputs)

    def step(index, layer_carry, x_proj):
        return cell.apply({"params": params[f"layer_{index}"]["cell"]}, layer_carry, x_proj)

    def pad(sequence, before):  # time-major, padded to the T + L − 1 trips with trip s at index s
        return jnp.pad(sequence, [(before, layers - 1 - before)] + [(0, 0)] * (sequence.ndim - 1))

    first = pad(jnp.swapaxes(project(0, x), 0, 1), 0)
    masks = tuple(pad(jnp.swapaxes(k, 0, 1), gap + 1) for gap, k in enumerate(keep)) if keep else None

    def trip(carries, xs):
        s, x_proj, trip_masks = xs
        new = []
        for index, layer_carry in enumerate(carries):
            if index == 0:
                inputs = x_proj
            else:  # the layer below's output from the previous trip: its time step s − index
                below = carries[index - 1][0] if config.cell == "lstm" else carries[index - 1]
                if trip_masks is not None:
                    below = jax.lax.select(trip_masks[index - 1], below / keep_prob, jnp.zeros_like(below))
                inputs = project(index, below)
            updated, _ = step(index, layer_carry, inputs)
            live = (s >= index) & (s - index < steps)  # layer `index` has a time step in this trip
            new.append(jax.tree_util.tree_map(functools.partial(jnp.where, live), updated, layer_carry))
        top = new[-1][0] if config.cell == "lstm" else new[-1]
        return tuple(new), top

    new_carry, outputs = jax.lax.scan(trip, tuple(carry), (jnp.arange(steps + layers - 1), first, masks))
    return new_carry, jnp.swapaxes(outputs[layers - 1 :], 0, 1)


class PoemModel(nn.Module):
    config: ModelConfig
    dtype: Any = jnp.float32  # of activations and products; parameters are always float32
    wavefront: bool = False  # stacked layers in one scan (`wavefront`); measured not to pay on 2 cores
    hand_gradients: bool = True  # LSTM layers differentiated by lstm_sequence's own backward pass

    @nn.compact
    def __call__(self, tokens, carry, features_only: bool = False, train: bool = False):
        """tokens (batch, time) -> new carry, logits (batch, time, vocab).

        With features_only, the input of the head instead of logits: training feeds them to
        the fused head and loss (loss.head_nll with head_weights), which never builds all
        logits at once. With train, dropout is drawn from the 'dropout' RNG stream."""
        config = self.config
        embed_init = (
            nn.initializers.normal(config.embed**-0.5)
            if config.tied  # it also makes logits
            else uniform_init(-1.0, 1.0)
        )
        embed = nn.Embed(config.vocab_size, config.embed, embedding_init=embed_init, name="embed", dtype=self.dtype)
        drop = nn.Dropout(config.dropout, deterministic=not train or config.dropout == 0.0)
        x = drop(embed(tokens))
        if self.wavefront and len(carry) > 1 and tokens.shape[1] > 1 and not self.is_initializing():
            # Dropout between layers: the masks nn.Dropout would draw, in the same order and shape.
            hidden_shape = x.shape[:2] + (config.hidden,)
            keep = [drop(jnp.ones(hidden_shape, jnp.float32)) != 0 for _ in carry[1:]]
            new_carry, x = wavefront(
                config,
                self.variables["params"],
                carry,
                x,
                None if drop.deterministic else keep,
                1.0 - config.dropout,
                self.dtype,
            )
            x = drop(x)
        else:
            new_carry = []
            for index, layer_carry in enumerate(carry):
                layer_carry, x = RecurrentLayer(
                    config.cell, config.hidden, self.dtype, self.hand_gradients, name=f"layer_{index}"
                )(layer_carry, x)
                x = drop(x)
                new_carry.append(layer_carry)
        if config.tied:
            x = nn.Dense(config.embed, name="project", dtype=self.dtype)(x)
        if config.head == "adaptive":
            self.adaptive_params(x.shape[-1])
            if features_only:
                return tuple(new_carry), x
            return tuple(new_carry), head.log_probs(x, adaptive_weights(self.variables["params"], config))
        if config.tied:
            bias = self.param("head_bias", nn.initializers.zeros, (config.vocab_size,))
            logits = None if features_only else embed.attend(x) + bias
        else:
            head_layer = nn.Dense(
                config.vocab_size,
                kernel_init=nn.initializers.xavier_uniform(),
                bias_init=nn.initializers.zeros,
                name="head",
                dtype=self.dtype,
            )
            logits = None if features_only else head_layer(x)
        if features_only:
            return tuple(new_carry), x
        if config.relu_head:
            logits = jax.nn.relu(logits)
        return tuple(new_carry), logits

    def adaptive_params(self, width: int):
        """The adaptive head's parameters (head.py). Tied, the head cluster's characters are
        the embedding's first rows and each tail reads the embedding through a projection of
        its own (`tail_i_embed`); untied, each tail has its own `tail_i_kernel`."""
        config = self.config
        bounds = head.cluster_bounds(config.vocab_size, config.cutoffs)
        tails = len(bounds) - 2
        shortlist = bounds[1]
        if config.tied:
            self.param("cluster_kernel", nn.initializers.normal(width**-0.5), (width, tails))
        else:
            self.param("head_kernel", nn.initializers.xavier_uniform(), (width, shortlist + tails))
        self.param("head_bias", nn.initializers.zeros, (shortlist + tails,))
        for index, tail_width in enumerate(head.tail_widths(width, tails, config.head_div)):
            self.param(f"tail_{index}_projection", nn.initializers.lecun_normal(), (width, tail_width))
            size = bounds[index + 2] - bounds[index + 1]
            if config.tied and config.tied_tails:
                self.param(f"tail_{index}_embed", nn.initializers.lecun_normal(), (config.embed, tail_width))
            else:
                self.param(f"tail_{index}_kernel", nn.initializers.xavier_uniform(), (tail_width, size))


def adaptive_weights(params, config: ModelConfig) -> head.AdaptiveWeights:
    """The adaptive head's weights as head.py takes them, from the model's parameters."""
    bounds = head.cluster_bounds(config.vocab_size, config.cutoffs)
    tails = range(len(bounds) - 2)
    if config.tied:
        embedding = params["embed"]["embedding"]
        head_kernel = jnp.concatenate([embedding[: bounds[1]].T, params["cluster_kernel"]], axis=1)
    else:
        head_kernel = params["head_kernel"]
    if config.tied and config.tied_tails:
        tail_kernels = tuple((embedding[bounds[i + 1] : bounds[i + 2]] @ params[f"tail_{i}_embed"]).T for i in tails)
    else:
        tail_kernels = tuple(params[f"tail_{i}_kernel"] for i in tails)
    return head.AdaptiveWeights(
        head_kernel, params["head_bias"], tuple(params[f"tail_{i}_projection"] for i in tails), tail_kernels
    )


def head_weights(params, config: ModelConfig):
    """The full head's (kernel (features, vocab), bias) as the fused loss takes them."""
    if config.tied:
        return params["embed"]["embedding"].T, params["head_bias"]
    return params["head"]["kernel"], params["head"]["bias"]


def describe_head(config: ModelConfig) -> str:
    """', tied head', ', adaptive head (clusters from 1000, 3000; tails 32, 8 wide)' and the like."""
    text = ", tied head" if config.tied else ""
    if config.head == "adaptive":
        bounds = head.cluster_bounds(config.vocab_size, config.cutoffs)
        width = config.embed if config.tied else config.hidden
        widths = head.tail_widths(width, len(bounds) - 2, config.head_div)
        starts = ", ".join(str(start) for start in bounds[1:-1]) or "none"
        text += f", adaptive head (tail clusters from {starts}; {', '.join(map(str, widths)) or 'no'} features wide)"
    return text


def initial_carry(config: ModelConfig, batch_size: int):
    """Zero state for each layer: (h, c) for the LSTM, h for the others."""
    zeros = jnp.zeros((batch_size, config.hidden), jnp.float32)
    return tuple((zeros, zeros) if config.cell == "lstm" else zeros for _ in range(config.layers))


def init_params(config: ModelConfig, key):
    model = PoemModel(config)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return model.init(key, tokens, initial_carry(config, 1))["params"]


def abstract_params(config: ModelConfig):
    """The shapes and types of a model's parameters, computed without making them."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
