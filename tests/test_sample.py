import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tangshi_jax import data, release, rules, sample
from tangshi_jax.data import is_hanzi
from tangshi_jax.errors import TangshiError, run_cli
from tangshi_jax.model import PoemModel, initial_carry
from tangshi_jax.request import PoemRequest


@pytest.fixture(scope="module")
def loaded(trained_run):
    directory, _, _ = trained_run
    model = release.load_model(checkpoint_dir=directory)
    return directory, model.model_config, model.vocab, model.params


def words(vocab, count):
    """The first `count` ordinary characters of a vocabulary (the tiny corpus has few)."""
    return "".join([char for char in vocab if char not in "GE，。"][:count])


def test_step_wise_log_probs_equal_the_full_forward_pass(loaded):
    _, model_config, vocab, params = loaded
    text = words(vocab, 4) + "，" + words(vocab, 3) + "。"
    ids = [vocab.index(c) for c in text]
    start_id, end_id = vocab.index("G"), vocab.index("E")
    prefix = np.array([start_id] + ids, np.int32)
    # Every position forced: the sampler's log-probabilities are the model's on this text.
    plan = sample.make_plan(vocab, len(ids), ids)
    asked = [sample.Asked(PoemRequest(num=2, candidates=1, temperature=1.0), sample.request_key(0))]
    tokens, log_probs = sample.generate(
        params,
        sample.stack_plans([plan], [2], 2),
        sample.device_prosody(vocab),
        sample.row_draws(asked, [2], 2, len(vocab)),
        model_config=model_config,
        num=2,
        max_len=len(ids),
        start_id=start_id,
        end_id=end_id,
        with_log_probs=True,
    )
    assert np.asarray(tokens)[0].tolist() == prefix.tolist()
    _, logits = PoemModel(model_config).apply({"params": params}, prefix[None, :-1], initial_carry(model_config, 1))
    logits = np.asarray(logits[0]).copy()
    logits[:, start_id] = -np.inf  # the sampler never offers G after the start
    expected = jax.nn.log_softmax(logits, axis=-1)[np.arange(len(ids)), prefix[1:]]
    np.testing.assert_allclose(np.asarray(log_probs)[0], expected, rtol=1e-5, atol=1e-5)


def test_poems_start_with_the_begin_text_and_stop_at_the_end(loaded):
    _, model_config, vocab, params = loaded
    begin = words(vocab, 2)
    one_draft = lambda **options: PoemRequest(candidates=1, **options)
    poems = sample.write_poems(params, model_config, vocab, one_draft(begin=begin, num=6, max_len=30, seed=1))
    assert len(poems) == 6 and len(set(poems)) > 1
    for poem in poems:
        assert poem.startswith(begin) and 2 <= len(poem) <= 30
        assert "G" not in poem and "E" not in poem
    greedy = [
        sample.write_poems(params, model_config, vocab, one_draft(begin=begin[0], num=2, greedy=True)) for _ in range(2)
    ]
    assert greedy[0] == greedy[1] and greedy[0][0] == greedy[0][1]
    seeded = one_draft(begin=begin, num=3, seed=5)
    assert sample.write_poems(params, model_config, vocab, seeded) == sample.write_poems(
        params, model_config, vocab, seeded
    )


def test_top_k_one_is_greedy(loaded):
    _, model_config, vocab, params = loaded
    begin = words(vocab, 1)
    top_one = PoemRequest(begin=begin, num=3, top_k=1, seed=3, candidates=1)
    greedy = PoemRequest(begin=begin, num=3, greedy=True)
    assert sample.write_poems(params, model_config, vocab, top_one) == sample.write_poems(
        params, model_config, vocab, greedy
    )


def draw(key, logits, temperature=1.0, top_k=0, top_p=1.0):
    """sample_tokens with one setting for every row and the uniforms of `key`."""
    rows = logits.shape[0]
    setting = lambda value, dtype: jnp.full(rows, value, dtype)
    uniforms = jax.random.uniform(key, (rows, 1))
    return sample.sample_tokens(
        uniforms, logits, setting(temperature, jnp.float32), setting(top_k, jnp.int32), setting(top_p, jnp.float32)
    )


