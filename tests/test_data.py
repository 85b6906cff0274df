import collections
import itertools
import random

import numpy as np
import pytest

from tangshi_jax import data
from tangshi_jax.errors import TangshiError


def original_process_poems(file_name):
    """The original program's parser, as a reference (its sort by length and its pad char aside)."""
    poems = []
    with open(file_name, encoding="utf-8") as f:
        for line in f.readlines():
            try:
                title, content = line.strip().split(":")
                content = content.replace(" ", "")
                if (
                    "_" in content
                    or "(" in content
                    or "（" in content
                    or "《" in content
                    or "[" in content
                    or "G" in content
                    or "E" in content
                ):
                    continue
                if len(content) < 5 or len(content) > 80:
                    continue
                poems.append("G" + content + "E")
            except ValueError:
                pass
    return poems


@pytest.mark.parametrize(
    "line, expected",
    [
        ("静夜思:床前明月光，疑是地上霜。", "G床前明月光，疑是地上霜。E"),
        ("t: 床 前 明 月 光 ", "G床前明月光E"),  # spaces removed before the length test
        ("t:五个字啊呀", "G五个字啊呀E"),  # 5 characters: kept
        ("t:四个字啊", None),  # 4: too short
        ("t:" + "字" * 80, "G" + "字" * 80 + "E"),  # 80: kept
        ("t:" + "字" * 81, None),  # 81: too long
        ("t:床前明月光_疑是", None),
        ("t:床前明月光(疑是", None),
        ("t:床前明月光（疑是", None),
        ("t:床前明月光《疑是", None),
        ("t:床前明月光[疑是", None),
        ("t:床前明月光G疑是", None),
        ("t:床前明月光E疑是", None),
        ("t:床前明月光]疑是", "G床前明月光]疑是E"),  # only the opening bracket is a rule
    ],
)
def test_parse_line_rules(line, expected):
    assert data.parse_line(line) == expected


@pytest.mark.parametrize("line", ["no colon here at all", "a:b:床前明月光疑是", ""])
def test_parse_line_rejects_lines_without_exactly_one_colon(line):
    with pytest.raises(ValueError):
        data.parse_line(line)


def test_read_corpus_matches_original_parser(tmp_path):
    lines = [
        "静夜思:床前明月光，疑是地上霜。举头望明月，低头思故乡。",
        "坏行没有冒号",
        "a:b:c",
        "短:四个字啊",
        "括号:床前明月光（注）疑是地上霜。",
        "空 格:春 眠 不 觉 晓 ， 处 处 闻 啼 鸟 。",
        "长:" + "风" * 81,
        "英文:床前明月光GOOD疑是地上霜。",
        "好:白日依山尽，黄河入海流。",
    ]
    path = tmp_path / "poems.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    corpus = data.read_corpus(path)
    assert corpus.poems == original_process_poems(path)
    assert len(corpus.poems) == 3
    assert corpus.unparsable == 2 and corpus.first_unparsable == 2
    assert corpus.skipped == 4


def test_read_corpus_tolerates_bom_and_crlf(tmp_path):
    path = tmp_path / "poems.txt"
    path.write_bytes(b"\xef\xbb\xbf" + "一:白日依山尽，黄河入海流。\r\n二:春眠不觉晓，处处闻啼鸟。\r\n".encode())
    assert data.read_corpus(path).poems == ["G白日依山尽，黄河入海流。E", "G春眠不觉晓，处处闻啼鸟。E"]


def test_read_corpus_names_the_undecodable_line(tmp_path):
    path = tmp_path / "poems.txt"
    path.write_bytes("一:白日依山尽，黄河入海流。\n".encode() + "二:春眠不觉晓".encode("gbk") + b"\n")
    with pytest.raises(TangshiError, match=r"poems.txt:2: not UTF-8"):
        data.read_corpus(path)


