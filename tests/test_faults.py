"""Faults a user meets: damaged checkpoints, a diverging run, paths and disks that refuse
writes, another poems file on resume, readers beside a writer, large requests."""

import contextlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from helpers import SMALL_MODEL, small_config, write_corpus

from tangshi_jax import checkpoint, data, errors, guards, metrics, release, request, sample
from tangshi_jax import train as train_module
from tangshi_jax.errors import Diverged, TangshiError, run_cli
from tangshi_jax.train import train

TESTS = Path(__file__).resolve().parent


def quiet(message):
    pass


def metrics_of(directory):
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def steps_of(directory):
    return sorted(int(p.name) for p in Path(directory).iterdir() if p.name.isdigit())


def epoch_of(directory, step):
    manager = checkpoint.open_manager(directory, create=False)
    return checkpoint.restore_meta(manager, step).progress["epoch"]


def copy_run(trained_run, tmp_path):
    directory, data_path, _ = trained_run
    copy = tmp_path / "checkpoints"
    shutil.copytree(directory, copy)
    return copy, data_path


def truncate_data(step_dir: Path, size: int = 100) -> list[Path]:
    """Cut every array data file of a step short, as a crash of the disk or a bad copy would.
    (Every one: readers restore only the parameters, and which file holds them is Orbax's
    business.)"""
    data_files = [
        p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d" and p.stat().st_size > size
    ]
    assert data_files, f"no array data file in {step_dir}"
    for path in data_files:
        with path.open("r+b") as file:
            file.truncate(size)
    return data_files


def stderr_lines(capsys):
    return capsys.readouterr().err.strip().splitlines()


# --- unreadable checkpoints -------------------------------------------------------------------


@pytest.mark.slow  # trains
def test_a_truncated_newest_step_is_skipped_by_sample_and_train_resumes_from_the_one_before(
    trained_run, tmp_path, capsys
):
    directory, data_path = copy_run(trained_run, tmp_path)
    older, newest = steps_of(directory)
    damaged = truncate_data(directory / str(newest))

    assert run_cli(sample.main, ["--checkpoint-dir", str(directory), "--num", "2", "--candidates", "1", "--json"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and f"step {newest}" in err[0], err
    assert "truncated" in err[0] and "rm -r" in err[0]
    assert release.load_model(checkpoint_dir=directory).progress["step"] == older
    capsys.readouterr()

    # Training resumes from the older step, sets the damaged one aside (never deletes it) and
    # trims metrics.jsonl to the epoch it resumes from.
    messages = []
    train(
        small_config(data_path, epochs=4, save_every=1),
        SMALL_MODEL,
        directory,
        log=messages.append,
        show_progress=False,
    )  # epoch 3 saves a new step under the damaged one's number
    assert any(f"step {newest}" in m and "truncated" in m and "set aside" in m for m in messages), messages
    assert any(m.startswith(f"resuming from step {older:,}") for m in messages), messages
    aside = [p for p in directory.iterdir() if p.name.startswith(f"{newest}.")]
    assert len(aside) == 1 and all(
        (aside[0] / path.relative_to(directory / str(newest))).stat().st_size == 100 for path in damaged
    )
    assert [m["epoch"] for m in metrics_of(directory)] == [1, 2, 3, 4]
    assert [epoch_of(directory, step) for step in steps_of(directory)] == [2, 3, 4]


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("truncate", "truncated"),
        ("delete-json", "missing"),
        ("shapes", "wrong shapes"),
    ],
)
def test_each_skipped_step_gets_one_line_that_says_why(trained_run, tmp_path, capsys, damage, reason):
    directory, _ = copy_run(trained_run, tmp_path)
    older, newest = steps_of(directory)
    step_dir = directory / str(newest)
    if damage == "truncate":
        truncate_data(step_dir)
    elif damage == "delete-json":
        (step_dir / "vocab" / "metadata").unlink()
    else:
        model = json.loads((step_dir / "model" / "metadata").read_text())
        (step_dir / "model" / "metadata").write_text(json.dumps(dict(model, hidden=model["hidden"] * 2)))
    loaded = release.load_model(checkpoint_dir=directory)
    assert loaded.progress["step"] == older
    err = stderr_lines(capsys)
    assert len(err) == 1 and f"step {newest}" in err[0] and reason in err[0], err