def test_inverse_cdf_sampling_follows_the_distribution():
    logits = jnp.log(jnp.array([[0.1, 0.2, 0.7, 0.0]] * 20000))
    draws = np.asarray(draw(jax.random.key(0), logits))
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / len(draws), [0.1, 0.2, 0.7, 0.0], atol=0.015)
    top2 = np.asarray(draw(jax.random.key(1), logits, top_k=2))
    assert set(top2) == {1, 2}


def test_each_row_samples_with_its_own_settings():
    """Rows asking for different temperatures, top-k and top-p in one call draw exactly what
    each would draw in a call of its own settings, from the same uniform."""
    logits = jax.random.normal(jax.random.key(3), (6, 300)) * 2
    uniforms = jax.random.uniform(jax.random.key(4), (6, 1))
    settings = [(0.5, 0, 1.0), (1.0, 5, 1.0), (1.5, 0, 0.6), (0.8, 40, 0.9), (2.0, 1, 1.0), (1.0, 0, 1.0)]
    column = lambda index, dtype: jnp.asarray([setting[index] for setting in settings], dtype)
    mixed = sample.sample_tokens(uniforms, logits, column(0, jnp.float32), column(1, jnp.int32), column(2, jnp.float32))
    for row, (temperature, top_k, top_p) in enumerate(settings):
        alone = sample.sample_tokens(
            jnp.tile(uniforms[row], (6, 1)),
            jnp.tile(logits[row], (6, 1)),
            jnp.full(6, temperature),
            jnp.full(6, top_k),
            jnp.full(6, top_p),
        )
        assert int(mixed[row]) == int(alone[0]), row
    assert int(mixed[4]) == int(jnp.argmax(logits[4]))  # top-k 1 is the likeliest
    assert len(set(np.asarray(mixed).tolist())) > 1


def test_a_rows_uniform_is_its_place_in_its_requests_draw():
    """row_uniforms gives row r element index[r] of jax.random.uniform(fold_in(key, t), (n, 1)),
    whatever the other rows hold: a lone request draws what it drew before plans were per row."""
    keys = [sample.request_key(seed, part) for seed, part in ((0, 0), (7, 0), (7, 2), (2**40 + 3, 0))]
    rows = [(0, 0), (1, 0), (0, 1), (2, 5), (3, 1029), (1, 3)]  # (request, place in it)
    got = np.asarray(
        sample.row_uniforms(
            np.stack([keys[request] for request, _ in rows]),
            np.asarray([place for _, place in rows], np.uint32),
            11,
        )
    )[:, 0]
    for (request, place), value in zip(rows, got):
        folded = jax.random.fold_in(jax.random.wrap_key_data(keys[request]), 11)
        assert value == float(jax.random.uniform(folded, (place + 1, 1))[place, 0])
        assert value == float(jax.random.uniform(folded, (2048, 1))[place, 0])


def test_begin_text_is_checked_and_simplified():
    vocab = ["G", "E", "，", "龙", "日"]
    assert sample.begin_ids("龍日", vocab, 64) == [3, 4]  # traditional 龍 becomes 龙
    with pytest.raises(TangshiError, match="'鳳' is not in the model's vocabulary"):
        sample.begin_ids("日鳳", vocab, 64)
    with pytest.raises(TangshiError, match="--begin is empty"):
        sample.begin_ids("  ", vocab, 64)
    with pytest.raises(TangshiError, match="start/end token"):
        sample.begin_ids("G", vocab, 64)
    with pytest.raises(TangshiError, match="more than --max-len 1"):
        sample.begin_ids("日日", vocab, 1)


def test_split_lines_one_sentence_a_line():
    assert sample.split_lines("白日依山尽，黄河入海流。欲穷千里目！更上") == [
        "白日依山尽，黄河入海流。",
        "欲穷千里目！",
        "更上",
    ]


