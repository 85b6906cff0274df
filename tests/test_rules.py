import re
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

from tangshi_jax import pingshui, rules, sample
from tangshi_jax.config import ModelConfig
from tangshi_jax.errors import TangshiError
from tangshi_jax.model import init_params
from tangshi_jax.request import PoemRequest


def write(config, params, **options):
    """Poems of the untrained model, one draft each unless asked."""
    return sample.write_poems(params, config, VOCAB, PoemRequest(**{"candidates": 1, **options}))


with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the package imports the deprecated pkg_resources where it has it
    PingZeClassifier, PoemStructureChecker = pingshui.module().PingZeClassifier, pingshui.module().PoemStructureChecker

# Characters of many classes: level and oblique, several rhyme groups, a polyphonic one (看).
CHARS = "春花秋月何时了往事知多少小楼昨夜又东风故国不堪回首明中山水日红白云天地人看江南北长相思归来去"
VOCAB = ["G", "E", "，", "。"] + list(CHARS)
TO_TRADITIONAL = rules.to_traditional


@pytest.fixture(scope="module", params=["full", "adaptive"])
def untrained(request):
    """A model that knows nothing: whatever holds on its poems holds by construction. With
    either head: the adaptive one's tail clusters hold most of these characters."""
    config = ModelConfig(vocab_size=len(VOCAB), hidden=16, embed=8, head=request.param, cutoffs=(12, 30))
    return config, init_params(config, jax.random.key(0))


def test_tone_and_rhyme_arrays_agree_with_pingshui_rhyme():
    prosody = rules.build_prosody(tuple(VOCAB))
    classifier = PingZeClassifier()
    for index, char in enumerate(VOCAB):
        if not prosody.hanzi[index]:
            assert not (prosody.level[index] or prosody.oblique[index])
            continue
        kind = classifier.classify(TO_TRADITIONAL(char))[0]
        assert prosody.level[index] == (kind in ("ping", "polyphonic")), char
        assert prosody.oblique[index] == (kind in ("ze", "polyphonic")), char
    level = {char for char, is_level in zip(VOCAB, prosody.level) if is_level}
    assert {"东", "风", "红", "山"} <= level and not {"日", "月", "白"} & level
    group = {prosody.groups[g] for g in np.nonzero(prosody.rhymes[VOCAB.index("东")])[0]}
    assert group == {"一東"}
    assert prosody.rhymes[VOCAB.index("风")][prosody.groups.index("一東")]


def verse_lines(poem):
    return [line for line in re.split("[，。]", poem) if line]


@pytest.mark.parametrize("form", list(rules.FORMS))
def test_every_poem_has_its_form_with_rhyme_and_tones(untrained, form):
    config, params = untrained
    lines, chars = rules.FORMS[form]
    checker = PoemStructureChecker()
    poems = write(config, params, num=40, seed=1, form=form, rhyme=True, tones=True)
    for poem in poems:
        expected = "".join(f"[^，。]{{{chars}}}{'，' if i % 2 == 0 else '。'}" for i in range(lines))
        assert re.fullmatch(expected, poem), poem
        text = TO_TRADITIONAL(poem)
        assert checker.check_poem_rhyming(text)[0], (poem, checker.check_poem_rhyming(text))
        assert checker.check_poem_pingze_meter(text)[0], (poem, checker.check_poem_pingze_meter(text))


@pytest.mark.slow  # compiles the sampler for two more forms
def test_plain_forms_and_loose_tones_keep_the_shape(untrained):
    config, params = untrained
    checker = PoemStructureChecker()
    plain = write(config, params, num=20, seed=2, form="wujue")
    assert all(len(verse_lines(p)) == 4 and all(len(v) == 5 for v in verse_lines(p)) for p in plain)
    loose = write(config, params, num=30, seed=3, form="qilv", tones=True, loose_tones=True)
    assert all(checker.check_poem_pingze_meter(TO_TRADITIONAL(p))[0] for p in loose)


def test_acrostic_heads_and_rhyme_group(untrained):
    config, params = untrained
    poems = write(
        config,
        params,
        num=20,
        seed=4,
        acrostic="春夏秋冬".replace("夏", "花").replace("冬", "月"),
        line_length=5,
        rhyme_group="东",
    )
    prosody = rules.build_prosody(tuple(VOCAB))
    east = prosody.groups.index("一東")
    for poem in poems:
        heads = [line[0] for line in verse_lines(poem)]
        assert heads == list("春花秋月") and all(len(v) == 5 for v in verse_lines(poem))
        for line in verse_lines(poem)[1::2]:  # even lines end in the 东 group
            assert prosody.rhymes[VOCAB.index(line[-1]), east]


def test_begin_with_a_form(untrained):
    config, params = untrained
    for poem in write(config, params, begin="春花", num=5, form="qijue"):
        assert poem.startswith("春花") and len(verse_lines(poem)) == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(acrostic="春花秋"), "has 3 characters but qijue has 4 lines"),
        (dict(acrostic="春花秋夏"), "'夏' is not in the model's vocabulary"),
        (dict(form="wulv", acrostic="春花秋月"), "wulv has 8 lines"),
        (dict(rhyme=True), "need a --form"),
        (dict(acrostic="春花秋月", form="wujue", begin="秋"), "--begin must start with the first --acrostic"),
        (dict(form="wujue", begin="春花秋月何时"), "more than a line of wujue"),
        (dict(form="qilv", max_len=40), "--max-len 40 is too short"),
        (dict(form="wujue", rhyme_group="日"), "no level-tone"),
        (dict(form="wujue", rhyme_group="东风"), "takes one character"),
    ],
)
def test_bad_rule_requests_are_clear_errors(untrained, kwargs, message):
    config, params = untrained
    with pytest.raises(TangshiError, match=message):
        write(config, params, **kwargs)


def test_form_names_accept_chinese_and_free():
    assert PoemRequest.checked(form="七律").form == "qilv" and PoemRequest.checked(form="wujue").form == "wujue"
    assert PoemRequest.checked(form="free").form is None
    with pytest.raises(TangshiError, match="--form must be one of free, wujue"):
        PoemRequest.checked(form="sonnet")


@pytest.mark.slow  # a child process
def test_the_checker_works_where_setuptools_has_no_pkg_resources():
    """setuptools 82 has no pkg_resources, which pingshui-rhyme imports; a later install that
    brings it (PyTorch's does) must not break evaluate's checker, and no stand-in stays behind."""
    code = (
        "import sys\n"
        "sys.modules['pkg_resources'] = None  # as if setuptools had none: importing it fails\n"
        "from tangshi_jax import evaluate\n"
        "rhymes = lambda poem: evaluate.checker().check_poem_rhyming(evaluate.to_traditional(poem))[0]\n"
        "assert rhymes('白日依山尽，黄河入海流。欲穷千里目，更上一层楼。')\n"
        "assert not rhymes('白日依山尽，黄河入海流。欲穷千里目，更上一层天。')\n"
        "assert 'pkg_resources' not in sys.modules, sys.modules.get('pkg_resources')\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
