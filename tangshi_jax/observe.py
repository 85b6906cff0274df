"""What an operator of `serve` reads: Prometheus metrics at GET /metrics and one access-log line
per request.

The metrics use the standard `prometheus_client` library, each app with a registry of its own
(so that tests and the load test can build several apps in one process):

- tangshi_requests_total{route, status}: requests answered, by route and HTTP status
- tangshi_request_seconds{route}: time from a request's arrival to its answer
- tangshi_queue_wait_seconds: time a poem request waited before its sampler call started
- tangshi_dropped_total{reason}: poem requests refused or given up before a sampler row:
  full (max_waiting reached), deadline (waited past --timeout), client_gone
- tangshi_sampler_calls_total, tangshi_sampler_seconds: sampler calls and their duration
- tangshi_batch_rows_total{kind}: rows of those calls, used (poems × drafts) or padded
- tangshi_waiting: poem requests admitted and not yet in a sampler call
- tangshi_ready: 1 once every program is compiled; tangshi_compile_seconds: how long that took
- tangshi_model_step: the training step of the model served

The access log is one line per request on stderr: `METHOD PATH STATUS MS poems=N`, or with
--log-format json one JSON object with the same fields.
"""

import json
import sys
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
LOG_FORMATS = ("text", "json")


class Signals:
    """One app's metrics, in a registry of its own."""

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("tangshi_requests", "requests answered", ["route", "status"], registry=registry)
        self.latency = Histogram(
            "tangshi_request_seconds", "arrival to answer", ["route"], buckets=LATENCY_BUCKETS, registry=registry
        )
        self.queue_wait = Histogram(
            "tangshi_queue_wait_seconds", "wait before the sampler call", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.dropped = Counter("tangshi_dropped", "poem requests given no sampler row", ["reason"], registry=registry)
        self.calls = Counter("tangshi_sampler_calls", "sampler calls", registry=registry)
        self.call_seconds = Histogram(
            "tangshi_sampler_seconds", "duration of a sampler call", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.rows = Counter("tangshi_batch_rows", "rows of sampler calls", ["kind"], registry=registry)
        self.waiting = Gauge("tangshi_waiting", "poem requests waiting for a sampler call", registry=registry)
        self.ready = Gauge("tangshi_ready", "1 once every program is compiled", registry=registry)
        self.compile_seconds = Gauge("tangshi_compile_seconds", "seconds the start-up compiled", registry=registry)
        self.model_step = Gauge("tangshi_model_step", "training step of the model served", registry=registry)
        for reason in ("full", "deadline", "client_gone"):
            self.dropped.labels(reason)  # every series from the start, so that rates begin at 0
        for kind in ("used", "padded"):
            self.rows.labels(kind)

    def sampler_call(self, rows: int, used: int, seconds: float) -> None:
        self.calls.inc()
        self.call_seconds.observe(seconds)
        self.rows.labels("used").inc(used)
        self.rows.labels("padded").inc(rows - used)

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def access_line(method: str, path: str, status: int, seconds: float, poems: int | None, log_format: str) -> str:
    fields = {"method": method, "path": path, "status": status, "ms": round(seconds * 1000, 1), "poems": poems}
    if log_format == "json":
        return json.dumps({"time": round(time.time(), 3), **fields}, ensure_ascii=False)
    return f"{method} {path} {status} {fields['ms']:.1f} ms" + (f" poems={poems}" if poems is not None else "")


class AccessLog:
    """ASGI middleware: one log line and the request metrics for every HTTP request."""

    def __init__(self, app, signals: Signals, log_format: str = "text", write=None):
        self.app, self.signals, self.log_format = app, signals, log_format
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))

    @property
    def state(self):
        return self.app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]
        scope["arrived"] = started  # the poems route counts its deadline from here

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            seconds = time.perf_counter() - started
            route = route_of(scope["path"])
            self.signals.requests.labels(route, str(status[0])).inc()
            self.signals.latency.labels(route).observe(seconds)
            poems = scope.get("poems")  # set by the poems route
            self.write(access_line(scope["method"], scope["path"], status[0], seconds, poems, self.log_format))


ROUTES = ("/api/poems", "/api/model", "/api/health", "/api/openapi.json", "/metrics", "/")


def route_of(path: str) -> str:
    """The route a path is counted under: one of ROUTES, /static, or other (no label per path)."""
    if path in ROUTES:
        return path
    return "/static" if path.startswith("/static/") else "other"
