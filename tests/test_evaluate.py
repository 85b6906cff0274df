import json

import pytest

from tangshi_jax import evaluate
from tangshi_jax.errors import TangshiError, run_cli

# Simplified text, as the corpus and the model write it.
DENGGUANQUE = "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"  # 五绝, 王之涣
JINGYESI = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"  # 五绝 in form, a 古绝 in tones
CHUNXIAO = "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"  # 五绝 rhymed on 仄 tones
ZAOFA = "朝辞白帝彩云间，千里江陵一日还。两岸猿声啼不住，轻舟已过万重山。"  # 七绝, 李白
CHUNWANG = (
    "国破山河在，城春草木深。感时花溅泪，恨别鸟惊心。烽火连三月，家书抵万金。白头搔更短，浑欲不胜簪。"  # 五律, 杜甫
)
DENGGAO = (
    "风急天高猿啸哀，渚清沙白鸟飞回。无边落木萧萧下，不尽长江滚滚来。"
    "万里悲秋常作客，百年多病独登台。艰难苦恨繁霜鬓，潦倒新停浊酒杯。"
)  # 七律, 杜甫


@pytest.mark.parametrize(
    "poem, form", [(DENGGUANQUE, "wujue"), (ZAOFA, "qijue"), (CHUNWANG, "wulv"), (DENGGAO, "qilv")]
)
def test_form_of_real_poems(poem, form):
    assert evaluate.form_of(poem) == form


@pytest.mark.parametrize(
    "poem",
    [
        "",
        "白日依山尽，黄河入海流。",  # two lines
        "白日依山尽，黄河入海流。欲穷千里目，更上一层楼",  # no final 。
        "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。白",  # text after the last 。
        "白日依山尽。黄河入海流，欲穷千里目。更上一层楼，",  # 。 and ， swapped
        "白日依山尽，黄河入海流？欲穷千里目，更上一层楼。",  # other punctuation
        "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。欲穷千里目，更上一层楼。",  # six lines
        "白日依山尽，黄河入海流。欲穷千里目，更上一层楼高。",  # one line of six
        "白日依山A，黄河入海流。欲穷千里目，更上一层楼。",  # not a Chinese character
        DENGGAO[:-1] + "，" + DENGGAO[-1],
    ],
)
def test_form_of_rejects(poem):
    assert evaluate.form_of(poem) is None


def test_lines_of_drops_punctuation():
    assert evaluate.lines_of("春眠不觉晓，处处闻啼鸟！何处？") == ["春眠不觉晓", "处处闻啼鸟", "何处"]
    assert evaluate.lines_of("") == []


def test_distinct_counts_within_lines():
    assert evaluate.distinct(["春春，春。"], 1) == pytest.approx(1 / 3)
    assert evaluate.distinct(["春春，春。"], 2) == 1.0  # 春春 once; no bigram spans "，"
    # Over all poems of a row: 白日白云 + 白日 -> unigrams 3 unique of 6, bigrams 白日 白云 白日 -> 2 of 3.
    assert evaluate.distinct(["白日，白云。", "白日。"], 1) == pytest.approx(3 / 6)
    assert evaluate.distinct(["白日，白云。", "白日。"], 2) == pytest.approx(2 / 3)
    assert evaluate.distinct(["春，春。"], 2) is None


def test_repeated_4grams_within_a_poem():
    assert evaluate.repeated_share(DENGGUANQUE) == 0.0
    assert evaluate.repeated_share("白日依山尽，白日依山尽。") == 0.5  # 4 grams, the second line's 2 repeat
    assert evaluate.repeated_share("春春春春春，") == 0.5  # 春春春春 twice in one line
    assert evaluate.repeated_share("白日依，山尽白日依。") == 0.0  # grams never span lines
    assert evaluate.repeated_share("白日，山。") is None


