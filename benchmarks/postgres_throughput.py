"""Repayments per second on PostgreSQL, measured side by side in one run:

- ``bare``: the asyncpg loop a service writes by hand, two transactions per
  repayment over an ``asyncpg`` pool (the intent row with its first attempt row;
  then the fenced finish, ``UPDATE repayments ... WHERE key = $1 AND token = $2``
  with the attempt's answer), on the default asyncio loop and on uvloop.  The pool
  is used as it normally is, so every release sends asyncpg's reset query
  (``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``); one more row
  shows the same loop with that query switched off, to say what it costs.  Its
  tables come from the journal's own migration (same indexes and trigger);
  ``--bare-tables plain`` uses ``BARE_DDL`` instead (one index, no trigger).
- ``journal``: the same two writes through ``PostgresJournal`` (``create`` with
  the first attempt, then ``finish`` with the attempt's answer), one instance and
  two (two processes, each its own journal, sharing the total).
- ``router``: ``Router.repay`` on ``PostgresJournal`` with an instant channel, 1,
  2 and 4 instances (processes), with p50/p99 latency per repay, next to one
  router on ``SQLiteJournal`` (the latency PostgreSQL adds), and both routers
  again one repayment at a time (latency without queueing).

Every variant runs in its own process(es), with ``--concurrency`` repayments in
flight per instance, after a warm-up (pools filled, statements prepared).  Each
variant gets its own PostgreSQL schema, dropped at the end.  Besides rates and
latencies, the table shows the journal's operations per transaction and the CPU
per repayment on each side (the benchmark's processes; the PostgreSQL backends
serving their connections, read from /proc, so PostgreSQL must run on this host).

    python benchmarks/postgres_throughput.py [--repayments 5000] [--concurrency 64]
        [--dsn postgresql://postgres@127.0.0.1:5432/test] [--uvloop] [--json]

``--uvloop`` runs the journal and router variants on uvloop too (the bare loop is
always measured on both).  Goal of the PostgreSQL journal: >= 1.5x the bare loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
from _common import InstantChannel, write

import failover
from failover import ChannelRequest, ChannelResult, RepaymentStatus

DSN = os.environ.get("FAILOVER_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
CHANNEL = "instant"

# The columns and keys of the PostgreSQL journal's tables, for the bare loop when the
# journal is not importable or --bare-tables plain is asked (see make_schema()).
BARE_DDL = """
CREATE TABLE {s}.repayments (
    key text PRIMARY KEY,
    account text NOT NULL,
    amount numeric NOT NULL,
    currency text NOT NULL,
    due_at timestamptz,
    metadata text NOT NULL,
    preference text[],
    status text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    round integer NOT NULL,
    channel text,
    channel_reference text,
    code text,
    pending_reason text,
    pending_channel text,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    owner text,
    token bigint NOT NULL,
    lease_until timestamptz
);
CREATE SEQUENCE {s}.tokens;
CREATE INDEX ON {s}.repayments (created_at) WHERE status = 'pending';
CREATE TABLE {s}.attempts (
    key text NOT NULL REFERENCES {s}.repayments (key),
    number integer NOT NULL,
    round integer NOT NULL,
    channel text NOT NULL,
    reference text NOT NULL,
    outcome text,
    code text,
    detail text,
    resolution text,
    channel_reference text,
    started_at timestamptz NOT NULL,
    finished_at timestamptz,
    PRIMARY KEY (key, number)
);
"""

# The bare loop's statements: what a service writes by hand.  The owner, the fencing
# token (from a sequence) and the lease are written as the journal writes them, so the
# fenced finish means the same.
INSERT_REPAYMENT = """
INSERT INTO {s}.repayments (key, account, amount, currency, due_at, metadata, preference,
    status, round, pending_reason, created_at, updated_at, owner, token, lease_until)
VALUES ($1, $2, $3, $4, NULL, '{{}}', NULL, 'pending', 1, 'in_flight', now(), now(),
    $5, nextval('{s}.tokens'), now() + interval '30 seconds')
