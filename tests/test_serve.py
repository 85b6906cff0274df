"""The API in-process (Starlette's test client), the batcher, and a tiny load test on 127.0.0.1."""

import asyncio
import dataclasses
import re
import warnings

import jax
import pytest
from helpers import couplet_answers
from starlette.testclient import TestClient  # needs httpx2, in the test extra

from tangshi_jax import loadtest, pingshui, release, rules, sample, serve
from tangshi_jax.batcher import Batcher, Engine, Written, row_buckets
from tangshi_jax.errors import TangshiError, as_field
from tangshi_jax.request import PoemRequest

MAX_ROWS, MAX_POEMS, MIN_ROWS = 16, 2, 4  # buckets of 4, 8 and 16 rows: few programs to compile


@pytest.fixture(scope="module")
def engine(titles_run):
    directory, data = titles_run
    loaded = release.load_model(checkpoint_dir=directory)
    engine = Engine(loaded, max_rows=MAX_ROWS, corpus_lines=sample.corpus_lines(data), min_rows=MIN_ROWS)
    engine.warm_up()
    return engine


@pytest.fixture(scope="module")
def client(engine):
    app = serve.create_app(
        engine,
        {"val_loss": 2.0, "val_ppl": 7.4, "val_char_loss": 2.2, "val_char_ppl": 9.0},
        max_poems=MAX_POEMS,
        log=lambda message: None,
    )
    with TestClient(app) as client:
        yield client


def hanzi(engine, count):
    return "".join([char for char in engine.model.vocab if sample.data.is_hanzi(char)][:count])


def verses(poem):
    return [verse for verse in re.split("[，。！？]", poem) if verse]


def ask(client, **fields):
    response = client.post("/api/poems", json=fields)
    assert response.status_code == 200, response.text
    return response.json()


