"""Sampling: the recurrent carry moves one character a step inside one jitted while-loop.

    python -m tangshi_jax.sample --begin 日 [--num 5] [--temperature 0.8] [--top-k 40] [--greedy]

The begin text is fed through the same loop as forced tokens, so one compiled program serves
every begin text of up to --max-len characters; the prefix is never re-run.
"""

import argparse
import dataclasses
import functools
import hashlib
import json
import re
import secrets
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p

from tangshi_jax import cipai, couplet, data, release, request, rules
from tangshi_jax.cache import default_cache_dir, write_atomically
from tangshi_jax.config import ModelConfig
from tangshi_jax.devices import PLATFORMS, use_platform
from tangshi_jax.errors import TangshiError, run_cli
from tangshi_jax.model import PoemModel, initial_carry
from tangshi_jax.request import PoemRequest

SENTENCE_END = "。！？"
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


def sample_tokens(uniforms, logits, temperature, top_k, top_p):
    """One token per row by inverse-CDF sampling with one uniform per row (uniforms: (rows, 1)).
    temperature, top_k (0: all) and top_p (1: all) are per row (rows,), so that requests asking
    for different settings share a call; each filter is paid for only when some row asks for it.

    Cheaper than Gumbel-max (`jax.random.categorical` draws a number per logit) and than a
    cumulative sum over the whole vocabulary (slow on CPU): the running sum is taken over
    blocks of 64 entries, then only inside the block the uniform falls in."""
    rows, vocab = logits.shape
    padded = -(-vocab // BLOCK) * BLOCK
    # Padded with -inf from the start: the passes below run on whole blocks, and weighing
    # pads nothing later (a copy of the weights a step).
    scaled = jnp.pad(logits / temperature[:, None], ((0, 0), (0, padded - vocab)), constant_values=-jnp.inf)
    top_k, top_p = top_k[:, None], top_p[:, None]

    def keep_top_k(scaled):
        return jnp.where((top_k > 0) & (scaled < top_k_threshold(scaled, top_k)), -jnp.inf, scaled)

    scaled = jax.lax.cond(jnp.any(top_k > 0), keep_top_k, lambda scaled: scaled, scaled)  # data: one program for all
    weights = jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True))

    def nucleus(weights):
        probs = weights / jnp.sum(weights, axis=-1, keepdims=True)
        return jnp.where((top_p < 1.0) & (probs < top_p_threshold(probs, top_p)), 0.0, weights)

    weights = jax.lax.cond(jnp.any(top_p < 1.0), nucleus, lambda weights: weights, weights)  # pay only when asked
    blocks = weights.reshape(rows, -1, BLOCK)
    block_sums = jnp.sum(blocks, axis=-1)
    block_cdf = jnp.cumsum(block_sums, axis=-1)
    threshold = uniforms * block_cdf[:, -1:]
    block = jnp.minimum(jnp.sum(block_cdf < threshold, axis=-1), block_sums.shape[1] - 1)
    inside = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]
    before = jnp.take_along_axis(block_cdf - block_sums, block[:, None], axis=1)
    offset = jnp.sum(before + jnp.cumsum(inside, axis=-1) < threshold, axis=-1)
    return jnp.minimum(block * BLOCK + jnp.minimum(offset, BLOCK - 1), vocab - 1).astype(jnp.int32)


def row_uniforms(keys, index, t):
    """(rows, 1) uniforms in [0, 1) for step t: row r's is element index[r] of
    `jax.random.uniform(fold_in(key_r, t), (n, 1))` for any n above it, computed for that row
    alone. keys: (rows, 2) uint32 key data, a request's on each of its rows; index: (rows,)
    uint32, a row's place among its request's rows. JAX's threefry counts element i of a draw
    by i alone (jax_threefry_partitionable), so a row's numbers depend on its request's key and
    its place, never on the rows around it, and a lone request draws what it always drew."""
    folded = jax.vmap(lambda data: jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(data), t)))(keys)
    first, second = threefry2x32_p.bind(folded[:, 0], folded[:, 1], jnp.zeros_like(index), index)
    mantissa = ((first ^ second) >> 9) | jnp.uint32(0x3F800000)  # a float in [1, 2), as jax.random.uniform makes
    return (jax.lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0)[:, None]


def top_p_threshold(probs, top_p):
    """The largest probability p* such that the characters at least that likely hold top_p of
    the mass (nucleus sampling)."""

    def holds_mass(value):
        return jnp.sum(jnp.where(probs >= value, probs, 0.0), axis=-1, keepdims=True) >= top_p

    return largest_passing(holds_mass, jnp.zeros_like(probs[:, :1]), jnp.max(probs, axis=-1, keepdims=True))


