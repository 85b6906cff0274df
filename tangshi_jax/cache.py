"""Where downloads and compiled programs are kept between runs."""

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """$TANGSHI_CACHE_DIR, else $XDG_CACHE_HOME/tangshi-jax, else ~/.cache/tangshi-jax."""
    if os.environ.get("TANGSHI_CACHE_DIR"):
        return Path(os.environ["TANGSHI_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "tangshi-jax"
