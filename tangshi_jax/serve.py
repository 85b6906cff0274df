"""A web page and a JSON API that write poems: requests batched, every program compiled at start-up.

    python -m tangshi_jax.serve [--checkpoint-dir DIR | --model DIR] [--host 127.0.0.1] [--port 8000]
    python -m tangshi_jax.serve --load-test [--requests 200] [--clients 50]

Routes: `/` (the page), `POST /api/poems`, `GET /api/model`, `GET /api/health`,
`GET /api/openapi.json`. This module is the HTTP layer only: reading and checking requests,
and answering them; batcher.py puts them into sampler calls. A request never names a file,
and no answer holds a traceback or a path: a fault of the request is a 4xx with one line.
"""

import argparse
import asyncio
import contextlib
import ipaddress
import json
import math
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

# Only what the HTTP layer needs loads here: the model, the sampler and JAX load after the port
# is open (load_engine), so that /api/health answers "starting" while they compile.
from starlette.responses import FileResponse, JSONResponse, Response

from tangshi_jax import __version__, loadtest, observe
from tangshi_jax.batcher import Admission, Batcher, ClientGone, Engine, Overloaded
from tangshi_jax.config import PLATFORMS, to_dict
from tangshi_jax.errors import TangshiError, as_field, run_cli
from tangshi_jax.request import DEFAULT_CANDIDATES, MAX_CANDIDATES, MAX_POEMS, Field, PoemRequest, field_table

STATIC = Path(__file__).parent / "static"
MAX_BODY = 4096  # bytes of a request; a poem request is under 400
DEFAULT_MAX_BATCH = 128  # rows (poems × drafts) of one sampler call: a full request
TARGET_WAIT_S = 10.0  # the default --timeout, and the wait the default --max-waiting is sized for
MIN_WAITING = 8  # the default --max-waiting never falls below this
STARTING_RETRY_S = 5  # Retry-After while the programs compile
LISTEN_BACKLOG = 2048  # connections the kernel holds before uvicorn accepts them (uvicorn's own default)


