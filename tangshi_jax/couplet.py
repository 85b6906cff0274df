"""Couplets (对联): the 下联 that answers a given 上联, on the rule engine of the forms.

    python -m tangshi_jax.sample --couplet 风声雨声读书声

The model reads the 上联 as a poem's first line and writes the next one, as the 颔联 and
颈联 of regulated verse taught it. The template makes the 下联 mirror the 上联: the same
clauses with the same marks; level (平) against oblique (仄) at the 2nd, 4th and 6th
character of each clause and at its last (every position whose tone is certain, with
--tones); a 上联 ends oblique and its 下联 level, so a 上联 ending on a level-only character
is refused (the custom 仄起平收: give the clause ending oblique first). No character of the
上联 comes back in the 下联, and the 下联 repeats a character exactly where the 上联 does
(风声雨声读书声 → 家事国事天下事): those places copy the 下联's own earlier character.
"""

import re
from dataclasses import dataclass

import numpy as np

from tangshi_jax import cipai, rules
from tangshi_jax.data import is_hanzi, vocab_ids
from tangshi_jax.errors import TangshiError

CLAUSE_MARKS = "，、；：！？。"  # what may part the clauses of a 上联 (its own end mark is dropped)
MAX_CLAUSE, MAX_CLAUSES = 11, 4  # longer clauses or more of them are a 长联, beyond a line-trained model
FIXED_COLUMNS = (1, 3, 5)  # 0-based: the 2nd, 4th and 6th character of a clause (二四六分明)


@dataclass(frozen=True)
class Shape:
    """A 上联 parsed: its clauses and the mark after each but the last."""

    clauses: tuple[str, ...]
    marks: tuple[str, ...]

    @property
    def text(self) -> str:
        return "".join(clause + mark for clause, mark in zip(self.clauses, self.marks + ("",)))


def parse(first: str) -> Shape:
    """The clauses of a 上联; a TangshiError names what makes it no 上联."""
    text = re.sub(r"\s+", "", first).rstrip(CLAUSE_MARKS)
    parts = re.split(f"([{CLAUSE_MARKS}])", text)
    clauses, marks = tuple(parts[0::2]), tuple(parts[1::2])
    strange = sorted({char for char in "".join(clauses) if not is_hanzi(char)})
    if not text or strange:
        raise TangshiError(
            "{couplet} needs Chinese characters, clauses parted by ，; got {text!r}"
            + (" (not Chinese: {strange})" if strange else ""),
            field="couplet",
            text=first,
            strange=" ".join(strange),
        )
    if any(not clause for clause in clauses) or len(clauses) > MAX_CLAUSES or max(map(len, clauses)) > MAX_CLAUSE:
        raise TangshiError(
            "{couplet} {text!r} has clauses of {lengths} characters; give 1 to {clauses} clauses of 1 to {chars}",
            field="couplet",
            text=first,
            lengths=",".join(str(len(clause)) for clause in clauses),
            clauses=MAX_CLAUSES,
            chars=MAX_CLAUSE,
        )
    return Shape(clauses, marks)


def opposed(level: bool, oblique: bool) -> int:
    """The tone that answers a character's: LEVEL for an oblique-only one, OBLIQUE for a level-only
    one, ANY for one read both ways or not in the table."""
    if level == oblique:
        return rules.ANY
    return rules.OBLIQUE if level else rules.LEVEL


def length(shape: Shape) -> int:
    """Positions of 上联，下联。 (the end token after them aside)."""
    return 2 * (len(shape.text) + 1)


