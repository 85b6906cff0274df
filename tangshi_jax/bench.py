"""Benchmark: training and sampling speed against what this machine's matrix units allow.

    python -m tangshi_jax.bench [--data poems.txt] [--platform cpu|gpu|tpu] [--json bench.json]
                                [--variants fused,before] [--profile DIR] [--against-torch]

Prints a table and (with --json) writes the figures. Everything is measured in this one
process after compiling, as the median of several timed windows. The model is the original
exercise's (2×128 LSTM, embedding 100, batch 100, the full head) unless flags ask for
another, so that figures stay comparable whatever the training presets become.

The ceiling is the rate of the head's three matrix products (forward, input gradient, weight
gradient) on this batch's shapes, measured with XLA and with numpy's BLAS: the faster of
the two is what this machine's units allow without new dependencies.
"""

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from tangshi_jax import data
from tangshi_jax.config import HEADS, ModelConfig, TrainConfig
from tangshi_jax.devices import PLATFORMS, batch_spec, describe_devices, peak_rss_mb, use_platform
from tangshi_jax.errors import TangshiError, run_cli
from tangshi_jax.head import cluster_bounds, tail_widths
from tangshi_jax.metrics import mean_nll
from tangshi_jax.model import GATES, init_params
from tangshi_jax.profile import PROFILE_STEPS
from tangshi_jax.request import PoemRequest
from tangshi_jax.sample import Asked, device_prosody, generate, make_plan, request_key, row_draws, stack_plans
from tangshi_jax.train import init_state, load_poems, make_steps
from tangshi_jax.train_flags import cutoff_list, require_positive


def flops_per_token(config: ModelConfig) -> float:
    """Matrix-product FLOPs of one training token: forward, then twice that for the backward pass."""
    forward, width = 0, config.embed
    for _ in range(config.layers):
        forward += 2 * (width + config.hidden) * GATES[config.cell] * config.hidden
        width = config.hidden
    if config.tied:  # the projection to the embedding's width, which the head reads
        forward += 2 * config.hidden * config.embed
        width = config.embed
    if config.head == "adaptive":
        bounds = cluster_bounds(config.vocab_size, config.cutoffs)
        tails = len(bounds) - 2
        forward += 2 * width * (bounds[1] + tails)
        for index, tail_width in enumerate(tail_widths(width, tails, config.head_div)):
            forward += 2 * tail_width * (width + bounds[index + 2] - bounds[index + 1])
    else:
        forward += 2 * width * config.vocab_size
    return 3.0 * forward


def timed_runs(run, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - started)
    return times


def median_seconds(run, repeats: int) -> float:
    return statistics.median(timed_runs(run, repeats))


PRODUCTS = ("forward", "input_gradient", "weight_gradient")


def matmul_rates(rows: int, width: int, vocab: int, repeats: int = 15) -> dict:
    """GFLOP/s of float32 products shaped like the head's over one batch (rows × width @ width ×
    vocab, its input gradient and its weight gradient), with XLA and with numpy's BLAS. Each is
    the best of `repeats` runs, what the units allow; the two take turns run by run, so that a
    shared machine's load falls on both alike. 'all' is the three together."""
    rng = np.random.default_rng(0)
    h = rng.standard_normal((rows, width), dtype=np.float32)
    w = rng.standard_normal((width, vocab), dtype=np.float32)
    g = rng.standard_normal((rows, vocab), dtype=np.float32)
    hx, wx, gx = jnp.asarray(h), jnp.asarray(w), jnp.asarray(g)
    xla = [jax.jit(lambda a, b: a @ b), jax.jit(lambda a, b: a @ b.T), jax.jit(lambda a, b: a.T @ b)]
    runs = {
        ("xla", name): (product, args) for name, product, args in zip(PRODUCTS, xla, [(hx, wx), (gx, wx), (hx, gx)])
    }
    runs.update({("numpy", name): (np.matmul, args) for name, args in zip(PRODUCTS, [(h, w), (g, w.T), (h.T, g)])})
    seconds = {key: float("inf") for key in runs}
    for product, args in runs.values():
        jax.block_until_ready(product(*args))
    for _ in range(repeats):
        for key, (product, args) in runs.items():
            seconds[key] = min(seconds[key], timed_runs(functools.partial(product, *args), 1)[0])
    flops = 2.0 * rows * width * vocab
    rates = {}
    for backend in ("xla", "numpy"):
        rates[backend] = {name: flops / seconds[backend, name] / 1e9 for name in PRODUCTS}
        rates[backend]["all"] = 3 * flops / sum(seconds[backend, name] for name in PRODUCTS) / 1e9
    return rates


