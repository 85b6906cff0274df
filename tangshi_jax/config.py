"""Every hyper-parameter in one place, as frozen dataclasses saved as JSON with each checkpoint.

The dataclass defaults are the original course exercise's settings (so a checkpoint written
before a field existed reads back as what it was trained with); PRESETS name the
configurations found by measured sweeps (tangshi_jax/RUNS.md), and `train --preset` starts
from one of them.
"""

import dataclasses
from dataclasses import dataclass

CELLS = ("lstm", "gru", "rnn")
PLATFORMS = ("cpu", "gpu", "tpu")  # --platform: JAX's backends (devices.use_platform)
OPTIMIZERS = ("rmsprop", "adam")
SCHEDULES = ("constant", "cosine")
DTYPES = ("float32", "bfloat16")
HEADS = ("full", "adaptive")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int  # characters the model reads and writes, G and E included
    cell: str = "lstm"  # lstm | gru | rnn (the original's tanh cell)
    layers: int = 2  # stacked recurrent layers
    hidden: int = 128  # units per recurrent layer
    embed: int = 100  # embedding width; initialised uniform(-1, 1) as in the original
    relu_head: bool = False  # the original's ReLU on the logits; off by default (its loss stalls near 6)
    dropout: float = 0.0  # dropped share of the embeddings, between layers and before the head (training only)
    tied: bool = False  # the head reuses the embedding: last layer -> Dense(embed) -> embeddingᵀ
    head: str = "full"  # full: one softmax over the vocabulary | adaptive: frequency clusters (head.py)
    cutoffs: tuple[int, ...] = (1000, 3000)  # adaptive: where the tail clusters start (vocabulary ids)
    head_div: float = 4.0  # adaptive: tail cluster i reads width // head_div**(i+1) features
    tied_tails: bool = False  # adaptive and tied: tails see the embedding through a projection (measured slower)

    def __post_init__(self):  # JSON gives lists back; a frozen config must stay hashable
        object.__setattr__(self, "cutoffs", tuple(int(cutoff) for cutoff in self.cutoffs))


@dataclass(frozen=True)
class TrainConfig:
    data: str = "poems.txt"  # title:content lines, as the original read them
    corpus: tuple[str, ...] = ("tang",)  # parts read: tang is `data`; another part P is read beside it
    # (poems.P.txt, corpus.part_path); the first part validates the run (tang, or ci for 词 alone)
    epochs: int = 30  # total epochs; a resumed run continues up to this
    batch_size: int = 100  # poems per step, as the original
    lr: float = 0.01  # peak learning rate (RMSprop at 0.01, as the original)
    optimizer: str = "rmsprop"  # rmsprop (PyTorch's definition) | adam; both after clipping at norm 1
    schedule: str = "constant"  # constant | cosine: linear warm-up, cosine decay, then held at its floor
    warmup_steps: int = 0  # steps of linear warm-up from 0 (cosine only)
    decay_epochs: int = 0  # epochs over which the cosine falls to its floor, later ones keep it;
    # 0: the epochs of the run's first start
    lr_floor: float = 0.05  # the cosine's final learning rate, as a share of lr
    save_every: int = 5  # epochs between checkpoints (and one at the end)
    max_poems: int | None = None  # keep only the first N usable poems, for a quick try
    seed: int = 0  # initialisation, dropout and the per-epoch data order
    val_fraction: float = 0.02  # share of poems held out, chosen by a hash (see split)
    split: str = "hash"  # hash: each poem by its own text (as first released) |
    # grouped: near-repeats kept on one side, exact repeats trained once
    num_buckets: int = 8  # padded lengths compiled; 8 keeps ~99% of positions real
    keep: int = 3  # checkpoints kept by the rotation
    titles: bool = False  # read title + G + poem; the loss is on the poem only
    max_title: int = 12  # title characters kept (the first ones; Chinese characters only)
    dtype: str = "float32"  # training's activations and matrix products: float32 | bfloat16
    # (parameters, optimizer state and the loss stay float32)
    ema_decay: float = 0.0  # every step, average ← decay·average + (1 − decay)·weights; validation,
    # sampling and export read the average (0: no average, the weights themselves)

    def __post_init__(self):  # JSON gives lists back; a frozen config must stay hashable
        object.__setattr__(self, "corpus", tuple(self.corpus))


# Settings that decide the data or the optimisation path; a resumed run must keep them to
# replay the same batches with the same learning rates.
DATA_ORDER_FIELDS = (
    "corpus",
    "batch_size",
    "max_poems",
    "seed",
    "val_fraction",
    "split",
    "num_buckets",
    "titles",
    "max_title",
    "optimizer",
    "schedule",
    "warmup_steps",
    "decay_epochs",
    "lr_floor",
    "ema_decay",  # the average is part of the state
)