def rules_mask(plan, prosody, t, alive, required, second_end, set_required, used, hanzi_only):
    """(num, V) characters the rules allow at step t, from the tonal schemes still alive, the
    rhyme state (a 词's rhyme sets: set_required) and, where the plan wants a fresh character
    (a 下联), the characters used. Every plan entry is per row, so each row keeps its own
    request's rules; the rhyme products run only when some row ends a line. An empty set falls
    back to any Chinese character, so that a small vocabulary never leaves a position with
    nothing to choose."""
    position = t + 1
    want = plan["tones"][:, :, position]  # (num, schemes)

    def any_alive(tone):
        return jnp.any(alive & (want == tone), axis=-1, keepdims=True)  # (num, 1)

    tone_ok = (
        any_alive(rules.ANY)
        | (any_alive(rules.LEVEL) & prosody["level"])
        | (any_alive(rules.OBLIQUE) & prosody["oblique"])
    )
    fresh = plan["fresh"][:, position, None]
    allowed = hanzi_only & jnp.where(plan["use_tones"][:, None], tone_ok, True) & ~(fresh & used)
    role = jnp.where(plan["use_rhyme"], plan["rhyme"][:, position], rules.NO_RHYME)[:, None]  # (num, 1)

    def rhyme_ok(allowed):
        # Only line ends pay for these two (num, groups) x (groups, V) products.
        rhymes_required = (required.astype(jnp.float32) @ prosody["rhymes"].T) > 0
        rhymes_second = (second_end.astype(jnp.float32) @ prosody["rhymes"].T) > 0
        level, oblique_only = prosody["level"], prosody["oblique"] & ~prosody["level"]
        return allowed & jnp.select(
            [role == rules.FIRST_END, role == rules.RHYME, role == rules.NOT_RHYME],
            [oblique_only | (level & rhymes_required), level & rhymes_required, oblique_only & ~rhymes_second],
            True,
        )

    allowed = jax.lax.cond(jnp.all(role == rules.NO_RHYME), lambda allowed: allowed, rhyme_ok, allowed)
    rhyme_set = plan["rhyme_set"][:, position]  # (num,)

    def set_rhyme_ok(allowed):  # a 词's line end: a character of a group its rhyme set may still take
        chosen_set = jnp.maximum(rhyme_set, 0)[:, None, None]
        groups = jnp.take_along_axis(set_required, chosen_set, axis=1)[:, 0].astype(jnp.float32)  # (num, CI_GROUPS)
        return allowed & ((rhyme_set[:, None] < 0) | ((groups @ prosody["ci_rhymes"].T) > 0))

    allowed = jax.lax.cond(jnp.all(rhyme_set < 0), lambda allowed: allowed, set_rhyme_ok, allowed)
    return jnp.where(jnp.any(allowed, axis=-1, keepdims=True), allowed, hanzi_only)


def update_rules(plan, prosody, t, chosen, alive, required, second_end, set_required):
    """Narrow each row's tonal schemes and rhyme groups by the character it just wrote."""
    position = t + 1
    want = plan["tones"][:, :, position]  # (num, schemes)
    level, oblique = prosody["level"][chosen][:, None], prosody["oblique"][chosen][:, None]
    fits = (want == rules.ANY) | ((want == rules.LEVEL) & level) | ((want == rules.OBLIQUE) & oblique)
    narrowed = alive & fits
    alive = jnp.where(jnp.any(narrowed, axis=-1, keepdims=True), narrowed, alive)  # a forced misfit is kept
    groups = prosody["rhymes"][chosen] > 0  # (num, groups)
    role = plan["rhyme"][:, position, None]  # (num, 1)
    pins = (role == rules.RHYME) | ((role == rules.FIRST_END) & level)
    narrowed = required & groups
    required = jnp.where(pins & jnp.any(narrowed, axis=-1, keepdims=True), narrowed, required)
    second_end = jnp.where((position == plan["second_end"])[:, None], groups, second_end)
    # A 词's rhyme set takes the groups of its first rhyme, narrowed by each one after it.
    in_set = (jnp.arange(set_required.shape[1]) == plan["rhyme_set"][:, position, None])[:, :, None]
    narrowed = set_required & (prosody["ci_rhymes"][chosen] > 0)[:, None, :]
    set_required = jnp.where(in_set & jnp.any(narrowed, axis=-1, keepdims=True), narrowed, set_required)
    return alive, required, second_end, set_required


class SamplerState(NamedTuple):
    """What `generate`'s loop carries from one character to the next."""

    t: jax.Array  # the position just written (0: the start token)
    carry: object  # the recurrent state after reading tokens[:, t]
    tokens: jax.Array  # (num, max_len + 1) the poems so far, E after each poem's end
    log_probs: jax.Array  # (num, max_len) the model's log-probability of each token written
    done: jax.Array  # (num,) the poem has ended (a padding row from the start)
    alive: jax.Array  # (num, schemes) the tonal schemes the poem still fits
    required: jax.Array  # (num, groups) the rhyme groups the rhyme may still take
    second_end: jax.Array  # (num, groups) the rhyme groups of the second line's last character
    set_required: jax.Array  # (num, sets, CI_GROUPS) the 词林正韵 groups each rhyme set of a 词 may still take
    used: jax.Array  # (num, V) the Chinese characters the poem has used (the repetition penalty)


