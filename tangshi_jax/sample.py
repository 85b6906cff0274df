"""Sampling: the recurrent carry moves one character a step inside one jitted while-loop.

    python -m tangshi_jax.sample --begin 日 [--num 5] [--temperature 0.8] [--top-k 40] [--greedy]

The begin text is fed through the same loop as forced tokens, so one compiled program serves
every begin text of up to --max-len characters; the prefix is never re-run.
"""

import argparse
import functools
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tangshi_jax import checkpoint, data, rules
from tangshi_jax.cache import default_cache_dir
from tangshi_jax.config import ModelConfig, TrainConfig
from tangshi_jax.devices import PLATFORMS, use_platform
from tangshi_jax.errors import TangshiError, run_cli
from tangshi_jax.model import PoemModel, initial_carry

MAX_LEN = 64  # a 七言律诗: 8 lines of 7 characters and 8 punctuation marks
SENTENCE_END = "。！？"
# Defaults chosen by `evaluate` over a grid of settings (README, "How the defaults were chosen").
DEFAULT_TEMPERATURE, DEFAULT_TOP_P, DEFAULT_REPETITION_PENALTY = 0.8, 1.0, 1.5
DEFAULT_CANDIDATES = 8  # chosen by evaluate's best-of-8 rows (README, "The best of several drafts")
MAX_ROWS = 1024  # poems × drafts written in one batch; a larger --num is written batch by batch and streamed
MAX_LEN_LIMIT = 1024  # --max-len at most: far above any poem, and the loop's arrays stay small
BLOCK = 64  # vocabulary entries per block of the two-level inverse-CDF sampler
TOP_K_RANGE, TOP_K_ITERATIONS = 24.0, 16


def largest_passing(passes, low, high):
    """Per row, the largest value in [low, high] (to within (high - low) / 2^16) for which
    passes(value) holds, by bisection; passes must hold at low and fail above the answer.

    XLA's sort and top_k take ~60 ms for 64 rows of a 7k vocabulary on a CPU; 16 counting
    passes over the rows take ~2.5 ms."""

    def narrow(_, bounds):
        low, high = bounds
        middle = (low + high) / 2
        ok = passes(middle)
        return jnp.where(ok, middle, low), jnp.where(ok, high, middle)

    low, _ = jax.lax.fori_loop(0, TOP_K_ITERATIONS, narrow, (low, high))
    return low


def top_k_threshold(scaled, k: int):
    """A value that k entries of each row reach. The search spans [max - 24, max] (weights
    below e^-24 of the largest are negligible), so entries within 24 / 2^16 ≈ 4e-4 of the
    k-th count as ties and are kept too."""
    high = jnp.max(scaled, axis=-1, keepdims=True)
    return largest_passing(
        lambda value: jnp.sum(scaled >= value, axis=-1, keepdims=True) >= k, high - TOP_K_RANGE, high
    )


def sample_tokens(key, logits, temperature, top_k: int = 0, top_p=1.0):
    """One token per row by inverse-CDF sampling with one uniform per row.

    Cheaper than Gumbel-max (`jax.random.categorical` draws a number per logit) and than a
    cumulative sum over the whole vocabulary (slow on CPU): the running sum is taken over
    blocks of 64 entries, then only inside the block the uniform falls in."""
    rows, vocab = logits.shape
    scaled = logits / temperature

    def keep_top_k(scaled):
        return jnp.where(scaled < top_k_threshold(scaled, top_k), -jnp.inf, scaled)

    scaled = jax.lax.cond(top_k > 0, keep_top_k, lambda scaled: scaled, scaled)  # top_k is data: one program for all
    weights = jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True))

    def nucleus(weights):
        probs = weights / jnp.sum(weights, axis=-1, keepdims=True)
        return jnp.where(probs >= top_p_threshold(probs, top_p), weights, 0.0)

    weights = jax.lax.cond(top_p < 1.0, nucleus, lambda weights: weights, weights)  # pay only when asked
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


