"""What test files share besides fixtures: a tiny corpus, a small model and a quick config.

Test files import these with `from helpers import ...` (pytest puts tests/ on sys.path for
its rootdir conftest; scripts run in a subprocess insert tests/ themselves). The fixtures that
train once per session stay in conftest.py.
"""

import random

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
