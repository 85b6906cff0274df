"""Couplets: the 下联 mirrors its 上联's clauses, opposes its tones and repeats only where it repeats.

Checked against pingshui-rhyme's own classifier, not the sampler's tables."""

import jax
import numpy as np
import pytest
from helpers import couplet_answers as answers
from helpers import tone_reading as reading

from tangshi_jax import couplet, evaluate_forms, release, rules, sample
from tangshi_jax.config import ModelConfig, TrainConfig
from tangshi_jax.errors import TangshiError
from tangshi_jax.model import init_params
from tangshi_jax.request import PoemRequest

FIRSTS = evaluate_forms.COUPLET_FIRSTS  # ten 上联 ending oblique: plain, two clauses, repeats
OTHERS = "春花秋月何时了往事知多少小楼昨夜又东风故国不堪回首中水红云天地人看江南北长相思归来去" + (
    "清泉石上流家事天下关心比邻客舍青柳色新万里悲常作百年多病独登台千山鸟飞绝径踪灭孤舟蓑笠翁寒雪"
)
VOCAB = ["G", "E", "，", "。"] + sorted(set("".join(FIRSTS) + OTHERS) - set("，"))


@pytest.fixture(scope="module")
def untrained():
    """A model that knows nothing: whatever holds on its couplets holds by construction."""
    config = ModelConfig(vocab_size=len(VOCAB), hidden=16, embed=8)
    return config, init_params(config, jax.random.key(0))


def write(untrained, **options):
    config, params = untrained
    return sample.write_poems(params, config, VOCAB, PoemRequest(**{"candidates": 1, **options}))


def test_a_hundred_couplets_from_ten_firsts_keep_every_rule(untrained):
    kept = 0
    for index, first in enumerate(FIRSTS):
        written = write(untrained, couplet=first, num=10, seed=index)
        assert len(set(written)) > 5, written
        for poem in written:
            upper, lower = sample.poem_lines(poem, PoemRequest(couplet=first))
            assert upper == first + "，", poem
            assert answers(upper, lower), poem
            assert couplet.check(upper, lower) == {"shape": True, "tones": True, "repeats": True}, poem
            kept += 1
    assert kept == 100


def test_every_position_with_tones_opposes_every_certain_tone(untrained):
    first = "两个黄鹂鸣翠柳"
    for poem in write(untrained, couplet=first, tones=True, num=10, seed=1):
        lower = poem[len(first) + 1 :]
        for a, b in zip(first, lower):
            if reading(a) in ("ping", "ze"):
                assert reading(b) in ("polyphonic", "ze" if reading(a) == "ping" else "ping"), poem
        assert couplet.check(first + "，", lower, every_position=True)["tones"], poem


def test_the_template_mirrors_repeats_and_fixes_the_checked_positions():
    shape = couplet.parse("风声雨声读书声，声声入耳。")
    assert shape == couplet.Shape(("风声雨声读书声", "声声入耳"), ("，",))
    prosody = rules.build_prosody(tuple(VOCAB))
    end_id = VOCAB.index("E")
    marks = sample.mark_ids(VOCAB, "a couplet")
    kind, forced, tones, copy_from, fresh = couplet.couplet_template(shape, VOCAB, prosody, 40, end_id, marks, False)
    answer = len("风声雨声读书声，声声入耳，") + 1
    assert [VOCAB[i] for i in forced[1:answer]] == list("风声雨声读书声，声声入耳，")
    # 声 at 2, 4, 7, 9, 10 of the 上联 (1-based) copies the 下联's 2nd character; 耳 ends it level
    assert [int(p) - answer + 1 for p in np.nonzero(copy_from >= 0)[0]] == [4, 7, 9, 10]
    assert set(copy_from[copy_from >= 0]) == {answer + 1}
    assert list(np.nonzero(fresh)[0] - answer + 1) == [1, 2, 3, 5, 6, 11, 12]
    assert tones[answer + 1] == rules.OBLIQUE  # 声 is level: the 2nd character answers oblique
    assert tones[answer + 2] == rules.ANY  # the 3rd is free
    assert tones[answer + 11] == rules.LEVEL and VOCAB[forced[answer + 12]] == "。" and forced[answer + 13] == end_id
    assert kind[answer + 12] == rules.FORCED and kind[answer] == rules.CHAR


@pytest.mark.parametrize(
    "options, message",
    [
        ({"couplet": "abc"}, "--couplet needs Chinese characters, clauses parted by ，; got 'abc' (not Chinese: a b"),
        ({"couplet": "，，"}, "--couplet needs Chinese characters"),
        ({"couplet": "春风，，得意"}, "has clauses of 2,0,2 characters"),
        ({"couplet": "一二三四五六七八九十百千"}, "has clauses of 12 characters; give 1 to 4 clauses of 1 to 11"),
        ({"couplet": "明月松间照，清泉石上流"}, "--couplet ends on '流', a level (平) tone"),
        ({"couplet": "海内存知己", "form": "wujue"}, "--couplet sets the 下联's shape itself: leave out --form"),
        ({"couplet": "海内存知己", "begin": "天"}, "leave out --form, --tune, --acrostic, --begin"),
        ({"couplet": "海内存知鹅"}, "--couplet holds 鹅, which this model never saw"),
    ],
)
def test_a_first_line_that_takes_no_answer_is_one_clear_line(untrained, options, message):
    with pytest.raises(TangshiError) as raised:
        write(untrained, **options)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert "couplet" in raised.value.worded(lambda name: name)  # the API names its field


def test_the_product_check_catches_each_broken_rule():
    assert couplet.check("海内存知己，", "天涯若比邻。") == {"shape": True, "tones": True, "repeats": True}
    assert not couplet.check("海内存知己，", "天涯若比邻")["shape"]  # no 。
    assert not couplet.check("海内存知己，", "天涯若比。")["shape"]  # a character short
    assert not couplet.check("海内存知己，", "天涯若比里。")["tones"]  # ends oblique
    assert not couplet.check("海内存知己，", "天涯存比邻。")["repeats"]  # 存 of the 上联
    assert not couplet.check("花花草草，", "年岁岁年。")["repeats"]  # repeats where the 上联 does not
    assert couplet.check("花花草草，", "年年岁岁。")["repeats"]


def test_evaluates_couplet_row_checks_every_couplet_and_measures_the_answers_only(untrained):
    config, params = untrained
    model = release.Loaded(config, TrainConfig(), VOCAB, params, {"step": 0, "epoch": 0, "batch": 0})
    row = evaluate_forms.couplet_row(model, 30, 0, PoemRequest())
    assert row["poems"] == 30 and row["lines_ok"] == row["tones_ok"] == row["repeats_ok"] == 1.0
    assert row["rhyme_ok"] is None and row["examples"][0].startswith(FIRSTS[0])
    assert len(row["texts"]) == 30 and not any(text.startswith(FIRSTS[0]) for text in row["texts"])  # the 下联


def test_a_clause_mark_the_model_never_saw_is_written_as_a_comma(untrained):
    assert "；" not in VOCAB
    for poem in write(untrained, couplet="春风；秋月", num=3, seed=2):
        upper, lower = sample.poem_lines(poem, PoemRequest(couplet="春风；秋月"))
        assert upper == "春风，秋月，" and lower[2] == "，" and lower.endswith("。"), poem
