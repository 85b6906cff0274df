"""词 to a tune (词牌): the rhymes of 词林正韵 and each tune's template, learned from the corpus.

    python -m tangshi_jax.sample --list-tunes       (reads poems.ci.txt: python -m tangshi_jax.corpus --part ci)

词林正韵 (戈载, 1821) groups the rhymes of 词 in 19 部: in 部 1-14 a level (平) rhyme and
its rising and departing (上去, both 仄) forms, in 部 15-19 the entering (入) tone. Each 部 is
a union of 平水韵 groups, the table the rules already read; seven groups are divided between
two 部, and for those a character goes by the final of its commonest Mandarin reading (the
split follows the old finals that Mandarin kept: 灰 -ai to 部 5, -ui to 部 3).

A tune's template comes from its 词 in the corpus. The edition the corpus follows (唐圭璋's
全宋词) ends a line with 。 where it rhymes and with ，or 、 where it does not, so a 词's
shape is its lines with their lengths and marks. Long tunes vary their commas (水调歌头's
commonest comma pattern holds for a third of its 词), so a template takes the commonest
sequence of rhyme-to-rhyme lengths first, then the commonest commas among the 词 that have it.
"""

import collections
import functools
import re
from dataclasses import dataclass

import numpy as np

from tangshi_jax import rules
from tangshi_jax.errors import TangshiError

BU = 19
# 部 of each 平水韵 group, by the character that names the group (東 for 上平聲一東); a
# tuple is a divided group: (部 for the finals listed, 部 otherwise, those finals).
_AI = ("ai", "uai")
_A = ("a", "ia", "ua")
_EN = ("en", "uen", "in", "vn")
GROUP_BU = {
    **dict.fromkeys("東冬董腫送宋", 1),
    **dict.fromkeys("江陽講養絳漾", 2),
    **dict.fromkeys("支微齊紙尾薺寘未霽", 3),
    **dict.fromkeys("魚虞語麌御遇", 4),
    **dict.fromkeys("蟹", 5),
    **dict.fromkeys("真文軫吻震問", 6),
    **dict.fromkeys("寒刪先旱潸銑翰諫霰", 7),
    **dict.fromkeys("蕭肴豪篠巧皓嘯效號", 8),
    **dict.fromkeys("歌哿箇", 9),
    **dict.fromkeys("麻馬禡", 10),
    **dict.fromkeys("庚青蒸梗迥敬徑", 11),
    **dict.fromkeys("尤有宥", 12),
    **dict.fromkeys("侵寢沁", 13),
    **dict.fromkeys("覃鹽咸感琰豏勘豔陷", 14),
    **dict.fromkeys("屋沃", 15),
    **dict.fromkeys("覺藥", 16),
    **dict.fromkeys("質陌錫職緝", 17),
    **dict.fromkeys("物月曷黠屑葉", 18),
    **dict.fromkeys("合洽", 19),
    **dict.fromkeys("灰賄隊泰", (5, 3, _AI)),
    **dict.fromkeys("佳卦", (10, 5, _A)),
    **dict.fromkeys("元阮願", (6, 7, _EN)),
}


def mandarin_final(char: str) -> str:
    from pypinyin import Style, pinyin

    return pinyin(char, style=Style.FINALS, strict=True)[0][0]


def bu_of(group: str, char: str) -> int:
    """The 部 of a (traditional) character in the 平水韵 group named by `group`."""
    bu = GROUP_BU[group]
    if isinstance(bu, int):
        return bu
    listed, other, finals = bu
    return listed if mandarin_final(char) in finals else other


@functools.cache
def cilin_table() -> dict[str, set[tuple[int, str]]]:
    """Every character of the 平水韵 table (traditional) -> its (部, tone) pairs, tone 平 or 仄."""
    table = collections.defaultdict(set)
    for tone, parts in rules.rhyme_table().items():
        for part in parts.values():
            for name, strings in part.items():
                group = name[-1]
                for char in "".join(strings):
                    table[char].add((bu_of(group, char), "平" if tone == "ping" else "仄"))
    return dict(table)


