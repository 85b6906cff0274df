"""Choosing the JAX platform before its backend starts (JAX fixes it at first use)."""

import resource

import jax

from tangshi_jax.errors import TangshiError

PLATFORMS = ("cpu", "gpu", "tpu")


def enable_compilation_cache() -> None:
    """Keep compiled programs on disk, so a second run with the same shapes starts at once."""
    from tangshi_jax.corpus import default_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(default_cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)   # ours take 0.3-1 s each


def use_platform(name: str | None) -> str:
    """Make `name` the platform of every computation that follows; returns the platform in use.

    CPU is chosen through `jax_platforms`, which skips probing for accelerators. A GPU or TPU
    is looked up after the backends start, so that a missing one is a clear error rather than
    JAX's own failure inside its initialisation.
    """
    if name == "cpu":
        jax.config.update("jax_platforms", "cpu")
    enable_compilation_cache()
    try:
        devices = jax.devices(name) if name else jax.devices()
    except RuntimeError as error:
        first_line = str(error).splitlines()[0] if str(error) else "no such backend"
        raise TangshiError(f"--platform {name}: JAX finds no {name} device ({first_line}); install JAX "
                           f"for it (for an NVIDIA GPU: pip install 'jax[cuda13]' or 'jax[cuda12]') or use --platform cpu") from None
    if name and jax.default_backend() != name:
        jax.config.update("jax_default_device", devices[0])
    return devices[0].platform


def describe_devices() -> str:
    devices = jax.local_devices()
    kinds = sorted({device.device_kind for device in devices})
    return f"{devices[0].platform} ({len(devices)} × {', '.join(kinds)})"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
