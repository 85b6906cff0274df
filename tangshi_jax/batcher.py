"""Requests that arrive together, written in one sampler call: the engine behind `serve`.

A request (PoemRequest) asks for `num` poems. The sampler takes every plan entry (begin text,
form, acrostic, rules, tune, couplet) and every sampling setting per row, and each request
draws from a key of its own, so any waiting requests share one `sample.write_batch` call, up
to `max_rows` rows (poems × drafts) a call, and each gets the poems it would get alone with
its key. Only the program's length and the costly filters divide them: a 词 runs in the longest
tune's program, and requests with top-k or top-p share calls with those that filter alike.
Every call is padded to one of a few row counts (row_buckets up to max_rows), all compiled by
`Engine.warm_up` before the first request, so that no request pays for a compile. A request
with its own seed runs alone, so that it gets the poems `sample --seed` gives.
"""

import asyncio
import collections
import concurrent.futures
import dataclasses
import math
import secrets
import time
from dataclasses import dataclass

from tangshi_jax import cipai, observe
from tangshi_jax.errors import TangshiError
from tangshi_jax.request import PoemRequest

# The Engine's modules (sample, and with it JAX) load when it first needs them, so that `serve`
# opens its port within a second of launch and says "starting" while it compiles.

# On 2 CPU cores a row costs ~2.7 ms from 8 rows up (a 七绝 of the original's model; 1 row alone
# ~7.7 ms), and more above ~256 rows, whose arrays outgrow the caches: merging pays most for small requests.
SMALLEST_BUCKET = 1


def row_buckets(max_rows: int, min_rows: int = SMALLEST_BUCKET) -> list[int]:
    """The row counts compiled: min_rows, twice that, ... below max_rows, and max_rows. Doubling
    keeps the padding under half a call."""
    buckets, rows = [], min(min_rows, max_rows)
    while rows < max_rows:
        buckets.append(rows)
        rows *= 2
    return buckets + [max_rows]


@dataclass
class Written:
    """The answer to one request."""

    poems: list[str]
    scores: list[float]
    batch_requests: int  # requests answered by the same sampler call
    batch_rows: int  # rows that call ran (poems × drafts, padded)