def machine_name() -> str:
    return f"JAX {jax.__version__} on {describe_devices()}"


# Training variants that `--variants` measures side by side, as make_steps arguments; all but
# bfloat16 compute the same mathematics. Also accepted: stepsN (the head takes N time steps a
# loop trip), transposed and untransposed (the head's weight-gradient layout).
VARIANTS = {
    "fused": {},  # the default step
    "plain": {"fused_head": False},  # all logits, a plain log-softmax
    "bfloat16": {"dtype": "bfloat16"},  # the default step in bfloat16 activations and products
    "wavefront": {"wavefront": True},  # the stacked layers in one scan
    "autodiff": {"hand_gradients": False},  # the LSTM differentiated by autodiff of its scan
    # the earlier step (PERFORMANCE.md): the head one time step a loop trip, the LSTM differentiated by autodiff
    "before": {"head_steps": 1, "transposed": False, "hand_gradients": False},
    # the output layer, whatever --head says: one softmax over the vocabulary, or frequency clusters (--cutoffs)
    "full": {"head": "full"},
    "adaptive": {"head": "adaptive"},
}


def variant_settings(name: str) -> dict:
    if name in VARIANTS:
        return VARIANTS[name]
    if name.startswith("steps") and name[5:].isdigit() and int(name[5:]) > 0:
        return {"head_steps": int(name[5:])}
    if name in ("transposed", "untransposed"):
        return {"transposed": name == "transposed"}
    raise TangshiError(
        f"--variants: unknown variant {name!r}; choose from {', '.join(VARIANTS)}, "
        "stepsN (N time steps per head trip), transposed, untransposed"
    )


def compile_variants(train_config, model_config, variants, buckets, plan, batches) -> tuple[dict, dict, dict]:
    """Each variant's train and eval programs by bucket length, compiled one after another (the
    first variant's compile times kept), and its state after every program has run once, untimed.

    Each variant trains its own copy from the same start on the same batches; windows
    alternate between variants so that the machine's drift falls on all of them alike."""
    programs, states, compile_s = {}, {}, {"train": {}, "eval": {}}
    for variant in variants:
        settings = dict(variant_settings(variant))
        variant_model = dataclasses.replace(model_config, head=settings.pop("head", model_config.head))
        state = init_state(variant_model, train_config)
        variant_config = dataclasses.replace(train_config, dtype=settings.pop("dtype", "float32"))
        train_step, eval_step = make_steps(variant_model, variant_config, **settings)
        train_jit, eval_jit = jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)
        programs[variant] = {}
        for length in buckets:  # one after another, each timed alone
            spec = batch_spec(train_config.batch_size, length)
            started = time.perf_counter()
            train_program = train_jit.lower(state, spec).compile()
            compiled = time.perf_counter()
            programs[variant][length] = (train_program, eval_jit.lower(state["params"], spec).compile())
            if variant == variants[0]:
                compile_s["train"][str(length)] = compiled - started
                compile_s["eval"][str(length)] = time.perf_counter() - compiled
        for first in data.first_of_each_bucket(plan):  # run every program once, untimed
            train_program, eval_program = programs[variant][buckets[plan[first][0]]]
            state, _ = train_program(state, batches[first])
            eval_program(state["params"], batches[first])
        states[variant] = state
    return programs, states, compile_s


