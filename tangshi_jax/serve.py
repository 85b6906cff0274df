"""A web page and a JSON API that write poems: requests batched, every program compiled at start-up.

    python -m tangshi_jax.serve [--checkpoint-dir DIR | --model DIR] [--host 127.0.0.1] [--port 8000]
    python -m tangshi_jax.serve --load-test [--requests 200] [--clients 50]

Routes: `/` (the page), `POST /api/poems`, `GET /api/model`, `GET /api/health`,
`GET /api/openapi.json`. This module is the HTTP layer only: reading and checking requests,
and answering them; batcher.py merges them into sampler calls. A request never names a file,
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

from tangshi_jax import __version__, loadtest, release, sample
from tangshi_jax.batcher import Batcher, Engine
from tangshi_jax.config import to_dict
from tangshi_jax.devices import PLATFORMS, use_platform
from tangshi_jax.errors import TangshiError, as_field, run_cli
from tangshi_jax.request import DEFAULT_CANDIDATES, MAX_CANDIDATES, MAX_POEMS, Field, PoemRequest, field_table

STATIC = Path(__file__).parent / "static"
MAX_BODY = 4096  # bytes of a request; a poem request is under 400
DEFAULT_MAX_BATCH = 128  # rows (poems × drafts) of one sampler call: a full request


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
                    "responses": {"200": {"description": "a JSON object"}},
                }
            },
            "/api/health": {
                "get": {
                    "summary": "Whether the server is up",
                    "responses": {"200": {"description": '{"status": "ok"}'}},
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
    return {
        "poems": [
            {
                "begin": wanted.begin or "",
                "title": wanted.topic or "",
                "poem": poem,
                "lines": sample.poem_lines(poem, wanted),
                "score": round(score, 4) if math.isfinite(score) else None,
            }
            for poem, score in zip(written.poems, written.scores)
        ],
        "seconds": round(seconds, 4),
        "batch": {"requests": written.batch_requests, "rows": written.batch_rows},
    }


def create_app(
    engine: Engine,
    metrics: dict | None = None,
    merge: bool = True,
    max_poems: int = MAX_POEMS,
    log=lambda message: print(message, file=sys.stderr),
):
    """The Starlette application over a warmed-up engine; merge=False answers each request
    with its own sampler call (the load test's baseline)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    fields = poem_fields(max_poems)
    batcher = Batcher(engine, merge=merge)

    def refuse(message: str, status: int) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def poems(http_request: Request) -> JSONResponse:
        arrived = time.perf_counter()
        try:
            wanted = parse_request(await read_body(http_request), fields)
            engine.check(wanted)
            written = await batcher.submit(wanted)  # checked, so a TangshiError here is not expected
        except BadRequest as error:
            return refuse(str(error), error.status)
        except TangshiError as error:  # what only the model can check: its vocabulary, titles
            return refuse(error.worded(as_field), 422)
        return JSONResponse(answer(wanted, written, time.perf_counter() - arrived))

    async def page(request: Request) -> FileResponse:
        return FileResponse(
            STATIC / "index.html",
            headers={
                "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff",
            },
        )

    async def model(request: Request) -> JSONResponse:
        return JSONResponse(model_info(engine, metrics, fields))

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "sampler_calls": batcher.calls, "waiting": batcher.queue.qsize()})

    async def describe(request: Request) -> JSONResponse:
        return JSONResponse(openapi(fields))

    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        reasons = {
            404: "no such page; the API is POST /api/poems, GET /api/model, GET /api/health",
            405: f"{request.method} is not allowed here",
        }
        return JSONResponse(
            {"error": reasons.get(error.status_code, str(error.detail))},
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )

    async def server_error(request: Request, error: Exception) -> JSONResponse:
        log("".join(traceback.format_exception(error)).rstrip())  # for the operator, never the client
        return refuse("the server failed to write these poems; its log says why", 500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()
        batcher.close()

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/api/poems", poems, methods=["POST"]),
            Route("/api/model", model),
            Route("/api/health", health),
            Route("/api/openapi.json", describe),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    return app


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
    sock.listen(128)
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


def load_test(engine, metrics, requests: int, clients: int, max_poems: int, drafts: int = 8, log=print) -> list[dict]:
    """The same load (loadtest.fire) against the same warmed-up engine, with batching, then one
    sampler call a request."""
    results = []
    for name, merge in (("batched", True), ("one call a request", False)):
        app = create_app(engine, metrics, merge=merge, max_poems=max_poems, log=log)
        with serving(app) as url:
            log(f"load test, {name}: {requests} requests from {clients} clients to {url}")
            records, seconds = loadtest.fire(url, requests, clients, loadtest.bodies_with(drafts))
            results.append({**loadtest.summarise(name, records, seconds, app.state.batcher.calls), "drafts": drafts})
    return results


def load_engine(checkpoint_dir, model_dir, max_batch: int, log) -> tuple[Engine, dict | None]:
    loaded = release.load_model(checkpoint_dir=checkpoint_dir, model_dir=model_dir)
    metrics = release.last_metrics(checkpoint_dir, model_dir, loaded.progress.get("epoch"))
    lines = sample.corpus_lines(loaded.train_config.data, loaded.train_config.corpus)
    engine = Engine(loaded, max_rows=max_batch, corpus_lines=lines)
    programs, seconds = engine.warm_up()
    rows = ", ".join(map(str, engine.buckets))
    log(
        f"compiled {programs} sampler programs (batches of {rows} rows"
        f"{', with and without titles' if loaded.max_title else ''}) in {seconds:.1f} s"
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
        "--load-test",
        action="store_true",
        help="measure latency and poems/s on 127.0.0.1 with batching and without, then exit",
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
    log = lambda message: print(message, file=sys.stderr, flush=True)
    use_platform(args.platform)
    started = time.perf_counter()
    engine, metrics = load_engine(args.checkpoint_dir, args.model, args.max_batch, log)
    if args.load_test:
        results = load_test(engine, metrics, args.requests, args.clients, args.max_poems, args.drafts, log=log)
        print(loadtest.format_results(results))
        return
    import uvicorn

    sock = bind(args.host, args.port)
    if not ipaddress.ip_address(sock.getsockname()[0]).is_loopback:
        log(f"note: listening on {args.host}, so other machines can reach this server")
    app = create_app(engine, metrics, max_poems=args.max_poems, log=log)
    log(f"ready in {time.perf_counter() - started:.1f} s: http://{args.host}:{sock.getsockname()[1]}/  (Ctrl-C stops)")
    # uvicorn finishes the requests in flight on SIGTERM, then raises the signal again under the
    # handler it found: make that an interruption, so the exit code is 130 as for Ctrl-C.
    signal.signal(signal.SIGTERM, interrupted)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


def interrupted(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(run_cli(main))
