"""Does the journal slow down as it fills?  Latency and throughput through SQLiteJournal
with 10k, 100k and 1M repayments already journaled; recovery time for 10k and 100k
unfinished repayments; the process's memory.

    python benchmarks/growth.py [--sizes 10000 100000 1000000] [--recover 10000 100000]

Targets: latency and throughput flat within 20% from 10k to 1M; recovery >= 10,000
repayments/s with instant queries.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sqlite3
import tempfile
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from _common import InstantChannel, write

import failover
from failover import ChannelRequest, ChannelResult


class CollectedChannel(InstantChannel):
    """Instant; its queries say the request was collected (the crash came after the call)."""

    async def query(self, request: ChannelRequest) -> ChannelResult:
        return ChannelResult.succeeded(f"q-{request.reference}")


def prefill(path: Path, count: int, unfinished: bool) -> None:
    """Journal ``count`` repayments directly in SQL: finished ones, or ones a crash left
    in flight with an attempt "sent"."""
    asyncio.run(_create(path))
    now = datetime.now(UTC).isoformat()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA synchronous=OFF")  # filling, not measuring
    status = "pending" if unfinished else "succeeded"
    reason = "in_flight" if unfinished else None
    batch = 50_000
    for start in range(0, count, batch):
        keys = [f"old-{i:08d}" for i in range(start, min(count, start + batch))]
        conn.executemany(
            "INSERT INTO repayments (key, account, amount, currency, due_at, metadata,"
            " preference, status, round, channel, channel_reference, code, pending_reason,"
            " pending_channel, created_at, updated_at) VALUES"
            " (?, 'acct-0001', '10.00', 'CNY', NULL, '{}', NULL, ?, 1, ?, ?, NULL, ?, NULL, ?, ?)",
            [(k, status, None if unfinished else "instant", None if unfinished else f"c-{k}",
              reason, now, now) for k in keys])
        conn.executemany(
            "INSERT INTO attempts (key, number, round, channel, reference, outcome, code,"
            " detail, resolution, channel_reference, started_at, finished_at) VALUES"
            " (?, 1, 1, 'instant', ?, ?, NULL, NULL, NULL, ?, ?, ?)",
            [(k, failover.make_reference(k, 1, "instant"),
              None if unfinished else "succeeded", None if unfinished else f"c-{k}",
              now, None if unfinished else now) for k in keys])
        conn.commit()
    conn.close()


async def _create(path: Path) -> None:
    journal = failover.SQLiteJournal(path)
    await journal.open()
    await journal.close()


async def measure_traffic(path: Path, count: int, concurrency: int) -> tuple[float, float, float]:
    """(repayments/s, p50 ms, p99 ms) for ``count`` new repayments at ``concurrency``."""
    latencies: list[float] = []
    async with failover.Router([InstantChannel()], failover.SQLiteJournal(path)) as router:
        limit = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with limit:
                started = time.perf_counter()
                await router.repay(failover.Repayment(
                    key=f"new-{concurrency}-{i}", account="acct-0001",
                    amount=Decimal("10.00"), currency="CNY"))
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(count)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return (count / elapsed, 1000 * latencies[len(latencies) // 2],
            1000 * latencies[int(0.99 * (len(latencies) - 1))])


async def measure_recovery(path: Path, count: int) -> float:
    """Seconds from open until every unfinished repayment is recovered."""
    router = failover.Router([CollectedChannel()], failover.SQLiteJournal(path),
                             recovery_concurrency=256)
    started = time.perf_counter()
    async with router:
        await router.wait_recovered()
        elapsed = time.perf_counter() - started
        stats = await router._journal.stats()
    assert stats.by_status[failover.RepaymentStatus.PENDING] == 0, stats
    return elapsed


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--recover", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repayments", type=int, default=5000,
                        help="new repayments measured per size (default 5000)")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    figures: dict[str, object] = {"growth": {}, "recovery": {}}
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        print(f"{'journaled':>10} {'c=256 /s':>9} {'c=16 p50 ms':>12} {'c=16 p99 ms':>12}"
              f" {'file MB':>8}")
        for size in args.sizes:
            path = Path(folder) / f"grown-{size}.db"
            prefill(path, size, unfinished=False)
            rate, _, _ = asyncio.run(measure_traffic(path, args.repayments, 256))
            _, p50, p99 = asyncio.run(measure_traffic(path, args.repayments // 5, 16))
            size_mb = path.stat().st_size / 2**20
            figures["growth"][str(size)] = {  # type: ignore[index]
                "per_s_c256": rate, "p50_ms_c16": p50, "p99_ms_c16": p99, "file_mb": size_mb}
            print(f"{size:>10,} {rate:>9.0f} {p50:>12.2f} {p99:>12.2f} {size_mb:>8.0f}")
        print()
        print(f"{'unfinished':>10} {'seconds':>8} {'recovered/s':>12}")
        for size in args.recover:
            path = Path(folder) / f"crashed-{size}.db"
            prefill(path, size, unfinished=True)
            seconds = asyncio.run(measure_recovery(path, size))
            figures["recovery"][str(size)] = {  # type: ignore[index]
                "seconds": seconds, "per_s": size / seconds}
            print(f"{size:>10,} {seconds:>8.2f} {size / seconds:>12.0f}")
    figures["max_rss_mb"] = rss_mb()
    print(f"\nprocess peak RSS: {figures['max_rss_mb']:.0f} MB")
    print("targets: flat within 20% from the smallest to the largest journal;"
          " recovery >= 10,000/s")
    print(f"wrote {write('growth', figures)}")


if __name__ == "__main__":
    main()
