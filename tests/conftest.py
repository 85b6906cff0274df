import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the suite runs on JAX's CPU backend
# Downloads and compiled programs go to a throw-away cache, never the user's.
os.environ.setdefault("TANGSHI_CACHE_DIR", tempfile.mkdtemp(prefix="tangshi-test-cache-"))

import random

import pytest

from tangshi_jax.config import TrainConfig
from tangshi_jax.train import train

CHARS = "春花秋月何时了往事知多少小楼昨夜又东风故国不堪回首明中山水日红白云天地人"
SMALL_MODEL = dict(cell="lstm", layers=2, hidden=16, embed=8, relu_head=False)


def write_poems(path, count=120, seed=0):
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


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One small run shared by the tests that only read its checkpoints."""
    root = tmp_path_factory.mktemp("run")
    data = write_poems(root / "poems.txt")
    record = train(
        small_config(data, epochs=3, save_every=2),
        SMALL_MODEL,
        root / "checkpoints",
        log=lambda message: None,
        show_progress=False,
        profile_dir=root / "profile",
    )
    return root / "checkpoints", data, record


@pytest.fixture(scope="session")
def titles_run(tmp_path_factory):
    """A small run that reads each poem after its title (题 and the first line's first two characters)."""
    root = tmp_path_factory.mktemp("titles")
    data = write_poems(root / "poems.txt")
    train(
        small_config(data, epochs=2, save_every=2, titles=True),
        SMALL_MODEL,
        root / "checkpoints",
        log=lambda message: None,
        show_progress=False,
    )
    return root / "checkpoints", data
