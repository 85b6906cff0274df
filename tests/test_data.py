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
    with open(file_name, "r", encoding="utf-8") as f:
        for line in f.readlines():
            try:
                title, content = line.strip().split(":")
                content = content.replace(" ", "")
                if "_" in content or "(" in content or "（" in content or "《" in content or "[" in content or \
                        "G" in content or "E" in content:
                    continue
                if len(content) < 5 or len(content) > 80:
                    continue
                poems.append("G" + content + "E")
            except ValueError:
                pass
    return poems


@pytest.mark.parametrize("line, expected", [
    ("静夜思:床前明月光，疑是地上霜。", "G床前明月光，疑是地上霜。E"),
    ("t: 床 前 明 月 光 ", "G床前明月光E"),                 # spaces removed before the length test
    ("t:五个字啊呀", "G五个字啊呀E"),                        # 5 characters: kept
    ("t:四个字啊", None),                                    # 4: too short
    ("t:" + "字" * 80, "G" + "字" * 80 + "E"),               # 80: kept
    ("t:" + "字" * 81, None),                                # 81: too long
    ("t:床前明月光_疑是", None),
    ("t:床前明月光(疑是", None),
    ("t:床前明月光（疑是", None),
    ("t:床前明月光《疑是", None),
    ("t:床前明月光[疑是", None),
    ("t:床前明月光G疑是", None),
    ("t:床前明月光E疑是", None),
    ("t:床前明月光]疑是", "G床前明月光]疑是E"),              # only the opening bracket is a rule
])
def test_parse_line_rules(line, expected):
    assert data.parse_line(line) == expected


@pytest.mark.parametrize("line", ["no colon here at all", "a:b:床前明月光疑是", ""])
def test_parse_line_rejects_lines_without_exactly_one_colon(line):
    with pytest.raises(ValueError):
        data.parse_line(line)


def test_read_corpus_matches_original_parser(tmp_path):
    lines = ["静夜思:床前明月光，疑是地上霜。举头望明月，低头思故乡。", "坏行没有冒号", "a:b:c",
             "短:四个字啊", "括号:床前明月光（注）疑是地上霜。", "空 格:春 眠 不 觉 晓 ， 处 处 闻 啼 鸟 。",
             "长:" + "风" * 81, "英文:床前明月光GOOD疑是地上霜。", "好:白日依山尽，黄河入海流。"]
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
    assert vocab == ["春", "花", "E", "G", "月"]   # 4, 3, then E, G, 月 tie at 2 and sort by character
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
    assert listed(plan) == listed(data.epoch_plan(bucketed, 10, seed=1, epoch=0))   # a pure function
    assert listed(plan) != listed(data.epoch_plan(bucketed, 10, seed=1, epoch=1))
    seen, real = [], 0
    for bucket_index, rows in plan:
        batch = data.make_batch(bucketed, bucket_index, rows, 10)
        assert batch["inputs"].shape == batch["targets"].shape == batch["mask"].shape == (10, buckets[bucket_index])
        real += int(batch["mask"].sum())
        for row, poem_row in enumerate(rows):
            length = int(bucketed.lengths[bucket_index][poem_row])
            poem = bucketed.tokens[bucket_index][poem_row][:length + 1]
            seen.append(tuple(poem))
            assert batch["inputs"][row, :length].tolist() == poem[:-1].tolist()
            assert batch["targets"][row, :length].tolist() == poem[1:].tolist()
            assert batch["mask"][row].sum() == length
        assert batch["mask"][len(rows):].sum() == 0                            # the fill of a short batch
    assert sorted(seen) == sorted(tuple(t) for t in encoded)
    assert real == bucketed.num_tokens == sum(len(t) - 1 for t in encoded)
    computed = sum(buckets[b] * 10 for b, _ in plan)
    assert data.padded_share(bucketed, 10) == pytest.approx(1 - real / computed)