def initial_state(plan, carry, num, max_len, vocab_size, start_id, end_id) -> SamplerState:
    """The loop state before the first character: every scheme and rhyme group still open."""
    return SamplerState(
        t=0,
        carry=carry,
        tokens=jnp.full((num, max_len + 1), end_id, jnp.int32).at[:, 0].set(start_id),
        log_probs=jnp.zeros((num, max_len), jnp.float32),
        done=~plan["live"],
        alive=jnp.ones(plan["tones"].shape[:2], bool),
        required=plan["rhyme_groups"],
        second_end=jnp.zeros_like(plan["rhyme_groups"]),
        set_required=plan["set_groups"],
        used=jnp.zeros((num, vocab_size), bool),
    )


@functools.partial(jax.jit, static_argnames=("model_config", "num", "max_len", "start_id", "end_id", "with_log_probs"))
def generate(
    params,
    plan,
    prosody,
    draws,
    carry=None,
    *,
    model_config: ModelConfig,
    num: int,
    max_len: int,
    start_id: int,
    end_id: int,
    with_log_probs: bool = False,
):
    """Write `num` poems of at most `max_len` characters after the start token, each row to its
    own plan and sampling settings, so that any requests of one length share a call.

    plan (see stack_plans): per row and position, what stands there: anything, a Chinese
    character under the rules, a forced token (the begin text, punctuation of a form, acrostic
    heads, the end) or a copy of an earlier one (a 下联's repeats); `live` marks the rows that
    are not padding. draws (see row_draws): per row, its request's key and its place among that
    request's rows, temperature, top_k, top_p, repetition_penalty and greedy. All of it is data,
    so a server compiles one program per batch size. carry: the state after reading each poem's
    title (read_titles), or None for a zero state. Returns tokens (num, max_len + 1) with E
    after each poem's end, and, with with_log_probs, the model's own log-probability of every
    token (num, max_len; zeros otherwise: it costs a pass over the vocabulary a step).
    """
    model = PoemModel(model_config)
    vocab_size = model_config.vocab_size
    carry = initial_carry(model_config, num) if carry is None else carry
    state = initial_state(plan, carry, num, max_len, vocab_size, start_id, end_id)
    bar_start = jnp.zeros(vocab_size).at[start_id].set(-jnp.inf)
    hanzi_only = prosody["hanzi"][None, :]
    greedy, rows = draws["greedy"], jnp.arange(num)
    # Every step's uniforms at once: threefry is a small loop of its own, cheaper run once than per step.
    uniforms = jax.vmap(row_uniforms, in_axes=(None, None, 0))(draws["key"], draws["index"], jnp.arange(max_len))

    def keep_going(state: SamplerState):
        return (state.t < max_len) & ~jnp.all(state.done)

    def step(state: SamplerState) -> SamplerState:
        t, carry, tokens, log_probs, done, alive, required, second_end, set_required, used = state
        carry, logits = model.apply({"params": params}, tokens[:, t, None], carry)
        # G only ever begins a poem; E is barred until min_len characters stand.
        logits = (logits[:, 0] + bar_start).at[:, end_id].add(jnp.where(t < plan["min_len"], -jnp.inf, 0.0))
        kind = plan["kind"][:, t + 1]
        allowed = jax.lax.cond(
            jnp.any(kind == rules.CHAR),
            lambda _: (
                (kind != rules.CHAR)[:, None]
                | rules_mask(plan, prosody, t, alive, required, second_end, set_required, used, hanzi_only)
            ),
            lambda _: jnp.ones((num, vocab_size), bool),
            None,
        )
        order = prosody["free_bias"][jnp.where(kind == rules.FREE, prosody["follows"][tokens[:, t]], rules.NOT_FREE)]
        masked = jnp.where(allowed, logits - draws["repetition_penalty"][:, None] * used + order, -jnp.inf)
        likeliest = lambda: jnp.argmax(masked, axis=-1).astype(jnp.int32)
        drawn = lambda: sample_tokens(uniforms[t], masked, draws["temperature"], draws["top_k"], draws["top_p"])
        # Each way is paid for only when some row takes it: no greedy row, all greedy, or a mix.
        way = jnp.where(jnp.all(greedy), 1, jnp.where(jnp.any(greedy), 2, 0))
        chosen = jax.lax.switch(way, [drawn, likeliest, lambda: jnp.where(greedy, likeliest(), drawn())])
        chosen = jnp.where(kind == rules.FORCED, plan["forced"][:, t + 1], chosen)
        copied = plan["copy_from"][:, t + 1]  # a 下联 repeats its own character where its 上联 does
        chosen = jnp.where(copied >= 0, tokens[rows, jnp.maximum(copied, 0)], chosen)
        chosen = jnp.where(done, end_id, chosen)
        if with_log_probs:
            chosen_logits = jnp.take_along_axis(logits, chosen[:, None], -1)[:, 0]
            log_probs = log_probs.at[:, t].set(chosen_logits - jax.nn.logsumexp(logits, axis=-1))
        alive, required, second_end, set_required = update_rules(
            plan, prosody, t, chosen, alive, required, second_end, set_required
        )
        used = used.at[rows, chosen].max(prosody["hanzi"][chosen])  # punctuation is never penalised
        return SamplerState(
            t + 1,
            carry,
            tokens.at[:, t + 1].set(chosen),
            log_probs,
            done | (chosen == end_id),
            alive,
            required,
            second_end,
            set_required,
            used,
        )

    final = jax.lax.while_loop(keep_going, step, state)
    return final.tokens, final.log_probs


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