RETURNING token
"""
INSERT_ATTEMPT = """
INSERT INTO {s}.attempts (key, number, round, channel, reference, started_at)
VALUES ($1, 1, 1, $2, $3, now())
"""
FINISH_REPAYMENT = """
UPDATE {s}.repayments SET status = 'succeeded', channel = $3, channel_reference = $4,
    pending_reason = NULL, updated_at = now(), owner = NULL, lease_until = NULL
WHERE key = $1 AND token = $2
"""
FINISH_ATTEMPT = """
UPDATE {s}.attempts SET outcome = 'succeeded', channel_reference = $2, finished_at = now()
WHERE key = $1 AND number = 1
"""


def postgres_journal() -> Any:
    """``PostgresJournal``, or ``None`` while the library does not have it yet."""
    try:
        from failover.journal import PostgresJournal
    except ImportError:
        return None
    return PostgresJournal


def repayment(key: str) -> failover.Repayment:
    return failover.Repayment(key=key, account="acct-0001", amount=Decimal("10.00"),
                              currency="CNY")


def now() -> datetime:
    return datetime.now(UTC)


# ---- one instance: runs in its own process ------------------------------------------


@dataclass(frozen=True)
class Job:
    """What one instance (process) does."""

    kind: str  # bare | bare-noreset | journal | router | router-sqlite
    dsn: str
    schema: str
    prefix: str  # keys are f"{prefix}-{i}": unique per instance and variant
    repayments: int
    concurrency: int
    uvloop: bool
    sqlite_path: str = ""


@dataclass(frozen=True)
class Loop:
    """One instance's way to do a repayment, how to stop, and what to report."""

    one: Callable[[str], Awaitable[None]]
    close: Callable[[], Awaitable[None]]
    report: Callable[[], dict[str, float]] = dict


def batching(journal: Any) -> dict[str, float]:
    """Operations per committed transaction (the group commit's grouping)."""
    batches, operations = getattr(journal, "batches", 0), getattr(journal, "operations", 0)
    return {"batches": batches, "operations": operations}


class NoResetConnection(asyncpg.Connection):  # type: ignore[misc]
    """A pool connection released without asyncpg's reset query."""

    def get_reset_query(self) -> str:
        return ""


async def bare_loop(job: Job) -> Loop:
    """The hand-written loop."""
    s = job.schema
    insert_repayment, insert_attempt = INSERT_REPAYMENT.format(s=s), INSERT_ATTEMPT.format(s=s)
    finish_repayment, finish_attempt = FINISH_REPAYMENT.format(s=s), FINISH_ATTEMPT.format(s=s)
    pool = await asyncpg.create_pool(
        job.dsn, min_size=job.concurrency, max_size=job.concurrency,
        connection_class=NoResetConnection if job.kind == "bare-noreset" else asyncpg.Connection,
        server_settings={"application_name": f"bench:{job.prefix}"})
    channel = InstantChannel()
    owner = f"bare:{os.getpid()}"

    async def one(key: str) -> None:
        item = repayment(key)
        reference = f"ref-{key}"
        async with pool.acquire() as conn, conn.transaction():
            token = await conn.fetchval(insert_repayment, key, item.account, item.amount,
                                        item.currency, owner)
            await conn.execute(insert_attempt, key, CHANNEL, reference)
        result = await channel.submit(ChannelRequest(key, reference, item.account, item.amount,
                                                     item.currency))
        async with pool.acquire() as conn, conn.transaction():
            done = await conn.execute(finish_repayment, key, token, CHANNEL,
                                      result.channel_reference)
            if done != "UPDATE 1":  # fenced: another instance holds it now
                raise RuntimeError(f"lost the lease on {key}")
            await conn.execute(finish_attempt, key, result.channel_reference)

    return Loop(one, pool.close)


async def journal_loop(job: Job) -> Loop:
    """The same two writes through the journal API."""
    journal = postgres_journal()(job.dsn, schema=job.schema, instance=f"bench:{job.prefix}")
    await journal.open()

    async def one(key: str) -> None:
        reference = f"ref-{key}"
        _, new = await journal.create(repayment(key), None, now(),
                                      first_attempt=(CHANNEL, reference))
        assert new, key
        await journal.finish(key, 1, RepaymentStatus.SUCCEEDED, CHANNEL, reference, None,
                             now(), attempt=(1, ChannelResult.succeeded(reference)))

    return Loop(one, journal.close, lambda: batching(journal))


