"""词 to a tune: 词林正韵 on hand-checked characters, and templates learned from small sets of 词."""

import subprocess
import sys

import pytest

from tangshi_jax import cipai
from tangshi_jax.errors import run_cli
from tangshi_jax.sample import main as sample_main

# Six 浣溪沙 and six 菩萨蛮 of the 全宋词 (the corpus's own text and marks).
HUANXISHA = [
    "轻屉来时不破尘。石榴花映石榴裙。有情应得撞腮春。夜短更难留远梦，日高何计学行云。树深莺过静无人。",
    "楼倚春江百尺高。烟中还未见归桡。几时期信似江潮。花片片飞风弄蝶，柳阴阴下水平桥。日长才过又今宵。",
    "阆苑瑶台风露秋。整鬟凝思捧觥筹。欲归临别强迟留。月好谩成孤枕梦，酒阑空得两眉愁。此时情绪悔风流。",
    "三月和风满上林。牡丹妖艳直千金。恼人天气又春阴。为我转回红脸面，向谁分付紫檀心。有情须殢酒杯深。",
    "青杏园林著酒香。佳人初试薄罗裳。柳丝无力燕飞忙。乍雨乍晴花自落，闲愁闲闷日偏长。为谁消瘦减容光。",
    "一曲新词酒一杯。去年天气旧亭台。夕阳西下几时回。无可奈何花落去，似曾相识燕归来。小园香径独徘徊。",
]
PUSAMAN = [
    "忆郎还上层楼曲。楼前芳草年年绿。绿似去时袍。回头风袖飘。郎袍应已旧。颜色非长久。惜恐镜中春。不如花草新。",
    "闻人语著仙卿字。瞋情恨意还须喜。何况草长时。酒前频共伊。娇香堆宝帐。月到梨花上。心事两人知。掩灯罗幕垂。",
    "夜深不至春蟾见。令人更更情飞乱。翠幕动风亭。时疑响屉声。花香闻水榭。几误飘衣麝。不忍下朱扉。绕廊重待伊。",
    "簟纹衫色娇黄浅。钗头秋叶玲珑翦。轻怯瘦腰身。纱窗病起人。相思魂欲绝。莫话新秋别。何处断离肠。西风昨夜凉。",
    "玉人又是匆匆去。马蹄何处垂杨路。残日倚楼时。断魂郎未知。阑干移倚遍。薄幸教人怨。明月却多情。随人处处行。",
    "佳人学得平阳曲。纤纤玉笋横孤竹。一弄入云声。海门江月清。髻摇金钿落。惜恐樱唇薄。听罢已依依。莫吹杨柳枝。",
]
# 龙榆生《唐宋词格律》, entered by hand: ⊙ (中) either tone, (韵) a rhyme.
HUANXISHA_CIPU = "中仄中平中仄平中平中仄仄平平中平中仄仄平平中仄中平平仄仄中平中仄仄平平中平中仄仄平平"


@pytest.mark.parametrize(
    "char, bu, tone",
    [
        ("东", 1, "平"),
        ("阳", 2, "平"),
        ("鱼", 4, "平"),
        ("歌", 9, "平"),
        ("花", 10, "平"),
        ("生", 11, "平"),
        ("秋", 12, "平"),
        ("心", 13, "平"),
        ("南", 14, "平"),
        ("屋", 15, "仄"),
        ("药", 16, "仄"),
        ("国", 17, "仄"),
        ("月", 18, "仄"),
        ("合", 19, "仄"),
        # the divided groups: 十灰, 十一队, 十三元, 十三阮, 十四愿, 十卦
        ("回", 3, "平"),
        ("梅", 3, "平"),
        ("来", 5, "平"),
        ("开", 5, "平"),
        ("对", 3, "仄"),
        ("代", 5, "仄"),
        ("爱", 5, "仄"),
        ("门", 6, "平"),
        ("魂", 6, "平"),
        ("元", 7, "平"),
        ("言", 7, "平"),
        ("本", 6, "仄"),
        ("远", 7, "仄"),
        ("恨", 6, "仄"),
        ("万", 7, "仄"),
        ("卖", 5, "仄"),
        ("画", 10, "仄"),
        ("话", 10, "仄"),
    ],
)
def test_cilin_bu_of_hand_checked_characters(char, bu, tone):
    rhymes = cipai.build_ci_rhymes((char,))
    assert (rhymes.level if tone == "平" else rhymes.oblique)[0, bu - 1]
    if char in "回梅来开对代爱门魂元言本远恨万卖":  # a character of a divided group falls on one side only
        assert (rhymes.level | rhymes.oblique)[0].sum() == 1