def top_p_threshold(probs, top_p):
    """The largest probability p* such that the characters at least that likely hold top_p of
    the mass (nucleus sampling)."""

    def holds_mass(value):
        return jnp.sum(jnp.where(probs >= value, probs, 0.0), axis=-1, keepdims=True) >= top_p

    return largest_passing(holds_mass, jnp.zeros_like(probs[:, :1]), jnp.max(probs, axis=-1, keepdims=True))


def rules_mask(plan, prosody, t, alive, required, second_end, hanzi_only):
    """(num, V) characters the rules allow at step t, from the tonal schemes still alive and
    the rhyme state. An empty set falls back to any Chinese character, so that a small
    vocabulary never leaves a position with nothing to choose."""
    position = t + 1
    want = plan["tones"][:, position]  # (schemes,)

    def any_alive(tone):
        return jnp.any(alive & (want == tone), axis=-1, keepdims=True)  # (num, 1)

    tone_ok = (
        any_alive(rules.ANY)
        | (any_alive(rules.LEVEL) & prosody["level"])
        | (any_alive(rules.OBLIQUE) & prosody["oblique"])
    )
    allowed = hanzi_only & jnp.where(plan["use_tones"], tone_ok, True)
    role = jnp.where(plan["use_rhyme"], plan["rhyme"][position], rules.NO_RHYME)

    def rhyme_ok(_):
        # Only line ends pay for these two (num, groups) x (groups, V) products.
        rhymes_required = (required.astype(jnp.float32) @ prosody["rhymes"].T) > 0
        rhymes_second = (second_end.astype(jnp.float32) @ prosody["rhymes"].T) > 0
        level, oblique_only = prosody["level"], prosody["oblique"] & ~prosody["level"]
        return jnp.select(
            [role == rules.FIRST_END, role == rules.RHYME, role == rules.NOT_RHYME],
            [oblique_only | (level & rhymes_required), level & rhymes_required, oblique_only & ~rhymes_second],
            True,
        )

    allowed = jax.lax.cond(role == rules.NO_RHYME, lambda _: allowed, lambda _: allowed & rhyme_ok(None), None)
    return jnp.where(jnp.any(allowed, axis=-1, keepdims=True), allowed, hanzi_only)


def update_rules(plan, prosody, t, chosen, alive, required, second_end):
    """Narrow the tonal schemes and the rhyme groups by the character just written."""
    position = t + 1
    want = plan["tones"][:, position]
    level, oblique = prosody["level"][chosen][:, None], prosody["oblique"][chosen][:, None]
    fits = (want == rules.ANY) | ((want == rules.LEVEL) & level) | ((want == rules.OBLIQUE) & oblique)
    narrowed = alive & fits
    alive = jnp.where(jnp.any(narrowed, axis=-1, keepdims=True), narrowed, alive)  # a forced misfit is kept
    groups = prosody["rhymes"][chosen] > 0  # (num, groups)
    role = plan["rhyme"][position]
    pins = (role == rules.RHYME) | ((role == rules.FIRST_END) & level)
    narrowed = required & groups
    required = jnp.where(pins & jnp.any(narrowed, axis=-1, keepdims=True), narrowed, required)
    second_end = jnp.where(position == plan["second_end"], groups, second_end)
    return alive, required, second_end