def test_no_readable_step_is_one_clear_error(trained_run, tmp_path, capsys):
    directory, _ = copy_run(trained_run, tmp_path)
    for step in steps_of(directory):
        truncate_data(directory / str(step))
    assert run_cli(sample.main, ["--checkpoint-dir", str(directory), "--candidates", "1"]) == 2
    err = stderr_lines(capsys)
    assert len(err) == 3 and all(line.startswith("warning: ") for line in err[:2]), err
    assert err[2].startswith("error: ") and "no checkpoint in" in err[2] and "can be read" in err[2]
    assert len(steps_of(directory)) == 2  # nothing deleted


# --- divergence -------------------------------------------------------------------------------


@pytest.mark.slow  # trains
def test_a_diverging_run_stops_with_its_own_exit_code_and_keeps_the_last_good_checkpoint(tmp_path):
    data_path = write_corpus(tmp_path / "poems.txt", count=60)
    directory = tmp_path / "run"
    config = lambda **kw: small_config(data_path, num_buckets=1, **kw)
    train(config(epochs=1), SMALL_MODEL, directory, log=quiet, show_progress=False)
    [good] = steps_of(directory)
    with pytest.raises(Diverged) as raised:
        train(config(epochs=3, lr=1e9), SMALL_MODEL, directory, log=quiet, show_progress=False)
    message = str(raised.value)
    assert raised.value.exit_code == errors.EXIT_DIVERGED == 3
    assert "epoch 2" in message and "step" in message and "--lr" in message and f"step {good}" in message
    assert steps_of(directory) == [good]  # the diverged state was not saved
    assert [m["epoch"] for m in metrics_of(directory)] == [1]
    assert release.load_model(checkpoint_dir=directory).progress["step"] == good


def test_run_cli_gives_each_outcome_its_exit_code(capsys):
    def raising(error):
        def main(argv):
            raise error

        return main

    assert run_cli(lambda argv: None) == 0
    assert run_cli(raising(TangshiError("bad flag"))) == 2
    assert run_cli(raising(Diverged("loss is nan"))) == 3
    assert run_cli(raising(KeyboardInterrupt())) == 130
    assert stderr_lines(capsys) == ["error: bad flag", "error: loss is nan", "interrupted"]


def test_the_guard_stops_on_a_non_finite_loss_or_a_runaway_one():
    vocab_size = 50
    limit = 2 * math.log(vocab_size)
    guard = guards.DivergenceGuard(vocab_size)
    for step in range(1, 30):  # a healthy run, one spike above the limit
        guard.check(limit - 1 if step != 7 else limit + 1, step, 1)
    guard.settle(29, 1)
    with pytest.raises(Diverged, match="step 31 .*epoch 2.*loss is nan"):
        guard.check(float("nan"), 31, 2)
    guard = guards.DivergenceGuard(vocab_size)
    with pytest.raises(Diverged, match="above"):
        for step in range(1, guards.DIVERGED_STEPS + 1):
            guard.check(limit * 3, step, 1)
    guard = guards.DivergenceGuard(vocab_size)
    guard.check(limit * 3, 1, 1)
    with pytest.raises(Diverged):  # never save a state whose last loss runs away
        guard.settle(1, 1)


def test_perplexity_of_a_huge_loss_is_inf_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metrics.perplexity(1e10) == float("inf")
        assert metrics.perplexity(709.0) == pytest.approx(math.exp(709.0))
        assert math.isnan(metrics.perplexity(float("nan")))


# --- paths and disks --------------------------------------------------------------------------


def test_a_checkpoint_dir_under_a_file_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "poems.txt", count=20)
    (tmp_path / "afile").write_text("x")
    assert run_cli(train_module.main, ["--checkpoint-dir", "afile/ck", "--no-progress"]) == 2
    err = stderr_lines(capsys)
    assert len(err) == 1 and err[0].startswith("error: ") and "afile is a file" in err[0], err


