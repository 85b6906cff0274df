"""Sampling: the recurrent carry moves one character a step inside one jitted while-loop.

    python -m tangshi_jax.sample --begin 日 [--num 5] [--temperature 0.8] [--top-k 40] [--greedy]

The begin text is fed through the same loop as forced tokens, so one compiled program serves
every begin text of up to --max-len characters; the prefix is never re-run.
"""

import argparse
import functools
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from tangshi_jax import checkpoint, data
from tangshi_jax.config import ModelConfig
from tangshi_jax.devices import PLATFORMS, use_platform
from tangshi_jax.errors import TangshiError, run_cli
from tangshi_jax.model import PoemModel, initial_carry
from tangshi_jax.train import init_state

MAX_LEN = 64            # a 七言律诗: 8 lines of 7 characters and 8 punctuation marks
SENTENCE_END = "。！？"


BLOCK = 64   # vocabulary entries per block of the two-level inverse-CDF sampler
TOP_K_RANGE, TOP_K_ITERATIONS = 24.0, 16


def top_k_threshold(scaled, k: int):
    """A value that k entries of each row reach, by bisection on the value.

    XLA's sort and top_k take ~60 ms for 64 rows of a 7k vocabulary on a CPU; 16 counting
    passes take ~2.5 ms. The search spans [max - 24, max] (weights below e^-24 of the
    largest are negligible) to within 24 / 2^16 ≈ 4e-4, so entries that close to the k-th
    count as ties and are kept too."""
    high = jnp.max(scaled, axis=-1, keepdims=True)
    low = high - TOP_K_RANGE

    def narrow(_, bounds):
        low, high = bounds
        middle = (low + high) / 2
        enough = jnp.sum(scaled >= middle, axis=-1, keepdims=True) >= k
        return jnp.where(enough, middle, low), jnp.where(enough, high, middle)

    low, _ = jax.lax.fori_loop(0, TOP_K_ITERATIONS, narrow, (low, high))
    return low


def sample_tokens(key, logits, temperature, top_k: int):
    """One token per row by inverse-CDF sampling with one uniform per row.

    Cheaper than Gumbel-max (`jax.random.categorical` draws a number per logit) and than a
    cumulative sum over the whole vocabulary (slow on CPU): the running sum is taken over
    blocks of 64 entries, then only inside the block the uniform falls in."""
    rows, vocab = logits.shape
    scaled = logits / temperature
    if top_k:
        scaled = jnp.where(scaled < top_k_threshold(scaled, top_k), -jnp.inf, scaled)
    weights = jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True))
    padded = -(-vocab // BLOCK) * BLOCK
    blocks = jnp.pad(weights, ((0, 0), (0, padded - vocab))).reshape(rows, -1, BLOCK)
    block_sums = jnp.sum(blocks, axis=-1)
    block_cdf = jnp.cumsum(block_sums, axis=-1)
    threshold = jax.random.uniform(key, (rows, 1)) * block_cdf[:, -1:]
    block = jnp.minimum(jnp.sum(block_cdf < threshold, axis=-1), block_sums.shape[1] - 1)
    inside = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]
    before = jnp.take_along_axis(block_cdf - block_sums, block[:, None], axis=1)
    offset = jnp.sum(before + jnp.cumsum(inside, axis=-1) < threshold, axis=-1)
    return jnp.minimum(block * BLOCK + jnp.minimum(offset, BLOCK - 1), vocab - 1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model_config", "num", "max_len", "top_k", "greedy",
                                             "start_id", "end_id"))
def generate(params, prefix, prefix_len, key, temperature, min_len=0, *, model_config: ModelConfig, num: int,
             max_len: int, top_k: int, greedy: bool, start_id: int, end_id: int):
    """Write `num` poems of at most `max_len` characters after the start token.

    prefix: (max_len + 1,) ids, the start token then the begin text, forced for the first
    prefix_len positions; no poem ends before min_len characters. Returns tokens (num, max_len + 1) with E after each poem's end, and
    the model's log-probability of every token it was given (num, max_len).
    """
    model = PoemModel(model_config)
    tokens = jnp.full((num, max_len + 1), end_id, jnp.int32).at[:, 0].set(start_id)
    log_probs = jnp.zeros((num, max_len), jnp.float32)
    state = (0, initial_carry(model_config, num), tokens, log_probs, jnp.zeros(num, bool))
    bar_start = jnp.zeros(model_config.vocab_size).at[start_id].set(-jnp.inf)
    bar_end = bar_start.at[end_id].set(-jnp.inf)

    def keep_going(state):
        t, _, _, _, done = state
        return (t < max_len) & ~jnp.all(done)

    def step(state):
        t, carry, tokens, log_probs, done = state
        carry, logits = model.apply({"params": params}, tokens[:, t, None], carry)
        # G only ever begins a poem; E is barred until min_len characters stand.
        logits = logits[:, 0] + jnp.where(t < min_len, bar_end, bar_start)
        if greedy:
            chosen = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            chosen = sample_tokens(jax.random.fold_in(key, t), logits, temperature, top_k)
        chosen = jnp.where(t + 1 < prefix_len, prefix[t + 1], chosen)
        chosen = jnp.where(done, end_id, chosen)
        chosen_logits = jnp.take_along_axis(logits, chosen[:, None], -1)[:, 0]
        log_probs = log_probs.at[:, t].set(chosen_logits - jax.nn.logsumexp(logits, axis=-1))
        return t + 1, carry, tokens.at[:, t + 1].set(chosen), log_probs, done | (chosen == end_id)

    _, _, tokens, log_probs, _ = jax.lax.while_loop(keep_going, step, state)
    return tokens, log_probs


