"""Load the repayment service over HTTP and check what it answered.

    python examples/loadtest.py --url http://127.0.0.1:8000 --repayments 5000 --concurrency 32

Sends ``--repayments`` new repayments (fresh keys each run), at most ``--concurrency``
requests in flight.  A share of the keys (``--repeat-share``, default 0.2) is sent twice
at the same moment, as a client that retried too early would, so the two copies
usually reach two workers.  Then it prints requests/s, p50/p99 latency and the counts
of HTTP and repayment statuses, and checks:

- every request was answered 200 (settled) or 202 (pending);
- both copies of a repeated key got the same result (status, channel, channel_reference);
- ``GET /repayments/{key}`` agrees with every settled answer.

It exits 1 if any check fails, 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import random
import secrets
import ssl
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import httpx

if importlib.util.find_spec("sniffio") is None:
    # httpcore imports sniffio under every lock it takes; Python does not remember a
    # failed import, so each one scans sys.path again (a third of this client's CPU).
    # None in sys.modules fails the import at once.
    sys.modules["sniffio"] = None  # type: ignore[assignment]

SETTLED = ("succeeded", "failed")


@dataclass(frozen=True, slots=True)
class Answer:
    """One request and what came back (``http_status`` 0: no answer at all)."""

    key: str
    http_status: int
    latency_s: float
    body: dict[str, Any]
    worker: str | None = None
    error: str | None = None

    @property
    def result(self) -> tuple[Any, ...]:
        """What two answers for one key must agree on."""
        return (self.body.get("status"), self.body.get("channel"),
                self.body.get("channel_reference"))


@dataclass(slots=True)
class Report:
    repayments: int
    repeated: list[str]
    answers: list[Answer] = field(default_factory=list)
    reads: dict[str, Answer] = field(default_factory=dict)
    connections: Counter[str] = field(default_factory=Counter)
    """Connections per worker."""
    elapsed_s: float = 0.0

    def by_key(self) -> dict[str, list[Answer]]:
        keys: dict[str, list[Answer]] = {}
        for answer in self.answers:
            keys.setdefault(answer.key, []).append(answer)
        return keys

    def crossed(self) -> list[str]:
        """The repeated keys whose two copies two different workers answered."""
        keys = self.by_key()
        return [key for key in self.repeated if len({a.worker for a in keys[key]}) > 1]

    def problems(self) -> list[str]:
        """Every failed check, one line each (empty: all good)."""
        found = [f"{a.key}: no good answer (HTTP {a.http_status}, {a.error or a.body})"
                 for a in self.answers if a.http_status not in (200, 202)]
        keys = self.by_key()
        for key in self.repeated:
            first, second = keys[key]
            if first.result != second.result:
                found.append(f"{key}: the two copies differ: {first.result} != {second.result}")
        for key, answers in keys.items():
            read = self.reads.get(key)
            if read is None or read.http_status not in (200, 202):
                found.append(f"{key}: GET answered HTTP {read and read.http_status}")
                continue
            for answer in answers:
                if answer.body.get("status") in SETTLED and answer.result != read.result:
                    found.append(f"{key}: GET says {read.result}, POST said {answer.result}")
        return found

    def lines(self) -> list[str]:
        latencies = sorted(a.latency_s for a in self.answers)
        p50, p99 = (statistics.quantiles(latencies, n=100, method="inclusive")[i]
                    for i in (49, 98)) if len(latencies) > 1 else (latencies[0],) * 2
        keys = self.by_key()
        identical = sum(1 for key in self.repeated if len({a.result for a in keys[key]}) == 1
                        and all(a.http_status in (200, 202) for a in keys[key]))
        crossed = len(self.crossed())
        http = Counter(a.http_status for a in self.answers)
        statuses = Counter(a.body.get("status", "-") for a in self.answers)
        reads = Counter(a.http_status for a in self.reads.values())
        return [
            f"requests     {len(self.answers)} ({self.repayments} repayments,"
            f" {len(self.repeated)} of them sent twice at once) in {self.elapsed_s:.2f} s",
            f"throughput   {len(self.answers) / self.elapsed_s:.0f} requests/s",
            f"latency      p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms,"
            f" max {latencies[-1] * 1000:.1f} ms",
            "HTTP         " + counts(http),
            "repayments   " + counts(statuses),
            f"connections  {sum(self.connections.values())} over {len(self.connections)}"
            f" worker{'' if len(self.connections) == 1 else 's'}"
            f" ({', '.join(map(str, sorted(self.connections.values())))})",
            f"repeated     {identical}/{len(self.repeated)} identical,"
            f" {crossed} answered by two different workers",
            "GET          " + counts(reads),
        ]


def counts(counter: Counter[Any]) -> str:
    return ", ".join(f"{value}: {n}" for value, n in sorted(counter.items(), key=str))


def plan(repayments: int, repeat_share: float, seed: int | None) -> tuple[
        list[dict[str, Any]], list[str]]:
    """The request bodies in sending order, a repeated key's two copies side by side."""
    rng = random.Random(seed)
    run = secrets.token_hex(4)  # fresh keys every run: the journal keeps the old ones
    bodies: list[dict[str, Any]] = []
    repeated: list[str] = []
    twice = set(rng.sample(range(repayments), round(repeat_share * repayments)))
    for i in range(repayments):
        body = {"key": f"lt-{run}/loan-{i}/instalment-1",
                "account": f"6222{rng.randrange(10**12):012d}",
                "amount": str(Decimal(rng.randrange(10_000, 500_000)).scaleb(-2)),
                "currency": "CNY"}
        bodies.append(body)
        if i in twice:
            bodies.append(body)
            repeated.append(body["key"])
    return bodies, repeated