@dataclass(frozen=True)
class CiRhymes:
    """Per-vocabulary 词林正韵 membership: level[i, b] (b = 部 - 1) if the character rhymes
    in 部 b+1 read level, oblique[i, b] if read rising, departing or entering."""

    level: np.ndarray  # (V, 19)
    oblique: np.ndarray  # (V, 19)


@functools.lru_cache(maxsize=4)
def build_ci_rhymes(vocab: tuple[str, ...]) -> CiRhymes:
    table = cilin_table()
    level, oblique = np.zeros((len(vocab), BU), bool), np.zeros((len(vocab), BU), bool)
    for i, char in enumerate(vocab):
        for bu, tone in table.get(rules.to_traditional(char), ()) if len(char) == 1 else ():
            (level if tone == "平" else oblique)[i, bu - 1] = True
    return CiRhymes(level, oblique)


# --- tune templates -------------------------------------------------------------------------

NO_TUNE = "失调名"  # "tune lost": no tune
# The 20 commonest named tunes of the 全宋词, the commonest first: evaluate's 词 rows.
COMMON_TUNES = (
    "浣溪沙 水调歌头 鹧鸪天 菩萨蛮 满江红 西江月 临江仙 念奴娇 减字木兰花 沁园春 "
    "蝶恋花 点绛唇 贺新郎 清平乐 满庭芳 虞美人 好事近 水龙吟 朝中措 渔家傲"
).split()
STOPS, BREAKS = "。？！", "，；：、"  # marks that end a rhymed line, and the others
MARK_OF = {**dict.fromkeys(STOPS, "。"), **dict.fromkeys("，；：", "，"), "、": "、"}
LINE = re.compile(f"([^{STOPS}{BREAKS}]+)([{STOPS}{BREAKS}])")
MIN_CI = 5  # 词 a tune needs for a template
TONE_AGREEMENT = 0.8  # share of the 词 that must agree for a position's tone to be fixed
MIN_TONE_VOTES = 5  # and how many single-reading characters must stand there
RHYME_AGREEMENT = 0.6  # share of the 词 whose character at a 。 rhymes in the 词's own 部


def tune_of(title: str) -> str | None:
    """The tune of a 词's title: the first of its names (木兰花・玉楼春 -> 木兰花); None for 失调名."""
    name = title.split("・")[0].strip()
    return None if not name or name == NO_TUNE else name


def shape_of(content: str) -> tuple[tuple[int, str], ...] | None:
    """(characters, mark) of each line; None unless the whole text is lines ending in marks."""
    lines = LINE.findall(content)
    if sum(len(text) + 1 for text, _ in lines) != len(content):
        return None
    return tuple((len(text), MARK_OF[mark]) for text, mark in lines)


def rhyme_chunks(shape) -> tuple[int, ...]:
    """Characters between one 。 and the next: what stays when the commas vary."""
    chunks, count = [], 0
    for length, mark in shape:
        count += length
        if mark == "。":
            chunks.append(count)
            count = 0
    return tuple(chunks + ([count] if count else []))


@dataclass(frozen=True)
class Tune:
    name: str
    count: int  # 词 of this tune with a readable shape
    fit: float  # share of them whose rhyme-to-rhyme lengths are the template's
    exact: float  # share whose every line and mark are the template's
    lines: tuple[tuple[int, str], ...]  # (characters, mark) of each line
    second_half: int | None  # the line that starts the second half (下片), where the pattern shows one
    tones: str  # one of 平 仄 中 (either) a character
    rhymes: tuple[int, ...]  # the rhyme set each line's last character belongs to; -1: no rhyme
    rhyme_tones: tuple[str, ...]  # each rhyme set's tone: 平 (level) or 仄 (rising, departing, entering)

    def pattern(self) -> str:
        """The template as a line of text: tones, marks, a rhyme as (平韵) or (仄韵) with a
        letter per set when the tune changes rhyme, | between the halves."""
        out, position = [], 0
        for index, ((length, mark), rhyme) in enumerate(zip(self.lines, self.rhymes)):
            if index == self.second_half:
                out.append(" | ")
            label = (
                "" if rhyme < 0 else f"({self.rhyme_tones[rhyme]}韵{'ABCDEFGH'[rhyme] * (len(self.rhyme_tones) > 1)})"
            )
            out.append(self.tones[position : position + length] + label + mark)
            position += length
        return "".join(out)


