"""Do the PostgreSQL journal's reads use its indexes at scale?  Creates the journal's
schema (``PostgresJournal(..., migrate=True)``) in a throwaway schema, loads 1M
repayments (99% finished; 1% pending: leases expired, leases live, and released
ones with no owner), ANALYZE, then prints ``EXPLAIN (ANALYZE, BUFFERS)`` for:

- the sweep (``take_expired``: pending repayments whose lease expired),
- ``pending_keys()`` (all pending, oldest first; and of one reason),
- ``stats()`` (counts by status; the oldest pending repayment),
- ``load(key)`` (the repayment row and its attempts).

The statements are the journal's own: each method is run once on a connection that
records what it sends, and that SQL is explained with the same parameters (the
sweep, an UPDATE, inside a transaction that is rolled back).  Each is explained
twice: with its parameters' values (the custom plan of a statement's first
executions) and as the generic plan a prepared statement may switch to after five.
The counts of ``stats()`` are explained again after VACUUM (as autovacuum leaves a
table), and with sequential scans off (would the status index be faster?).  Besides
EXPLAIN's time, each statement is timed alone (best of three, from the client).

    python benchmarks/postgres_explain.py [--repayments 1000000] [--dsn DSN] [--json]

The schema is dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import sys
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
from _common import write

from failover import PendingReason

DSN = os.environ.get("FAILOVER_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def postgres_journal() -> Any:
    from failover.journal import PostgresJournal

    return PostgresJournal


async def load(conn: asyncpg.Connection, schema: str, count: int) -> dict[str, int]:
    """``count`` repayments with one attempt each, by INSERT ... SELECT generate_series.

    Every 100th is pending; of those, a third each: lease expired (a crashed owner),
    lease live (an owner at work), released (no owner, no lease).  The rest succeeded
    (one in ten failed).  Created over the last 30 days, oldest first by key.
    """
    r, a = f"{schema}.repayments", f"{schema}.attempts"
    await conn.execute("SET synchronous_commit = off")  # filling, not measuring
    async with conn.transaction():
        await conn.execute(f"""
            INSERT INTO {r} (key, account, amount, currency, due_at, metadata, preference,
                status, round, channel, channel_reference, code, pending_reason,
                pending_channel, created_at, updated_at, owner, token, lease_until)
            SELECT 'k' || lpad(i::text, 8, '0'), 'acct-' || (i % 5000), 10.00, 'CNY', NULL,
                '{{}}', NULL,
                CASE WHEN i % 100 = 0 THEN 'pending' WHEN i % 10 = 1 THEN 'failed'
                     ELSE 'succeeded' END,
                1,
                CASE WHEN i % 100 = 0 THEN NULL ELSE 'bank_card' END,
                CASE WHEN i % 100 = 0 OR i % 10 = 1 THEN NULL ELSE 'c-' || i END,
                CASE WHEN i % 100 <> 0 AND i % 10 = 1 THEN 'declined' END,
                CASE WHEN i % 100 = 0 THEN
                    CASE WHEN i % 700 = 0 THEN 'awaiting_channel' ELSE 'in_flight' END END,
                NULL,
                created, created + interval '2 seconds',
                CASE WHEN i % 100 = 0 AND i % 300 <> 200 THEN 'host:' || (i % 7) END,
                nextval('{schema}.tokens'),
                CASE WHEN i % 100 = 0 THEN
                    CASE i % 300 WHEN 0 THEN now() - interval '1 minute' * (1 + i % 50)
                                 WHEN 100 THEN now() + interval '30 seconds'
                                 ELSE NULL END END
            FROM generate_series(1, $1) AS i,
                 LATERAL (SELECT now() - interval '30 days' * (1 - i::float8 / $1))
                     AS t(created)
            """, count)
        await conn.execute(f"""
            INSERT INTO {a} (key, number, round, channel, reference, outcome, code, detail,
                resolution, channel_reference, started_at, finished_at)
            SELECT key, 1, 1, 'bank_card', 'ref-' || key,
                CASE status WHEN 'succeeded' THEN 'succeeded' WHEN 'failed' THEN 'declined'
                END,
                code, NULL, NULL, channel_reference, created_at,
                CASE WHEN status <> 'pending' THEN updated_at END
            FROM {r}
            """)
    await conn.execute("RESET synchronous_commit")
    return {row[0]: row[1] for row in await conn.fetch(
        f"SELECT CASE WHEN status <> 'pending' THEN status WHEN owner IS NULL THEN"
        f" 'pending, no owner' WHEN lease_until < now() THEN 'pending, lease expired'"
        f" ELSE 'pending, lease live' END, count(*) FROM {r} GROUP BY 1 ORDER BY 1")}


class Recorder:
    """A connection that records each statement the journal sends, then runs it."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.sent: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.conn, name)
        if name not in ("fetch", "fetchrow", "fetchval", "execute", "executemany"):
            return method

        async def record(sql: str, *args: Any, **kwargs: Any) -> Any:
            self.sent.append((sql, args))
            return await method(sql, *args, **kwargs)

        return record