def test_buckets_cover_every_batch_up_to_the_limit():
    assert row_buckets(128) == [1, 2, 4, 8, 16, 32, 64, 128] and row_buckets(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert row_buckets(1) == [1] and row_buckets(16, 4) == [4, 8, 16] and row_buckets(2, 4) == [2]


@pytest.mark.slow  # warms up an engine: compiles six sampler programs
def test_a_seeded_request_gives_the_poems_sample_gives(client, engine):
    """Padding the batch to a compiled size and scoring every draft must not change a poem."""
    begin, title = hanzi(engine, 1), "题" + hanzi(engine, 2)
    write = lambda **options: sample.write_poems(
        engine.model.params,
        engine.model.model_config,
        engine.model.vocab,
        PoemRequest(**options),
        max_title=engine.model.max_title,
        corpus_lines=engine.corpus_lines,
    )
    cases = [
        ({"num": 2, "seed": 11, "begin": begin}, write(num=2, seed=11, begin=begin)),
        (
            {"num": 2, "seed": 5, "title": title, "form": "wujue", "rhyme": True, "candidates": 2},
            write(num=2, seed=5, title=title, form="wujue", rhyme=True, candidates=2),
        ),
    ]
    for fields, expected in cases:
        answer = ask(client, **fields)
        assert [poem["poem"] for poem in answer["poems"]] == expected
        assert ask(client, **fields)["poems"] == answer["poems"]


@pytest.mark.slow  # warms up an engine: compiles six sampler programs
def test_each_field_does_what_sample_does(client, engine):
    begin, heads = hanzi(engine, 2), hanzi(engine, 4)
    poems = ask(client, begin=begin, num=2)["poems"]
    assert len(poems) == 2 and all(poem["poem"].startswith(begin) and poem["begin"] == begin for poem in poems)
    for poem in poems:
        assert "".join(poem["lines"]) == poem["poem"] and isinstance(poem["score"], float)
    title = ask(client, title="题" + begin)["poems"][0]
    assert title["title"] == "题" + begin
    assert ask(client, keywords=["题", begin])["poems"][0]["title"] == "题" + begin
    assert ask(client, keywords="题 " + begin, seed=1)["poems"] == ask(client, keywords=["题", begin], seed=1)["poems"]
    quatrain = ask(client, form="七绝", acrostic=heads, rhyme=True, tones=True, num=2)["poems"]
    for poem in quatrain:
        assert [verse[0] for verse in verses(poem["poem"])] == list(heads)
        assert [len(verse) for verse in verses(poem["poem"])] == [7] * 4 and len(poem["lines"]) == 2
    short = ask(client, acrostic=heads, line_length=5, loose_tones=True, tones=True)["poems"][0]["poem"]
    assert [len(verse) for verse in verses(short)] == [5] * 4
    assert all(len(verses(p["poem"])) == 8 for p in ask(client, form="wulv", rhyme_group=heads[0], num=2)["poems"])
    greedy = ask(client, greedy=True, num=2)["poems"]
    assert greedy[0]["poem"] == greedy[1]["poem"]
    assert ask(client, top_k=1, num=2, seed=3)["poems"][0]["poem"] == greedy[0]["poem"]
    assert len(ask(client, top_p=0.5, temperature=1.3, repetition_penalty=0, candidates=1)["poems"]) == 1
    simplified = ask(client, seed=4, num=2, form="qijue")["poems"]
    traditional = ask(client, seed=4, num=2, form="qijue", script="traditional")["poems"]
    assert [rules.opencc_converter("s2t").convert(p["poem"]) for p in simplified] == [p["poem"] for p in traditional]
    assert ask(client, seed=None, form="free", begin="", acrostic=None)["poems"]  # null and "" leave a field out
    prosody = rules.build_prosody(tuple(engine.model.vocab))
    oblique = next(c for i, c in enumerate(engine.model.vocab) if prosody.oblique[i] and not prosody.level[i])
    first = hanzi(engine, 4).replace(oblique, "") + oblique
    for poem in ask(client, couplet=first, num=2)["poems"]:
        assert (
            poem["lines"] == [first + "，", poem["poem"][len(first) + 1 :]] and len(poem["poem"]) == 2 * len(first) + 2
        )


BAD = [
    ('{"form": "sonnet"}', 400, "form must be one of"),
    ('{"begin": "龘"}', 422, "begin character '龘' is not in the model's vocabulary"),
    ('{"acrostic": "鳯鳯鳯鳯"}', 422, "acrostic character"),
    ('{"title": "龘"}', 422, "not in the model's vocabulary"),
    ('{"num": 3}', 400, "num must be at least 1 and at most 2"),
    ('{"num": 0}', 400, "num must be at least 1"),
    ('{"num": 2, "candidates": 16}', 422, "more than this server's batch of 16"),
    ('{"begin": "' + "春" * 17 + '"}', 400, "begin has 17 characters, more than 16"),
    ('{"title": "' + "春" * 40 + '"}', 400, "title has 40 characters"),
    ('{"num": "3"}', 400, "num must be an integer"),
    ('{"num": 2.0}', 400, "num must be an integer"),
    ('{"rhyme": "yes", "form": "qijue"}', 400, "rhyme must be true or false"),
    ('{"temperature": true}', 400, "temperature must be a number"),
    ('{"temperature": 0}', 400, "temperature must be above 0"),
    ('{"temperature": NaN}', 400, "temperature must be a finite number"),
    ('{"top_p": 1.5}', 400, "top_p must be above 0 and at most 1"),
    ('{"keywords": [1, 2]}', 400, "keywords must be a list of strings"),
    ('{"line_length": 6, "acrostic": "春"}', 400, "line_length must be one of 5, 7"),
    ('{"script": "seal"}', 400, "script must be one of simplified, traditional"),
    ('{"seed": -1}', 400, "seed must be at least 0"),
    ('{"path": "/etc/passwd"}', 400, 'unknown field "path"'),
    ('{"title": "春", "keywords": "雨"}', 400, "title or keywords, not both"),
    ('{"rhyme": true}', 422, "rhyme, rhyme_group and tones need a form (or acrostic)"),
    ('{"acrostic": "ACROSTIC"}', 422, "acrostic character 'A'"),
    ('{"form": "qijue", "begin": "春春春春春春春春"}', 422, "begin has 8 characters, more than a line of qijue"),
    ('{"couplet": "' + "春" * 32 + '"}', 400, "couplet has 32 characters, more than 31"),
    ('{"couplet": "明月，春风"}', 422, "couplet ends on '风', a level (平) tone"),
    ('{"tune": "浣溪沙"}', 422, "tune: this server writes no 词; its operator can start it with serve's tunes option"),
    ('{"num": 3', 400, "the body is not JSON"),
    ("[1, 2]", 400, "the body must be a JSON object"),
    ("", 400, "the body is not JSON"),
    (b"\xff\xfe", 400, "the body is not UTF-8"),
    ('{"begin": "' + "x" * 5000 + '"}', 413, "the body is over 4096 bytes"),
]


@pytest.mark.parametrize("body, status, message", BAD)
@pytest.mark.slow  # warms up an engine: compiles six sampler programs
def test_bad_requests_get_a_4xx_with_one_line(client, titles_run, body, status, message):
    # A few need characters of the tiny vocabulary; the fixture's is 题 and CHARS of helpers.
    response = client.post(
        "/api/poems",
        content=body if isinstance(body, bytes) else body.encode(),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error and "\n" not in error and "Traceback" not in error
    assert str(titles_run[0].parent) not in response.text and "--" not in error


@pytest.mark.slow  # warms up an engine: compiles six sampler programs
def test_the_other_routes(client, engine):
    model = client.get("/api/model").json()
    assert model["vocab_size"] == len(engine.model.vocab)
    assert model["model"]["hidden"] == engine.model.model_config.hidden
    assert model["reads_titles"] and model["step"] == engine.model.progress["step"] and model["val_loss"] == 2.0
    assert model["limits"]["num"] == MAX_POEMS and "data" not in model["training"]  # no file paths
    assert client.get("/api/health").json()["status"] == "ok"
    spec = client.get("/api/openapi.json").json()
    assert set(spec["paths"]) == {"/api/poems", "/api/model", "/api/health", "/metrics"}
    properties = spec["paths"]["/api/poems"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "properties"
    ]
    assert properties["num"]["maximum"] == MAX_POEMS and "qijue" in properties["form"]["enum"]
    page = client.get("/")
    assert (
        page.status_code == 200
        and "藏头" in page.text
        and "default-src 'self'" in page.headers["content-security-policy"]
    )
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/style.css").status_code == 200
    assert client.get("/static/../serve.py").status_code == 404
    missing = client.get("/nowhere")
    assert missing.status_code == 404 and "no such page" in missing.json()["error"]
    assert client.get("/api/poems").status_code == 405


def run_together(batcher, requests):
    async def main():
        worker = asyncio.create_task(batcher.run())
        try:
            return await asyncio.gather(*(batcher.submit(request) for request in requests))
        finally:
            worker.cancel()

    return asyncio.run(main())


@pytest.mark.slow  # warms up an engine: compiles six sampler programs
def test_requests_that_arrive_together_share_one_sampler_call(engine):
    heads = hanzi(engine, 4)
    requests = (
        [PoemRequest(num=1, title=title, candidates=2) for title in (None, "题春", None, "题秋")]
        + [PoemRequest(num=2, candidates=2, acrostic=heads)]
        + [PoemRequest(num=1, candidates=2)] * 4
    )
    batched = Batcher(engine)
    answers = run_together(batched, requests)
    assert [len(answer.poems) for answer in answers] == [request.num for request in requests]
    # Any plans share a call: the first 7 requests fill its 16 rows, the last has a call of its own.
    assert batched.calls == 2 and answers[0].batch_requests == 7 and answers[4].batch_requests == 7
    assert answers[0].batch_rows == 16 and answers[8].batch_rows == 4
    assert all([verse[0] for verse in verses(poem)] == list(heads) for poem in answers[4].poems)
    by_plan = Batcher(engine, batching="plan")  # as before plans were per row: the acrostic apart
    answers = run_together(by_plan, requests)
    assert by_plan.calls == 2 and answers[0].batch_requests == 8 and answers[4].batch_requests == 1
    alone = Batcher(engine, batching="none")
    run_together(alone, requests)
    assert alone.calls == len(requests)
    seeded = Batcher(engine)
    twins = run_together(seeded, [PoemRequest(seed=7, num=2)] * 2)
    assert seeded.calls == 2 and twins[0].poems == twins[1].poems
    full = Batcher(engine)  # 3 requests of 8 rows: 16 rows in one call, then the last
    answers = run_together(full, [PoemRequest(num=1, candidates=8)] * 3)
    assert full.calls == 2 and [answer.batch_rows for answer in answers] == [16, 16, 8]


@pytest.mark.slow  # warms up an engine: compiles six sampler programs
def test_a_mix_of_different_requests_shares_calls_and_each_keeps_its_rules(engine):
    """Forms, begins, acrostics, a couplet, titles and sampling settings, all waiting at once."""
    heads, begin = hanzi(engine, 4), hanzi(engine, 2)[1]
    prosody = rules.build_prosody(tuple(engine.model.vocab))
    oblique = next(c for i, c in enumerate(engine.model.vocab) if prosody.oblique[i] and not prosody.level[i])
    first = hanzi(engine, 5).replace(oblique, "")[:4] + oblique
    mix = [
        PoemRequest(num=1, candidates=2, begin=begin, temperature=0.6),
        PoemRequest(num=1, candidates=2, form="qijue", rhyme=True, tones=True, title="题春"),
        PoemRequest(num=1, candidates=2, acrostic=heads, line_length=5, top_k=3),
        PoemRequest(num=1, candidates=2, couplet=first),
        PoemRequest(num=1, candidates=2, form="wulv", begin=begin, temperature=1.4, top_p=0.8),
        PoemRequest(num=1, candidates=2, greedy=True, keywords=("春", "月")),
    ] * 2
    batched = Batcher(engine)
    answers = run_together(batched, [engine.check(request) for request in mix])
    # The 8 that filter no draws share one call; top-k and top-p, which every row of a call pays
    # for, one call each.
    assert batched.calls == 3 and sorted({answer.batch_requests for answer in answers}) == [2, 8]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pingshui-rhyme imports the deprecated pkg_resources
        checker = pingshui.module().PoemStructureChecker()
    for request, answer in zip(mix, answers):
        [poem] = answer.poems
        if request.begin:
            assert poem.startswith(request.begin), (request, poem)
        if request.form == "qijue":
            assert [len(verse) for verse in verses(poem)] == [7] * 4, poem
            text = rules.to_traditional(poem)
            assert checker.check_poem_rhyming(text)[0] and checker.check_poem_pingze_meter(text)[0], poem
        if request.form == "wulv":
            assert [len(verse) for verse in verses(poem)] == [5] * 8, poem
        if request.acrostic:
            assert [verse[0] for verse in verses(poem)] == list(heads) and len(verses(poem)[0]) == 5, poem
        if request.couplet:
            assert couplet_answers(first, poem[len(first) + 1 :]), poem
    plain = Batcher(engine, batching="plan")
    run_together(plain, [engine.check(request) for request in mix])
    assert plain.calls == 6  # one plan a call: each kind of request on its own


@pytest.mark.slow  # warms up an engine: compiles six sampler programs
def test_no_request_compiles_after_warm_up(client, engine):
    compiles = []
    on_duration = lambda event, seconds, **kwargs: compiles.append(event) if "backend_compile" in event else None
    on_event = lambda event, **kwargs: compiles.append(event) if event.endswith("cache_hits") else None
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    try:
        # Positive control: a program never built before is seen compiling (were JAX to rename its
        # events, this test would otherwise pass whatever the server did).
        jax.jit(lambda x: x * 3 + 1)(jax.numpy.arange(7 + len(compiles)))
        assert any("backend_compile" in event for event in compiles), compiles
        compiles.clear()
        heads = hanzi(engine, 4)
        prosody = rules.build_prosody(tuple(engine.model.vocab))
        oblique = next(c for i, c in enumerate(engine.model.vocab) if prosody.oblique[i] and not prosody.level[i])
        chars = (hanzi(engine, 27) * 2)[:27] + oblique
        longest = "，".join(chars[i : i + 7] for i in range(0, 28, 7))  # the API's 31 characters
        for fields in (
            {"couplet": longest, "candidates": 2},
            {},
            {"num": 2},
            {"greedy": True},
            {"top_k": 3, "top_p": 0.7, "temperature": 1.2},
            {"title": "题春", "num": 2, "candidates": 8},
            {"candidates": 1},
            {"form": "qilv", "rhyme": True, "tones": True},
            {"acrostic": heads, "line_length": 5, "script": "traditional", "seed": 9},
            {"keywords": ["春", "月"], "form": "wujue", "rhyme_group": heads[0], "candidates": 1},
        ):
            ask(client, **fields)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
        jax.monitoring.unregister_event_listener(on_event)
    assert compiles == [], compiles


@pytest.mark.slow  # servers (uvicorn)
def test_a_tiny_load_test_has_no_failures(engine, capsys):
    results = serve.load_test(engine, None, requests=14, clients=7, max_poems=MAX_POEMS, log=lambda message: None)
    assert [row["mode"] for row in results] == ["any requests a call", "one plan a call", "one call a request"]
    assert all(row["failed"] == 0 and row["requests"] == 14 for row in results)
    assert results[2]["sampler_calls"] == 14 and max(row["sampler_calls"] for row in results[:2]) <= 14
    assert all(row["refused"] == 0 for row in results)  # the default bounds admit 7 clients
    table = loadtest.format_results(results)
    print(table)
    assert "| any requests a call | 14 | 0 | 0 |" in table and "--max-waiting" in table
    assert len(results[0]["bodies"]) >= 4 and '"form": "wulv"' in table  # the kinds this small model can write


@pytest.mark.slow  # servers (uvicorn)
def test_past_the_bound_the_load_test_counts_refusals_not_failures(engine):
    from tangshi_jax.batcher import Admission

    bounds = Admission(max_waiting=1, timeout=5)
    results = serve.load_test(engine, None, 16, 8, MAX_POEMS, drafts=1, log=lambda message: None, admission=bounds)
    for row in results:
        assert row["refused"] > 0 and row["failed"] == 0, row  # each 503 carried a Retry-After
        assert row["refused"] + row["sampler_calls"] * (row["requests_per_call"] or 0) == pytest.approx(16)


def test_serve_refuses_a_taken_port_in_one_line(capsys):
    taken = serve.bind("127.0.0.1", 0)
    try:
        with pytest.raises(TangshiError, match="cannot listen on 127.0.0.1"):
            serve.bind("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


def test_a_model_without_titles_refuses_them_in_each_edges_words(trained_run):
    """The engine's error names its fields; the command line words them as flags, the API as fields."""
    plain = Engine(release.load_model(checkpoint_dir=trained_run[0]))  # checks only: nothing compiled
    for request, field in ((PoemRequest(title="春"), "title"), (PoemRequest(keywords=("春", "雨")), "keywords")):
        with pytest.raises(TangshiError) as error:
            plain.check(request)
        assert error.value.field == field
        assert "trained without titles, so title and keywords" in error.value.worded(as_field)
        assert "--" not in error.value.worded(as_field)
        assert "trained without titles, so --title and --keywords" in str(error.value)
    plain.check(PoemRequest(begin="春"))


@pytest.mark.slow  # a server process, warmed up
def test_the_serve_command_serves_then_stops_on_sigterm(trained_run):
    """README: `python -m tangshi_jax.serve` opens its port first and says "starting" (503) while
    it loads and compiles, prints where it listens once warm, answers the page's API with an
    access-log line per request, and a SIGTERM lets it finish and exit as interrupted (130)."""
    import json as json_module
    import queue
    import re
    import signal
    import subprocess
    import sys
    import threading
    import time
    import urllib.error
    import urllib.request

    command = [sys.executable, "-m", "tangshi_jax.serve", "--checkpoint-dir", str(trained_run[0]), "--port", "0"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()

    def said_until(pattern):
        deadline = time.monotonic() + 300
        while True:
            line = lines.get(timeout=max(1, deadline - time.monotonic()))
            said.append(line)
            if match := re.search(pattern, line):
                return match

    try:
        said = []
        listening = said_until(r"listening on (http://127\.0\.0\.1:\d+/)").group(1)
        with pytest.raises(urllib.error.HTTPError) as starting:  # JAX has not even loaded yet
            urllib.request.urlopen(listening + "api/health", timeout=30)
        assert starting.value.code == 503 and json_module.loads(starting.value.read())["status"] == "starting"
        address = said_until(r"ready in [\d.]+ s: (http://127\.0\.0\.1:\d+/)").group(1)
        assert address == listening and any("compiled" in line for line in said)
        with urllib.request.urlopen(address + "api/health", timeout=30) as response:
            assert response.status == 200 and json_module.loads(response.read())["status"] == "ok"
        body = json_module.dumps({"num": 1, "seed": 1, "candidates": 1}).encode()
        ask = urllib.request.Request(address + "api/poems", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(ask, timeout=60) as response:
            assert len(json_module.loads(response.read())["poems"]) == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 130, "".join(said)
        said_until("interrupted")
        access = [line for line in said if re.match(r"(GET|POST) /", line)]
        assert re.fullmatch(r"GET /api/health 503 [\d.]+ ms\n", access[0]), access
        assert re.fullmatch(r"POST /api/poems 200 [\d.]+ ms poems=1\n", access[-1]), access
        assert len(access) == 3  # one line a request
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# --- bounded waiting, readiness and the operator's signals -----------------------------------


class SlowEngine:
    """The Batcher's side of an Engine, writing nothing but taking `delay` seconds a call: what
    the queue does while the sampler is busy, without compiling a sampler."""

    def __init__(self, delay: float, max_rows: int = 8):
        self.delay, self.max_rows, self.rows_per_s, self.calls = delay, max_rows, 8.0, []
        self.longest_call_s = max_rows / self.rows_per_s

    def write(self, requests, seed):
        import time

        self.calls.append(list(requests))
        time.sleep(self.delay)
        rows = sum(request.rows for request in requests)
        return [Written(["诗"] * request.num, [0.0] * request.num, len(requests), rows) for request in requests]


def test_waiting_is_bounded_by_count_and_by_deadline_and_a_started_call_finishes():
    from tangshi_jax.batcher import Admission, ClientGone, Overloaded
    from tangshi_jax.observe import Signals

    async def scenario():
        engine, signals = SlowEngine(delay=0.6), Signals()
        batcher = Batcher(engine, admission=Admission(max_waiting=2, timeout=0.3), signals=signals)
        worker = asyncio.create_task(batcher.run())
        one = PoemRequest(num=1, candidates=1, form="qijue")  # the forms show which request a call ran
        first = asyncio.create_task(batcher.submit(dataclasses.replace(one, form="wujue")))
        await asyncio.sleep(0.05)  # the first call has started and holds the sampler 0.6 s
        second = asyncio.create_task(batcher.submit(one))
        third = asyncio.create_task(batcher.submit(dataclasses.replace(one, form="wulv")))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded) as full:  # two wait already
            await batcher.submit(one)
        assert "2 requests are waiting" in str(full.value) and full.value.retry_after >= 1
        assert (await first).poems == ["诗"]  # past the deadline, but started: it finishes
        for late in (second, third):
            with pytest.raises(Overloaded, match="no sampler call could start in time to answer within 0.3 s"):
                await late
        assert batcher.waiting == 0 and [len(call) for call in engine.calls] == [1]  # no row for them
        gone = asyncio.create_task(batcher.submit(one))
        await asyncio.sleep(0.05)
        left = asyncio.create_task(
            batcher.submit(dataclasses.replace(one, form="wulv"), gone=lambda: asyncio.sleep(0, True))
        )
        with pytest.raises(ClientGone):
            await left
        await gone
        worker.cancel()
        batcher.close()
        assert [call[0].form for call in engine.calls] == ["wujue", "qijue"]  # the one whose client left: no call
        dropped = {
            sample.labels["reason"]: sample.value
            for sample in signals.dropped.collect()[0].samples
            if sample.name.endswith("_total")
        }
        assert dropped == {"full": 1.0, "deadline": 2.0, "client_gone": 1.0}

    asyncio.run(scenario())


@pytest.mark.slow  # warms up an engine: compiles six sampler programs
def test_starting_until_warm_then_metrics_that_parse_and_a_json_access_log(engine):
    import json as json_module
    import threading
    import time

    from prometheus_client.parser import text_string_to_metric_families

    loaded, lines = threading.Event(), []
    app = serve.create_app(
        None, starting=lambda: (loaded.wait(60), (engine, None))[1], log=lines.append, log_format="json"
    )
    with TestClient(app) as client:
        health = client.get("/api/health")
        assert health.status_code == 503 and health.json()["status"] == "starting"
        refused = client.post("/api/poems", json={"num": 1})
        assert (
            refused.status_code == 503
            and refused.headers["Retry-After"] == "5"
            and "starting" in refused.json()["error"]
        )
        assert client.get("/api/model").status_code == 503
        loaded.set()
        deadline = time.monotonic() + 60
        while client.get("/api/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        health = client.get("/api/health").json()
        assert health["status"] == "ok" and health["max_waiting"] >= serve.MIN_WAITING and health["timeout_s"] == 10
        for form in ("wujue", "qijue"):
            assert len(ask(client, num=2, candidates=2, form=form)["poems"]) == 2
        exposition = client.get("/metrics")
    families = {family.name: family for family in text_string_to_metric_families(exposition.text)}
    value = lambda name, **labels: next(
        s.value
        for s in families[name].samples
        if s.name == name + "_total" * (families[name].type == "counter") and s.labels == labels
    )
    assert value("tangshi_requests", route="/api/poems", status="200") == 2
    assert value("tangshi_requests", route="/api/poems", status="503") == 1
    assert value("tangshi_sampler_calls") == 2 and value("tangshi_batch_rows", kind="used") == 8
    assert value("tangshi_batch_rows", kind="padded") == 0  # 4 rows: a compiled size
    assert value("tangshi_ready") == 1 and value("tangshi_model_step") == engine.model.progress["step"]
    assert families["tangshi_queue_wait_seconds"].type == "histogram"
    records = [json_module.loads(line) for line in lines]
    posts = [record for record in records if record["method"] == "POST"]
    assert [record["status"] for record in posts] == [503, 200, 200] and posts[-1]["poems"] == 2
    assert len(records) == sum(1 for record in records if record["path"]) and all(
        record["ms"] >= 0 for record in records
    )


def test_a_model_that_fails_to_load_is_reported_and_health_says_failed():
    failures = []

    def starting():
        raise TangshiError("no checkpoint in nowhere; train first")

    app = serve.create_app(None, starting=starting, on_failure=failures.append, log=lambda line: None)
    with TestClient(app) as client:
        import time

        deadline = time.monotonic() + 30
        while not failures and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.get("/api/health").json()["status"] == "failed"
        assert "failed to load" in client.post("/api/poems", json={}).json()["error"]
    assert str(failures[0]) == "no checkpoint in nowhere; train first"


@pytest.mark.slow  # warms up an engine with 词: compiles six sampler programs
def test_a_server_with_tunes_writes_ci_that_fit_and_compiles_nothing_more():
    from test_cipai import HUANXISHA, PUSAMAN, learned

    from tangshi_jax import cipai
    from tangshi_jax.config import ModelConfig, TrainConfig
    from tangshi_jax.model import init_params

    chars = sorted({char for text in HUANXISHA + PUSAMAN for char in text if char not in "，。、"})
    vocab = ["G", "E", "，", "。", "、"] + chars
    config = ModelConfig(vocab_size=len(vocab), hidden=16, embed=8)
    model = release.Loaded(config, TrainConfig(), vocab, init_params(config, jax.random.key(0)), {"step": 0})
    tunes = {"浣溪沙": learned("浣溪沙", HUANXISHA), "菩萨蛮": learned("菩萨蛮", PUSAMAN)}
    engine = Engine(model, max_rows=8, min_rows=4, tunes=tunes)
    programs, _ = engine.warm_up()
    assert programs == 4 and engine.tune_positions == max(cipai.tune_length(tune) for tune in tunes.values())
    compiles = []
    on_duration = lambda event, seconds, **kwargs: compiles.append(event) if "backend_compile" in event else None
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    try:
        with TestClient(serve.create_app(engine, log=lambda line: None)) as client:
            assert client.get("/api/model").json()["tunes"] == ["浣溪沙", "菩萨蛮"]
            for name in tunes:
                for poem in ask(client, tune=name, tones=True, num=2, candidates=2)["poems"]:
                    assert cipai.check(poem["poem"], tunes[name]) == {"lines": True, "rhyme": True, "tones": True}
            assert (
                len(ask(client, num=2, candidates=1, form="wujue", rhyme=True)["poems"]) == 2
            )  # poems still, beside the 词
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
    assert compiles == [], compiles


def test_a_server_stopped_while_loading_reports_no_failure():
    import time

    failures = []
    app = serve.create_app(None, starting=lambda: time.sleep(3), on_failure=failures.append, log=lambda line: None)
    with TestClient(app) as client:  # leaves while the loader still sleeps: the stop cancels it
        assert client.get("/api/health").json()["status"] == "starting"
    assert failures == [] and not app.state.service.failed