def begin_ids(begin: str, vocab: list[str], max_len: int) -> list[int]:
    """Ids of the begin text; a character missing from the vocabulary is tried in simplified form."""
    begin = begin.strip()
    if not begin:
        raise TangshiError("--begin is empty; give the first character(s) of the poem, e.g. --begin 日")
    if len(begin) > max_len:
        raise TangshiError(f"--begin has {len(begin)} characters, more than --max-len {max_len}")
    ids = {char: index for index, char in enumerate(vocab)}
    result = []
    for char in begin:
        if char in (data.START, data.END):
            raise TangshiError(f"--begin may not contain {char!r}: it is the model's start/end token")
        if char not in ids:
            simplified = to_simplified(char)
            if simplified not in ids:
                raise TangshiError(f"--begin character {char!r} is not in the model's vocabulary of "
                                   f"{len(vocab):,} characters; begin with another character")
            char = simplified
        result.append(ids[char])
    return result


def to_simplified(text: str) -> str:
    import opencc
    return opencc.OpenCC("t2s").convert(text)


def decode(tokens: np.ndarray, vocab: list[str], end_id: int) -> str:
    """Characters after the start token, up to (not including) the end token."""
    chars = []
    for token in tokens[1:]:
        if token == end_id:
            break
        chars.append(vocab[token])
    return "".join(chars)


def split_lines(poem: str) -> list[str]:
    """One sentence (up to 。！？) a line."""
    return [line for line in re.findall(rf"[^{SENTENCE_END}]*[{SENTENCE_END}]|[^{SENTENCE_END}]+$", poem) if line]


def load_model(checkpoint_dir):
    """Config, vocabulary and parameters of the latest checkpoint; no poems.txt needed."""
    manager, step = checkpoint.require_checkpoint(checkpoint_dir)
    model_config, train_config, vocab, progress = checkpoint.restore_meta(manager, step)
    like = jax.eval_shape(lambda: init_state(model_config, train_config.lr, 0))
    state = checkpoint.restore_state(manager, step, like)
    return model_config, vocab, state["params"], progress


def write_poems(params, model_config, vocab, begin: str, num: int = 1, temperature: float = 0.8,
                top_k: int = 0, greedy: bool = False, max_len: int = MAX_LEN, seed: int = 0) -> list[str]:
    ids = begin_ids(begin, vocab, max_len)
    start_id, end_id = vocab.index(data.START), vocab.index(data.END)
    prefix = np.full(max_len + 1, start_id, np.int32)
    prefix[1:len(ids) + 1] = ids
    tokens, _ = generate(params, prefix, len(ids) + 1, jax.random.key(seed), jnp.float32(temperature),
                         model_config=model_config, num=num, max_len=max_len,
                         top_k=min(top_k, len(vocab)), greedy=greedy, start_id=start_id, end_id=end_id)
    return [decode(row, vocab, end_id) for row in np.asarray(tokens)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tangshi_jax.sample", description=__doc__.splitlines()[0])
    parser.add_argument("--begin", required=True, help="first character(s) of the poem")
    parser.add_argument("--num", type=int, default=1, help="poems written together in one batch")
    parser.add_argument("--temperature", type=float, default=0.8, help="below 1 is bolder, above 1 wilder")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest characters (0: all)")
    parser.add_argument("--greedy", action="store_true", help="always the likeliest character (the original)")
    parser.add_argument("--max-len", type=int, default=MAX_LEN, help="characters at most, punctuation included")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="one JSON object per poem per line")
    parser.add_argument("--checkpoint-dir", default="checkpoints")
    parser.add_argument("--platform", choices=PLATFORMS, default=None)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.num < 1 or args.max_len < 1 or args.top_k < 0:
        raise TangshiError("--num and --max-len must be at least 1 and --top-k at least 0")
    if not args.temperature > 0:
        raise TangshiError(f"--temperature must be positive, got {args.temperature}; use --greedy for argmax")
    use_platform(args.platform)
    model_config, vocab, params, _ = load_model(args.checkpoint_dir)
    poems = write_poems(params, model_config, vocab, args.begin, num=args.num, temperature=args.temperature,
                        top_k=args.top_k, greedy=args.greedy, max_len=args.max_len, seed=args.seed)
    for index, poem in enumerate(poems):
        if args.json:
            print(json.dumps({"begin": args.begin, "poem": poem, "lines": split_lines(poem)}, ensure_ascii=False))
        else:
            print(("\n" if index else "") + "\n".join(split_lines(poem)))


if __name__ == "__main__":
    sys.exit(run_cli(main))