def second_half(lines) -> int | None:
    """Where the lines split into two halves that end alike (their last two lines or more the
    same), nearest the middle by characters; None when no cut at a rhyme shows one."""
    total, best, before = sum(length for length, _ in lines), None, 0
    for cut in range(2, len(lines) - 1):
        before += lines[cut - 1][0]
        if lines[cut - 1][1] != "。" or lines[cut - 2 : cut] != lines[-2:]:
            continue
        if best is None or abs(2 * before - total) < abs(2 * best[1] - total):
            best = (cut, before)
    return best[0] if best else None


def position_tones(texts: list[str], vocab_tones: dict[str, set[str]]) -> str:
    """平, 仄 or 中 at each position of equally long texts: fixed where TONE_AGREEMENT of the
    characters with one reading agree (a character with both readings fits either, so it
    does not vote)."""
    out = []
    for column in zip(*texts):
        votes = collections.Counter(
            next(iter(tones)) for char in column if len(tones := vocab_tones.get(char, ())) == 1
        )
        total = sum(votes.values())
        tone, count = votes.most_common(1)[0] if votes else ("中", 0)
        out.append(tone if total >= MIN_TONE_VOTES and count >= TONE_AGREEMENT * len(column) else "中")
    return "".join(out)


def tones_of_chars(chars) -> dict[str, set[str]]:
    """Each simplified character's readings, 平 and/or 仄, as the rule tables give them."""
    vocab = tuple(sorted(set(chars)))
    prosody = rules.build_prosody(vocab)
    return {
        char: {tone for tone, has in (("平", prosody.level[i]), ("仄", prosody.oblique[i])) if has}
        for i, char in enumerate(vocab)
    }


def learn_tune(name: str, texts: list[str], readings: dict, table: dict) -> Tune | None:
    """The template of one tune from its 词 (contents without G/E), or None if too few fit."""
    shaped = [(text, shape) for text in texts if (shape := shape_of(text))]
    if len(shaped) < MIN_CI:
        return None
    chunks, chunk_count = collections.Counter(rhyme_chunks(shape) for _, shape in shaped).most_common(1)[0]
    fitting = [(text, shape) for text, shape in shaped if rhyme_chunks(shape) == chunks]
    lines, exact_count = collections.Counter(shape for _, shape in fitting).most_common(1)[0]
    bare = [re.sub(f"[{STOPS}{BREAKS}]", "", text) for text, _ in fitting]
    rhymes, rhyme_tones = rhyme_sets(lines, bare, table)
    return Tune(
        name,
        len(shaped),
        chunk_count / len(shaped),
        exact_count / len(shaped),
        lines,
        second_half(lines),
        position_tones(bare, readings),
        rhymes,
        rhyme_tones,
    )