class BadRequest(Exception):
    """A request the server refuses: its status and a one-line reason."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def poem_fields(max_poems: int = MAX_POEMS) -> dict[str, Field]:
    """The request's fields (PoemRequest's options, named as declared: --top-k is top_k), with
    the API's bounds and this server's cap on poems."""
    return field_table("api", caps={"num": max_poems})


TYPE_NAMES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "strings": "a list of strings",
}


def json_value(name: str, kind: str, value):
    """A JSON value in the type PoemRequest holds, or BadRequest naming the type it must have."""
    if kind == "strings" and isinstance(value, str):
        value = value.split()
    wrong_type = {
        "string": not isinstance(value, str),
        "integer": isinstance(value, bool) or not isinstance(value, int),
        "number": isinstance(value, bool) or not isinstance(value, (int, float)),
        "boolean": not isinstance(value, bool),
        "strings": not isinstance(value, list) or not all(isinstance(word, str) for word in value),
    }[kind]
    if wrong_type:
        raise BadRequest(f"{name} must be {TYPE_NAMES[kind]}, got {json.dumps(value, ensure_ascii=False)[:40]}")
    return float(value) if kind == "number" else value


def parse_request(body: bytes, fields: dict[str, Field]) -> PoemRequest:
    """The request a body asks for, each field checked against the API's bounds (PoemRequest's,
    or the narrower ones it declares for the API); BadRequest (400) otherwise."""
    try:
        values = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest('the body is not UTF-8; send JSON such as {"begin": "日"}') from None
    except json.JSONDecodeError as error:
        raise BadRequest(
            f"the body is not JSON ({error.msg} at line {error.lineno} column {error.colno}); "
            'send an object such as {"begin": "日"}'
        ) from None
    if not isinstance(values, dict):
        raise BadRequest('the body must be a JSON object such as {"begin": "日"}')
    unknown = [name for name in values if name not in fields]
    if unknown:
        raise BadRequest(
            f"unknown field {json.dumps(unknown[0], ensure_ascii=False)[:40]}; the fields are {', '.join(fields)}"
        )
    # null or an empty string is the field left out, as a form that sends every input would have it
    typed = {
        name: json_value(name, fields[name].kind, value)
        for name, value in values.items()
        if value is not None and value != ""
    }
    try:
        return PoemRequest.checked("api", caps={"num": fields["num"].high}, **typed)
    except TangshiError as error:
        raise BadRequest(error.worded(as_field)) from None


def openapi(fields: dict[str, Field]) -> dict:
    """An OpenAPI 3.1 description of the API, made from the same table that checks requests."""

    def schema(field: Field) -> dict:
        result = {
            "string": {"type": "string"},
            "integer": {"type": "integer"},
            "number": {"type": "number"},
            "boolean": {"type": "boolean"},
            "strings": {"oneOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}]},
        }[field.kind]
        result = {**result, "description": field.help}
        if field.choices:
            result["enum"] = list(field.choices)
        if field.default is not None:
            result["default"] = field.default
        if field.low is not None:
            result["exclusiveMinimum" if field.low_open else "minimum"] = field.low
        if field.high is not None:
            result["maximum"] = field.high
        if field.max_chars:
            result["maxLength"] = field.max_chars
        return result

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tangshi-jax",
            "version": __version__,
            "description": "Tang poems from a character-level recurrent model.",
        },
        "paths": {
            "/api/poems": {"post": poems_operation({name: schema(field) for name, field in fields.items()})},
            "/api/model": {
                "get": {
                    "summary": "The model: config, vocabulary size, step, validation loss, limits",
                    "responses": {"200": {"description": "a JSON object"}, "503": {"description": "starting"}},
                }
            },
            "/api/health": {
                "get": {
                    "summary": "Whether the server is ready: ok once every program is compiled",
                    "responses": {
                        "200": {
                            "description": '{"status": "ok", "sampler_calls", "waiting", "max_waiting", "timeout_s"}'
                        },
                        "503": {"description": '{"status": "starting" or "failed", "seconds"}'},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics in the text format",
                    "responses": {"200": {"description": "text/plain; version=1.0.0"}},
                }
            },
        },
    }


def poems_operation(properties: dict) -> dict:
    """POST /api/poems in OpenAPI's words: the request's fields (properties), the answer, the refusals."""
    error = {
        "description": "refused: one line in `error`",
        "content": {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}}}}},
    }
    poem = {
        "type": "object",
        "properties": {name: {"type": "string"} for name in ("begin", "title", "poem")}
        | {"lines": {"type": "array", "items": {"type": "string"}}, "score": {"type": "number"}},
    }
    return {
        "summary": "Write poems (the fields of `python -m tangshi_jax.sample`)",
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"type": "object", "additionalProperties": False, "properties": properties}
                }
            },
        },
        "responses": {
            "200": {
                "description": "the poems, the seconds taken and the batch they shared",
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "poems": {"type": "array", "items": poem},
                                "seconds": {"type": "number"},
                                "batch": {"type": "object"},
                            },
                        }
                    }
                },
            },
            "400": error,
            "413": error,
            "422": error,
            "503": {**error, "description": "starting, too many waiting, or waited past the deadline; see Retry-After"},
        },
    }


def model_info(engine: Engine, metrics: dict | None, fields: dict[str, Field]) -> dict:
    model = engine.model
    training = {key: value for key, value in to_dict(model.train_config).items() if key != "data"}  # no paths
    pick = lambda key: metrics.get(key) if metrics else None
    return {
        "model": to_dict(model.model_config),
        "training": training,
        "vocab_size": len(model.vocab),
        "reads_titles": bool(model.max_title),
        "tunes": list(engine.tunes or {}),  # the tune field's names, the commonest first (serve --tunes)
        "step": model.progress.get("step"),
        "epoch": model.progress.get("epoch"),
        "val_loss": pick("val_loss"),
        "val_ppl": pick("val_ppl"),
        "val_char_loss": pick("val_char_loss"),
        "val_char_ppl": pick("val_char_ppl"),
        "limits": {
            "num": fields["num"].high,
            "candidates": fields["candidates"].high,
            "batch_rows": engine.max_rows,
            "body_bytes": MAX_BODY,
        },
        "defaults": {
            name: fields[name].default
            for name in ("num", "candidates", "temperature", "top_p", "repetition_penalty", "script")
        },
    }


async def read_body(http_request) -> bytes:
    """The body, read no further than MAX_BODY bytes (BadRequest 413 past it)."""
    declared = http_request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise BadRequest(f"the body is over {MAX_BODY} bytes; a poem request needs a few hundred", 413)
    body = b""
    async for chunk in http_request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise BadRequest(f"the body is over {MAX_BODY} bytes; a poem request needs a few hundred", 413)
    return body


def answer(wanted: PoemRequest, written, seconds: float) -> dict:
    """The JSON answer to a request: its poems, the time taken and the batch it shared."""
    from tangshi_jax.sample import poem_lines  # loaded with the engine

    return {
        "poems": [
            {
                "begin": wanted.begin or "",
                "title": wanted.topic or "",
                "poem": poem,
                "lines": poem_lines(poem, wanted),
                "score": round(score, 4) if math.isfinite(score) else None,
            }
            for poem, score in zip(written.poems, written.scores)
        ],
        "seconds": round(seconds, 4),
        "batch": {"requests": written.batch_requests, "rows": written.batch_rows},
    }


def default_admission(engine: Engine, timeout: float = TARGET_WAIT_S) -> Admission:
    """The bounds a server starts with: as many requests of the default size as it writes in
    `timeout` seconds at the rate its warm-up measured, and that wait as the deadline."""
    per_second = engine.rows_per_s / DEFAULT_CANDIDATES
    return Admission(max(MIN_WAITING, round(per_second * timeout)), timeout)


def refuse(message: str, status: int, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Service:
    """What the API routes serve: the engine once it is warm, the batcher with its bounds on
    waiting, and the operator's signals. Until `become_ready`, the routes answer 503."""

    def __init__(self, fields, batching: str, admission: Admission | None, timeout: float, log):
        self.fields, self.batching, self.admission, self.timeout, self.log = fields, batching, admission, timeout, log
        self.signals = observe.Signals()
        self.engine, self.metrics, self.batcher, self.worker = None, None, None, None
        self.since, self.failed = time.perf_counter(), False

    def become_ready(self, engine: Engine, metrics: dict | None) -> None:
        bounds = self.admission or default_admission(engine, self.timeout)
        self.batcher = Batcher(engine, batching=self.batching, admission=bounds, signals=self.signals)
        self.engine, self.metrics = engine, metrics
        self.signals.ready.set(1)
        self.signals.compile_seconds.set(engine.compile_seconds)
        self.signals.model_step.set(engine.model.progress.get("step") or 0)

    async def start(self, starting, on_failure, on_ready=None) -> None:
        """Load and warm up in a thread (the event loop keeps answering), then take requests;
        on_ready() runs once /api/health says ok (so a line saying "ready" is never early)."""
        try:
            self.become_ready(*await asyncio.to_thread(starting))
        except asyncio.CancelledError:  # the server stopped while loading: nothing failed
            raise
        except BaseException as error:  # noqa: BLE001 -- handed to whoever runs the server
            self.failed = True
            if on_failure is None:
                raise
            on_failure(error)
            return
        self.worker = asyncio.create_task(self.batcher.run())
        if on_ready is not None:
            on_ready()

    def not_ready(self) -> JSONResponse:
        if self.failed:
            return refuse("the server failed to load its model; its log says why", 503)
        return refuse("the server is starting: it compiles its programs; try again shortly", 503, STARTING_RETRY_S)

    async def poems(self, http_request) -> Response:
        arrived = http_request.scope.get("arrived", time.perf_counter())  # set by observe.AccessLog
        if self.batcher is None:
            return self.not_ready()
        try:
            wanted = parse_request(await read_body(http_request), self.fields)
            wanted = self.engine.check(wanted)
            written = await self.batcher.submit(wanted, gone=http_request.is_disconnected, arrived=arrived)
        except BadRequest as error:
            return refuse(str(error), error.status)
        except TangshiError as error:  # what only the model can check: its vocabulary, titles
            return refuse(error.worded(as_field), 422)
        except Overloaded as error:
            return refuse(str(error), 503, error.retry_after)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; the access log shows the drop
        http_request.scope["poems"] = len(written.poems)  # for the access log
        return JSONResponse(answer(wanted, written, time.perf_counter() - arrived))

    async def model(self, http_request) -> JSONResponse:
        if self.batcher is None:
            return self.not_ready()
        return JSONResponse(model_info(self.engine, self.metrics, self.fields))

    async def health(self, http_request) -> JSONResponse:
        if self.batcher is None:
            waited = round(time.perf_counter() - self.since, 1)
            return JSONResponse({"status": "failed" if self.failed else "starting", "seconds": waited}, 503)
        bounds = self.batcher.admission
        return JSONResponse(
            {
                "status": "ok",
                "sampler_calls": self.batcher.calls,
                "waiting": self.batcher.waiting,
                "max_waiting": bounds.max_waiting,
                "timeout_s": bounds.timeout,
            }
        )

    async def exposition(self, http_request) -> Response:
        if self.batcher is not None:
            self.signals.waiting.set(self.batcher.waiting)
        body, content_type = self.signals.exposition()
        return Response(body, media_type=content_type)

    async def describe(self, http_request) -> JSONResponse:
        return JSONResponse(openapi(self.fields))

    async def page(self, http_request) -> FileResponse:
        return FileResponse(
            STATIC / "index.html",
            headers={
                "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff",
            },
        )

    async def http_error(self, http_request, error) -> JSONResponse:
        reasons = {
            404: "no such page; the API is POST /api/poems, GET /api/model, GET /api/health, GET /metrics",
            405: f"{http_request.method} is not allowed here",
        }
        return JSONResponse(
            {"error": reasons.get(error.status_code, str(error.detail))},
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )

    async def server_error(self, http_request, error: Exception) -> JSONResponse:
        self.log("".join(traceback.format_exception(error)).rstrip())  # for the operator, never the client
        return refuse("the server failed to write these poems; its log says why", 500)