@functools.partial(jax.jit, static_argnames=("model_config", "num", "max_len", "start_id", "end_id", "with_log_probs"))
def generate(
    params,
    plan,
    prosody,
    key,
    temperature,
    top_p=1.0,
    repetition_penalty=0.0,
    carry=None,
    *,
    model_config: ModelConfig,
    num: int,
    max_len: int,
    top_k=0,
    greedy=False,
    start_id: int,
    end_id: int,
    with_log_probs: bool = False,
):
    """Write `num` poems of at most `max_len` characters after the start token.

    plan (see make_plan): per position, what stands there: anything, a Chinese character
    under the rules, or a forced token (the begin text, punctuation of a form, acrostic
    heads, the end). All of it is data, so one compiled program serves every begin text,
    form and rule; top_k and greedy are data too, so that a server compiles one program per
    batch size. carry: the state after reading each poem's title (read_titles), or None
    for a zero state. Returns tokens (num, max_len + 1) with E after each poem's end, and, with
    with_log_probs, the model's own log-probability of every token (num, max_len; zeros
    otherwise: it costs a pass over the vocabulary a step).
    """
    model = PoemModel(model_config)
    vocab_size = model_config.vocab_size
    tokens = jnp.full((num, max_len + 1), end_id, jnp.int32).at[:, 0].set(start_id)
    log_probs = jnp.zeros((num, max_len), jnp.float32)
    alive = jnp.ones((num, plan["tones"].shape[0]), bool)
    required = jnp.broadcast_to(plan["rhyme_groups"], (num, prosody["rhymes"].shape[1]))
    second_end = jnp.zeros_like(required)
    used = jnp.zeros((num, vocab_size), bool)
    carry = initial_carry(model_config, num) if carry is None else carry
    state = (0, carry, tokens, log_probs, jnp.zeros(num, bool), alive, required, second_end, used)
    bar_start = jnp.zeros(vocab_size).at[start_id].set(-jnp.inf)
    bar_end = bar_start.at[end_id].set(-jnp.inf)
    hanzi_only = prosody["hanzi"][None, :]

    def keep_going(state):
        return (state[0] < max_len) & ~jnp.all(state[4])

    def step(state):
        t, carry, tokens, log_probs, done, alive, required, second_end, used = state
        carry, logits = model.apply({"params": params}, tokens[:, t, None], carry)
        # G only ever begins a poem; E is barred until min_len characters stand.
        logits = logits[:, 0] + jnp.where(t < plan["min_len"], bar_end, bar_start)
        kind = plan["kind"][t + 1]
        allowed = jax.lax.cond(
            kind == rules.CHAR,
            lambda _: rules_mask(plan, prosody, t, alive, required, second_end, hanzi_only),
            lambda _: jnp.ones((num, vocab_size), bool),
            None,
        )
        masked = jnp.where(allowed, logits - repetition_penalty * used, -jnp.inf)
        chosen = jax.lax.cond(
            greedy,
            lambda: jnp.argmax(masked, axis=-1).astype(jnp.int32),
            lambda: sample_tokens(jax.random.fold_in(key, t), masked, temperature, top_k, top_p),
        )
        chosen = jnp.where(kind == rules.FORCED, plan["forced"][t + 1], chosen)
        chosen = jnp.where(done, end_id, chosen)
        if with_log_probs:
            chosen_logits = jnp.take_along_axis(logits, chosen[:, None], -1)[:, 0]
            log_probs = log_probs.at[:, t].set(chosen_logits - jax.nn.logsumexp(logits, axis=-1))
        alive, required, second_end = update_rules(plan, prosody, t, chosen, alive, required, second_end)
        used = used.at[jnp.arange(num), chosen].max(prosody["hanzi"][chosen])  # punctuation is never penalised
        return (
            t + 1,
            carry,
            tokens.at[:, t + 1].set(chosen),
            log_probs,
            done | (chosen == end_id),
            alive,
            required,
            second_end,
            used,
        )

    final = jax.lax.while_loop(keep_going, step, state)
    return final[2], final[3]


@functools.partial(jax.jit, static_argnames=("model_config",))
def read_titles(params, titles, lengths, *, model_config: ModelConfig):
    """The recurrent state after reading each row's title: titles (rows, max_title) of ids,
    lengths (rows,); positions past a row's length leave its state as it was."""
    model = PoemModel(model_config)

    def step(carry, xs):
        tokens, t = xs
        new, _ = model.apply({"params": params}, tokens[:, None], carry)
        keep = (t < lengths)[:, None]
        return jax.tree_util.tree_map(lambda n, o: jnp.where(keep, n, o), new, carry), None

    carry, _ = jax.lax.scan(step, initial_carry(model_config, titles.shape[0]), (titles.T, jnp.arange(titles.shape[1])))
    return carry