def test_read_corpus_without_usable_poems_is_an_error(tmp_path):
    path = tmp_path / "poems.txt"
    path.write_text("短:四个字啊\nno colon\n", encoding="utf-8")
    with pytest.raises(TangshiError, match="no usable poem"):
        data.read_corpus(path)
    with pytest.raises(TangshiError, match="no such file"):
        data.read_corpus(tmp_path / "missing.txt")


def test_vocab_by_descending_frequency_with_ties_by_character():
    poems = ["G春春春花花月E", "G月花春E"]
    vocab = data.build_vocab(poems)
    assert vocab == ["春", "花", "E", "G", "月"]  # 4, 3, then E, G, 月 tie at 2 and sort by character
    assert data.build_vocab(list(reversed(poems))) == vocab


def test_encode_and_shift_follow_the_original():
    inputs, targets = data.shift(np.array([6, 2, 4, 6, 9]))
    # The original's targets are [2, 4, 6, 9, 9]; the final E -> E pair is dropped.
    assert inputs.tolist() == [6, 2, 4, 6] and targets.tolist() == [2, 4, 6, 9]
    vocab = ["G", "E", "春", "风"]
    assert data.encode(["G春风E"], vocab)[0].tolist() == [0, 2, 3, 1]
    with pytest.raises(TangshiError, match="'雨'"):
        data.encode(["G春雨E"], vocab)


def test_validation_split_is_stable_when_poems_are_added():
    poems = [f"G第{i}首诗E" for i in range(2000)]
    train, val = data.split(poems, 0.1)
    assert 120 < len(val) < 280 and len(train) + len(val) == 2000
    more_train, more_val = data.split(poems + [f"G新{i}E" for i in range(500)], 0.1)
    assert set(val) <= set(more_val) and set(train) <= set(more_train)


def brute_force_padding(lengths, num_buckets):
    sizes, counts = sorted(set(lengths)), collections.Counter(lengths)
    best = None
    for ends in itertools.combinations(sizes[:-1], min(num_buckets, len(sizes)) - 1):
        buckets = list(ends) + [sizes[-1]]
        padding = sum(counts[s] * (min(b for b in buckets if b >= s) - s) for s in sizes)
        best = padding if best is None else min(best, padding)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_choose_buckets_minimises_padding(seed):
    rng = random.Random(seed)
    lengths = [rng.choice(range(6, 30)) for _ in range(rng.randint(1, 60))]
    buckets = data.choose_buckets(lengths, 4)
    padding = sum(min(b for b in buckets if b >= n) - n for n in lengths)
    assert buckets[-1] == max(lengths) and len(buckets) <= 4
    assert padding == brute_force_padding(lengths, 4)


def test_batches_cover_every_poem_once_with_fixed_shapes():
    rng = np.random.default_rng(0)
    encoded = [rng.integers(0, 9, size=n) for n in rng.integers(6, 30, size=103)]
    buckets = data.choose_buckets([len(t) - 1 for t in encoded], 3)
    bucketed = data.bucketize(encoded, buckets, start_id=99, end_id=0, is_char=np.ones(9, bool))
    plan = data.epoch_plan(bucketed, 10, seed=1, epoch=0)

    def listed(plan):
        return [(bucket_index, rows.tolist()) for bucket_index, rows in plan]

    assert listed(plan) == listed(data.epoch_plan(bucketed, 10, seed=1, epoch=0))  # a pure function
    assert listed(plan) != listed(data.epoch_plan(bucketed, 10, seed=1, epoch=1))
    seen, real = [], 0
    for bucket_index, rows in plan:
        batch = data.make_batch(bucketed, bucket_index, rows, 10)
        assert batch["inputs"].shape == batch["targets"].shape == batch["mask"].shape == (10, buckets[bucket_index])
        real += int(batch["mask"].sum())
        for row, poem_row in enumerate(rows):
            length = int(bucketed.lengths[bucket_index][poem_row])
            poem = bucketed.tokens[bucket_index][poem_row][: length + 1]
            seen.append(tuple(poem))
            assert batch["inputs"][row, :length].tolist() == poem[:-1].tolist()
            assert batch["targets"][row, :length].tolist() == poem[1:].tolist()
            assert batch["mask"][row].sum() == length
        assert batch["mask"][len(rows) :].sum() == 0  # the fill of a short batch
    assert sorted(seen) == sorted(tuple(t) for t in encoded)
    assert real == bucketed.num_tokens == sum(len(t) - 1 for t in encoded)
    computed = sum(buckets[b] * 10 for b, _ in plan)
    assert data.padded_share(bucketed, 10) == pytest.approx(1 - real / computed)


