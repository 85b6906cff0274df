"""Everything decided before JAX's backend starts (it fixes them at first use): the platform,
the distributed runtime that joins processes, and the mesh of devices a run uses; then how
batches and the state reach that mesh."""

import os
import platform
import resource
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tangshi_jax import data
from tangshi_jax.cache import default_cache_dir
from tangshi_jax.config import PLATFORMS  # noqa: F401 -- the commands take it from here
from tangshi_jax.errors import TangshiError

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


def batch_spec(batch_size: int, length: int, sharding=None) -> dict:
    ints = jax.ShapeDtypeStruct((batch_size, length), jnp.int32, sharding=sharding)
    floats = jax.ShapeDtypeStruct((batch_size, length), jnp.float32, sharding=sharding)
    return {"inputs": ints, "targets": ints, "mask": floats, "chars": floats}


class Feed(NamedTuple):
    """How batches reach a mesh: `rows` per global batch (the batch size rounded up to a multiple
    of the devices; the extra rows are masked) and the block of them this process feeds."""

    mesh: Mesh
    rows: int
    local: slice

    def batch(self, bucketed: data.BucketedData, bucket_index: int, poems: np.ndarray) -> dict:
        """The global batch of `poems` (rows of one bucket), built from this process's rows only."""
        local = data.make_batch(bucketed, bucket_index, poems[self.local], self.local.stop - self.local.start)
        shape = (self.rows, bucketed.buckets[bucket_index])
        return {
            key: jax.make_array_from_process_local_data(split_rows(self.mesh), value, shape)
            for key, value in local.items()
        }


def make_feed(mesh: Mesh, batch_size: int) -> Feed:
    rows = -(-batch_size // mesh.size) * mesh.size
    blocks = split_rows(mesh).addressable_devices_indices_map((rows,)).values()
    local = slice(min(block[0].start or 0 for block in blocks), max(block[0].stop or rows for block in blocks))
    return Feed(mesh, rows, local)


def place_state(state, mesh: Mesh):
    """The state replicated on every device of the mesh (in every process, from its own copy)."""
    sharding = replicated(mesh)

    def place(leaf):
        value = np.asarray(leaf)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree_util.tree_map(place, state)


class Compiling:
    """Programs still compiling on a thread pool, looked up by bucket length; each lookup
    waits for its own program only."""

    def __init__(self, futures: dict):
        self.futures = futures

    def __getitem__(self, length):
        return self.futures[length].result()

    def cancel(self):
        """Drop the programs not yet started (a stopped run needs no more)."""
        for future in self.futures.values():
            future.cancel()


def compile_for_mesh(train_step, eval_step, state, buckets, feed: Feed):
    """Ahead-of-time compile a train step and an eval step for every bucket: these are all the
    shapes a run uses.

    Batches come split along the mesh's data axis, state and metrics replicated; XLA partitions
    the step and sums the gradients across devices. Programs are built on a thread pool (on 2
    cores that saves only ~15%: XLA's CPU compiler does most of its work on one thread,
    PERFORMANCE.md). The train steps are returned compiled; the eval steps, a third of the
    compile time and first needed at the end of an epoch, are returned still compiling
    (`Compiling`), so training starts without waiting for them."""
    whole, rows = replicated(feed.mesh), split_rows(feed.mesh)
    train_jit = jax.jit(train_step, in_shardings=(whole, rows), out_shardings=(whole, whole), donate_argnums=0)
    eval_jit = jax.jit(eval_step, in_shardings=(whole, rows), out_shardings=whole)
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    train_programs = {
        length: pool.submit(lambda n: train_jit.lower(state, batch_spec(feed.rows, n, rows)).compile(), length)
        for length in buckets
    }
    eval_programs = Compiling(
        {
            length: pool.submit(
                lambda n: eval_jit.lower(state["params"], batch_spec(feed.rows, n, rows)).compile(), length
            )
            for length in buckets
        }
    )
    pool.shutdown(wait=False)  # its threads end when the last program is built
    try:
        return {length: future.result() for length, future in train_programs.items()}, eval_programs
    except BaseException:
        eval_programs.cancel()
        raise


def describe_mesh(mesh: Mesh, rows: int) -> str:
    processes = len({device.process_index for device in mesh.devices.flat})
    per_device = rows // mesh.size
    return (
        f"mesh: {mesh.size} device{'s' * (mesh.size != 1)} × {processes} process{'es' * (processes != 1)}, "
        f"{per_device} row{'s' * (per_device != 1)} per device"
    )


def describe_feed(feed: Feed, batch_size: int) -> str:
    """The mesh, and the masked rows each batch gets to split evenly over it."""
    padding = feed.rows - batch_size
    return describe_mesh(feed.mesh, feed.rows) + (
        f" (each batch padded with {padding} masked row{'s' * (padding != 1)} to split evenly)" if padding else ""
    )


def describe_devices() -> str:
    """'cpu (1 × cpu); AMD EPYC, 2 cores, AVX2 without AVX-512': the devices, and on a CPU the
    processor too, since a CPU run's minutes compare only with those of its kind (README)."""
    devices = jax.local_devices()
    kinds = sorted({device.device_kind for device in devices})
    described = f"{devices[0].platform} ({len(devices)} × {', '.join(kinds)})"
    return f"{described}; {describe_cpu()}" if devices[0].platform == "cpu" else described


def describe_cpu() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:  # not Linux
        cpuinfo = ""
    return cpu_summary(cpuinfo, os.cpu_count(), platform.processor() or platform.machine())


def cpu_summary(cpuinfo: str, cores: int | None, fallback: str) -> str:
    """The processor's model, its cores and its widest vector instructions, from the text of
    /proc/cpuinfo (fallback: the name when it has none)."""
    fields = {}
    for line in cpuinfo.splitlines():
        key, colon, value = line.partition(":")
        if colon:
            fields.setdefault(key.strip(), value.strip())
    words = [fields.get("model name") or fallback, f"{cores} cores"]
    if "flags" in fields:  # x86; other processors name their features otherwise
        flags = set(fields["flags"].split())
        words.append("AVX-512" if "avx512f" in flags else "AVX2 without AVX-512" if "avx2" in flags else "no AVX2")
    return ", ".join(words)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