def title_ids(title: str, vocab: list[str], max_title: int, flag: str = "--title/--keywords") -> list[int]:
    """Ids of a title as training read titles: Chinese characters only, the first max_title."""
    kept = data.clean_title(title)
    if not kept:
        raise TangshiError(
            f"{flag} {title!r} has no Chinese character; give a title such as 春夜喜雨 or keywords such as 春 雨"
        )
    return begin_ids(kept[:max_title], vocab, max_title, flag=flag)


def keywords_title(keywords: list[str]) -> str:
    """Keywords are read the way titles are: joined in the order given."""
    if not keywords or not all(word.strip() for word in keywords):
        raise TangshiError("--keywords needs one or more words, e.g. --keywords 春 雨 夜")
    return "".join(word.strip() for word in keywords)


def title_carry(params, model_config, vocab, titles: list[str | None], max_title: int):
    """The initial state of each poem: after its title, or zero where the title is None."""
    ids = np.zeros((len(titles), max_title), np.int32)
    lengths = np.zeros(len(titles), np.int32)
    for row, title in enumerate(titles):
        if title is not None:
            row_ids = title_ids(title, vocab, max_title)
            ids[row, : len(row_ids)], lengths[row] = row_ids, len(row_ids)
    return read_titles(params, ids, lengths, model_config=model_config)


def begin_ids(begin: str, vocab: list[str], max_len: int, flag: str = "--begin") -> list[int]:
    """Ids of the begin text; a character missing from the vocabulary is tried in simplified form."""
    begin = begin.strip()
    if not begin:
        raise TangshiError(f"{flag} is empty; give the first character(s) of the poem, e.g. {flag} 日")
    if len(begin) > max_len:
        raise TangshiError(f"{flag} has {len(begin)} characters, more than --max-len {max_len}")
    ids = {char: index for index, char in enumerate(vocab)}
    result = []
    for char in begin:
        if char in (data.START, data.END):
            raise TangshiError(f"{flag} may not contain {char!r}: it is the model's start/end token")
        if char not in ids:
            simplified = to_simplified(char)
            if simplified not in ids:
                raise TangshiError(
                    f"{flag} character {char!r} is not in the model's vocabulary of "
                    f"{len(vocab):,} characters; use another character"
                )
            char = simplified
        result.append(ids[char])
    return result


def to_simplified(text: str) -> str:
    return rules.opencc_converter("t2s").convert(text)


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


class Loaded(NamedTuple):
    model_config: ModelConfig
    train_config: TrainConfig
    vocab: list[str]
    params: dict
    progress: dict


def load_model(checkpoint_dir, warn=None) -> Loaded:
    """Configs, vocabulary and parameters of the newest checkpoint that reads completely (each
    one passed over is one warning line, given to `warn`, stderr by default); no poems.txt needed."""
    on_skip = warn and (lambda step, reason: warn(checkpoint.skipped_line(Path(checkpoint_dir), step, reason)))
    restored = checkpoint.load_params(checkpoint_dir, on_skip)
    model_config, train_config, vocab, progress = restored.meta
    return Loaded(model_config, train_config, vocab, restored.state["params"], progress)


def device_prosody(vocab: list[str]) -> dict:
    return _device_prosody(tuple(vocab))


@functools.lru_cache(maxsize=4)
def _device_prosody(vocab: tuple[str, ...]) -> dict:
    prosody = rules.build_prosody(vocab)
    return {
        "hanzi": prosody.hanzi,
        "level": prosody.level,
        "oblique": prosody.oblique,
        "rhymes": prosody.rhymes.astype(np.float32),
    }