def create_app(
    engine: Engine | None,
    metrics: dict | None = None,
    batching: str = "any",
    max_poems: int = MAX_POEMS,
    log=lambda message: print(message, file=sys.stderr),
    *,
    starting=None,
    on_failure=None,
    on_ready=None,
    admission: Admission | None = None,
    timeout: float = TARGET_WAIT_S,
    log_format: str = "text",
    access_log: bool = True,
):
    """The Starlette application. engine: a warmed-up Engine, or None with `starting`, a
    function that loads and warms one up (returning it and the model's metrics), run in a
    thread once the server runs: until it returns, /api/health answers "starting" (503) and
    the other API routes 503 with Retry-After; if it raises, on_failure(error) is called, and
    once the server is ready, on_ready().
    batching: which waiting requests share a sampler call (batcher.BATCHING; the load test compares them).
    admission: the bounds on waiting (when None, default_admission of the engine and timeout).
    The app is wrapped in observe.AccessLog: a log line per request (access_log) and the metrics."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    service = Service(poem_fields(max_poems), batching, admission, timeout, log)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loading = None
        if service.batcher is None:
            loading = asyncio.create_task(service.start(starting, on_failure, on_ready))
        else:
            service.worker = asyncio.create_task(service.batcher.run())
        yield
        for task in (loading, service.worker):
            if task is not None:
                task.cancel()
        if service.batcher is not None:
            service.batcher.close()

    if engine is not None:
        service.become_ready(engine, metrics)
    app = Starlette(
        routes=[
            Route("/", service.page),
            Route("/api/poems", service.poems, methods=["POST"]),
            Route("/api/model", service.model),
            Route("/api/health", service.health),
            Route("/api/openapi.json", service.describe),
            Route("/metrics", service.exposition),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        exception_handlers={HTTPException: service.http_error, Exception: service.server_error},
        lifespan=lifespan,
    )
    app.state.service = service
    return observe.AccessLog(app, service.signals, log_format, write=log if access_log else lambda line: None)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a TangshiError that says what to change."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise TangshiError(
            f"cannot listen on {host}:{port} ({error.strerror}); give another --port or --host"
        ) from None
    sock.listen(LISTEN_BACKLOG)
    sock.set_inheritable(True)
    return sock


@contextlib.contextmanager
def serving(app, host: str = "127.0.0.1", port: int = 0):
    """Run the app with uvicorn in a background thread; yields its base URL (tests, load test)."""
    import uvicorn

    sock = bind(host, port)
    # log_config=None: leave logging as the caller set it up (uvicorn would bind its handlers to the
    # stderr of the moment, which pytest closes after each test)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        raise RuntimeError("the server did not start")
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def writable_bodies(engine, bodies: list[dict], max_poems: int, log) -> list[dict]:
    """The load test's requests that this model can write; a note names each left out (a small
    model may lack a character the mix asks for), so that no refusal counts as a failure."""
    kept = []
    for body in bodies:
        try:
            engine.check(parse_request(json.dumps(body).encode(), poem_fields(max_poems)))
            kept.append(body)
        except (BadRequest, TangshiError) as error:
            log(f"note: the load test leaves out {json.dumps(body, ensure_ascii=False)}: {error}")
    if not kept:
        raise TangshiError("this model can write none of the load test's requests")
    return kept


LOAD_TEST_MODES = (("any requests a call", "any"), ("one plan a call", "plan"), ("one call a request", "none"))


def load_test(
    engine,
    metrics,
    requests: int,
    clients: int,
    max_poems: int,
    drafts: int = 8,
    log=print,
    admission=None,
    timeout: float = TARGET_WAIT_S,
) -> list[dict]:
    """The same load (loadtest.fire, a mix of different requests) against the same warmed-up
    engine and bounds on waiting (admission, or default_admission with timeout), in each way of
    batching: any requests a call, one plan a call (as before plans were per row), one call a request."""
    results, before = [], loadtest.rss_mb()
    bounds = admission or default_admission(engine, timeout)
    bodies = writable_bodies(engine, loadtest.bodies_with(drafts, max_poems), max_poems, log)
    for name, batching in LOAD_TEST_MODES:
        app = create_app(
            engine, metrics, batching=batching, max_poems=max_poems, log=log, admission=bounds, access_log=False
        )
        with serving(app) as url:
            log(f"load test, {name}: {requests} requests from {clients} clients to {url}")
            records, seconds = loadtest.fire_apart(url, requests, clients, bodies)
            calls = app.state.service.batcher.calls
            results.append({**loadtest.summarise(name, records, seconds, calls), "drafts": drafts, "bodies": bodies})
    results[0]["bounds"] = f"--max-waiting {bounds.max_waiting}, --timeout {bounds.timeout:g} s" + (
        f"; memory before the first mode {before:,.0f} MB" if before is not None else ""
    )
    return results


def load_engine(
    checkpoint_dir, model_dir, max_batch: int, platform, log, tunes_data=None
) -> tuple[Engine, dict | None]:
    """The model loaded and every sampler program compiled (the slow part of start-up).
    tunes_data: the poems file beside which poems.ci.txt teaches the tunes (None: no 词)."""
    from tangshi_jax import cipai, release, sample
    from tangshi_jax.devices import use_platform

    use_platform(platform)
    loaded = release.load_model(checkpoint_dir=checkpoint_dir, model_dir=model_dir)
    metrics = release.last_metrics(checkpoint_dir, model_dir, loaded.progress.get("epoch"))
    lines = sample.corpus_lines(loaded.train_config.data, loaded.train_config.corpus)
    tunes = cipai.tunes_beside(tunes_data) if tunes_data else None
    engine = Engine(loaded, max_rows=max_batch, corpus_lines=lines, tunes=tunes)
    programs, seconds = engine.warm_up()
    rows = ", ".join(map(str, engine.buckets))
    log(
        f"compiled {programs} sampler programs (batches of {rows} rows"
        f"{', with and without titles' if loaded.max_title else ''}"
        f"{f', and for 词 of up to {engine.tune_positions} positions' if tunes else ''}) in {seconds:.1f} s; "
        f"{engine.rows_per_s:,.0f} rows/s"
    )
    return engine, metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tangshi_jax.serve", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint-dir", default="checkpoints")
    source.add_argument("--model", default=None, help="a release folder (python -m tangshi_jax.export)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULT_MAX_BATCH,
        help="rows (poems × drafts) of one sampler call; requests that arrive together share one",
    )
    parser.add_argument("--max-poems", type=int, default=MAX_POEMS, help="poems a request may ask for")
    parser.add_argument("--platform", choices=PLATFORMS, default=None)
    parser.add_argument(
        "--max-waiting",
        type=int,
        default=None,
        help="poem requests that may wait for a sampler call; past it a request gets 503 with Retry-After "
        f"(default: what the measured rate writes in {TARGET_WAIT_S:g} s, at least {MIN_WAITING})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=TARGET_WAIT_S,
        help="seconds a request may wait before its sampler call starts; then 503 with Retry-After",
    )
    parser.add_argument(
        "--tunes",
        action="store_true",
        help="also write 词 to a tune (the tune field): learns the tunes from poems.ci.txt beside --data and "
        "compiles the 词's programs too",
    )
    parser.add_argument("--data", default="poems.txt", help="with --tunes, the poems file poems.ci.txt is beside")
    parser.add_argument(
        "--log-format", choices=observe.LOG_FORMATS, default="text", help="the access log's lines: text or json"
    )
    parser.add_argument(
        "--load-test",
        action="store_true",
        help="measure latency and poems/s on 127.0.0.1 for a mix of requests, batched in each way, then exit",
    )
    parser.add_argument("--requests", type=int, default=200, help="load test: requests in all")
    parser.add_argument("--clients", type=int, default=50, help="load test: clients sending at once")
    parser.add_argument("--drafts", type=int, default=DEFAULT_CANDIDATES, help="load test: candidates of each request")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if (
        min(args.max_poems, args.requests, args.clients) < 1
        or not 1 <= args.drafts <= MAX_CANDIDATES
        or not 0 <= args.port < 65536
    ):
        raise TangshiError(
            f"--max-poems, --requests and --clients must be at least 1, --drafts 1 to "
            f"{MAX_CANDIDATES}, --port 0 to 65535"
        )
    if args.max_batch < args.max_poems * DEFAULT_CANDIDATES:
        raise TangshiError(
            f"--max-batch must hold a full request: at least --max-poems × "
            f"{DEFAULT_CANDIDATES} drafts = {args.max_poems * DEFAULT_CANDIDATES}"
        )
    if (args.max_waiting is not None and args.max_waiting < 1) or not args.timeout > 0:
        raise TangshiError("--max-waiting must be at least 1 and --timeout above 0 seconds")
    log = lambda message: print(message, file=sys.stderr, flush=True)
    started = time.perf_counter()
    load = lambda: load_engine(
        args.checkpoint_dir, args.model, args.max_batch, args.platform, log, args.data if args.tunes else None
    )
    admission = Admission(args.max_waiting, args.timeout) if args.max_waiting else None  # None: from the rate
    if args.load_test:
        engine, metrics = load()
        results = load_test(
            engine,
            metrics,
            args.requests,
            args.clients,
            args.max_poems,
            args.drafts,
            log=log,
            admission=admission,
            timeout=args.timeout,
        )
        print(loadtest.format_results(results))
        return
    import uvicorn

    sock = bind(args.host, args.port)
    url = f"http://{args.host}:{sock.getsockname()[1]}/"
    if not ipaddress.ip_address(sock.getsockname()[0]).is_loopback:
        log(f"note: listening on {args.host}, so other machines can reach this server")
    server, failure = None, []

    def ready():
        log(f"ready in {time.perf_counter() - started:.1f} s: {url}  (Ctrl-C stops)")

    def failed(error: BaseException) -> None:
        failure.append(error)
        server.should_exit = True

    app = create_app(
        None,
        max_poems=args.max_poems,
        log=log,
        starting=load,
        on_failure=failed,
        on_ready=ready,
        admission=admission,
        timeout=args.timeout,
        log_format=args.log_format,
    )
    # uvicorn finishes the requests in flight on SIGTERM, then raises the signal again under the
    # handler it found: make that an interruption, so the exit code is 130 as for Ctrl-C.
    signal.signal(signal.SIGTERM, interrupted)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    log(f"listening on {url} in {time.perf_counter() - started:.1f} s; loading and compiling the model")
    server.run(sockets=[sock])
    if failure:
        raise failure[0]


def interrupted(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(run_cli(main))
