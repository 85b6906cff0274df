"""Requests that arrive together, written in one sampler call: the engine behind `serve`.

A request (PoemRequest) asks for `num` poems. Requests that share everything the sampler
takes as one plan (begin text, form, acrostic, rules, sampling settings, drafts) are merged
into one `sample.write_poems` call, each poem keeping its own title, up to `max_rows` rows
(poems × drafts) a call. Every call is padded to one of a few row counts (row_buckets up to
max_rows), all compiled by `Engine.warm_up` before the first request, so that no request
pays for a compile. A request with its own seed runs alone, so that it gets the poems
`sample --seed` gives.
"""

import asyncio
import concurrent.futures
import dataclasses
import secrets
import time
from dataclasses import dataclass

from tangshi_jax import data, release, rules, sample
from tangshi_jax.errors import TangshiError
from tangshi_jax.request import PoemRequest

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
        model: release.Loaded,
        max_rows: int = 128,
        corpus_lines: set[str] | None = None,
        min_rows: int = SMALLEST_BUCKET,
    ):
        self.model = model
        self.max_rows = max_rows
        self.buckets = row_buckets(max_rows, min_rows)  # tests compile fewer with a larger min_rows
        self.corpus_lines = corpus_lines

    def check(self, request: PoemRequest) -> None:
        """Raise TangshiError if the model cannot write what the request asks (host-side, cheap)."""
        if request.rows > self.max_rows:
            raise TangshiError(
                f"num × candidates is {request.rows}, more than this server's batch of "
                f"{self.max_rows}; ask for fewer poems or drafts"
            )
        sample.plan_request(self.model.vocab, request, self.model.max_title)

    def write(self, requests: list[PoemRequest], seed: int) -> list[Written]:
        """One sampler call for requests that share a plan_key, padded to a compiled row count."""
        titles = [request.topic for request in requests for _ in range(request.num)]
        rows = sum(request.rows for request in requests)
        bucket = next(bucket for bucket in self.buckets if bucket >= rows)
        merged = dataclasses.replace(requests[0], title=None, keywords=None, num=len(titles), seed=seed)
        poems, scores = self.call_sampler(merged, titles=titles, rows=bucket)
        answers, start = [], 0
        for request in requests:
            kept = sample.in_script(poems[start : start + request.num], request.script)
            answers.append(Written(kept, scores[start : start + request.num], len(requests), bucket))
            start += request.num
        return answers

    def call_sampler(self, wanted: PoemRequest, titles: list[str | None], rows: int) -> tuple[list[str], list[float]]:
        return sample.write_poems(
            self.model.params,
            self.model.model_config,
            self.model.vocab,
            wanted,
            max_title=self.model.max_title,
            titles=titles,
            corpus_lines=self.corpus_lines,
            with_scores=True,
            rows=rows,
        )

    def warm_up(self) -> tuple[int, float]:
        """Compile every program a request can run: the sampler at each row count, with and
        without titles for a model that reads them. Returns (programs, seconds)."""
        started = time.perf_counter()
        hanzi = next(char for char in self.model.vocab if data.is_hanzi(char))
        titles = [None, hanzi] if self.model.max_title else [None]
        for bucket in self.buckets:
            for title in titles:
                self.call_sampler(PoemRequest(candidates=1, seed=0), titles=[title], rows=bucket)
        rules.opencc_converter("s2t").convert(hanzi)
        return len(self.buckets) * len(titles), time.perf_counter() - started


@dataclass
class Pending:
    request: PoemRequest
    future: asyncio.Future
    arrived: float


class Batcher:
    """One worker that takes every request waiting, merges those that share a plan, and runs
    the calls one after another in a thread, so that the event loop keeps taking requests."""

    def __init__(self, engine: Engine, merge: bool = True):
        self.engine, self.merge = engine, merge
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sampler")
        self.calls = 0

    async def submit(self, request: PoemRequest) -> Written:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(Pending(request, future, time.perf_counter()))
        return await future

    def take_waiting(self) -> list[Pending]:
        waiting = []
        while not self.queue.empty():
            waiting.append(self.queue.get_nowait())
        return waiting

    def next_batch(self, pending: list[Pending]) -> tuple[list[Pending], list[Pending]]:
        """The oldest request and those waiting that can join it, within max_rows; the rest."""
        first = pending[0].request
        key, rows, batch, rest = first.plan_key(), 0, [], []
        for item in pending:
            fits = rows + item.request.rows <= self.engine.max_rows
            joins = self.merge and fits and first.seed is None and item.request.seed is None
            if (not batch) or (joins and item.request.plan_key() == key):
                batch.append(item)
                rows += item.request.rows
            else:
                rest.append(item)
        return batch, rest

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        pending: list[Pending] = []
        while True:
            if not pending:
                pending.append(await self.queue.get())
            pending += self.take_waiting()
            batch, pending = self.next_batch(pending)
            requests = [item.request for item in batch]
            seed = requests[0].seed if requests[0].seed is not None else secrets.randbelow(2**31)
            try:
                answers = await loop.run_in_executor(self.executor, self.engine.write, requests, seed)
            except Exception as error:  # noqa: BLE001 -- handed to the waiting requests
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            self.calls += 1
            for item, answer in zip(batch, answers):
                if not item.future.done():  # a client that went away leaves a cancelled future
                    item.future.set_result(answer)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
