"""The poem model: embedding -> scanned recurrent layers -> linear head to the vocabulary.

Each layer projects its whole input sequence in one matrix product (all time steps at once)
and scans only the recurrent part over time with `nn.scan`. The same call with a length-1
sequence and the carry is one sampling step, so training and sampling share one code path.
"""

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

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
        z = (x_proj + nn.Dense(4 * self.hidden, use_bias=False, name="recurrent", dtype=self.dtype,
                               kernel_init=nn.initializers.orthogonal())(h)).astype(jnp.float32)
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h


class GRUCell(nn.Module):
    """The seed's GRU: z, r = σ(x W + b + h U); h̃ = tanh(x W_h + b_h + (r⊙h) U_h);
    h' = (1−z)⊙h + z⊙h̃. (Flax's GRUCell gives z the opposite role.)"""
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, x_proj):
        x_gates, x_candidate = jnp.split(x_proj, [2 * self.hidden], axis=-1)
        gates = (x_gates + nn.Dense(2 * self.hidden, use_bias=False, name="recurrent_gates", dtype=self.dtype,
                                    kernel_init=nn.initializers.orthogonal())(h)).astype(jnp.float32)
        z, r = jnp.split(jax.nn.sigmoid(gates), 2, axis=-1)
        candidate = jnp.tanh((x_candidate + nn.Dense(self.hidden, use_bias=False, name="recurrent_candidate",
                                                     dtype=self.dtype, kernel_init=nn.initializers.orthogonal())(r * h)
                              ).astype(jnp.float32))
        h = (1 - z) * h + z * candidate
        return h, h


class RNNCell(nn.Module):
    """The original's plain cell: h' = tanh(x W + b + h U)."""
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, x_proj):
        h = jnp.tanh((x_proj + nn.Dense(self.hidden, use_bias=False, name="recurrent", dtype=self.dtype,
                                        kernel_init=nn.initializers.orthogonal())(h)).astype(jnp.float32))
        return h, h


CELLS = {"lstm": LSTMCell, "gru": GRUCell, "rnn": RNNCell}


class RecurrentLayer(nn.Module):
    cell: str
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry, inputs):
        # The input half of every gate, for all steps in one product: only h @ U stays in the loop.
        x_proj = nn.Dense(GATES[self.cell] * self.hidden, name="input", dtype=self.dtype)(inputs)
        scan = nn.scan(CELLS[self.cell], variable_broadcast="params", split_rngs={"params": False},
                       in_axes=1, out_axes=1)
        return scan(self.hidden, self.dtype, name="cell")(carry, x_proj)


class PoemModel(nn.Module):
    config: ModelConfig
    dtype: Any = jnp.float32    # of activations and products; parameters are always float32

    @nn.compact
    def __call__(self, tokens, carry, features_only: bool = False, train: bool = False):
        """tokens (batch, time) -> new carry, logits (batch, time, vocab).

        With features_only, the input of the head instead of logits: training feeds them to
        the fused head and loss (loss.head_nll with head_weights), which never builds all
        logits at once. With train, dropout is drawn from the 'dropout' RNG stream."""
        config = self.config
        embed_init = (nn.initializers.normal(config.embed ** -0.5) if config.tied   # it also makes logits
                      else uniform_init(-1.0, 1.0))
        embed = nn.Embed(config.vocab_size, config.embed, embedding_init=embed_init, name="embed", dtype=self.dtype)
        drop = nn.Dropout(config.dropout, deterministic=not train or config.dropout == 0.0)
        x = drop(embed(tokens))
        new_carry = []
        for index, layer_carry in enumerate(carry):
            layer_carry, x = RecurrentLayer(config.cell, config.hidden, self.dtype, name=f"layer_{index}")(layer_carry, x)
            x = drop(x)
            new_carry.append(layer_carry)
        if config.tied:
            x = nn.Dense(config.embed, name="project", dtype=self.dtype)(x)
            bias = self.param("head_bias", nn.initializers.zeros, (config.vocab_size,))
            logits = None if features_only else embed.attend(x) + bias
        else:
            head = nn.Dense(config.vocab_size, kernel_init=nn.initializers.xavier_uniform(),
                            bias_init=nn.initializers.zeros, name="head", dtype=self.dtype)
            logits = None if features_only else head(x)
        if features_only:
            return tuple(new_carry), x
        if config.relu_head:
            logits = jax.nn.relu(logits)
        return tuple(new_carry), logits


def head_weights(params, config: ModelConfig):
    """The head's (kernel (features, vocab), bias) as the fused loss takes them."""
    if config.tied:
        return params["embed"]["embedding"].T, params["head_bias"]
    return params["head"]["kernel"], params["head"]["bias"]


def initial_carry(config: ModelConfig, batch_size: int):
    """Zero state for each layer: (h, c) for the LSTM, h for the others."""
    zeros = jnp.zeros((batch_size, config.hidden), jnp.float32)
    return tuple((zeros, zeros) if config.cell == "lstm" else zeros for _ in range(config.layers))


def init_params(config: ModelConfig, key):
    model = PoemModel(config)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return model.init(key, tokens, initial_carry(config, 1))["params"]