def title_ids(title: str, vocab: list[str], max_title: int, field: str = "title") -> list[int]:
    """Ids of a title (or keywords joined: `field`) as training read titles: Chinese characters
    only, the first max_title; a model that reads no titles (max_title 0) refuses any."""
    if not max_title:
        raise TangshiError(
            "this model was trained without titles, so {title} and {keywords} cannot steer it; leave them out, "
            "or use a model that reads titles (the quick, hour and gpu presets train one)",
            field=field,
        )
    kept = data.clean_title(title)
    if not kept:
        raise TangshiError(
            "{field} {title!r} has no Chinese character; give a title such as 春夜喜雨 or keywords such as 春 雨",
            field=field,
            title=title,
        )
    return begin_ids(kept[:max_title], vocab, max_title, field=field)


def title_carry(params, model_config, vocab, titles: list[str | None], max_title: int):
    """The initial state of each poem: after its title, or zero where the title is None."""
    ids = np.zeros((len(titles), max_title), np.int32)
    lengths = np.zeros(len(titles), np.int32)
    ids_of = {title: title_ids(title, vocab, max_title) for title in set(titles) - {None}}  # each checked once
    for row, title in enumerate(titles):
        if title is not None:
            ids[row, : len(ids_of[title])], lengths[row] = ids_of[title], len(ids_of[title])
    return read_titles(params, ids, lengths, model_config=model_config)


