"""evaluate's rows beyond the Tang forms: 词 to the commonest tunes, couplets, and the held-out 词.

    python -m tangshi_jax.evaluate --tunes 20 --couplets

A 词 row samples --num 词 of one tune with its tones asked for and checks each by
cipai.check (lines and marks, rhymes in one 词林正韵 部 per rhyme set, the fixed tones); the
couplet row answers each of COUPLET_FIRSTS --num // 10 times (at least once) and checks each
by couplet.check (clauses and marks, opposed tones, no 上联 character, mirrored repeats); its
diversity and copied lines (evaluate.verse_form_rows) are the 下联's. Each row's first
request is written once before the timing, to compile its program.
The 词 validation figure is the NLL per Chinese character of the 词 the corpus step holds
out (data.split_parts), each read after its tune as training reads it, over those whose
characters the model knows (a model of the Tang poems alone lacks some).
"""

import dataclasses
import time

import numpy as np

from tangshi_jax import cipai, corpus, couplet, data, metrics, release, sample
from tangshi_jax.request import PoemRequest

# Ten 上联, each ending oblique: five and seven characters, two clauses, and repeats (声, 花花草草).
COUPLET_FIRSTS = (
    "海内存知己",
    "春风得意马蹄疾",
    "风声雨声读书声，声声入耳",
    "明月松间照",
    "两个黄鹂鸣翠柳",
    "白日依山尽",
    "国破山河在",
    "一年好景君须记",
    "山重水复疑无路",
    "花花草草，年年岁岁",
)
CHECKS = ("lines", "rhyme", "tones", "repeats")


def ci_validation(model: release.Loaded, data_path) -> dict | None:
    """The held-out 词's NLL per Chinese character (None when poems.ci.txt is not beside data_path)."""
    path = corpus.part_path(data_path, "ci")
    if not path.is_file():
        return None
    train_config, vocab = model.train_config, model.vocab
    ci = data.read_corpus(path, *data.part_rules("ci"))
    _, held_out, _ = data.part_split(ci, range(len(ci.poems)), train_config)
    sequences = data.sequences(ci, held_out, train_config.titles, train_config.max_title)
    known = set(vocab)
    readable = [sequence for sequence in sequences if set(sequence) <= known]
    result = {"ci": len(sequences), "readable": len(readable), "char_nll": None, "char_ppl": None}
    if readable:
        _, val_data = data.bucket_split(readable[:1], readable, vocab, 4)
        nll = metrics.validation_nll(model.params, model.model_config, train_config, val_data)
        result.update(char_nll=nll["char_nll"], char_ppl=metrics.perplexity(nll["char_nll"]))
    return result


def form_row(model: release.Loaded, name: str, requests: list[PoemRequest], check, tunes=None, part=None):
    """One row: every request written (after a warm-up call of the first), each poem checked;
    `texts`: what evaluate measures for diversity and copying, each poem or its `part`."""
    write = lambda wanted: sample.write_poems(
        model.params, model.model_config, model.vocab, wanted, max_title=model.max_title, tunes=tunes
    )
    write(requests[0])  # compiles the sampler for this batch and length
    started = time.perf_counter()
    written = [(wanted, poem) for wanted in requests for poem in write(wanted)]
    seconds = time.perf_counter() - started
    checks = [check(wanted, poem) for wanted, poem in written]
    share = lambda key: float(np.mean([c[key] for c in checks])) if key in checks[0] else None
    return {
        "setting": name,
        "poems": len(written),
        **{f"{key}_ok": share(key) for key in CHECKS},
        "poems_per_s": len(written) / seconds,
        "examples": [poem for _, poem in written[:3]],
        "texts": [part(wanted, poem) if part else poem for wanted, poem in written],
    }


def tune_rows(model, tunes: dict, count: int, num: int, seed: int, sampling: PoemRequest):
    """A row for each of the `count` commonest named tunes that the corpus's 词 taught."""
    rows = []
    check = lambda wanted, text: cipai.check(text, tunes[wanted.tune])
    for name in [name for name in cipai.COMMON_TUNES if name in tunes][:count]:
        wanted = dataclasses.replace(sampling, tune=name, tones=True, num=num, seed=seed, candidates=1)
        rows.append(form_row(model, f"词 {name}", [wanted], check, tunes))
    return rows


def couplet_row(model, num: int, seed: int, sampling: PoemRequest) -> dict:
    """One row of couplets: each 上联 of COUPLET_FIRSTS the model can read, num // 10 times."""
    known = set(model.vocab)
    firsts = [first for first in COUPLET_FIRSTS if set(first) - set(couplet.CLAUSE_MARKS) <= known]
    per_first = max(1, num // len(COUPLET_FIRSTS))
    requests = [
        dataclasses.replace(sampling, couplet=first, num=per_first, seed=seed + index, candidates=1)
        for index, first in enumerate(firsts)
    ]

    def check(wanted, poem):
        figures = couplet.check(*sample.poem_lines(poem, wanted))
        return {"lines": figures["shape"], "tones": figures["tones"], "repeats": figures["repeats"]}

    answer = lambda wanted, poem: sample.poem_lines(poem, wanted)[1]  # the 上联 is given, not written
    return form_row(model, "couplets", requests, check, part=answer)


# The columns of these rows in evaluate's report (evaluate.markdown_table).
COLUMNS = [
    ("lines ok", "lines_ok", "{:.0%}"),
    ("rhyme ok", "rhyme_ok", "{:.0%}"),
    ("tones ok", "tones_ok", "{:.0%}"),
    ("repeats ok", "repeats_ok", "{:.0%}"),
    ("distinct-2", "distinct_2", "{:.3f}"),
    ("repeated 4-grams", "repeated_4grams", "{:.1%}"),
    ("copied lines", "copied_lines", "{:.1%}"),
    ("poems/s", "poems_per_s", "{:.1f}"),
]