def bench_training(
    train_config: TrainConfig,
    model_config: ModelConfig,
    poems,
    vocab,
    windows: int,
    steps: int,
    log,
    variants=("fused",),
    profile_dir=None,
    others=None,
) -> dict:
    """Variants' windows alternate; `others` (name: a function that trains one window of the
    same batches elsewhere and returns its tokens/s) take their turn in the alternation."""
    others = others or {}
    train_data, val_data = data.prepare(poems, vocab, train_config.val_fraction, train_config.num_buckets)
    buckets = train_data.buckets
    plan = data.epoch_plan(train_data, train_config.batch_size, train_config.seed, 0)
    batches = [data.make_batch(train_data, b, rows, train_config.batch_size) for b, rows in plan]
    needed = len(buckets) + windows * steps + (PROFILE_STEPS if profile_dir else 0)
    if len(batches) < needed:
        raise TangshiError(
            f"the data gives {len(batches)} batches, the benchmark needs {needed}; "
            "use more poems or fewer --windows/--steps"
        )

    programs, states, compile_s = compile_variants(train_config, model_config, variants, buckets, plan, batches)
    compile_train, compile_eval = (sum(compile_s[kind].values()) for kind in ("train", "eval"))
    log(f"compiled {2 * len(buckets)} programs in {compile_train + compile_eval:.1f} s")

    rates, cursor = {name: [] for name in (*variants, *others)}, len(buckets)
    for _ in range(windows):
        window = range(cursor, cursor + steps)
        cursor += steps
        tokens = sum(float(batches[i]["mask"].sum()) for i in window)
        for variant in variants:
            state = states[variant]
            started = time.perf_counter()
            for i in window:
                state, _ = programs[variant][buckets[plan[i][0]]][0](state, batches[i])
            jax.block_until_ready(state)
            states[variant] = state
            rates[variant].append(tokens / (time.perf_counter() - started))
        for name, window_rate in others.items():
            rates[name].append(window_rate())
        log("  window: " + ", ".join(f"{v} {rates[v][-1]:,.0f}" for v in rates) + " tokens/s")
    train_rss = peak_rss_mb()
    if profile_dir:  # a few more steps of each variant, marked by name, in one trace
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            for variant in variants:
                with jax.profiler.TraceAnnotation(f"variant {variant}"):
                    for i in range(cursor, cursor + PROFILE_STEPS):
                        with jax.profiler.StepTraceAnnotation(variant, step_num=i):
                            states[variant], _ = programs[variant][buckets[plan[i][0]]][0](states[variant], batches[i])
                            jax.block_until_ready(states[variant])
        log(f"profile of {PROFILE_STEPS} steps of each variant written to {profile_dir}")

    state = states[variants[0]]
    eval_programs = {length: pair[1] for length, pair in programs[variants[0]].items()}
    val_s = median_seconds(lambda: mean_nll(eval_programs, state["params"], val_data, train_config.batch_size), 3)
    return {
        "buckets": list(buckets),
        "compile_s": compile_s,
        "compile_s_train": compile_train,
        "compile_s_eval": compile_eval,
        "train_tokens_per_s": statistics.median(rates[variants[0]]),
        "variants_tokens_per_s": {v: statistics.median(r) for v, r in rates.items()},
        "train_window_tokens_per_s": rates,
        "val_tokens_per_s": val_data.num_tokens / val_s,
        "padded_share": data.padded_share(train_data, train_config.batch_size),
        "positions_per_batch": int(np.mean([len(b["mask"].ravel()) for b in batches])),
        "train_peak_rss_mb": train_rss,
    }


def bench_sampling(model_config, vocab, params, max_len: int = 64, sizes=(1, 64, 1024)) -> dict:
    """Latency of writing full-length poems: free ones of max_len characters (the end is barred
    until then), and 七律 kept to rhyme and tones, the most constrained request."""
    begin = [vocab.index("日")] if "日" in vocab else []
    start_id, end_id = vocab.index(data.START), vocab.index(data.END)
    prosody = device_prosody(vocab)
    plans = {"": make_plan(vocab, max_len, begin, min_len=max_len)}
    key = request_key(0)
    if all(mark in vocab for mark in "，。") and max_len >= 64:
        plans["_rules"] = make_plan(vocab, max_len, begin, form="qilv", rhyme=True, tones=True)
    figures = {}
    for suffix, plan in plans.items():
        for num in sizes if not suffix else (64,):

            def run(plan=plan, num=num):
                return generate(
                    params,
                    stack_plans([plan], [num], num),
                    prosody,
                    row_draws(
                        [Asked(PoemRequest(num=num, candidates=1, repetition_penalty=0.0), key)], [num], num, len(vocab)
                    ),
                    model_config=model_config,
                    num=num,
                    max_len=max_len,
                    start_id=start_id,
                    end_id=end_id,
                )

            started = time.perf_counter()
            jax.block_until_ready(run())
            figures[f"sample_compile_s_{num}{suffix}"] = time.perf_counter() - started
            figures[f"sample_ms_{num}{suffix}"] = 1000 * median_seconds(run, 5)
    return figures


def adaptive_words(model: dict) -> str:
    """', adaptive head (cutoffs 1000,3000, div 4)' for an adaptive head, else nothing."""
    if model.get("head") != "adaptive":
        return ""
    return f", adaptive head (cutoffs {','.join(map(str, model['cutoffs']))}, div {model['head_div']:g})"


