import json
import os
import random
import shutil
import signal
import time

import jax
import numpy as np
import pytest
from helpers import SMALL_MODEL, small_config, write_corpus

from tangshi_jax import checkpoint
from tangshi_jax import data as data_module
from tangshi_jax import train as train_module
from tangshi_jax.config import ModelConfig, TrainConfig, preset_configs
from tangshi_jax.errors import TangshiError, run_cli
from tangshi_jax.metrics import epoch_line, trim_metrics, validation_nll
from tangshi_jax.release import load_model
from tangshi_jax.train import init_state, train


def quiet(message):
    pass


def metrics_of(directory):
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_metrics_are_logged(trained_run):
    directory, _, record = trained_run
    metrics = metrics_of(directory)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"] - 0.3
    assert metrics[-1]["val_loss"] < np.log(45)  # better than uniform over the vocabulary
    for key in ("step", "train_loss", "val_loss", "val_ppl", "tokens_per_s", "elapsed_s"):
        assert key in metrics[0]
    assert metrics[-1] == json.loads(json.dumps(record))
    assert metrics[-1]["val_ppl"] == pytest.approx(np.exp(metrics[-1]["val_loss"]))


def test_profile_traces_the_first_steps(trained_run):
    """`train --profile DIR` (the fixture's run passes profile_dir): a trace for TensorBoard and one for Perfetto."""
    profile = trained_run[0].parent / "profile"
    assert list(profile.glob("plugins/profile/*/*.xplane.pb"))
    assert list(profile.glob("**/perfetto_trace.json.gz"))


def test_checkpoints_land_every_save_every_epochs_and_at_the_end(trained_run):
    directory, _, _ = trained_run
    manager, step = checkpoint.require_checkpoint(directory)
    epochs = [checkpoint.restore_meta(manager, s)[3]["epoch"] for s in manager.all_steps()]
    assert epochs == [2, 3]
    model_config, train_config, vocab, progress = checkpoint.restore_meta(manager, step)
    assert model_config.vocab_size == len(vocab) and model_config.hidden == SMALL_MODEL["hidden"]
    assert progress == {"epoch": 3, "batch": 0, "step": step, "data": progress["data"]}
    assert progress["data"]["poems"] == 120


