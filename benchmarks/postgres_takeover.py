"""How long after a SIGKILL another instance finishes what the dead one held.

Process A (a ``Router`` on ``PostgresJournal`` with lease ``L`` and sweep period
``S``) starts ``N`` repayments at once through a slow channel and is killed with
SIGKILL half-way through them; process B (same DSN and schema, same settings) is
already running and takes over once A's leases expire.  Measured from the kill:
when B owned every repayment A held (expected within ``L + S``), and when every
one of them was ``SUCCEEDED``: those the channel had collected need a status query;
the others wait ``settle_s`` from the takeover before a ``NOT_FOUND`` counts, then
a new call (bound ``L + S + settle_s`` + the slowest call).  B drives what it took
``recovery_concurrency`` at a time (``--recovery-concurrency``, default the
Router's 16).

The channel is a table in PostgreSQL (an in-memory ledger in B could not see what
A collected): ``submit`` records the collection keyed on the reference, so a
second submit with the same reference collects nothing (an idempotent channel),
and ``query`` answers from the table.  Each call takes a delay drawn from the
reference (0.2 to 1.8 times ``--delay``) and collects at a point inside it also
drawn from the reference, so at the kill some calls in the air have collected
and some have not.  The ledger is then checked: every repayment collected once.

    python benchmarks/postgres_takeover.py [--settings 2:0.5,5:1] [--repayments 200]
        [--delay 0.5] [--recovery-concurrency 16] [--dsn DSN] [--json] [--keep]

Each setting gets its own schema, dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from decimal import Decimal
from typing import Any

import asyncpg
from _common import write

import failover
from failover import ChannelRequest, ChannelResult

DSN = os.environ.get("FAILOVER_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")

LEDGER = """
CREATE TABLE {s}.bench_ledger (
    reference text PRIMARY KEY,
    key text NOT NULL,
    collected_by text NOT NULL,
    collected_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    submits integer NOT NULL DEFAULT 1
)
"""


def fraction(reference: str, salt: str) -> float:
    """A number in [0, 1) fixed by the reference: the same call takes the same time in A
    and in B."""
    digest = hashlib.blake2b(f"{salt}:{reference}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class LedgerChannel:
    """A slow idempotent channel whose ledger is a PostgreSQL table shared by A and B."""

    name = "ledger"
    idempotent = True

    def __init__(self, dsn: str, schema: str, process: str, delay_s: float) -> None:
        self.dsn, self.schema, self.process, self.delay_s = dsn, schema, process, delay_s
        self.pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        self.pool = await asyncpg.create_pool(self.dsn, min_size=2, max_size=10)

    async def stop(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    async def submit(self, request: ChannelRequest) -> ChannelResult:
        assert self.pool is not None
        delay = self.delay_s * (0.2 + 1.6 * fraction(request.reference, "delay"))
        collect_at = delay * (0.1 + 0.8 * fraction(request.reference, "collect"))
        await asyncio.sleep(collect_at)
        await self.pool.execute(
            f"INSERT INTO {self.schema}.bench_ledger (reference, key, collected_by)"
            " VALUES ($1, $2, $3) ON CONFLICT (reference) DO UPDATE"
            " SET submits = bench_ledger.submits + 1",
            request.reference, request.repayment_key, self.process)
        await asyncio.sleep(delay - collect_at)
        return ChannelResult.succeeded(f"c-{request.reference}")

    async def query(self, request: ChannelRequest) -> ChannelResult:
        assert self.pool is not None
        found = await self.pool.fetchval(
            f"SELECT reference FROM {self.schema}.bench_ledger WHERE reference = $1",
            request.reference)
        return ChannelResult.not_found() if found is None else ChannelResult.succeeded(
            f"c-{found}")


# ---- the two service processes --------------------------------------------------------


def channel_config(delay_s: float) -> failover.RouterConfig:
    """The channel's timeout covers its slowest call (1.8x the delay); a ``NOT_FOUND``
    counts as proof once a call's whole time has passed since the submit (``settle_s``),
    since this channel collects within the call or never."""
    timeout = 2 * delay_s
    return failover.RouterConfig(channels={
        "ledger": failover.ChannelConfig(timeout_s=timeout, settle_s=timeout)})


async def serve(args: argparse.Namespace) -> None:
    """Process A or B: a router on the shared journal.  A starts the repayments; both
    run until killed (A) or told to stop by a line on stdin (B)."""
    from failover.journal import PostgresJournal

    channel = LedgerChannel(args.dsn, args.schema, args.role, args.delay)
    await channel.start()
    journal = PostgresJournal(args.dsn, instance=f"{args.role}-{args.schema}",
                              lease_s=args.lease, schema=args.schema)
    router = failover.Router([channel], journal, channel_config(args.delay),
                             sweep_every_s=args.sweep,
                             recovery_concurrency=args.recovery_concurrency)
    await router.open()
    tasks = []  # kept: the event loop holds tasks only weakly
    if args.role == "A":
        for i in range(args.repayments):
            repayment = failover.Repayment(key=f"r{i:05d}", account="acct-0001",
                                           amount=Decimal("10.00"), currency="CNY")
            tasks.append(asyncio.create_task(router.repay(repayment)))
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # B: until the coordinator says stop
    await router.close()
    await channel.stop()


# ---- the coordinator -------------------------------------------------------------------


def start(role: str, args: argparse.Namespace, schema: str, lease: float, sweep: float
          ) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--role", role, "--schema", schema, "--dsn", args.dsn,
         "--lease", str(lease), "--sweep", str(sweep), "--delay", str(args.delay),
         "--repayments", str(args.repayments),
         "--recovery-concurrency", str(args.recovery_concurrency)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != "ready":
        process.kill()
        raise RuntimeError(f"process {role} did not start (said {line!r})")
    return process


async def wait_for(conn: asyncpg.Connection, sql: str, *params: Any, until: Any,
                   timeout_s: float) -> float | None:
    """Poll ``sql`` every 20 ms until it returns ``until``; the monotonic time, or None."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await conn.fetchval(sql, *params) == until:
            return time.monotonic()
        await asyncio.sleep(0.02)
    return None