def table_rows(figures: dict, vocab_size: int, variants) -> list[tuple[str, str]]:
    """The printed table: each measure in words, rates beside the ceiling they are a share of."""
    model, ceiling = figures["model"], figures["ceiling_tokens_per_s"]

    def products(backend):
        rate = figures["matmul_gflops_by_backend"][backend]
        return (
            f"{rate['all']:,.0f} GFLOP/s (forward {rate['forward']:,.0f}, input gradient "
            f"{rate['input_gradient']:,.0f}, weight gradient {rate['weight_gradient']:,.0f})"
        )

    rows = [
        ("machine", figures["machine"]),
        (
            "model",
            f"{model['layers']}×{model['hidden']} {model['cell']}, embedding {model['embed']}"
            f"{', tied head' if model['tied'] else ''}{adaptive_words(model)}, batch {figures['batch_size']}, "
            f"{vocab_size:,} characters",
        ),
        ("matrix products, XLA (float32)", products("xla")),
        ("matrix products, numpy's BLAS", products("numpy")),
        ("FLOPs per training token", f"{figures['flops_per_token'] / 1e6:.2f} M"),
        (
            "ceiling",
            f"{ceiling:,.0f} tokens/s (from {'XLA' if figures['matmul_backend'] == 'xla' else 'numpy'}'s rate)",
        ),
        (
            "training",
            f"{figures['train_tokens_per_s']:,.0f} tokens/s ({figures['train_tokens_per_s'] / ceiling:.0%} of ceiling)",
        ),
        *[
            (f"training, {v}", f"{r:,.0f} tokens/s ({r / ceiling:.0%})")
            for v, r in figures["variants_tokens_per_s"].items()
            if len(variants) > 1
        ],
    ]
    if "torch" in figures:
        torch_rate = figures["torch"]["train_tokens_per_s"]
        rows.append(
            (
                f"training, PyTorch {figures['torch']['version']} ({figures['torch']['allocator']})",
                f"{torch_rate:,.0f} tokens/s ({torch_rate / ceiling:.0%}); JAX's default step is "
                f"{figures['train_tokens_per_s'] / torch_rate:.2f}× it",
            )
        )
    rows += [
        (
            "validation",
            f"{figures['val_tokens_per_s']:,.0f} tokens/s "
            f"({figures['val_tokens_per_s'] / (3 * ceiling):.0%} of its ceiling)",
        ),
        (
            "compile, training steps",
            f"{figures['compile_s_train']:.1f} s for {len(figures['buckets'])} buckets, "
            "one after another (train waits for these)",
        ),
        ("compile, evaluation steps", f"{figures['compile_s_eval']:.1f} s (train builds these during the first epoch)"),
        ("padding", f"{figures['padded_share']:.1%} of trained positions"),
        (
            "sample 1 poem × 64 chars",
            f"{figures['sample_ms_1']:.1f} ms (compile {figures['sample_compile_s_1']:.1f} s)",
        ),
        ("sample 64 poems × 64 chars", f"{figures['sample_ms_64']:.1f} ms"),
        ("sample 1,024 poems × 64 chars", f"{figures['sample_ms_1024']:.1f} ms"),
        ("peak memory, training", f"{figures['train_peak_rss_mb']:,.0f} MB"),
        ("peak memory, whole run", f"{figures['peak_rss_mb']:,.0f} MB"),
    ]
    if "sample_ms_64_rules" in figures:
        rules_ms = figures["sample_ms_64_rules"]
        rows.insert(
            -2,
            (
                "sample 64 七律 with rhyme and tones",
                f"{rules_ms:.1f} ms ({rules_ms / figures['sample_ms_64']:.2f}× free)",
            ),
        )
    return rows