# Named configurations: fields of ModelConfig and TrainConfig that differ from the defaults.
# How each was chosen, with every run's figures: tangshi_jax/RUNS.md.
PRESETS = {
    # The course exercise, exactly: 2×128 LSTM, embedding 100, RMSprop 0.01, batch 100.
    "original": {"epochs": 5},
    # The README's first command, about 15 minutes of training on 2 CPU cores: the first quarter of
    # the hour preset's schedule (the learning rate is still near its peak; a cosine over 3 epochs did worse).
    # The full head: the adaptive one trains 1.2-1.3x faster here but learns less an epoch, and
    # came out no better within 15 minutes (RUNS.md, "The adaptive output layer"). No dropout and
    # an average of the last ~50 steps' weights: 292 -> 260 -> 244 (RUNS.md, "The quick preset
    # without dropout" and "An average of the weights").
    "quick": {
        "epochs": 3,
        "hidden": 256,
        "embed": 128,
        "tied": True,
        "dropout": 0.0,
        "ema_decay": 0.98,
        "schedule": "cosine",
        "warmup_steps": 50,
        "decay_epochs": 12,
        "split": "grouped",
        "titles": True,
    },
    # About an hour on 2 CPU cores. Over 12 epochs the model without dropout fits its training
    # poems (RUNS.md, "The hour preset without dropout"), so hour keeps dropout and is a run of its
    # own; `--preset hour --dropout 0 --ema-decay 0.98` trains a quick run on.
    "hour": {
        "epochs": 12,
        "hidden": 256,
        "embed": 128,
        "tied": True,
        "dropout": 0.2,
        "schedule": "cosine",
        "warmup_steps": 50,
        "decay_epochs": 12,
        "split": "grouped",
        "titles": True,
    },
    # A larger model meant for a GPU (untested on one here: no device was lent).
    "gpu": {
        "epochs": 30,
        "layers": 3,
        "hidden": 768,
        "embed": 256,
        "tied": True,
        "dropout": 0.35,
        "lr": 0.005,
        "schedule": "cosine",
        "warmup_steps": 500,
        "batch_size": 128,
        "split": "grouped",
        "titles": True,
    },
}
DEFAULT_PRESET = "quick"


def preset_configs(name: str, **overrides) -> tuple[dict, "TrainConfig"]:
    """Model settings (without vocab_size) and a TrainConfig: the preset, then the overrides
    that are not None."""
    values = {**PRESETS[name], **{key: value for key, value in overrides.items() if value is not None}}
    model_names = {field.name for field in dataclasses.fields(ModelConfig)} - {"vocab_size"}
    model_settings = {
        field.name: values.get(field.name, field.default)
        for field in dataclasses.fields(ModelConfig)
        if field.name in model_names
    }
    unknown = set(values) - model_names - {field.name for field in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}")
    return model_settings, from_dict(TrainConfig, values)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def from_dict(cls, values: dict):
    known = {field.name for field in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in values.items() if key in known})


def differences(old, new, fields=None) -> list[str]:
    """Fields whose values differ, as 'name: old -> new' strings."""
    names = fields or [field.name for field in dataclasses.fields(old)]
    return [
        f"{name}: {getattr(old, name)!r} -> {getattr(new, name)!r}"
        for name in names
        if getattr(old, name) != getattr(new, name)
    ]


# TrainConfig fields that `train` takes no flag for: a model card names them apart when they differ from the default.
NO_FLAG = ("lr_floor", "val_fraction", "num_buckets", "keep", "max_title")


def training_command(model_config: ModelConfig, train_config: TrainConfig) -> str:
    """The shortest `train` command that gives these configs: the nearest preset and the flags
    that differ from it, then any setting that has no flag (as a comment)."""
    command, unflagged = training_flags(model_config, train_config)
    return command + (f"  # and, in config.py, {', '.join(unflagged)}" if unflagged else "")


def training_flags(model_config: ModelConfig, train_config: TrainConfig) -> tuple[str, list[str]]:
    """training_command's command, and the settings (name=value) that no flag can give."""
    settings = {
        **{
            field.name: getattr(model_config, field.name)
            for field in dataclasses.fields(ModelConfig)
            if field.name != "vocab_size"
        },
        **dataclasses.asdict(train_config),
    }

    def differing(preset):
        model, train = preset_configs(preset)
        base = {**model, **dataclasses.asdict(train)}
        return [name for name in settings if settings[name] != base[name] and name != "data"]

    preset = min(PRESETS, key=lambda name: len(differing(name)))
    words = ["python -m tangshi_jax.train", f"--preset {preset}"]
    if train_config.data != TrainConfig.data:
        words.append(f"--data {train_config.data}")
    unflagged = []
    for name in differing(preset):
        value, flag = settings[name], "--" + name.replace("_", "-")
        if name in NO_FLAG:
            unflagged.append(f"{name}={value!r}")
        elif isinstance(value, bool):
            words.append(flag if value else f"--no-{name.replace('_', '-')}")
        elif isinstance(value, tuple):  # --cutoffs 1000,3000, --corpus tang,song
            words.append(f"{flag} {','.join(map(str, value))}")
        else:
            words.append(f"{flag} {value}")
    return " ".join(words), unflagged
