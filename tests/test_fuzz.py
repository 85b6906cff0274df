"""Hostile input, fuzzed with hypothesis (a bounded budget of examples each): any bytes as a
poems file, any text as --begin or --acrostic, any numbers as the sampling flags. Each is either
used or refused with one line naming the problem: never a traceback, a hang, or memory out of
proportion to the input."""

import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tangshi_jax import data, release, sample
from tangshi_jax.errors import TangshiError, run_cli
from tangshi_jax.request import PoemRequest

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FUZZ_SAMPLING = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

POEM = "春花秋月何时了，往事知多少。"
# Pieces a hostile or merely unlucky poems file is made of.
FRAGMENTS = st.sampled_from(
    [
        f"题:{POEM}".encode(),
        f"题:{POEM}".encode("gbk"),
        f"题:{POEM}".encode("utf-16"),
        "無題:白日依山盡，黃河入海流。".encode(),
        b"\r\n",
        b"\n",
        b"\r",
        b"\x00",
        b"\xef\xbb\xbf",
        b":",
        b"::",
        b" ",
        b"\t",
        b"_",
        b"(",
        "《".encode(),
        b"G",
        b"E",
        b"\xff\xfe",
        b"\xed\xa0\x80",
        "\u2028".encode(),
        "𠀀".encode(),
        b"title:" + b"x" * 100,
        b"a:bcdef",
    ]
)


def check_corpus_or_refusal(path: Path) -> None:
    try:
        corpus = data.read_corpus(path)
    except TangshiError as error:
        message = str(error)
        assert "\n" not in message and str(path) in message, message
        return
    assert corpus.poems and len(corpus.poems) == len(corpus.titles)
    for poem in corpus.poems:
        assert poem[0] == data.START and poem[-1] == data.END
        assert data.MIN_CHARS <= len(poem) - 2 <= data.MAX_CHARS and " " not in poem


@FUZZ
@given(st.text())
def test_parse_line_keeps_a_poem_skips_it_or_says_it_is_unparsable(line):
    try:
        poem = data.parse_line(line)
    except ValueError:
        assert line.strip().count(":") != 1
        return
    if poem is not None:
        content = poem[1:-1]
        assert poem[0] == data.START and poem[-1] == data.END and " " not in content
        assert data.MIN_CHARS <= len(content) <= data.MAX_CHARS
        assert not set(content) & data.FORBIDDEN


@FUZZ
@given(st.one_of(st.binary(max_size=4000), st.lists(FRAGMENTS, max_size=40).map(b"".join)))
def test_any_bytes_as_a_poems_file_are_read_or_refused_in_one_line(content):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "poems.txt"
        path.write_bytes(content)
        check_corpus_or_refusal(path)


