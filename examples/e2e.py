"""End to end: two simulated gateways, two service instances, kills, an audit.

    python examples/e2e.py --journal postgresql://postgres@127.0.0.1:5432/test

Starts two ``failover gateway-sim`` servers (``bank_card`` first, ``wallet`` its
backup, with seeded faults: latency, 5xx, resets after applying, late application) and
two instances of ``examples/service.py`` under uvicorn on ``examples/gateways.toml``,
sharing one PostgreSQL journal schema (the gateways' addresses reach the config through
``FAILOVER_CHANNELS__<CHANNEL>__OPTIONS__BASE_URL``).  Then it:

1. sends ``--repayments`` repayments over HTTP (httpx), a share of the keys
   (``--repeat-share``) twice at the same moment, the copies to the two instances, at
   most ``--concurrency`` requests in flight;
2. SIGKILLs the instances mid-load (``--kills``, alternating) and restarts each at
   once on its port;
3. sends every request that got no answer (a transport error, a timeout, a 503) again,
   same key, same body, to the other instance, until each key has an answer, 200
   (settled) or 202 (pending);
4. waits (at most ``--settle-s``) for the instances' background loops to settle what
   is pending (lease takeovers, reconcile, the late-collection sweep and its refunds);
5. audits the gateways' ledgers (``GET /ledger``) with ``failover.testing.audit``: every
   ``SUCCEEDED`` key collected exactly once net of refunds across both gateways, every
   ``FAILED`` key zero times, nothing pending.

It prints requests/s, latency, the faults the gateways injected, the kills and the
audit, and exits 1 if a check fails.  Every wait is bounded; every process it started
is stopped at the end.  The journal schema (``--schema``, default a new
``e2e_<random>``) is left for ``failover status``/``inspect``; the logs and ledgers
are in ``--workdir`` (default a temporary directory, removed).
``tests/test_e2e_gateways.py`` runs this (``pytest -m slow``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

import failover
from failover.gateway_sim import Faults, decide
from failover.testing import Audit, Collection, MemoryLedger, Refund, audit

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "gateways.toml"
SETTLED = ("succeeded", "failed")
RESET_CODES = ("read_error", "remote_protocol_error", "write_error")
FIVE_XX_CODES = ("http_500", "http_502", "http_503", "service_unavailable")


@dataclass(frozen=True, slots=True)
class Gateway:
    """One simulator: its name is the channel's in ``gateways.toml``."""

    name: str
    seed: int
    faults: str
    secret: str


GATEWAYS = (
    Gateway("bank_card", 7, "latency_ms=20,error_5xx=0.04,reset_after_apply=0.04,"
            "late_apply=0.03,late_apply_s=6,decline=0.05", "whsec_bank_card"),
    Gateway("wallet", 8, "latency_ms=10,error_5xx=0.03,reset_after_apply=0.03,decline=0.1",
            "whsec_wallet"),
)


@dataclass(frozen=True, slots=True)
class Params:
    repayments: int = 300
    repeat_share: float = 0.2
    concurrency: int = 16
    kills: int = 2
    """SIGKILLs, spread over the load, alternating between the two instances."""
    seed: int = 1
    callbacks: bool = True
    """The gateways post their webhooks to the instances (bank_card to a, wallet to b)."""
    request_timeout_s: float = 20.0
    """One HTTP request; past it the client sends the same key again."""
    load_timeout_s: float = 75.0
    """Until every key has an answer."""
    settle_s: float = 60.0
    """Until nothing is pending and the ledgers audit clean, after the load."""
    lease_s: float = 10.0
    """The instances' journal lease: above the gateways' timeout_s (4 s) plus a margin."""
    reconcile_s: float = 5.0
    """How often each instance reconciles repayments waiting on a gateway."""
    gateways: tuple[Gateway, ...] = GATEWAYS


# ---- processes -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without its FAILOVER_* variables (a test runner's, an operator's
    overrides), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FAILOVER_")}
    env.update(extra)
    return env


