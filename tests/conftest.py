import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the suite runs on JAX's CPU backend
# Downloads and compiled programs go to a throw-away cache, never the user's.
os.environ.setdefault("TANGSHI_CACHE_DIR", tempfile.mkdtemp(prefix="tangshi-test-cache-"))

import hypothesis
import pytest
from helpers import SMALL_MODEL, small_config, write_corpus

from tangshi_jax.train import train

# no_skips: TANGSHI_NO_SKIPS=1 (CI) fails a run with a skip nobody expected; backend_guard:
# TANGSHI_EXPECT_BACKEND fails a test that moves JAX to another device (the accelerator check)
pytest_plugins = ["no_skips", "backend_guard"]

# CI draws the same examples every run (HYPOTHESIS_PROFILE=ci), so a red run can be repeated.
hypothesis.settings.register_profile("ci", derandomize=True, database=None)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(config, items):
    """Leave out network tests unless -m names them: pyproject.toml's addopts cannot, as a -m on
    the command line (`pytest -m "not slow"`) would replace its -m."""
    if "network" in (config.option.markexpr or ""):
        return
    network = [item for item in items if item.get_closest_marker("network")]
    if network:
        config.hook.pytest_deselected(items=network)
        items[:] = [item for item in items if not item.get_closest_marker("network")]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One small run shared by the tests that only read its checkpoints."""
    root = tmp_path_factory.mktemp("run")
    data = write_corpus(root / "poems.txt")
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
    data = write_corpus(root / "poems.txt")
    train(
        small_config(data, epochs=2, save_every=2, titles=True),
        SMALL_MODEL,
        root / "checkpoints",
        log=lambda message: None,
        show_progress=False,
    )
    return root / "checkpoints", data
