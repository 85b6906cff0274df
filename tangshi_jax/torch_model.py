"""The same model in PyTorch, for `bench --against-torch` only: PyTorch is never a dependency.

    python -m tangshi_jax.torch_model SPEC.json OUT.json   (bench runs this itself, in a child)

A batched `nn.LSTM` (or GRU, RNN) between an embedding and a linear head with a plain
cross-entropy, RMSprop as the original after clipping at norm 1: the best ordinary PyTorch
way to train the original exercise. It trains on the very batches bench times JAX on. glibc's
allocator settles before the process starts, so bench re-executes this module in a child
with the tuned setting (TORCH_ALLOCATOR), PyTorch's best on the CPU (issue 8: 1.0× to 2.3×
its default allocator's speed).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tangshi_jax import data
from tangshi_jax.config import ModelConfig, TrainConfig, from_dict, to_dict
from tangshi_jax.errors import TangshiError

TORCH_ALLOCATOR = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"


def require_torch():
    try:
        import torch
    except ImportError:
        raise TangshiError("--against-torch needs PyTorch, which tangshi-jax does not install: "
                           "pip install torch (a CPU build), or leave out --against-torch") from None
    return torch


def make_model(model_config: ModelConfig):
    torch = require_torch()
    if model_config.tied or model_config.relu_head or model_config.dropout:
        raise TangshiError("--against-torch compares the plain model only: leave out --tied")
    recurrent = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[model_config.cell]

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(model_config.vocab_size, model_config.embed)
            self.recurrent = recurrent(model_config.embed, model_config.hidden, model_config.layers, batch_first=True)
            self.head = torch.nn.Linear(model_config.hidden, model_config.vocab_size)

        def forward(self, inputs):
            features, _ = self.recurrent(self.embed(inputs))
            return self.head(features)
    return Model()


def load_jax_params(model, params) -> None:
    """Copy the JAX model's parameters (an LSTM's gates are i, f, g, o in both) into the PyTorch one."""
    torch = require_torch()

    def tensor(value):
        return torch.from_numpy(np.ascontiguousarray(np.asarray(value, np.float32)))
    with torch.no_grad():
        model.embed.weight.copy_(tensor(params["embed"]["embedding"]))
        for index in range(model.recurrent.num_layers):
            layer = params[f"layer_{index}"]
            getattr(model.recurrent, f"weight_ih_l{index}").copy_(tensor(layer["input"]["kernel"]).T)
            getattr(model.recurrent, f"bias_ih_l{index}").copy_(tensor(layer["input"]["bias"]))
            getattr(model.recurrent, f"weight_hh_l{index}").copy_(tensor(layer["cell"]["recurrent"]["kernel"]).T)
            getattr(model.recurrent, f"bias_hh_l{index}").zero_()
        model.head.weight.copy_(tensor(params["head"]["kernel"]).T)
        model.head.bias.copy_(tensor(params["head"]["bias"]))


def make_train_step(model, lr: float):
    """One step: mean cross-entropy over the masked positions, clip at norm 1, RMSprop."""
    torch = require_torch()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=lr, alpha=0.99, eps=1e-8)

    def step(batch):
        inputs, targets, mask = (torch.from_numpy(np.asarray(batch[key])) for key in ("inputs", "targets", "mask"))
        logits = model(inputs.long())
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.long().flatten(), reduction="none")
        loss = (nll * mask.flatten()).sum() / mask.sum().clamp(min=1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(loss)
    return step


def bench(spec: dict) -> dict:
    """Train on bench's batches: every bucket once untimed, then timed windows (median)."""
    torch = require_torch()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model_config, train_config = from_dict(ModelConfig, spec["model"]), from_dict(TrainConfig, spec["train"])
    poems = data.read_corpus(Path(train_config.data)).poems[:train_config.max_poems]
    train_data, _ = data.prepare(poems, spec["vocab"], train_config.val_fraction, train_config.num_buckets)
    plan = data.epoch_plan(train_data, train_config.batch_size, train_config.seed, 0)
    batches = [data.make_batch(train_data, b, rows, train_config.batch_size) for b, rows in plan]
    step = make_train_step(make_model(model_config), train_config.lr)
    for bucket_index in range(len(train_data.buckets)):
        first = next((i for i, (b, _) in enumerate(plan) if b == bucket_index), None)
        if first is not None:
            step(batches[first])
    rates, cursor = [], len(train_data.buckets)
    for _ in range(spec["windows"]):
        window = batches[cursor:cursor + spec["steps"]]
        cursor += spec["steps"]
        started = time.perf_counter()
        for batch in window:
            step(batch)
        rates.append(sum(float(b["mask"].sum()) for b in window) / (time.perf_counter() - started))
    return {"version": torch.__version__, "threads": torch.get_num_threads(), "train_tokens_per_s": statistics.median(rates),
            "train_window_tokens_per_s": rates}


def bench_in_child(model_config: ModelConfig, train_config: TrainConfig, poems, vocab, windows: int, steps: int,
                   log) -> dict:
    """bench() in a fresh process whose glibc allocator is tuned (GLIBC_TUNABLES must be set
    before a process starts); the same poems file, vocabulary and data order as the caller's."""
    with tempfile.TemporaryDirectory(prefix="tangshi-torch-") as folder:
        spec_path, out_path = Path(folder) / "spec.json", Path(folder) / "out.json"
        spec_path.write_text(json.dumps({"model": to_dict(model_config), "train": to_dict(train_config),
                                         "vocab": list(vocab), "windows": windows, "steps": steps}), encoding="utf-8")
        log(f"PyTorch: the same batches in a child process with GLIBC_TUNABLES={TORCH_ALLOCATOR}")
        env = dict(os.environ, GLIBC_TUNABLES=TORCH_ALLOCATOR)
        done = subprocess.run([sys.executable, "-m", "tangshi_jax.torch_model", str(spec_path), str(out_path)], env=env)
        if done.returncode:
            raise TangshiError(f"the PyTorch benchmark failed (exit code {done.returncode}; its error is above)")
        figures = json.loads(out_path.read_text(encoding="utf-8"))
    return dict(figures, allocator="glibc tuned")


if __name__ == "__main__":
    spec_file, out_file = sys.argv[1:3]
    result = bench(json.loads(Path(spec_file).read_text(encoding="utf-8")))
    Path(out_file).write_text(json.dumps(result), encoding="utf-8")