def test_cli_prints_json_poems(loaded, capsys):
    directory, begin = loaded[0], words(loaded[2], 1)
    assert run_cli(sample.main, ["--begin", begin, "--num", "3", "--json", "--checkpoint-dir", str(directory)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert row["begin"] == begin and row["poem"].startswith(begin) and "".join(row["lines"]) == row["poem"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--begin", "日"], "no checkpoint in"),
        (["--begin", "日", "--temperature", "0"], "--temperature must be above 0"),
    ],
)
def test_bad_sampling_input_gives_one_clear_line(tmp_path, capsys, argv, message):
    assert run_cli(sample.main, argv + ["--checkpoint-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_block_sampling_is_exact_at_block_edges():
    probs = np.zeros(150)
    probs[[0, 63, 64, 127, 128, 149]] = [0.05, 0.25, 0.2, 0.1, 0.3, 0.1]  # either side of each block edge
    logits = jnp.log(jnp.asarray(np.tile(probs, (30000, 1)), jnp.float32))
    draws = np.asarray(draw(jax.random.key(2), logits))
    np.testing.assert_allclose(np.bincount(draws, minlength=150) / len(draws), probs, atol=0.01)


def test_top_k_threshold_keeps_exactly_the_k_likeliest():
    scaled = jax.random.normal(jax.random.key(4), (20, 500)) * 3
    for k in (1, 7, 40):
        kept = np.asarray(scaled >= sample.top_k_threshold(scaled, k))
        exact = np.zeros_like(kept)
        np.put_along_axis(exact, np.argsort(-np.asarray(scaled), axis=-1)[:, :k], True, axis=-1)
        np.testing.assert_array_equal(kept, exact)


def test_top_p_keeps_the_smallest_set_holding_that_mass():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 20000))
    draws = np.asarray(draw(jax.random.key(5), logits, top_p=0.75))
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / len(draws), [0.625, 0.375, 0, 0], atol=0.015)


@pytest.fixture(scope="module")
def titled(titles_run):
    directory, _ = titles_run
    return directory, release.load_model(checkpoint_dir=directory)


