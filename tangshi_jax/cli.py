"""Console scripts (`tangshi-train`, `tangshi-sample`, ...): each runs its module's `main` the way
`python -m tangshi_jax.<module>` does, with a user error as one line and exit code 2."""

import importlib
import sys

from tangshi_jax.errors import run_cli


def run(module: str) -> None:
    sys.exit(run_cli(importlib.import_module(f"tangshi_jax.{module}").main))


def corpus() -> None:
    run("corpus")


def train() -> None:
    run("train")


def sample() -> None:
    run("sample")


def evaluate() -> None:
    run("evaluate")


def serve() -> None:
    run("serve")


def export() -> None:
    run("export")


def bench() -> None:
    run("bench")
