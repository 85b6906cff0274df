"""poems.txt -> poems -> vocabulary -> bucketed, padded, masked batches.

Parsing keeps the original program's rules exactly, so a poems.txt written for it yields the
same poems. Shapes are decided here and only here: every batch is (batch_size, bucket length).
"""

import collections
import dataclasses
import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tangshi_jax.errors import TangshiError

START, END = "G", "E"  # the original's begin and end tokens
FORBIDDEN = set("_(（《[") | {START, END}  # a poem holding any of these is skipped
MIN_CHARS, MAX_CHARS = 5, 80  # content length limits, after spaces are removed


@dataclass(frozen=True)
class Corpus:
    poems: list[str]  # kept poems, each wrapped as G + content + E, in file order
    titles: list[str]  # the title of each kept poem, Chinese characters only
    skipped: int  # parsed lines dropped by the content rules
    unparsable: int  # lines that are not exactly one 'title:content'
    first_unparsable: int | None  # its line number, to point the user at it
    part_sizes: tuple[int, ...] = ()  # poems of each corpus part, in order (the main part first); () = one part
    part_validated: tuple[bool, ...] = ()  # each part holds out validation poems of its own (the main part does)

    def part_ranges(self, max_poems: int | None = None) -> list[range]:
        """The indices of each part's poems, the first `max_poems` of each when given."""
        ranges, start = [], 0
        for size in self.part_sizes or (len(self.poems),):
            ranges.append(range(start, start + min(size, max_poems or size)))
            start += size
        return ranges

    def used(self, max_poems: int | None = None) -> list[int]:
        """The poems a run reads, in order: the first `max_poems` of each part."""
        return [index for part in self.part_ranges(max_poems) for index in part]


def join_parts(parts: list[Corpus], validated: list[bool] | None = None) -> Corpus:
    """One corpus of several parts read from their files, the main part first; the counts of
    skipped and unparsable lines are summed, the line number is the main part's. validated:
    which parts hold out validation poems of their own (the main part always does)."""
    main = parts[0]
    return Corpus(
        [poem for part in parts for poem in part.poems],
        [title for part in parts for title in part.titles],
        sum(part.skipped for part in parts),
        sum(part.unparsable for part in parts),
        main.first_unparsable,
        tuple(len(part.poems) for part in parts),
        tuple(validated or [True] + [False] * (len(parts) - 1)),
    )


def parse_line(line: str, max_chars: int = MAX_CHARS, forbidden=FORBIDDEN) -> str | None:
    """The original's rules: 'title:content', spaces removed, filtered, wrapped in G...E (a
    corpus part may allow longer content and forbid more: corpus.Part).

    Returns None for a poem the rules skip; raises ValueError for a line that is not
    exactly one title and one content separated by ':'.
    """
    _title, content = line.strip().split(":")
    content = content.replace(" ", "")
    if any(char in forbidden for char in content):
        return None
    if not MIN_CHARS <= len(content) <= max_chars:
        return None
    return START + content + END


def is_hanzi(char: str) -> bool:
    return len(char) == 1 and (
        "\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf" or "\U00020000" <= char <= "\U0002ffff"
    )


def clean_title(title: str) -> str:
    """The Chinese characters of a title: brackets, punctuation, spaces and the tokens G/E go."""
    return "".join(char for char in title if is_hanzi(char))


def read_lines(path: str | Path):
    """Yield (line number, line) of each non-blank line of a corpus file, tolerating a BOM and
    CRLF; undecodable bytes name their line."""
    path = Path(path)
    if not path.is_file():
        raise TangshiError(f"{path}: no such file; build it with `python -m tangshi_jax.corpus --out {path}`")
    try:
        raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    except OSError as error:
        raise TangshiError(f"{path}: cannot be read ({error.strerror}); check its permissions") from None
    for number, raw_line in enumerate(raw.split(b"\n"), start=1):
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise TangshiError(
                f"{path}:{number}: not UTF-8 ({error.reason} at byte {error.start}); save the file as UTF-8"
            ) from None
        if line.strip():
            yield number, line