def make_plan(
    vocab: list[str],
    max_len: int,
    begin: list[int],
    form: str | None = None,
    heads: list[int] | None = None,
    rhyme: bool = False,
    rhyme_group: int | None = None,
    tones: bool = False,
    loose_tones: bool = False,
    min_len: int = 0,
) -> dict:
    """What may stand at each position of the poems of one request, as arrays for `generate`."""
    end_id = vocab.index(data.END)
    schemes = len(rules.SCHEMES[5])
    kind = np.full(max_len + 1, rules.FREE, np.int32)
    forced = np.full(max_len + 1, end_id, np.int32)
    tone_plan = np.zeros((schemes, max_len + 1), np.int32)
    rhyme_plan = np.zeros(max_len + 1, np.int32)
    second_end = -1
    if form:
        punctuation = tuple(vocab.index(mark) if mark in vocab else -1 for mark in (rules.COMMA, rules.PERIOD))
        if -1 in punctuation:
            raise TangshiError("this model's vocabulary lacks '，' or '。', so it cannot write a form")
        kind, forced, tone_plan, rhyme_plan = rules.form_template(
            form, max_len, punctuation, end_id, heads, loose_tones or bool(heads)
        )
        chars = rules.FORMS[form][1]
        second_end = 2 * (chars + 1) - 1
        if len(begin) > chars:
            raise TangshiError(f"--begin has {len(begin)} characters, more than a line of {form} ({chars})")
        if heads and begin and begin[0] != heads[0]:
            raise TangshiError("--begin must start with the first --acrostic character (or be left out)")
    kind[1 : len(begin) + 1] = rules.FORCED
    forced[1 : len(begin) + 1] = begin
    prosody = rules.build_prosody(tuple(vocab))
    groups = np.ones(len(prosody.groups), bool)
    if rhyme_group is not None:
        groups = prosody.rhymes[rhyme_group] & prosody.level_groups
        if not groups.any():
            raise TangshiError(
                f"--rhyme-group {vocab[rhyme_group]!r} has no level-tone (平) rhyme group; "
                "give a level-tone character such as 东 or 山"
            )
    return {
        "kind": kind,
        "forced": forced,
        "tones": tone_plan,
        "rhyme": rhyme_plan,
        "second_end": np.int32(second_end),
        "rhyme_groups": groups,
        "use_tones": np.bool_(tones and bool(form)),
        "use_rhyme": np.bool_(rhyme and bool(form)),
        "min_len": np.int32(min_len),
    }


def plan_request(
    vocab,
    begin: str | None = None,
    max_len: int = MAX_LEN,
    form: str | None = None,
    acrostic: str | None = None,
    line_length: int = 7,
    rhyme: bool = False,
    rhyme_group: str | None = None,
    tones: bool = False,
    loose_tones: bool = False,
    min_len: int = 0,
    title=None,
    max_title: int = 0,
) -> dict:
    """The plan (make_plan) of one request, after checking its options; raises TangshiError on
    any the model cannot honour. Host-side only, so a server checks each request before batching it."""
    if title is not None and not max_title:
        raise TangshiError(
            "this model was trained without titles, so --title and --keywords cannot steer it; "
            "train one with `python -m tangshi_jax.train --titles --checkpoint-dir checkpoints-titles`"
        )
    ids = begin_ids(begin, vocab, max_len) if begin is not None else []
    heads = None
    if acrostic is not None:
        heads = begin_ids(acrostic, vocab, max_len, flag="--acrostic")
        form = form or ("qijue" if line_length == 7 else "wujue")
        lines = rules.FORMS[form][0]
        if len(heads) != lines:
            raise TangshiError(
                f"--acrostic has {len(heads)} characters but {form} has {lines} lines; give {lines} characters"
            )
    if (rhyme or tones or rhyme_group) and not form:
        raise TangshiError("--rhyme, --rhyme-group and --tones need a --form (or --acrostic)")
    if rhyme_group and len(rhyme_group.strip()) != 1:
        raise TangshiError(f"--rhyme-group takes one character, got {rhyme_group!r}")
    group = begin_ids(rhyme_group, vocab, max_len, flag="--rhyme-group")[0] if rhyme_group else None
    plan = make_plan(
        vocab,
        max_len,
        ids,
        form=form,
        heads=heads,
        rhyme=rhyme or group is not None,
        rhyme_group=group,
        tones=tones,
        loose_tones=loose_tones,
        min_len=min_len,
    )
    return plan


