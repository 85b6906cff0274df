"""A bounded load test of `serve` on 127.0.0.1: the same mix of requests, batched in each way.

    python -m tangshi_jax.serve --load-test [--requests 200] [--clients 50]

Each client is a thread with one kept-alive connection that sends requests one after
another until `requests` have been sent in all, the threads in a process of their own (so
that 1,500 clients do not take the server's interpreter lock); the requests cycle through the
kinds in BODIES, which differ in form, begin text, acrostic, rules and sampling settings.
Reports the requests refused by the server's bounds (503 with Retry-After; a refused client
does not retry), any other failure, p50, p99 and the longest latency of the requests
answered, poems/s, the sampler calls made and the server's memory after the run.
"""

import http.client
import itertools
import json
import multiprocessing
import os
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from urllib.parse import urlsplit

# Requests as different as users send (each the best of --drafts drafts), in characters that
# the README's models and the tests' small corpus both know.
BODIES = [
    {"num": 1},
    {"num": 1, "form": "qijue", "rhyme": True, "tones": True},
    {"num": 1, "begin": "日", "temperature": 1.0},
    {"num": 1, "form": "wulv", "rhyme": True, "begin": "山"},
    {"num": 1, "acrostic": "春花秋月", "rhyme": True},
    {"num": 2, "top_k": 40, "top_p": 0.9, "temperature": 1.2},
    {"num": 1, "couplet": "春花秋月何时了"},
]
TIMEOUT_S = 120


def bodies_with(drafts: int, max_poems: int = 2) -> list[dict]:
    """BODIES with `drafts` candidates each, and at most max_poems poems (the server's cap)."""
    return [{**body, "num": min(body["num"], max_poems), "candidates": drafts} for body in BODIES]


def fire(url: str, requests: int, clients: int, bodies=BODIES) -> tuple[list[dict], float]:
    """Send the requests; returns one record per request and the wall time."""
    address = urlsplit(url)
    numbers = itertools.count()
    lock = threading.Lock()

    def client(_):
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=TIMEOUT_S)
        records = []
        while True:
            with lock:
                index = next(numbers)
            if index >= requests:
                break
            body = json.dumps(bodies[index % len(bodies)]).encode()
            try:
                if connection.sock is None:
                    connection.connect()  # a request's time starts when it is sent, not at the connect
            except OSError:
                pass  # the request below meets the same fault and records it
            started = time.perf_counter()
            try:
                connection.request("POST", "/api/poems", body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                answer = json.loads(response.read())
                records.append(
                    {
                        "status": response.status,
                        "seconds": time.perf_counter() - started,
                        "poems": len(answer.get("poems", [])),
                        "batch": answer.get("batch", {}),
                        "retry_after": response.getheader("Retry-After"),
                    }
                )
            except (OSError, http.client.HTTPException, ValueError) as error:
                records.append(
                    {
                        "status": None,
                        "seconds": time.perf_counter() - started,
                        "poems": 0,
                        "error": type(error).__name__,
                    }
                )
                connection.close()
                connection = http.client.HTTPConnection(address.hostname, address.port, timeout=TIMEOUT_S)
        connection.close()
        return records

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        records = [record for records in pool.map(client, range(clients)) for record in records]
    return records, time.perf_counter() - started


def fire_apart(url: str, requests: int, clients: int, bodies=BODIES) -> tuple[list[dict], float]:
    """`fire` in a process of its own."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fire, url, requests, clients, bodies).result()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def rss_mb() -> float | None:
    """This process's resident memory now (Linux), in MB; None elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def summarise(name: str, records: list[dict], seconds: float, calls: int) -> dict:
    ok = [record for record in records if record["status"] == 200]
    refused = [record for record in records if record["status"] == 503 and record.get("retry_after")]
    latencies = [record["seconds"] for record in ok]
    poems = sum(record["poems"] for record in ok)
    return {
        "mode": name,
        "requests": len(records),
        "refused": len(refused),
        "failed": len(records) - len(ok) - len(refused),
        "p50_s": statistics.median(latencies) if latencies else None,
        "p99_s": percentile(latencies, 0.99) if latencies else None,
        "max_s": max(latencies) if latencies else None,
        "poems_per_s": poems / seconds,
        "wall_s": seconds,
        "sampler_calls": calls,
        "requests_per_call": len(ok) / calls if calls else None,
        "rss_mb": rss_mb(),
    }


def format_results(results: list[dict]) -> str:
    shown = lambda body: json.dumps(
        {name: value for name, value in body.items() if name != "candidates"}, ensure_ascii=False
    )
    kinds = ", ".join(shown(body) for body in results[0].get("bodies", BODIES))
    bounds = results[0].get("bounds", "")
    lines = [
        f"requests cycle through {kinds}, each of {results[0]['drafts']} drafts" + (f"; {bounds}" if bounds else ""),
        "",
        "| mode | requests | refused (503) | failed | p50 | p99 | longest | poems/s | sampler calls | "
        "requests a call | memory after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results:
        seconds = lambda value: "–" if value is None else f"{value * 1000:,.0f} ms"
        per_call = "–" if row["requests_per_call"] is None else f"{row['requests_per_call']:.1f}"
        memory = "–" if row["rss_mb"] is None else f"{row['rss_mb']:,.0f} MB"
        lines.append(
            f"| {row['mode']} | {row['requests']} | {row['refused']} | {row['failed']} | {seconds(row['p50_s'])} | "
            f"{seconds(row['p99_s'])} | {seconds(row['max_s'])} | {row['poems_per_s']:.1f} | "
            f"{row['sampler_calls']} | {per_call} | {memory} |"
        )
    return "\n".join(lines)