def read_corpus(path: str | Path, max_chars: int = MAX_CHARS, forbidden=FORBIDDEN) -> Corpus:
    """Read poems.txt (read_lines) by the rules of parse_line."""
    poems, titles, skipped, unparsable, first_unparsable = [], [], 0, 0, None
    for number, line in read_lines(path):
        try:
            poem = parse_line(line, max_chars, forbidden)
        except ValueError:
            unparsable += 1
            first_unparsable = first_unparsable or number
            continue
        if poem is None:
            skipped += 1
        else:
            poems.append(poem)
            titles.append(clean_title(line.split(":")[0]))
    if not poems:
        raise TangshiError(
            f"{path}: no usable poem (need 'title:content' lines with {MIN_CHARS}-{max_chars} "
            "characters of content); build the real one with `python -m tangshi_jax.corpus`"
        )
    return Corpus(poems, titles, skipped, unparsable, first_unparsable)


def part_rules(part: str) -> tuple[int, set[str]]:
    """(max_chars, forbidden) of a corpus part: the original's, widened or narrowed by corpus.Part."""
    from tangshi_jax import corpus

    rules = corpus.PARTS[part]
    return rules.max_chars, FORBIDDEN | set(rules.lost_marks)


def load_corpus(data_path, parts=("tang",), *, build: bool, several_processes: bool = False, log=print) -> Corpus:
    """The poems of every corpus part a run reads: the poems file, and each other part beside it
    (corpus.part_path). Missing parts are built from the corpus package when build (the
    default poems file); a run of several processes builds nothing."""
    from tangshi_jax import corpus  # its converter loads only for runs that build

    read = []
    for part in parts:
        path = corpus.part_path(data_path, part)
        if not path.exists() and (several_processes or not build):
            when = " once before a run of several processes, on a filesystem every host reads" * several_processes
            raise TangshiError(
                f"{path}: no such file; build it{when}: python -m tangshi_jax.corpus --part {part} --out {path}"
            )
        if not path.exists():
            log(f"{path} not found: building it from the chinese-poetry package (downloaded once)")
            corpus.build_corpus(path, part=part)
        read.append(read_corpus(path, *part_rules(part)))
    return (
        read[0] if len(read) == 1 else join_parts(read, [True] + [corpus.PARTS[part].validated for part in parts[1:]])
    )


def build_vocab(poems: list[str]) -> list[str]:
    """Characters by descending frequency, ties broken by character so ids never depend on order."""
    counts = collections.Counter(char for poem in poems for char in poem)
    return sorted(counts, key=lambda char: (-counts[char], char))


def vocab_ids(vocab: list[str]) -> dict[str, int]:
    """Each character's id. Kept for the last few vocabularies: the map of 7,000 characters
    takes ~2 ms to build, which a server would otherwise spend on its event loop per request."""
    return _vocab_ids(tuple(vocab))


@functools.lru_cache(maxsize=4)
def _vocab_ids(vocab: tuple[str, ...]) -> dict[str, int]:
    return {char: index for index, char in enumerate(vocab)}


def encode(poems: list[str], vocab: list[str]) -> list[np.ndarray]:
    ids = vocab_ids(vocab)
    try:
        return [np.array([ids[char] for char in poem], np.int32) for poem in poems]
    except KeyError as error:
        raise TangshiError(
            f"character {error.args[0]!r} of the data is not in the checkpoint's vocabulary; "
            "train from the poems.txt the checkpoint was made with, or use a new --checkpoint-dir"
        ) from None