@pytest.mark.parametrize(
    "content",
    [
        b"t:" + "春".encode() * 3_500_000,  # a 10 MB single line
        (f"题:{POEM}\r\n" * 50 + f"题:{POEM}\r" * 50 + f"题:{POEM}\n" * 50).encode(),  # mixed line ends
        b"\xef\xbb\xbf" + f"题:{POEM}\n".encode() * 10,  # a BOM
        f"题:{POEM}\n".encode("utf-16") * 10,  # another encoding
        b"a:b\nc:dd\n_:_____\n" * 1000,  # only invalid poems
        b"\x00" * 100_000,  # NUL bytes
    ],
)
def test_hostile_poems_files_are_read_or_refused_quickly_in_proportion(tmp_path, content):
    path = tmp_path / "poems.txt"
    path.write_bytes(content)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        check_corpus_or_refusal(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 20
    assert peak < 8 * len(content) + 10_000_000, peak


@pytest.mark.parametrize(
    "content, poems",
    [
        ((f"题:{POEM}\r\n" * 5 + f"题:{POEM}\n" * 5 + f"题:{POEM}\r\n" * 5).encode(), 15),  # CRLF and LF mixed
        (b"\xef\xbb\xbf" + f"题:{POEM}\r\n".encode() * 10, 10),  # a BOM, CRLF
    ],
)
def test_a_bom_and_any_line_ends_are_read_as_the_readme_says(tmp_path, content, poems):
    path = tmp_path / "poems.txt"
    path.write_bytes(content)
    corpus = data.read_corpus(path)  # read, never refused
    assert len(corpus.poems) == poems and corpus.unparsable == 0
    assert set(corpus.poems) == {data.START + POEM + data.END} and set(corpus.titles) == {"题"}


def test_an_unreadable_poems_file_is_one_line(tmp_path):
    with pytest.raises(TangshiError, match="no such file"):
        data.read_corpus(tmp_path)  # a directory


@pytest.fixture(scope="module")
def model(trained_run):
    directory, _, _ = trained_run
    model = release.load_model(checkpoint_dir=directory)
    return directory, model.model_config, model.vocab, model.params


@FUZZ_SAMPLING
@given(text=st.text(max_size=10), acrostic=st.booleans(), drawn=st.data())
@example(text="", acrostic=False, drawn=None)  # a draw from the vocabulary, which must write poems
@example(text="", acrostic=True, drawn=None)
def test_any_begin_or_acrostic_text_writes_poems_or_is_refused(model, text, acrostic, drawn):
    """Any text writes poems or is refused in one line; text of the model's own characters (a
    begin of at most --max-len, an acrostic of one character a line) must write poems."""
    _, model_config, vocab, params = model
    hanzi = [char for char in vocab if data.is_hanzi(char)]
    if drawn is None or drawn.draw(st.booleans()):  # half the draws are valid by construction
        length = 4 if acrostic else (drawn.draw(st.integers(1, 10)) if drawn else 3)
        text = "".join(drawn.draw(st.sampled_from(hanzi)) for _ in range(length)) if drawn else "".join(hanzi[:length])
    stripped = text.strip()
    valid = bool(stripped) and all(char in hanzi for char in stripped) and (len(stripped) == 4 or not acrostic)
    options = {"acrostic": text} if acrostic else {"begin": text}
    try:
        poems = sample.write_poems(params, model_config, vocab, PoemRequest(num=2, candidates=1, **options))
    except TangshiError as error:
        assert not valid, f"{options} was refused: {error}"
        assert "\n" not in str(error)
        return
    assert len(poems) == 2 and all(isinstance(poem, str) for poem in poems)
    if valid and acrostic:
        assert all([line[0] for line in data.lines_of(poem)] == list(stripped) for poem in poems), poems
    elif valid:
        assert all(poem.startswith(stripped) for poem in poems), poems


NUMBERS = st.floats(allow_nan=True, allow_infinity=True)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # numpy's overflow warnings count as failures
@FUZZ_SAMPLING
@given(
    temperature=NUMBERS,
    top_p=NUMBERS,
    penalty=NUMBERS,
    top_k=st.sampled_from([-1, 0, 10**9]),
    num=st.sampled_from([0, 1, 2]),
    candidates=st.sampled_from([0, 1, 2, 10**9]),
    max_len=st.sampled_from([0, 8, 10**6]),
    seed=st.integers(-(2**70), 2**70),
    greedy=st.booleans(),
)
@example(temperature=0.8, top_p=1.0, penalty=1e308, top_k=0, num=1, candidates=1, max_len=8, seed=0, greedy=False)
@example(temperature=0.8, top_p=0.9, penalty=-1.5, top_k=10**9, num=2, candidates=2, max_len=8, seed=-5, greedy=False)
@example(temperature=1e308, top_p=1.0, penalty=1.5, top_k=0, num=1, candidates=1, max_len=8, seed=2**64, greedy=False)
def test_any_sampling_flags_write_poems_or_give_one_clear_line(
    model, capsys, temperature, top_p, penalty, top_k, num, candidates, max_len, seed, greedy
):
    directory = model[0]
    # --flag=value, as a user would write a negative number (argparse reads "-1e+16" as a flag)
    argv = [
        "--checkpoint-dir",
        str(directory),
        f"--temperature={temperature!r}",
        f"--top-p={top_p!r}",
        f"--repetition-penalty={penalty!r}",
        f"--top-k={top_k}",
        f"--num={num}",
        f"--candidates={candidates}",
        f"--max-len={max_len}",
        f"--seed={seed}",
        "--json",
    ]
    code = run_cli(sample.main, argv + (["--greedy"] if greedy else []))
    out, err = capsys.readouterr()
    values = dict(temperature=temperature, top_p=top_p, repetition_penalty=penalty, top_k=top_k, num=num)
    values.update(candidates=candidates, max_len=max_len, seed=seed, greedy=greedy)
    try:
        PoemRequest.checked("cli", **values)
        accepted = True
    except TangshiError:
        accepted = False
    if code == 0:
        assert accepted and len(out.splitlines()) == num
    else:  # refused in one line, and only what the request's own bounds refuse
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
        assert not accepted, f"{values} are within every bound but were refused: {err}"
