"""The package's shape: modules that import each other only one way, and functions a reader can hold."""

import ast
from pathlib import Path

import pytest
from helpers import write_corpus

import tangshi_jax

PACKAGE = Path(tangshi_jax.__file__).parent
MODULES = {path.stem: path for path in PACKAGE.glob("*.py")}
LONGEST_FUNCTION, LONGEST_TRAIN_LOOP, LONGEST_TRAINER = 90, 110, 450


def imported_modules(path: Path) -> set[str]:
    """The package's modules a module imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "tangshi_jax" and len(parts) > 1 and parts[1] in MODULES:
                found.add(parts[1])
    return found - {path.stem}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for other in sorted(graph[node]):
            if state.get(other) == "open":
                return path[path.index(other) :] + [other]
            if other not in state and (cycle := visit(other)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_the_package():
    graph = {name: imported_modules(path) for name, path in MODULES.items()}
    assert graph["sample"] >= {"request", "release"} and "train" not in graph["sample"]  # the reader sees real edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def function_lengths(path: Path) -> dict[str, int]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        f"{path.stem}.{node.name}:{node.lineno}": node.end_lineno - node.lineno + 1
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }


def test_functions_stay_short_and_the_trainer_keeps_to_training():
    lengths = {name: length for path in MODULES.values() for name, length in function_lengths(path).items()}
    too_long = {name: length for name, length in lengths.items() if length > LONGEST_FUNCTION}
    assert not too_long, too_long
    train_loop = next(length for name, length in lengths.items() if name.startswith("train.train:"))
    assert train_loop <= LONGEST_TRAIN_LOOP
    assert len(MODULES["train"].read_text(encoding="utf-8").splitlines()) <= LONGEST_TRAINER


@pytest.mark.slow  # three pytest processes
def test_an_unexpected_skip_fails_the_run_where_ci_asks(tmp_path):
    """The plugin CI runs with: a skip of no allowed reason fails the run; an allowed one does not."""
    import os
    import subprocess
    import sys

    (tmp_path / "test_skips.py").write_text(
        "import pytest\n"
        "def test_runs():\n    pass\n"
        "def test_skips():\n    pytest.skip('chromium is not installed')\n"
        "def test_mount():\n    pytest.skip('cannot mount a small filesystem: permission denied')\n"
    )
    tests_dir = str(Path(__file__).parent)

    def run(**env):
        outer = {name: value for name, value in os.environ.items() if not name.startswith("TANGSHI_")}  # CI's own
        environment = {**outer, "PYTHONPATH": tests_dir, **env}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no_skips", "-p", "no:cacheprovider", str(tmp_path)]
        return subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120)

    assert run().returncode == 0  # counted only
    strict = run(TANGSHI_NO_SKIPS="1")
    assert strict.returncode == 1 and "test_skips.py::test_skips: chromium is not installed" in strict.stdout
    assert "test_mount" not in strict.stdout.split("unexpected skip")[1]  # an allowed reason
    assert run(TANGSHI_NO_SKIPS="1", TANGSHI_ALLOWED_SKIPS="test_skips.py::test_skips").returncode == 0


def test_every_console_script_names_a_command_that_runs():
    """The tangshi-* commands of pyproject.toml are installed and each reaches its module's main."""
    import importlib.metadata
    import subprocess
    import sys

    scripts = {
        ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name.startswith("tangshi-")
    }
    stages = {"corpus", "train", "sample", "evaluate", "serve", "export", "bench"}
    assert set(scripts) == {f"tangshi-{stage}" for stage in stages}
    for name, entry in scripts.items():
        assert callable(entry.load()), name
    path = Path(sys.executable).parent / "tangshi-sample"  # installed beside this environment's python
    assert path.is_file(), f"{path} is missing: install the project (pip install -e .)"
    done = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--begin" in done.stdout


def test_the_suite_runs_on_the_backend_it_was_asked_for():
    """.ci/accelerator-check sets TANGSHI_EXPECT_BACKEND=gpu: a suite that fell back to the CPU fails here."""
    import os

    import jax

    assert jax.default_backend() == os.environ.get("TANGSHI_EXPECT_BACKEND", "cpu")


def test_the_accelerator_check_fails_on_a_machine_without_a_gpu(tmp_path):
    """The GPU check cannot pass by running on the CPU: it stops at its first step, with the reason."""
    import os
    import subprocess
    import sys

    script = Path(__file__).parents[1] / ".ci" / "accelerator-check"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # its `python` is this one
    done = subprocess.run([str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0 and "no GPU for JAX" in done.stderr
    assert not (tmp_path / "pytest-gpu.txt").exists()


PLANTED_CONFTEST = """
import sys
sys.path.insert(0, {tests!r})
pytest_plugins = ["backend_guard"]
"""
PLANTED_TESTS = """
import jax

def test_stays():
    assert jax.numpy.ones(2).sum() == 2

def test_moves():
    jax.config.update("jax_default_device", jax.devices("cpu")[0])  # what `--platform cpu` in-process does

def test_after_the_move_runs_where_it_should():
    assert jax.config.jax_default_device is None
"""


@pytest.mark.slow  # runs the check's stages on a small corpus: ~1 minute
def test_the_accelerator_checks_stand_in_fails_a_test_that_moves_jax_and_passes_otherwise(tmp_path):
    """.ci/accelerator-check --stand-in: the CPU plays the GPU, so its logic is tested on every run."""
    import os
    import subprocess
    import sys

    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "conftest.py").write_text(PLANTED_CONFTEST.format(tests=str(Path(__file__).parent)))
    (planted / "test_planted.py").write_text(PLANTED_TESTS)
    data = write_corpus(tmp_path / "poems.txt", count=240)
    script = Path(__file__).parents[1] / ".ci" / "accelerator-check"
    begin = data.read_text(encoding="utf-8").split(":")[1][0]  # a character the small model knows
    env = dict(os.environ, DATA=str(data), TESTS=str(planted), BEGIN=begin, TANGSHI_EXPECT_BACKEND="")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"

    def check(out: str):
        command = [str(script), "--stand-in", str(tmp_path / out)]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)

    moved = check("moved")
    assert moved.returncode != 0
    assert "1 error" in moved.stdout and "moved JAX off the cpu backend" in moved.stdout, moved.stdout[-2000:]
    # the moving test itself passed, then failed at teardown; the test after it ran on the right device
    assert "jax_default_device None ->" in moved.stdout and "3 passed, 1 error" in moved.stdout
    assert not (tmp_path / "moved" / "crosscheck-full.txt").exists()  # the check stopped at the suite

    (planted / "test_planted.py").write_text(PLANTED_TESTS.replace("def test_moves", "def stays_too"))
    passed = check("passed")
    assert passed.returncode == 0, passed.stdout[-3000:] + passed.stderr[-2000:]
    for head in ("full", "adaptive"):
        crosscheck = (tmp_path / "passed" / f"crosscheck-{head}.txt").read_text()
        assert "crosscheck passed" in crosscheck
        gap = float(crosscheck.split("largest relative gap ")[1].split()[0])
        assert 0 < gap < 1e-4  # two real orders of the same sums were compared, not one computation twice
    assert "accelerator check passed (cpu, stand-in)" in passed.stdout
    assert (tmp_path / "passed" / "sample-cpu.txt").read_text().count(begin) >= 4  # the 4 poems it wrote