def begin_ids(begin: str, vocab: list[str], max_len: int, field: str = "begin") -> list[int]:
    """Ids of the begin text (or of another option's characters: `field`); a character missing
    from the vocabulary is tried in simplified form."""
    begin = begin.strip()
    refuse = lambda message, **values: TangshiError(message, field=field, **values)
    if not begin:
        raise refuse("{field} is empty; give the first character(s) of the poem, e.g. {field} 日")
    if len(begin) > max_len:
        raise refuse("{field} has {length} characters, more than {max_len} {limit}", length=len(begin), limit=max_len)
    ids = data.vocab_ids(vocab)
    result = []
    for char in begin:
        if char in (data.START, data.END):
            raise refuse("{field} may not contain {char!r}: it is the model's start/end token", char=char)
        if char not in ids:
            simplified = to_simplified(char)
            if simplified not in ids:
                raise refuse(
                    "{field} character {char!r} is not in the model's vocabulary of {size:,} characters; use another "
                    "character",
                    char=char,
                    size=len(vocab),
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


def poem_lines(poem: str, wanted: PoemRequest) -> list[str]:
    """The lines a poem is shown in: a couplet's two, else one sentence a line."""
    return list(couplet.split(poem, couplet.parse(wanted.couplet))) if wanted.couplet else split_lines(poem)


def split_lines(poem: str) -> list[str]:
    """One sentence (up to 。！？) a line."""
    return [line for line in re.findall(rf"[^{SENTENCE_END}]*[{SENTENCE_END}]|[^{SENTENCE_END}]+$", poem) if line]


def device_prosody(vocab: list[str]) -> dict:
    return _device_prosody(tuple(vocab))


@functools.lru_cache(maxsize=4)
def _device_prosody(vocab: tuple[str, ...]) -> dict:
    prosody = rules.build_prosody(vocab)
    follows, free_bias = rules.free_order(vocab, prosody.hanzi)
    return {
        "hanzi": prosody.hanzi,
        "follows": follows,
        "free_bias": free_bias,
        "level": prosody.level,
        "oblique": prosody.oblique,
        "rhymes": prosody.rhymes.astype(np.float32),
        "ci_rhymes": cipai.ci_groups(vocab).astype(np.float32),
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
    tune: cipai.Tune | None = None,
    couplet_shape: couplet.Shape | None = None,
) -> dict:
    """What may stand at each position of the poems of one request, as arrays for `generate`.
    A 词 to a tune, or a couplet, is as long as it needs, if that is more than max_len."""
    end_id = vocab.index(data.END)
    schemes = len(rules.SCHEMES[5])
    max_len = max(max_len, cipai.tune_length(tune) if tune else couplet.length(couplet_shape) if couplet_shape else 0)
    kind = np.full(max_len + 1, rules.FREE, np.int32)
    forced = np.full(max_len + 1, end_id, np.int32)
    tone_plan = np.zeros((schemes, max_len + 1), np.int32)
    rhyme_plan = np.zeros(max_len + 1, np.int32)
    rhyme_set = np.full(max_len + 1, -1, np.int32)
    set_groups = np.zeros((cipai.MAX_RHYME_SETS, cipai.CI_GROUPS), bool)
    copy_from, fresh = np.full(max_len + 1, -1, np.int32), np.zeros(max_len + 1, bool)
    second_end = -1
    prosody = rules.build_prosody(tuple(vocab))
    if couplet_shape:
        kind, forced, tone_plan[:], copy_from, fresh = couplet.couplet_template(
            couplet_shape, vocab, prosody, max_len, end_id, mark_ids(vocab, "a couplet"), every_position=tones
        )
        tones = True  # a couplet always opposes its tones; --tones opposes every certain one
    if tune:
        kind, forced, tone_plan[:], rhyme_set, set_groups = tune_plan(vocab, tune, max_len, begin, end_id)
    if form:
        kind, forced, tone_plan, rhyme_plan = form_plan(vocab, form, max_len, begin, end_id, heads, loose_tones)
        second_end = 2 * (rules.FORMS[form][1] + 1) - 1
    kind[1 : len(begin) + 1] = rules.FORCED
    forced[1 : len(begin) + 1] = begin
    groups = np.ones(len(prosody.groups), bool)
    if rhyme_group is not None:
        groups = prosody.rhymes[rhyme_group] & prosody.level_groups
        if not groups.any():
            raise TangshiError(
                "{rhyme_group} {char!r} has no level-tone (平) rhyme group; "
                "give a level-tone character such as 东 or 山",
                field="rhyme_group",
                char=vocab[rhyme_group],
            )
    return {
        "kind": kind,
        "forced": forced,
        "tones": tone_plan,
        "rhyme": rhyme_plan,
        "second_end": np.int32(second_end),
        "rhyme_groups": groups,
        "use_tones": np.bool_(tones and bool(form or tune or couplet_shape)),
        "use_rhyme": np.bool_(rhyme and bool(form)),
        "min_len": np.int32(min_len),
        "rhyme_set": rhyme_set,
        "set_groups": set_groups,
        "copy_from": copy_from,
        "fresh": fresh,
    }


def refuse_long_begin(begin: list[int], chars: int, line: str) -> None:
    """A begin text must fit the line it begins (line: which, in words)."""
    if len(begin) > chars:
        raise TangshiError(
            "{begin} has {length} characters, more than {line} ({chars})",
            field="begin",
            length=len(begin),
            line=line,
            chars=chars,
        )


def tune_plan(vocab: list[str], tune: cipai.Tune, max_len: int, begin: list[int], end_id: int):
    """cipai.tune_template's arrays, after checking that the begin text fits the first line."""
    refuse_long_begin(begin, tune.lines[0][0], f"the first line of {tune.name}")
    return cipai.tune_template(tune, max_len, tune_marks(vocab), end_id)


def form_plan(vocab: list[str], form: str, max_len: int, begin: list[int], end_id: int, heads, loose_tones: bool):
    """rules.form_template's arrays, after checking the begin text against the form and heads."""
    marks = mark_ids(vocab, "a form")
    punctuation = (marks[rules.COMMA], marks[rules.PERIOD])
    refuse_long_begin(begin, rules.FORMS[form][1], f"a line of {form}")
    if heads and begin and begin[0] != heads[0]:
        raise TangshiError("{begin} must start with the first {acrostic} character (or be left out)", field="begin")
    return rules.form_template(form, max_len, punctuation, end_id, heads, loose_tones or bool(heads))


def mark_ids(vocab: list[str], what: str) -> dict[str, int]:
    """The ids of ， and 。, which every form, tune and couplet writes (what: which, in words)."""
    if rules.COMMA not in vocab or rules.PERIOD not in vocab:
        raise TangshiError(f"this model's vocabulary lacks '，' or '。', so it cannot write {what}")
    return {rules.COMMA: vocab.index(rules.COMMA), rules.PERIOD: vocab.index(rules.PERIOD)}


def tune_marks(vocab: list[str]) -> dict[str, int]:
    """The ids of a 词's marks; a model that never saw 、 (the Tang poems have almost none)
    pauses with ， instead."""
    marks = mark_ids(vocab, "to a tune")
    return {**marks, "、": vocab.index("、") if "、" in vocab else marks[rules.COMMA]}


def plan_request(vocab: list[str], wanted: PoemRequest, max_title: int = 0, tunes: dict | None = None) -> dict:
    """The plan (make_plan) of one request, after checking what only the model can check (its
    vocabulary, whether it reads titles); raises TangshiError on anything it cannot honour.
    Host-side only, so a server checks each request before batching it. max_title: the title
    length the model was trained with (0: it reads no titles). tunes: the tunes a request may
    name (cipai.tunes_beside)."""
    tune = None
    if wanted.tune is not None:
        if wanted.form or wanted.acrostic or wanted.rhyme_group:
            raise TangshiError(
                "{tune} sets the lines and rhymes itself: leave out {form}, {acrostic} and {rhyme_group}", field="tune"
            )
        tune = cipai.find_tune(wanted.tune, tunes or {})
    shape = None
    if wanted.couplet is not None:
        if wanted.form or wanted.tune or wanted.acrostic or wanted.begin or wanted.rhyme or wanted.rhyme_group:
            raise TangshiError(
                "{couplet} sets the 下联's shape itself: leave out {form}, {tune}, {acrostic}, {begin}, {rhyme} "
                "and {rhyme_group}",
                field="couplet",
            )
        shape = couplet.parse(wanted.couplet)
    if wanted.topic is not None:
        title_ids(wanted.topic, vocab, max_title, field="keywords" if wanted.keywords is not None else "title")
    ids = begin_ids(wanted.begin, vocab, wanted.max_len) if wanted.begin is not None else []
    form, heads = wanted.form, None
    if wanted.acrostic is not None:
        heads = begin_ids(wanted.acrostic, vocab, wanted.max_len, field="acrostic")
        form = form or ("qijue" if wanted.line_length == 7 else "wujue")
        lines = rules.FORMS[form][0]
        if len(heads) != lines:
            raise TangshiError(
                "{acrostic} has {length} characters but {form_name} has {lines} lines; give {lines} characters",
                field="acrostic",
                length=len(heads),
                form_name=form,
                lines=lines,
            )
    if (wanted.rhyme or wanted.rhyme_group) and not (form or tune) or wanted.tones and not (form or tune or shape):
        raise TangshiError("{rhyme}, {rhyme_group} and {tones} need a {form} (or {acrostic})", field="form")
    if wanted.rhyme_group and len(wanted.rhyme_group.strip()) != 1:
        raise TangshiError(
            "{rhyme_group} takes one character, got {text!r}", field="rhyme_group", text=wanted.rhyme_group
        )
    group = begin_ids(wanted.rhyme_group, vocab, wanted.max_len, field="rhyme_group")[0] if wanted.rhyme_group else None
    return make_plan(
        vocab,
        wanted.max_len,
        ids,
        form=form,
        heads=heads,
        rhyme=wanted.rhyme or group is not None,
        rhyme_group=group,
        tones=wanted.tones,
        loose_tones=wanted.loose_tones,
        tune=tune,
        couplet_shape=shape,
    )


class Asked(NamedTuple):
    """One request of a sampler call: what it asks, its key (request_key), and a title per poem
    in place of the request's own (None: the request's)."""

    wanted: PoemRequest
    key: np.ndarray
    titles: list[str | None] | None = None


def request_key(seed: int | None, part: int = 0) -> np.ndarray:
    """The (2,) uint32 key data a request's rows draw from: its seed's key (a new draw without
    one), folded with `part` for the later calls of a request written part by part."""
    seed = seed if seed is not None else secrets.randbelow(2**31)
    key = jax.random.fold_in(jax.random.key(seed), part) if part else jax.random.key(seed)
    return np.asarray(jax.random.key_data(key))


def row_owners(counts: list[int], rows: int) -> np.ndarray:
    """The request each of `rows` rows belongs to (counts: rows per request); padding rows past
    them take the first request's settings."""
    owners = np.repeat(np.arange(len(counts)), counts)
    return np.concatenate([owners, np.zeros(rows - len(owners), owners.dtype)])


def stack_plans(plans: list[dict], counts: list[int], rows: int) -> dict:
    """The plans of a call's requests as generate takes them: every entry with a leading row
    axis, each request's plan on each of its rows; `live` marks the rows that are not padding,
    which end at once."""
    owners = row_owners(counts, rows)
    stacked = {name: np.stack([np.asarray(plan[name]) for plan in plans])[owners] for name in plans[0]}
    return {**stacked, "live": np.arange(rows) < sum(counts)}


def row_draws(asked: list[Asked], counts: list[int], rows: int, vocab_size: int) -> dict:
    """The sampling settings of each row (see generate), from the request it belongs to."""
    owners = row_owners(counts, rows)
    column = lambda value, dtype: np.asarray([value(one.wanted) for one in asked], dtype)[owners]
    places = np.concatenate([np.arange(count) for count in counts] + [np.zeros(rows - sum(counts), int)])
    return {
        "key": np.stack([one.key for one in asked])[owners],
        "index": places.astype(np.uint32),
        "temperature": column(lambda wanted: wanted.temperature, np.float32),
        "top_k": column(lambda wanted: min(wanted.top_k, vocab_size), np.int32),
        "top_p": column(lambda wanted: wanted.top_p, np.float32),
        "repetition_penalty": column(lambda wanted: wanted.repetition_penalty, np.float32),
        "greedy": column(lambda wanted: wanted.greedy, bool),
    }


def write_batch(
    params,
    model_config,
    vocab,
    asked: list[Asked],
    *,
    max_title: int = 0,
    corpus_lines: set[str] | None = None,
    with_scores: bool = False,
    rows: int = 0,
    tunes: dict | None = None,
) -> list[tuple[list[str], list[float] | None]]:
    """Each request's poems (and, when scored, their scores) from one sampler call, each row
    under its own request's plan and settings; see write_poems. The requests' programs must be
    of one length (plan_request's; a 词 is as long as its tune)."""
    plans = [plan_request(vocab, one.wanted, max_title, tunes) for one in asked]
    lengths = {len(plan["kind"]) for plan in plans}
    if len(lengths) != 1:
        raise ValueError(f"requests of one sampler call need one program length, not {sorted(lengths)}")
    start_id, end_id = vocab.index(data.START), vocab.index(data.END)
    counts = [one.wanted.rows for one in asked]
    batch = max(rows, sum(counts))
    # Drafts of poem i of a request are its rows i*drafts ... (i+1)*drafts - 1.
    row_titles = [
        title
        for one in asked
        for title in (one.titles if one.titles is not None else [one.wanted.topic] * one.wanted.num)
        for _ in range(one.wanted.drafts)
    ]
    carry = None
    if any(title is not None for title in row_titles):
        carry = title_carry(params, model_config, vocab, row_titles + [None] * (batch - len(row_titles)), max_title)
    scoring = with_scores or any(one.wanted.drafts > 1 for one in asked)
    tokens, log_probs = generate(
        params,
        stack_plans(plans, counts, batch),
        device_prosody(vocab),
        row_draws(asked, counts, batch, len(vocab)),
        carry,
        model_config=model_config,
        num=batch,
        max_len=lengths.pop() - 1,  # a tune may need more than wanted.max_len
        start_id=start_id,
        end_id=end_id,
        with_log_probs=scoring,
    )
    tokens, log_probs = np.asarray(tokens), np.asarray(log_probs)
    answers, first = [], 0
    for one, plan, count in zip(asked, plans, counts):
        drafts = [decode(row, vocab, end_id) for row in tokens[first : first + count]]
        answers.append(best_drafts(one.wanted, plan, drafts, log_probs[first : first + count], corpus_lines, scoring))
        first += count
    return answers


def best_drafts(wanted: PoemRequest, plan: dict, drafts: list[str], log_probs: np.ndarray, corpus_lines, scoring):
    """The best of each poem's drafts by score_poem, and the scores (None unless scoring)."""
    if not scoring:
        return drafts, None
    written = plan["kind"][1:] != rules.FORCED  # positions the model chose (not begin, heads, marks)
    free = not lines_are_set(plan)
    scores = [score_poem(poem, lp, written, corpus_lines, free) for poem, lp in zip(drafts, log_probs)]
    candidates = wanted.drafts
    best = [max(range(i * candidates, (i + 1) * candidates), key=scores.__getitem__) for i in range(wanted.num)]
    return [drafts[row] for row in best], [scores[row] for row in best]


def write_poems(
    params,
    model_config,
    vocab,
    wanted: PoemRequest,
    *,
    max_title: int = 0,
    titles: list[str | None] | None = None,
    corpus_lines: set[str] | None = None,
    with_scores: bool = False,
    rows: int = 0,
    part: int = 0,
    tunes: dict | None = None,
) -> list[str] | tuple[list[str], list[float]]:
    """Poems as strings (without G/E), as `wanted` asks (its script aside: poems come simplified).

    max_title: the title length the model was trained with (0: it reads no titles, and a title
    is an error). titles: a title per poem, in place of the request's one. The best of
    `wanted.candidates` drafts per poem is kept, by `score_poem`; corpus_lines: lines of the
    training poems, which the score penalises copying. with_scores: also the kept poems'
    scores. rows: run the sampler on at least this many rows, the rest padding, so that one
    compiled program serves every batch up to that size (a row's draws do not depend on the
    batch size). part: the index of this call in a request written part by part (sample --num);
    each draws its own numbers. A request without a seed draws one. tunes: the tunes a request
    may name (cipai.tunes_beside)."""
    asked = Asked(wanted, request_key(wanted.seed, part), titles)
    [(poems, scores)] = write_batch(
        params,
        model_config,
        vocab,
        [asked],
        max_title=max_title,
        corpus_lines=corpus_lines,
        with_scores=with_scores,
        rows=rows,
        tunes=tunes,
    )
    return (poems, scores) if with_scores else poems


def in_script(poems: list[str], script: str) -> list[str]:
    """The poems in the script asked for (the model writes simplified characters)."""
    if script == "traditional":
        return [rules.opencc_converter("s2t").convert(poem) for poem in poems]
    return poems


# The reranking score's weights: nats taken off per share of copied lines and of repeated
# characters, for a poem that stops mid-sentence (a few likely characters then E would
# otherwise have the best mean), and for a free poem whose lines are not regular_lines.
COPY_WEIGHT, REPEAT_WEIGHT, UNFINISHED_PENALTY, IRREGULAR_PENALTY = 2.0, 1.0, 10.0, 1.0


def regular_lines(lines: list[str]) -> bool:
    """Lines of 5 or of 7 characters, all alike, an even number of them and at least 4: the
    shape of the four forms and of nearly every other Tang poem (6, 10, 12 lines)."""
    lengths = [len(line) for line in lines]
    return len(lengths) >= 4 and len(lengths) % 2 == 0 and len(set(lengths)) == 1 and lengths[0] in (5, 7)


def lines_are_set(plan: dict) -> bool:
    """Whether the plan fixes the poem's lines: a form, tune, couplet or acrostic marks each of
    its characters' positions CHAR, a free request none."""
    return bool(np.any(plan["kind"] == rules.CHAR))


def score_poem(
    poem: str, log_probs: np.ndarray, written: np.ndarray, corpus_lines: set[str] | None, free: bool = False
) -> float:
    """The mean log-probability the model gave the Chinese characters it chose (begin text,
    acrostic heads and punctuation excluded), minus COPY_WEIGHT × the share of lines found in
    corpus_lines, REPEAT_WEIGHT × the share of characters that repeat an earlier one,
    UNFINISHED_PENALTY when the poem does not end a sentence (。！？), and, for a free poem
    (free), IRREGULAR_PENALTY when its lines are not regular_lines: a draft in a regular shape
    is kept over a slightly likelier one that is not, as readers of Tang poems expect."""
    chars = [i for i, char in enumerate(poem) if data.is_hanzi(char) and written[i]]
    if not chars:
        return -np.inf
    mean_log_prob = float(np.mean(log_probs[chars]))
    hanzi = [char for char in poem if data.is_hanzi(char)]
    repeated = 1 - len(set(hanzi)) / len(hanzi)
    lines = data.lines_of(poem)
    copied = sum(line in corpus_lines for line in lines) / len(lines) if corpus_lines and lines else 0.0
    unfinished = UNFINISHED_PENALTY * (poem[-1] not in SENTENCE_END)
    irregular = IRREGULAR_PENALTY * (free and not regular_lines(lines))
    return mean_log_prob - COPY_WEIGHT * copied - REPEAT_WEIGHT * repeated - unfinished - irregular


def corpus_lines(path, parts=("tang",)) -> set[str] | None:
    """Every line of the corpus parts a model was trained on (the poems file `path` and the
    parts beside it), for the score's copy penalty; None (no penalty, and a note) when a file is
    not at hand: sampling never needs them otherwise.

    Parsing the corpus takes a second or two, so the lines are kept in the cache directory,
    under a name made from the files' paths, sizes and modification times."""
    from tangshi_jax.corpus import part_path  # the corpus step's module loads only here

    try:
        files = [part_path(path, part) for part in parts]
        stats = [(file.resolve(), file.stat()) for file in files]
        key = hashlib.blake2b(
            "|".join(f"{file}:{stat.st_size}:{stat.st_mtime_ns}" for file, stat in stats).encode(), digest_size=8
        ).hexdigest()
        cached = default_cache_dir() / f"lines-{key}.txt"
        if cached.is_file():
            return set(cached.read_text(encoding="utf-8").split("\n"))
        corpus = data.load_corpus(path, tuple(parts), build=False)
        lines = {line for poem in corpus.poems for line in data.lines_of(poem)}
    except (OSError, TangshiError):
        print(f"note: {path} is not at hand, so the drafts' score cannot penalise copied lines", file=sys.stderr)
        return None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(cached, "\n".join(sorted(lines)))
    except OSError:
        pass  # a read-only cache only costs the next call the same second or two
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tangshi_jax.sample", description=__doc__.splitlines()[0])
    request.add_flags(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object per poem per line")
    parser.add_argument("--checkpoint-dir", default="checkpoints")
    parser.add_argument(
        "--model", default=None, help="a release folder (python -m tangshi_jax.export) instead of --checkpoint-dir"
    )
    parser.add_argument("--platform", choices=PLATFORMS, default=None)
    parser.add_argument(
        "--list-tunes", action="store_true", help="print the tunes (词牌) learned from the 词 beside --data, and stop"
    )
    parser.add_argument("--data", default="poems.txt", help="--list-tunes and --tune read poems.ci.txt beside it")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.list_tunes:
        print("\n".join(cipai.tune_lines(args.data)))
        return
    wanted = request.from_args(args)  # every flag checked before any work
    use_platform(args.platform)
    model = release.load_model(checkpoint_dir=args.checkpoint_dir, model_dir=args.model)
    tunes = cipai.tunes_beside(args.data) if wanted.tune is not None else None
    copied = corpus_lines(model.train_config.data, model.train_config.corpus) if wanted.drafts > 1 else None
    # A part at a time, printed as it is done: memory stays bounded whatever --num asks. The last
    # part is padded to the others' rows, so that one compiled program serves them all.
    per_part = max(1, request.MAX_ROWS // wanted.drafts)
    rows = per_part * wanted.drafts if wanted.num > per_part else 0
    for part, first in enumerate(range(0, wanted.num, per_part)):
        this_part = dataclasses.replace(wanted, num=min(per_part, wanted.num - first))
        poems = write_poems(
            model.params,
            model.model_config,
            model.vocab,
            this_part,
            max_title=model.max_title,
            corpus_lines=copied,
            rows=rows,
            part=part,
            tunes=tunes,
        )
        for index, poem in enumerate(in_script(poems, wanted.script), start=first):
            if args.json:
                print(
                    json.dumps(
                        {
                            "begin": wanted.begin or "",
                            "title": wanted.topic or "",
                            "poem": poem,
                            "lines": poem_lines(poem, wanted),
                        },
                        ensure_ascii=False,
                    )
                )
            else:
                print(("\n" if index else "") + "\n".join(poem_lines(poem, wanted)))
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(run_cli(main))
