"""Everything decided before JAX's backend starts (it fixes them at first use): the platform,
the distributed runtime that joins processes, and the mesh of devices a run uses."""

import os
import resource
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tangshi_jax.cache import default_cache_dir
from tangshi_jax.errors import TangshiError

PLATFORMS = ("cpu", "gpu", "tpu")
DATA_AXIS = "data"  # the mesh axis that batches are split along
JOIN_TIMEOUT_S = 300  # how long a process waits for the others to join the run
HEARTBEAT_TIMEOUT_S = 60  # a process silent this long is taken as dead, and the others stop


class Cluster(NamedTuple):
    """The flags that join processes into one run; all None: a single process, or a cluster
    launcher (SLURM, Open MPI) that JAX reads by itself."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def enable_compilation_cache() -> None:
    """Keep compiled programs on disk, so a second run with the same shapes starts at once."""
    jax.config.update("jax_compilation_cache_dir", str(default_cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # ours take 0.3-1 s each


def launched_by_cluster() -> bool:
    """An srun or mpirun launch of more than one task, which jax.distributed detects itself (an
    salloc shell alone is not one: its tasks are not started)."""
    return any(int(os.environ.get(name) or 1) > 1 for name in ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE"))


def check_cluster(cluster: Cluster) -> None:
    given = [value is not None for value in cluster]
    if any(given) and not all(given):
        raise TangshiError(
            "--coordinator, --num-processes and --process-id go together: give all three "
            "(the same --coordinator HOST:PORT and --num-processes to every process), or none"
        )
    if all(given):
        host, _, port = cluster.coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise TangshiError(
                f"--coordinator {cluster.coordinator}: expected HOST:PORT of process 0, e.g. 10.0.0.1:1234"
            )
        if cluster.num_processes < 1 or not 0 <= cluster.process_id < cluster.num_processes:
            raise TangshiError(
                f"--process-id {cluster.process_id} with --num-processes {cluster.num_processes}: "
                "ids run from 0 to num-processes − 1"
            )


def join_cluster(cluster: Cluster) -> None:
    """Start JAX's distributed runtime when several processes make one run."""
    check_cluster(cluster)
    if cluster.coordinator is None and not launched_by_cluster():
        return
    try:
        jax.distributed.initialize(
            cluster.coordinator,
            cluster.num_processes,
            cluster.process_id,
            initialization_timeout=JOIN_TIMEOUT_S,
            heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
        )
    except Exception as error:  # JAX raises several types here; all mean the same to the user
        first_line = (str(error).splitlines() or ["no reason given"])[0]
        where = cluster.coordinator or "the cluster's coordinator"
        raise TangshiError(
            f"could not join the run at {where} ({first_line}); start every process with the same "
            "--coordinator and --num-processes, and process 0 first or within "
            f"{JOIN_TIMEOUT_S} s of the others"
        ) from None


def use_platform(name: str | None, cluster: Cluster | None = None) -> str:
    """Make `name` the platform of every computation that follows; returns the platform in use.

    CPU is chosen through `jax_platforms`, which skips probing for accelerators. A GPU or TPU
    is looked up after the backends start, so that a missing one is a clear error rather than
    JAX's own failure inside its initialisation. Processes join before the backend starts.
    """
    if name == "cpu":
        jax.config.update("jax_platforms", "cpu")
    enable_compilation_cache()
    join_cluster(cluster or Cluster())
    try:
        devices = jax.devices(name) if name else jax.devices()
    except RuntimeError as error:
        first_line = str(error).splitlines()[0] if str(error) else "no such backend"
        raise TangshiError(
            f"--platform {name}: JAX finds no {name} device ({first_line}); install JAX "
            f"for it (for an NVIDIA GPU: pip install 'jax[cuda13]' or 'jax[cuda12]') or use --platform cpu"
        ) from None
    if name and jax.default_backend() != name:
        jax.config.update("jax_default_device", devices[0])
    return devices[0].platform


def make_mesh(devices_per_process: int | None = None, platform: str | None = None) -> Mesh:
    """A one-axis mesh ("data") over the first N local devices of every process (default: all).

    Devices are ordered by process, so each process holds one contiguous block of a batch's rows."""
    devices = jax.devices(platform) if platform else jax.devices()
    local_count = sum(device.process_index == jax.process_index() for device in devices)
    count = devices_per_process or local_count
    if count > local_count:
        raise TangshiError(
            f"--devices {count}: this process sees only {local_count} {devices[0].platform} "
            f"device{'s' * (local_count != 1)}; give at most {local_count}"
        )
    by_process = {}
    for device in sorted(devices, key=lambda d: (d.process_index, d.id)):
        by_process.setdefault(device.process_index, []).append(device)
    chosen = [device for process in sorted(by_process) for device in by_process[process][:count]]
    return Mesh(np.array(chosen), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def split_rows(mesh: Mesh) -> NamedSharding:
    """Rows (the first axis) split over the data axis; other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def describe_mesh(mesh: Mesh, rows: int) -> str:
    processes = len({device.process_index for device in mesh.devices.flat})
    per_device = rows // mesh.size
    return (
        f"mesh: {mesh.size} device{'s' * (mesh.size != 1)} × {processes} process{'es' * (processes != 1)}, "
        f"{per_device} row{'s' * (per_device != 1)} per device"
    )


def describe_devices() -> str:
    devices = jax.local_devices()
    kinds = sorted({device.device_kind for device in devices})
    return f"{devices[0].platform} ({len(devices)} × {', '.join(kinds)})"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