async def send(client: httpx.AsyncClient, method: str, url: str, key: str,
               body: dict[str, Any] | None = None) -> Answer:
    started = time.perf_counter()
    try:
        response = await client.request(method, url, json=body)
    except httpx.HTTPError as exc:
        return Answer(key, 0, time.perf_counter() - started, {}, error=repr(exc))
    try:
        data = response.json()
    except ValueError:
        data = {"text": response.text[:200]}
    return Answer(key, response.status_code, time.perf_counter() - started, data,
                  response.headers.get("x-worker"))


async def connect(url: str, concurrency: int, workers: int | None, timeout_s: float
                  ) -> list[tuple[str, httpx.AsyncClient]]:
    """``concurrency`` clients of one kept-alive connection each, with the worker that
    accepted it (the service's ``X-Worker`` header).

    Each sender task has its own client: one client shared by 32 tasks costs about four
    times the CPU per request in httpx's pool, and the client, not the service, becomes
    what is measured.  uvicorn's workers share one listening socket and whichever wakes
    first accepts, so most connections can land on one worker; with ``workers``,
    connections are opened in bursts until they are spread evenly over that many (a
    burst spreads; connections opened one by one mostly go to the same worker), as a
    load balancer in front of the instances would spread them."""
    share = -(-concurrency // workers) if workers else concurrency
    tls = ssl.create_default_context()  # built once: each client would load the CA file
    kept: list[tuple[str, httpx.AsyncClient]] = []
    per_worker: Counter[str] = Counter()
    seen: set[str] = set()
    try:
        for burst in range(30):
            clients = [httpx.AsyncClient(base_url=url, timeout=timeout_s, verify=tls,
                                         limits=httpx.Limits(max_connections=1))
                       for _ in range(concurrency)]
            answers = await asyncio.gather(*(client.get("/healthz") for client in clients),
                                           return_exceptions=True)
            workers_of = [a.headers.get("x-worker", "?") if isinstance(a, httpx.Response)
                          and a.status_code == 200 else None for a in answers]
            seen.update(w for w in workers_of if w is not None)
            # Take any worker once spreading looks hopeless: after 10 bursts if fewer
            # workers than expected ever answered (the service may have fewer), or 20.
            strict = burst < (20 if len(seen) >= (workers or 1) else 10)
            for client, worker in zip(clients, workers_of, strict=True):
                if worker is not None and len(kept) < concurrency \
                        and (per_worker[worker] < share or not strict):
                    kept.append((worker, client))
                    per_worker[worker] += 1
                else:
                    await client.aclose()
            if len(kept) == concurrency:
                return kept
            if not kept:
                failure = next((a for a in answers if isinstance(a, BaseException)), answers[0])
                raise httpx.ConnectError(f"{url}/healthz: no answer 200 ({failure!r})")
        raise httpx.ConnectError(f"{url}/healthz: {len(kept)} of {concurrency} connections")
    except BaseException:
        for _, client in kept:
            await client.aclose()
        raise


async def run(url: str, *, repayments: int, concurrency: int = 32,
              repeat_share: float = 0.2, seed: int | None = None,
              timeout_s: float = 60.0, workers: int | None = None) -> Report:
    """Send the load, then read every key back; the checks are ``Report.problems()``."""
    bodies, repeated = plan(repayments, repeat_share, seed)
    report = Report(repayments, repeated)
    pending = list(reversed(bodies))  # popped from the end: in sending order
    clients = await connect(url, concurrency, workers, timeout_s)
    report.connections = Counter(worker for worker, _ in clients)

    async def post(client: httpx.AsyncClient) -> None:
        while pending:
            body = pending.pop()
            report.answers.append(await send(client, "POST", "/repayments", body["key"], body))

    async def get(client: httpx.AsyncClient, keys: list[str]) -> None:
        while keys:
            key = keys.pop()
            report.reads[key] = await send(client, "GET",
                                           f"/repayments/{quote(key, safe='/')}", key)

    try:
        started = time.perf_counter()
        await asyncio.gather(*(post(client) for _, client in clients))
        report.elapsed_s = time.perf_counter() - started
        keys = list(report.by_key())
        await asyncio.gather(*(get(client, keys) for _, client in clients))
    finally:
        for _, client in clients:
            await client.aclose()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--repayments", type=int, default=2000,
                        help="new repayments (keys) to send (default 2000)")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="requests in flight at most (default 32)")
    parser.add_argument("--repeat-share", type=float, default=0.2,
                        help="share of keys sent twice at once (default 0.2)")
    parser.add_argument("--seed", type=int, default=None, help="for the amounts and accounts")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds one request may take (above the config's deadline_s)")
    parser.add_argument("--workers", type=int, default=None,
                        help="spread the connections evenly over this many service workers")
    parser.add_argument("--uvloop", action="store_true",
                        help="run the client on uvloop (less client CPU on a small machine)")
    args = parser.parse_args(argv)
    if args.repayments < 1 or args.concurrency < 1 or not 0 <= args.repeat_share <= 1:
        parser.error("--repayments and --concurrency must be positive,"
                     " --repeat-share within [0, 1]")
    runner = asyncio.run
    if args.uvloop:
        import uvloop

        runner = uvloop.run
    try:
        report = runner(run(args.url, repayments=args.repayments,
                            concurrency=args.concurrency, repeat_share=args.repeat_share,
                            seed=args.seed, timeout_s=args.timeout, workers=args.workers))
    except httpx.HTTPError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    print("\n".join(report.lines()))
    problems = report.problems()
    for problem in problems[:20]:
        print("PROBLEM", problem)
    if len(problems) > 20:
        print(f"... and {len(problems) - 20} more")
    print("checks       " + ("OK" if not problems else f"FAILED ({len(problems)})"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
