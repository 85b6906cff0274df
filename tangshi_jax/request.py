"""What a user asks the sampler for, declared once: every option with its default, bounds and help.

`PoemRequest` is the one request type of `sample`, `evaluate`, `serve` and the batcher. The
command line's flags (`add_flags`), the API's fields (`api_options`), their validation
(`check_value`, `PoemRequest.checked`) and the OpenAPI document (`serve.openapi`) are all
derived from the declarations below, so an option is added in one place. Where a surface
deliberately allows less (the API caps poems, drafts and text lengths), the narrower bound is
declared beside the option, in `api=Narrow(...)`.
"""

import argparse
import dataclasses
from dataclasses import dataclass

import numpy as np

from tangshi_jax import rules
from tangshi_jax.errors import TangshiError, as_flag

MAX_LEN = 64  # a 七言律诗: 8 lines of 7 characters and 8 punctuation marks
MAX_LEN_LIMIT = 1024  # --max-len at most: far above any poem, and the loop's arrays stay small
MAX_ROWS = 1024  # poems × drafts written in one batch; a larger --num is written batch by batch and streamed
# Defaults chosen by `evaluate` over a grid of settings (README, "How the defaults were chosen").
DEFAULT_TEMPERATURE, DEFAULT_TOP_P, DEFAULT_REPETITION_PENALTY = 0.8, 1.0, 1.5
DEFAULT_CANDIDATES = 8  # chosen by evaluate's best-of-8 rows (README, "The best of several drafts")
# The API's own caps (a request is a few hundred bytes and answers within seconds).
MAX_POEMS, MAX_CANDIDATES = 16, 16
# The sampler computes in float32: a number outside its range would overflow or vanish.
FLOAT32_TINY, FLOAT32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)
FREE = "free"  # the form that is no form
FORM_CHOICES = (FREE, *rules.FORMS, *rules.FORM_ALIASES)

AS_DECLARED = object()  # an option's command-line default is its declared default


@dataclass(frozen=True)
class Narrow:
    """Bounds one surface (the API) sets tighter than the option's own."""

    low: float | None = None
    high: float | None = None
    max_chars: int | None = None


@dataclass(frozen=True)
class Option:
    """How one field of PoemRequest is asked for, checked and described."""

    kind: str  # string, integer, number, boolean, or strings: a list of words (--keywords 春 雨)
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    choices: tuple | None = None
    max_chars: int | None = None
    hint: str = ""  # added to a refusal, e.g. what to use instead
    per_poem: bool = False  # differs between poems of one sampler call (the batcher merges on the rest)
    api: Narrow | None = Narrow()  # None: not a field of the API (it uses the default)
    cli_default: object = AS_DECLARED  # the command line's own default, where it differs


def option(default, kind: str, help: str, **settings):
    return dataclasses.field(default=default, metadata={"option": Option(kind, help, **settings)})


