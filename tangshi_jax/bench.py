"""Benchmark: training and sampling speed against what this machine's matrix units allow.

    python -m tangshi_jax.bench [--data poems.txt] [--platform cpu|gpu|tpu] [--json bench.json]

Prints a table and (with --json) writes the figures. Everything is measured in this one
process after compiling, as the median of several timed windows.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from tangshi_jax import data
from tangshi_jax.config import ModelConfig, TrainConfig
from tangshi_jax.devices import PLATFORMS, describe_devices, peak_rss_mb, use_platform
from tangshi_jax.errors import TangshiError, run_cli
from tangshi_jax.model import GATES, init_params
from tangshi_jax.sample import device_prosody, generate, make_plan
from tangshi_jax.train import batch_spec, evaluate, init_state, load_poems, make_steps, require_positive


def flops_per_token(config: ModelConfig) -> float:
    """Matrix-product FLOPs of one training token: forward, then twice that for the backward pass."""
    forward, width = 0, config.embed
    for _ in range(config.layers):
        forward += 2 * (width + config.hidden) * GATES[config.cell] * config.hidden
        width = config.hidden
    if config.tied:                  # the projection to the embedding's width, which the head reads
        forward += 2 * config.hidden * config.embed
        width = config.embed
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


def matmul_rate(tokens: int, hidden: int, vocab: int, repeats: int = 15) -> float:
    """FLOP/s of float32 products shaped like the head's forward and two backward products."""
    key = jax.random.key(0)
    h = jax.random.normal(key, (tokens, hidden))
    w = jax.random.normal(key, (hidden, vocab))
    g = jax.random.normal(key, (tokens, vocab))
    products = [(jax.jit(lambda a, b: a @ b), (h, w)), (jax.jit(lambda a, b: a @ b.T), (g, w)),
                (jax.jit(lambda a, b: a.T @ b), (h, g))]
    seconds = 0.0
    for product, args in products:
        jax.block_until_ready(product(*args))
        seconds += min(timed_runs(lambda: product(*args), repeats))   # what the units allow: the best run
    return 3 * 2.0 * tokens * hidden * vocab / seconds


def machine_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores; JAX {jax.__version__} on {describe_devices()}"


VARIANTS = ("fused", "plain", "bfloat16")


def bench_training(train_config: TrainConfig, model_config: ModelConfig, poems, vocab, windows: int,
                   steps: int, log, variants=("fused",)) -> dict:
    train_data, val_data = data.prepare(poems, vocab, train_config.val_fraction, train_config.num_buckets)
    buckets = train_data.buckets
    plan = data.epoch_plan(train_data, train_config.batch_size, train_config.seed, 0)
    batches = [data.make_batch(train_data, b, rows, train_config.batch_size) for b, rows in plan]
    needed = len(buckets) + windows * steps
    if len(batches) < needed:
        raise TangshiError(f"the data gives {len(batches)} batches, the benchmark needs {needed}; "
                           "use more poems or fewer --windows/--steps")

    # Each variant trains its own copy from the same start on the same batches; windows
    # alternate between variants so that the machine's drift falls on all of them alike.
    programs, states, compile_s = {}, {}, {}
    for variant in variants:
        state = init_state(model_config, train_config)
        variant_config = dataclasses.replace(train_config, dtype="bfloat16" if variant == "bfloat16" else "float32")
        train_step, eval_step = make_steps(model_config, variant_config, fused_head=variant != "plain")
        train_jit, eval_jit = jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)
        programs[variant] = {}
        for length in buckets:
            spec = batch_spec(train_config.batch_size, length)
            started = time.perf_counter()
            programs[variant][length] = (train_jit.lower(state, spec).compile(),
                                         eval_jit.lower(state["params"], spec).compile())
            if variant == variants[0]:
                compile_s[length] = time.perf_counter() - started
        for bucket_index in range(len(buckets)):        # run every program once, untimed
            first = next((i for i, (b, _) in enumerate(plan) if b == bucket_index), None)
            if first is None:                            # a bucket that only validation poems reach
                continue
            state, _ = programs[variant][buckets[bucket_index]][0](state, batches[first])
            programs[variant][buckets[bucket_index]][1](state["params"], batches[first])
        states[variant] = state
    log(f"compiled {2 * len(buckets)} programs in {sum(compile_s.values()):.1f} s")

    rates, cursor = {variant: [] for variant in variants}, len(buckets)
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
        log("  window: " + ", ".join(f"{v} {rates[v][-1]:,.0f}" for v in variants) + " tokens/s")
    train_rss = peak_rss_mb()

    state = states[variants[0]]
    eval_programs = {length: pair[1] for length, pair in programs[variants[0]].items()}
    val_s = median_seconds(lambda: evaluate(eval_programs, state["params"], val_data, train_config.batch_size), 3)
    return {"buckets": list(buckets), "compile_s": {str(k): v for k, v in compile_s.items()},
            "compile_s_total": sum(compile_s.values()), "train_tokens_per_s": statistics.median(rates[variants[0]]),
            "variants_tokens_per_s": {v: statistics.median(r) for v, r in rates.items()},
            "train_window_tokens_per_s": rates, "val_tokens_per_s": val_data.num_tokens / val_s,
            "padded_share": data.padded_share(train_data, train_config.batch_size),
            "positions_per_batch": int(np.mean([len(b["mask"].ravel()) for b in batches])),
            "train_peak_rss_mb": train_rss}


