"""A pytest plugin for the accelerator check: every test must leave JAX on the backend the run
was started for.

With TANGSHI_EXPECT_BACKEND set (.ci/accelerator-check sets gpu; the suite's stand-in sets
cpu), a test that changes JAX's default device or platforms (`--platform cpu` in-process,
`jax.config.update("jax_default_device", ...)`) fails, the settings are put back, and the
tests after it still run where they should. Without the variable the plugin does nothing.
"""

import os

import pytest

WATCHED = ("jax_default_device", "jax_platforms")


def settings() -> dict:
    import jax

    return {**{name: getattr(jax.config, name) for name in WATCHED}, "backend": jax.default_backend()}


@pytest.fixture(autouse=True)
def stays_on_the_expected_backend():
    expected = os.environ.get("TANGSHI_EXPECT_BACKEND")
    if not expected:
        yield
        return
    import jax

    before = settings()
    yield
    after = settings()
    if after != before:
        for name in WATCHED:
            jax.config.update(name, before[name])
        moved = {name: value for name, value in after.items() if value != before[name]}
        changed = ", ".join(f"{name} {before[name]!r} -> {value!r}" for name, value in moved.items())
        fix = "run CPU-only code in a subprocess"
        pytest.fail(f"this test moved JAX off the {expected} backend ({changed}); {fix}", pytrace=False)
