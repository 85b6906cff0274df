"""Measure a checkpoint's poems the way a reader would, beside real poems of each form.

    python -m tangshi_jax.evaluate [--num 100] [--json report.json] [--plot loss.png]

Prints validation NLL and perplexity, then one table row per sampling setting and one per
corpus form: form validity, 押韵 (rhyme) and 平仄 (tones) by the Pingshui rhyme tables,
diversity, repetition, lines copied from the training poems, length and speed.

Definitions (a poem is a string like "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"):
- lines: the verse lines, split on ，。！？；：、 and without them (data.lines_of). n-grams never span two lines.
- distinct-n: unique n-grams / all n-grams, over every line of every poem of a row.
- repeated 4-grams: per poem, the 4-grams (in line order) equal to an earlier 4-gram of the
  same poem, over all its 4-grams; averaged over the poems that have a 4-gram.
- copied lines: lines found verbatim among the training poems' lines, over all lines.
- mean length: characters per poem, punctuation excluded.
- form valid: exactly the target form (any of the four when sampling is free).
- rhyme ok / tones ok: form valid, and pingshui-rhyme's check_poem_rhyming /
  check_poem_pingze_meter pass on the text in traditional characters (its tables are
  traditional), converted character by character with OpenCC s2t as the sampler's rule
  arrays see each character (s2t of a whole text picks variants by context: 一径 -> 一逕,
  which the tables lack, where 径 alone -> 徑). Its rhyme check knows only level-tone (平声)
  rhymes; its tone check accepts a poem matching one of the four 平起/仄起 patterns or,
  failing that, opposed tones within each couplet (对) and equal tones across couplets (粘)
  at the 2nd, 4th and 6th characters.
- heads ok: for acrostic rows, line i begins with the i-th head character.
- on topic: for title and keyword rows, poems that use at least one character of their title
  or keywords; a baseline row measures the same topics in poems that were not given them.
- score: the mean of sample.score_poem over the row's poems (for best-of-K rows, of the kept ones).
- character NLL: over targets that are Chinese characters (not punctuation, not E); quatrain
  lines 2-4: those characters in lines 2-4 of the validation 五绝 / 七绝 (Zhang & Lapata 2014).
- corpus rows: up to --num poems of the form from the validation split, a fixed draw.
All shares are over all the row's poems (or lines); poems/s is timed after a warm-up.
"""

import argparse
import dataclasses
import functools
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from tangshi_jax import checkpoint, cipai, data, evaluate_forms, metrics, pingshui, release, request, sample
from tangshi_jax.data import lines_of
from tangshi_jax.devices import PLATFORMS, use_platform
from tangshi_jax.errors import TangshiError, run_cli
from tangshi_jax.metrics import validation_nll
from tangshi_jax.request import PoemRequest
from tangshi_jax.rules import FORMS, is_hanzi, to_traditional

PUNCTUATION = "，。！？；"
SAMPLING = ("temperature", "top_p", "repetition_penalty")  # the options a report samples every row with
BEGINS = "日月山风春花秋云"
# Keyword requests of the keyword rows, cycled over the poems of a row.
KEYWORDS = [
    ("春", "雨", "夜"),
    ("秋", "月"),
    ("山", "水"),
    ("江", "舟"),
    ("花", "酒"),
    ("风", "雪"),
    ("边", "塞"),
    ("离", "别"),
]


@dataclass(frozen=True)
class Setting:
    """One row of sampled poems: how they are asked for."""

    name: str
    form: str | None = None
    rhyme: bool = False
    tones: bool = False
    heads: str | None = None  # acrostic characters
    candidates: int = 1  # drafts per poem, the best by sample.score_poem kept
    topic: str | None = None  # "title" (validation titles) or "keywords" (KEYWORDS): given to the model
    baseline: bool = False  # with a topic: the same topics measured, but not given to the model


