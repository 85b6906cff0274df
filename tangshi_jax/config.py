"""Every hyper-parameter in one place, as frozen dataclasses saved as JSON with each checkpoint."""

import dataclasses
from dataclasses import dataclass

CELLS = ("lstm", "gru", "rnn")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int          # characters the model reads and writes, G and E included
    cell: str = "lstm"       # lstm | gru | rnn (the original's tanh cell)
    layers: int = 2          # stacked recurrent layers
    hidden: int = 128        # units per recurrent layer
    embed: int = 100         # embedding width; initialised uniform(-1, 1) as in the original
    relu_head: bool = False  # the original's ReLU on the logits; off by default (its loss stalls near 6)


@dataclass(frozen=True)
class TrainConfig:
    data: str = "poems.txt"            # title:content lines, as the original read them
    epochs: int = 30                   # total epochs; a resumed run continues up to this
    batch_size: int = 100              # poems per step, as the original
    lr: float = 0.01                   # RMSprop learning rate, as the original
    save_every: int = 5                # epochs between checkpoints (and one at the end)
    max_poems: int | None = None       # keep only the first N usable poems, for a quick try
    seed: int = 0                      # initialisation and the per-epoch data order
    val_fraction: float = 0.02         # share of poems held out, chosen by a hash of the text
    num_buckets: int = 8               # padded lengths compiled; 8 keeps ~99% of positions real
    keep: int = 3                      # checkpoints kept by the rotation


# Settings that decide the data order; a resumed run must keep them to replay the same batches.
DATA_ORDER_FIELDS = ("batch_size", "max_poems", "seed", "val_fraction", "num_buckets")


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def from_dict(cls, values: dict):
    known = {field.name for field in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in values.items() if key in known})


def differences(old, new, fields=None) -> list[str]:
    """Fields whose values differ, as 'name: old -> new' strings."""
    names = fields or [field.name for field in dataclasses.fields(old)]
    return [f"{name}: {getattr(old, name)!r} -> {getattr(new, name)!r}"
            for name in names if getattr(old, name) != getattr(new, name)]