def test_a_rising_and_a_departing_tone_rhyme_together_and_entering_tones_stand_apart():
    rhymes = cipai.build_ci_rhymes(("董", "送", "屋", "东"))
    assert rhymes.oblique[0, 0] and rhymes.oblique[1, 0] and rhymes.level[3, 0]  # 部 1: 董 送 with 东
    assert not rhymes.oblique[2, 0] and rhymes.oblique[2, 14]  # 屋 in 部 15 alone


def learned(tune, texts):
    tunes = cipai.learn_tunes([tune] * len(texts), texts)
    assert [t.name for t in tunes] == [tune]
    return tunes[0]


def test_huanxisha_is_learned_as_the_published_cipu_has_it():
    tune = learned("浣溪沙", HUANXISHA)
    assert tune.lines == ((7, "。"), (7, "。"), (7, "。"), (7, "，"), (7, "。"), (7, "。"))
    assert tune.second_half == 3 and (tune.fit, tune.exact) == (1.0, 1.0)
    assert tune.rhymes == (0, 0, 0, -1, 0, 0) and tune.rhyme_tones == ("平",)
    fixed = [(ours, theirs) for ours, theirs in zip(tune.tones, HUANXISHA_CIPU) if ours != "中" and theirs != "中"]
    assert len(fixed) >= 15 and all(ours == theirs for ours, theirs in fixed)
    assert tune.pattern().count("(平韵)。") == 5 and tune.pattern().count(" | ") == 1


def test_pusaman_changes_rhyme_every_two_lines():
    tune = learned("菩萨蛮", PUSAMAN)
    assert [length for length, _ in tune.lines] == [7, 7, 5, 5, 5, 5, 5, 5]
    assert tune.rhymes == (0, 0, 1, 1, 2, 2, 3, 3) and tune.rhyme_tones == ("仄", "平", "仄", "平")
    assert "(仄韵A)" in tune.pattern() and "(平韵D)" in tune.pattern()


def test_a_position_where_the_ci_disagree_is_free_and_two_reading_characters_do_not_vote():
    readings = {"平": {"平"}, "仄": {"仄"}, "看": {"平", "仄"}}
    texts = ["平平看", "平仄看", "平平看", "平仄看", "平平看", "平仄看"]
    assert cipai.position_tones(texts, readings) == "平中中"
    assert cipai.position_tones(texts[:4], readings)[0] == "中"  # 4 votes: fewer than MIN_TONE_VOTES
    agreeing = ["仄仄仄", "仄仄仄", "仄仄仄", "仄仄仄", "仄仄仄", "平仄仄"]  # 5 of 6 agree at the first
    assert cipai.position_tones(agreeing, readings) == "仄仄仄"


def test_a_tune_with_varying_commas_keeps_its_rhyme_to_rhyme_lengths():
    """Four 词 rhyme at the same places, with commas in two patterns; a fifth is another shape."""
    a = "春风吹过小桥东，花开满树红。明月照人归去晚，江上晚潮通。"
    b = "春风吹过，小桥东花开满树红。明月照人，归去晚江上晚潮通。"
    odd = "春风吹过小桥东。花开满树红。明月照人归去晚，江上潮通。"
    tune = learned("江城子", [a, a, a, b, odd])
    assert tune.lines == cipai.shape_of(a) and (tune.fit, tune.exact) == (0.8, 0.6)
    assert cipai.rhyme_chunks(cipai.shape_of(a)) == cipai.rhyme_chunks(cipai.shape_of(b)) == (12, 12)


