"""Training on a mesh of forced host devices, in a process of its own (JAX fixes the device
count when it starts). tests/test_mesh.py runs it; it prints one JSON line of results.

    python tests/mesh_worker.py compare DIR            1 and 4 devices, and resumes across them
    python tests/mesh_worker.py run DIR [--coordinator HOST:PORT --process-id I]   one run of the shared config
"""

import argparse
import json
import os
import sys
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("mode", choices=("compare", "run"))
parser.add_argument("root", type=Path)
parser.add_argument("--host-devices", type=int, default=4)
parser.add_argument("--coordinator")
parser.add_argument("--process-id", type=int)
args = parser.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.host_devices}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
from helpers import SMALL_MODEL, small_config  # noqa: E402

from tangshi_jax import data  # noqa: E402
from tangshi_jax import train as train_module  # noqa: E402
from tangshi_jax.devices import Cluster, describe_feed, make_feed, make_mesh, place_state, split_rows, use_platform  # noqa: E402

# The run every test compares: 2 epochs of 8 steps, one bucket (two programs to compile). Two
# processes on 2 cores take ~0.3 s a step (gloo over loopback), so steps are kept few.
CONFIG = dict(epochs=2, batch_size=16, num_buckets=1, save_every=1)


def quiet(message):
    pass


def metrics(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def run(directory, mesh, **overrides):
    config = small_config(args.root / "poems.txt", **{**CONFIG, **overrides})
    train_module.train(config, SMALL_MODEL, directory, log=quiet, show_progress=False, mesh=mesh)
    return metrics(directory)


def batch_facts(mesh) -> dict:
    """The sharding of the batch the compiled train step takes, and of one batch fed to it."""
    config = small_config(args.root / "poems.txt", **CONFIG)
    corpus = data.read_corpus(config.data)
    dataset = data.make_dataset(corpus, config)
    model_config = train_module.ModelConfig(vocab_size=len(dataset.vocab), **SMALL_MODEL)
    feed = make_feed(mesh, config.batch_size)
    state = place_state(train_module.init_state(model_config, config), mesh)
    programs, _ = train_module.compile_steps(model_config, config, 1, state, dataset.train.buckets, feed)
    bucket_index, rows = data.epoch_plan(dataset.train, config.batch_size, 0, 0)[0]
    batch = feed.batch(dataset.train, bucket_index, rows)
    expected = split_rows(mesh)
    program = programs[dataset.train.buckets[bucket_index]]
    return {
        "program_takes_split_batch": program.input_shardings[0][1]["inputs"].is_equivalent_to(expected, 2),
        "batch_devices": len(batch["inputs"].sharding.device_set),
        "shard_rows": sorted({shard.data.shape[0] for shard in batch["inputs"].addressable_shards}),
    }


def main():
    if args.mode == "compare":
        use_platform("cpu")
        one, four = make_mesh(1), make_mesh(4)
        result = {"one": run(args.root / "one", one), "four": run(args.root / "four", four), "batch": batch_facts(four)}
        # Stop after epoch 1 on one mesh, resume to epoch 2 on the other.
        run(args.root / "four_then_one", four, epochs=1)
        result["four_then_one"] = run(args.root / "four_then_one", one)
        run(args.root / "one_then_four", one, epochs=1)
        result["one_then_four"] = run(args.root / "one_then_four", four)
        # 14 poems a batch do not split over 4 devices: each batch gets 2 masked rows.
        result["uneven_one"] = run(args.root / "uneven_one", one, batch_size=14)
        result["uneven_four"] = run(args.root / "uneven_four", four, batch_size=14)
        result["uneven_described"] = describe_feed(make_feed(four, 14), 14)
    else:
        cluster = Cluster(args.coordinator, 2, args.process_id) if args.coordinator else Cluster()
        use_platform("cpu", cluster)
        train_module.train(
            small_config(args.root / "poems.txt", **CONFIG),
            SMALL_MODEL,
            args.root / "checkpoints",
            log=print if jax.process_index() == 0 else quiet,
            show_progress=False,
            mesh=make_mesh(),
        )
        result = {"process": jax.process_index()}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(train_module.run_cli(lambda argv: main()))
