"""export writes a release folder that loads without Orbax and writes the poems the checkpoint writes."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from tangshi_jax import evaluate, export, release, sample
from tangshi_jax.config import ModelConfig, TrainConfig
from tangshi_jax.errors import TangshiError, run_cli
from tangshi_jax.request import PoemRequest


@pytest.fixture(scope="module")
def exported(titles_run, tmp_path_factory):
    directory, data = titles_run
    out = tmp_path_factory.mktemp("release") / "tangshi-small"
    report = evaluate.evaluate_checkpoint(
        directory,
        None,
        num=2,
        settings=[evaluate.SETTINGS[0]],
        log=lambda m: None,
        sampling=PoemRequest(temperature=0.8, top_p=1.0, repetition_penalty=1.5),
    )
    export.export(directory, out, report=report, log=lambda message: None)
    return directory, data, out


def test_the_folder_holds_the_files_users_know(exported):
    directory, data, out = exported
    assert sorted(path.name for path in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "vocab.json",
    ]
    from safetensors.numpy import load_file

    weights = load_file(str(out / "model.safetensors"))  # plain numpy, no JAX needed
    checkpoint = release.load_model(checkpoint_dir=directory)
    flat = {
        ".".join(key.key for key in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(checkpoint.params)
    }
    assert set(weights) == set(flat)
    for name, array in flat.items():
        np.testing.assert_array_equal(weights[name], array)  # bit for bit
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["model"]["hidden"] == checkpoint.model_config.hidden and config["train"]["titles"] is True
    assert config["progress"]["step"] == checkpoint.progress["step"] and config["metrics"]["val_loss"] > 0
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert sorted(vocab, key=vocab.get) == checkpoint.vocab
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "python -m tangshi_jax.train --preset original" in card and "--titles" in card
    assert "| free | 2 |" in card and "Temperature 0.8" in card and "sha256" in card


@pytest.mark.slow  # compiles the sampler for many requests
def test_the_release_writes_the_checkpoints_poems(exported, capsys):
    directory, data, out = exported
    from_release, from_checkpoint = release.load_release(out), release.load_model(checkpoint_dir=directory)
    assert from_release.vocab == from_checkpoint.vocab and from_release.model_config == from_checkpoint.model_config
    assert from_release.train_config == from_checkpoint.train_config
    heads = "".join([char for char in from_release.vocab if sample.data.is_hanzi(char)][:4])
    wanted = PoemRequest(num=3, seed=6, candidates=4, form="qijue", rhyme=True, acrostic=heads, title="题春")
    options = dict(max_title=from_release.max_title, corpus_lines=sample.corpus_lines(data))
    assert sample.write_poems(
        from_release.params, from_release.model_config, from_release.vocab, wanted, **options
    ) == sample.write_poems(
        from_checkpoint.params, from_checkpoint.model_config, from_checkpoint.vocab, wanted, **options
    )
    outputs = []
    for source in (["--model", str(out)], ["--checkpoint-dir", str(directory)]):
        assert run_cli(sample.main, source + ["--num", "4", "--seed", "3", "--json", "--keywords", "春", "月"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and len(outputs[0].splitlines()) == 4


@pytest.mark.slow  # compiles the evaluation
def test_evaluate_reads_a_release(exported):
    directory, data, out = exported
    sampling = PoemRequest(temperature=0.8, top_p=1.0, repetition_penalty=1.5)
    kwargs = dict(num=2, settings=[evaluate.SETTINGS[0]], log=lambda m: None, sampling=sampling)
    from_release = evaluate.evaluate_checkpoint(None, str(data), model_dir=out, **kwargs)
    from_checkpoint = evaluate.evaluate_checkpoint(directory, str(data), **kwargs)
    assert from_release["val_nll"] == from_checkpoint["val_nll"]
    assert from_release["rows"][0]["examples"] == from_checkpoint["rows"][0]["examples"]


def test_training_command_names_the_nearest_preset_and_the_differences():
    model, train = (
        ModelConfig(100, hidden=256, embed=128, tied=True),
        TrainConfig(
            epochs=6, schedule="cosine", warmup_steps=50, decay_epochs=12, split="grouped", titles=True, ema_decay=0.98
        ),
    )
    assert export.training_command(model, train) == "python -m tangshi_jax.train --preset quick --epochs 6"
    assert (
        export.training_command(dataclasses.replace(model, dropout=0.2), dataclasses.replace(train, ema_decay=0.0))
        == "python -m tangshi_jax.train --preset hour --epochs 6"
    )
    assert (
        export.training_command(ModelConfig(100), TrainConfig(epochs=5, data="x.txt", lr_floor=0.1))
        == "python -m tangshi_jax.train --preset original --data x.txt  # and, in config.py, lr_floor=0.1"
    )
    adaptive = ModelConfig(100, head="adaptive", cutoffs=(50, 80))
    assert (
        export.training_command(adaptive, TrainConfig(epochs=5, corpus=("tang", "song")))
        == "python -m tangshi_jax.train --preset original --head adaptive --cutoffs 50,80 --corpus tang,song"
    )


def test_broken_releases_and_a_taken_folder_are_one_clear_line(exported, tmp_path, capsys):
    directory, _, out = exported
    cases = []
    broken = tmp_path / "vocab"
    broken.mkdir()
    for path in out.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    vocab = json.loads((broken / "vocab.json").read_text(encoding="utf-8"))
    vocab.pop(next(iter(vocab)))
    (broken / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    cases.append((["--model", str(broken)], "must map each character to an id"))
    cut = tmp_path / "weights"
    cut.mkdir()
    for path in out.iterdir():
        (cut / path.name).write_bytes(path.read_bytes()[:100] if path.suffix == ".safetensors" else path.read_bytes())
    cases.append((["--model", str(cut)], "cannot read"))
    cases.append((["--model", str(tmp_path / "nowhere")], "no such folder and no model of that name"))
    (tmp_path / "empty").mkdir()
    cases.append((["--model", str(tmp_path / "empty")], "is not a release folder"))
    for argv, message in cases:
        assert run_cli(sample.main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert run_cli(export.main, ["--checkpoint-dir", str(directory), "--out", str(out), "--eval-num", "0"]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(TangshiError, match="parameter"):
        other = tmp_path / "other"
        other.mkdir()
        for path in out.iterdir():
            (other / path.name).write_bytes(path.read_bytes())
        config = json.loads((other / "config.json").read_text(encoding="utf-8"))
        config["model"]["hidden"] += 1
        (other / "config.json").write_text(json.dumps(config), encoding="utf-8")
        release.load_release(other)


def test_half_precision_release_is_checked_then_reads_back_as_float32(exported, tmp_path):
    directory, data, _ = exported
    out = export.export(directory, tmp_path / "half", eval_num=0, data_path=data, log=lambda m: None, half=True)
    from safetensors.numpy import load_file

    assert {array.dtype.name for array in load_file(str(out / "model.safetensors")).values()} == {"float16"}
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["format_version"] == 2 and config["weights_dtype"] == "float16"
    half = config["metrics"]["half"]
    assert abs(half["float16_nll"] - half["float32_nll"]) < export.HALF_TOLERANCE and half["float32_nll"] > 0
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "Weights stored as float16" in card and "the parameters only (float16, read back as float32)" in card
    loaded, original = release.load_model(model_dir=out), release.load_model(checkpoint_dir=directory)
    for got, want in zip(jax.tree_util.tree_leaves(loaded.params), jax.tree_util.tree_leaves(original.params)):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, np.asarray(want).astype(np.float16).astype(np.float32))
        assert np.abs(np.asarray(got) - np.asarray(want)).max() > 0 or np.all(want == 0)


def test_a_format_1_release_still_reads(exported, tmp_path):
    _, _, out = exported
    old = tmp_path / "format1"
    old.mkdir()
    for path in out.iterdir():
        (old / path.name).write_bytes(path.read_bytes())
    config = json.loads((old / "config.json").read_text(encoding="utf-8"))
    config["format_version"] = 1
    del config["weights_dtype"]
    (old / "config.json").write_text(json.dumps(config), encoding="utf-8")
    loaded = release.load_model(model_dir=old)
    assert loaded.vocab == release.load_model(model_dir=out).vocab


def test_a_shipped_model_is_found_by_name_and_an_unknown_name_is_one_line(exported, tmp_path, monkeypatch, capsys):
    _, _, out = exported
    monkeypatch.setattr(release, "SHIPPED", out.parent)
    monkeypatch.chdir(tmp_path)
    assert release.shipped_models() == [out.name]
    assert release.find_release(out.name) == out
    assert release.load_model(model_dir=out.name).vocab == release.load_model(model_dir=out).vocab
    with pytest.raises(TangshiError, match=f"no model of that name.*{out.name}"):
        release.find_release("no-such-model")


SHIPPED_NAME = "tang"  # the model that comes with the package (README, "A ready model")


def shipped_figures() -> dict:
    return json.loads((release.SHIPPED / SHIPPED_NAME / release.CONFIG).read_text(encoding="utf-8"))["metrics"]


@pytest.mark.slow  # compiles the sampler for the shipped model's 7,319 characters
def test_the_shipped_model_is_found_by_name_and_writes_rule_keeping_poems():
    import re

    assert SHIPPED_NAME in release.shipped_models()
    loaded = release.load_model(model_dir=SHIPPED_NAME)  # no such folder here: the package's, by name
    figures = shipped_figures()
    assert loaded.progress["step"] == figures["step"] and loaded.model_config.head == "adaptive"
    card = (release.SHIPPED / SHIPPED_NAME / release.CARD).read_text(encoding="utf-8")
    assert (
        f"{figures['val_char_loss']:.3f} over Chinese characters only (perplexity {figures['val_char_ppl']:.1f})"
        in card
    )
    assert abs(figures["half"]["float16_nll"] - figures["half"]["float32_nll"]) < export.HALF_TOLERANCE
    # The card's command trains this model again under today's presets (a preset changed since must show).
    assert f"\n{export.training_command(loaded.model_config, loaded.train_config)}\n" in card
    wanted = PoemRequest(begin="日", form="qijue", rhyme=True, tones=True, num=3, seed=0, candidates=2)
    poems = sample.write_poems(loaded.params, loaded.model_config, loaded.vocab, wanted, max_title=loaded.max_title)
    assert all(re.fullmatch("日[^，。]{6}，[^，。]{7}。[^，。]{7}，[^，。]{7}。", poem) for poem in poems), poems


@pytest.mark.slow  # writes 200 poems with the shipped model
def test_the_shipped_cards_sampling_rows_are_what_the_sampler_writes_today():
    """The card's rows hold what `evaluate` measures with today's sampler: a change to the
    sampler that moves the shipped model's poems must come with a new card. Two rows (one free,
    one under every rule), on the columns that need no corpus."""
    loaded = release.load_model(model_dir=SHIPPED_NAME)
    card = (release.SHIPPED / SHIPPED_NAME / release.CARD).read_text(encoding="utf-8")
    settings = {setting.name: setting for setting in evaluate.SETTINGS}
    poem_only = {"form_valid", "rhyme_ok", "tones_ok", "distinct_1", "distinct_2", "repeated_4grams", "mean_length"}
    for name in ("free", "wujue+rhyme+tones"):
        poems, _, _ = evaluate.sample_setting(loaded, settings[name], num=100, seed=0)
        today = {"setting": name, **evaluate.measure(poems, settings[name].form, set())}
        [line] = [line for line in card.splitlines() if line.startswith(f"| {name} | 100 |")]
        cells = [cell.strip() for cell in line.strip("|").split("|")][2:]
        for (title, key, spec), cell in zip(evaluate.COLUMNS, cells, strict=True):
            if key in poem_only:
                assert spec.format(today[key]) == cell, (name, title)