async def journal_statements(dsn: str, schema: str, key: str
                             ) -> list[tuple[str, str, tuple[Any, ...]]]:
    """(name, sql, parameters) of the statements the journal sends for the reads
    benchmarked, captured by running each method once on a recording connection."""
    journal = postgres_journal()(dsn, schema=schema, instance="explain")
    await journal.open()
    conn = await asyncpg.connect(dsn)
    captured: list[tuple[str, str, tuple[Any, ...]]] = []
    try:
        async def capture(name: str, call: Any, rollback: bool = False) -> None:
            recorder = Recorder(conn)

            async def submit(apply: Any, settle: Any = None, key: Any = None,
                             **options: Any) -> Any:
                return await apply(recorder)

            journal._submit = submit  # the journal's own statements, on our connection
            transaction = conn.transaction()
            await transaction.start()
            try:
                await call()
            finally:
                await (transaction.rollback() if rollback else transaction.commit())
            for number, (sql, args) in enumerate(recorder.sent, 1):
                label = name if len(recorder.sent) == 1 else f"{name} ({number})"
                captured.append((label, sql, args))

        await capture("sweep: take_expired(100)", lambda: journal.take_expired(100),
                      rollback=True)
        await capture("pending_keys()", lambda: journal.pending_keys())
        await capture("pending_keys(awaiting_channel)",
                      lambda: journal.pending_keys(PendingReason.AWAITING_CHANNEL))
        await capture("stats()", lambda: journal.stats())
        await capture("load(key)", lambda: journal.load(key))
    finally:
        await conn.close()
        journal.__dict__.pop("_submit", None)  # the journal's own again
        await journal.close()
    return captured


def summary(plan: list[str]) -> dict[str, Any]:
    text = "\n".join(plan)
    indexes = sorted(set(re.findall(r"(?:Index Only Scan|Index Scan|Bitmap Index Scan)"
                                    r"(?: Backward)? using (\w+)", text)))
    seq = sorted(set(re.findall(r"Seq Scan on (\S+)", text)))
    execution = re.search(r"Execution Time: ([\d.]+) ms", text)
    heap = re.findall(r"Heap Fetches: (\d+)", text)
    return {"indexes": indexes, "seq_scans": seq,
            "execution_ms": float(execution.group(1)) if execution else None,
            "heap_fetches": sum(map(int, heap)) if heap else None}


def literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, int | float):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


async def best_ms(conn: asyncpg.Connection, sql: str, args: tuple[Any, ...],
                  settings: str = "") -> float:
    """The statement's own time, without EXPLAIN's per-row timing: best of three runs,
    each in a transaction rolled back."""
    times = []
    for _ in range(3):
        transaction = conn.transaction()
        await transaction.start()
        try:
            if settings:
                await conn.execute(settings)
            started = time.perf_counter()
            await conn.fetch(sql, *args)
            times.append(1000 * (time.perf_counter() - started))
        finally:
            await transaction.rollback()
    return min(times)