@dataclass(frozen=True, kw_only=True)
class PoemRequest:
    """One request for poems: `sample`'s flags and the API's fields, less those of the machine."""

    begin: str | None = option(
        None, "string", "first character(s) of the poem (default: the model's choice)", api=Narrow(max_chars=16)
    )
    title: str | None = option(
        None, "string", "a title to write on (a model trained with --titles)", per_poem=True, api=Narrow(max_chars=32)
    )
    keywords: tuple[str, ...] | None = option(
        None, "strings", "words to write on, read as a title, e.g. 春 雨 夜", per_poem=True, api=Narrow(max_chars=32)
    )
    num: int = option(
        1, "integer", "poems written together in one batch", low=1, per_poem=True, api=Narrow(high=MAX_POEMS)
    )
    candidates: int = option(
        DEFAULT_CANDIDATES,
        "integer",
        "drafts written per poem, the best kept (mean log-probability, less copied lines and repeats)",
        low=1,
        high=MAX_ROWS,
        hint="a poem's drafts are written in one batch",
        api=Narrow(high=MAX_CANDIDATES),
    )
    temperature: float = option(
        DEFAULT_TEMPERATURE,
        "number",
        "below 1 is safer, above 1 wilder",
        low=0,
        low_open=True,
        hint="use {greedy} for the likeliest character",
        api=Narrow(high=5),
    )
    top_k: int = option(
        0, "integer", "sample among the k likeliest characters (0: all)", low=0, api=Narrow(high=100_000)
    )
    top_p: float = option(
        DEFAULT_TOP_P,
        "number",
        "sample among the likeliest characters that hold this share of the probability (1: all)",
        low=0,
        low_open=True,
        high=1,
    )
    repetition_penalty: float = option(
        DEFAULT_REPETITION_PENALTY,
        "number",
        "subtracted from the logit of every character the poem already used (0: off)",
        api=Narrow(low=0, high=10),
    )
    greedy: bool = option(False, "boolean", "always the likeliest character (the original)")
    form: str | None = option(
        None, "string", "free, wujue, qijue, wulv or qilv (五绝, 七绝, 五律, 七律)", choices=FORM_CHOICES
    )
    tune: str | None = option(
        None,
        "string",
        "词牌: write a 词 to this tune, e.g. 浣溪沙 (the tunes: --list-tunes); rhymes always, tones with --tones",
        api=Narrow(max_chars=16),  # a server started with --tunes writes them
    )
    couplet: str | None = option(
        None,
        "string",
        "对联: write the 下联 to this 上联, e.g. 风声雨声读书声 (tones opposed at the 2nd, 4th, 6th and last "
        "character of each clause; every certain one with --tones)",
        api=Narrow(max_chars=31),  # 上联，下联。 then fits the 64 positions a server compiles for
    )
    acrostic: str | None = option(
        None, "string", "藏头诗: line i begins with the i-th character", api=Narrow(max_chars=8)
    )
    line_length: int = option(7, "integer", "characters a line of an acrostic quatrain without a form", choices=(5, 7))
    rhyme: bool = option(False, "boolean", "押韵: even lines end on one 平水韵 level-tone group")
    rhyme_group: str | None = option(
        None, "string", "a character whose rhyme group to use (implies rhyme)", api=Narrow(max_chars=1)
    )
    tones: bool = option(False, "boolean", "平仄: every position follows a regulated-verse pattern")
    loose_tones: bool = option(
        False, "boolean", "with tones, the customary freedom at the 1st, 3rd (and 5th) characters"
    )
    script: str = option(
        "simplified", "string", "simplified or traditional", choices=("simplified", "traditional"), per_poem=True
    )
    max_len: int = option(
        MAX_LEN, "integer", "characters at most, punctuation included", low=1, high=MAX_LEN_LIMIT, api=None
    )
    seed: int | None = option(
        None,
        "integer",
        "the same seed and options give the same poems (default: a new draw)",
        low=-(2**63),
        high=2**63 - 1,
        api=Narrow(low=0, high=2**31 - 1),
        cli_default=0,
    )

    @classmethod
    def checked(cls, surface: str = "cli", caps: dict | None = None, **values) -> "PoemRequest":
        """A request from values of the right types, each checked against its bounds on this
        surface ("cli" or "api"; caps: highs a server sets tighter still, e.g. {"num": 4}); a
        TangshiError names the first value out of bounds."""
        for name, value in values.items():
            values[name] = check_value(name, value, surface, caps)
        if values.get("title") is not None and values.get("keywords") is not None:
            raise TangshiError("give {title} or {keywords}, not both", field="title")
        return cls(**values)

    @property
    def topic(self) -> str | None:
        """The title the model reads: the title, or the keywords joined in the order given."""
        return "".join(word.strip() for word in self.keywords) if self.keywords is not None else self.title

    @property
    def drafts(self) -> int:
        return 1 if self.greedy else self.candidates  # greedy drafts would all be the same

    @property
    def rows(self) -> int:
        return self.num * self.drafts

    def plan_key(self) -> "PoemRequest":
        """Requests with equal keys may share one sampler call: they differ in per-poem options only."""
        return dataclasses.replace(
            self, **{name: field.default for name, field in FIELDS.items() if OPTIONS[name].per_poem}
        )


FIELDS = {field.name: field for field in dataclasses.fields(PoemRequest)}
OPTIONS = {name: field.metadata["option"] for name, field in FIELDS.items()}


def bounds(name: str, surface: str, caps: dict | None = None) -> tuple[float | None, float | None, int | None]:
    """The option's (low, high, max_chars) on a surface: its own, or the narrower where declared
    (caps: a server's own highs, tighter still)."""
    spec = OPTIONS[name]
    low, high, max_chars = spec.low, spec.high, spec.max_chars
    narrow = spec.api if surface == "api" else None
    pick = lambda own, other, tighter: own if other is None else other if own is None else tighter(own, other)
    if narrow is not None:
        low, high = pick(low, narrow.low, max), pick(high, narrow.high, min)
        max_chars = pick(max_chars, narrow.max_chars, min)
    return low, pick(high, (caps or {}).get(name), min), max_chars