def test_tunes_names_shapes_and_no_tune():
    assert cipai.tune_of("木兰花・玉楼春") == "木兰花" and cipai.tune_of("失调名") is None
    assert cipai.shape_of("一曲新词酒一杯。去年、天气旧亭台") is None  # ends without a mark
    assert cipai.shape_of("曳一缕、轻烟缥缈。") == ((3, "、"), (4, "。"))
    assert cipai.learn_tunes(["失调名"] * 6, HUANXISHA) == []
    assert cipai.learn_tunes(["浣溪沙"] * 4, HUANXISHA[:4]) == []  # fewer than MIN_CI


def test_list_tunes_prints_each_tune_and_a_missing_file_is_one_line(tmp_path, capsys):
    lines = [f"浣溪沙:{text}" for text in HUANXISHA] + [f"菩萨蛮:{text}" for text in PUSAMAN]
    (tmp_path / "poems.ci.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert run_cli(sample_main, ["--list-tunes", "--data", str(tmp_path / "poems.txt")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("2 tunes with 5 or more 词") and len(out) == 3
    assert out[1].startswith("浣溪沙\t6 词, 100% fit\t") and out[2].startswith("菩萨蛮\t6 词")
    assert run_cli(sample_main, ["--list-tunes", "--data", str(tmp_path / "none" / "poems.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "poems.ci.txt: no such file" in err[0] and "--part ci" in err[0]
    # A reader that stops early (`| head -1`) ends the command quietly.
    head = subprocess.run(
        f"{sys.executable} -m tangshi_jax.sample --list-tunes --data {tmp_path / 'poems.txt'} | head -c 10",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert head.stdout and "Traceback" not in head.stderr and "BrokenPipe" not in head.stderr


# --- writing to a tune --------------------------------------------------------------------


@pytest.fixture(scope="module")
def ci_model():
    """An untrained model whose vocabulary holds the fixtures' characters: whatever holds on
    its 词 holds by construction. The marks include 、 so that a pause can be written."""
    import jax

    from tangshi_jax.config import ModelConfig
    from tangshi_jax.model import init_params

    chars = sorted({char for text in HUANXISHA + PUSAMAN for char in text if char not in "，。、"})
    vocab = ["G", "E", "，", "。", "、"] + chars
    config = ModelConfig(vocab_size=len(vocab), hidden=16, embed=8)
    tunes = {"浣溪沙": learned("浣溪沙", HUANXISHA), "菩萨蛮": learned("菩萨蛮", PUSAMAN)}
    return config, init_params(config, jax.random.key(0)), vocab, tunes


def write_ci(ci_model, **options):
    from tangshi_jax.request import PoemRequest
    from tangshi_jax.sample import write_poems

    config, params, vocab, tunes = ci_model
    return write_poems(params, config, vocab, PoemRequest(**{"candidates": 1, **options}), tunes=tunes)


def check_ci(text: str, tune: cipai.Tune, tones: bool) -> None:
    """The 词 has the tune's lines and marks, rhymes in one 词林正韵 group per rhyme set in the
    set's tone, and (tones) a character of the wanted tone wherever the template fixes one."""
    from tangshi_jax import rules

    assert cipai.shape_of(text) == tune.lines, text
    bare = "".join(cipai.LINE.sub(r"\1", text))
    table = cipai.cilin_table()
    ends, position = [], 0
    for length, _ in tune.lines:
        position += length
        ends.append(position - 1)
    for rhyme_set, tone in enumerate(tune.rhyme_tones):
        members = [bare[ends[i]] for i, s in enumerate(tune.rhymes) if s == rhyme_set]
        shared = set.intersection(*(table.get(rules.to_traditional(char), set()) for char in members))
        assert any(t == tone for _, t in shared), (text, rhyme_set, members)
    if tones:
        readings = cipai.tones_of_chars(bare)
        for char, wanted in zip(bare, tune.tones):
            assert wanted == "中" or wanted in readings[char], (text, char, wanted)


@pytest.mark.parametrize("tune_name, tones", [("浣溪沙", True), ("菩萨蛮", True), ("菩萨蛮", False)])
def test_every_ci_fits_its_tune(ci_model, tune_name, tones):
    tune = ci_model[3][tune_name]
    texts = write_ci(ci_model, tune=tune_name, tones=tones, num=30, seed=3)
    assert len(texts) == 30 and len(set(texts)) > 20
    for text in texts:
        check_ci(text, tune, tones)


def test_a_tune_takes_the_length_it_needs_and_reads_a_begin_text(ci_model):
    tune = ci_model[3]["浣溪沙"]
    texts = write_ci(ci_model, tune="浣溪沙", begin="一曲", num=4, seed=5, max_len=10)  # 48 > 10: the tune wins
    assert all(text.startswith("一曲") and len(text) == cipai.tune_length(tune) for text in texts)
    # The tune fixes the lines, so the reranker does not judge them as a free poem's.
    from tangshi_jax.request import PoemRequest
    from tangshi_jax.sample import lines_are_set, plan_request

    config, params, vocab, tunes = ci_model
    assert lines_are_set(plan_request(vocab, PoemRequest(tune="浣溪沙"), tunes=tunes))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"tune": "满江红"}, "--tune '满江红' is not a tune learned from the corpus; the commonest are 浣溪沙"),
        ({"tune": "浣溪沙", "form": "qijue"}, "--tune sets the lines and rhymes itself"),
        ({"tune": "浣溪沙", "acrostic": "春夏秋冬"}, "--tune sets the lines and rhymes itself"),
        ({"tune": "浣溪沙", "begin": "一曲新词酒一杯多"}, "more than the first line of 浣溪沙 (7)"),
    ],
)
def test_bad_tune_requests_are_one_clear_line(ci_model, options, message):
    from tangshi_jax.errors import TangshiError

    with pytest.raises(TangshiError) as raised:
        write_ci(ci_model, **options)
    assert message in raised.value.worded() and "\n" not in raised.value.worded()


def test_the_product_check_names_each_broken_rule(ci_model):
    tune = ci_model[3]["浣溪沙"]
    good = HUANXISHA[3]  # 林 金 阴 心 深: 部 13 throughout
    assert cipai.check(good, tune) == {"lines": True, "rhyme": True, "tones": True}
    assert not cipai.check(good.replace("恼人天气又春阴", "恼人天气又春"), tune)["lines"]  # a character short
    assert not cipai.check(good.replace("。", "，", 1), tune)["lines"]  # a rhyme's mark lost
    assert cipai.check(good.replace("直千金", "直千年"), tune)["rhyme"] is False  # 年 is 部 7
    assert cipai.check(good.replace("三月和风", "三月和日"), tune)["tones"] is False  # 日 is oblique at a fixed 平


def test_evaluates_tune_rows_fit_and_the_held_out_ci_are_measured(ci_model, tmp_path):
    from tangshi_jax import evaluate_forms, release
    from tangshi_jax.config import TrainConfig
    from tangshi_jax.request import PoemRequest

    config, params, vocab, tunes = ci_model
    model = release.Loaded(config, TrainConfig(val_fraction=0.4), vocab, params, {"step": 0, "epoch": 0, "batch": 0})
    rows = evaluate_forms.tune_rows(model, tunes, 20, 12, 0, PoemRequest())
    assert [row["setting"] for row in rows] == ["词 浣溪沙", "词 菩萨蛮"]  # the common tunes this corpus taught
    assert all(row["poems"] == 12 and row["lines_ok"] == row["rhyme_ok"] == row["tones_ok"] == 1.0 for row in rows)
    data_path = tmp_path / "poems.txt"
    (tmp_path / "poems.ci.txt").write_text(
        "".join(f"浣溪沙:{text}\n" for text in HUANXISHA)
        + "".join(f"菩萨蛮:{text}\n" for text in PUSAMAN)
        + "菩萨蛮:你好。\n",
        encoding="utf-8",
    )
    measured = evaluate_forms.ci_validation(model, data_path)
    assert 0 < measured["ci"] < 12 and measured["readable"] == measured["ci"]  # the split's 词, all readable
    assert 4 < measured["char_nll"] < 8  # an untrained model: about log(V) = log(120) = 4.8
    assert evaluate_forms.ci_validation(model, tmp_path / "elsewhere" / "poems.txt") is None