def write_poems(
    params,
    model_config,
    vocab,
    begin: str | None = None,
    num: int = 1,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int = 0,
    top_p: float = DEFAULT_TOP_P,
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
    greedy: bool = False,
    max_len: int = MAX_LEN,
    seed: int = 0,
    form: str | None = None,
    acrostic: str | None = None,
    line_length: int = 7,
    rhyme: bool = False,
    rhyme_group: str | None = None,
    tones: bool = False,
    loose_tones: bool = False,
    min_len: int = 0,
    title: str | list[str] | None = None,
    max_title: int = 0,
    candidates: int = 1,
    corpus_lines: set[str] | None = None,
    with_scores: bool = False,
    rows: int = 0,
    part: int = 0,
) -> list[str] | tuple[list[str], list[float]]:
    """Poems as strings (without G/E); see the command's flags for the meaning of each option.

    title: one title for every poem, or a title per poem; max_title: the title length the
    model was trained with (0: it reads no titles, and a title is an error). candidates: drafts
    written per poem in the same batch, the best by `score_poem` kept; corpus_lines: lines of
    the training poems, which the score penalises copying. with_scores: also the kept poems' scores.
    rows: run the sampler on at least this many rows, the rest padding, so that one compiled
    program serves every batch up to that size (a row's draws do not depend on the batch size).
    part: the index of this call in a request written part by part (sample --num); each draws its own numbers."""
    plan = plan_request(
        vocab,
        begin,
        max_len,
        form,
        acrostic,
        line_length,
        rhyme,
        rhyme_group,
        tones,
        loose_tones,
        min_len,
        title,
        max_title,
    )
    start_id, end_id = vocab.index(data.START), vocab.index(data.END)
    candidates = 1 if greedy else candidates  # greedy drafts would all be the same
    batch = max(rows, num * candidates)
    carry = None
    if title is not None:
        titles = [title] * num if isinstance(title, str) else list(title)
        # Drafts of poem i are rows i*candidates ... (i+1)*candidates - 1.
        row_titles = [t for t in titles for _ in range(candidates)]
        carry = title_carry(params, model_config, vocab, row_titles + [None] * (batch - len(row_titles)), max_title)
    scoring = candidates > 1 or with_scores
    key = jax.random.fold_in(jax.random.key(seed), part) if part else jax.random.key(seed)
    tokens, log_probs = generate(
        params,
        plan,
        device_prosody(vocab),
        key,
        jnp.float32(temperature),
        jnp.float32(top_p),
        jnp.float32(repetition_penalty),
        carry,
        model_config=model_config,
        num=batch,
        max_len=max_len,
        top_k=jnp.int32(min(top_k, len(vocab))),
        greedy=jnp.bool_(greedy),
        start_id=start_id,
        end_id=end_id,
        with_log_probs=scoring,
    )
    drafts = [decode(row, vocab, end_id) for row in np.asarray(tokens)[: num * candidates]]
    if not scoring:
        return drafts
    written = plan["kind"][1:] != rules.FORCED  # positions the model chose (not begin, heads, marks)
    scores = [
        score_poem(poem, row_log_probs, written, corpus_lines)
        for poem, row_log_probs in zip(drafts, np.asarray(log_probs))
    ]
    best = [max(range(i * candidates, (i + 1) * candidates), key=scores.__getitem__) for i in range(num)]
    poems = [drafts[row] for row in best]
    return (poems, [scores[row] for row in best]) if with_scores else poems


# The reranking score's weights: nats taken off per share of copied lines and of repeated
# characters, and for a poem that stops mid-sentence (a few likely characters then E would
# otherwise have the best mean).
COPY_WEIGHT, REPEAT_WEIGHT, UNFINISHED_PENALTY = 2.0, 1.0, 10.0