def is_validation(poem: str, fraction: float) -> bool:
    """A hash of the text decides, so adding poems never moves an old poem across the split."""
    digest = hashlib.blake2b(poem.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def split(poems: list[str], fraction: float) -> tuple[list[str], list[str]]:
    train, val, _ = split_indices(poems, fraction, "hash")
    return [poems[i] for i in train], [poems[i] for i in val]


VERSE_BREAKS = re.compile("[，。！？；：、]")


def lines_of(poem: str) -> list[str]:
    """The verse lines of a poem (without G/E), without their punctuation."""
    return [line for line in VERSE_BREAKS.split(poem.strip(START + END)) if line]


MIN_SHARED_LINE = 4  # lines shorter than this (e.g. 3-character refrains) never make poems near-repeats


def near_repeat_groups(poems: list[str]) -> list[int]:
    """A group number per poem: poems that share at least half of the lines of the shorter
    one (lines of 4+ characters) are joined, transitively. Exact repeats share all lines."""
    lines = [{line for line in lines_of(poem) if len(line) >= MIN_SHARED_LINE} for poem in poems]
    holders = collections.defaultdict(list)
    for index, poem_lines in enumerate(lines):
        for line in poem_lines:
            holders[line].append(index)
    parent = list(range(len(poems)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for index, poem_lines in enumerate(lines):
        shared = collections.Counter(other for line in poem_lines for other in holders[line] if other > index)
        for other, count in shared.items():
            if 2 * count >= min(len(poem_lines), len(lines[other])):
                parent[root(index)] = root(other)
    return [root(i) for i in range(len(poems))]


@dataclass(frozen=True)
class SplitCounts:
    exact_repeats: int  # copies of an earlier poem dropped from training (grouped split)
    near_groups: int  # groups of 2+ poems that share most lines (exact repeats included)
    near_poems: int  # poems in those groups
    near_val: int = 0  # poems of the other corpus parts left out as near-repeats of a validation poem
    held_out: int = 0  # validation poems of the other parts that hold out their own (not trained)


def describe_split(counts: SplitCounts, other_parts=()) -> str:
    """The grouped split's line of a run's summary."""
    line = (
        f"split: {counts.near_poems:,} poems in {counts.near_groups:,} groups of near-repeats kept on one side; "
        f"{counts.exact_repeats:,} exact repeats not trained again"
    )
    if other_parts:
        line += f"; {counts.near_val:,} poems of {', '.join(other_parts)} near-repeat a validation poem, not trained"
    if counts.held_out:
        line += f"; {counts.held_out:,} held out to validate their own part"
    return line


def split_indices(poems: list[str], fraction: float, method: str = "hash") -> tuple[list[int], list[int], SplitCounts]:
    """Training and validation poem indices.

    hash: each poem goes by a hash of its own text (exact repeats fall on one side, near-repeats
    may not). grouped: a near-repeat group goes as a whole, by the hash of its smallest text,
    and an exact repeat of an earlier poem is not trained again."""
    if method == "hash":
        val = [is_validation(poem, fraction) for poem in poems]
        return ([i for i, v in enumerate(val) if not v], [i for i, v in enumerate(val) if v], SplitCounts(0, 0, 0))
    if method != "grouped":
        raise ValueError(f"unknown split {method!r}")
    groups = near_repeat_groups(poems)
    members = collections.defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    side = {group: is_validation(min(poems[i] for i in indices), fraction) for group, indices in members.items()}
    seen, train, val, repeats = set(), [], [], 0
    for index, poem in enumerate(poems):
        if poem in seen:
            repeats += 1
            continue
        seen.add(poem)
        (val if side[groups[index]] else train).append(index)
    sizes = [len(indices) for indices in members.values() if len(indices) > 1]
    return train, val, SplitCounts(repeats, len(sizes), sum(sizes))


def near_repeats_of(poems: list[str], candidates, targets) -> set[int]:
    """The candidates that near-repeat one of the targets by near_repeat_groups' rule (sharing
    at least half of the lines of the shorter poem, lines of 4+ characters)."""

    def lines(index):
        return {line for line in lines_of(poems[index]) if len(line) >= MIN_SHARED_LINE}

    target_lines, holders = {}, collections.defaultdict(list)
    for target in targets:
        target_lines[target] = lines(target)
        for line in target_lines[target]:
            holders[line].append(target)
    found = set()
    for candidate in candidates:
        own = lines(candidate)
        shared = collections.Counter(target for line in own for target in holders.get(line, ()))
        if any(2 * count >= min(len(own), len(target_lines[target])) for target, count in shared.items()):
            found.add(candidate)
    return found


def part_split(corpus: Corpus, part: range, train_config) -> tuple[list[int], list[int], SplitCounts]:
    """Training and validation indices of one part's poems, split as if it were alone."""
    train, val, counts = split_indices([corpus.poems[i] for i in part], train_config.val_fraction, train_config.split)
    return [part[i] for i in train], [part[i] for i in val], counts


def split_parts(corpus: Corpus, train_config) -> tuple[list[int], list[int], SplitCounts]:
    """Training and validation indices of a corpus of one or more parts. The main part is split
    as alone (part_split), so its validation poems never change, and it alone validates a run.
    A part that holds out validation poems of its own (the 词) is split the same way and its
    validation poems are not trained; the other parts only train. From training go also exact
    repeats of any earlier poem and near-repeats of a validation poem of the main part."""
    main, *others = corpus.part_ranges(train_config.max_poems)
    poems = corpus.poems
    train, val, counts = part_split(corpus, main, train_config)
    if not others:
        return train, val, counts
    held_out = []
    for part, validated in zip(others, corpus.part_validated[1:] or [False] * len(others)):
        if validated:
            held_out += part_split(corpus, part, train_config)[1]
    held = set(held_out)
    extra = [index for part in others for index in part if index not in held]
    near_val = near_repeats_of(poems, extra, val)
    seen, repeats = {poems[i] for i in main}, 0
    for index in extra:
        if poems[index] in seen:
            repeats += 1
        elif index not in near_val:
            train.append(index)
        seen.add(poems[index])
    return (
        train,
        val,
        dataclasses.replace(
            counts, exact_repeats=counts.exact_repeats + repeats, near_val=len(near_val), held_out=len(held_out)
        ),
    )


def sequences(corpus: Corpus, indices, titles: bool, max_title: int) -> list[str]:
    """What the model reads for each poem: the poem (G ... E), after its title when `titles`."""
    if not titles:
        return [corpus.poems[i] for i in indices]
    return [corpus.titles[i][:max_title] + corpus.poems[i] for i in indices]


FINGERPRINT_BLOCK = 100  # poems a block of the fingerprint, so a mismatch can say where it starts


def fingerprint(corpus: Corpus, train_config) -> dict:
    """What a run reads, in order (each kept poem after its title when the run reads titles),
    as a count and hashes: a resumed run checks it against the checkpoint's. A poem's hash is
    over its text, so a BOM, CRLF line ends or another file name change nothing."""
    read = sequences(corpus, corpus.used(train_config.max_poems), train_config.titles, train_config.max_title)
    blocks = [
        hashlib.blake2b("\n".join(read[i : i + FINGERPRINT_BLOCK]).encode("utf-8"), digest_size=6).hexdigest()
        for i in range(0, len(read), FINGERPRINT_BLOCK)
    ]
    return {"poems": len(read), "blocks": blocks, "sha256": hashlib.sha256("\n".join(read).encode("utf-8")).hexdigest()}


def shift(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-character targets of one poem.

    The original's targets are its inputs shifted by one with the last repeated
    ([6,2,4,6,9] -> [2,4,6,9,9]); its final pair E -> E teaches nothing (sampling stops
    at E), so it is dropped: inputs [6,2,4,6], targets [2,4,6,9].
    """
    return tokens[..., :-1], tokens[..., 1:]


def choose_buckets(lengths: list[int], num_buckets: int) -> tuple[int, ...]:
    """Bucket lengths that minimise padded positions (exact, by dynamic programming).

    Each bucket pads its sequences to its own length; the longest sequence sets the last.
    """
    histogram = collections.Counter(lengths)
    sizes = sorted(histogram)
    num_buckets = min(num_buckets, len(sizes))
    # Prefix sums make the padding of "sizes[i..j] all padded to sizes[j]" O(1).
    count_sum = np.concatenate([[0], np.cumsum([histogram[size] for size in sizes])])
    token_sum = np.concatenate([[0], np.cumsum([histogram[size] * size for size in sizes])])

    def padding(i, j):
        return sizes[j] * (count_sum[j + 1] - count_sum[i]) - (token_sum[j + 1] - token_sum[i])

    n = len(sizes)
    best = [[padding(0, j) for j in range(n)]]  # best[k - 1][j]: k buckets covering sizes[..j]
    start = [[0] * n]
    for k in range(1, num_buckets):
        row, starts = [np.inf] * n, [0] * n
        for j in range(k, n):
            for i in range(k, j + 1):
                total = best[k - 1][i - 1] + padding(i, j)
                if total < row[j]:
                    row[j], starts[j] = total, i
        best.append(row)
        start.append(starts)
    ends, j = [], n - 1
    for k in range(num_buckets - 1, -1, -1):
        ends.append(sizes[j])
        j = start[k][j] - 1
    return tuple(sorted(ends))


@dataclass(frozen=True)
class BucketedData:
    """Poems grouped by bucket, each group padded once into a (poems, length + 1) array."""

    buckets: tuple[int, ...]  # padded input lengths
    tokens: list[np.ndarray]  # per bucket: (poems, length + 1) token ids, padded with END
    lengths: list[np.ndarray]  # per bucket: real input length of each poem
    starts: list[np.ndarray]  # per bucket: position of G in each row (the title's length; 0 without one)
    is_char: np.ndarray  # per vocabulary id: a Chinese character (not punctuation, G or E)

    @property
    def num_poems(self) -> int:
        return sum(len(group) for group in self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(sum(group.sum() for group in self.lengths))


def bucketize(
    encoded: list[np.ndarray], buckets: tuple[int, ...], start_id: int, end_id: int, is_char: np.ndarray
) -> BucketedData:
    groups = [[] for _ in buckets]
    for tokens in encoded:
        length = len(tokens) - 1
        index = int(np.searchsorted(buckets, length))
        if index == len(buckets):
            raise ValueError(f"a poem of length {length} exceeds the largest bucket {buckets[-1]}")
        groups[index].append(tokens)
    padded, lengths, starts = [], [], []
    for bucket, group in zip(buckets, groups):
        array = np.full((len(group), bucket + 1), end_id, np.int32)
        for row, tokens in enumerate(group):
            array[row, : len(tokens)] = tokens
        padded.append(array)
        lengths.append(np.array([len(tokens) - 1 for tokens in group], np.int32))
        starts.append(np.argmax(array == start_id, axis=1).astype(np.int32))
    return BucketedData(tuple(buckets), padded, lengths, starts, is_char)


def prepare(
    poems: list[str], vocab: list[str], val_fraction: float, num_buckets: int
) -> tuple[BucketedData, BucketedData]:
    """Training and validation sets of title-free poems, split by hash and bucketed alike."""
    return bucket_split(*split(poems, val_fraction), vocab, num_buckets)


def bucket_split(
    train: list[str], val: list[str], vocab: list[str], num_buckets: int
) -> tuple[BucketedData, BucketedData]:
    """Both halves of a split bucketed alike; bucket lengths come from all their sequences."""
    buckets = choose_buckets([len(poem) - 1 for poem in train + val], num_buckets)
    start_id, end_id = vocab.index(START), vocab.index(END)
    is_char = np.array([is_hanzi(char) for char in vocab])
    return (
        bucketize(encode(train, vocab), buckets, start_id, end_id, is_char),
        bucketize(encode(val, vocab), buckets, start_id, end_id, is_char),
    )


@dataclass(frozen=True)
class Dataset:
    """A run's data as training sees it: the split, the vocabulary and the bucketed sets."""

    train_poems: list[str]  # wrapped poems (G ... E) of the training side, without titles
    val_poems: list[str]
    val_sequences: list[str]  # what the model reads of each validation poem (title + poem with titles)
    vocab: list[str]
    train: BucketedData
    val: BucketedData
    counts: SplitCounts


def make_dataset(corpus: Corpus, train_config, vocab: list[str] | None = None) -> Dataset:
    """Split, vocabulary (unless a checkpoint brings its own) and buckets, as train_config says."""
    poems = corpus.poems
    train_ids, val_ids, counts = split_parts(corpus, train_config)
    read = functools.partial(sequences, corpus, titles=train_config.titles, max_title=train_config.max_title)
    vocab = vocab or build_vocab(read(corpus.used(train_config.max_poems)))
    val_sequences = read(val_ids)
    train_data, val_data = bucket_split(read(train_ids), val_sequences, vocab, train_config.num_buckets)
    return Dataset(
        [poems[i] for i in train_ids], [poems[i] for i in val_ids], val_sequences, vocab, train_data, val_data, counts
    )


def first_of_each_bucket(plan: list[tuple[int, np.ndarray]]) -> list[int]:
    """The index in `plan` of the first batch of each bucket it reaches, in bucket order: one
    batch a shape, to run every compiled program once before timing."""
    first = {}
    for index, (bucket_index, _) in enumerate(plan):
        first.setdefault(bucket_index, index)
    return [first[bucket_index] for bucket_index in sorted(first)]


def epoch_plan(
    data: BucketedData, batch_size: int, seed: int, epoch: int, shuffle: bool = True
) -> list[tuple[int, np.ndarray]]:
    """The epoch's batches as (bucket index, poem rows), a pure function of (seed, epoch).

    Resuming at batch k of an epoch replays exactly the batches an uninterrupted run would.
    """
    rng = np.random.default_rng([seed, epoch])
    plan = []
    for bucket_index, group in enumerate(data.lengths):
        rows = rng.permutation(len(group)) if shuffle else np.arange(len(group))
        plan += [(bucket_index, rows[start : start + batch_size]) for start in range(0, len(rows), batch_size)]
    if shuffle:
        plan = [plan[i] for i in rng.permutation(len(plan))]
    return plan


def make_batch(data: BucketedData, bucket_index: int, rows: np.ndarray, batch_size: int) -> dict:
    """A fixed-shape batch; a short last batch is filled with fully masked rows.

    mask: the targets the loss counts (the poem after G, not its title); chars: those of them
    that are Chinese characters (punctuation and E excluded), for the character-only metrics."""
    length = data.buckets[bucket_index]
    tokens = np.zeros((batch_size, length + 1), np.int32)
    tokens[: len(rows)] = data.tokens[bucket_index][rows]
    real = np.zeros(batch_size, np.int32)
    real[: len(rows)] = data.lengths[bucket_index][rows]
    start = np.zeros(batch_size, np.int32)
    start[: len(rows)] = data.starts[bucket_index][rows]
    inputs, targets = shift(tokens)
    positions = np.arange(length)[None, :]
    mask = (positions < real[:, None]) & (positions >= start[:, None])
    return {
        "inputs": inputs,
        "targets": targets,
        "mask": mask.astype(np.float32),
        "chars": (mask & data.is_char[targets]).astype(np.float32),
    }


def padded_share(data: BucketedData, batch_size: int) -> float:
    """Share of computed positions that are padding, counting the fill of short batches."""
    computed = sum(
        -(-len(group) // batch_size) * batch_size * bucket for bucket, group in zip(data.buckets, data.lengths)
    )
    return 1 - data.num_tokens / computed if computed else 0.0
