"""Repayments per second through SQLiteJournal (synchronous=FULL) at concurrency
1, 16 and 256, next to the hand-rolled stack that commits each journal write on
its own.  Instant channel, so the journal is what is measured.

    python benchmarks/durable_throughput.py [--dir DIR]

Targets on the 2-core reference machine: >= 5x the baseline at concurrency 256,
and >= 5,000 repayments/s.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import pybreaker
from _common import InstantChannel, write
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

import failover
from failover import ChannelRequest, ChannelUnavailable

SIZES = {1: 400, 16: 3000, 256: 10000}


def repayments(n: int) -> list[failover.Repayment]:
    return [failover.Repayment(key=f"k{i}", account="acct-0001", amount=Decimal("10.00"),
                               currency="CNY") for i in range(n)]


async def run_router(path: Path, items: list[failover.Repayment], concurrency: int) -> float:
    journal = failover.SQLiteJournal(path)
    async with failover.Router([InstantChannel()], journal) as router:
        limit = asyncio.Semaphore(concurrency)

        async def one(repayment: failover.Repayment) -> None:
            async with limit:
                await router.repay(repayment)

        start = time.perf_counter()
        await asyncio.gather(*(one(r) for r in items))
        return time.perf_counter() - start


class HandRolledJournal:
    """What a service writes without group commit: each write is its own transaction."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("CREATE TABLE IF NOT EXISTS intents (key TEXT PRIMARY KEY, amount TEXT,"
                          " status TEXT)")
        self.conn.execute("CREATE TABLE IF NOT EXISTS attempts (key TEXT, n INT, outcome TEXT)")
        self.lock = asyncio.Lock()

    async def write(self, sql: str, args: tuple[object, ...]) -> None:
        async with self.lock:  # one connection: writes take turns, each commits (fsync)
            await asyncio.to_thread(self.conn.execute, sql, args)


async def run_hand_rolled(path: Path, items: list[failover.Repayment], concurrency: int
                          ) -> float:
    journal = HandRolledJournal(path)
    channel = InstantChannel()
    breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)
    limit = asyncio.Semaphore(concurrency)

    async def one(repayment: failover.Repayment) -> None:
        async with limit:
            request = ChannelRequest(repayment.key, f"ref-{repayment.key}", repayment.account,
                                     repayment.amount, repayment.currency)
            await journal.write("INSERT INTO intents VALUES (?, ?, 'pending')",
                                (repayment.key, str(repayment.amount)))
            retrying = AsyncRetrying(
                stop=stop_after_attempt(3), wait=wait_exponential(multiplier=0.1, max=2),
                retry=retry_if_exception_type(ChannelUnavailable), reraise=True,
            )
            async for attempt in retrying:
                with attempt, breaker.calling():
                    await journal.write("INSERT INTO attempts VALUES (?, 1, NULL)",
                                        (repayment.key,))
                    result = await channel.submit(request)
                    await journal.write("UPDATE attempts SET outcome = ? WHERE key = ?",
                                        (result.outcome.value, repayment.key))
            await journal.write("UPDATE intents SET status = 'succeeded' WHERE key = ?",
                                (repayment.key,))

    start = time.perf_counter()
    await asyncio.gather(*(one(r) for r in items))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the journal files go (default: a temporary folder)")
    args = parser.parse_args()
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        print(f"journal files in {folder}; synchronous=FULL")
        print(f"{'concurrency':>11} {'repayments':>10} {'router/s':>10} {'baseline/s':>11}"
              f" {'ratio':>6}")
        for concurrency, n in SIZES.items():
            items = repayments(n)
            router_s = asyncio.run(run_router(Path(folder) / f"r{concurrency}.db", items,
                                              concurrency))
            base_n = min(n, 2000)
            base_s = asyncio.run(run_hand_rolled(Path(folder) / f"b{concurrency}.db",
                                                 items[:base_n], concurrency))
            rate, base_rate = n / router_s, base_n / base_s
            figures[str(concurrency)] = {"router_per_s": rate, "baseline_per_s": base_rate,
                                         "ratio": rate / base_rate}
            print(f"{concurrency:>11} {n:>10} {rate:>10.0f} {base_rate:>11.0f}"
                  f" {rate / base_rate:>5.1f}x")
    print("targets: >= 5x the baseline at concurrency 256, >= 5,000 repayments/s")
    print(f"wrote {write('durable_throughput', {'results': figures})}")


if __name__ == "__main__":
    main()
