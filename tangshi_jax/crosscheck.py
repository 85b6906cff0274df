"""The same training steps on two platforms, compared within bounds that rounding allows.

    python -m tangshi_jax.crosscheck --platform gpu [--reference cpu] [--data poems.txt] [--steps 3]

`.ci/accelerator-check` runs it to show that the GPU computes the gradients the CPU does.
Both sides start from the same parameters and take the same batches, with float32 products at
full precision (a GPU's default TF32 would be a different computation). The reference sums
each batch as two halves, so that even a CPU against itself (the suite's stand-in for a GPU)
compares two real orders of the same sums instead of one computation with itself.

What is compared, and why these bounds:
- Step 1, same parameters: each parameter's gradient, as the norm of the difference relative
  to the norm of the reference's (an element near zero has no useful relative error), within
  GRADIENT_TOLERANCE; the loss within LOSS_ROUNDING of its size.
- Steps 2..N: the parameters have moved apart. RMSprop divides each step by the size of its
  own gradient, so a weight whose gradient is near zero can move by a different amount on each
  side; comparing weights after a step says nothing. The loss, though, is a smooth function of
  the parameters: to first order |L(a) - L(b)| <= |grad L| * |a - b|, so each later step's loss
  gap is bounded by that product measured then (doubled, for the second-order term, which is
  negligible while |a - b| is tiny), plus the same rounding as step 1.
"""

import argparse
import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tangshi_jax import data
from tangshi_jax.config import PRESETS, ModelConfig, preset_configs
from tangshi_jax.devices import PLATFORMS, use_platform
from tangshi_jax.errors import TangshiError, run_cli
from tangshi_jax.train import init_state, make_batch_nll, make_optimizer

# float32 has eps = 1.2e-7. A loss is a mean over a few thousand positions summed as a tree
# (error ~ eps * log2(n)), after ~80 recurrent steps that each round the features (~eps a
# step): 1e-5 of the loss, ~80 eps, is above both and far below any real difference (a wrong
# kernel or a TF32 product moves the loss by 1e-4..1e-2).
LOSS_ROUNDING = 1e-5
# A gradient goes back through the same ~80 steps and through sums over the batch whose terms
# cancel; a real error (a wrong transpose, a dropped term, TF32) moves it by 1e-3 or more.
# Measured on the development CPU against its own two-halves order: 2.6e-7 (full head) and
# 2.9e-7 (adaptive), on the first 3 batches of poems.txt.
GRADIENT_TOLERANCE = 1e-4


class Step(NamedTuple):
    loss: float
    grads: dict  # numpy, unclipped, of the mean loss
    params: dict  # numpy, before the step


def leaf_names(tree) -> list[str]:
    paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(tree)]
    return ["/".join(str(getattr(key, "key", key)) for key in path) for path in paths]


def global_norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(leaf, dtype=np.float64)) for leaf in jax.tree_util.tree_leaves(tree))))


def difference(a, b):
    return jax.tree_util.tree_map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)


def gradient_gaps(grads, reference) -> dict[str, float]:
    """Each parameter's |grads - reference| / |reference| (0 where the reference is exactly 0 and so is grads)."""
    gaps = {}
    leaves = zip(leaf_names(reference), jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(reference))
    for name, a, b in leaves:
        gap = float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
        size = float(np.linalg.norm(np.asarray(b, np.float64)))
        gaps[name] = gap / size if size else (0.0 if gap == 0 else np.inf)
    return gaps


def loss_bound(step: Step, other: Step) -> float:
    """How far apart the two sides' losses may be at this step (module docstring)."""
    moved = global_norm(difference(other.params, step.params))
    return LOSS_ROUNDING * abs(step.loss) + 2 * global_norm(step.grads) * moved


def compare(steps: list[Step], reference: list[Step]) -> tuple[list[str], list[str]]:
    """(lines to print, failures): step 1's gradients and every step's loss against its bound."""
    lines, failures = [], []
    gaps = gradient_gaps(steps[0].grads, reference[0].grads)
    worst = max(gaps, key=gaps.get)
    lines.append(f"step 1 gradients: largest relative gap {gaps[worst]:.1e} ({worst}), bound {GRADIENT_TOLERANCE:.0e}")
    failures += [
        f"step 1: the gradient of {name} is {gap:.1e} of its size from the reference's (bound {GRADIENT_TOLERANCE:.0e})"
        for name, gap in gaps.items()
        if not gap <= GRADIENT_TOLERANCE
    ]
    for number, (step, ref) in enumerate(zip(steps, reference), 1):
        gap, bound = abs(step.loss - ref.loss), loss_bound(ref, step)
        lines.append(f"step {number} loss: {step.loss:.7f} against {ref.loss:.7f}, gap {gap:.1e}, bound {bound:.1e}")
        if not gap <= bound:
            apart = f"losses {step.loss:.7f} and {ref.loss:.7f} are {gap:.1e} apart"
            failures.append(f"step {number}: {apart} (bound {bound:.1e})")
    return lines, failures


