"""A release folder: a trained model in plain files that load without Orbax, the trainer, or
the JAX version that wrote them.

    model.safetensors   the parameters only, float32 or (format 2, `export --half`) float16,
                        named like `embed.embedding`; read back as float32
    config.json         the model config, the training settings, the step and its validation figures
    vocab.json          {character: id}, ids 0..V-1
    README.md           the model card (written by `python -m tangshi_jax.export`)

`load_model` reads either a release folder or a checkpoint directory into one `Loaded`, so
sample, evaluate, serve and export treat both alike. Release folders shipped inside the
package (tangshi_jax/models/NAME) are found by NAME (`--model tang-hour`).
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from tangshi_jax import checkpoint, metrics
from tangshi_jax.config import ModelConfig, TrainConfig, from_dict, to_dict
from tangshi_jax.errors import TangshiError
from tangshi_jax.model import abstract_params

# Format 1: float32 weights. Format 2: float32 or float16 weights (config.json says which).
FORMAT, FORMAT_VERSION = "tangshi-jax-release", 2
WEIGHT_DTYPES = ("float32", "float16")
SHIPPED = Path(__file__).parent / "models"  # release folders that come with the package
WEIGHTS, CONFIG, VOCAB, CARD = "model.safetensors", "config.json", "vocab.json", "README.md"


@dataclass(frozen=True)
class Loaded:
    """A trained model as sampling, evaluation, serving and export read it: no optimizer state."""

    model_config: ModelConfig
    train_config: TrainConfig
    vocab: list[str]
    params: dict
    progress: dict  # epoch, batch and step of the checkpoint

    @property
    def max_title(self) -> int:
        """Title characters the model reads before a poem (0: it was trained without titles)."""
        return self.train_config.max_title if self.train_config.titles else 0


def load_model(*, checkpoint_dir=None, model_dir=None, warn=None) -> Loaded:
    """The release folder model_dir when given, else the newest checkpoint of checkpoint_dir
    that reads completely (each one passed over is one line given to `warn`); no poems.txt needed."""
    if model_dir is not None:
        return load_release(find_release(model_dir))
    if checkpoint_dir is None:
        raise ValueError("load_model needs a checkpoint_dir or a model_dir")
    on_skip = warn and (lambda step, reason: warn(checkpoint.skipped_line(Path(checkpoint_dir), step, reason)))
    restored = checkpoint.load_params(checkpoint_dir, on_skip)
    model_config, train_config, vocab, progress = restored.meta
    return Loaded(model_config, train_config, vocab, restored.state["params"], progress)


def shipped_models() -> list[str]:
    """The names of the release folders that come with the package."""
    return sorted(path.name for path in SHIPPED.glob("*") if (path / CONFIG).is_file())


def find_release(model) -> Path:
    """A release folder by its path, or by the name of a model shipped with the package."""
    path = Path(model)
    if not path.exists() and (SHIPPED / str(model) / CONFIG).is_file():
        return SHIPPED / str(model)
    if not path.exists():
        names = ", ".join(shipped_models()) or "none in this install"
        raise TangshiError(
            f"--model {model}: no such folder and no model of that name comes with tangshi-jax ({names}); "
            "give a release folder (python -m tangshi_jax.export) or one of those names"
        )
    return path


def require_new(out_dir) -> Path:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TangshiError(f"--out {out} already exists and is not empty; give a new folder or remove it")
    return out


def write_release(out_dir, loaded: Loaded, metrics: dict | None, card: str, weights_dtype: str = "float32") -> Path:
    """Write the folder beside its final place, then rename it, so a failed export leaves nothing.
    weights_dtype float16 halves the file (export checks what that costs in validation NLL)."""
    from safetensors.numpy import save_file

    out = require_new(out_dir)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        flat = traverse_util.flatten_dict(jax.device_get(loaded.params), sep=".")
        save_file(
            {name: np.ascontiguousarray(array, weights_dtype) for name, array in flat.items()},
            str(partial / WEIGHTS),
            metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)},
        )
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "weights_dtype": weights_dtype,
            "model": to_dict(loaded.model_config),
            "train": to_dict(loaded.train_config),
            "progress": dict(loaded.progress),
            "metrics": metrics,
        }
        (partial / CONFIG).write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        (partial / VOCAB).write_text(
            json.dumps({char: index for index, char in enumerate(loaded.vocab)}, ensure_ascii=False, indent=0) + "\n",
            encoding="utf-8",
        )
        (partial / CARD).write_text(card, encoding="utf-8")
        for path in partial.iterdir():
            path.chmod(0o644)  # safetensors writes its file owner-only; a release is for sharing
        if out.exists():
            out.rmdir()
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TangshiError(
            f"cannot read {what} {path.name} of the release {path.parent} ({type(error).__name__}); "
            "export it again with `python -m tangshi_jax.export --out DIR`"
        ) from None


def load_release(model_dir) -> Loaded:
    """Configs, vocabulary and parameters of a release folder, checked against each other."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = Path(model_dir)
    if not (folder / CONFIG).is_file():
        raise TangshiError(
            f"{folder} is not a release folder (no {CONFIG}); make one with "
            "`python -m tangshi_jax.export --out DIR`, or give a checkpoint with --checkpoint-dir"
        )
    config = read_json(folder / CONFIG, "the config")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise TangshiError(f"{folder / CONFIG} is not a tangshi-jax release config; export the model again")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise TangshiError(
            f"{folder} is a newer release format ({config['format_version']}) than this "
            f"tangshi-jax reads ({FORMAT_VERSION}); upgrade tangshi-jax"
        )
    model_config = from_dict(ModelConfig, config["model"])
    train_config = from_dict(TrainConfig, config.get("train", {}))
    ids = read_json(folder / VOCAB, "the vocabulary")
    if not isinstance(ids, dict) or sorted(ids.values()) != list(range(len(ids))):
        raise TangshiError(
            f"{folder / VOCAB} must map each character to an id, 0 to {len(ids) - 1} once each; export the model again"
        )
    vocab = sorted(ids, key=ids.get)
    if len(vocab) != model_config.vocab_size:
        raise TangshiError(
            f"{folder / VOCAB} has {len(vocab)} characters but config.json says vocab_size "
            f"{model_config.vocab_size}; export the model again"
        )
    try:
        flat = load_file(str(folder / WEIGHTS))
    except (OSError, SafetensorError) as error:
        raise TangshiError(f"cannot read {folder / WEIGHTS} ({error}); export the model again") from None
    stored = config.get("weights_dtype", "float32")
    if stored not in WEIGHT_DTYPES:
        raise TangshiError(f"{folder / CONFIG}: weights_dtype {stored!r} is none of {', '.join(WEIGHT_DTYPES)}")
    stored = np.dtype(stored)
    expected = traverse_util.flatten_dict(abstract_params(model_config), sep=".")
    for name, like in expected.items():
        got = flat.get(name)
        if got is None or got.shape != like.shape or got.dtype != stored:
            found = "missing" if got is None else f"{got.dtype}{list(got.shape)}"
            raise TangshiError(
                f"{folder / WEIGHTS}: parameter {name} is {found}, but the config needs "
                f"{stored}{list(like.shape)}; the files do not belong together, export again"
            )
    extra = sorted(set(flat) - set(expected))
    if extra:
        raise TangshiError(
            f"{folder / WEIGHTS} holds parameters the config does not use ({', '.join(extra[:3])}); "
            "export the model again"
        )
    params = traverse_util.unflatten_dict(
        {tuple(name.split(".")): jnp.asarray(array, jnp.float32) for name, array in flat.items()}
    )
    return Loaded(model_config, train_config, vocab, params, dict(config.get("progress", {})))


def last_metrics(checkpoint_dir, model_dir=None, epoch: int | None = None) -> dict | None:
    """The validation figures of the model: the release's, or the last line of the run's
    metrics.jsonl up to `epoch` (the checkpoint's); None when there are none."""
    if model_dir is not None:
        return read_json(find_release(model_dir) / CONFIG, "the config").get("metrics")
    path = Path(checkpoint_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    logged = [record for record in metrics.read_metrics(path) if epoch is None or record["epoch"] <= epoch]
    return logged[-1] if logged else None