# Free sampling, each form plain, rhymed, rhymed and tonal, then rhymed acrostic quatrains of 5
# and 7 characters; then the best of 8 drafts against one; then poems on a title or keywords
# (models trained with --titles) beside the same topics not given.
SETTINGS = (
    [Setting("free")]
    + [
        Setting(name + suffix, name, rhyme, tones)
        for name in FORMS
        for suffix, rhyme, tones in (("", False, False), ("+rhyme", True, False), ("+rhyme+tones", True, True))
    ]
    + [
        Setting("acrostic5+rhyme", "wujue", True, heads="春夏秋冬"),
        Setting("acrostic7+rhyme", "qijue", True, heads="明月清风"),
        Setting("free/best8", candidates=8),
        Setting("qijue+rhyme+tones/best8", "qijue", True, True, candidates=8),
        Setting("title", topic="title"),
        Setting("title-baseline", topic="title", baseline=True),
        Setting("keywords", topic="keywords"),
        Setting("keywords-baseline", topic="keywords", baseline=True),
        Setting("qijue+rhyme+tones+keywords", "qijue", True, True, topic="keywords"),
    ]
)


def form_of(poem: str) -> str | None:
    """The form the poem has exactly: N lines of C characters, ， after odd lines, 。 after even."""
    shape = "".join("字" if is_hanzi(char) else char for char in poem)
    for name, (lines, chars) in FORMS.items():
        if shape == f"{'字' * chars}，{'字' * chars}。" * (lines // 2):
            return name
    return None


def ngrams(line: str, n: int) -> list[str]:
    return [line[i : i + n] for i in range(len(line) - n + 1)]


def distinct(poems: list[str], n: int) -> float | None:
    grams = [gram for poem in poems for line in lines_of(poem) for gram in ngrams(line, n)]
    return len(set(grams)) / len(grams) if grams else None


def repeated_share(poem: str, n: int = 4) -> float | None:
    grams = [gram for line in lines_of(poem) for gram in ngrams(line, n)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else None


def mean(values) -> float | None:
    values = [value for value in values if value is not None]
    return float(np.mean(values)) if values else None


@functools.cache
def checker():
    """The Pingshui checker, built once."""
    try:
        return pingshui.module().PoemStructureChecker()
    except ImportError as error:
        raise TangshiError(f"{error}; install the checker with `pip install pingshui-rhyme`") from None


def rhyme_ok(poem: str) -> bool:
    return checker().check_poem_rhyming(to_traditional(poem))[0]


def tones_ok(poem: str) -> bool:
    return checker().check_poem_pingze_meter(to_traditional(poem))[0]


def measure(
    poems: list[str],
    form: str | None,
    training_lines: set[str],
    heads: str | None = None,
    topics: list[str] | None = None,
    scores: list[float] | None = None,
) -> dict:
    """The row's figures (None where a figure has nothing to count); heads: acrostic characters;
    topics: each poem's title or keywords; scores: sample.score_poem of each poem."""
    valid = [form_of(poem) is not None if form is None else form_of(poem) == form for poem in poems]
    lines = [line for poem in poems for line in lines_of(poem)]
    share = lambda flags: float(np.mean(flags)) if len(flags) else None
    return {
        "poems": len(poems),
        "form_valid": share(valid),
        "rhyme_ok": share([ok and rhyme_ok(poem) for ok, poem in zip(valid, poems)]),
        "tones_ok": share([ok and tones_ok(poem) for ok, poem in zip(valid, poems)]),
        "distinct_1": distinct(poems, 1),
        "distinct_2": distinct(poems, 2),
        "repeated_4grams": mean(repeated_share(poem) for poem in poems),
        "copied_lines": share([line in training_lines for line in lines]),
        "heads_ok": share([[line[0] for line in lines_of(poem)] == list(heads) for poem in poems]) if heads else None,
        "on_topic": share([bool(set(topic) & set(poem)) for topic, poem in zip(topics, poems)]) if topics else None,
        "score": mean(scores) if scores else None,
        "mean_length": mean(len(re.sub(f"[{PUNCTUATION}]", "", poem)) for poem in poems),
    }


def reference_poems(poems: list[str], form: str, num: int, seed: int) -> list[str]:
    """Up to num poems of the form, drawn without replacement with a fixed seed."""
    matching = [poem for poem in poems if form_of(poem) == form]
    rows = np.random.default_rng(seed).permutation(len(matching))[:num]
    return [matching[row] for row in sorted(rows)]


def load_dataset(data_path, train_config, vocab) -> data.Dataset:
    """The split and validation batches exactly as training made them."""
    return data.make_dataset(data.load_corpus(data_path, train_config.corpus, build=False), train_config, vocab)


def setting_topics(setting: Setting, num: int, val_titles: list[str], vocab: list[str]) -> list[str] | None:
    """The title or keywords of each poem of a row (None for rows without a topic); keywords
    outside the vocabulary are left out."""
    fallback = "".join([char for char in vocab if is_hanzi(char)][:2])  # the two commonest characters
    if setting.topic == "title":
        titles = [title for title in val_titles if title] or [fallback]
        return [titles[index % len(titles)] for index in range(num)]
    if setting.topic == "keywords":
        known = set(vocab)
        requests = ["".join(word for word in words if word in known) for words in KEYWORDS]
        requests = [words for words in requests if words] or [fallback]
        return [requests[index % len(requests)] for index in range(num)]
    return None


def sample_setting(
    model: release.Loaded,
    setting: Setting,
    num: int,
    seed: int,
    topics=None,
    corpus_lines=None,
    sampling: PoemRequest = PoemRequest(),
):
    """num poems, begins cycled over BEGINS (none for an acrostic or a topic); returns (poems,
    their scores, poems per second after a warm-up). sampling: the request whose temperature,
    top_p and repetition_penalty every row uses."""
    vocab = model.vocab
    begins = [char for char in BEGINS if char in vocab] or [next(c for c in vocab if c not in "GE，。")]
    begins = [None] if setting.heads or topics else begins
    counts = [num // len(begins) + (index < num % len(begins)) for index in range(len(begins))]
    plan = [(begin, count, sum(counts[:index])) for index, (begin, count) in enumerate(zip(begins, counts)) if count]
    given = topics if topics and not setting.baseline else None

    def write(begin, count, first, offset):
        wanted = dataclasses.replace(
            sampling,
            begin=begin,
            num=count,
            seed=seed + offset,
            form=setting.form,
            rhyme=setting.rhyme,
            tones=setting.tones,
            acrostic=setting.heads,
            candidates=setting.candidates,
        )
        return sample.write_poems(
            model.params,
            model.model_config,
            vocab,
            wanted,
            max_title=model.max_title,
            titles=given[first : first + count] if given else None,
            corpus_lines=corpus_lines,
            with_scores=True,
        )

    for count in {count for _, count, _ in plan}:  # compile every batch size before timing
        write(plan[0][0], count, 0, 0)
    started = time.perf_counter()
    written = [write(begin, count, first, offset) for offset, (begin, count, first) in enumerate(plan)]
    seconds = time.perf_counter() - started
    return (
        [poem for poems, _ in written for poem in poems],
        [score for _, scores in written for score in scores],
        num / seconds,
    )


def quatrain_perplexity(params, model_config, dataset: data.Dataset, batch_size: int) -> dict:
    """Per form of quatrain (五绝, 七绝) among the validation poems: NLL and perplexity over the
    Chinese characters of lines 2-4 (the protocol of Zhang & Lapata 2014), each poem read
    after its title when the model reads titles."""
    nll_of = jitted_position_nll(model_config)
    result = {}
    for form in ("wujue", "qijue"):
        chars = FORMS[form][1]
        rows = [seq for seq in dataset.val_sequences if form_of(seq[seq.index(data.START) + 1 : -1]) == form]
        if not rows:
            continue
        bucketed = data.bucket_split(rows, [], dataset.vocab, 1)[0]
        total, count = 0.0, 0
        for bucket_index, picked in data.epoch_plan(bucketed, batch_size, 0, 0, shuffle=False):
            batch = data.make_batch(bucketed, bucket_index, picked, batch_size)
            nll = np.asarray(nll_of(params, batch["inputs"], batch["targets"]))
            # Content character j is the target at position start + j; lines 2-4 begin at j = chars + 1.
            content = np.arange(nll.shape[1])[None, :] - bucketed.starts[0][picked][:, None]
            lines_2_to_4 = batch["chars"][: len(picked)] * (content >= chars + 1)
            total += float((nll[: len(picked)] * lines_2_to_4).sum())
            count += int(lines_2_to_4.sum())
        result[form] = {"poems": len(rows), "nll": total / count, "ppl": metrics.perplexity(total / count)}
    return result


@functools.cache
def jitted_position_nll(model_config):
    """metrics.position_nll of one model, jitted once."""
    return jax.jit(functools.partial(metrics.position_nll, model_config))


def evaluate_checkpoint(
    checkpoint_dir,
    data_path,
    num: int = 100,
    seed: int = 0,
    settings=SETTINGS,
    log=print,
    model_dir=None,
    sampling: PoemRequest = PoemRequest(),
    tunes: int = 0,
    couplets: bool = False,
) -> dict:
    """Every figure of the report: validation NLL (all targets, characters only, quatrain lines
    2-4, and without titles for a model that reads them), one row per setting, one per corpus form.
    model_dir: a release folder to evaluate instead of the checkpoint. sampling: the request
    whose SAMPLING options every row uses. tunes: rows of 词 to that many of the commonest
    tunes; couplets: a row of couplets (evaluate_forms); the held-out 词's NLL comes whenever
    poems.ci.txt is beside the data."""

    model = release.load_model(checkpoint_dir=checkpoint_dir, model_dir=model_dir)
    model_config, train_config, vocab, params = model.model_config, model.train_config, model.vocab, model.params
    progress = model.progress
    step = progress["step"]
    data_path = data_path or train_config.data
    corpus = data.load_corpus(data_path, train_config.corpus, build=False)  # every part the model read
    dataset = data.make_dataset(corpus, train_config, vocab)
    unwrap = lambda wrapped: [poem[1:-1] for poem in wrapped]
    train_poems, val_poems = unwrap(dataset.train_poems), unwrap(dataset.val_poems)
    training_lines = {line for poem in train_poems for line in lines_of(poem)}
    val = validation_nll(params, model_config, train_config, dataset.val)
    quatrains = quatrain_perplexity(params, model_config, dataset, train_config.batch_size)
    untitled = None
    if train_config.titles:  # the same model on the same poems, their titles withheld
        plain = data.make_dataset(corpus, dataclasses.replace(train_config, titles=False), vocab)
        untitled = validation_nll(params, model_config, train_config, plain.val)
    val_titles = [seq[: seq.index(data.START)] for seq in dataset.val_sequences]
    max_title = model.max_title
    rows = []
    for setting in settings:
        if setting.heads and not set(setting.heads) <= set(vocab):
            log(f"skipping {setting.name}: the vocabulary lacks some of {setting.heads}")
            continue
        if setting.topic and not setting.baseline and not max_title:
            log(f"skipping {setting.name}: the model was trained without titles")
            continue
        topics = setting_topics(setting, num, val_titles, vocab)
        log(f"sampling {num} poems: {setting.name}")
        poems, scores, speed = sample_setting(model, setting, num, seed, topics, training_lines, sampling)
        rows.append(
            {
                "setting": setting.name,
                **measure(poems, setting.form, training_lines, setting.heads, topics, scores),
                "poems_per_s": speed,
                "examples": poems[:3],
            }
        )
    for form in FORMS:
        poems = reference_poems(val_poems, form, num, seed)
        rows.append(
            {
                "setting": f"corpus {form}",
                **measure(poems, form, training_lines),
                "poems_per_s": None,
                "examples": poems[:3],
            }
        )
    form_rows = verse_form_rows(model, data_path, tunes, couplets, num, seed, training_lines, sampling, log)
    figures = lambda result, key: (result and result[key], metrics.perplexity(result[key]) if result else None)
    (nll, ppl), (char_nll, char_ppl) = figures(val, "nll"), figures(val, "char_nll")
    return {
        "checkpoint_dir": str(model_dir or checkpoint_dir),
        "step": step,
        "epoch": progress["epoch"],
        "data": str(data_path),
        "num": num,
        "seed": seed,
        "sampling": {name: getattr(sampling, name) for name in SAMPLING},
        "val_nll": nll,
        "val_ppl": ppl,
        "val_char_nll": char_nll,
        "val_char_ppl": char_ppl,
        "quatrains": quatrains,
        "untitled_char_nll": untitled and untitled["char_nll"],
        "rows": rows,
        "ci_validation": evaluate_forms.ci_validation(model, data_path),
        "form_rows": form_rows,
    }


def verse_form_rows(model, data_path, tunes: int, couplets: bool, num, seed, training_lines, sampling, log) -> list:
    """evaluate_forms' rows of 词 and couplets, with the text figures every row has."""
    rows = []
    if tunes:
        log(f"sampling {num} 词 to each of {tunes} tunes")
        rows += evaluate_forms.tune_rows(model, cipai.tunes_beside(data_path), tunes, num, seed, sampling)
    if couplets:
        log("sampling couplets")
        rows.append(evaluate_forms.couplet_row(model, num, seed, sampling))
    for row in rows:
        texts = row.pop("texts")
        lines = [line for text in texts for line in lines_of(text)]
        row["distinct_2"] = distinct(texts, 2)
        row["repeated_4grams"] = mean(repeated_share(text) for text in texts)
        row["copied_lines"] = float(np.mean([line in training_lines for line in lines])) if lines else None
    return rows


COLUMNS = [
    ("form valid", "form_valid", "{:.0%}"),
    ("heads ok", "heads_ok", "{:.0%}"),
    ("rhyme ok", "rhyme_ok", "{:.0%}"),
    ("tones ok", "tones_ok", "{:.0%}"),
    ("distinct-1", "distinct_1", "{:.3f}"),
    ("distinct-2", "distinct_2", "{:.3f}"),
    ("repeated 4-grams", "repeated_4grams", "{:.1%}"),
    ("copied lines", "copied_lines", "{:.1%}"),
    ("on topic", "on_topic", "{:.0%}"),
    ("score", "score", "{:.2f}"),
    ("mean length", "mean_length", "{:.1f}"),
    ("poems/s", "poems_per_s", "{:.1f}"),
]


def format_report(report: dict) -> str:
    nll = report["val_nll"]
    head = (
        f"validation NLL {nll:.3f} nats/char, perplexity {report['val_ppl']:.1f}"
        if nll is not None
        else "validation NLL: no validation poems"
    )
    sampling = ", ".join(f"{key} {value}" for key, value in report["sampling"].items())
    lines = [f"{head} (step {report['step']}, epoch {report['epoch']}); sampling: {sampling}"]
    if report["val_char_nll"] is not None:
        lines.append(
            f"Chinese characters only: NLL {report['val_char_nll']:.3f}, perplexity {report['val_char_ppl']:.1f}"
        )
    if report["untitled_char_nll"] is not None:
        untitled = report["untitled_char_nll"]
        lines.append(
            f"the same poems with their titles withheld: NLL {untitled:.3f}, perplexity "
            f"{metrics.perplexity(untitled):.1f} "
            f"(the titles are worth {untitled - report['val_char_nll']:.3f} nats a character)"
        )
    for form, figures in report["quatrains"].items():
        lines.append(
            f"{form} of the validation split ({figures['poems']}), lines 2-4, characters only: "
            f"NLL {figures['nll']:.3f}, perplexity {figures['ppl']:.1f}"
        )
    lines += ["", *markdown_table("setting", report["rows"], COLUMNS)]
    held_out = report.get("ci_validation")
    if held_out and held_out["char_nll"] is not None:
        lines.append(
            f"held-out 词 ({held_out['readable']} of {held_out['ci']} in this model's vocabulary), characters "
            f"only: NLL {held_out['char_nll']:.3f}, perplexity {held_out['char_ppl']:.1f}"
        )
    if report.get("form_rows"):
        lines += ["", *markdown_table("词 and couplets", report["form_rows"], evaluate_forms.COLUMNS)]
    return "\n".join(lines)


def markdown_table(first: str, rows: list[dict], columns) -> list[str]:
    """A table of rows: the setting, its poems, then each (title, key, format) column ("–": none)."""
    lines = [
        f"| {first} | poems | " + " | ".join(title for title, _, _ in columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for row in rows:
        cells = ["–" if row[key] is None else spec.format(row[key]) for _, key, spec in columns]
        lines.append(f"| {row['setting']} | {row['poems']} | " + " | ".join(cells) + " |")
    return lines


def plot_losses(metrics_path, out_path) -> None:
    """Train and validation loss per epoch, from a run's metrics.jsonl."""
    metrics_path = Path(metrics_path)
    if not metrics_path.is_file():
        raise TangshiError(f"no {metrics_path}; train into that directory first with `python -m tangshi_jax.train`")
    records = metrics.read_metrics(metrics_path)
    if not records:
        raise TangshiError(f"{metrics_path} holds no epoch yet; train at least one epoch first")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(6, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
        if points:
            axes.plot(*zip(*points), marker="o", label=label)
    axes.set(xlabel="epoch", ylabel="NLL per character (nats)", title="loss")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend()
    figure.tight_layout()
    figure.savefig(out_path)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tangshi_jax.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint-dir", default="checkpoints")
    parser.add_argument(
        "--model", default=None, help="a release folder (python -m tangshi_jax.export) instead of --checkpoint-dir"
    )
    parser.add_argument("--data", default=None, help="poems file (default: the one the checkpoint was trained on)")
    parser.add_argument("--num", type=int, default=100, help="poems per setting and per corpus form")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write every figure, and a few poems of each row, to this file")
    parser.add_argument("--plot", help="loss curve PNG (default: loss.png in the checkpoint directory)")
    parser.add_argument(
        "--settings",
        default=",".join(setting.name for setting in SETTINGS),
        help="comma-separated sampling settings to run (default: all)",
    )
    parser.add_argument(
        "--tunes",
        type=int,
        default=0,
        help=f"also rows of --num 词 to each of this many of the commonest tunes (up to {len(cipai.COMMON_TUNES)}; "
        "reads poems.ci.txt beside --data)",
    )
    parser.add_argument(
        "--couplets", action="store_true", help="also a row of couplets, --num // 10 to each of 10 上联"
    )
    request.add_flags(parser, SAMPLING)
    parser.add_argument("--platform", choices=PLATFORMS, default=None)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.num < 1:
        raise TangshiError(f"--num must be at least 1, got {args.num}")
    if not 0 <= args.tunes <= len(cipai.COMMON_TUNES):
        raise TangshiError(f"--tunes must be 0 to {len(cipai.COMMON_TUNES)}, got {args.tunes}")
    by_name = {setting.name: setting for setting in SETTINGS}
    unknown = [name for name in args.settings.split(",") if name not in by_name]
    if unknown:
        raise TangshiError(f"--settings: unknown {', '.join(unknown)}; choose among {', '.join(by_name)}")
    settings = [by_name[name] for name in args.settings.split(",")]
    sampling = request.from_args(args, SAMPLING)
    use_platform(args.platform)
    if args.model is None:
        checkpoint.require_checkpoint(args.checkpoint_dir)  # the clearer error first, then the cheap plot
    metrics_path = Path(args.checkpoint_dir) / "metrics.jsonl"
    plot_path = args.plot or str(Path(args.checkpoint_dir) / "loss.png")
    if args.model is not None:  # a release holds no metrics.jsonl
        plot_path = None
    elif args.plot or metrics_path.is_file():  # a checkpoint alone is enough for the rest
        plot_losses(metrics_path, plot_path)
    else:
        plot_path = None
    report = evaluate_checkpoint(
        args.checkpoint_dir,
        args.data,
        args.num,
        args.seed,
        settings,
        log=lambda message: print(message, file=sys.stderr),
        model_dir=args.model,
        sampling=sampling,
        tunes=args.tunes,
        couplets=args.couplets,
    )
    print(format_report(report))
    if plot_path:
        print(f"\nloss curve: {plot_path}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(run_cli(main))
