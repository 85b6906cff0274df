"""Orbax checkpoints that describe themselves: arrays, configs, vocabulary and data position.

A checkpoint directory holds one numbered step folder per save (Orbax writes each to a
temporary folder and renames it when complete, so a crash mid-save leaves the previous one
intact), plus `metrics.jsonl`. Every step folder alone is enough to sample from or resume.
"""

import logging
from pathlib import Path
from typing import NamedTuple

import jax
import orbax.checkpoint as ocp

from tangshi_jax.config import ModelConfig, TrainConfig, from_dict, to_dict
from tangshi_jax.errors import TangshiError

# Orbax reports routine events through absl at WARNING; a user needs only its errors.
logging.getLogger("absl").setLevel(logging.ERROR)


def open_manager(directory: str | Path, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    return ocp.CheckpointManager(Path(directory).resolve(), options=options,
                                 item_names=("state", "model", "train", "vocab", "progress"))


def save(manager, state, model_config: ModelConfig, train_config: TrainConfig, vocab: list[str],
         progress: dict) -> None:
    """Save (asynchronously) under the global step; progress holds epoch and batch position."""
    manager.save(int(progress["step"]), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        model=ocp.args.JsonSave(to_dict(model_config)),
        train=ocp.args.JsonSave(to_dict(train_config)),
        vocab=ocp.args.JsonSave({"chars": list(vocab)}),
        progress=ocp.args.JsonSave(progress),
    ), force=True)


class Meta(NamedTuple):
    model_config: ModelConfig
    train_config: TrainConfig
    vocab: list[str]
    progress: dict


def restore_meta(manager, step: int) -> Meta:
    """Configs, vocabulary and progress of a checkpoint, without reading its arrays."""
    restored = manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.JsonRestore(), train=ocp.args.JsonRestore(),
        vocab=ocp.args.JsonRestore(), progress=ocp.args.JsonRestore()))
    return Meta(from_dict(ModelConfig, restored["model"]), from_dict(TrainConfig, restored["train"]),
                list(restored["vocab"]["chars"]), dict(restored["progress"]))


def restore_state(manager, step: int, like):
    """The arrays of a checkpoint, shaped, typed and placed like the pytree `like` (real or
    abstract); leaves without a placement go to the default device, whatever devices or
    processes wrote the checkpoint."""
    device = jax.config.jax_default_device
    default = jax.sharding.SingleDeviceSharding(device if isinstance(device, jax.Device) else jax.devices()[0])

    def abstract_leaf(leaf):
        struct = ocp.utils.to_shape_dtype_struct(leaf)
        return struct if struct.sharding is not None else jax.ShapeDtypeStruct(struct.shape, struct.dtype,
                                                                               sharding=default)
    abstract = jax.tree_util.tree_map(abstract_leaf, like)
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]


def require_checkpoint(directory: str | Path) -> tuple[ocp.CheckpointManager, int]:
    """The manager of an existing run and its latest step, or an error that says to train first."""
    manager = open_manager(directory, create=False) if Path(directory).is_dir() else None
    step = manager.latest_step() if manager else None
    if step is None:
        raise TangshiError(f"no checkpoint in {directory}; train first with `python -m tangshi_jax.train "
                           f"--checkpoint-dir {directory}`")
    return manager, step