class Engine:
    """A loaded model and the sampler calls that serve it."""

    def __init__(
        self,
        model: "release.Loaded",  # noqa: F821 -- tangshi_jax.release, loaded by the caller
        max_rows: int = 128,
        corpus_lines: set[str] | None = None,
        min_rows: int = SMALLEST_BUCKET,
        tunes: dict | None = None,
    ):
        self.model = model
        self.tunes = tunes  # the tunes a request may name (cipai.tunes_beside), or None: no 词
        # Every 词 is written in one length of program: the longest tune's, so that no request compiles.
        self.tune_positions = max((cipai.tune_length(tune) for tune in (tunes or {}).values()), default=0)
        self.max_rows = max_rows
        self.buckets = row_buckets(max_rows, min_rows)  # tests compile fewer with a larger min_rows
        self.corpus_lines = corpus_lines
        self.rows_per_s = 100.0  # sampler rows a second; warm_up measures it
        self.longest_call_s = max_rows / self.rows_per_s  # a full call of the costliest kind; warm_up measures it
        self.compile_seconds = 0.0  # what warm_up took to compile every program

    def check(self, request: PoemRequest) -> PoemRequest:
        """The request as the engine writes it (max_len: the length of its program, a 词's the
        longest tune's), or TangshiError if the model cannot write what it asks (host-side, cheap)."""
        if request.rows > self.max_rows:
            raise TangshiError(
                f"num × candidates is {request.rows}, more than this server's batch of "
                f"{self.max_rows}; ask for fewer poems or drafts"
            )
        if request.tune is not None and not self.tunes:
            raise TangshiError(
                "{tune}: this server writes no 词; its operator can start it with serve's tunes option",
                field="tune",
            )
        if request.tune is not None:
            request = dataclasses.replace(request, max_len=self.tune_positions)
        from tangshi_jax import sample

        plan = sample.plan_request(self.model.vocab, request, self.model.max_title, self.tunes)
        return dataclasses.replace(request, max_len=len(plan["kind"]) - 1)

    def write(self, requests: list[PoemRequest], seeds: list[int]) -> list[Written]:
        """One sampler call for requests of one program length (max_len, as `check` gives it),
        each drawing from its own seed's key, padded to a compiled row count."""
        from tangshi_jax import sample

        rows = sum(request.rows for request in requests)
        bucket = next(bucket for bucket in self.buckets if bucket >= rows)
        asked = [sample.Asked(request, sample.request_key(seed)) for request, seed in zip(requests, seeds)]
        return [
            Written(sample.in_script(poems, request.script), scores, len(requests), bucket)
            for request, (poems, scores) in zip(requests, self.call_sampler(asked, rows=bucket))
        ]

    def call_sampler(self, asked: list, rows: int) -> list[tuple[list[str], list[float]]]:
        from tangshi_jax import sample

        return sample.write_batch(
            self.model.params,
            self.model.model_config,
            self.model.vocab,
            asked,
            max_title=self.model.max_title,
            corpus_lines=self.corpus_lines,
            with_scores=True,
            rows=rows,
            tunes=self.tunes,
        )

    def warm_up(self) -> tuple[int, float]:
        """Compile every program a request can run: the sampler at each row count, with and
        without titles for a model that reads them; then time a full call of the API's default
        requests (the rate the server's bound on waiting starts from) and one of requests with
        top-k and top-p, the costliest kind (how early a request must start to finish within
        the deadline). Returns (programs, seconds)."""
        from tangshi_jax import data, rules, sample

        started = time.perf_counter()
        hanzi = next(char for char in self.model.vocab if data.is_hanzi(char))
        titles = [None, hanzi] if self.model.max_title else [None]
        kinds = [PoemRequest(candidates=1)]
        if self.tunes:  # the 词's program: the longest tune's length
            kinds.append(PoemRequest(candidates=1, tune=next(iter(self.tunes)), max_len=self.tune_positions))
        key = sample.request_key(0)
        for bucket in self.buckets:
            for title in titles:
                for kind in kinds:
                    self.call_sampler([sample.Asked(dataclasses.replace(kind, title=title), key)], rows=bucket)
        rules.opencc_converter("s2t").convert(hanzi)
        self.compile_seconds = compiled = time.perf_counter() - started
        self.rows_per_s = self.max_rows / self.time_full_call(PoemRequest())
        self.longest_call_s = self.time_full_call(PoemRequest(top_k=40, top_p=0.9))
        return len(self.buckets) * len(titles) * len(kinds), compiled

    def time_full_call(self, request: PoemRequest) -> float:
        """Seconds of one call of as many such requests as fill max_rows (at least one)."""
        count = max(1, self.max_rows // request.rows)
        started = time.perf_counter()
        self.write([request] * count, list(range(count)))
        return time.perf_counter() - started


class Overloaded(Exception):
    """A request the server will not schedule: too many wait, or it waited past the deadline.
    retry_after: seconds after which the queue should have room (the Retry-After header)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class ClientGone(Exception):
    """The client closed its connection before its request took a sampler row."""


@dataclass(eq=False)
class Pending:
    request: PoemRequest
    future: asyncio.Future
    arrived: float
    started: bool = False  # taken into a sampler call: it finishes, whatever the deadline


@dataclass(frozen=True)
class Admission:
    """How much waiting a server admits: requests waiting at most, and seconds a request may
    wait before its sampler call starts (a call, once started, finishes)."""

    max_waiting: int = 64
    timeout: float = 10.0


POLL_S = 0.25  # how often a waiting request looks whether its client is still there
RECENT_CALLS = 8  # sampler calls whose longest sets how early a request must start


def filters(request: PoemRequest) -> tuple[bool, bool]:
    """Whether a request narrows its draws by top-k, by top-p. Each costs 16 passes over the
    vocabulary a character for every row of a call that holds one such row (1.2 s against 0.75 s
    for a call of 128 rows on 2 cores), so requests share calls only with requests that filter alike."""
    return request.top_k > 0, request.top_p < 1.0


BATCHING = ("any", "plan", "none")  # which waiting requests share a call: any of one length, one plan's, none


class Batcher:
    """One worker that takes every request waiting, puts those that can share a sampler call
    into one (`batching`: any requests of one program length; "plan", only those of one plan,
    as before plans were per row; "none", a call a request), and runs the calls one after
    another in a thread, so that the event loop keeps taking requests.
    Waiting is bounded (Admission): past max_waiting, or past the deadline, a request is refused
    with Overloaded; one whose client has gone is dropped before it takes a sampler row."""

    def __init__(
        self,
        engine: Engine,
        batching: str = "any",
        admission: Admission | None = None,
        signals: observe.Signals | None = None,
    ):
        if batching not in BATCHING:  # any other word would quietly batch by plan
            raise ValueError(f"batching must be one of {BATCHING}, not {batching!r}")
        self.engine, self.batching, self.admission = engine, batching, admission or Admission()
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sampler")
        self.calls = 0
        self.unstarted: set[Pending] = set()  # admitted, not yet in a sampler call, not given up
        self.rows_per_s = engine.rows_per_s  # measured at warm-up, then by every call
        self.recent_calls = collections.deque([engine.longest_call_s], maxlen=RECENT_CALLS)
        self.signals = signals or observe.Signals()  # the app's, or a registry of its own

    @property
    def waiting(self) -> int:
        return len(self.unstarted)

    def retry_after(self) -> int:
        """Seconds until the rows waiting now should have been written, at the measured rate."""
        rows = sum(item.request.rows for item in self.unstarted)
        return max(1, math.ceil(rows / max(self.rows_per_s, 1e-9)))

    def give_up(self, item: Pending, reason: str, error: Exception) -> None:
        """No sampler row for this request: it is answered with `error`."""
        self.unstarted.discard(item)
        if not item.future.done():
            item.future.set_exception(error)
        self.signals.dropped.labels(reason).inc()

    def start_deadline(self, item: Pending) -> float:
        """When a request must have started to be answered within the timeout: the timeout less
        the longest of the recent sampler calls and a poll's lateness (half the timeout at most)."""
        timeout = self.admission.timeout
        return item.arrived + timeout - min(max(self.recent_calls) + POLL_S, timeout / 2)

    def late(self, item: Pending) -> Overloaded:
        return Overloaded(
            f"no sampler call could start in time to answer within {self.admission.timeout:g} s; "
            "the server is busy, try again",
            self.retry_after(),
        )

    async def submit(self, request: PoemRequest, gone=None, arrived: float | None = None) -> Written:
        """The request's poems, once a sampler call has written them. Raises Overloaded when
        max_waiting requests already wait or when it would wait past the deadline, and
        ClientGone when `gone()` (a coroutine function) says the client left first. arrived:
        when the request reached the server (time.perf_counter; default now)."""
        if self.waiting >= self.admission.max_waiting:
            self.signals.dropped.labels("full").inc()
            raise Overloaded(
                f"{self.waiting} requests are waiting, the most this server queues; try again shortly",
                self.retry_after(),
            )
        arrived = time.perf_counter() if arrived is None else arrived
        item = Pending(request, asyncio.get_running_loop().create_future(), arrived)
        self.unstarted.add(item)
        self.queue.put_nowait(item)
        while not item.future.done():
            left = self.start_deadline(item) - time.perf_counter()
            if left <= 0 and not item.started:
                self.give_up(item, "deadline", self.late(item))
                break
            await asyncio.wait({item.future}, timeout=min(POLL_S, left) if left > 0 else POLL_S)
            if not item.future.done() and not item.started and gone is not None and await gone():
                self.give_up(item, "client_gone", ClientGone())
        return item.future.result()

    def take_waiting(self) -> list[Pending]:
        waiting = []
        while not self.queue.empty():
            waiting.append(self.queue.get_nowait())
        return waiting

    def next_batch(self, pending: list[Pending]) -> tuple[list[Pending], list[Pending]]:
        """The oldest request and those waiting that can join it, within max_rows; the rest."""
        first, rows, batch, rest = pending[0].request, 0, [], []
        for item in pending:
            if not batch or (rows + item.request.rows <= self.engine.max_rows and self.joins(first, item.request)):
                batch.append(item)
                rows += item.request.rows
            else:
                rest.append(item)
        return batch, rest

    def joins(self, first: PoemRequest, other: PoemRequest) -> bool:
        """Whether `other` may share `first`'s sampler call: neither has a seed of its own, both
        run one length of program and filter alike, and, batching by plan, they share one."""
        if self.batching == "none" or first.seed is not None or other.seed is not None:
            return False
        if first.max_len != other.max_len or filters(first) != filters(other):
            return False
        return self.batching == "any" or first.plan_key() == other.plan_key()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        pending: list[Pending] = []
        while True:
            if not pending:
                pending.append(await self.queue.get())
            pending += self.take_waiting()
            now = time.perf_counter()
            for item in pending:  # the loop may come back late: the deadline holds here too
                if not item.future.done() and now > self.start_deadline(item):
                    self.give_up(item, "deadline", self.late(item))
            pending = [item for item in pending if not item.future.done()]  # given up: no row for them
            if not pending:
                continue
            batch, pending = self.next_batch(pending)
            for item in batch:
                item.started = True
                self.unstarted.discard(item)
            requests = [item.request for item in batch]
            seeds = [request.seed if request.seed is not None else secrets.randbelow(2**31) for request in requests]
            started = time.perf_counter()
            try:
                answers = await loop.run_in_executor(self.executor, self.engine.write, requests, seeds)
            except Exception as error:  # noqa: BLE001 -- handed to the waiting requests
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            self.record_call(batch, answers, started)
            for item, answer in zip(batch, answers):
                if not item.future.done():
                    item.future.set_result(answer)

    def record_call(self, batch: list[Pending], answers: list[Written], started: float) -> None:
        """The call's figures: the rate that sizes Retry-After, and the operator's signals."""
        seconds = time.perf_counter() - started
        self.calls += 1
        rows = answers[0].batch_rows
        self.rows_per_s = 0.8 * self.rows_per_s + 0.2 * rows / max(seconds, 1e-9)
        self.recent_calls.append(seconds)
        self.signals.sampler_call(rows, sum(item.request.rows for item in batch), seconds)
        for item in batch:
            self.signals.queue_wait.observe(started - item.arrived)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