def test_measure_hand_made_row():
    poems = ["白日依山尽，白日依山尽。白日依山尽，白日依山尽。", DENGGUANQUE, "春风。"]
    training_lines = {"白日依山尽", "黄河入海流"}
    row = evaluate.measure(poems, "wujue", training_lines)
    assert row["poems"] == 3
    assert row["form_valid"] == pytest.approx(2 / 3)
    assert row["rhyme_ok"] == pytest.approx(1 / 3)  # the repeated line ends in 尽, a 仄 character
    assert row["tones_ok"] == pytest.approx(1 / 3)
    assert row["copied_lines"] == pytest.approx(6 / 9)  # 4 + 2 of 9 lines
    assert row["repeated_4grams"] == pytest.approx((6 / 8 + 0) / 2)  # "春风" has no 4-gram
    assert row["mean_length"] == pytest.approx((20 + 20 + 2) / 3)
    # 42 characters in 9 lines, 22 of them distinct (4 distinct lines of 5 and 春风); 33 bigrams, 17 distinct.
    assert row["distinct_1"] == pytest.approx(22 / 42) and row["distinct_2"] == pytest.approx(17 / 33)
    assert evaluate.measure(poems, None, set())["form_valid"] == pytest.approx(2 / 3)  # any form
    assert evaluate.measure([], None, set())["form_valid"] is None


@pytest.mark.parametrize(
    "poem, rhymes, tones",
    [
        (DENGGUANQUE, True, True),
        (ZAOFA, True, True),
        (CHUNWANG, True, True),
        (DENGGAO, True, True),
        (JINGYESI, True, False),  # 月 and 上 at the 4th place are both 仄: a 古绝, not a regulated quatrain
        (CHUNXIAO, False, False),  # the checker knows only 平声 rhymes; 晓 鸟 少 are 仄
    ],
)
def test_checker_verdicts_on_known_poems(poem, rhymes, tones):
    assert evaluate.rhyme_ok(poem) is rhymes
    assert evaluate.tones_ok(poem) is tones


def test_checker_needs_traditional_text():
    verdict, message = evaluate.checker().check_poem_rhyming(DENGGUANQUE)  # 尽 is not in its tables, 盡 is
    assert not verdict and "ping or ze" in message
    assert evaluate.rhyme_ok(DENGGUANQUE)  # converted, it passes


def test_reference_poems_are_fixed_and_of_the_form():
    poems = [DENGGUANQUE, ZAOFA, JINGYESI, CHUNWANG, CHUNXIAO, "春风。"]
    chosen = evaluate.reference_poems(poems, "wujue", 2, seed=0)
    assert len(chosen) == 2 and all(evaluate.form_of(poem) == "wujue" for poem in chosen)
    assert chosen == evaluate.reference_poems(poems, "wujue", 2, seed=0)
    assert len(evaluate.reference_poems(poems, "wujue", 10, seed=0)) == 3
    assert evaluate.reference_poems(poems, "qilv", 10, seed=0) == []


