"""The PyTorch model of `bench --against-torch` is the same model: optional, skipped without PyTorch."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tangshi_jax import torch_model  # noqa: E402
from tangshi_jax.config import ModelConfig, TrainConfig  # noqa: E402
from tangshi_jax.train import init_state, make_steps  # noqa: E402


def test_pytorch_model_with_our_weights_gives_our_loss_and_first_step():
    config = ModelConfig(vocab_size=30, hidden=8, embed=5)
    train_config = TrainConfig()
    state = init_state(config, train_config)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 30, size=(4, 9)).astype(np.int32)
    mask = (rng.random((4, 8)) < 0.8).astype(np.float32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask, "chars": mask}
    model = torch_model.make_model(config)
    torch_model.load_jax_params(model, state["params"])
    torch_loss = torch_model.make_train_step(model, train_config.lr)(batch)
    train_step, _ = make_steps(config, train_config)
    new_state, metrics = jax.jit(train_step)(state, batch)
    assert torch_loss == pytest.approx(float(metrics["nll_sum"] / metrics["tokens"]), rel=1e-5)
    # RMSprop's first step moves each weight by about lr / √0.01 = 0.1: equal to a small share of it.
    np.testing.assert_allclose(model.head.weight.detach().numpy().T, new_state["params"]["head"]["kernel"], atol=1e-4)


@pytest.mark.slow  # a PyTorch child process
def test_bench_against_torch_alternates_windows_with_a_child(tmp_path, capsys):
    from helpers import tiny_bench

    from tangshi_jax import bench
    from tangshi_jax.errors import run_cli

    argv, out = tiny_bench(tmp_path)
    argv.append("--against-torch")
    assert run_cli(bench.main, argv) == 0
    assert "training, PyTorch" in capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert len(figures["torch"]["train_window_tokens_per_s"]) == 2 and figures["torch"]["train_tokens_per_s"] > 0
    assert figures["torch"]["allocator"] == "glibc tuned" and "torch" not in figures["variants_tokens_per_s"]