def run_steps(platform: str, state: dict, batches: list[dict], batch_nll, optimizer, halves: bool) -> list[Step]:
    """`len(batches)` plain steps (no dropout) on the platform's first device; with halves, each
    batch's loss and gradients are the sums of its two halves'."""
    device = jax.devices(platform)[0]

    grad_of_sum = jax.jit(jax.value_and_grad(batch_nll, has_aux=True))

    @jax.jit
    def update(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    with jax.default_matmul_precision("highest"):
        params = jax.device_put(state["params"], device)
        opt_state = jax.device_put(state["opt_state"], device)
        steps = []
        for batch in batches:
            rows = len(batch["inputs"])
            parts = [slice(0, rows // 2), slice(rows // 2, rows)] if halves else [slice(0, rows)]
            total, tokens, grads = 0.0, 0.0, None
            for part in parts:
                piece = jax.device_put({key: value[part] for key, value in batch.items()}, device)
                (nll_sum, count), part_grads = grad_of_sum(params, piece)
                total, tokens = total + nll_sum, tokens + count
                grads = part_grads if grads is None else jax.tree_util.tree_map(jnp.add, grads, part_grads)
            grads = jax.tree_util.tree_map(lambda g, n=tokens: g / n, grads)
            steps.append(Step(float(total / tokens), jax.device_get(grads), jax.device_get(params)))
            params, opt_state = update(params, opt_state, grads)
    return steps


def first_batches(data_path: str, preset: str, steps: int, max_poems: int, head: str | None):
    """The preset's model and optimizer, its initial state, and the first `steps` batches of
    the first `max_poems` poems (one bucket: one shape to compile on each side)."""
    model_settings, train_config = preset_configs(preset, data=data_path, head=head)
    train_config = dataclasses.replace(train_config, max_poems=max_poems, num_buckets=1)
    model_settings = {**model_settings, "dropout": 0.0}
    dataset = data.make_dataset(data.read_corpus(data_path), train_config)
    model_config = ModelConfig(vocab_size=len(dataset.vocab), **model_settings)
    plan = data.epoch_plan(dataset.train, train_config.batch_size, train_config.seed, 0)[:steps]
    if len(plan) < steps:
        raise TangshiError(f"--steps {steps}: {data_path} gives only {len(plan)} batches; ask for fewer steps")
    batches = [data.make_batch(dataset.train, index, rows, train_config.batch_size) for index, rows in plan]
    state = jax.device_get(init_state(model_config, train_config))
    return model_config, train_config, state, batches


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tangshi_jax.crosscheck", description=__doc__.split("\n")[0])
    parser.add_argument("--platform", choices=PLATFORMS, required=True, help="the platform checked")
    parser.add_argument("--reference", choices=PLATFORMS, default="cpu", help="the platform trusted (default cpu)")
    parser.add_argument("--data", default="poems.txt")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="original")
    parser.add_argument("--head", choices=("full", "adaptive"), default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-poems", type=int, default=2000)
    args = parser.parse_args(argv)
    use_platform(None)
    for name in {args.platform, args.reference}:
        try:
            jax.devices(name)
        except RuntimeError:
            raise TangshiError(f"--platform {name}: JAX finds no {name} device; install JAX for it") from None
    model_config, train_config, state, batches = first_batches(
        args.data, args.preset, args.steps, args.max_poems, args.head
    )
    batch_nll = make_batch_nll(model_config, train_config)
    optimizer = make_optimizer(train_config, len(batches))
    checked = run_steps(args.platform, state, batches, batch_nll, optimizer, halves=False)
    reference = run_steps(args.reference, state, batches, batch_nll, optimizer, halves=True)
    print(
        f"crosscheck: {args.platform} against {args.reference} (each batch in two halves there), "
        f"preset {args.preset} with the {model_config.head} head, {len(batches)} steps of "
        f"{train_config.batch_size} poems, float32 products at full precision"
    )
    lines, failures = compare(checked, reference)
    print("\n".join(lines))
    if failures:
        raise TangshiError(f"{args.platform} disagrees with {args.reference}: {failures[0]}")
    print(f"crosscheck passed: {args.platform} trains as {args.reference} does, within rounding")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
