"""The same model in PyTorch, for `bench --against-torch` only: PyTorch is never a dependency.

    python -m tangshi_jax.bench --against-torch   (runs this module in a child process)

A batched `nn.LSTM` (or GRU, RNN) between an embedding and a linear head with a plain
cross-entropy (or, for the adaptive head, PyTorch's `nn.AdaptiveLogSoftmaxWithLoss`),
RMSprop as the original after clipping at norm 1: the best ordinary PyTorch way to train
the original exercise. It trains on the very batches bench times JAX on. glibc's
allocator settles before the process starts, so bench re-executes this module in a child
with the tuned setting (TORCH_ALLOCATOR), PyTorch's best on the CPU (1.0× to 2.3× its default
allocator's speed, PERFORMANCE.md).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tangshi_jax import data
from tangshi_jax.config import ModelConfig, TrainConfig, from_dict, to_dict
from tangshi_jax.errors import TangshiError
from tangshi_jax.head import cluster_bounds

TORCH_ALLOCATOR = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"


def require_torch():
    try:
        import torch
    except ImportError:
        raise TangshiError(
            "--against-torch needs PyTorch, which tangshi-jax does not install: "
            "pip install torch (a CPU build), or leave out --against-torch"
        ) from None
    return torch


def make_model(model_config: ModelConfig):
    torch = require_torch()
    if model_config.tied or model_config.relu_head or model_config.dropout:
        raise TangshiError("--against-torch compares the plain model only: leave out --tied")
    recurrent = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[model_config.cell]

    adaptive = model_config.head == "adaptive"

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(model_config.vocab_size, model_config.embed)
            self.recurrent = recurrent(model_config.embed, model_config.hidden, model_config.layers, batch_first=True)
            if adaptive:  # PyTorch's own: tails hidden // div**(i+1) wide, no tail bias (our head takes that form)
                self.head = torch.nn.AdaptiveLogSoftmaxWithLoss(
                    model_config.hidden,
                    model_config.vocab_size,
                    list(cluster_bounds(model_config.vocab_size, model_config.cutoffs)[1:-1]),
                    div_value=model_config.head_div,
                    head_bias=True,
                )
            else:
                self.head = torch.nn.Linear(model_config.hidden, model_config.vocab_size)

        def forward(self, inputs):
            """Logits (batch, time, vocab), or with the adaptive head the features it reads."""
            features, _ = self.recurrent(self.embed(inputs))
            return features if adaptive else self.head(features)

        def target_nll(self, inputs, targets):
            """-log p(target), flat over (batch × time)."""
            out = self(inputs.long())
            if adaptive:
                return -self.head(out.flatten(0, 1), targets.long().flatten()).output
            return torch.nn.functional.cross_entropy(out.flatten(0, 1), targets.long().flatten(), reduction="none")

    return Model()


def load_jax_params(model, params) -> None:
    """Copy the JAX model's parameters (an LSTM's gates are i, f, g, o in both) into the PyTorch one."""
    torch = require_torch()

    def tensor(value):
        return torch.from_numpy(np.array(value, np.float32))  # a writable copy

    with torch.no_grad():
        model.embed.weight.copy_(tensor(params["embed"]["embedding"]))
        for index in range(model.recurrent.num_layers):
            layer = params[f"layer_{index}"]
            getattr(model.recurrent, f"weight_ih_l{index}").copy_(tensor(layer["input"]["kernel"]).T)
            getattr(model.recurrent, f"bias_ih_l{index}").copy_(tensor(layer["input"]["bias"]))
            getattr(model.recurrent, f"weight_hh_l{index}").copy_(tensor(layer["cell"]["recurrent"]["kernel"]).T)
            getattr(model.recurrent, f"bias_hh_l{index}").zero_()
        if isinstance(model.head, torch.nn.AdaptiveLogSoftmaxWithLoss):
            model.head.head.weight.copy_(tensor(params["head_kernel"]).T)
            model.head.head.bias.copy_(tensor(params["head_bias"]))
            for index, (projection, kernel) in enumerate(model.head.tail):
                projection.weight.copy_(tensor(params[f"tail_{index}_projection"]).T)
                kernel.weight.copy_(tensor(params[f"tail_{index}_kernel"]).T)
        else:
            model.head.weight.copy_(tensor(params["head"]["kernel"]).T)
            model.head.bias.copy_(tensor(params["head"]["bias"]))


def make_train_step(model, lr: float):
    """One step: mean cross-entropy over the masked positions, clip at norm 1, RMSprop."""
    torch = require_torch()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=lr, alpha=0.99, eps=1e-8)

    def step(batch):
        inputs, targets, mask = (torch.from_numpy(np.asarray(batch[key])) for key in ("inputs", "targets", "mask"))
        nll = model.target_nll(inputs, targets)
        loss = (nll * mask.flatten()).sum() / mask.sum().clamp(min=1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())

    return step


class Trainer:
    """The PyTorch model on bench's batches: every bucket once untimed, then one timed window
    of `steps` batches at each call, from where bench's own windows start."""

    def __init__(self, spec: dict):
        torch = require_torch()
        torch.set_num_threads(os.cpu_count() or 1)
        torch.manual_seed(0)
        model_config, train_config = from_dict(ModelConfig, spec["model"]), from_dict(TrainConfig, spec["train"])
        poems = data.read_corpus(Path(train_config.data)).poems[: train_config.max_poems]
        train_data, _ = data.prepare(poems, spec["vocab"], train_config.val_fraction, train_config.num_buckets)
        plan = data.epoch_plan(train_data, train_config.batch_size, train_config.seed, 0)
        self.batches = [data.make_batch(train_data, b, rows, train_config.batch_size) for b, rows in plan]
        self.step = make_train_step(make_model(model_config), train_config.lr)
        for first in data.first_of_each_bucket(plan):
            self.step(self.batches[first])
        self.cursor, self.steps = len(train_data.buckets), spec["steps"]
        self.version, self.threads = torch.__version__, torch.get_num_threads()

    def window(self) -> float:
        window = self.batches[self.cursor : self.cursor + self.steps]
        self.cursor += self.steps
        started = time.perf_counter()
        for batch in window:
            self.step(batch)
        return sum(float(b["mask"].sum()) for b in window) / (time.perf_counter() - started)