def rhyme_sets(lines, bare: list[str], table: dict) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Which lines end on a rhyme, and with which others. A line ending in 。 rhymes with an
    earlier one when, in RHYME_AGREEMENT of the 词, their last characters share a 部 in the
    same tone; lines so joined are one rhyme set (a tune like 菩萨蛮 changes rhyme, and its
    sets alternate level and oblique). Returns each line's set (-1: no rhyme) and each set's
    tone, 平 or 仄, as most of its characters read."""
    ends, position = [], 0
    for length, _ in lines:
        position += length
        ends.append(position - 1)
    stops = [index for index, (_, mark) in enumerate(lines) if mark == "。"]
    readings = [[table.get(rules.to_traditional(text[ends[index]]), set()) for index in stops] for text in bare]
    agree = collections.Counter(
        (a, b) for found in readings for a in range(len(stops)) for b in range(a + 1, len(stops)) if found[a] & found[b]
    )
    parent = list(range(len(stops)))
    joined = set()
    for b in range(len(stops)):
        for a in range(b):
            if agree[a, b] >= RHYME_AGREEMENT * len(bare):
                parent[b] = parent[a]
                joined |= {a, b}
                break
    roots = sorted({parent[i] for i in joined})
    line_set = [-1] * len(lines)
    for i in joined:
        line_set[stops[i]] = roots.index(parent[i])
    tones = []
    for root in roots:
        votes = collections.Counter(
            tone for found in readings for i in joined if parent[i] == root for _, tone in found[i]
        )
        tones.append(votes.most_common(1)[0][0] if votes else "平")
    return tuple(line_set), tuple(tones)


def learn_tunes(titles: list[str], contents: list[str]) -> list[Tune]:
    """Templates of every tune with at least MIN_CI 词, the commonest tunes first."""
    by_tune = collections.defaultdict(list)
    for title, content in zip(titles, contents):
        if tune := tune_of(title):
            by_tune[tune].append(content)
    readings = tones_of_chars(char for content in contents for char in content)
    table = cilin_table()
    learned = [learn_tune(name, texts, readings, table) for name, texts in by_tune.items() if len(texts) >= MIN_CI]
    return sorted((tune for tune in learned if tune), key=lambda tune: (-tune.count, tune.name))


def read_ci(path) -> tuple[list[str], list[str]]:
    """(titles as written, contents) of the usable 词 of a poems.ci.txt (the corpus part's rules)."""
    from tangshi_jax import data

    max_chars, forbidden = data.part_rules("ci")
    titles, contents = [], []
    for _, line in data.read_lines(path):
        try:
            poem = data.parse_line(line, max_chars, forbidden)
        except ValueError:
            continue
        if poem:
            titles.append(line.split(":")[0].strip())
            contents.append(poem[1:-1])
    return titles, contents


def check(text: str, tune: Tune) -> dict[str, bool]:
    """Whether a 词 keeps its tune: `lines`, the template's line lengths and marks (、 written
    as ， by a model that lacks it); `rhyme`, each rhyme set's line ends in one 词林正韵 部 of
    the set's tone; `tones`, a character of the wanted tone wherever the template fixes one."""
    shape = shape_of(text)
    lines = shape is not None and [length for length, _ in shape] == [length for length, _ in tune.lines]
    lines = lines and all(
        mark == want or (mark, want) == ("，", "、") for (_, mark), (_, want) in zip(shape, tune.lines)
    )
    if not lines:
        return {"lines": False, "rhyme": False, "tones": False}
    bare = "".join(LINE.sub(r"\1", text))
    ends = np.cumsum([length for length, _ in tune.lines]) - 1
    table, rhyme = cilin_table(), True
    for rhyme_set, tone in enumerate(tune.rhyme_tones):
        members = [bare[end] for end, s in zip(ends, tune.rhymes) if s == rhyme_set]
        shared = set.intersection(*(table.get(rules.to_traditional(char), set()) for char in members))
        rhyme &= any(bu_tone == tone for _, bu_tone in shared)
    readings = tones_of_chars(bare)
    tones = all(want == "中" or want in readings[char] for char, want in zip(bare, tune.tones))
    return {"lines": True, "rhyme": rhyme, "tones": tones}


def tune_lines(data_path) -> list[str]:
    """What `sample --list-tunes` prints: each tune learned from the 词 beside `data_path`."""
    from tangshi_jax import corpus

    tunes = list(tunes_beside(data_path).values())  # the commonest first, as learn_tunes orders them
    header = (
        f"{len(tunes)} tunes with {MIN_CI} or more 词 in {corpus.part_path(data_path, 'ci')} "
        f"({sum(tune.count for tune in tunes):,} 词); "
        f"tones fixed where {TONE_AGREEMENT:.0%} of a tune's 词 agree (中: either), | between the halves"
    )
    return [header] + [f"{tune.name}\t{tune.count} 词, {tune.fit:.0%} fit\t{tune.pattern()}" for tune in tunes]


# --- a tune's template as the sampler's arrays ---------------------------------------------

MAX_RHYME_SETS = 8  # rhyme sets a template may have (the corpus's tunes have at most 4)
CI_GROUPS = 2 * BU  # the sampler's rhyme groups for 词: (部, level) for 部 1-19, then (部, oblique)
TONE_CODES = {"平": rules.LEVEL, "仄": rules.OBLIQUE, "中": rules.ANY}


def ci_groups(vocab: tuple[str, ...]) -> np.ndarray:
    """(V, CI_GROUPS) each character's 词林正韵 groups, level ones first."""
    rhymes = build_ci_rhymes(vocab)
    return np.concatenate([rhymes.level, rhymes.oblique], axis=1)


def tune_length(tune: Tune) -> int:
    """Characters and marks of a 词 of the tune."""
    return sum(length + 1 for length, _ in tune.lines)


def tune_template(tune: Tune, max_len: int, mark_ids: dict[str, int], end_id: int):
    """Per-position arrays of a 词 of `tune` (positions 1..max_len after the start token):
    kind and forced as rules.form_template gives them (marks forced, E after the last), the
    tone wanted at each position, each line end's rhyme set (-1: none), and each set's
    allowed groups to start from (its tone's 19 部)."""
    kind = np.full(max_len + 1, rules.FORCED, np.int32)
    forced = np.full(max_len + 1, end_id, np.int32)
    tones = np.full(max_len + 1, rules.ANY, np.int32)
    rhyme_set = np.full(max_len + 1, -1, np.int32)
    set_groups = np.zeros((MAX_RHYME_SETS, CI_GROUPS), bool)
    for index, tone in enumerate(tune.rhyme_tones):
        set_groups[index, slice(0, BU) if tone == "平" else slice(BU, CI_GROUPS)] = True
    position, char = 1, 0
    for (length, mark), rhyme in zip(tune.lines, tune.rhymes):
        kind[position : position + length] = rules.CHAR
        tones[position : position + length] = [TONE_CODES[tone] for tone in tune.tones[char : char + length]]
        rhyme_set[position + length - 1] = rhyme
        forced[position + length] = mark_ids[mark]
        position, char = position + length + 1, char + length
    return kind, forced, tones, rhyme_set, set_groups


@functools.lru_cache(maxsize=2)
def _tunes_of(path: str, mtime_ns: int) -> dict[str, Tune]:
    return {tune.name: tune for tune in learn_tunes(*read_ci(path))}


def tunes_beside(data_path) -> dict[str, Tune]:
    """The tunes learned from the 词 beside `data_path` (poems.ci.txt), by name; learned once
    a process, again when the file changes."""
    from tangshi_jax import corpus

    path = corpus.part_path(data_path, "ci")
    if not path.is_file():
        raise TangshiError(
            f"{path}: no such file; the tunes are learned from it: python -m tangshi_jax.corpus --part ci"
        )
    return _tunes_of(str(path.resolve()), path.stat().st_mtime_ns)


def find_tune(name: str, tunes: dict[str, Tune]) -> Tune:
    wanted = tune_of(name.strip())
    if wanted in tunes:
        return tunes[wanted]
    raise TangshiError(
        "{tune} {name!r} is not a tune learned from the corpus; the commonest are {known} "
        "(all: python -m tangshi_jax.sample --list-tunes)",
        field="tune",
        name=name,
        known="、".join(list(tunes)[:10]),
    )