@contextlib.contextmanager
def read_only(path: Path):
    """Make a directory truly read-only: permissions for a user; root ignores them, so a
    read-only bind mount there (skipped where mounting is not allowed)."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")] if p.is_dir()}
        for p in modes:
            p.chmod(0o555)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    mounted = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"running as root and cannot bind-mount read-only: {mounted.stderr.decode().strip()}")
    try:
        remount = subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True)
        if remount.returncode:
            pytest.skip(f"cannot remount read-only: {remount.stderr.decode().strip()}")
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.slow  # mount processes (as root)
def test_a_read_only_checkpoint_dir_refuses_training_and_still_samples(trained_run, tmp_path, capsys):
    directory, data_path = copy_run(trained_run, tmp_path)
    before = steps_of(directory)
    with read_only(directory):
        with pytest.raises(TangshiError, match="cannot write .*checkpoints"):
            train(
                small_config(data_path, epochs=4, save_every=1), SMALL_MODEL, directory, log=quiet, show_progress=False
            )
        assert run_cli(sample.main, ["--checkpoint-dir", str(directory), "--candidates", "1"]) == 0
        assert not capsys.readouterr().err.strip()
    assert steps_of(directory) == before
    assert release.load_model(checkpoint_dir=directory).progress["step"] == before[-1]


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past `limit` bytes fail in every writer, Orbax's C++ ones included (EFBIG);
    Python ignores the SIGXFSZ that comes with it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@contextlib.contextmanager
def nearly_full_filesystem(tmp_path: Path):
    """A small tmpfs filled but for two pages: enough to start, not enough to save (root only)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small filesystem: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def fill(mount_point: Path, spare_bytes: int) -> None:
    (mount_point / "spare").write_bytes(b"\0" * spare_bytes)
    with (mount_point / "filler").open("wb", buffering=0) as filler:
        with contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * 4096)
    (mount_point / "spare").unlink()


@pytest.mark.parametrize("how", ["file size limit", "full filesystem"])
@pytest.mark.slow  # trains; mount processes
def test_a_save_that_cannot_be_written_is_one_line_and_keeps_the_previous_checkpoint(trained_run, tmp_path, how):
    with contextlib.ExitStack() as stack:
        if how == "file size limit":
            directory, data_path = copy_run(trained_run, tmp_path)
        else:
            mount_point = stack.enter_context(nearly_full_filesystem(tmp_path))
            source, data_path, _ = trained_run
            directory = mount_point / "checkpoints"
            shutil.copytree(source, directory)
            fill(mount_point, 8192)
        before = steps_of(directory)
        if how == "file size limit":
            stack.enter_context(file_size_limit(4096))
        with pytest.raises(TangshiError) as raised:
            train(
                small_config(data_path, epochs=4, save_every=1), SMALL_MODEL, directory, log=quiet, show_progress=False
            )
        message = str(raised.value)
        assert "\n" not in message and f"step {before[-1]}" in message and "is intact" in message, message
        assert ("No space left" in message) if how == "full filesystem" else ("File too large" in message)
        assert steps_of(directory) == before
        assert not [p for p in directory.iterdir() if "tmp" in p.name]  # nothing half-written left
        assert release.load_model(checkpoint_dir=directory).progress["step"] == before[-1]


# --- data identity ----------------------------------------------------------------------------


def test_resuming_with_other_poems_is_refused_and_says_what_differs(trained_run, tmp_path):
    directory, data_path = copy_run(trained_run, tmp_path)
    lines = data_path.read_text(encoding="utf-8").splitlines()
    shuffled = tmp_path / "other.txt"  # the same characters, poems 5 and 6 swapped
    lines[5], lines[6] = lines[6], lines[5]
    shuffled.write_text("\n".join(lines) + "\n", encoding="utf-8")
    before = sorted(p.name for p in directory.iterdir())
    with pytest.raises(TangshiError, match=r"other poems.*from poem 1 to 100.*new --checkpoint-dir"):
        train(small_config(shuffled, epochs=4), SMALL_MODEL, directory, log=quiet, show_progress=False)
    assert sorted(p.name for p in directory.iterdir()) == before
    fewer = tmp_path / "fewer.txt"
    fewer.write_text("\n".join(lines[:100]) + "\n", encoding="utf-8")
    with pytest.raises(TangshiError, match="gives 100 poems where the run was trained on 120"):
        train(small_config(fewer, epochs=4), SMALL_MODEL, directory, log=quiet, show_progress=False)


def test_the_fingerprint_follows_the_poems_read_not_the_file(tmp_path):
    first = write_corpus(tmp_path / "a.txt", count=30)
    second = tmp_path / "b.txt"
    second.write_bytes(b"\xef\xbb\xbf" + first.read_bytes().replace(b"\n", b"\r\n"))  # BOM and CRLF
    config = small_config(first)
    print_a = data.fingerprint(data.read_corpus(first), config)
    assert print_a == data.fingerprint(data.read_corpus(second), config)
    assert print_a != data.fingerprint(data.read_corpus(first), small_config(first, titles=True))
    assert print_a["poems"] == 30


# --- readers beside a writer --------------------------------------------------------------------