async def one_setting(args: argparse.Namespace, lease: float, sweep: float) -> dict[str, Any]:
    from failover.journal import PostgresJournal

    schema = f"bench_to_{secrets.token_hex(4)}"
    await PostgresJournal(args.dsn, schema=schema, migrate=True).migrate()
    conn = await asyncpg.connect(args.dsn)
    a = b = None
    try:
        await conn.execute(LEDGER.format(s=schema))
        b = start("B", args, schema, lease, sweep)
        a = start("A", args, schema, lease, sweep)
        # Every intent written, then the channel's typical call: about half have answered.
        started = await wait_for(conn, f"SELECT count(*) FROM {schema}.repayments",
                                 until=args.repayments, timeout_s=60)
        if started is None:
            raise RuntimeError("A did not write every intent within 60 s")
        await asyncio.sleep(args.delay - (time.monotonic() - started))
        a.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        killed_at = await conn.fetchval("SELECT clock_timestamp()")
        a.wait()
        held = await conn.fetch(
            f"SELECT key FROM {schema}.repayments WHERE status = 'pending'")
        held_keys = [r["key"] for r in held]
        collected_unanswered = await conn.fetchval(
            f"SELECT count(*) FROM {schema}.repayments r WHERE status = 'pending' AND EXISTS"
            f" (SELECT 1 FROM {schema}.bench_ledger l WHERE l.key = r.key)")
        bound = lease + sweep
        timeout = 3 * bound + 4 * args.delay + 30
        owned = await wait_for(
            conn, f"SELECT count(*) FROM {schema}.repayments WHERE key = any($1)"
            " AND (owner IS DISTINCT FROM $2 OR status <> 'pending')",
            held_keys, f"A-{schema}", until=len(held_keys), timeout_s=timeout)
        done = await wait_for(
            conn, f"SELECT count(*) FROM {schema}.repayments WHERE key = any($1)"
            " AND status = 'succeeded'", held_keys, until=len(held_keys), timeout_s=timeout)
        # Per repayment: seconds from the kill to its end, by what the channel had done.
        ends = await conn.fetch(
            f"SELECT EXISTS (SELECT 1 FROM {schema}.bench_ledger l WHERE l.key = r.key"
            f" AND l.collected_by = 'A') AS collected,"
            f" max(extract(epoch FROM r.updated_at - $2::timestamptz)) AS last,"
            f" percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM"
            f" r.updated_at - $2::timestamptz)) AS median, count(*) AS n"
            f" FROM {schema}.repayments r WHERE key = any($1) GROUP BY 1",
            held_keys, killed_at)
        statuses = dict(await conn.fetch(
            f"SELECT status, count(*) FROM {schema}.repayments GROUP BY status"))
        ledger = await conn.fetchrow(
            f"SELECT count(*) AS rows, count(DISTINCT key) AS keys,"
            f" coalesce(sum(submits - 1), 0) AS resubmits,"
            f" count(*) FILTER (WHERE collected_by = 'B') AS by_b"
            f" FROM {schema}.bench_ledger")
        return {
            "lease_s": lease, "sweep_every_s": sweep, "bound_s": bound,
            "repayments": args.repayments, "held_at_kill": len(held_keys),
            "held_collected_unanswered": collected_unanswered,
            "all_taken_s": None if owned is None else owned - killed,
            "all_succeeded_s": None if done is None else done - killed,
            "statuses": statuses,
            "ended_s": {("collected by A" if row["collected"] else "not collected by A"):
                        {"n": row["n"], "p50": float(row["median"]), "max": float(row["last"])}
                        for row in ends},
            "ledger_rows": ledger["rows"], "ledger_keys": ledger["keys"],
            "duplicates": ledger["rows"] - ledger["keys"],
            "same_reference_resubmits": ledger["resubmits"],
            "collected_by_b": ledger["by_b"],
        }
    finally:
        for process in (a, b):
            if process is not None and process.poll() is None:
                assert process.stdin is not None
                process.stdin.write("stop\n")
                process.stdin.flush()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
        if args.keep:
            print(f"kept schema {schema}", file=sys.stderr)
        else:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="2:0.5,5:1",
                        help="comma-separated LEASE_S:SWEEP_EVERY_S pairs")
    parser.add_argument("--repayments", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.5,
                        help="typical channel call, seconds (calls take 0.2-1.8x this;"
                        " the channel's timeout and settle_s are twice this, and each"
                        " lease must exceed 1.1x the timeout)")
    parser.add_argument("--dsn", default=DSN)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--recovery-concurrency", type=int, default=16,
                        help="the routers' recovery_concurrency: how many taken-over"
                        " repayments B drives at once (default: the Router's, 16)")
    parser.add_argument("--keep", action="store_true",
                        help="leave each setting's schema for inspection (drop it yourself)")
    # Internal: the service processes.
    parser.add_argument("--role", choices=["A", "B"], help=argparse.SUPPRESS)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    parser.add_argument("--lease", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--sweep", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        asyncio.run(serve(args))
        return

    rows = []
    for pair in args.settings.split(","):
        lease, sweep = (float(x) for x in pair.split(":"))
        rows.append(asyncio.run(one_setting(args, lease, sweep)))
        if not args.json:
            print(f"  L={lease} S={sweep}: done", file=sys.stderr, flush=True)
    path = write("postgres_takeover", {"delay_s": args.delay, "results": rows})
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return
    settle = 2 * args.delay
    print(f"{args.repayments} repayments started at once by A; channel calls"
          f" {0.2 * args.delay:.1f}-{1.8 * args.delay:.1f} s, timeout and settle_s"
          f" {settle:g} s; A killed {args.delay:g} s after its last intent;"
          f" recovery_concurrency {args.recovery_concurrency}")
    print(f"{'L s':>5} {'S s':>5} {'held':>5} {'collected':>9} {'all taken s':>11}"
          f" {'L+S':>5} {'collected done s':>16} {'others done s':>13} {'bound':>6}"
          f" {'dup':>4} {'resubmits':>9}")

    def fmt(x: float | None) -> str:
        return "never" if x is None else f"{x:.2f}"

    problems = []
    for r in rows:
        ended = r["ended_s"]
        collected = ended.get("collected by A", {}).get("max")
        others = ended.get("not collected by A", {}).get("max")
        bound = r["lease_s"] + r["sweep_every_s"] + settle + 1.8 * args.delay
        print(f"{r['lease_s']:>5g} {r['sweep_every_s']:>5g} {r['held_at_kill']:>5}"
              f" {r['held_collected_unanswered']:>9} {fmt(r['all_taken_s']):>11}"
              f" {r['bound_s']:>5g} {fmt(collected):>16} {fmt(others):>13} {bound:>6.2f}"
              f" {r['duplicates']:>4} {r['same_reference_resubmits']:>9}")
        if r["duplicates"] or r["all_succeeded_s"] is None \
                or r["statuses"] != {"succeeded": r["repayments"]}:
            problems.append(f"L={r['lease_s']:g} S={r['sweep_every_s']:g}: statuses"
                            f" {r['statuses']}, duplicates {r['duplicates']}")
    print("held: pending at the kill; collected: of those, the channel had collected (the"
          " answer died with A); taken: B owns every held one (expected within L+S);"
          " done: max seconds from the kill to SUCCEEDED, for the collected ones (a query)"
          " and the others (B waits settle_s from its takeover before a NOT_FOUND counts,"
          " then calls again: bound L+S+settle_s+the slowest call); dup: collected twice")
    for problem in problems:
        print(f"PROBLEM {problem}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