async def router_loop(job: Job) -> Loop:
    """The full router on an instant channel."""
    if job.kind == "router-sqlite":
        journal = failover.SQLiteJournal(job.sqlite_path)
    else:
        journal = postgres_journal()(job.dsn, schema=job.schema,
                                     instance=f"bench:{job.prefix}")
    router = failover.Router([InstantChannel()], journal)
    await router.open()

    async def one(key: str) -> None:
        result = await router.repay(repayment(key))
        assert result.status is RepaymentStatus.SUCCEEDED, result

    return Loop(one, router.close, lambda: batching(journal))


LOOPS = {"bare": bare_loop, "bare-noreset": bare_loop, "journal": journal_loop,
         "router": router_loop, "router-sqlite": router_loop}


def cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes have used so far."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:  # not Linux, or ended
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


async def backends(dsn: str, prefix: str) -> list[int]:
    """The server processes serving this instance's connections (PostgreSQL on this host)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE application_name"
                                " LIKE '%bench:' || $1", prefix)
    finally:
        await conn.close()
    return [row[0] for row in rows]


async def run_job(job: Job, barrier: Any) -> dict[str, Any]:
    loop = await LOOPS[job.kind](job)
    one = loop.one
    limit = asyncio.Semaphore(job.concurrency)
    latencies: list[float] = []

    async def timed(key: str) -> None:
        async with limit:
            start = time.perf_counter()
            await one(key)
            latencies.append(time.perf_counter() - start)

    # Warm-up: fills the pool, prepares the statements on every connection.
    await asyncio.gather(*(timed(f"{job.prefix}-w{i}") for i in range(job.concurrency * 2)))
    latencies.clear()
    before = loop.report()
    servers = await backends(job.dsn, job.prefix)
    await asyncio.to_thread(barrier.wait)  # every instance starts together
    start = time.monotonic()  # CLOCK_MONOTONIC: comparable between processes
    client_cpu, server_cpu = time.process_time(), cpu_s(servers)
    await asyncio.gather(*(timed(f"{job.prefix}-{i}") for i in range(job.repayments)))
    end = time.monotonic()
    client_cpu, server_cpu = time.process_time() - client_cpu, cpu_s(servers) - server_cpu
    after = loop.report()
    report: dict[str, float] = {name: after[name] - before[name]
                                for name in ("batches", "operations") if name in after}
    report.update(client_cpu_s=client_cpu, server_cpu_s=server_cpu)
    await loop.close()
    return {"start": start, "end": end, "latencies": latencies, "report": report}


def instance(job: Job, barrier: Any, results: Any) -> None:
    """Process entry point."""
    if job.uvloop:
        import uvloop
        uvloop.install()
    try:
        results.put(asyncio.run(run_job(job, barrier)))
    except BaseException as exc:
        barrier.abort()
        results.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


# ---- the coordinator ---------------------------------------------------------------


def percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


@dataclass(frozen=True)
class Variant:
    """One row of the table."""

    kind: str
    instances: int
    uvloop: bool
    concurrency: int
    repayments: int

    @property
    def loop(self) -> str:
        return "uvloop" if self.uvloop else "asyncio"


def run_variant(variant: Variant, args: argparse.Namespace, schema: str,
                sqlite_path: str = "") -> dict[str, Any]:
    """Run the variant's processes, sharing its repayments; return its figures."""
    context = mp.get_context("spawn")
    n = variant.instances
    barrier, results = context.Barrier(n), context.Queue()
    share = [variant.repayments // n + (i < variant.repayments % n) for i in range(n)]
    processes = [
        context.Process(target=instance, daemon=True, args=(
            Job(variant.kind, args.dsn, schema, f"{schema}-{i}", share[i], variant.concurrency,
                variant.uvloop, sqlite_path), barrier, results))
        for i in range(n)]
    for process in processes:
        process.start()
    outs = [results.get(timeout=args.timeout) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    errors = [out["error"] for out in outs if "error" in out]
    if errors:
        raise RuntimeError(f"{variant}: {errors[0]}")
    elapsed = max(o["end"] for o in outs) - min(o["start"] for o in outs)
    latencies = [x for o in outs for x in o["latencies"]]
    batches = sum(o["report"].get("batches", 0) for o in outs)
    operations = sum(o["report"].get("operations", 0) for o in outs)
    client_cpu = sum(o["report"]["client_cpu_s"] for o in outs)
    server_cpu = sum(o["report"]["server_cpu_s"] for o in outs)
    return {
        "kind": variant.kind, "loop": variant.loop, "instances": n,
        "in_flight": n * variant.concurrency, "repayments": variant.repayments,
        "seconds": elapsed, "per_s": variant.repayments / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * percentile(latencies, 99),
        "journal_ops_per_commit": operations / batches if batches else None,
        "client_cpu_us": 1e6 * client_cpu / variant.repayments,
        "server_cpu_us": 1e6 * server_cpu / variant.repayments,
    }


async def make_schema(dsn: str, schema: str, plain: bool = False) -> str:
    """Create ``schema``: through the journal's migration when it exists (the same
    tables, indexes, trigger and constraints the journal uses), else (or if ``plain``)
    from ``BARE_DDL``: the same columns and keys, one index, no trigger."""
    journal_class = postgres_journal()
    if not plain and journal_class is not None:
        await journal_class(dsn, schema=schema, migrate=True).migrate()
        return "journal migration"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(BARE_DDL.format(s=schema))
    finally:
        await conn.close()
    return "BARE_DDL"


async def drop_schemas(dsn: str, schemas: list[str]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for schema in schemas:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repayments", type=int, default=5000,
                        help="timed repayments per variant, shared by its instances")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="repayments in flight per instance")
    parser.add_argument("--dsn", default=DSN)
    parser.add_argument("--uvloop", action="store_true",
                        help="also run the journal and router variants on uvloop")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--parts", default="bare,journal,router",
                        help="comma-separated subset of bare, journal, router")
    parser.add_argument("--router-instances", default="1,2,4")
    parser.add_argument("--bare-tables", choices=["journal", "plain"], default="journal",
                        help="the bare loop's tables: the journal's own migration (default),"
                        " or BARE_DDL (no trigger, one index)")
    parser.add_argument("--latency-repayments", type=int, default=300,
                        help="repayments for the routers' latency at concurrency 1 (0: skip)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for one variant before giving up")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    have_journal = postgres_journal() is not None
    if not have_journal and parts - {"bare"}:
        print("failover.journal.PostgresJournal is not importable: measuring the bare loop only",
              file=sys.stderr)
        parts = {"bare"}

    loops = [False, True] if args.uvloop else [False]
    c, n = args.concurrency, args.repayments
    plan: list[Variant] = []
    if "bare" in parts:
        plan += [Variant("bare", 1, False, c, n), Variant("bare", 1, True, c, n),
                 Variant("bare-noreset", 1, True, c, n)]
    if "journal" in parts:
        plan += [Variant("journal", i, uv, c, n) for uv in loops for i in (1, 2)]
    if "router" in parts:
        plan += [Variant("router", i, uv, c, n) for uv in loops
                 for i in map(int, args.router_instances.split(","))]
        plan += [Variant("router-sqlite", 1, uv, c, n) for uv in loops]
        if args.latency_repayments:
            # One at a time: the latency a repayment pays, without queueing behind others.
            plan += [Variant(kind, 1, False, 1, args.latency_repayments)
                     for kind in ("router", "router-sqlite")]

    run_id = secrets.token_hex(3)
    schemas: list[str] = []
    rows: list[dict[str, Any]] = []
    tables = ""
    try:
        with tempfile.TemporaryDirectory() as folder:
            for number, variant in enumerate(plan):
                schema = f"bench_tp_{run_id}_{number}"
                sqlite_path = ""
                if variant.kind == "router-sqlite":
                    sqlite_path = str(Path(folder) / f"{number}.db")
                else:
                    schemas.append(schema)
                    plain = variant.kind.startswith("bare") and args.bare_tables == "plain"
                    made = asyncio.run(make_schema(args.dsn, schema, plain))
                    if variant.kind.startswith("bare"):
                        tables = made
                row = run_variant(variant, args, schema, sqlite_path)
                rows.append(row)
                if not args.json:
                    print(f"  {variant.kind:<14} {variant.loop:<8} x{variant.instances}"
                          f" c={variant.concurrency}: {row['per_s']:7.0f}/s", file=sys.stderr,
                          flush=True)
    finally:
        asyncio.run(drop_schemas(args.dsn, schemas))

    ratios = ratios_of(rows)
    figures = {"dsn": args.dsn, "concurrency_per_instance": args.concurrency,
               "repayments": args.repayments, "bare_tables": tables, "results": rows,
               "ratios": ratios}
    path = write("postgres_throughput", figures)
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"{os.cpu_count()} CPUs; each variant in its own process(es), after a warm-up")
    print_table(rows)
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    if tables:
        print(f"bare loop: tables from the {tables}; two transactions per repayment over an"
              " asyncpg pool, which sends its reset query on every release (bare-noreset:"
              " a pool whose connections skip it)")
    print("ops/commit: journal operations per committed transaction (group commit);"
          " client/server µs: CPU per repayment in the benchmark's processes / in the"
          " PostgreSQL backends serving their connections (not the WAL writer or others)")
    print("goal: journal (one instance) >= 1.5x the bare loop")
    print(f"wrote {path}")