def default(name: str, surface: str = "cli"):
    spec = OPTIONS[name]
    return spec.cli_default if surface == "cli" and spec.cli_default is not AS_DECLARED else FIELDS[name].default


def api_options() -> list[str]:
    return [name for name, spec in OPTIONS.items() if spec.api is not None]


def number_text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_value(name: str, value, surface: str = "cli", caps: dict | None = None):
    """The value as PoemRequest holds it (a form by its canonical name, words as a tuple), or a
    TangshiError about the field; value must already have the option's type."""
    spec = OPTIONS[name]
    if value is None:
        return None
    refuse = lambda message, **values: TangshiError(
        message + (f"; {spec.hint}" if spec.hint else ""), field=name, **values
    )
    if spec.kind == "number" and not (value == 0 or FLOAT32_TINY <= abs(value) <= FLOAT32_MAX):
        raise refuse(
            "{field} must be a finite number of float32's range (0, or {tiny:g} to {huge:g} in size), got {value}",
            tiny=FLOAT32_TINY,
            huge=FLOAT32_MAX,
            value=value,
        )
    if spec.choices is not None and value not in spec.choices:
        raise refuse(
            "{field} must be one of {choices}; got {value!r}", choices=", ".join(map(str, spec.choices)), value=value
        )
    low, high, max_chars = bounds(name, surface, caps)
    too_low = low is not None and (value < low or (spec.low_open and value == low))
    if too_low or (high is not None and value > high):
        above = (
            None if low is None else f"above {number_text(low)}" if spec.low_open else f"at least {number_text(low)}"
        )
        below = None if high is None else f"at most {number_text(high)}"
        raise refuse(
            "{field} must be {bounds}, got {value}", bounds=" and ".join(filter(None, (above, below))), value=value
        )
    if spec.kind == "strings" and (not value or any(not word.strip() for word in value)):
        raise refuse("{field} needs one or more words, such as 春 雨 夜")
    length = len("".join(value)) if spec.kind == "strings" else len(value) if spec.kind == "string" else 0
    if max_chars is not None and length > max_chars:
        raise refuse("{field} has {length} characters, more than {most}; shorten it", length=length, most=max_chars)
    if name == "form":
        return None if value == FREE else rules.FORM_ALIASES.get(value, value)
    return tuple(value) if spec.kind == "strings" else value


ARGPARSE_TYPES = {"string": str, "integer": int, "number": float, "strings": str}


def add_flags(parser: argparse.ArgumentParser, names=None) -> None:
    """One flag per option (all, or those named), with its default, choices and help."""
    for name in names or OPTIONS:
        spec = OPTIONS[name]
        settings = {"default": default(name), "help": spec.help}
        if spec.kind == "boolean":
            settings["action"] = "store_true"
        else:
            settings["type"] = ARGPARSE_TYPES[spec.kind]
        if spec.kind == "strings":
            settings["nargs"] = "+"
        if spec.choices is not None and name != "form":  # a form is checked with the others' words
            settings["choices"] = spec.choices
        parser.add_argument(as_flag(name), **settings)


def from_args(args: argparse.Namespace, names=None) -> PoemRequest:
    """The request the parsed flags ask for (all options, or those named), checked."""
    return PoemRequest.checked("cli", **{name: getattr(args, name) for name in names or OPTIONS})


@dataclass(frozen=True)
class Field:
    """One option as a surface offers it: its bounds there (the API's field table, its schema)."""

    kind: str
    help: str
    default: object
    low: float | None
    high: float | None
    low_open: bool
    choices: tuple | None
    max_chars: int | None


def field_table(surface: str = "api", caps: dict | None = None) -> dict[str, Field]:
    """The options a surface offers, each with its bounds there (caps: a server's own highs)."""
    names = api_options() if surface == "api" else list(OPTIONS)
    table = {}
    for name in names:
        spec = OPTIONS[name]
        low, high, max_chars = bounds(name, surface, caps)
        table[name] = Field(
            spec.kind, spec.help, default(name, surface), low, high, spec.low_open, spec.choices, max_chars
        )
    return table