def bench_sampling(model_config, vocab, params, max_len: int = 64, sizes=(1, 64, 1024)) -> dict:
    """Latency of writing full-length poems: free ones of max_len characters (the end is barred
    until then), and 七律 kept to rhyme and tones, the most constrained request."""
    begin = [vocab.index("日")] if "日" in vocab else []
    start_id, end_id = vocab.index(data.START), vocab.index(data.END)
    prosody = device_prosody(vocab)
    plans = {"": make_plan(vocab, max_len, begin, min_len=max_len)}
    if all(mark in vocab for mark in "，。") and max_len >= 64:
        plans["_rules"] = make_plan(vocab, max_len, begin, form="qilv", rhyme=True, tones=True)
    figures = {}
    for suffix, plan in plans.items():
        for num in sizes if not suffix else (64,):
            def run():
                return generate(params, plan, prosody, jax.random.key(0), jnp.float32(0.8),
                                model_config=model_config, num=num, max_len=max_len, top_k=0, greedy=False,
                                start_id=start_id, end_id=end_id)
            started = time.perf_counter()
            jax.block_until_ready(run())
            figures[f"sample_compile_s_{num}{suffix}"] = time.perf_counter() - started
            figures[f"sample_ms_{num}{suffix}"] = 1000 * median_seconds(run, 5)
    return figures


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tangshi_jax.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="poems.txt")
    parser.add_argument("--max-poems", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--cell", choices=("lstm", "gru", "rnn"), default="lstm")
    parser.add_argument("--windows", type=int, default=5, help="timed windows; the median is reported")
    parser.add_argument("--steps", type=int, default=20, help="training steps per window")
    parser.add_argument("--platform", choices=PLATFORMS, default=None)
    parser.add_argument("--variants", default="fused",
                        help="comma-separated training variants measured side by side: fused (the default "
                             "head and loss), plain (all logits and a plain log-softmax), bfloat16 (fused, "
                             "with bfloat16 activations and products)")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    require_positive(args, ("batch_size", "windows", "steps", "max_poems"))
    use_platform(args.platform)
    # Compile times are measured cold; train and sample use the on-disk cache (README).
    jax.config.update("jax_enable_compilation_cache", False)

    def log(message):
        print(message, file=sys.stderr)

    machine = machine_name()
    train_config = TrainConfig(data=args.data, batch_size=args.batch_size, max_poems=args.max_poems)
    model_settings = dict(cell=args.cell, layers=2, hidden=128, embed=100, relu_head=False)
    variants = tuple(args.variants.split(","))
    if not set(variants) <= set(VARIANTS):
        raise TangshiError(f"--variants {args.variants}: choose from {', '.join(VARIANTS)}")
    poems = load_poems(train_config, log).poems[:train_config.max_poems]
    vocab = data.build_vocab(poems)
    model_config = ModelConfig(vocab_size=len(vocab), **model_settings)
    # Sampling first, on a fresh process's memory; its cost does not depend on the weights.
    sampled = bench_sampling(model_config, vocab, init_params(model_config, jax.random.key(0)))
    trained = bench_training(train_config, model_config, poems, vocab, args.windows, args.steps, log, variants)
    rate = matmul_rate(trained["positions_per_batch"], model_config.hidden, model_config.vocab_size)
    per_token = flops_per_token(model_config)
    figures = {"machine": machine, "platform": jax.default_backend(), "batch_size": args.batch_size,
               "cell": args.cell, "matmul_gflops": rate / 1e9, "flops_per_token": per_token,
               "ceiling_tokens_per_s": rate / per_token, **trained, **sampled, "peak_rss_mb": peak_rss_mb()}
    ceiling = figures["ceiling_tokens_per_s"]
    rows = [("machine", machine),
            ("matrix products (float32)", f"{rate / 1e9:,.0f} GFLOP/s"),
            ("FLOPs per training token", f"{per_token / 1e6:.2f} M"),
            ("ceiling", f"{ceiling:,.0f} tokens/s"),
            ("training", f"{figures['train_tokens_per_s']:,.0f} tokens/s ({figures['train_tokens_per_s'] / ceiling:.0%} of ceiling)"),
            *[(f"training, {v}", f"{r:,.0f} tokens/s ({r / ceiling:.0%})")
              for v, r in figures["variants_tokens_per_s"].items() if len(variants) > 1],
            ("validation", f"{figures['val_tokens_per_s']:,.0f} tokens/s ({figures['val_tokens_per_s'] / (3 * ceiling):.0%} of its ceiling)"),
            ("compile, all training shapes", f"{figures['compile_s_total']:.1f} s for {len(figures['buckets'])} buckets × 2 steps"),
            ("padding", f"{figures['padded_share']:.1%} of trained positions"),
            ("sample 1 poem × 64 chars", f"{figures['sample_ms_1']:.1f} ms (compile {figures['sample_compile_s_1']:.1f} s)"),
            ("sample 64 poems × 64 chars", f"{figures['sample_ms_64']:.1f} ms"),
            ("sample 1,024 poems × 64 chars", f"{figures['sample_ms_1024']:.1f} ms"),
            ("peak memory, training", f"{figures['train_peak_rss_mb']:,.0f} MB"),
            ("peak memory, whole run", f"{figures['peak_rss_mb']:,.0f} MB")]
    if "sample_ms_64_rules" in figures:
        rules_ms = figures["sample_ms_64_rules"]
        rows.insert(-2, ("sample 64 七律 with rhyme and tones", f"{rules_ms:.1f} ms "
                                                                f"({rules_ms / figures['sample_ms_64']:.2f}× free)"))
    width = max(len(name) for name, _ in rows)
    print(f"| {'measure'.ljust(width)} | figure |\n|{'-' * (width + 2)}|--------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(figures, out, indent=2)


if __name__ == "__main__":
    sys.exit(run_cli(main))
