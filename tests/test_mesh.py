"""Data-parallel training on meshes of forced CPU devices and across two processes.

Each run is a process of its own (tests/mesh_worker.py): JAX fixes the device count, and joins
a distributed run, when it starts.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import write_corpus

from tangshi_jax import release, sample
from tangshi_jax.devices import launched_by_cluster
from tangshi_jax.request import PoemRequest

WORKER = Path(__file__).parent / "mesh_worker.py"
TIMEOUT_S = 50  # every process; a hang in a collective fails the test instead of the suite

pytestmark = pytest.mark.slow  # worker processes on meshes of forced devices


def start_worker(*args, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, str(WORKER), *map(str, args)], stdout=out, stderr=subprocess.STDOUT, env=env
        )


def finish(process: subprocess.Popen) -> int:
    try:
        return process.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"{process.args} did not finish within {TIMEOUT_S} s")


def result_of(log: Path) -> dict:
    return json.loads(log.read_text().splitlines()[-1])


def metrics(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def losses(records: list[dict]) -> np.ndarray:
    return np.array([[record["train_loss"], record["val_loss"]] for record in records])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


PORT_TAKEN = ("address already in use", "failed to add port")  # the coordinator could not bind its port


def port_was_taken(root: Path, name: str) -> bool:
    """free_port() lets the port go before the coordinator binds it; another program may take it between."""
    text = (root / f"{name}0.log").read_text(errors="replace").lower()
    return any(words in text for words in PORT_TAKEN)


def two_processes_finished(root: Path, name: str, attempts: int = 3) -> list[int]:
    """Run two processes to their end; again on a new port if the coordinator's port was taken."""
    for _ in range(attempts):
        first, second = two_processes(root, name)
        if finish(first) != 0 and port_was_taken(root, name):
            second.kill()  # it waits for a coordinator that never came up
            second.wait()
            continue
        return [first.returncode, finish(second)]
    pytest.fail(f"the coordinator's port was taken {attempts} times")


def two_processes(root: Path, name: str) -> list[subprocess.Popen]:
    coordinator = f"127.0.0.1:{free_port()}"
    return [
        start_worker(
            "run",
            root,
            "--host-devices",
            2,
            "--coordinator",
            coordinator,
            "--process-id",
            index,
            log=root / f"{name}{index}.log",
        )
        for index in (0, 1)
    ]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """1 and 4 devices with the same global batch, and checkpoints resumed across them."""
    root = tmp_path_factory.mktemp("mesh")
    write_corpus(root / "poems.txt")
    log = root / "compare.log"
    assert finish(start_worker("compare", root, log=log)) == 0, log.read_text()
    return {**result_of(log), "root": root}


def test_four_devices_give_the_losses_of_one(compared):
    assert len(compared["one"]) == 2
    np.testing.assert_allclose(losses(compared["four"]), losses(compared["one"]), rtol=1e-5)


def test_the_step_receives_the_batch_split_across_the_devices(compared):
    batch = compared["batch"]
    assert batch["program_takes_split_batch"]
    assert batch["batch_devices"] == 4 and batch["shard_rows"] == [4]  # 16 rows, 4 on each device


def test_masked_rows_that_pad_a_batch_change_no_loss(compared):
    """A batch of 14 over 4 devices becomes 16 rows, 2 of them masked: the losses stay those of 1 device."""
    assert "padded with 2 masked rows" in compared["uneven_described"]
    steps = {name: [record["step"] for record in compared[name]] for name in ("uneven_one", "uneven_four")}
    assert steps["uneven_four"] == steps["uneven_one"]
    np.testing.assert_allclose(losses(compared["uneven_four"]), losses(compared["uneven_one"]), rtol=1e-5)
    # and the batches really held 14 poems: not the losses of the 16-poem runs
    assert losses(compared["uneven_one"]).tolist() != losses(compared["one"]).tolist()


def test_checkpoints_resume_on_another_device_count(compared):
    for resumed in ("four_then_one", "one_then_four"):
        assert [record["epoch"] for record in compared[resumed]] == [1, 2]
        np.testing.assert_allclose(losses(compared[resumed]), losses(compared["one"]), rtol=1e-5)


def test_sampling_on_one_device_reads_a_checkpoint_of_four(compared):
    one = release.load_model(checkpoint_dir=compared["root"] / "one")
    four = release.load_model(checkpoint_dir=compared["root"] / "four")
    # The two runs sum gradients in other orders; RMSprop scales each weight's step by its own
    # gradient's size, so a weight whose gradient is near zero can differ by rounding in every
    # one of the 30 steps: the weights must agree to a thousandth of one step of the learning rate.
    step = one.train_config.lr
    for a, b in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(four.params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * step)
    wanted = PoemRequest(begin="春", num=2, max_len=20, seed=0, candidates=1)
    poems = sample.write_poems(four.params, four.model_config, four.vocab, wanted)
    assert len(poems) == 2 and all(poem.startswith("春") for poem in poems)


def test_two_processes_train_as_one_and_stop_together(compared, tmp_path):
    # An uninterrupted run of two processes with two devices each.
    whole = tmp_path / "whole"
    whole.mkdir()
    write_corpus(whole / "poems.txt")
    assert two_processes_finished(whole, "whole") == [0, 0], (whole / "whole1.log").read_text()[-2000:]
    records = metrics(whole / "checkpoints")
    np.testing.assert_allclose(losses(records), losses(compared["one"]), rtol=1e-5)
    saved = sorted(path.name for path in (whole / "checkpoints").iterdir())
    assert saved == sorted([str(record["step"]) for record in records] + ["metrics.jsonl"])

    # SIGTERM to process 1 once training has started: both save one step and exit as interrupted.
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    write_corpus(stopped / "poems.txt")
    for _ in range(3):  # again on a new port if the coordinator's was taken
        processes = two_processes(stopped, "first")
        deadline = time.monotonic() + TIMEOUT_S
        while "compiled" not in (stopped / "first0.log").read_text() and processes[0].poll() is None:
            assert time.monotonic() < deadline, (stopped / "first0.log").read_text()
            time.sleep(0.2)
        if processes[0].poll() is None or not port_was_taken(stopped, "first"):
            break
        processes[1].kill()
        processes[1].wait()
    assert "compiled" in (stopped / "first0.log").read_text(), (stopped / "first0.log").read_text()
    processes[1].send_signal(signal.SIGTERM)
    assert [finish(process) for process in processes] == [130, 130]
    said = [
        next(line for line in (stopped / f"first{index}.log").read_text().splitlines() if "stopped: saved step" in line)
        for index in (0, 1)
    ]
    step = said[0].split("saved step ")[1].split()[0]
    assert f"saved step {step} " in said[1] and 0 < int(step) < records[-1]["step"]
    assert (stopped / "checkpoints" / step).is_dir()

    # The same command again resumes both and ends where the uninterrupted run ended.
    assert two_processes_finished(stopped, "again") == [0, 0]
    assert f"resuming from step {step}" in (stopped / "again0.log").read_text()
    np.testing.assert_allclose(
        losses(metrics(stopped / "checkpoints"))[-1], losses(metrics(whole / "checkpoints"))[-1], rtol=1e-6
    )


def test_a_cluster_launch_of_several_tasks_joins_without_flags(monkeypatch):
    for name in ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert not launched_by_cluster()
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # one task: nothing to join
    assert not launched_by_cluster()
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "16")
    assert launched_by_cluster()
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert launched_by_cluster()