def test_plot_writes_a_png(tmp_path):
    records = [
        {"epoch": 1, "train_loss": 3.0, "val_loss": 2.9},
        {"epoch": 2, "train_loss": 2.5, "val_loss": None},
        {"epoch": 3, "train_loss": 2.0, "val_loss": 2.2},
    ]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(record) + "\n" for record in records))
    evaluate.plot_losses(metrics, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(TangshiError, match="metrics.jsonl; train"):
        evaluate.plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(TangshiError, match="no epoch"):
        evaluate.plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png")


def test_free_sampling_and_validation_nll(trained_run, tmp_path, capsys):
    directory, poems_path, record = trained_run
    report = evaluate.evaluate_checkpoint(
        directory, poems_path, num=4, seed=0, settings=evaluate.SETTINGS[:1], log=lambda message: None
    )
    assert report["val_nll"] == pytest.approx(record["val_loss"], rel=1e-5)  # the split training used
    assert [row["setting"] for row in report["rows"]] == ["free"] + [f"corpus {form}" for form in evaluate.FORMS]
    free = report["rows"][0]
    assert free["poems"] == 4 and free["poems_per_s"] > 0
    assert 0 <= free["distinct_1"] <= 1 and free["copied_lines"] is not None

    json_path, plot_path = tmp_path / "report.json", tmp_path / "loss.png"
    argv = [
        "--checkpoint-dir",
        str(directory),
        "--data",
        str(poems_path),
        "--num",
        "4",
        "--settings",
        "free",
        "--json",
        str(json_path),
        "--plot",
        str(plot_path),
    ]
    assert run_cli(evaluate.main, argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("validation NLL") and "| free | 4 |" in out and "| corpus wujue |" in out
    assert json.loads(json_path.read_text())["rows"][0]["setting"] == "free"
    assert plot_path.read_bytes()[:4] == b"\x89PNG"


def test_unknown_setting_is_a_clear_error(trained_run, capsys):
    directory, poems_path, _ = trained_run
    assert run_cli(evaluate.main, ["--checkpoint-dir", str(directory), "--settings", "free,wujue+rhme"]) == 2
    assert "wujue+rhme" in capsys.readouterr().err


def test_form_settings_write_their_form(trained_run):
    directory, poems_path, _ = trained_run
    settings = [setting for setting in evaluate.SETTINGS if setting.form == "wujue" and not setting.topic]
    report = evaluate.evaluate_checkpoint(directory, poems_path, num=4, settings=settings, log=lambda message: None)
    for row in report["rows"][: len(settings)]:
        assert row["form_valid"] == 1.0


@pytest.mark.parametrize(
    "flags, message",
    [(["--temperature", "0"], "--temperature must be above 0"), (["--tunes", "21"], "--tunes must be 0 to 20")],
)
def test_bad_flags_are_refused_before_any_work(tmp_path, capsys, flags, message):
    argv = ["--checkpoint-dir", str(tmp_path / "none"), *flags]
    assert run_cli(evaluate.main, argv) == 2
    assert message in capsys.readouterr().err


def test_heads_ok_counts_acrostic_heads():
    figures = evaluate.measure([DENGGUANQUE, JINGYESI], "wujue", set(), heads="白黄欲更")
    assert figures["heads_ok"] == 0.5
    assert evaluate.measure([DENGGUANQUE], "wujue", set())["heads_ok"] is None


@pytest.mark.slow  # compiles a model for two lengths
def test_quatrain_perplexity_counts_the_characters_of_lines_2_to_4():
    import types

    import jax
    import numpy as np

    from tangshi_jax.config import ModelConfig
    from tangshi_jax.model import PoemModel, init_params, initial_carry

    quatrain5 = "G白日依山尽，黄河入海流。欲穷千里目，更上一层楼。E"
    titled7 = "早发G朝辞白帝彩云间，千里江陵一日还。两岸猿声啼不住，轻舟已过万重山。E"
    vocab = sorted(set(quatrain5 + titled7 + "春"))
    config = ModelConfig(vocab_size=len(vocab), hidden=8, embed=4)
    params = init_params(config, jax.random.key(0))
    dataset = types.SimpleNamespace(vocab=vocab, val_sequences=[quatrain5, titled7, "G春春春春春E"])
    result = evaluate.quatrain_perplexity(params, config, dataset, batch_size=4)

    def reference(sequence, chars):
        ids = np.array([vocab.index(c) for c in sequence])
        _, logits = PoemModel(config).apply({"params": params}, ids[None, :-1], initial_carry(config, 1))
        logits = np.asarray(logits[0], np.float64)
        nll = np.log(np.exp(logits).sum(-1)) - logits[np.arange(len(ids) - 1), ids[1:]]
        start = sequence.index("G")
        # Targets are the characters after G: line 1 and its comma are skipped, punctuation and E too.
        picked = [p for p in range(start + chars + 1, len(ids) - 1) if sequence[p + 1] not in "，。E"]
        assert len(picked) == 3 * chars
        return nll[picked].mean()

    assert set(result) == {"wujue", "qijue"} and result["wujue"]["poems"] == result["qijue"]["poems"] == 1
    assert result["wujue"]["nll"] == pytest.approx(reference(quatrain5, 5), rel=1e-5)
    assert result["qijue"]["nll"] == pytest.approx(reference(titled7, 7), rel=1e-5)
    assert result["qijue"]["ppl"] == pytest.approx(np.exp(result["qijue"]["nll"]))


@pytest.mark.slow  # compiles the sampler for four settings
def test_title_and_keyword_rows_measure_the_topic(titles_run):
    directory, poems_path = titles_run
    names = ["title", "title-baseline", "keywords", "qijue+rhyme+tones/best8"]
    settings = [setting for setting in evaluate.SETTINGS if setting.name in names]
    report = evaluate.evaluate_checkpoint(directory, poems_path, num=4, settings=settings, log=lambda message: None)
    rows = {row["setting"]: row for row in report["rows"]}
    assert all(0 <= rows[name]["on_topic"] <= 1 for name in names[:3]) and rows[names[3]]["on_topic"] is None
    assert rows[names[3]]["form_valid"] == rows[names[3]]["rhyme_ok"] == rows[names[3]]["tones_ok"] == 1.0
    assert report["untitled_char_nll"] is not None and report["val_char_nll"] is not None
    assert evaluate.measure(["春花，秋月。", "白日。"], None, set(), topics=["春雨", "夜"])["on_topic"] == 0.5