def ratios_of(rows: list[dict[str, Any]]) -> dict[str, float]:
    top = max(row["in_flight"] // row["instances"] for row in rows)

    def rate(kind: str, instances: int, loop: str) -> float | None:
        for row in rows:
            if (row["kind"], row["instances"], row["loop"], row["in_flight"]) == \
                    (kind, instances, loop, instances * top):
                return float(row["per_s"])
        return None

    ratios: dict[str, float] = {}
    for loop in ("asyncio", "uvloop"):
        bare = rate("bare", 1, loop)
        for kind, instances in (("journal", 1), ("journal", 2), ("router", 1)):
            mine = rate(kind, instances, loop)
            if bare and mine:
                ratios[f"{kind} x{instances} / bare ({loop})"] = mine / bare
    sqlite, pg = rate("router-sqlite", 1, "asyncio"), rate("router", 1, "asyncio")
    if sqlite and pg:
        ratios["router x1 postgres / sqlite (asyncio)"] = pg / sqlite
    return ratios


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'variant':<14} {'loop':<8} {'instances':>9} {'in flight':>9} {'repayments':>10}"
          f" {'per s':>8} {'p50 ms':>8} {'p99 ms':>8} {'ops/commit':>10} {'client µs':>9}"
          f" {'server µs':>9}")
    for row in rows:
        ops = row["journal_ops_per_commit"]
        per_commit = "-" if ops is None else f"{ops:.1f}"
        print(f"{row['kind']:<14} {row['loop']:<8} {row['instances']:>9} {row['in_flight']:>9}"
              f" {row['repayments']:>10} {row['per_s']:>8.0f} {row['p50_ms']:>8.1f}"
              f" {row['p99_ms']:>8.1f} {per_commit:>10} {row['client_cpu_us']:>9.0f}"
              f" {row['server_cpu_us']:>9.0f}")
    sqlite = {(r["loop"], r["in_flight"]): r for r in rows if r["kind"] == "router-sqlite"}
    for row in rows:
        base = sqlite.get((row["loop"], row["in_flight"]))
        if row["kind"] == "router" and row["instances"] == 1 and base is not None:
            print(f"router latency added over SQLite ({row['loop']}, {row['in_flight']} in"
                  f" flight): p50 {row['p50_ms'] - base['p50_ms']:+.1f} ms, p99"
                  f" {row['p99_ms'] - base['p99_ms']:+.1f} ms")


if __name__ == "__main__":
    main()