WRITER_DEADLINE_S = 600  # 30 tiny epochs take ~30 s on 2 quiet cores


@pytest.mark.slow  # trains in a child process
def test_sampling_while_training_saves_every_epoch_never_fails(tmp_path):
    data_path = write_corpus(tmp_path / "poems.txt", count=60)
    directory = tmp_path / "run"
    script = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
        "from helpers import SMALL_MODEL, small_config\n"
        "from tangshi_jax.train import train\n"
        f"train(small_config({str(data_path)!r}, epochs=30, save_every=1, num_buckets=1), SMALL_MODEL, "
        f"{str(directory)!r}, log=lambda m: print(m, flush=True), show_progress=False)\n"
    )
    log_path = tmp_path / "writer.log"  # a file, not a pipe: a chatty writer can never block on a full pipe
    deadline = time.monotonic() + WRITER_DEADLINE_S
    with open(log_path, "w", encoding="utf-8") as log_file:
        writer = subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ, JAX_PLATFORMS="cpu"),
        )
        seen, problems = [], []
        try:
            while writer.poll() is None:
                if time.monotonic() > deadline:
                    pytest.fail(f"the training run took over {WRITER_DEADLINE_S} s: {log_path.read_text()[-2000:]}")
                if not steps_of(directory) if directory.is_dir() else True:
                    time.sleep(0.05)
                    continue
                messages = []
                try:
                    loaded = release.load_model(checkpoint_dir=directory, warn=messages.append)
                except Exception as error:  # any failure fails the test, after the writer stops
                    problems.append(repr(error))
                    continue
                problems.extend(messages)
                seen.append(loaded.progress["step"])
        finally:
            if writer.poll() is None:
                writer.kill()
            writer.wait(timeout=60)
    output = log_path.read_text(encoding="utf-8")
    assert writer.returncode == 0, output
    assert not problems, problems
    # The reads overlapped the saves: several steps seen while the writer ran (a read takes longer
    # than an epoch of this run, so not every step; 3 holds however the cores are shared).
    assert len(set(seen)) >= 3, seen
    assert seen == sorted(seen)  # never an older step once a newer one was read
    assert epoch_of(directory, steps_of(directory)[-1]) == 30


# --- large requests -----------------------------------------------------------------------------


def test_many_poems_are_written_in_bounded_batches_and_streamed(trained_run, monkeypatch, capsys):
    directory, _, _ = trained_run
    argv = ["--checkpoint-dir", str(directory), "--json", "--candidates", "2", "--seed", "3"]
    assert run_cli(sample.main, argv + ["--num", "3"]) == 0
    few = [json.loads(line)["poem"] for line in capsys.readouterr().out.splitlines()]
    calls = []
    generate = sample.generate

    def counting(*args, **kwargs):
        calls.append(kwargs["num"])
        return generate(*args, **kwargs)

    monkeypatch.setattr(sample, "generate", counting)
    monkeypatch.setattr(request, "MAX_ROWS", 6)
    assert run_cli(sample.main, argv + ["--num", "10"]) == 0
    many = [json.loads(line)["poem"] for line in capsys.readouterr().out.splitlines()]
    assert calls == [6, 6, 6, 6]  # 3 poems × 2 drafts a batch, the last one padded
    assert len(many) == 10 and many[:3] == few and len(set(many)) > 3


def test_too_many_drafts_for_one_batch_are_refused(trained_run, capsys):
    directory, _, _ = trained_run
    argv = ["--checkpoint-dir", str(directory), "--candidates", str(request.MAX_ROWS + 1)]
    assert run_cli(sample.main, argv) == 2
    err = stderr_lines(capsys)
    assert len(err) == 1 and f"--candidates must be at least 1 and at most {request.MAX_ROWS}" in err[0]


def test_a_step_removed_while_the_steps_are_listed_is_listed_again():
    """A reader beside a saving run lists the steps while the run rotates old ones away; Orbax
    reports the step just removed as a missing file or (newer releases) "not a directory"."""
    failures = [FileNotFoundError("gone"), NotADirectoryError("Path is not a directory: run/32")]

    def listing():
        if failures:
            raise failures.pop(0)
        return [40, 48]

    assert checkpoint.retried(listing) == [40, 48] and not failures
    with pytest.raises(PermissionError):  # any other fault is not a rotation: it is raised at once
        checkpoint.retried(lambda: (_ for _ in ()).throw(PermissionError("denied")))
