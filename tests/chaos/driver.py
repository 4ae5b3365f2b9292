"""The chaos driver: starts a PostgreSQL cluster and four worker processes, sends
repayments to them as a real client would while faults land at seeded moments, heals
everything, and audits the ledger against the journal.

``run(params, logs)`` returns a ``Report``; ``tests/test_chaos_pg.py`` asserts on it.
The client is a real one: a request whose connection dropped or was refused (the
instance died) goes to another instance until one answers; a PENDING answer is an
answer; an instance that leaves a request unanswered for ``request_timeout_s`` is
recorded as a hang, asked to log its tasks (SIGUSR1), and skipped for a while.  What
is seeded: the repayments, which keys go to two instances, the order and kinds of the
faults, their targets' first choice, durations and the moments (as shares of the
load) they fire at.  Process scheduling is not, so two runs with one seed differ in
their interleavings, not in their plan.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

import failover
from failover.testing import Audit, Collection, MemoryLedger, audit
from tests.chaos.cluster import Cluster, free_port
from tests.chaos.ledger import LEDGER_DDL
from tests.chaos.worker import CHANNEL_TIMEOUT_S, SETTLE_S

REPO = Path(__file__).resolve().parents[2]

# What a restart or a terminated backend looks like to a client.
DISCONNECTED: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError, asyncpg.AdminShutdownError, asyncpg.CrashShutdownError)

HEALTH_CHECK_S = 15.0
"""How long the client skips an instance that left a request unanswered."""

KINDS = ("sigkill", "sigstop", "terminate", "pg_restart")
WEIGHTS = (0.3, 0.25, 0.3, 0.15)


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


@dataclass(frozen=True)  # not slotted: from_env reads the defaults off the class
class Params:
    repayments: int = 3000
    faults: int = 20
    seed: int = 20261205
    instances: int = 4
    lease_s: float = 2.0
    load_s: float = 0.0
    """Seconds the load is spread over; 0: the default, max(30, repayments / 90)."""
    both_share: float = 0.12
    """Share of keys sent to two instances at once."""
    request_timeout_s: float = 60.0
    """A client's patience for one answer before it sends the request elsewhere: more
    than a pass can take (the worker's deadline_s) plus a takeover, so that a request
    unanswered this long is a hang."""
    tail_s: float = 90.0
    """How long the load waits for its last answers once every key was sent."""
    max_in_flight: int = 96
    """Keys outstanding at most (a client's connection limit)."""
    settle_timeout_s: float = 120.0
    """How long the healed system gets to end every repayment."""

    @classmethod
    def from_env(cls) -> Params:
        return cls(
            repayments=env_int("FAILOVER_CHAOS_REPAYMENTS", cls.repayments),
            faults=env_int("FAILOVER_CHAOS_FAULTS", cls.faults),
            seed=env_int("FAILOVER_CHAOS_SEED", cls.seed),
            load_s=float(os.environ.get("FAILOVER_CHAOS_LOAD_S") or 0.0),
        )

    @property
    def load_seconds(self) -> float:
        return self.load_s or max(30.0, self.repayments / 90)

    @property
    def pause_range_s(self) -> tuple[float, float]:
        """SIGSTOP lengths: longer than the lease, shorter than timeout_s + settle_s
        (see worker.router_config: beyond it a paused sender's late INSERT is the
        late-collection sweep's to find, not a bug of the lease)."""
        return self.lease_s + 0.3, min(self.lease_s + 1.5, CHANNEL_TIMEOUT_S + SETTLE_S - 1.0)


@dataclass(slots=True)
class FaultRecord:
    kind: str
    target: str
    at_s: float
    in_air: int
    """Requests awaiting an answer from the target (all instances, for a cluster restart)."""
    pending_rows: int | None
    """Journal rows PENDING (owned by the target, for an instance fault); None: unread."""
    detail: str = ""


@dataclass(slots=True)
class Report:
    params: Params
    seconds: dict[str, float] = field(default_factory=dict)
    answers: Counter[str] = field(default_factory=Counter)
    resends: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    sent_twice: int = 0
    faults: list[FaultRecord] = field(default_factory=list)
    failed_before_retry: int = 0
    reconcile_rounds: int = 0
    audit: Audit | None = None
    problems: dict[str, list[str]] = field(default_factory=dict)
    channel_counts: dict[str, Counter[str]] = field(default_factory=dict)
    ledger_rows: int = 0
    journal_pending: int = -1
    worker_errors: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)
    """Keys the client still had no answer for tail_s after the load was sent."""
    """Requests a live instance left unanswered for request_timeout_s, with the key's row."""
    latencies: dict[str, tuple[float, float]] = field(default_factory=dict)
    """key -> (sent at, seconds until every request for it was answered)."""
    logs: str = ""

    def problem(self, name: str, item: str) -> None:
        self.problems.setdefault(name, []).append(item)

    def latency_line(self) -> str:
        if not self.latencies:
            return "latency: none"
        took = sorted(t for _, t in self.latencies.values())
        q = {f"p{p}": took[min(len(took) - 1, int(len(took) * p / 100))] for p in (50, 90, 99)}
        slowest = sorted(self.latencies.items(), key=lambda kv: -kv[1][1])[:3]
        return ("latency until answered: " + ", ".join(f"{k} {v:.2f}s" for k, v in q.items())
                + f", max {took[-1]:.2f}s; slowest: "
                + ", ".join(f"{k} (sent at {a:.1f}s, {t:.1f}s)" for k, (a, t) in slowest))

    @property
    def faults_mid_work(self) -> int:
        return sum(1 for f in self.faults if f.in_air > 0)

    def figures(self) -> str:
        p = self.params
        load = self.seconds.get("load", 0.0) or 1.0
        kinds = Counter(f.kind for f in self.faults)
        lines = [
            f"chaos seed {p.seed}: {p.repayments} repayments, {p.instances} instances,"
            f" lease_s {p.lease_s}, {p.faults} faults"
            " (replay: FAILOVER_CHAOS_SEED, sizes: FAILOVER_CHAOS_REPAYMENTS/FAULTS)",
            f"logs: {self.logs}",
            "time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()),
            f"load: {p.repayments / load:.0f} repayments/s over {load:.1f}s;"
            f" {self.requests} requests, {self.sent_twice} keys sent to two instances at"
            f" once; resent: {dict(self.resends) or 'none'}",
            self.latency_line(),
            f"answers: {dict(self.answers)}; FAILED then retried:"
            f" {self.failed_before_retry}; reconcile rounds: {self.reconcile_rounds}",
            f"faults by kind: {dict(kinds)}; with requests in the air:"
            f" {self.faults_mid_work}/{len(self.faults)}",
        ]
        lines += [f"  {f.at_s:6.1f}s {f.kind:<10} {f.target:<8} in air {f.in_air:>3},"
                  f" pending rows {'?' if f.pending_rows is None else f.pending_rows:>4}"
                  f"  {f.detail}" for f in self.faults]
        totals: Counter[str] = Counter()
        for counts in self.channel_counts.values():
            totals.update(counts)
        lines.append(f"channel behaviour (instances alive at the end): {dict(totals)}")
        if self.audit is not None:
            lines.append(f"audit: {self.audit.summary()}; ledger rows {self.ledger_rows};"
                         f" journal pending {self.journal_pending}")
        for name, items in self.problems.items():
            lines.append(f"PROBLEM {name} ({len(items)}): {'; '.join(items[:8])}")
        if self.hangs:
            asked = Counter(h.split(" on ")[1].split(" ")[0] for h in self.hangs)
            lines.append(f"HANGS: {len(self.hangs)} requests unanswered for"
                         f" {p.request_timeout_s:g}s by a live instance (by instance asked:"
                         f" {dict(asked)}); keys never answered: {self.unanswered or 'none'}")
        for hang in self.hangs[:10]:
            lines.append(f"  unanswered: {hang}")
        if self.worker_errors:
            lines.append(f"worker errors (first {len(self.worker_errors)}, resent): "
                         + "; ".join(sorted(set(self.worker_errors))[:8]))
        return "\n".join(lines)


class Instance:
    """One worker process, as the driver sees it."""

    def __init__(self, index: int, port: int, logs: Path) -> None:
        self.index = index
        self.name = f"chaos-{index}"
        self.port = port
        self.log_path = logs / f"{self.name}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.state = "down"  # up | paused | down
        self.incarnation = 0
        self.busy = False  # a fault is being done to it
        self.outstanding = 0
        self.unhealthy_until = 0.0
        self.dumped = 0
        """The incarnation last asked to dump its tasks."""
        self._drain: asyncio.Task[None] | None = None

    def healthy(self) -> bool:
        return time.monotonic() >= self.unhealthy_until

    @property
    def application_name(self) -> str:
        """How the journal names its connections (interface: ``failover:<instance>``)."""
        return f"failover:{self.name}"


class Chaos:
    def __init__(self, params: Params, logs: Path) -> None:
        self.params = params
        self.logs = logs
        self.rng = random.Random(params.seed)
        self.report = Report(params, logs=str(logs))
        self.cluster = Cluster()
        self.schema = f"chaos_{params.seed % 100000}_{os.getpid()}"
        self.instances = [Instance(i, free_port(), logs)
                          for i in range(params.instances)]
        self.healed = False
        self.in_flight = 0
        self.started = 0
        self._admin: Any = None
        self._admin_lock = asyncio.Lock()
        self._progress = asyncio.Condition()
        """Notified as keys are sent: faults fire at shares of the load."""
        self._t0 = time.monotonic()
        self._fault_tasks: set[asyncio.Task[None]] = set()

    # ---- processes ------------------------------------------------------------------

    async def launch(self, inst: Instance) -> None:
        inst.incarnation += 1
        argv = [sys.executable, "-m", "tests.chaos.worker", "--dsn", self.cluster.dsn,
                "--schema", self.schema, "--instance", inst.name, "--port", str(inst.port),
                "--seed", str(self.params.seed), "--incarnation", str(inst.incarnation),
                "--lease-s", str(self.params.lease_s)]
        if self.healed:
            argv.append("--healed")
        with inst.log_path.open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=REPO, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=log)
        inst.proc = proc
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 90)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise RuntimeError(f"{inst.name} did not start:\n{self.log_tail(inst)}")
        inst.state = "up"
        # Whatever else the worker prints must not fill its pipe and block it.
        inst._drain = asyncio.create_task(self._drain_stdout(inst, proc))

    async def _drain_stdout(self, inst: Instance, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        with inst.log_path.open("ab") as log:
            while line := await proc.stdout.readline():
                log.write(b"stdout: " + line)

    def log_tail(self, inst: Instance, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return inst.log_path.read_text(errors="replace")[-chars:]
        return ""

    async def kill(self, inst: Instance) -> None:
        proc = inst.proc
        inst.state = "down"
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            await proc.wait()

    def dump(self, inst: Instance) -> None:
        """Ask a worker that left a request unanswered to log its tasks (once per run of
        it): what it waits on is in its log."""
        if inst.proc is not None and inst.proc.returncode is None \
                and inst.dumped != inst.incarnation and inst.state == "up":
            inst.dumped = inst.incarnation
            with contextlib.suppress(ProcessLookupError):
                inst.proc.send_signal(signal.SIGUSR1)

    def kill_all_now(self) -> None:
        """For ``finally``: no awaiting, every worker gone."""
        for inst in self.instances:
            proc = inst.proc
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)
            if inst._drain is not None:
                inst._drain.cancel()

    # ---- the database, for the driver -------------------------------------------------

    async def admin(self, query: str, *args: Any, attempts: int = 20,
                    fetch: str = "fetchval") -> Any:
        """One value from the cluster (``fetch``: or a row, or ``execute`` a script),
        reconnecting after a restart."""
        async with self._admin_lock:  # one connection: one statement at a time
            return await self._admin_call(query, args, attempts, fetch)

    async def _admin_call(self, query: str, args: tuple[Any, ...], attempts: int,
                          fetch: str) -> Any:
        for attempt in range(attempts):
            try:
                if self._admin is None or self._admin.is_closed():
                    self._admin = await asyncpg.connect(
                        self.cluster.dsn, timeout=5,
                        server_settings={"application_name": "chaos-driver"})
                return await getattr(self._admin, fetch)(query, *args, timeout=10)
            except DISCONNECTED:
                if self._admin is not None:
                    with contextlib.suppress(Exception):
                        self._admin.terminate()
                self._admin = None
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(0.25)
        raise AssertionError("unreachable")

    async def pending_rows(self, owner: str | None = None) -> int | None:
        query = f'SELECT count(*) FROM "{self.schema}".repayments WHERE status = \'pending\''
        try:
            if owner is None:
                return int(await self.admin(query, attempts=2))
            return int(await self.admin(query + " AND owner = $1", owner, attempts=2))
        except Exception:  # before the schema exists, or a column named otherwise
            return None

    async def journal_row(self, message: dict[str, Any]) -> str:
        """The journal's row of a request's key, for the report of a request unanswered."""
        if "key" not in message:
            return "-"
        try:
            row = await self.admin(
                f'SELECT status, pending_reason, owner, token,'
                f' round(extract(epoch FROM lease_until - now()), 1) AS lease_left_s'
                f' FROM "{self.schema}".repayments WHERE key = $1', message["key"],
                attempts=2, fetch="fetchrow")
        except Exception as exc:
            return f"unread ({type(exc).__name__})"
        return "no row" if row is None else ", ".join(f"{k}={v}" for k, v in row.items())

    # ---- requests ---------------------------------------------------------------------

    async def call(self, inst: Instance, message: dict[str, Any], timeout: float
                   ) -> tuple[dict[str, Any] | None, str]:
        """One request on its own connection: (answer, "") or (None, why there was none)."""
        inst.outstanding += 1
        self.report.requests += 1
        writer = None
        try:
            async with asyncio.timeout(timeout):
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", inst.port)
                except OSError:
                    return None, "refused"
                writer.write(json.dumps(message).encode() + b"\n")
                await writer.drain()
                line = await reader.readline()
            if not line:
                return None, "dropped"
            return json.loads(line), ""
        except TimeoutError:
            return None, "timeout"
        except (ConnectionError, OSError):
            return None, "dropped"
        finally:
            inst.outstanding -= 1
            if writer is not None:
                writer.close()

    async def ask(self, message: dict[str, Any], first: Instance, *,
                  accept: Callable[[dict[str, Any]], bool] = lambda a: "status" in a,
                  timeout: float | None = None) -> dict[str, Any]:
        """Send until some instance answers; each failure goes to another instance."""
        rng = random.Random(f"{self.params.seed}/{message.get('key')}/{message['op']}")
        inst = first if first.healthy() else self.pick(rng, first)
        backoff = 0.05
        while True:
            answer, why = await self.call(inst, message, timeout or self.params.request_timeout_s)
            if answer is not None and accept(answer):
                return answer
            self.report.resends[why or ("error" if answer and "error" in answer else "odd")] += 1
            if why == "timeout":
                inst.unhealthy_until = time.monotonic() + HEALTH_CHECK_S
                self.dump(inst)
                self.report.hangs.append(
                    f"{message.get('key', message['op'])} on {inst.name} at"
                    f" {self.elapsed():.1f}s: journal {await self.journal_row(message)}")
            if answer is not None and "error" in answer and len(self.report.worker_errors) < 50:
                self.report.worker_errors.append(f"{inst.name}: {answer['error']}")
            await asyncio.sleep(rng.uniform(backoff / 2, backoff))
            backoff = min(backoff * 2, 1.0)
            inst = self.pick(rng, inst)

    def pick(self, rng: random.Random, other_than: Instance) -> Instance:
        """Another instance, a healthy one if there is any (a load balancer's passive
        health check: an instance that left a request unanswered is skipped a while,
        so that a hung instance costs the run some time, not all of it)."""
        others = [i for i in self.instances if i is not other_than]
        return rng.choice([i for i in others if i.healthy()] or others)

    # ---- load -------------------------------------------------------------------------

    def plan_load(self) -> list[tuple[dict[str, Any], list[Instance]]]:
        rng = random.Random(f"{self.params.seed}/load")
        n = self.params.repayments
        both = set(rng.sample(range(n), math.ceil(n * self.params.both_share)))
        plan = []
        for i in range(n):
            message = {"op": "repay", "key": f"loan-{i:06d}", "account": f"acct-{i:06d}",
                       "amount": str(Decimal(rng.randint(100, 500_000)).scaleb(-2))}
            plan.append((message, rng.sample(self.instances, 2 if i in both else 1)))
        return plan

    async def load(self, plan: list[tuple[dict[str, Any], list[Instance]]],
                   answers: dict[str, list[dict[str, Any]]]) -> None:
        rate = len(plan) / self.params.load_seconds
        room = asyncio.Semaphore(self.params.max_in_flight)
        start = time.monotonic()
        tasks = []

        async def one(message: dict[str, Any], targets: list[Instance]) -> None:
            sent = time.monotonic()
            try:
                got = await asyncio.gather(*(self.ask(message, t) for t in targets))
                answers[message["key"]] = list(got)
                self.report.latencies[message["key"]] = (sent - start, time.monotonic() - sent)
            finally:
                self.in_flight -= 1
                room.release()

        for n, (message, targets) in enumerate(plan):
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await room.acquire()
            self.in_flight += 1
            self.started = n + 1
            async with self._progress:
                self._progress.notify_all()
            self.report.sent_twice += len(targets) > 1
            tasks.append(asyncio.create_task(one(message, targets), name=message["key"]))
        # A key still unanswered this long after the last was sent hangs: it is left to
        # the end's reconcile (so the audit still runs) and reported, not waited for.
        _, hung = await asyncio.wait(tasks, timeout=self.params.tail_s)
        for task in hung:
            task.cancel()
            self.report.unanswered.append(task.get_name())
        await asyncio.gather(*hung, return_exceptions=True)

    # ---- faults -----------------------------------------------------------------------

    def plan_faults(self) -> list[tuple[int, str, int, float]]:
        """(fire when this many keys were sent, kind, preferred target, duration)."""
        rng = random.Random(f"{self.params.seed}/faults")
        n = self.params.faults
        kinds = list(KINDS[:min(n, len(KINDS))])  # each kind at least once
        kinds += rng.choices(KINDS, WEIGHTS, k=n - len(kinds))
        rng.shuffle(kinds)
        marks = sorted(int(rng.uniform(0.03, 0.93) * self.params.repayments) for _ in kinds)
        low, high = self.params.pause_range_s
        plan = []
        for mark, kind in zip(marks, kinds, strict=True):
            duration = {"sigkill": rng.uniform(0.2, 1.5), "sigstop": rng.uniform(low, high),
                        "pg_restart": rng.uniform(0.3, 1.5)}.get(kind, 0.0)
            plan.append((mark, kind, rng.randrange(self.params.instances), duration))
        return plan

    def sent_at_least(self, count: int) -> bool:
        return self.started >= count

    async def faults(self, plan: list[tuple[int, str, int, float]]) -> None:
        rng = random.Random(f"{self.params.seed}/fault-modes")
        for mark, kind, preferred, duration in plan:
            async with self._progress:
                await self._progress.wait_for(functools.partial(self.sent_at_least, mark))
            if kind == "pg_restart":
                await self.restart_cluster(duration, rng.choice(["fast", "immediate"]))
                continue
            inst = await self.free_instance(preferred)
            inst.busy = True
            record = FaultRecord(kind, inst.name, self.elapsed(), inst.outstanding,
                                 await self.pending_rows(inst.name))
            self.report.faults.append(record)
            step = {"sigkill": self.sigkill, "sigstop": self.sigstop,
                    "terminate": self.terminate}[kind]
            task = asyncio.create_task(self._fault(step, inst, duration, record))
            self._fault_tasks.add(task)
            task.add_done_callback(self._fault_tasks.discard)
        await self.faults_done()

    async def faults_done(self) -> None:
        while self._fault_tasks:
            await asyncio.gather(*self._fault_tasks)

    async def _fault(self, step: Callable[[Instance, float, FaultRecord], Awaitable[None]],
                     inst: Instance, duration: float, record: FaultRecord) -> None:
        try:
            await step(inst, duration, record)
        finally:
            inst.busy = False

    async def free_instance(self, preferred: int) -> Instance:
        while True:
            order = self.instances[preferred:] + self.instances[:preferred]
            for inst in order:
                if not inst.busy and inst.state == "up":
                    return inst
            await asyncio.sleep(0.05)

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    async def sigkill(self, inst: Instance, down_s: float, record: FaultRecord) -> None:
        await self.kill(inst)
        await asyncio.sleep(down_s)
        await self.launch(inst)
        record.detail = f"down {down_s:.1f}s, restarted as incarnation {inst.incarnation}"

    async def sigstop(self, inst: Instance, pause_s: float, record: FaultRecord) -> None:
        assert inst.proc is not None
        inst.proc.send_signal(signal.SIGSTOP)
        inst.state = "paused"
        try:
            await asyncio.sleep(pause_s)
        finally:
            inst.proc.send_signal(signal.SIGCONT)
            inst.state = "up"
        record.detail = f"paused {pause_s:.1f}s (lease_s {self.params.lease_s})"

    async def terminate(self, inst: Instance, _: float, record: FaultRecord) -> None:
        # The pids first: in one statement the planner may call pg_terminate_backend
        # before it filters by name, and end every session (the driver's too).
        pids = await self.admin(
            "SELECT array_agg(pid) FROM pg_stat_activity WHERE application_name = $1",
            inst.application_name)
        ended = 0
        for pid in pids or ():
            ended += bool(await self.admin("SELECT pg_terminate_backend($1)", pid))
        record.detail = f"{ended} backend(s) of {inst.application_name!r} terminated"

    async def restart_cluster(self, down_s: float, mode: str) -> None:
        record = FaultRecord("pg_restart", "cluster", self.elapsed(),
                             sum(i.outstanding for i in self.instances),
                             await self.pending_rows())
        self.report.faults.append(record)
        await asyncio.to_thread(self.cluster.restart, mode, down_s)
        record.detail = f"stop -m {mode}, down {down_s:.1f}s"

    # ---- the end ----------------------------------------------------------------------

    async def heal(self) -> None:
        """Every fault ends: the cluster runs, every instance serves, no channel fails."""
        await self.faults_done()
        if not self.cluster.running:
            await asyncio.to_thread(self.cluster.start)
        self.healed = True
        for inst in self.instances:
            if inst.state == "paused" and inst.proc is not None:
                inst.proc.send_signal(signal.SIGCONT)
                inst.state = "up"
            if inst.proc is None or inst.proc.returncode is not None:
                await self.launch(inst)
        await asyncio.gather(*(self.ask({"op": "heal"}, inst, accept=lambda a: "healed" in a)
                               for inst in self.instances))

    async def reconcile_until_done(self, journal: Any, deadline: float) -> int:
        """Ask every instance to reconcile until the journal holds nothing PENDING."""
        while True:
            self.report.reconcile_rounds += 1
            await asyncio.gather(*(
                self.call(inst, {"op": "reconcile"}, timeout=60) for inst in self.instances))
            pending = len(await journal.pending_keys())
            if pending == 0 or time.monotonic() > deadline:
                return pending
            await asyncio.sleep(0.5)

    async def ledger(self) -> list[Collection]:
        conn = await asyncpg.connect(self.cluster.dsn)
        try:
            rows = await conn.fetch("SELECT channel, reference, repayment_key, amount,"
                                    " channel_reference FROM ledger ORDER BY id")
        finally:
            await conn.close()
        return [Collection(r["channel"], r["reference"], r["repayment_key"], r["amount"],
                           r["channel_reference"]) for r in rows]

    async def records(self, journal: Any, keys: list[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for start in range(0, len(keys), 500):
            found.update(await journal.load_many(keys[start:start + 500]))
        return found

    async def finish(self, journal: Any, plan: list[tuple[dict[str, Any], list[Instance]]],
                     answers: dict[str, list[dict[str, Any]]]) -> None:
        report = self.report
        keys = [message["key"] for message, _ in plan]
        deadline = time.monotonic() + self.params.settle_timeout_s
        await self.reconcile_until_done(journal, deadline)

        # FAILED is an honest end when nothing was collected (every channel was down at
        # once, during a cluster restart): a client then retries it, with a new round.
        records = await self.records(journal, keys)
        collected = {c.repayment_key for c in await self.ledger()}
        failed = [k for k, r in records.items()
                  if r.status is failover.RepaymentStatus.FAILED]
        report.failed_before_retry = len(failed)
        for key in failed:
            if key in collected:
                report.problem("failed_but_collected", key)
        retry = [k for k in failed if k not in collected]
        room = asyncio.Semaphore(32)

        async def again(key: str) -> None:
            async with room:
                await self.ask({"op": "retry", "key": key}, self.rng.choice(self.instances))

        await asyncio.gather(*(again(k) for k in retry))
        report.journal_pending = await self.reconcile_until_done(journal, deadline)

        records = await self.records(journal, keys)
        rows = await self.ledger()
        report.ledger_rows = len(rows)
        ledger = MemoryLedger()
        for row in rows:
            ledger.record(row)
        results = {k: (records[k].result() if k in records else None) for k in keys}
        report.audit = audit(results, [ledger])
        for name in ("duplicates", "lost", "false_successes", "strays", "pending_keys"):
            for key in getattr(report.audit, name):
                report.problem(name, key)
        self.check_against_ledger(plan, records, rows, answers)

    def check_against_ledger(self, plan: list[tuple[dict[str, Any], list[Instance]]],
                             records: dict[str, Any], rows: Iterable[Collection],
                             answers: dict[str, list[dict[str, Any]]]) -> None:
        """Every key: collected exactly once, for its amount, and the journal and every
        SUCCEEDED answer name that very collection."""
        report = self.report
        by_key: dict[str, list[Collection]] = {}
        for row in rows:
            by_key.setdefault(row.repayment_key, []).append(row)
        for message, _ in plan:
            key = message["key"]
            record = records.get(key)
            collections = by_key.get(key, [])
            if record is None or record.status is not failover.RepaymentStatus.SUCCEEDED:
                report.problem("not_succeeded",
                               f"{key}: {None if record is None else record.status.value}")
                continue
            if len(collections) != 1:
                report.problem("not_collected_once", f"{key}: {len(collections)} rows")
                continue
            row = collections[0]
            if (row.channel, row.channel_reference) != (record.channel,
                                                        record.channel_reference):
                report.problem("journal_names_another_collection",
                               f"{key}: journal {record.channel}/{record.channel_reference},"
                               f" ledger {row.channel}/{row.channel_reference}")
            if row.amount != Decimal(message["amount"]):
                report.problem("wrong_amount", f"{key}: {row.amount} != {message['amount']}")
            for answer in answers.get(key, []):
                if answer["status"] == "succeeded" and (
                        answer["channel"], answer["channel_reference"]) != (
                        row.channel, row.channel_reference):
                    report.problem("answer_names_another_collection",
                                   f"{key}: answered {answer['channel_reference']},"
                                   f" ledger {row.channel_reference}")

    async def channel_counts(self) -> None:
        for inst in self.instances:
            answer, _ = await self.call(inst, {"op": "counts"}, timeout=10)
            if answer is not None and "error" not in answer:
                self.report.channel_counts[inst.name] = Counter(
                    {k: v for counts in answer.values() for k, v in counts.items()})

    async def run(self) -> Report:
        report = self.report
        journal = None
        try:
            await asyncio.to_thread(self.cluster.init)
            await asyncio.to_thread(self.cluster.start)
            await self.admin(LEDGER_DDL, fetch="execute")
            t = time.monotonic()
            await asyncio.gather(*(self.launch(inst) for inst in self.instances))
            report.seconds["start"] = time.monotonic() - t

            plan = self.plan_load()
            answers: dict[str, list[dict[str, Any]]] = {}
            t = self._t0 = time.monotonic()
            faults = asyncio.create_task(self.faults(self.plan_faults()))
            await self.load(plan, answers)
            report.seconds["load"] = time.monotonic() - t
            await faults
            for got in answers.values():
                report.answers.update(a["status"] for a in got)

            t = time.monotonic()
            await self.heal()
            journal = failover.PostgresJournal(self.cluster.dsn, schema=self.schema,
                                               read_only=True)
            await journal.open()
            await self.finish(journal, plan, answers)
            await self.channel_counts()
            report.seconds["heal+audit"] = time.monotonic() - t
            report.seconds["total"] = time.monotonic() - self._t0 + report.seconds["start"]
            return report
        finally:
            await self.shut_down(journal)

    async def shut_down(self, journal: Any) -> None:
        try:
            if journal is not None:
                with contextlib.suppress(Exception):
                    await journal.close()
            if self._admin is not None:
                with contextlib.suppress(Exception):
                    self._admin.terminate()
            for task in list(self._fault_tasks):
                task.cancel()
            for inst in self.instances:  # a paused process must run again to die cleanly
                if inst.proc is not None and inst.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        inst.proc.send_signal(signal.SIGCONT)
            self.kill_all_now()
            for inst in self.instances:
                if inst.proc is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(inst.proc.wait(), 10)
        finally:
            with contextlib.suppress(OSError):
                (self.logs / "postgres.log").write_bytes(self.cluster.log.read_bytes())
            await asyncio.to_thread(self.cluster.destroy)


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(params: Params, logs: Path) -> Report:
    """Run the whole chaos scenario, the processes' logs going to ``logs``; every
    process and the cluster are gone after, even when the run is stopped by SIGTERM
    (a CI timeout).  Workers also exit by themselves when this process dies (their
    stdin closes)."""
    chaos = Chaos(params, logs)
    # SIGTERM's default ends the process without running any finally block: the
    # cluster would be left running.  As KeyboardInterrupt, the blocks below run.
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return asyncio.run(chaos.run())
    finally:
        signal.signal(signal.SIGTERM, previous)
        chaos.kill_all_now()  # in case the loop itself died
        chaos.cluster.destroy()