def couplet_template(
    shape: Shape,
    vocab: list[str],
    prosody: rules.Prosody,
    max_len: int,
    end_id: int,
    marks: dict[str, int],
    every_position: bool,
):
    """Per-position arrays (1..max_len after the start token) of 上联，下联。: kind, forced and tones as
    rules.form_template gives them (the 上联 and the marks forced), `copy_from` (the position a
    repeat of the 上联 copies in the 下联, -1 elsewhere) and `fresh` (positions that may take no
    character written before them). marks: the ids of ， and 。; a clause mark the model never
    saw is written ，. every_position: oppose every tone that is certain."""
    ids = vocab_ids(vocab)
    mark_id = lambda mark: ids.get(mark, marks[rules.COMMA])
    missing = sorted({char for char in shape.text if char not in CLAUSE_MARKS and char not in ids})
    if missing:
        raise TangshiError(
            "{couplet} holds {chars}, which this model never saw; choose other characters",
            field="couplet",
            chars=" ".join(missing),
        )
    last = ids[shape.clauses[-1][-1]]
    if prosody.level[last] and not prosody.oblique[last]:
        raise TangshiError(
            "{couplet} ends on {char!r}, a level (平) tone: a 上联 ends oblique (仄) and its 下联 level; "
            "give the clause ending oblique as the 上联",
            field="couplet",
            char=shape.clauses[-1][-1],
        )
    first = shape.text + rules.COMMA
    kind = np.full(max_len + 1, rules.FORCED, np.int32)
    forced = np.full(max_len + 1, end_id, np.int32)
    tones = np.full(max_len + 1, rules.ANY, np.int32)
    copy_from = np.full(max_len + 1, -1, np.int32)
    fresh = np.zeros(max_len + 1, bool)
    forced[1 : len(first) + 1] = [mark_id(char) if char in CLAUSE_MARKS else ids[char] for char in first]
    answer = len(first) + 1  # the 下联's first position
    for offset, char in enumerate(first):
        position = answer + offset
        if char in CLAUSE_MARKS:
            forced[position] = marks[rules.PERIOD] if offset == len(first) - 1 else mark_id(char)
            continue
        earlier = first.find(char)
        if earlier < offset:  # a repeat within the 上联: the 下联 repeats its own character there
            copy_from[position] = answer + earlier
            continue
        kind[position], fresh[position] = rules.CHAR, True
        column, clause_end = clause_column(first, offset)
        if every_position or column in FIXED_COLUMNS or clause_end:
            tones[position] = opposed(bool(prosody.level[ids[char]]), bool(prosody.oblique[ids[char]]))
    end = answer + len(first) - 2  # the 下联 ends level, whatever reading its 上联's last character had
    tones[copy_from[end] if copy_from[end] >= 0 else end] = rules.LEVEL
    return kind, forced, tones, copy_from, fresh


def clause_column(text: str, offset: int) -> tuple[int, bool]:
    """The 0-based column of text[offset] within its clause, and whether it ends the clause."""
    start = max(text.rfind(mark, 0, offset) for mark in CLAUSE_MARKS) + 1
    return offset - start, offset + 1 == len(text) or text[offset + 1] in CLAUSE_MARKS


def split(poem: str, shape: Shape) -> tuple[str, str]:
    """The 上联 and the 下联 of a written couplet (the sampler's poem, marks included)."""
    cut = len(shape.text) + 1
    return poem[:cut], poem[cut:]


def check(first: str, second: str, every_position: bool = False) -> dict[str, bool]:
    """Whether a 下联 answers its 上联 (both as `split` gives them, marks included): `shape`, the
    same clauses and marks, ending 。; `tones`, opposed where the template opposes them
    (ambiguous readings pass) and ending level; `repeats`, no character of the 上联, and a
    character repeated exactly where the 上联 repeats one."""
    upper, lower = first.rstrip(CLAUSE_MARKS), second.rstrip(CLAUSE_MARKS)
    shape = (
        len(upper) == len(lower)
        and second.endswith(rules.PERIOD)
        and all(
            (a in CLAUSE_MARKS) == (b in CLAUSE_MARKS) and (a not in CLAUSE_MARKS or a == b or b == rules.COMMA)
            for a, b in zip(upper, lower)
        )
    )
    if not shape:
        return {"shape": False, "tones": False, "repeats": False}
    readings = cipai.tones_of_chars(upper + lower)  # the readings as the rule tables give them
    tones = "平" in readings[lower[-1]]
    repeats = True
    for offset, (a, b) in enumerate(zip(upper, lower)):
        if a in CLAUSE_MARKS:
            continue
        earlier = upper.find(a)
        if earlier < offset:
            repeats &= b == lower[earlier]
            continue
        repeats &= b not in upper and b not in lower[:offset]
        column, clause_end = clause_column(upper, offset)
        if every_position or column in FIXED_COLUMNS or clause_end:
            want = opposed("平" in readings[a], "仄" in readings[a])
            tones &= want == rules.ANY or ("平" if want == rules.LEVEL else "仄") in readings[b]
    return {"shape": shape, "tones": tones, "repeats": repeats}
