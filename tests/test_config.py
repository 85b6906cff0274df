import jax
import numpy as np
import optax
import pytest

from tangshi_jax.config import DATA_ORDER_FIELDS, PRESETS, ModelConfig, TrainConfig, preset_configs
from tangshi_jax.model import init_params
from tangshi_jax.train import build_parser, configs_from_args, learning_rate


def test_the_original_preset_is_the_course_exercise():
    model_settings, train_config = preset_configs("original")
    assert ModelConfig(vocab_size=10, **model_settings) == ModelConfig(
        vocab_size=10, cell="lstm", layers=2, hidden=128, embed=100, relu_head=False, dropout=0.0, tied=False
    )
    assert (
        train_config.optimizer,
        train_config.lr,
        train_config.schedule,
        train_config.batch_size,
        train_config.split,
        train_config.titles,
    ) == ("rmsprop", 0.01, "constant", 100, "hash", False)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.slow  # initialises full-size models (the gpu one large)
def test_every_preset_builds_a_model(name):
    model_settings, train_config = preset_configs(name)
    config = ModelConfig(vocab_size=30, **model_settings)
    params = init_params(config, jax.random.key(0))
    assert params["layer_0"]["cell"]["recurrent"]["kernel"].shape[0] == config.hidden
    assert ("project" in params) == config.tied and ("head" in params) == (not config.tied)
    assert train_config.epochs >= 1 and 0 <= config.dropout < 1


def test_flags_override_the_preset():
    args = build_parser().parse_args(["--preset", "quick", "--hidden", "64", "--epochs", "2", "--no-tied"])
    model_settings, train_config = configs_from_args(args)
    assert model_settings["hidden"] == 64 and model_settings["tied"] is False and train_config.epochs == 2
    assert train_config.titles == PRESETS["quick"]["titles"] and train_config.schedule == "cosine"


def test_cosine_schedule_warms_up_decays_and_holds_its_floor():
    config = TrainConfig(lr=0.01, schedule="cosine", warmup_steps=10, decay_epochs=2, lr_floor=0.1)
    schedule = learning_rate(config, steps_per_epoch=55)
    values = np.array([float(schedule(step)) for step in range(0, 200)])
    assert values[0] == 0.0 and values[5] == pytest.approx(0.005) and values[10] == pytest.approx(0.01)
    middle = 10 + (110 - 10) // 2  # half way through the cosine: the mean of peak and floor
    assert values[middle] == pytest.approx((0.01 + 0.001) / 2, rel=1e-4)
    assert np.all(np.diff(values[10:111]) <= 1e-9)
    assert values[110:] == pytest.approx(0.001)  # later epochs keep the floor
    assert learning_rate(TrainConfig(), 55) == 0.01  # the original's constant rate
    assert isinstance(optax.rmsprop(learning_rate(TrainConfig(), 55)), optax.GradientTransformation)


def test_the_hour_schedule_resumes_a_quick_run():
    """quick is the first epochs of hour's schedule: with quick's dropout and average (README),
    every setting that fixes the trajectory is shared; hour itself keeps its dropout."""
    quick, hour = preset_configs("quick"), preset_configs("hour", dropout=0.0, ema_decay=0.98)
    assert preset_configs("hour")[0]["dropout"] > 0 and preset_configs("hour")[1].ema_decay == 0
    assert quick[0] == hour[0]
    assert [(name, getattr(quick[1], name)) for name in DATA_ORDER_FIELDS] == [
        (name, getattr(hour[1], name)) for name in DATA_ORDER_FIELDS
    ]
    assert quick[1].lr == hour[1].lr and quick[1].epochs < hour[1].epochs


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_takes_the_adaptive_head(name):
    """Each preset with `--head adaptive` at the real vocabulary's size: the head cluster and two
    tails, width // 4 and // 16 wide, of the features the head reads."""
    import json

    from tangshi_jax.config import from_dict, to_dict
    from tangshi_jax.model import abstract_params

    args = build_parser().parse_args(["--preset", name, "--head", "adaptive"])
    model_settings, train_config = configs_from_args(args)
    config = ModelConfig(vocab_size=7319, **model_settings)
    shapes = jax.tree_util.tree_map(lambda leaf: leaf.shape, abstract_params(config))
    width = config.embed if config.tied else config.hidden
    assert shapes["head_bias"] == (1002,) and "head" not in shapes
    assert shapes["tail_0_kernel"] == (width // 4, 2000) and shapes["tail_1_kernel"] == (width // 16, 4319)
    again = from_dict(ModelConfig, json.loads(json.dumps(to_dict(config))))
    assert again == config and hash(again) == hash(config)  # JSON's lists come back as tuples
    train_again = from_dict(TrainConfig, json.loads(json.dumps(to_dict(train_config))))
    assert train_again == train_config and train_again.corpus == ("tang",)