async def explain(conn: asyncpg.Connection, sql: str, args: tuple[Any, ...],
                  generic: bool, settings: str = "") -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) of ``sql`` with ``args``, in a transaction rolled back
    (the sweep writes).  ``generic``: the plan of a prepared statement that no longer
    looks at its parameters' values (``plan_cache_mode = force_generic_plan``)."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        if settings:
            await conn.execute(settings)
        if not generic or not args:
            rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *args)
        else:
            # EXECUTE takes no bind parameters: the values go in as typed literals.
            types = [f"pg_catalog.{t.name}" for t in (await conn.prepare(sql)).get_parameters()]
            await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            name = f"q{secrets.token_hex(4)}"
            await conn.execute(f"PREPARE {name} ({', '.join(types)}) AS {sql}")
            values = ", ".join(f"{literal(value)}::{kind}" for value, kind in zip(args, types,
                                                                                 strict=True))
            rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE {name}({values})")
            await conn.execute(f"DEALLOCATE {name}")
    finally:
        await transaction.rollback()
    return [row[0] for row in rows]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    schema = f"bench_ex_{secrets.token_hex(4)}"
    await postgres_journal()(args.dsn, schema=schema, migrate=True).migrate()
    conn = await asyncpg.connect(args.dsn)
    try:
        started = time.perf_counter()
        counts = await load(conn, schema, args.repayments)
        loaded_s = time.perf_counter() - started
        await conn.execute(f"ANALYZE {schema}.repayments, {schema}.attempts")
        say(args, f"loaded {args.repayments:,} repayments in {loaded_s:.1f} s: {counts}")
        key = f"k{args.repayments // 2 + 1:08d}"  # a finished one, mid-table
        statements = await journal_statements(args.dsn, schema, key)
        results = []
        stats = [s for s in statements if s[0].startswith("stats")]
        # (label suffix, statements, generic plans too, settings for the transaction)
        passes: list[tuple[str, list[tuple[str, str, tuple[Any, ...]]], bool, str]] = [
            ("", statements, True, ""),
            # What autovacuum does to a table this size soon after: sets the visibility
            # map, which lets an index-only scan skip the heap.
            (", after VACUUM", stats, False, "VACUUM"),
            # Would the (status, updated_at) index be faster for the counts?
            (", after VACUUM, seq scan off", stats[:1], False,
             "SET LOCAL enable_seqscan = off"),
        ]
        for suffix, chosen, generics, settings in passes:
            if settings == "VACUUM":
                await conn.execute(f"VACUUM {schema}.repayments, {schema}.attempts")
                settings = ""
            for name, sql, params in chosen:
                for generic in (False, True) if generics and params else (False,):
                    plan = await explain(conn, sql, params, generic, settings)
                    label = name + (", generic plan" if generic else "") + suffix
                    plain_ms = None if generic else await best_ms(conn, sql, params, settings)
                    results.append({"query": label, "sql": sql,
                                    "params": [str(p) for p in params], **summary(plan),
                                    "plain_ms": plain_ms, "plan": plan})
                    say(args, f"\n=== {label}\n{sql}\n  params: {params}\n" +
                        "\n".join(plan))
        return {"repayments": args.repayments, "counts": counts, "load_s": loaded_s,
                "results": results}
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.close()


def say(args: argparse.Namespace, text: str) -> None:
    if not args.json:
        print(text, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repayments", type=int, default=1_000_000)
    parser.add_argument("--dsn", default=DSN)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    figures = asyncio.run(run(args))
    figures["when"] = datetime.now(UTC).isoformat(timespec="seconds")
    path = write("postgres_explain", figures)
    if args.json:
        print(json.dumps(figures, indent=2, default=str))
        return
    print(f"\n{'query':<56} {'index(es) used':<34} {'seq scan':<10} {'explain ms':>10}"
          f" {'plain ms':>8}")
    for row in figures["results"]:
        plain = "-" if row["plain_ms"] is None else f"{row['plain_ms']:.2f}"
        print(f"{row['query']:<56} {', '.join(row['indexes']) or '-':<34}"
              f" {', '.join(t.split('.')[-1] for t in row['seq_scans']) or '-':<10}"
              f" {row['execution_ms']:>10.2f} {plain:>8}")
    print("explain ms: EXPLAIN ANALYZE's execution time (its per-row timing adds to it);"
          " plain ms: the statement alone, best of 3, from this client (a round trip"
          " included)")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