def test_orbax_round_trip_restores_every_array(tmp_path, trained_run):
    directory, _, _ = trained_run
    manager, step = checkpoint.require_checkpoint(directory)
    model_config, train_config, vocab, progress = checkpoint.restore_meta(manager, step)
    like = init_state(model_config, train_config, seed=123)
    restored = checkpoint.restore_state(manager, step, like)
    copy = checkpoint.open_manager(tmp_path / "copy")
    checkpoint.save(copy, restored, model_config, train_config, vocab, progress)
    copy.wait_until_finished()
    again = checkpoint.restore_state(copy, step, like)
    leaves = jax.tree_util.tree_leaves(restored)
    assert int(restored["step"]) == step
    assert not all(np.array_equal(a, b) for a, b in zip(leaves, jax.tree_util.tree_leaves(like)))
    for a, b in zip(leaves, jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(a, b)
    assert checkpoint.restore_meta(copy, step) == (model_config, train_config, vocab, progress)


# The original's run, and one with dropout drawn from the saved RNG, a warm-up and a cosine.
RESUMED_RUNS = {
    "original": (SMALL_MODEL, {}),
    "dropout+cosine": (
        dict(SMALL_MODEL, dropout=0.3, tied=True),
        dict(schedule="cosine", warmup_steps=3, decay_epochs=3, split="grouped", ema_decay=0.9),
    ),
    "adaptive head": (
        dict(SMALL_MODEL, dropout=0.2, tied=True, head="adaptive", cutoffs=(10, 25)),
        dict(titles=True, split="grouped"),
    ),
}


@pytest.mark.slow  # trains
def test_a_cosine_decays_over_the_first_starts_epochs_and_a_resume_keeps_it(tmp_path):
    data = write_corpus(tmp_path / "poems.txt", count=40)
    config = lambda epochs: small_config(data, epochs=epochs, schedule="cosine", num_buckets=1)
    train(config(1), SMALL_MODEL, tmp_path / "run", log=quiet, show_progress=False)
    train(config(2), SMALL_MODEL, tmp_path / "run", log=quiet, show_progress=False)  # raised: no refusal
    manager, step = checkpoint.require_checkpoint(tmp_path / "run")
    meta = checkpoint.restore_meta(manager, step)
    assert meta.train_config.decay_epochs == 1 and meta.progress["epoch"] == 2


@pytest.mark.parametrize("run", RESUMED_RUNS)
@pytest.mark.slow  # trains three runs
def test_resume_replays_an_uninterrupted_run(tmp_path, run):
    model, settings = RESUMED_RUNS[run]
    data = write_corpus(tmp_path / "poems.txt")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    config = lambda epochs: small_config(data, epochs=epochs, **settings)
    train(config(3), model, straight, log=quiet, show_progress=False)
    train(config(1), model, resumed, log=quiet, show_progress=False)

    # Stop the second leg after its first step of epoch 2 with a real SIGTERM, then resume.
    def stop_after_compiling(message):
        if message.startswith("compiled"):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        train(config(3), model, resumed, log=stop_after_compiling, show_progress=False)
    manager, step = checkpoint.require_checkpoint(resumed)
    assert checkpoint.restore_meta(manager, step)[3]["batch"] == 1
    train(config(3), model, resumed, log=quiet, show_progress=False)

    # Epoch 2's mean covers only the batches after the stop; epochs 1 and 3 must agree exactly.
    first, second = metrics_of(straight), metrics_of(resumed)
    assert [m["epoch"] for m in second] == [1, 2, 3]
    for key in ("train_loss", "val_loss", "val_char_loss", "step"):
        assert first[0][key] == second[0][key] and first[2][key] == second[2][key]
    states = [
        checkpoint.restore_state(
            *checkpoint.require_checkpoint(d),
            init_state(*checkpoint.restore_meta(*checkpoint.require_checkpoint(d))[:2], seed=0),
        )
        for d in (straight, resumed)
    ]
    for a, b in zip(jax.tree_util.tree_leaves(states[0]), jax.tree_util.tree_leaves(states[1])):
        np.testing.assert_array_equal(a, b)


def test_a_run_with_a_weights_average_validates_and_samples_from_the_average(tmp_path):
    """The average is saved beside the weights; the epoch's validation figures and the model that
    sampling loads are the average's, not the weights'."""
    data = write_corpus(tmp_path / "poems.txt")
    config = small_config(data, epochs=1, ema_decay=0.8, num_buckets=1)
    record = train(config, SMALL_MODEL, tmp_path / "run", log=quiet, show_progress=False)
    manager, step = checkpoint.require_checkpoint(tmp_path / "run")
    meta = checkpoint.restore_meta(manager, step)
    saved = checkpoint.restore_state(manager, step, init_state(meta.model_config, meta.train_config))
    loaded = load_model(checkpoint_dir=tmp_path / "run")
    for average, read in zip(*(jax.tree_util.tree_leaves(t) for t in (saved["ema"], loaded.params))):
        np.testing.assert_array_equal(read, average)
    assert any(
        not np.array_equal(a, w)
        for a, w in zip(*(jax.tree_util.tree_leaves(t) for t in (saved["ema"], saved["params"])))
    )
    dataset = data_module.make_dataset(data_module.load_corpus(data, build=False), meta.train_config, meta.vocab)
    on = {
        name: validation_nll(saved[name], meta.model_config, meta.train_config, dataset.val)
        for name in ("ema", "params")
    }
    assert record["val_loss"] == pytest.approx(on["ema"]["nll"], rel=1e-6)
    assert abs(on["ema"]["nll"] - on["params"]["nll"]) > 1e-4


def test_the_epoch_line_says_how_long_the_epochs_left_will_take():
    record = {"epoch": 3, "train_loss": 4.9, "val_loss": None, "tokens_per_s": 7000.0, "epoch_s": 300.0}
    line = epoch_line({**record, "peak_rss_mb": 900.0}, 12)
    assert line.startswith("epoch 3/12: train 4.900  7,000 tokens/s  300 s  900 MB") and line.endswith(
        "about 45 min to go"
    )
    assert "to go" not in epoch_line({**record, "peak_rss_mb": 900.0}, 3)  # the last epoch
    assert epoch_line({**record, "epoch_s": 20.0, "peak_rss_mb": 9.0}, 4).endswith("under a minute to go")


def test_char_loss_is_logged_and_lies_above_the_all_target_loss(trained_run):
    directory, _, _ = trained_run
    for record in metrics_of(directory):
        # Punctuation and E are nearly free, so the characters alone cost more than all targets.
        assert record["val_char_loss"] > record["val_loss"]
        assert record["val_char_ppl"] == pytest.approx(np.exp(record["val_char_loss"]))


def test_a_titles_run_records_how_it_was_trained(titles_run):
    directory, _ = titles_run
    manager, step = checkpoint.require_checkpoint(directory)
    meta = checkpoint.restore_meta(manager, step)
    assert meta.train_config.titles and "题" in meta.vocab


def own_copy(directory, tmp_path):
    """A test that trains into a run writes to a copy: a broken refusal must not spoil the shared run."""
    return shutil.copytree(directory, tmp_path / "copy")


def test_another_model_or_data_order_in_the_directory_is_refused(tmp_path, trained_run):
    directory, data, _ = trained_run
    directory = own_copy(directory, tmp_path)
    before = sorted(p.name for p in directory.iterdir())
    with pytest.raises(TangshiError, match="another model .*cell: 'lstm' -> 'gru'"):
        train(small_config(data, epochs=5), dict(SMALL_MODEL, cell="gru"), directory, log=quiet)
    with pytest.raises(TangshiError, match="another data order .*batch_size: 16 -> 8"):
        train(small_config(data, epochs=5, batch_size=8), SMALL_MODEL, directory, log=quiet)
    with pytest.raises(TangshiError, match="another data order or schedule .*titles: False -> True"):
        train(small_config(data, epochs=5, titles=True), SMALL_MODEL, directory, log=quiet)
    with pytest.raises(TangshiError, match="another data order or schedule .*corpus: .*'tang'.* -> .*'song'"):
        train(small_config(data, epochs=5, corpus=("tang", "song")), SMALL_MODEL, directory, log=quiet)
    with pytest.raises(TangshiError, match="another model .*head: 'full' -> 'adaptive'"):
        train(small_config(data, epochs=5), dict(SMALL_MODEL, head="adaptive"), directory, log=quiet)
    assert sorted(p.name for p in directory.iterdir()) == before


def test_a_refused_resume_names_the_command_that_resumes_the_run():
    """A quick run made before the quick preset lost its dropout, met by today's quick preset:
    the refusal names the flags it was trained with (today the hour preset's first quarter)."""
    old_quick = (
        ModelConfig(7000, hidden=256, embed=128, tied=True, dropout=0.2),
        TrainConfig(epochs=3, schedule="cosine", warmup_steps=50, decay_epochs=12, split="grouped", titles=True),
    )
    model_settings, quick = preset_configs("quick")
    with pytest.raises(TangshiError) as refusal:
        checkpoint.check_resumable(old_quick[0], ModelConfig(7000, **model_settings), old_quick[1], quick, "runs/q")
    assert str(refusal.value) == (
        "runs/q holds a run with another model (dropout: 0.2 -> 0.0); resume it with `python -m tangshi_jax.train "
        "--preset hour --epochs 3 --checkpoint-dir runs/q`, or choose a new --checkpoint-dir"
    )
    hour_settings, hour = preset_configs("hour", epochs=3)
    checkpoint.check_resumable(old_quick[0], ModelConfig(7000, **hour_settings), old_quick[1], hour, "runs/q")


def test_a_finished_run_says_so(trained_run, tmp_path):
    directory, data, _ = trained_run
    directory = own_copy(directory, tmp_path)
    messages = []
    assert train(small_config(data, epochs=3, save_every=2), SMALL_MODEL, directory, log=messages.append) == {}
    assert "already trained for 3 epochs" in messages[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "missing.txt"], "missing.txt: no such file"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--lr", "-1"], "--lr must be positive"),
        (["--seed", "-3"], "--seed must be 0 or more"),
        (["--checkpoint-dir", "afile"], "afile is a file, not a directory"),
        (["--dropout", "1"], "--dropout must be in [0, 1)"),
        (["--warmup-steps", "-1"], "--warmup-steps must be 0 or more"),
        (["--decay-epochs", "0"], "--decay-epochs must be at least 1"),
        (["--devices", "0"], "--devices must be at least 1"),
        (["--devices", "5"], "--devices 5: this process sees only 1 cpu device"),
        (["--coordinator", "127.0.0.1:1234"], "go together"),
        (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "expected HOST:PORT"),
        (["--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "2"], "ids run from 0"),
        (["--cutoffs", "3000,1000"], "cutoffs must be positive and rising"),
        (["--cutoffs", "10,x"], "whole numbers joined by commas"),
        (["--head-div", "0.5"], "--head-div must be 1 or more"),
        (["--head", "adaptive", "--relu-head"], "--relu-head works with the full head only"),
        (["--corpus", "song"], "tang or ci first"),
        (["--corpus", "tang,yuan"], "parts are tang, song, ci"),
        (["--data", "mine.txt", "--corpus", "tang,song"], "mine.song.txt: no such file"),
    ],
)
def test_bad_training_input_gives_one_clear_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "poems.txt", count=20)
    (tmp_path / "afile").write_text("x")
    write_corpus(tmp_path / "mine.txt", count=20)
    assert run_cli(train_module.main, argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "val_loss": 5.0}\n{"epoch": 2, "val_loss": 4.9}\n{"epoch": 3, "val_lo')
    trim_metrics(path, 2)
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [1, 2]
    trim_metrics(path, 1)
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [1]


@pytest.mark.slow  # trains three runs
def test_a_stop_on_an_epochs_last_batch_finishes_that_epoch(tmp_path):
    data = write_corpus(tmp_path / "poems.txt")
    config = small_config(data, epochs=2, batch_size=200, num_buckets=1, save_every=2)  # one batch an epoch

    def stop_after_compiling(message):
        if message.startswith("compiled"):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        train(config, SMALL_MODEL, tmp_path / "run", log=stop_after_compiling, show_progress=False)
    manager, step = checkpoint.require_checkpoint(tmp_path / "run")
    assert {key: value for key, value in checkpoint.restore_meta(manager, step)[3].items() if key != "data"} == {
        "epoch": 1,
        "batch": 0,
        "step": 1,
    }
    train(config, SMALL_MODEL, tmp_path / "run", log=quiet, show_progress=False)
    train(config, SMALL_MODEL, tmp_path / "straight", log=quiet, show_progress=False)
    resumed, straight = metrics_of(tmp_path / "run"), metrics_of(tmp_path / "straight")
    assert [(m["epoch"], m["train_loss"], m["val_loss"]) for m in resumed] == [
        (m["epoch"], m["train_loss"], m["val_loss"]) for m in straight
    ]


def test_a_platform_this_machine_lacks_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "poems.txt", count=20)
    lacking = "tpu" if os.environ.get("TANGSHI_EXPECT_BACKEND") == "gpu" else "gpu"  # the accelerator check has a GPU
    assert run_cli(train_module.main, ["--platform", lacking, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--platform {lacking}: JAX finds no {lacking} device" in err[0]
    assert "--platform cpu" in err[0]
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


@pytest.mark.slow  # trains 4 short epochs
def test_adam_max_poems_and_the_last_three_checkpoints(tmp_path):
    """README promises: --optimizer adam trains with Adam's state, --max-poems N reads the first N
    poems only, and the rotation keeps the last 3 checkpoints."""
    data = write_corpus(tmp_path / "poems.txt", count=60)
    messages = []
    config = small_config(data, epochs=4, optimizer="adam", max_poems=30, num_buckets=1)
    train(config, SMALL_MODEL, tmp_path / "run", log=messages.append, show_progress=False)
    assert any(m.startswith("poems: 30 of 60 usable") for m in messages), messages[:2]
    steps = sorted(int(p.name) for p in (tmp_path / "run").iterdir() if p.name.isdigit())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [r["step"] for r in records][-3:] and len(records) == 4
    manager, step = checkpoint.require_checkpoint(tmp_path / "run")
    model_config, train_config = checkpoint.restore_meta(manager, step)[:2]
    state = checkpoint.restore_state(manager, step, init_state(model_config, train_config, seed=0))
    names = {
        type(part).__name__
        for part in jax.tree_util.tree_leaves(state["opt_state"], is_leaf=lambda x: hasattr(x, "_fields"))
    }
    assert "ScaleByAdamState" in names, names


def test_a_first_ctrl_c_asks_to_save_and_a_second_stops_at_once():
    from tangshi_jax.guards import StopRequest

    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's notice: save and stop
        assert stop.requested and stop.agreed(step=1, batch=1)
        stop.requested = False
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: save and stop after this step
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second: at once
            time.sleep(1)  # Python runs the handler at once; the sleep is never finished
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are given back


@pytest.mark.slow  # two training processes
def test_a_second_run_takes_its_programs_from_the_disk_cache(tmp_path):
    """README: compiled programs are kept in the cache directory, so a second run compiles
    nothing: its programs are all in the cache already, so it adds none."""
    import subprocess
    import sys

    data = write_corpus(tmp_path / "poems.txt", count=40)
    env = dict(os.environ, TANGSHI_CACHE_DIR=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")

    def run(name):
        command = [sys.executable, "-m", "tangshi_jax.train", "--preset", "original", "--data", str(data)]
        command += ["--epochs", "1", "--hidden", "8", "--embed", "4", "--batch-size", "16", "--no-progress"]
        command += ["--checkpoint-dir", str(tmp_path / name)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return {path.name for path in (tmp_path / "cache" / "xla").iterdir() if not path.name.endswith("-atime")}

    first = run("first")
    assert len(first) >= 16  # 8 training and 8 evaluation programs at least
    assert run("second") == first


def test_a_model_of_the_ci_alone_validates_on_the_held_out_ci(tmp_path):
    """`--corpus ci`: poems.ci.txt beside --data (no poems.txt needed) read by the 词's own rules,
    validated on the 词 the joint runs hold out, which evaluate's 词 figure measures alike."""
    from tangshi_jax import evaluate_forms, release

    rng = random.Random(2)
    chars = "春花秋月何时了往事知多少小楼昨夜又东风故国不堪回首明中山水日红白云天地人"
    clause = lambda: "".join(rng.choice(chars) for _ in range(7))
    lines = ["浣溪沙:" + "".join("，".join(clause() for _ in range(3)) + "。" for _ in range(4)) for _ in range(50)]
    (tmp_path / "poems.ci.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    data_path = tmp_path / "poems.txt"  # never written: the 词 alone are read
    config = small_config(data_path, corpus=("ci",), epochs=1, val_fraction=0.2, titles=True)
    record = train(config, SMALL_MODEL, tmp_path / "run", log=lambda message: None, show_progress=False)
    loaded = release.load_model(checkpoint_dir=tmp_path / "run")
    held_out = evaluate_forms.ci_validation(loaded, data_path)
    assert 0 < held_out["ci"] == held_out["readable"] < 50
    assert held_out["char_nll"] == pytest.approx(record["val_char_loss"], rel=1e-5)