def test_titles_are_kept_beside_their_poems_with_chinese_characters_only(tmp_path):
    path = tmp_path / "poems.txt"
    path.write_text(
        "春夜喜雨 (其一):好雨知时节，当春乃发生。\n短:四个字啊\n《静夜思》:床前明月光，疑是地上霜。\n", encoding="utf-8"
    )
    corpus = data.read_corpus(path)
    assert corpus.poems == ["G好雨知时节，当春乃发生。E", "G床前明月光，疑是地上霜。E"]
    assert corpus.titles == ["春夜喜雨其一", "静夜思"]
    assert data.sequences(corpus, [1, 0], titles=True, max_title=3) == [
        "静夜思G床前明月光，疑是地上霜。E",
        "春夜喜G好雨知时节，当春乃发生。E",
    ]
    assert data.sequences(corpus, [1], titles=False, max_title=3) == ["G床前明月光，疑是地上霜。E"]


def test_a_title_is_read_but_not_trained_and_chars_exclude_punctuation_and_end():
    vocab = ["E", "G", "，", "。", "春", "夜", "雨", "好", "知"]
    poems = ["春夜G好雨，知。E", "G好雨。E"]
    bucketed, _ = data.bucket_split(poems, [], vocab, 1)
    batch = data.make_batch(bucketed, 0, np.arange(2), 3)
    # Row 0 reads 春 夜 G 好 雨 ， 知 。 ; targets 夜 G 好 雨 ， 知 。 E: the loss starts at the target after G.
    assert batch["mask"][0].tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    assert batch["chars"][0].tolist() == [0, 0, 1, 1, 0, 1, 0, 0]
    assert batch["mask"][1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]  # 好 雨 。 E, then padding
    assert batch["chars"][1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert not batch["mask"][2].any()  # the fill of a short batch


def test_near_repeats_fall_on_one_side_and_exact_repeats_are_trained_once():
    base = "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"
    variant = "白日依山尽，黄河入海流。欲穷千里目，更上二层楼。"  # one line changed: 3 of 4 shared
    distant = "白日依山尽，春风不度关。明月何时照，我还故乡来。"  # 1 of 4 shared: not a near-repeat
    others = [
        f"G{'春夏秋冬'[i % 4]}江{i:03d}水，花月{i:03d}明。E".replace("0", "零").replace("1", "一") for i in range(200)
    ]
    poems = ["G" + base + "E", "G" + variant + "E", "G" + distant + "E", "G" + base + "E"] + others
    groups = data.near_repeat_groups(poems)
    assert groups[0] == groups[1] == groups[3] and groups[2] != groups[0]
    for fraction in (0.0, 1.0, 0.3):
        train, val, counts = data.split_indices(poems, fraction, "grouped")
        assert 3 not in train + val and counts.exact_repeats == 1  # the second copy of base
        assert (0 in val) == (1 in val)  # the group stays together
        assert sorted(train + val) == [i for i in range(len(poems)) if i != 3]
    assert counts.near_groups == 1 and counts.near_poems == 3
    hashed_train, hashed_val, _ = data.split_indices(poems, 0.3, "hash")
    assert (hashed_train, hashed_val) == tuple(
        [[i for i, p in enumerate(poems) if data.is_validation(p, 0.3) == side] for side in (False, True)]
    )


def test_first_of_each_bucket_names_one_batch_a_shape_in_bucket_order():
    rows = np.arange(2)
    plan = [(2, rows), (0, rows), (2, rows), (1, rows), (0, rows)]
    assert data.first_of_each_bucket(plan) == [1, 3, 0]
    assert data.first_of_each_bucket([]) == []


def test_other_corpus_parts_only_train_and_keep_the_main_validation_split():
    """Song poems join training; the Tang split stays what it was alone; a Song poem that
    near-repeats a Tang validation poem, or repeats any poem exactly, is not trained."""
    import dataclasses

    from tangshi_jax.config import TrainConfig

    rng = random.Random(0)
    pool = "春花秋月何时了往事知多少小楼昨夜又东风故国不堪回首明中山水日红白云天地人"
    tang = ["G" + "，".join("".join(rng.choice(pool) for _ in range(5)) for _ in range(2)) + "。E" for _ in range(40)]
    config = TrainConfig(val_fraction=0.25, split="grouped")
    main = data.Corpus(tang, ["题"] * len(tang), 0, 0, None)
    alone_train, alone_val, _ = data.split_parts(main, config)
    assert alone_val and alone_train
    val_poem, train_poem = tang[alone_val[0]], tang[alone_train[0]]
    near_val = val_poem[:7] + "海天长。E"  # shares its first line of two: half of the lines
    song = ["G竹外桃花三两枝，春江水暖鸭先知。E", near_val, train_poem, "G竹外桃花三两枝，春江水暖鸭先知。E"]
    both = data.join_parts([main, data.Corpus(song, ["宋"] * 4, 1, 2, None)])
    assert both.part_sizes == (len(tang), 4) and (both.skipped, both.unparsable) == (0 + 1, 0 + 2)
    train, val, counts = data.split_parts(both, config)
    song_start = len(tang)
    assert val == alone_val and train == alone_train + [song_start]
    assert counts.near_val == 1 and counts.exact_repeats == 2  # the Tang poem again, the Song poem again
    # --max-poems takes the first N of each part.
    limited = dataclasses.replace(config, max_poems=2)
    assert both.used(2) == [0, 1, song_start, song_start + 1]
    limited_train, limited_val, _ = data.split_parts(both, limited)
    assert set(limited_train + limited_val) <= set(both.used(2)) and song_start in limited_train


def test_a_part_that_validates_itself_holds_out_its_own_validation_poems():
    """The 词 are split as the Tang poems are: their validation poems never train, and the
    run's validation stays the Tang poems' alone."""
    from tangshi_jax.config import TrainConfig

    rng = random.Random(1)
    pool = "春花秋月何时了往事知多少小楼昨夜又东风故国不堪回首明中山水日红白云天地人"

    def poems(count):
        return [
            "G" + "，".join("".join(rng.choice(pool) for _ in range(6)) for _ in range(3)) + "。E" for _ in range(count)
        ]

    tang, ci = poems(40), poems(60)
    config = TrainConfig(val_fraction=0.25, split="grouped")
    main = data.Corpus(tang, ["题"] * 40, 0, 0, None)
    part = data.Corpus(ci, ["浣溪沙"] * 60, 0, 0, None)
    _, alone_val, _ = data.split_parts(main, config)
    _, ci_val, _ = data.part_split(data.Corpus(ci, ["浣溪沙"] * 60, 0, 0, None), range(60), config)
    assert 0 < len(ci_val) < 60
    validated = data.join_parts([main, part], [True, True])
    train, val, counts = data.split_parts(validated, config)
    assert val == alone_val and counts.held_out == len(ci_val)
    held = {40 + index for index in ci_val}
    assert not held & set(train) and set(range(40, 100)) - held <= set(train)
    # The same part without validation of its own trains every poem.
    train_all, _, counts_all = data.split_parts(data.join_parts([main, part]), config)
    assert set(range(40, 100)) <= set(train_all) and counts_all.held_out == 0
    assert "held out to validate their own part" in data.describe_split(counts, ("ci",))