class Child:
    """A Trainer in a fresh process whose glibc allocator is tuned (GLIBC_TUNABLES must be set
    before a process starts), driven a window at a time so that bench alternates its own
    windows with PyTorch's: the machine's drift falls on both alike."""

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig, vocab, steps: int, log):
        log(f"PyTorch: the same batches in a child process with GLIBC_TUNABLES={TORCH_ALLOCATOR}")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tangshi_jax.torch_model"],
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=dict(os.environ, GLIBC_TUNABLES=TORCH_ALLOCATOR),
        )
        self.ask(
            json.dumps(
                {"model": to_dict(model_config), "train": to_dict(train_config), "vocab": list(vocab), "steps": steps}
            )
        )

    def ask(self, line: str) -> dict:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            self.process.wait()
            raise TangshiError(
                f"the PyTorch benchmark failed (exit code {self.process.returncode}; its error is above)"
            )
        return json.loads(answer)

    def window(self) -> float:
        return self.ask("window")["tokens_per_s"]

    def close(self) -> dict:
        figures = self.ask("done")
        self.process.wait()
        return dict(figures, allocator="glibc tuned")


def serve() -> None:
    """The child's side: a spec line, then 'window' lines answered with a rate, then 'done'."""
    trainer = Trainer(json.loads(sys.stdin.readline()))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() == "window":
            print(json.dumps({"tokens_per_s": trainer.window()}), flush=True)
        else:
            print(json.dumps({"version": trainer.version, "threads": trainer.threads}), flush=True)
            return


if __name__ == "__main__":
    serve()