def build_parser() -> argparse.ArgumentParser:
    """Model and batch flags default to the original exercise's configuration: the dataclass defaults."""
    model_defaults = {field.name: field.default for field in dataclasses.fields(ModelConfig)}
    parser = argparse.ArgumentParser(prog="python -m tangshi_jax.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="poems.txt")
    parser.add_argument("--max-poems", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--cell", choices=("lstm", "gru", "rnn"), default=model_defaults["cell"])
    parser.add_argument("--layers", type=int, default=model_defaults["layers"])
    parser.add_argument("--hidden", type=int, default=model_defaults["hidden"])
    parser.add_argument("--embed", type=int, default=model_defaults["embed"])
    parser.add_argument("--tied", action="store_true", help="the head reuses the embedding through a projection")
    parser.add_argument("--head", choices=HEADS, default="full", help="output layer: full or adaptive")
    parser.add_argument(
        "--cutoffs", default=None, metavar="N,M,...", help="adaptive head's clusters (default 1000,3000)"
    )
    parser.add_argument(
        "--tied-tails",
        action=argparse.BooleanOptionalAction,
        default=ModelConfig.tied_tails,
        help="adaptive head of a tied model: tails read the embedding through a projection, or own weights",
    )
    parser.add_argument("--head-div", type=float, default=ModelConfig.head_div, help="adaptive head's width divisor")
    parser.add_argument("--windows", type=int, default=5, help="timed windows; the median is reported")
    parser.add_argument("--steps", type=int, default=20, help="training steps per window")
    parser.add_argument("--platform", choices=PLATFORMS, default=None)
    parser.add_argument(
        "--variants",
        default="fused",
        help="comma-separated training variants measured side by side in alternating windows: "
        "fused (the default step), before (the earlier step, PERFORMANCE.md: the head one time "
        "step a loop trip, the LSTM differentiated by autodiff), autodiff (the LSTM "
        "differentiated by autodiff of its scan), wavefront (the stacked layers in one scan), plain "
        "(all logits and a plain log-softmax), bfloat16 (bfloat16 activations and products), "
        "stepsN (the head takes N time steps a loop trip), transposed, untransposed "
        "(the head's weight-gradient layout), full, adaptive (the output layer, with --cutoffs)",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help=f"write a jax.profiler trace of {PROFILE_STEPS} more steps of each variant to DIR",
    )
    parser.add_argument(
        "--against-torch",
        action="store_true",
        help="also train the same model on the same batches in PyTorch (if installed), "
        "in a child process with glibc's allocator tuned, and print both figures",
    )
    parser.add_argument("--json", default=None, help="write the figures to this file")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    require_positive(args, ("batch_size", "windows", "steps", "max_poems", "layers", "hidden", "embed"))
    variants = tuple(args.variants.split(","))
    for variant in variants:
        variant_settings(variant)
    if args.against_torch:
        from tangshi_jax import torch_model  # only here: PyTorch is never a dependency

        torch_model.require_torch()
    use_platform(args.platform)
    # Compile times are measured cold; train and sample use the on-disk cache (README).
    jax.config.update("jax_enable_compilation_cache", False)

    def log(message):
        print(message, file=sys.stderr)

    machine = machine_name()
    train_config = TrainConfig(data=args.data, batch_size=args.batch_size, max_poems=args.max_poems)
    model_settings = dict(
        cell=args.cell,
        layers=args.layers,
        hidden=args.hidden,
        embed=args.embed,
        tied=args.tied,
        relu_head=False,
        head=args.head,
        cutoffs=cutoff_list(args.cutoffs) or ModelConfig.cutoffs,
        head_div=args.head_div,
        tied_tails=args.tied_tails,
    )
    poems = load_poems(train_config, log).poems[: train_config.max_poems]
    vocab = data.build_vocab(poems)
    model_config = ModelConfig(vocab_size=len(vocab), **model_settings)
    # Sampling first, on a fresh process's memory; its cost does not depend on the weights.
    sampled = bench_sampling(model_config, vocab, init_params(model_config, jax.random.key(0)))
    torch_child = torch_model.Child(model_config, train_config, vocab, args.steps, log) if args.against_torch else None
    trained = bench_training(
        train_config,
        model_config,
        poems,
        vocab,
        args.windows,
        args.steps,
        log,
        variants,
        args.profile,
        {"torch": torch_child.window} if torch_child else None,
    )
    width = model_config.embed if model_config.tied else model_config.hidden
    rates = matmul_rates(trained["positions_per_batch"], width, model_config.vocab_size)
    best = max(rates, key=lambda backend: rates[backend]["all"])
    per_token = flops_per_token(model_config)
    ceiling = rates[best]["all"] * 1e9 / per_token
    figures = {
        "machine": machine,
        "platform": jax.default_backend(),
        "batch_size": args.batch_size,
        "model": model_settings,
        "matmul_gflops_by_backend": rates,
        "matmul_backend": best,
        "matmul_gflops": rates[best]["all"],
        "flops_per_token": per_token,
        "ceiling_tokens_per_s": ceiling,
        **trained,
        **sampled,
    }
    if torch_child:
        figures["torch"] = dict(
            torch_child.close(),
            train_tokens_per_s=figures["variants_tokens_per_s"].pop("torch"),
            train_window_tokens_per_s=figures["train_window_tokens_per_s"].pop("torch"),
        )
    figures["peak_rss_mb"] = peak_rss_mb()

    rows = table_rows(figures, len(vocab), variants)
    width = max(len(name) for name, _ in rows)
    print(f"| {'measure'.ljust(width)} | figure |\n|{'-' * (width + 2)}|--------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(figures, out, indent=2)


if __name__ == "__main__":
    sys.exit(run_cli(main))