def test_reading_a_title_in_a_padded_batch_equals_reading_it_alone(titled):
    _, model = titled
    model_config, vocab, params = model.model_config, model.vocab, model.params
    title = [vocab.index(char) for char in "题" + words(vocab, 2)]
    ids = np.zeros((2, 5), np.int32)
    ids[0, :3], ids[1, :2] = title, title[:2]
    carry = sample.read_titles(params, ids, np.array([3, 2]), model_config=model_config)
    for row, length in ((0, 3), (1, 2)):
        alone, _ = PoemModel(model_config).apply(
            {"params": params}, np.array([title[:length]]), initial_carry(model_config, 1)
        )
        for got, expected in zip(jax.tree_util.tree_leaves(carry), jax.tree_util.tree_leaves(alone)):
            np.testing.assert_allclose(np.asarray(got)[row], np.asarray(expected)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # compiles the sampler for many requests
def test_a_title_steers_the_poems_and_keeps_every_rule(titled):
    _, model = titled
    vocab = model.vocab
    write = lambda titles=None, **options: sample.write_poems(
        model.params,
        model.model_config,
        vocab,
        PoemRequest(num=6, seed=3, candidates=1, **options),
        max_title=model.max_title,
        titles=titles,
    )
    first, second = "题" + words(vocab, 2), "题" + words(vocab, 4)[2:]
    untitled, titled_poems = write(), write(title=first)
    assert untitled != titled_poems and titled_poems == write(title=first)
    assert write(title=first) != write(title=second)
    assert write(titles=[first] * 6) == titled_poems  # a title per poem, as the batcher gives them
    heads = words(vocab, 4)
    for poem in write(titles=[first, second] * 3, form="qijue", rhyme=True, acrostic=heads):
        assert [line[0] for line in re.split("[，。]", poem) if line] == list(heads)
        assert re.fullmatch("([^，。]{7}，[^，。]{7}。){2}", poem)


def test_a_title_makes_the_poem_it_names_likelier(titled):
    """The tests' corpus names each poem's first two characters in its title (题春花3 for a poem
    beginning 春花). Read after its own title, the model gives those two characters a higher
    log-probability than read after another poem's title: summed over all 120 poems."""
    from tangshi_jax import data
    from tangshi_jax.metrics import position_nll

    _, model = titled
    corpus = data.read_corpus(model.train_config.data)
    wrong = corpus.titles[1:] + corpus.titles[:1]  # each poem under the next poem's title

    def opening_nll(titles):
        reads = [t[: model.max_title] + poem for t, poem in zip(titles, corpus.poems)]
        length = max(map(len, reads))
        ids = np.array([[model.vocab.index(c) for c in r] + [0] * (length - len(r)) for r in reads], np.int32)
        nll = np.asarray(position_nll(model.model_config, model.params, ids[:, :-1], ids[:, 1:]))
        # Targets 1 and 2 after G: the poem's first two characters.
        starts = [len(t[: model.max_title]) for t in titles]
        return sum(nll[row, start : start + 2].sum() for row, start in enumerate(starts))

    own, other = opening_nll(corpus.titles), opening_nll(wrong)
    print(f"opening NLL over {len(corpus.poems)} poems: own titles {own:.1f}, shifted titles {other:.1f}")
    assert own < other - 0.1 * len(corpus.poems), (own, other)  # at least 0.1 nats a poem


def test_title_errors_are_one_clear_line(trained_run, titled, capsys):
    plain_directory, _, _ = trained_run
    titled_directory, _ = titled
    cases = [
        ([plain_directory, "--title", "春夜喜雨"], "trained without titles"),
        ([plain_directory, "--keywords", "春", "雨"], "trained without titles"),
        ([titled_directory, "--title", "(ab)"], "has no Chinese character"),
        ([titled_directory, "--title", "春", "--keywords", "雨"], "--title or --keywords, not both"),
        ([titled_directory, "--keywords", " "], "--keywords needs one or more words"),
        ([titled_directory, "--title", "龘"], "not in the model's vocabulary"),
    ]
    for (directory, *flags), message in cases:
        assert run_cli(sample.main, ["--checkpoint-dir", str(directory), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


@pytest.mark.slow  # compiles the sampler for titled requests
def test_keywords_are_read_as_a_title(titled, capsys):
    directory, vocab = titled[0], titled[1].vocab
    argv = ["--checkpoint-dir", str(directory), "--num", "2", "--seed", "4", "--json"]
    one, two = words(vocab, 2)
    assert run_cli(sample.main, argv + ["--keywords", one, two]) == 0
    from_keywords = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert run_cli(sample.main, argv + ["--title", one + two]) == 0
    from_title = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["poem"] for p in from_keywords] == [p["poem"] for p in from_title]
    assert from_keywords[0]["title"] == one + two


def test_the_best_draft_has_the_best_score_and_keeps_the_rules(loaded):
    _, model_config, vocab, params = loaded
    options = dict(seed=2, form="wujue", rhyme=True, tones=True)
    drafts, draft_scores = sample.write_poems(
        params, model_config, vocab, PoemRequest(num=6, candidates=1, **options), with_scores=True
    )
    best, best_scores = sample.write_poems(
        params, model_config, vocab, PoemRequest(num=2, candidates=3, **options), with_scores=True
    )
    for i in range(2):
        pick = int(np.argmax(draft_scores[3 * i : 3 * i + 3])) + 3 * i
        assert best[i] == drafts[pick] and best_scores[i] == draft_scores[pick]
    assert all(re.fullmatch("([^，。]{5}，[^，。]{5}。){2}", poem) for poem in best)


def test_score_is_mean_log_prob_less_copies_and_repeats():
    poem = "春花春月，秋风。"
    log_probs = np.array([-1.0, -2.0, -3.0, -4.0, 0.0, -5.0, -6.0, 0.0, 0.0])
    written = np.array([False, True, True, True, True, True, True, True, True])  # 春 was the begin text
    # Chosen characters 花 春 月 风 秋: mean -4; 春 repeats (1 of 7 characters); 秋风 is a copied line (1 of 2).
    expected = -4.0 - sample.COPY_WEIGHT * 0.5 - sample.REPEAT_WEIGHT * (1 / 6)
    assert sample.score_poem(poem, log_probs, written, {"秋风"}) == pytest.approx(expected)
    assert sample.score_poem(poem, log_probs, written, None) == pytest.approx(-4.0 - sample.REPEAT_WEIGHT / 6)
    # Stopped mid-sentence: the same characters without the final 。 are penalised.
    assert sample.score_poem(poem[:-1], log_probs, written, None) == pytest.approx(
        -4.0 - sample.REPEAT_WEIGHT / 6 - sample.UNFINISHED_PENALTY
    )


# Requests of each kind, for the plans they make.
PLANNED = {
    "free": {},
    "begin": {"begin": "白日"},
    "wujue": {"form": "wujue"},
    "acrostic": {"acrostic": "春夏秋冬"},
    "couplet": {"couplet": "风声雨落"},
}


def test_a_free_poem_in_irregular_lines_is_penalised():
    """Lines of 5 or of 7, all alike, an even number of at least 4: else a free poem loses
    IRREGULAR_PENALTY; a poem whose shape a form, tune, couplet or acrostic set loses nothing."""

    def regular(poem):
        return sample.regular_lines(data.lines_of(poem))

    assert regular("白日依山尽，黄河入海流。欲穷千里目，更上一层楼。")
    assert regular("春江潮水连海平，海上明月共潮生。" * 3)  # six lines of 7
    irregular = {
        "two lines": "白日依山尽，黄河入海流。",
        "five lines": "白日依山尽，" * 4 + "黄河入海流。",
        "5 then 6 characters": "白日依山尽，黄河入海流水。" * 2,
        "lines of 4": "白日依山，黄河入海。" * 2,
    }
    for case, poem in irregular.items():
        assert not regular(poem), case
    poem = "白日依山尽，黄河入海流。"
    log_probs, written = np.full(12, -4.0), np.ones(12, bool)
    plain = sample.score_poem(poem, log_probs, written, None)
    assert sample.score_poem(poem, log_probs, written, None, free=True) == pytest.approx(
        plain - sample.IRREGULAR_PENALTY
    )
    # Two drafts of one poem: the likelier (by 0.5 nats a character) is two lines long. A free
    # request keeps the quatrain; a 五绝 (which fixes the lines itself) the likelier.
    vocab = ["G", "E", "，", "。", *dict.fromkeys(poem + "欲穷千里目更上一层楼春夏秋冬风声雨落")]
    plans = {key: sample.plan_request(vocab, PoemRequest(candidates=2, **asked)) for key, asked in PLANNED.items()}
    quatrain = "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"
    drafts, log_probs = [poem, quatrain], np.stack([np.full(24, -3.5), np.full(24, -4.0)])
    for key, kept in (("free", quatrain), ("wujue", poem)):
        assert sample.best_drafts(PoemRequest(candidates=2), plans[key], drafts, log_probs, None, True)[0] == [kept]
    # Which plans set the lines (a tune's: test_cipai, which has learned tunes).
    assert {key: sample.lines_are_set(plan) for key, plan in plans.items()} == {
        "free": False,
        "begin": False,
        "wujue": True,
        "acrostic": True,
        "couplet": True,
    }


def test_corpus_lines_are_read_once_then_from_the_cache(tmp_path, capsys, monkeypatch):
    path = tmp_path / "poems.txt"
    path.write_text("t:白日依山尽，黄河入海流。\nu:床前明月光，疑是地上霜。\n", encoding="utf-8")
    expected = {"白日依山尽", "黄河入海流", "床前明月光", "疑是地上霜"}
    assert sample.corpus_lines(path) == expected
    cached = list(sample.default_cache_dir().glob("lines-*.txt"))
    assert cached and any(set(c.read_text(encoding="utf-8").split("\n")) == expected for c in cached)

    def unread(*args, **kwargs):
        raise AssertionError("the poems file was parsed again")

    monkeypatch.setattr(sample.data, "read_corpus", unread)  # the second call must come from the cache
    assert sample.corpus_lines(path) == expected
    monkeypatch.undo()
    path.write_text("t:春眠不觉晓，处处闻啼鸟。\n", encoding="utf-8")  # a new file is read anew
    assert sample.corpus_lines(path) == {"春眠不觉晓", "处处闻啼鸟"}
    assert sample.corpus_lines(tmp_path / "missing.txt") is None
    assert "cannot penalise copied lines" in capsys.readouterr().err


@pytest.mark.slow  # a child process
def test_inference_reads_the_parameters_alone_and_never_imports_the_trainer(trained_run):
    """sample (and serve, evaluate and export, through it) restore the parameters without the
    optimizer state, so none of them imports the trainer or optax; the parameters equal a full
    restore's."""
    import subprocess
    import sys

    from tangshi_jax import checkpoint
    from tangshi_jax.train import init_state

    directory = trained_run[0]
    code = (
        "import sys, tangshi_jax.sample as s, tangshi_jax.serve, tangshi_jax.evaluate, tangshi_jax.export; "
        "import tangshi_jax.release as r; r.load_model(checkpoint_dir=sys.argv[1]); "
        "print(sorted(m for m in ('optax', 'tangshi_jax.train') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr[-2000:]
    params = release.load_model(checkpoint_dir=directory).params
    full = checkpoint.load_newest(
        directory, lambda meta: jax.eval_shape(lambda: init_state(meta.model_config, meta.train_config, 0))
    ).state
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(full["params"])
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(full["params"])):
        np.testing.assert_array_equal(a, b)


def test_a_free_poem_puts_marks_only_after_characters_and_ends_after_a_stop(loaded):
    """A model pushed to write marks and the end everywhere (its head's bias raised for them)
    still writes free poems whose marks each follow a Chinese character, that end after 。！？
    and hold no symbol that is neither (the corpus's □)."""
    _, model_config, vocab, params = loaded
    pushed = {char: 6.0 for char in "，。E"}
    bias = np.asarray(params["head"]["bias"]).copy()
    for char, amount in pushed.items():
        bias[vocab.index(char)] += amount
    params = {**params, "head": {**params["head"], "bias": bias}}
    _, logits = PoemModel(model_config).apply(
        {"params": params}, np.array([[vocab.index("G"), vocab.index("，")]], np.int32), initial_carry(model_config, 1)
    )
    unruled = jax.nn.softmax(logits[0, -1])
    assert float(unruled[vocab.index("，")] + unruled[vocab.index("。")] + unruled[vocab.index("E")]) > 0.9
    begin = words(vocab, 1)
    poems = sample.write_poems(params, model_config, vocab, PoemRequest(begin=begin, num=16, candidates=1, seed=3))
    assert len(poems) == 16
    for poem in poems:
        assert poem[-1] in rules.STOPS, poem
        for before, char in zip(poem, poem[1:]):
            assert is_hanzi(char) or (char in rules.PAUSES + rules.STOPS and is_hanzi(before)), poem


def test_free_order_bars_what_may_not_follow_each_token():
    vocab = ("，", "。", "E", "G", "春", "□", "？", "风")
    follows, bias = rules.free_order(vocab, np.array([is_hanzi(char) for char in vocab]))
    assert follows.tolist() == [
        rules.AFTER_PAUSE, rules.AFTER_STOP, rules.AFTER_PAUSE, rules.AFTER_PAUSE,
        rules.AFTER_CHAR, rules.AFTER_PAUSE, rules.AFTER_STOP, rules.AFTER_CHAR,
    ]  # fmt: skip
    allowed = lambda row: {char for char, b in zip(vocab, bias[row]) if b == 0}
    assert allowed(rules.AFTER_CHAR) == {"，", "。", "？", "春", "风"}
    assert allowed(rules.AFTER_PAUSE) == {"春", "风"}
    assert allowed(rules.AFTER_STOP) == {"春", "风", "E"}
    assert allowed(rules.NOT_FREE) == set(vocab)