def stop(process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM,
         wait_s: float = 10.0) -> None:
    """Stop a child: ``sig``, then SIGKILL if it has not gone within ``wait_s``."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(sig)
    try:
        process.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(timeout=10)


@dataclass(slots=True)
class Sim:
    gateway: Gateway
    ledger: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    url: str = ""

    def start(self, callback_url: str | None) -> None:
        callbacks = ["--callback-url", callback_url] if callback_url else []
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "failover", "gateway-sim", "--name", self.gateway.name,
                 "--port", "0", "--json", "--seed", str(self.gateway.seed),
                 "--ledger", str(self.ledger), "--faults", self.gateway.faults,
                 "--secret", self.gateway.secret, *callbacks],
                stdout=log, stderr=subprocess.STDOUT, env=child_env({}))

    async def ready(self, timeout_s: float = 30.0) -> None:
        """Wait for the JSON line the command prints once it listens."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while True:
            for line in self.log.read_text().splitlines():
                if line.startswith("{"):
                    self.url = json.loads(line)["url"]
                    return
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway {self.gateway.name} stopped:\n"
                                   f"{self.log.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway {self.gateway.name}: no URL in {timeout_s} s")
            await asyncio.sleep(0.05)


@dataclass(slots=True)
class Instance:
    """One service instance (one uvicorn process, one router) on a fixed port, so that
    a restart answers at the same address."""

    name: str
    port: int
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    started: int = 0
    in_flight: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.started += 1
        with self.log.open("ab") as log:
            log.write(f"---- start {self.started}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "service:app", "--app-dir", str(HERE),
                 "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
                 "--timeout-graceful-shutdown", "2"],
                stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    async def ready(self, timeout_s: float = 30.0) -> None:
        """Wait until ``/healthz`` answers 200 (the router is open)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"instance {self.name} stopped:\n{self.log.read_text()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.url}/healthz")).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"instance {self.name}: not ready in {timeout_s} s")
                await asyncio.sleep(0.1)


# ---- the load --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Try:
    """One HTTP request: ``status`` 0 with ``error`` when it got no answer."""

    key: str
    instance: str
    status: int
    latency_s: float
    body: dict[str, Any]
    error: str | None = None

    @property
    def answered(self) -> bool:
        return self.status in (200, 202)

    @property
    def result(self) -> tuple[Any, ...]:
        return (self.body.get("status"), self.body.get("channel"),
                self.body.get("channel_reference"))


@dataclass(frozen=True, slots=True)
class Kill:
    instance: str
    at_s: float
    """Seconds into the load."""
    in_flight: int
    """Requests in the air to that instance when it was killed."""
    back_after_s: float
    """Until the restarted instance answered /healthz."""


@dataclass(slots=True)
class Report:
    params: Params
    keys: list[str] = field(default_factory=list)
    repeated: list[str] = field(default_factory=list)
    tries: list[Try] = field(default_factory=list)
    answers: dict[int, Try] = field(default_factory=dict)
    """The answer each copy (request index) finally got."""
    copy_s: dict[int, float] = field(default_factory=dict)
    """From the copy's first send to its answer, retries included."""
    kills: list[Kill] = field(default_factory=list)
    load_s: float = 0.0
    settle_s: float = 0.0
    results: dict[str, failover.RepaymentResult | None] = field(default_factory=dict)
    audit: Audit | None = None
    manual: list[str] = field(default_factory=list)
    pending_late: int = 0
    """Late applications a gateway had not applied yet when the audit ran."""
    refunds_open: int = 0
    pending_after_load: Counter[str] = field(default_factory=Counter)
    """Repayments pending when the last copy was answered, by reason and code."""
    drained_s: float = 0.0
    """Until every copy had been sent once (the load proper; the rest is retries)."""
    attempt_codes: Counter[tuple[str, str]] = field(default_factory=Counter)
    injected: dict[str, Counter[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    # -- figures

    def latencies(self) -> list[float]:
        return sorted(t.latency_s for t in self.tries if t.answered)

    def no_answer(self) -> Counter[str]:
        return Counter(t.error or f"http_{t.status}" for t in self.tries if not t.answered)

    def retried_keys(self) -> int:
        return len({t.key for t in self.tries if not t.answered})

    def figures(self) -> str:
        lat = self.latencies()
        p50, p99 = _percentiles(lat)
        copies = sorted(self.copy_s.values())
        c50, c99 = _percentiles(copies)
        answered = sum(1 for t in self.tries if t.answered)
        statuses = Counter(r.status.value if r else "missing" for r in self.results.values())
        http = Counter(t.status for t in self.tries if t.answered)
        corrected = sum(1 for r in self.results.values() if r is not None and r.corrections)
        seen: Counter[str] = Counter()
        for (_, code), n in self.attempt_codes.items():
            if code != "-":  # no code: a success
                seen["reset" if code in RESET_CODES else "5xx" if code in FIVE_XX_CODES
                     else code] += n
        lines = [
            f"load         {len(self.keys)} repayments ({len(self.repeated)} keys sent twice"
            f" at once), {len(self.answers)} copies, {len(self.tries)} HTTP requests"
            f" ({answered} answered) in {self.load_s:.1f} s",
            f"throughput   {answered / self.load_s:.1f} answered requests/s over the load;"
            f" every copy sent once in {self.drained_s:.1f} s"
            f" ({len(self.answers) / self.drained_s:.1f} first sends/s)"
            if self.load_s and self.drained_s else "throughput   -",
            f"latency      per request p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms,"
            f" max {lat[-1] * 1000 if lat else 0:.0f} ms; per copy with its retries"
            f" p50 {c50 * 1000:.0f} ms, p99 {c99 * 1000:.0f} ms,"
            f" max {copies[-1] * 1000 if copies else 0:.0f} ms",
            "answers      " + _counts(http),
            f"no answer    {sum(self.no_answer().values())} requests, {self.retried_keys()}"
            " keys sent again: " + _counts(self.no_answer()),
            "kills        " + ("; ".join(
                f"SIGKILL {k.instance} at {k.at_s:.1f} s ({k.in_flight} requests in the air),"
                f" back in {k.back_after_s:.1f} s" for k in self.kills) or "none"),
        ]
        for name, counts in self.injected.items():
            lines.append(f"injected     {name}: " + _counts(counts))
        lines += [
            "attempts saw " + _counts(seen),
            "pending      after the load: " + _counts(self.pending_after_load),
            f"settled      in {self.settle_s:.1f} s after the load: " + _counts(statuses)
            + f"; corrected {corrected}; late applications not applied {self.pending_late},"
            f" refunds open {self.refunds_open}, manual refunds {len(self.manual)}",
            "audit        " + (self.audit.summary() if self.audit else "not run")
            + (" -> OK" if self.audit and self.audit.ok and not self.problems else ""),
        ]
        lines += [f"PROBLEM      {p}" for p in self.problems[:20]]
        return "\n".join(lines)


def _percentiles(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    if len(values) == 1:
        return values[0], values[0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49], cuts[98]


def _counts(counter: Counter[Any]) -> str:
    return ", ".join(f"{k}: {n}" for k, n in sorted(counter.items(), key=str)) or "none"


def plan(params: Params) -> tuple[list[dict[str, Any]], list[str]]:
    """The request bodies in sending order, a repeated key's two copies side by side."""
    rng = random.Random(params.seed)
    run = secrets.token_hex(3)
    bodies: list[dict[str, Any]] = []
    repeated: list[str] = []
    twice = set(rng.sample(range(params.repayments),
                           round(params.repeat_share * params.repayments)))
    for i in range(params.repayments):
        body = {"key": f"e2e-{run}/loan-{i}/instalment-1",
                "account": f"62220200{rng.randrange(10**8):08d}",
                "amount": str(Decimal(rng.randrange(10_000, 400_000)).scaleb(-2)),
                "currency": "CNY"}
        bodies.append(body)
        if i in twice:
            bodies.append(body)
            repeated.append(body["key"])
    return bodies, repeated


async def load(params: Params, instances: list[Instance], report: Report) -> None:
    """Send every copy until it is answered, killing and restarting instances midway."""
    bodies, report.repeated = plan(params)
    report.keys = list(dict.fromkeys(b["key"] for b in bodies))
    queue = list(enumerate(bodies))[::-1]  # popped from the end: in sending order
    sent = 0
    started = time.monotonic()
    deadline = started + params.load_timeout_s
    # The k-th kill comes when the (k+1)/(kills+1) share of the copies has been sent.
    kill_at = [len(bodies) * (k + 1) // (params.kills + 1) for k in range(params.kills)]
    reached = [asyncio.Event() for _ in kill_at]
    limits = httpx.Limits(max_connections=4 * params.concurrency,
                          max_keepalive_connections=2 * params.concurrency)
    timeout = httpx.Timeout(params.request_timeout_s, connect=2.0)

    async def deliver(client: httpx.AsyncClient, index: int, body: dict[str, Any]) -> None:
        nonlocal sent
        first = time.monotonic()
        attempt = 0
        while True:
            # The copies of a repeated key start on different instances; a request that
            # got no answer goes to the other one.
            instance = instances[(index + attempt) % len(instances)]
            attempt += 1
            sent += 1
            for at, event in zip(kill_at, reached, strict=True):
                if sent == at:
                    event.set()
            instance.in_flight += 1
            t0 = time.monotonic()
            try:
                response = await client.post(f"{instance.url}/repayments", json=body)
            except httpx.HTTPError as exc:
                answer = Try(body["key"], instance.name, 0, time.monotonic() - t0, {},
                             type(exc).__name__)
            else:
                try:
                    data = response.json()
                except ValueError:
                    data = {"text": response.text[:200]}
                answer = Try(body["key"], instance.name, response.status_code,
                             time.monotonic() - t0, data)
            finally:
                instance.in_flight -= 1
            report.tries.append(answer)
            if answer.answered:
                report.answers[index] = answer
                report.copy_s[index] = time.monotonic() - first
                return
            if answer.status not in (0, 503):  # 409, 422, 500: a bug, not a retry
                report.problems.append(f"{body['key']}: HTTP {answer.status} {answer.body}")
                return
            if time.monotonic() > deadline:
                report.problems.append(f"{body['key']}: no answer within the load's"
                                       f" {params.load_timeout_s} s")
                return
            await asyncio.sleep(1.0 if answer.status == 503 else min(0.1 * attempt, 1.0))

    async def sender(client: httpx.AsyncClient) -> None:
        while queue:
            index, body = queue.pop()
            if not queue:
                report.drained_s = time.monotonic() - started
            await deliver(client, index, body)

    async def killer() -> None:
        for k, event in enumerate(reached):
            await event.wait()
            instance = instances[k % len(instances)]
            in_flight = instance.in_flight
            killed = time.monotonic()
            instance.kill()
            instance.start()
            await instance.ready()
            report.kills.append(Kill(instance.name, killed - started, in_flight,
                                     time.monotonic() - killed))

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        kills = asyncio.create_task(killer())
        try:
            await asyncio.gather(*(sender(client) for _ in range(params.concurrency)))
            report.load_s = time.monotonic() - started
            await asyncio.wait_for(kills, timeout=30)
        finally:
            kills.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await kills


# ---- settling and the audit -------------------------------------------------------------


def ledger_of(sims: list[Sim]) -> tuple[MemoryLedger, int]:
    """Every collection and refund the gateways made (their ``GET /ledger``), and how
    many late applications they have not applied yet."""
    ledger = MemoryLedger()
    waiting = 0
    for sim in sims:
        data = httpx.get(f"{sim.url}/ledger", timeout=10).json()
        name = data["name"]
        for c in data["collections"]:
            ledger.record(Collection(name, c["reference"], c["repayment_key"],
                                     Decimal(c["amount"]), c["payment_id"]))
        for r in data["refunds"]:
            ledger.record_refund(Refund(name, r["refund_reference"], r["reference"],
                                        r["repayment_key"], Decimal(r["amount"]),
                                        r["refund_id"]))
        waiting += len(data["pending"])
    return ledger, waiting


async def settle(params: Params, dsn: str, schema: str, sims: list[Sim],
                 report: Report) -> None:
    """Wait for nothing pending, no late application left, no refund open and a clean
    audit (at most ``params.settle_s``), then fill the report's audit."""
    import asyncpg

    started = time.monotonic()
    journal = failover.open_journal(dsn, read_only=True, schema=schema)
    conn = await asyncpg.connect(dsn)
    await journal.open()
    try:
        rows = await conn.fetch(
            f"SELECT pending_reason, coalesce(code, '-') AS code, count(*) AS n"
            f" FROM {schema}.repayments WHERE status = 'pending' GROUP BY 1, 2")
        report.pending_after_load = Counter(
            {f"{r['pending_reason']}/{r['code']}": r["n"] for r in rows})
        while True:
            pending = await conn.fetchval(
                f"SELECT count(*) FROM {schema}.repayments WHERE status = 'pending'")
            report.refunds_open = await conn.fetchval(
                f"SELECT count(*) FROM {schema}.late_checks"
                " WHERE refund IN ('due', 'sent', 'unknown')")
            ledger, report.pending_late = await asyncio.to_thread(ledger_of, sims)
            done = time.monotonic() - started > params.settle_s
            if (pending == 0 and report.pending_late == 0 and report.refunds_open == 0) \
                    or done:
                report.results = {}
                for key in report.keys:
                    record = await journal.load(key)
                    report.results[key] = None if record is None else record.result()
                report.manual = sorted({c.key for c in await journal.late_checks(
                    refund=failover.RefundState.MANUAL)})
                report.audit = audit(report.results, [ledger], report.manual)
                if (report.audit.ok and report.audit.pending == 0) or done:
                    break
            await asyncio.sleep(1.0)
        report.settle_s = time.monotonic() - started
        rows = await conn.fetch(f"SELECT channel, coalesce(code, '-') AS code, count(*) AS n"
                                f" FROM {schema}.attempts GROUP BY 1, 2")
        report.attempt_codes = Counter({(r["channel"], r["code"]): r["n"] for r in rows})
    finally:
        await conn.close()
        await journal.close()


def injected(sim: Sim) -> Counter[str]:
    """What the gateway did to the payments and refunds it recorded, recomputed from its
    seed: each reference's first request not refused applied it (so the refusals before
    it are the 5xx it answered first), its decision says how (reset, late, decline).
    5xx answered to status queries and to repeats of a known reference are not here."""
    faults = Faults.parse(sim.gateway.faults)
    now = datetime.now(UTC)  # for maintenance windows only: these gateways have none
    counts: Counter[str] = Counter()
    uri = f"file:{sim.ledger}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        payments = [r[0] for r in conn.execute("SELECT reference FROM payments")]
        refunds = [r[0] for r in conn.execute("SELECT refund_reference FROM refund_answers")]
    for kind, references in (("payment", payments), ("refund", refunds)):
        for reference in references:
            for n in range(1, 100):
                decision = decide(faults, sim.gateway.seed, kind,  # type: ignore[arg-type]
                                  reference, n, now)
                if decision.refusal is None:
                    break
                counts[f"{decision.refusal.status}"] += 1
            counts[f"{kind}s"] += 1
            if decision.action != "apply":
                counts[f"{kind} {decision.action}"] += 1
    return counts


def check(report: Report) -> None:
    """The client's side of the audit: every copy answered; the copies of a key agree;
    every settled answer is what the journal holds (unless a correction changed it)."""
    by_key: dict[str, list[Try]] = {}
    for answer in report.answers.values():
        by_key.setdefault(answer.key, []).append(answer)
    copies = len(report.keys) + len(report.repeated)
    if len(report.answers) != copies:
        report.problems.append(f"{copies - len(report.answers)} copies never answered")
    for key, answers in by_key.items():
        settled = {a.result for a in answers if a.body.get("status") in SETTLED}
        if len(settled) > 1:
            report.problems.append(f"{key}: copies answered differently: {settled}")
        result = report.results.get(key)
        if result is None:
            report.problems.append(f"{key}: answered, but not in the journal")
            continue
        final = (result.status.value, result.channel, result.channel_reference)
        if settled and not result.corrections and settled != {final}:
            report.problems.append(f"{key}: answered {settled}, the journal says {final}")


# ---- the run -------------------------------------------------------------------------------


@contextlib.contextmanager
def processes(sims: list[Sim], instances: list[Instance]) -> Iterator[None]:
    """Every child stopped at the end, whatever happened."""
    try:
        yield
    finally:
        for instance in instances:
            stop(instance.process)
        for sim in sims:
            stop(sim.process)


async def run(params: Params, dsn: str, schema: str, workdir: Path) -> Report:
    report = Report(params)
    ports = [free_port(), free_port()]
    sims = [Sim(g, workdir / f"{g.name}.db", workdir / f"{g.name}.log")
            for g in params.gateways]
    instances: list[Instance] = []
    with processes(sims, instances):
        # Each gateway posts its webhooks to one instance (card to a, wallet to b).
        for sim, port in zip(sims, ports, strict=True):
            sim.start(f"http://127.0.0.1:{port}/webhooks/{sim.gateway.name}"
                      if params.callbacks else None)
        await asyncio.gather(*(sim.ready() for sim in sims))
        env = child_env({
            "FAILOVER_CONFIG": str(CONFIG), "FAILOVER_JOURNAL": dsn,
            "FAILOVER_SCHEMA": schema, "FAILOVER_GRACE_S": "1",
            # A killed instance's work is taken over after 10 s, and what waits on a
            # gateway is asked again every 5 s: a run settles in seconds, not minutes.
            "FAILOVER_LEASE_S": str(params.lease_s),
            "FAILOVER_RECONCILE_S": str(params.reconcile_s),
            **{f"FAILOVER_CHANNELS__{sim.gateway.name.upper()}__OPTIONS__BASE_URL": sim.url
               for sim in sims}})
        for name, port in zip("ab", ports, strict=True):
            instances.append(Instance(name, port, env, workdir / f"service-{name}.log"))
        for instance in instances:
            instance.start()
        await asyncio.gather(*(instance.ready() for instance in instances))
        await load(params, instances, report)
        await settle(params, dsn, schema, sims, report)
        check(report)
        report.injected = {sim.gateway.name: injected(sim) for sim in sims}
    return report


def main(argv: Sequence[str] | None = None) -> int:
    defaults = Params()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--journal", required=True, help="a postgresql:// URL")
    parser.add_argument("--schema", default=None,
                        help="the journal's schema (default: a new e2e_<random>)")
    parser.add_argument("--repayments", type=int, default=defaults.repayments)
    parser.add_argument("--repeat-share", type=float, default=defaults.repeat_share)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--kills", type=int, default=defaults.kills)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-callbacks", action="store_true",
                        help="the gateways send no webhooks (status queries only)")
    parser.add_argument("--settle-s", type=float, default=defaults.settle_s)
    parser.add_argument("--lease-s", type=float, default=defaults.lease_s)
    parser.add_argument("--reconcile-s", type=float, default=defaults.reconcile_s)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="logs and ledgers (default: a temporary directory, removed)")
    args = parser.parse_args(argv)
    params = Params(repayments=args.repayments, repeat_share=args.repeat_share,
                    concurrency=args.concurrency, kills=args.kills, seed=args.seed,
                    callbacks=not args.no_callbacks, settle_s=args.settle_s,
                    lease_s=args.lease_s, reconcile_s=args.reconcile_s)
    schema = args.schema or f"e2e_{secrets.token_hex(4)}"
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        report = asyncio.run(run(params, args.journal, schema, workdir))
        print(report.figures())
        print(f"journal      {failover.journal.mask_dsn(args.journal)} schema {schema}")
    ok = report.audit is not None and report.audit.ok and report.audit.pending == 0 \
        and not report.problems
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
