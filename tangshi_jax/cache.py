"""Where downloads and compiled programs are kept between runs, and how a file is replaced whole."""

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """$TANGSHI_CACHE_DIR, else $XDG_CACHE_HOME/tangshi-jax, else ~/.cache/tangshi-jax."""
    if os.environ.get("TANGSHI_CACHE_DIR"):
        return Path(os.environ["TANGSHI_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "tangshi-jax"


def write_atomically(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it and a rename, so that a reader
    (or a kill halfway) meets the old file or the new one, never part of one. The temporary's
    name holds the process id: two processes writing the same file never share one."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8", newline="\n") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