def score_poem(poem: str, log_probs: np.ndarray, written: np.ndarray, corpus_lines: set[str] | None) -> float:
    """The mean log-probability the model gave the Chinese characters it chose (begin text,
    acrostic heads and punctuation excluded), minus COPY_WEIGHT × the share of lines found in
    corpus_lines, REPEAT_WEIGHT × the share of characters that repeat an earlier one, and
    UNFINISHED_PENALTY when the poem does not end a sentence (。！？)."""
    chars = [i for i, char in enumerate(poem) if data.is_hanzi(char) and written[i]]
    if not chars:
        return -np.inf
    mean_log_prob = float(np.mean(log_probs[chars]))
    hanzi = [char for char in poem if data.is_hanzi(char)]
    repeated = 1 - len(set(hanzi)) / len(hanzi)
    lines = data.lines_of(poem)
    copied = sum(line in corpus_lines for line in lines) / len(lines) if corpus_lines and lines else 0.0
    unfinished = UNFINISHED_PENALTY * (poem[-1] not in SENTENCE_END)
    return mean_log_prob - COPY_WEIGHT * copied - REPEAT_WEIGHT * repeated - unfinished


def corpus_lines(path) -> set[str] | None:
    """Every line of the poems file a model was trained on, for the score's copy penalty; None
    (no penalty, and a note) when that file is not at hand: sampling never needs it otherwise.

    Parsing the corpus takes a second or two, so the lines are kept in the cache directory,
    under a name made from the file's path, size and modification time."""
    try:
        stat = Path(path).stat()
        key = hashlib.blake2b(
            f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode(), digest_size=8
        ).hexdigest()
        cached = default_cache_dir() / f"lines-{key}.txt"
        if cached.is_file():
            return set(cached.read_text(encoding="utf-8").split("\n"))
        lines = {line for poem in data.read_corpus(path).poems for line in data.lines_of(poem)}
    except (OSError, TangshiError):
        print(f"note: {path} is not at hand, so the drafts' score cannot penalise copied lines", file=sys.stderr)
        return None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        temporary = cached.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text("\n".join(sorted(lines)), encoding="utf-8")
        temporary.replace(cached)
    except OSError:
        pass  # a read-only cache only costs the next call the same second or two
    return lines


# The sampler computes in float32: numbers outside its range would overflow (Python floats, so
# that the comparison itself does not cast to float32).
FLOAT32_TINY, FLOAT32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)


