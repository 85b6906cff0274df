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


def test_adaptive_head_is_pytorchs_adaptive_log_softmax():
    """Our adaptive head in PyTorch's form (untied, tails hidden // div**(i+1) wide, no tail
    bias) with PyTorch's weights copied in: every log-probability, the loss and the first
    RMSprop step agree with nn.AdaptiveLogSoftmaxWithLoss."""
    from tangshi_jax.head import fused_nll, log_probs
    from tangshi_jax.model import PoemModel, adaptive_weights, initial_carry

    config = ModelConfig(vocab_size=40, hidden=16, embed=5, head="adaptive", cutoffs=(8, 20), head_div=2.0)
    train_config = TrainConfig()
    state = init_state(config, train_config)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 40, size=(3, 10)).astype(np.int32)
    mask = (rng.random((3, 9)) < 0.8).astype(np.float32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask, "chars": mask}
    model = torch_model.make_model(config)
    assert [tuple(t[0].weight.shape) for t in model.head.tail] == [(8, 16), (4, 16)]
    torch_model.load_jax_params(model, state["params"])

    _, features = PoemModel(config).apply(
        {"params": state["params"]}, batch["inputs"], initial_carry(config, 3), features_only=True
    )
    ours = log_probs(features, adaptive_weights(state["params"], config))
    with torch.no_grad():
        theirs = model.head.log_prob(model(torch.from_numpy(batch["inputs"]).long()).flatten(0, 1))
    np.testing.assert_allclose(np.asarray(ours).reshape(-1, 40), theirs.numpy(), atol=1e-5)

    # The first gradient: PyTorch's autograd against our fused loss's own.
    inputs, targets = (torch.from_numpy(batch[key]) for key in ("inputs", "targets"))
    torch_mask = torch.from_numpy(mask).flatten()
    torch_loss = (model.target_nll(inputs, targets) * torch_mask).sum() / torch_mask.sum()
    torch_loss.backward()

    def mean_nll(params):
        _, features = PoemModel(config).apply(
            {"params": params}, batch["inputs"], initial_carry(config, 3), features_only=True
        )
        return fused_nll(features, adaptive_weights(params, config), batch["targets"], mask) / mask.sum()

    loss, grads = jax.value_and_grad(mean_nll)(state["params"])
    assert torch_loss.item() == pytest.approx(float(loss), rel=1e-5)
    np.testing.assert_allclose(model.head.head.weight.grad.numpy().T, grads["head_kernel"], atol=1e-6)
    np.testing.assert_allclose(model.head.head.bias.grad.numpy(), grads["head_bias"], atol=1e-6)
    for index, (projection, kernel) in enumerate(model.head.tail):
        np.testing.assert_allclose(projection.weight.grad.numpy().T, grads[f"tail_{index}_projection"], atol=1e-6)
        np.testing.assert_allclose(kernel.weight.grad.numpy().T, grads[f"tail_{index}_kernel"], atol=1e-6)
    np.testing.assert_allclose(model.embed.weight.grad.numpy(), grads["embed"]["embedding"], atol=1e-6)
    assert np.abs(grads["head_kernel"]).max() > 1e-3  # a gradient that is there to compare