def check_sampling(temperature: float, top_p: float, repetition_penalty: float = 0.0) -> None:
    if not abs(repetition_penalty) <= FLOAT32_MAX:
        raise TangshiError(
            f"--repetition-penalty must be a number of at most {FLOAT32_MAX:.3g}, got {repetition_penalty}"
        )
    if not temperature > 0:
        raise TangshiError(f"--temperature must be positive, got {temperature}; use --greedy for argmax")
    if not FLOAT32_TINY <= temperature <= FLOAT32_MAX:
        raise TangshiError(f"--temperature must be between {FLOAT32_TINY:.3g} and {FLOAT32_MAX:.3g}, got {temperature}")
    if not 0 < top_p <= 1:
        raise TangshiError(f"--top-p must be in (0, 1], got {top_p}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tangshi_jax.sample", description=__doc__.splitlines()[0])
    parser.add_argument("--begin", default=None, help="first character(s) of the poem (default: the model's choice)")
    parser.add_argument("--title", default=None, help="a title to write on (models trained with --titles)")
    parser.add_argument("--keywords", nargs="+", default=None, help="words to write on, read as a title, e.g. 春 雨 夜")
    parser.add_argument("--num", type=int, default=1, help="poems written together in one batch")
    parser.add_argument(
        "--candidates",
        type=int,
        default=DEFAULT_CANDIDATES,
        help="drafts written per poem, the best kept (mean log-probability, less copied lines and repeats)",
    )
    parser.add_argument(
        "--temperature", type=float, default=DEFAULT_TEMPERATURE, help="below 1 is safer, above 1 wilder"
    )
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest characters (0: all)")
    parser.add_argument(
        "--top-p",
        type=float,
        default=DEFAULT_TOP_P,
        help="sample among the likeliest characters that hold this share of the probability (1: all)",
    )
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=DEFAULT_REPETITION_PENALTY,
        help="subtracted from the logit of every character the poem already used (0: off)",
    )
    parser.add_argument("--greedy", action="store_true", help="always the likeliest character (the original)")
    parser.add_argument("--form", default=None, help="wujue, qijue, wulv or qilv (五绝, 七绝, 五律, 七律)")
    parser.add_argument("--acrostic", default=None, help="藏头诗: line i begins with the i-th character")
    parser.add_argument(
        "--line-length",
        type=int,
        choices=(5, 7),
        default=7,
        help="characters a line of an --acrostic quatrain without --form",
    )
    parser.add_argument("--rhyme", action="store_true", help="押韵: even lines end on one 平水韵 level-tone group")
    parser.add_argument("--rhyme-group", default=None, help="a character whose rhyme group to use (implies --rhyme)")
    parser.add_argument("--tones", action="store_true", help="平仄: every position follows a regulated-verse pattern")
    parser.add_argument(
        "--loose-tones",
        action="store_true",
        help="with --tones, the customary freedom at the 1st, 3rd (and 5th) characters",
    )
    parser.add_argument("--script", choices=("simplified", "traditional"), default="simplified")
    parser.add_argument("--max-len", type=int, default=MAX_LEN, help="characters at most, punctuation included")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="one JSON object per poem per line")
    parser.add_argument("--checkpoint-dir", default="checkpoints")
    parser.add_argument(
        "--model", default=None, help="a release folder (python -m tangshi_jax.export) instead of --checkpoint-dir"
    )
    parser.add_argument("--platform", choices=PLATFORMS, default=None)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.num < 1 or args.max_len < 1 or args.top_k < 0 or args.candidates < 1:
        raise TangshiError("--num, --candidates and --max-len must be at least 1 and --top-k at least 0")
    if args.candidates > MAX_ROWS:
        raise TangshiError(
            f"--candidates must be at most {MAX_ROWS} (a poem's drafts are written in one batch), got {args.candidates}"
        )
    if args.max_len > MAX_LEN_LIMIT:
        raise TangshiError(f"--max-len must be at most {MAX_LEN_LIMIT}, got {args.max_len}")
    if not -(2**63) <= args.seed < 2**63:
        raise TangshiError(f"--seed must fit in 64 bits, got {args.seed}")
    check_sampling(args.temperature, args.top_p, args.repetition_penalty)
    form = rules.parse_form(args.form) if args.form else None
    use_platform(args.platform)
    if args.title is not None and args.keywords is not None:
        raise TangshiError("give --title or --keywords, not both")
    title = keywords_title(args.keywords) if args.keywords is not None else args.title
    from tangshi_jax import release  # it imports this module

    model_config, train_config, vocab, params, _ = release.load_model(args.checkpoint_dir, args.model)
    copied = corpus_lines(train_config.data) if args.candidates > 1 and not args.greedy else None
    # A part at a time, printed as it is done: memory stays bounded whatever --num asks. The last
    # part is padded to the others' rows, so that one compiled program serves them all.
    per_part = max(1, MAX_ROWS // (1 if args.greedy else args.candidates))
    rows = per_part * (1 if args.greedy else args.candidates) if args.num > per_part else 0
    for part, first in enumerate(range(0, args.num, per_part)):
        poems = write_poems(
            params,
            model_config,
            vocab,
            args.begin,
            num=min(per_part, args.num - first),
            temperature=args.temperature,
            title=title,
            max_title=train_config.max_title if train_config.titles else 0,
            candidates=args.candidates,
            corpus_lines=copied,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            greedy=args.greedy,
            max_len=args.max_len,
            seed=args.seed,
            form=form,
            acrostic=args.acrostic,
            line_length=args.line_length,
            rhyme=args.rhyme,
            rhyme_group=args.rhyme_group,
            tones=args.tones,
            loose_tones=args.loose_tones,
            rows=rows,
            part=part,
        )
        if args.script == "traditional":
            poems = [rules.opencc_converter("s2t").convert(poem) for poem in poems]
        for index, poem in enumerate(poems, start=first):
            if args.json:
                print(
                    json.dumps(
                        {"begin": args.begin or "", "title": title or "", "poem": poem, "lines": split_lines(poem)},
                        ensure_ascii=False,
                    )
                )
            else:
                print(("\n" if index else "") + "\n".join(split_lines(poem)))
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(run_cli(main))
