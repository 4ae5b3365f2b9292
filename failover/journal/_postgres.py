"""The shared journal: PostgreSQL on asyncpg, for several service instances.

Ownership.  Every unfinished repayment has one owner instance, a lease
(``lease_until``, always computed by PostgreSQL's ``now()``, never an instance's
clock) and a fencing token drawn from a sequence, so it grows with every change
of owner.  Every write of a repayment's state is conditional on the writer's token
(``WHERE key = $1 AND token = $2``): once another instance has taken a repayment
over, the old owner's writes match no row and raise ``OwnershipLost``.  The token
is kept inside this journal (``_held``), so no caller can forget to pass it.

Group commit.  Operations queue; one writer task runs everything that queued while
the last transaction was committing in one transaction, one statement per operation
(an intent and its first attempt, or an answer and the ending it causes, are one
statement each).  A statement that raises aborts the batch, which is then run again
one operation per transaction, so a faulty operation fails alone.

Faults.  A connection that drops after a batch was sent leaves each operation's
fate unknown.  Nothing is answered for it until the writer has reconnected and read
back what the database holds (``_Op.settle``: for each operation, either its effect
is found, or it is applied again under its token).  If the database cannot be
reached for ``fate_timeout_s``, the operation fails with ``JournalError`` and the
repayment's lease is left to expire: whoever takes it over asks the channels first.
While the database is unreachable, new operations fail at once with ``JournalError``.

The window no lease closes: an owner checks (``hold``, locally) that its lease
outlives a channel call before making it; a process paused between that check and
the call (a stop signal, a long GC or VM pause) can send the call after its lease
expired and another instance took over.  The late-collection sweep catches what that
window lets through: attempts settled by ``NOT_FOUND`` are asked about again later,
and a second collection is reversed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import importlib.util
import json
import logging
import math
import os
import random
import re
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from failover._errors import (
    JournalError,
    OwnershipLost,
    SchemaVersionError,
    TerminalStateError,
    UnknownRepayment,
)
from failover._models import (
    SETTLING_SUBMIT_OUTCOMES,
    Attempt,
    ChannelResult,
    Correction,
    LateCheck,
    LateState,
    Outcome,
    Override,
    PendingReason,
    RefundState,
    Repayment,
    RepaymentStatus,
    Skip,
)
from failover.codec import PURGED, AccountCodec
from failover.journal._base import (
    LATE_COLUMNS,
    WATCH_SQL,
    AccountUnusable,
    Failover,
    JournalStats,
    Record,
    Resolution,
    WriteCounted,
    WriteStats,
    correction_json,
    corrections_from,
    decoded,
    late_check_from,
    late_check_row,
    new_record,
    skips_from,
    skips_json,
    unusable_account,
)

if TYPE_CHECKING:
    import asyncpg

SCHEMA_VERSION = 3
_MAX_BATCH = 256
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,47}$")
T = TypeVar("T")
_log = logging.getLogger("failover.journal")

# One list of migrations, each run once, in order, under an advisory lock.  ``{s}`` is
# the schema name (checked against _SCHEMA_NAME before it is ever put in SQL).
_MIGRATIONS: list[tuple[int, str]] = [
    (1, """
CREATE TABLE {s}.repayments (
    key TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    amount NUMERIC NOT NULL,
    currency TEXT NOT NULL,
    due_at TIMESTAMPTZ,
    metadata TEXT NOT NULL,
    preference TEXT[],
    status TEXT NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    round INTEGER NOT NULL,
    channel TEXT,
    channel_reference TEXT,
    code TEXT,
    pending_reason TEXT,
    pending_channel TEXT,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    owner TEXT,
    token BIGINT NOT NULL,
    lease_until TIMESTAMPTZ
);
CREATE SEQUENCE {s}.tokens;
-- The sweep: pending repayments by lease expiry (NULL: released, not swept).
CREATE INDEX repayments_lease ON {s}.repayments (lease_until) WHERE status = 'pending';
-- pending_keys() and the oldest pending repayment.
CREATE INDEX repayments_pending ON {s}.repayments (created_at) WHERE status = 'pending';
-- No index on status: counting by status scans the table either way (measured on 1M
-- rows), and every ending would pay to update one.
CREATE TABLE {s}.attempts (
    key TEXT NOT NULL REFERENCES {s}.repayments (key),
    number INTEGER NOT NULL,
    round INTEGER NOT NULL,
    channel TEXT NOT NULL,
    reference TEXT NOT NULL,
    outcome TEXT,
    code TEXT,
    detail TEXT,
    resolution TEXT,
    channel_reference TEXT,
    started_at TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ,
    PRIMARY KEY (key, number)
);
CREATE INDEX attempts_started ON {s}.attempts (started_at);
-- The journal itself refuses to change a finished repayment, whatever the code does,
-- and tells listeners when a repayment ends or changes owner.
CREATE FUNCTION {s}.guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = 'succeeded' THEN
        RAISE EXCEPTION 'terminal: succeeded' USING ERRCODE = 'check_violation';
    END IF;
    IF OLD.status = 'failed' AND NEW.round = OLD.round THEN
        RAISE EXCEPTION 'terminal: failed' USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.status <> OLD.status OR NEW.owner IS DISTINCT FROM OLD.owner THEN
        PERFORM pg_notify('failover_' || TG_TABLE_SCHEMA, NEW.key);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER guard BEFORE UPDATE ON {s}.repayments
FOR EACH ROW EXECUTE FUNCTION {s}.guard();
"""),
    # Late collections, corrections, skips and reminders.  A terminal repayment's ending
    # changes only together with its corrections; other columns (the watch) may change.
    (2, """
ALTER TABLE {s}.repayments ADD COLUMN skips JSONB, ADD COLUMN corrections JSONB,
    ADD COLUMN watch_at TIMESTAMPTZ;
CREATE INDEX repayments_watch ON {s}.repayments (watch_at) WHERE watch_at IS NOT NULL;
CREATE INDEX repayments_due ON {s}.repayments (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX attempts_reference ON {s}.attempts (reference);
CREATE TABLE {s}.late_checks (
    key TEXT NOT NULL REFERENCES {s}.repayments (key),
    channel TEXT NOT NULL,
    reference TEXT NOT NULL,
    round INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('watching', 'collected', 'cleared')),
    checks INTEGER NOT NULL,
    next_at TIMESTAMPTZ,
    found_at TIMESTAMPTZ,
    found_by TEXT,
    channel_reference TEXT,
    refund TEXT CHECK (refund IN ('due', 'sent', 'unknown', 'refunded', 'manual')),
    refund_reference TEXT,
    refund_code TEXT,
    refund_at TIMESTAMPTZ,
    PRIMARY KEY (key, reference)
);
CREATE INDEX late_checks_due ON {s}.late_checks (next_at) WHERE next_at IS NOT NULL;
CREATE TABLE {s}.reminders (
    key TEXT NOT NULL,
    threshold_s DOUBLE PRECISION NOT NULL,
    at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (key, threshold_s)
);
CREATE OR REPLACE FUNCTION {s}.guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status <> 'pending' AND NEW.corrections IS NOT DISTINCT FROM OLD.corrections
            AND (NEW.status, NEW.round, NEW.channel, NEW.channel_reference, NEW.code)
            IS DISTINCT FROM (OLD.status, OLD.round, OLD.channel, OLD.channel_reference,
                              OLD.code) THEN
        IF OLD.status = 'succeeded' THEN
            RAISE EXCEPTION 'terminal: succeeded' USING ERRCODE = 'check_violation';
        END IF;
        IF NEW.round = OLD.round THEN
            RAISE EXCEPTION 'terminal: failed' USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    IF NEW.status <> OLD.status OR NEW.owner IS DISTINCT FROM OLD.owner THEN
        PERFORM pg_notify('failover_' || TG_TABLE_SCHEMA, NEW.key);
    END IF;
    RETURN NEW;
END $$;
-- Repayments that ended before this version and may still collect are watched too
-- (needs_watch).  Instances of the previous version must be stopped first: they would
-- not mark their endings.
UPDATE {s}.repayments AS r SET watch_at = r.updated_at WHERE r.status <> 'pending' AND EXISTS (
    SELECT 1 FROM {s}.attempts x WHERE x.key = r.key AND (
        x.resolution = 'not_found'
        OR (x.resolution IS NULL AND (x.outcome IS NULL OR x.outcome IN ('unknown', 'not_found')))
        OR ('succeeded' IN (x.outcome, x.resolution) AND NOT (r.status = 'succeeded'
            AND x.channel IS NOT DISTINCT FROM r.channel AND x.round = r.round))));
"""),
    # Operators' channel switches, shared by every instance, and each instance's
    # breaker states (for failover channels).
    (3, """
CREATE TABLE {s}.channel_overrides (
    channel TEXT PRIMARY KEY,
    enabled BOOLEAN NOT NULL,
    until TIMESTAMPTZ NOT NULL,
    reason TEXT NOT NULL,
    by TEXT NOT NULL,
    at TIMESTAMPTZ NOT NULL
);
CREATE TABLE {s}.instance_breakers (
    instance TEXT NOT NULL,
    channel TEXT NOT NULL,
    state TEXT NOT NULL,
    at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (instance, channel)
);
"""),
]

_SETTLING = ", ".join(f"'{outcome.value}'" for outcome in sorted(SETTLING_SUBMIT_OUTCOMES))
_IN_DOUBT = f"resolution IS NULL AND (outcome IS NULL OR outcome NOT IN ({_SETTLING}))"
_RECORD_COLUMNS = (
    "key, account, amount, currency, due_at, metadata, preference, status, round, channel,"
    " channel_reference, code, pending_reason, pending_channel, created_at, updated_at,"
    " owner, token, skips, corrections"
)
_ATTEMPT_COLUMNS = (
    "channel, reference, outcome, code, started_at, finished_at, detail, resolution, round,"
    " channel_reference"
)


def mask_dsn(dsn: str) -> str:
    """The DSN with its password (in the user part or a ``password=`` parameter) shown
    as ``***``.  Unlike a URL parser it keeps what it does not understand as it is: a
    list of hosts (``h1:5432,h2:5432``), an IPv6 address, a password holding ``@``."""
    scheme, _, rest = dsn.partition("://")
    # The last "@" before the path ends the user part: a password may hold "@" or "/".
    path_start = rest.find("/", rest.rfind("@") + 1)
    netloc, tail = (rest, "") if path_start < 0 else (rest[:path_start], rest[path_start:])
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{hosts}"
    tail = re.sub(r"(?i)([?&](?:ssl)?password=)[^&#]*", r"\1***", tail)
    return f"{scheme}://{netloc}{tail}"


def is_dsn(target: object) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


_PINS: dict[tuple[str, str], list[Callable[[], bool]]] = {}
"""(schema, key) -> checks of the plain-``def`` submits of it still running in this
process (``PostgresJournal.pin``)."""
_PINS_LOCK = threading.Lock()

_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError, ConnectionError)


def _connection_errors() -> tuple[type[BaseException], ...]:
    import asyncpg

    return (*_CONNECTION_ERRORS, asyncpg.exceptions.ConnectionDoesNotExistError,
            asyncpg.exceptions.InterfaceError, asyncpg.exceptions.InternalClientError,
            asyncpg.exceptions.PostgresConnectionError,
            asyncpg.exceptions.AdminShutdownError, asyncpg.exceptions.CannotConnectNowError,
            asyncpg.exceptions.CrashShutdownError)


@dataclass(slots=True)
class _Held:
    token: int
    expires: float
    """Local monotonic time before which the lease certainly holds."""


@dataclass(slots=True, eq=False)
class _Lane:
    """One writer: its queue, its connection, and whether it is reading back a write
    whose connection dropped."""

    queue: asyncio.Queue[_Op | None]
    conn: asyncpg.Connection | None = None
    task: asyncio.Task[None] | None = None
    settling: bool = False
    down_since: float | None = None
    batch: list[_Op] = dataclasses.field(default_factory=list)
    """The batch being written (answered with an error if the writer is stopped)."""
    pending: list[_Op] = dataclasses.field(default_factory=list)


def _write(value: object) -> bool:
    """``wrote`` of a write that always writes."""
    return True


def _read(value: object) -> bool:
    """``wrote`` of a read: it never writes."""
    return False


def _changed(status: str) -> bool:
    """``wrote`` of ``conn.execute``: its status (``"UPDATE 0"``) says how many rows."""
    return not status.endswith(" 0")


def _owned(value: tuple[Any, int | None]) -> bool:
    """``wrote`` of an operation answering (record, token): a token means it took or
    renewed the lease; none, that it only read the record."""
    return value[1] is not None


@dataclass(slots=True, eq=False)
class _Op:
    """One queued operation: ``apply`` in a batch; ``settle`` after an unknown fate
    (reads back the effect, or applies again under the same fencing)."""

    apply: Callable[[Any], Awaitable[Any]]
    settle: Callable[[Any], Awaitable[Any]] | None
    future: asyncio.Future[Any]
    key: str | None = None
    wrote: Callable[[Any], bool] = _write
    """Whether ``apply``, answering ``value``, wrote (``_read`` for a read): only
    transactions that wrote are counted in ``writes``."""


class PostgresJournal(WriteCounted):
    """A journal in a PostgreSQL schema, shared by several router instances."""

    shared = True

    def __init__(
        self, dsn: str, *, instance: str | None = None, lease_s: float = 30.0,
        schema: str = "failover", migrate: bool = False, read_only: bool = False,
        poll_s: float = 1.0, sweep_batch: int = 100, connect_timeout_s: float = 5.0,
        fate_timeout_s: float | None = None, writers: int = 2,
        codec: AccountCodec | None = None,
    ) -> None:
        """``dsn`` is a ``postgresql://`` URL.  ``instance`` names this owner in the
        table (default: host, pid and a random suffix: unique per journal object).
        ``lease_s`` must exceed every channel's ``timeout_s`` plus a margin of a tenth
        of it.  ``migrate`` applies the schema's migrations on open (else run
        ``failover migrate DSN`` first).  An instance restarted under the same name
        takes its repayments back at once (with new tokens) instead of waiting for their
        leases: names must be unique among the instances running at one time.
        ``poll_s`` bounds how long a second caller of a key waits between looks when a
        notification is missed.  ``fate_timeout_s``
        (default ``lease_s``) bounds how long a write whose connection dropped waits for
        the database to come back before it fails with ``JournalError``."""
        if not is_dsn(dsn):
            raise ValueError(f"dsn must be a postgresql:// URL, got {mask_dsn(str(dsn))!r}")
        if importlib.util.find_spec("asyncpg") is None:
            raise JournalError("the PostgreSQL journal needs asyncpg: pip install"
                               " 'failover[postgres]'")
        if not _SCHEMA_NAME.match(schema):
            raise ValueError(f"schema must be a lower-case SQL name, got {schema!r}")
        if not (math.isfinite(lease_s) and lease_s > 0):
            raise ValueError(f"lease_s must be a positive number of seconds, got {lease_s}")
        self.dsn = dsn
        self.codec = codec
        """Encodes accounts before they are written, decodes them when read
        (``failover.codec``); ``None`` stores them as given."""
        self.path = mask_dsn(dsn)
        """How this journal is named in messages (the DSN, password masked)."""
        self.schema = schema
        self.instance = instance or (
            f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(24):06x}")
        self.lease_s = float(lease_s)
        self.margin_s = self.lease_s / 10
        self.read_only = read_only
        self.migrate_on_open = migrate
        self.poll_s = poll_s
        self.sweep_batch = sweep_batch
        self.connect_timeout_s = connect_timeout_s
        self.fate_timeout_s = self.lease_s if fate_timeout_s is None else fate_timeout_s
        self.command_timeout_s = max(2.0, self.lease_s / 4)
        """A statement answered later than this is a connection fault (read back)."""
        self._held: dict[str, _Held] = {}
        self._lapsing: set[str] = set()
        """Held keys whose drive ended while a thread of them ran: let lapse once it ends."""
        self._lanes: list[_Lane] = []
        """The writers: each a connection and a queue; a key's writes all go through one
        (``_lane``), so two transactions of this instance never wait on each other's row
        locks, and one lane's batch runs on the server while another's is built here."""
        self.writers = writers
        self._renewer: asyncio.Task[None] | None = None
        self._listener: asyncpg.Connection | None = None
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._errors = _CONNECTION_ERRORS
        self.writes = WriteStats()
        """Batches committed, operations in them, and observers of each batch's size and
        duration (``failover.metrics.JournalCollector`` adds one)."""
        self._sql = _Statements(schema)

    # ---- lifecycle -------------------------------------------------------------------

    async def _connect(self) -> asyncpg.Connection:
        import asyncpg

        try:
            return await asyncpg.connect(
                self.dsn, timeout=self.connect_timeout_s,
                # A statement that does not answer (a half-open connection, a stuck
                # server) ends as a connection fault: the write's fate is read back.
                command_timeout=self.command_timeout_s,
                server_settings={
                    "application_name": f"failover:{self.instance}"[:63],
                    # A session that dies inside a transaction must not hold row locks
                    # that other instances wait on; a lock wait fails one operation.
                    "idle_in_transaction_session_timeout": str(
                        int(self.command_timeout_s * 2000)),
                    "lock_timeout": str(int(self.command_timeout_s * 1000)),
                    "tcp_keepalives_idle": "5", "tcp_keepalives_interval": "2",
                    "tcp_keepalives_count": "3",
                },
            )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise JournalError(f"cannot connect to journal {self.path}: {exc}") from exc

    async def migrate(self) -> tuple[int, int]:
        """Apply the migrations this version knows; return (version before, after).
        Several instances migrating at once take turns on an advisory lock."""
        conn = await self._connect()
        try:
            await conn.execute("SELECT pg_advisory_lock(hashtext($1))",
                               f"failover-migrate:{self.schema}")
            try:
                before = await self._version(conn)
                if before > SCHEMA_VERSION:
                    raise SchemaVersionError(f"{self.path} schema {self.schema}", before,
                                             SCHEMA_VERSION)
                for version, script in _MIGRATIONS:
                    if version <= before:
                        continue
                    async with conn.transaction():
                        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
                        await conn.execute(
                            f"CREATE TABLE IF NOT EXISTS {self.schema}.meta"
                            " (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)")
                        await conn.execute(script.format(s=self.schema))
                        await conn.execute(
                            f"INSERT INTO {self.schema}.meta VALUES (1, $1) ON CONFLICT (id)"
                            " DO UPDATE SET version = EXCLUDED.version", version)
                return before, max(before, _MIGRATIONS[-1][0])
            finally:
                await conn.execute("SELECT pg_advisory_unlock(hashtext($1))",
                                   f"failover-migrate:{self.schema}")
        except _connection_errors() as exc:
            raise JournalError(f"journal {self.path}: migration interrupted: {exc}") from exc
        finally:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _version(self, conn: asyncpg.Connection) -> int:
        exists = await conn.fetchval("SELECT to_regclass($1)", f"{self.schema}.meta")
        if exists is None:
            return 0
        version = await conn.fetchval(f"SELECT version FROM {self.schema}.meta WHERE id = 1")
        return int(version or 0)

    async def _check_version(self, conn: asyncpg.Connection) -> None:
        version = await self._version(conn)
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(f"{self.path} schema {self.schema}", version,
                                     SCHEMA_VERSION)
        if version < SCHEMA_VERSION:
            state = "has no failover journal" if version == 0 else \
                f"has journal schema version {version}, older than {SCHEMA_VERSION}"
            option = "" if self.schema == "failover" else f" --schema {self.schema}"
            raise JournalError(
                f"{self.path} schema {self.schema!r} {state}: run 'failover migrate"
                f" {self.path}{option}' or open it with PostgresJournal(..., migrate=True)")

    async def open(self) -> None:
        if self._lanes:
            return
        self._errors = _connection_errors()
        if self.migrate_on_open and not self.read_only:
            await self.migrate()
        conn = await self._connect()
        try:
            await self._check_version(conn)
            listener = None
            if not self.read_only:
                listener = await self._connect()
                await listener.add_listener(f"failover_{self.schema}", self._notified)
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.close()
            raise
        self._listener = listener
        loop = asyncio.get_running_loop()
        for number in range(1 if self.read_only else self.writers):
            lane = _Lane(asyncio.Queue(), conn if number == 0 else None)
            lane.task = loop.create_task(self._write_loop(lane),
                                         name=f"failover-journal:{self.path}:{number}")
            self._lanes.append(lane)
        if not self.read_only:
            self._renewer = loop.create_task(self._renew_loop(),
                                             name=f"failover-leases:{self.path}")

    async def close(self) -> None:
        """Stop writing.  Leases are not given back: they expire within ``lease_s`` and
        are taken over, as a crashed instance's are (anything may still be in the air)."""
        if not self._lanes:
            return
        lanes, self._lanes = self._lanes, []
        for lane in lanes:
            lane.queue.put_nowait(None)
        if self._renewer is not None:
            self._renewer.cancel()
            self._renewer = None
        pinned = {key: held.token for key, held in self._held.items() if self._pinned(key)}
        if pinned:
            # Started first, so no renewal is missed while the writers drain; on a thread
            # and a loop of its own: a service that stops its event loop (or a
            # BlockingRouter's) must not stop the renewals while the threads still run.
            threading.Thread(target=asyncio.run, args=(self._keep(pinned),), daemon=True,
                             name=f"failover-keeper:{self.path}").start()
        # What is queued is written; a writer stuck on a dead server is not waited for.
        tasks = [lane.task for lane in lanes if lane.task is not None]
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(asyncio.gather(*tasks)),
                                   timeout=self.connect_timeout_s)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self.connect_timeout_s)
        # Whatever the stopped writers had not answered is answered now: nobody waits
        # for ever on a closed journal.
        closed = JournalError(f"journal {self.path} closed before the operation ended")
        for lane in lanes:
            for op in (*lane.batch, *lane.pending):
                _fail(op.future, closed)
            while not lane.queue.empty():
                item = lane.queue.get_nowait()
                if item is not None:
                    _fail(item.future, closed)
        self._held.clear()
        self._lapsing.clear()
        for conn in (*(lane.conn for lane in lanes), self._listener):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), timeout=self.connect_timeout_s)
                if not conn.is_closed():
                    conn.terminate()
        self._listener = None
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        self._waiters.clear()

    async def _keep(self, pinned: dict[str, int]) -> None:
        """After ``close()``: renew the leases of pinned keys (their threads still run)
        on a connection of its own, until no thread of them runs (or another opening
        holds them under a new token).  No drive of them is left here, so they are marked
        as waiting on their channel: a second caller of the key gets that, not a wait."""
        conn: asyncpg.Connection | None = None
        try:
            while keys := [key for key in pinned if self._pinned(key)]:
                try:
                    if conn is None or conn.is_closed():
                        conn = await self._connect()
                    kept = {row[0] for row in await conn.fetch(
                        self._sql.renew_waiting, keys, [pinned[k] for k in keys],
                        self.lease_s)}
                    for key in keys:
                        if key not in kept:
                            del pinned[key]  # held under a new token, or ended
                except Exception as exc:  # whatever it is, try again on a new connection
                    _log.warning("journal %s: cannot renew the leases of running threads:"
                                 " %s", self.path, exc)
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            conn.terminate()
                    conn = None
                await asyncio.sleep(self.lease_s / 4)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()

    # ---- the writer ------------------------------------------------------------------

    async def _submit(self, apply: Callable[[Any], Awaitable[T]],
                      settle: Callable[[Any], Awaitable[T]] | None = None,
                      key: str | None = None, route: str | None = None,
                      wrote: Callable[[T], bool] = _write) -> T:
        """Queue an operation on the lane of ``route`` (default ``key``: the repayment
        whose lease a write failing with an unknown fate gives up).  ``wrote`` tells
        from ``apply``'s answer whether it wrote (``_read`` for a read): reads share the
        writers, but only transactions that wrote count in ``writes``."""
        lanes = self._lanes
        if not lanes:
            raise JournalError(f"journal {self.path} is not open")
        route = route if route is not None else key
        lane = lanes[hash(route) % len(lanes)] if route is not None else lanes[0]
        if lane.down_since is not None and lane.settling:
            # Unreachable, and the writer is busy reading back an unknown write: fail
            # fast rather than queue behind it.
            raise JournalError(f"journal {self.path}: the database is unreachable")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        lane.queue.put_nowait(_Op(apply, settle, future, key, wrote))
        value = await future
        return value if self.codec is None else decoded(value, self.codec)

    async def _write_loop(self, lane: _Lane) -> None:
        queue = lane.queue
        stopping = False
        while not stopping:
            first = await queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < _MAX_BATCH and not queue.empty():
                item = queue.get_nowait()
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            lane.batch = batch
            try:
                await self._run_batch(lane, batch)
            except Exception as exc:
                # The writer must outlive anything: a dead writer would leave every later
                # write of its lane waiting for ever.
                _log.exception("journal %s: a batch failed unexpectedly", self.path)
                if lane.conn is not None:
                    self._drop(lane, lane.conn)
                for op in batch:
                    _fail(op.future, JournalError(f"journal {self.path}: {exc!r}"))

    async def _connection(self, lane: _Lane) -> asyncpg.Connection:
        if lane.conn is not None and not lane.conn.is_closed():
            return lane.conn
        lane.conn = None
        try:
            conn = await self._connect()
        except JournalError:
            if lane.down_since is None:
                lane.down_since = time.monotonic()
            raise
        lane.conn, lane.down_since = conn, None
        return conn

    async def _begin(self, lane: _Lane) -> tuple[asyncpg.Connection, Any] | None:
        """A connection with a transaction begun, or None if the database cannot be
        reached.  Nothing of the batch has been sent yet, so a connection found dead
        here (dropped while idle) is replaced once without any doubt about a write."""
        for _ in range(2):
            try:
                conn = await self._connection(lane)
            except JournalError:
                return None
            transaction = conn.transaction()
            try:
                await transaction.start()
            except Exception:  # whatever it is, nothing was sent: a new connection
                self._drop(lane, conn)
                continue
            return conn, transaction
        return None

    async def _run_batch(self, lane: _Lane, batch: list[_Op]) -> None:
        started = time.perf_counter()
        begun = await self._begin(lane)
        if begun is None:
            # Nothing was sent: each operation certainly did not happen.
            for op in batch:
                _fail(op.future, JournalError(f"journal {self.path}: the database is"
                                              " unreachable"))
            return
        conn, transaction = begun
        results: list[tuple[_Op, Any, BaseException | None]] = []
        try:
            try:
                for op in batch:
                    try:
                        results.append((op, await op.apply(conn), None))
                    except (JournalError, UnknownRepayment) as exc:
                        results.append((op, None, exc))  # a refusal: the transaction goes on
            except BaseException:
                if not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await transaction.rollback()
                raise
            await transaction.commit()
        except self._errors as exc:
            pid = _server_pid(conn)
            self._drop(lane, conn)
            await self._settle_unknown(lane, batch, exc, pid)
            return
        except Exception as exc:
            if len(batch) == 1:
                _fail(batch[0].future, _translate(exc, self.path))
                return
            # One operation's statement failed and aborted the batch: each alone, so
            # the faulty one fails by itself.
            for op in batch:
                await self._run_batch(lane, [op])
            return
        seconds = time.perf_counter() - started
        for op, value, error in results:
            if error is not None:
                _fail(op.future, error)
            elif not op.future.done():
                op.future.set_result(value)
        # Counted and observed once the callers have their answers: nothing done here
        # can hold back (or, if it escaped, lose) an answer already committed.  A
        # refusal wrote nothing; a read, or a write that found nothing to change, either.
        wrote = sum(op.wrote(value) for op, value, error in results if error is None)
        if wrote:
            self.writes.committed(wrote, seconds)

    def _drop(self, lane: _Lane, conn: asyncpg.Connection) -> None:
        if lane.conn is conn:
            lane.conn = None
        with contextlib.suppress(Exception):
            conn.terminate()

    async def _settle_unknown(self, lane: _Lane, batch: list[_Op], cause: BaseException,
                              pid: int | None) -> None:
        """The connection dropped while the batch was sent: read back each operation's
        fate before answering anything for it."""
        _log.warning("journal %s: connection lost during a write (%s); reading back",
                     self.path, cause)
        deadline = time.monotonic() + self.fate_timeout_s
        pending = list(batch)
        lane.settling = True
        lane.pending = pending
        try:
            await self._read_back(lane, pending, deadline, pid)
        finally:
            lane.settling = False
            lane.pending = []

    async def _read_back(self, lane: _Lane, pending: list[_Op], deadline: float,
                         pid: int | None) -> None:
        retryable: tuple[type[BaseException], ...] = (*self._errors, JournalError)
        delay = 0.05
        while pending:
            op = pending[0]
            try:
                conn = await self._connection(lane)
                if pid is not None:
                    # The old session may still be committing (a slow fsync, a timed-out
                    # statement): what it wrote is only readable once it is gone.
                    await self._await_gone(conn, pid, deadline)
                    pid = None
                async with conn.transaction():
                    value = await (op.settle or op.apply)(conn)
            except retryable as exc:
                if isinstance(exc, (OwnershipLost, TerminalStateError, AccountUnusable)):
                    pending.pop(0)  # a refusal: the write certainly did not happen
                    _fail(op.future, exc)
                    continue
                if lane.conn is not None:
                    # This attempt's session may itself still be committing: waited for
                    # too before the next look.
                    pid = _server_pid(lane.conn) if pid is None else pid
                    self._drop(lane, lane.conn)
                if time.monotonic() >= deadline:
                    for left in pending:
                        if left.key is not None:
                            self.let_lapse(left.key)  # its lease expires; taken over
                        _fail(left.future, JournalError(
                            f"journal {self.path}: the database did not come back within"
                            f" {self.fate_timeout_s:g} s; a write's fate is unknown"))
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            except UnknownRepayment as exc:
                pending.pop(0)
                _fail(op.future, exc)
                continue
            except Exception as exc:
                pending.pop(0)
                _fail(op.future, _translate(exc, self.path))
                continue
            pending.pop(0)
            if not op.future.done():
                op.future.set_result(value)

    async def _await_gone(self, conn: asyncpg.Connection, pid: int, deadline: float) -> None:
        import asyncpg

        with contextlib.suppress(asyncpg.PostgresError):  # not allowed: it ends by itself
            await conn.execute("SELECT pg_terminate_backend($1)", pid)
        while await conn.fetchval("SELECT 1 FROM pg_stat_activity WHERE pid = $1", pid):
            if time.monotonic() >= deadline:
                raise JournalError(f"journal {self.path}: session {pid} did not end")
            await asyncio.sleep(0.02)

    # ---- leases ----------------------------------------------------------------------

    def _drop_held(self, key: str, token: int) -> None:
        held = self._held.get(key)
        if held is not None and held.token == token:
            del self._held[key]

    def pin(self, key: str, running: Callable[[], bool]) -> None:
        """A plain-``def`` submit of ``key`` runs on a thread of this process while
        ``running()``: until it ends, this process keeps ``key``'s lease (renewed even
        past ``close()``, never released or let lapse), so no other instance takes the
        repayment over while that thread can still collect.  Pins are process-wide (any
        journal object on a schema of that name sees them, however its DSN is spelled:
        holding too long is safe, letting go too soon is not) and clear themselves."""
        with _PINS_LOCK:
            _PINS.setdefault((self.schema, key), []).append(running)

    def _pinned(self, key: str) -> bool:
        with _PINS_LOCK:
            checks = _PINS.get((self.schema, key))
            if checks is None:
                return False
            checks[:] = [check for check in checks if check()]
            if not checks:
                del _PINS[(self.schema, key)]
            return bool(checks)

    def let_lapse(self, key: str) -> None:
        """Stop renewing ``key`` without writing (its drive ended on an error): the
        lease runs out and whichever instance sweeps it first resumes it."""
        if not self._pinned(key):
            self._held.pop(key, None)
        elif key in self._held:
            self._lapsing.add(key)  # kept while its thread runs, then let lapse

    def _take(self, key: str, token: int, sent: float) -> None:
        self._held[key] = _Held(token, sent + self.lease_s)
        self._lapsing.discard(key)  # driven again

    def _token(self, key: str) -> int:
        """This instance's token for ``key``; -1 (no row has it) if it does not own it,
        so the write is refused and ``_refuse`` says why."""
        held = self._held.get(key)
        return -1 if held is None else held.token

    def _extend(self, keys: Sequence[str], sent: float) -> None:
        for key in keys:
            held = self._held.get(key)
            if held is not None:
                held.expires = max(held.expires, sent + self.lease_s)

    async def hold(self, key: str, seconds: float) -> None:
        needed = seconds + self.margin_s
        held = self._held.get(key)
        if held is None:
            raise OwnershipLost(key)
        if held.expires - time.monotonic() >= needed:
            return
        if needed >= self.lease_s:
            raise JournalError(
                f"lease_s ({self.lease_s:g} s) must exceed the channel timeout plus a margin"
                f" ({needed:g} s): a call could outlive its owner's lease")
        await self._renew([key])
        if key not in self._held:
            raise OwnershipLost(key)

    async def _renew(self, keys: Sequence[str], waiting: bool = False) -> None:
        """Renew the leases of ``keys``: one statement per writer lane, each on the lane
        its keys' other writes use (so no two transactions of this instance lock the
        same rows in different orders)."""
        by_lane: dict[int, list[tuple[str, int]]] = {}
        lanes = max(1, len(self._lanes))
        for key in keys:
            held = self._held.get(key)
            if held is not None:
                by_lane.setdefault(hash(key) % lanes, []).append((key, held.token))
        await asyncio.gather(*(self._renew_lane(pairs, waiting)
                               for pairs in by_lane.values()))

    async def _renew_lane(self, pairs: list[tuple[str, int]], waiting: bool) -> None:
        sent = time.monotonic()
        sql = self._sql.renew_waiting if waiting else self._sql.renew

        async def apply(conn: asyncpg.Connection) -> set[str]:
            rows = await conn.fetch(sql, [k for k, _ in pairs], [t for _, t in pairs],
                                    self.lease_s)
            return {row[0] for row in rows}

        kept = await self._submit(apply, route=pairs[0][0], wrote=bool)
        for key, token in pairs:
            held = self._held.get(key)
            if held is None or held.token != token:
                continue
            if key in kept:
                held.expires = max(held.expires, sent + self.lease_s)
            else:
                del self._held[key]  # taken over, or ended: never touched again

    async def _renew_loop(self) -> None:
        """Renew every lease this instance holds, in one statement per round."""
        while True:
            await asyncio.sleep(self.lease_s / 4)
            await self._listen()
            for key in list(self._lapsing):
                if key not in self._held or not self._pinned(key):
                    self._lapsing.discard(key)
                    self._held.pop(key, None)
            lapsing = [key for key in self._lapsing if key in self._held]
            due = [key for key, held in self._held.items()
                   if held.expires - time.monotonic() < self.lease_s * 0.75
                   and key not in self._lapsing]
            try:
                if lapsing:  # no drive of them left: marked as waiting on their channel
                    await self._renew(lapsing, waiting=True)
                for start in range(0, len(due), 5000):
                    await self._renew(due[start:start + 5000])
            except JournalError as exc:
                _log.warning("journal %s: lease renewal failed: %s", self.path, exc)

    async def _listen(self) -> None:
        """Listen again after the listening connection dropped (polling covers the gap)."""
        if self._listener is not None and not self._listener.is_closed():
            return
        try:
            listener = await self._connect()
            await listener.add_listener(f"failover_{self.schema}", self._notified)
        except Exception as exc:
            _log.info("journal %s: cannot listen for notifications yet: %s", self.path, exc)
            return
        self._listener = listener

    async def acquire(self, key: str) -> Record | None:
        sent = time.monotonic()
        held = self._held.get(key)
        sql = self._sql

        async def apply(conn: asyncpg.Connection) -> tuple[Record | None, int | None]:
            if held is not None:
                row = await conn.fetchrow(sql.touch, key, held.token, self.lease_s)
                if row is not None:
                    return await _load(conn, sql, key), held.token
            token = await conn.fetchval(sql.acquire, key, self.instance, self.lease_s)
            record = await _load(conn, sql, key)
            if record is None:
                raise UnknownRepayment(key)
            return record, token

        async def settle(conn: asyncpg.Connection) -> tuple[Record | None, int | None]:
            record, token = await _load_owned(conn, sql, key, self.instance)
            if record is None:
                raise UnknownRepayment(key)
            if token is not None:
                return record, token
            return await apply(conn)

        record, token = await self._submit(apply, settle, key, wrote=_owned)
        if token is not None and record is not None and \
                record.status is RepaymentStatus.PENDING:
            self._take(key, token, sent)
            return record
        self._held.pop(key, None)
        if record is not None and record.status is not RepaymentStatus.PENDING:
            return record
        return None

    async def release(self, key: str) -> None:
        if self._pinned(key):
            # A thread of it still runs here: kept and renewed until it ends, then let
            # lapse (whoever sweeps it first settles what the thread did).
            if key in self._held:
                self._lapsing.add(key)
            return
        held = self._held.pop(key, None)
        if held is None:
            return
        sql = self._sql.release
        await self._submit(lambda conn: conn.execute(sql, key, held.token), key=key,
                           wrote=_changed)

    def watch(self, key: str) -> asyncio.Future[None]:
        """A future set when ``key`` next changes owner or state (a notification);
        taken before reading the state, so a change in between is not missed."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append(waiter)
        waiter.add_done_callback(lambda done: self._unwatch(key, done))
        return waiter

    def _unwatch(self, key: str, waiter: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(key)
        if waiters is not None:
            with contextlib.suppress(ValueError):
                waiters.remove(waiter)
            if not waiters:
                del self._waiters[key]

    async def changed(self, key: str, waiter: asyncio.Future[None], timeout_s: float) -> None:
        """Wait for ``waiter`` (from ``watch``), ``timeout_s`` or ``poll_s`` at most;
        the waiter is done with afterwards."""
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter),
                                       timeout=min(timeout_s, self.poll_s))
        finally:
            if not waiter.done():
                waiter.cancel()

    def _notified(self, conn: Any, pid: int, channel: str, key: str) -> None:
        for waiter in self._waiters.pop(key, ()):
            if not waiter.done():
                waiter.set_result(None)

    async def take_expired(self, limit: int) -> list[str]:
        sent = time.monotonic()
        sql = self._sql
        held = set(self._held)

        async def settle(conn: asyncpg.Connection) -> list[Any]:
            # A sweep whose commit answer was lost took rows this instance now owns.
            owned = [row for row in await conn.fetch(sql.owned, self.instance)
                     if row[0] not in held]
            return owned or list(await conn.fetch(sql.sweep, self.instance, self.lease_s,
                                                  limit))

        rows = await self._submit(
            lambda conn: conn.fetch(sql.sweep, self.instance, self.lease_s, limit), settle,
            wrote=bool)  # nothing expired: the sweep wrote nothing
        for key, token in rows:
            self._take(key, token, sent)
        return [row[0] for row in rows]

    # ---- operations ------------------------------------------------------------------

    async def create(
        self, repayment: Repayment, preference: tuple[str, ...] | None, now: datetime,
        first_attempt: tuple[str, str] | None = None,
    ) -> tuple[Record, bool]:
        record = new_record(repayment, preference, now)
        if first_attempt is not None:
            sent_attempt = Attempt(*first_attempt, None, None, now, None, round=1)
            record = Record(
                record.key, record.account, record.amount, record.currency, record.due_at,
                record.metadata, record.preference, record.status, record.round,
                record.created_at, record.updated_at, attempts=(sent_attempt,))
        if self.codec is not None:  # held as stored; _submit decodes what it returns
            record = dataclasses.replace(record, account=self.codec.encode(record.account))
        sql = self._sql
        args = (
            record.key, record.account, record.amount, record.currency, record.due_at,
            json.dumps(record.metadata), None if preference is None else list(preference),
            PendingReason.IN_FLIGHT.value, now, self.instance, self.lease_s,
            None if first_attempt is None else first_attempt[0],
            None if first_attempt is None else first_attempt[1],
        )
        sent = time.monotonic()

        async def apply(conn: asyncpg.Connection) -> tuple[Record, int | None]:
            token = await conn.fetchval(sql.create, *args)
            if token is not None:
                return record, token
            existing = await _load(conn, sql, record.key)
            assert existing is not None
            return existing, None

        async def settle(conn: asyncpg.Connection) -> tuple[Record, int | None]:
            existing, token = await _load_owned(conn, sql, record.key, self.instance)
            if existing is None:
                return await apply(conn)
            # Ours only if this very write made it: an older repayment of the key that
            # this instance still holds has the same owner and opening reference.
            mine = token is not None and existing.created_at == now and (
                first_attempt is None or (
                    existing.attempts[:1] and existing.attempts[0].reference
                    == first_attempt[1] and existing.attempts[0].started_at == now))
            return existing, token if mine else None

        stored, token = await self._submit(apply, settle, record.key, wrote=_owned)
        if token is None:
            return stored, False
        self._take(record.key, token, sent)
        return stored, True

    async def load(self, key: str) -> Record | None:
        sql = self._sql
        return await self._submit(lambda conn: _load(conn, sql, key), route=key,
                                  wrote=_read)

    async def load_many(self, keys: Sequence[str]) -> dict[str, Record]:
        sql = self._sql
        found: dict[str, Record] = {}
        for start in range(0, len(keys), 1000):
            chunk = list(keys[start:start + 1000])
            found.update(await self._submit(functools.partial(_load_many, sql=sql, keys=chunk),
                                            wrote=_read))
        return found

    async def begin_attempt(
        self, key: str, round: int, channel: str, reference: str, now: datetime
    ) -> int:
        token = self._token(key)
        sql = self._sql
        sent = time.monotonic()

        async def apply(conn: asyncpg.Connection) -> int:
            number = await conn.fetchval(sql.begin, key, token, round, channel, reference,
                                         now, self.lease_s)
            if number is None:
                await self._refuse(conn, key, token)
            return int(number)

        async def settle(conn: asyncpg.Connection) -> int:
            number = await conn.fetchval(sql.find_attempt, key, round, reference, now)
            return int(number) if number is not None else await apply(conn)

        number = await self._submit(apply, settle, key)
        self._extend((key,), sent)
        return number

    async def finish_attempt(
        self, key: str, number: int, result: ChannelResult, now: datetime
    ) -> None:
        held = self._held.get(key)
        sql = self._sql
        args = (key, number, result.outcome.value, result.code, result.detail,
                result.channel_reference, now)
        if held is None:
            # Not ours (any more): only an answer nobody has yet is written, never over
            # one; the attempt's fact is true whoever owns the repayment now.
            await self._submit(lambda conn: conn.execute(sql.finish_attempt_unowned, *args),
                               route=key, wrote=_changed)
            return

        async def apply(conn: asyncpg.Connection) -> None:
            done = await conn.fetchval(sql.finish_attempt, *args, held.token)
            if done is None:
                await self._refuse(conn, key, held.token, terminal_ok=True)

        await self._submit(apply, key=key)

    async def resolve_attempts(
        self, key: str, round: int, reference: str, resolution: Outcome, now: datetime,
        channel_reference: str | None = None,
    ) -> None:
        token = self._token(key)
        sql = self._sql

        async def apply(conn: asyncpg.Connection) -> None:
            done = await conn.fetchval(sql.resolve, key, token, round, reference,
                                       resolution.value, channel_reference)
            if done is None:
                await self._refuse(conn, key, token)

        await self._submit(apply, key=key)

    async def set_pending(
        self, key: str, round: int, reason: PendingReason, channel: str | None,
        code: str | None, now: datetime,
    ) -> None:
        token = self._token(key)
        sql = self._sql.set_pending

        async def apply(conn: asyncpg.Connection) -> None:
            done = await conn.fetchval(sql, key, token, round, reason.value, channel, code,
                                       now)
            if done is None:
                await self._refuse(conn, key, token)

        await self._submit(apply, key=key)

    async def finish(
        self, key: str, round: int, status: RepaymentStatus, channel: str | None,
        channel_reference: str | None, code: str | None, now: datetime,
        *, attempt: tuple[int, ChannelResult] | None = None,
        resolution: Resolution | None = None, skips: Sequence[Skip] = (),
    ) -> Record:
        held = self._held.get(key)
        token = -1 if held is None else held.token
        sql = self._sql
        answer = attempt[1] if attempt is not None else None
        args = (
            key, token, round, status.value, channel, channel_reference, code, now,
            None if attempt is None else attempt[0],
            None if answer is None else answer.outcome.value,
            None if answer is None else answer.code,
            None if answer is None else answer.detail,
            None if answer is None else answer.channel_reference,
            None if resolution is None else resolution.reference,
            None if resolution is None else resolution.outcome.value,
            None if resolution is None else resolution.channel_reference,
            json.dumps(skips_json(skips)) if skips else None,
        )

        async def apply(conn: asyncpg.Connection) -> Record:
            row = await conn.fetchrow(sql.finish, *args)
            if row is None:
                await self._refuse(conn, key, token)
                raise AssertionError("unreachable: _refuse raises for a pending repayment")
            # A second statement sees the first one's changes to the attempts.
            await conn.execute(sql.watch, key, now)
            return _record(row, tuple(_attempt(a[1:]) for a in row[-1] or ()))

        async def settle(conn: asyncpg.Connection) -> Record:
            record = await _load(conn, sql, key)
            if record is not None and record.status is status and record.round == round \
                    and record.channel_reference == channel_reference \
                    and record.updated_at == now:
                return record  # the lost commit had ended it
            return await apply(conn)

        try:
            return await self._submit(apply, settle, key)
        finally:
            if self._held.get(key) is held:
                self._held.pop(key, None)

    async def new_round(self, key: str, now: datetime) -> Record:
        sql = self._sql
        sent = time.monotonic()

        async def apply(conn: asyncpg.Connection) -> tuple[Record, int]:
            row = await conn.fetchrow(
                f"SELECT status, round FROM {self.schema}.repayments WHERE key = $1", key)
            if row is None:
                raise UnknownRepayment(key)
            if row[0] != RepaymentStatus.FAILED.value:
                raise TerminalStateError(key, row[0])
            token = await conn.fetchval(sql.new_round, key, row[1], self.instance,
                                        self.lease_s, now, PURGED)
            if token is None:
                # Another instance started the new round first, or a purge erased the
                # account meanwhile (a round that could call no channel would stay
                # pending): the row as it is now says which.
                now_row = await conn.fetchrow(
                    f"SELECT status, account FROM {self.schema}.repayments WHERE key = $1",
                    key)
                if now_row is not None and now_row[0] == RepaymentStatus.FAILED.value \
                        and now_row[1] == PURGED:
                    raise unusable_account(key)
                raise TerminalStateError(key, RepaymentStatus.PENDING.value)
            record = await _load(conn, sql, key)
            assert record is not None
            return record, int(token)

        async def settle(conn: asyncpg.Connection) -> tuple[Record, int]:
            record, token = await _load_owned(conn, sql, key, self.instance)
            if record is not None and token is not None and record.updated_at == now:
                return record, token
            return await apply(conn)

        record, token = await self._submit(apply, settle, key)
        self._take(key, token, sent)
        return record

    async def pending_keys(self, reason: PendingReason | None = None) -> list[str]:
        sql = (f"SELECT key FROM {self.schema}.repayments WHERE status = 'pending'"
               " AND ($1::text IS NULL OR pending_reason = $1) ORDER BY created_at")
        value = None if reason is None else reason.value
        rows = await self._submit(lambda conn: conn.fetch(sql, value), wrote=_read)
        return [row[0] for row in rows]

    async def stats(self) -> JournalStats:
        schema = self.schema

        async def op(conn: asyncpg.Connection) -> JournalStats:
            by_status = dict.fromkeys(RepaymentStatus, 0)
            for status, count in await conn.fetch(
                    f"SELECT status, COUNT(*) FROM {schema}.repayments GROUP BY status"):
                by_status[RepaymentStatus(status)] = count
            oldest = await conn.fetchval(
                f"SELECT MIN(created_at) FROM {schema}.repayments WHERE status = 'pending'")
            return JournalStats(by_status, oldest)

        return await self._submit(op, wrote=_read)

    async def recent_failovers(self, limit: int = 10) -> list[Failover]:
        sql = (
            "SELECT key, previous, channel, started_at FROM ("
            " SELECT key, channel, started_at, LAG(channel) OVER"
            " (PARTITION BY key, round ORDER BY number) AS previous"
            f" FROM (SELECT * FROM {self.schema}.attempts ORDER BY started_at DESC"
            "  LIMIT $1 * 20) recent) moves"
            " WHERE previous IS NOT NULL AND previous <> channel"
            " ORDER BY started_at DESC LIMIT $1")
        rows = await self._submit(lambda conn: conn.fetch(sql, limit), wrote=_read)
        return [Failover(r[0], r[1], r[2], r[3]) for r in rows]

    # ---- late collections, corrections, reminders -----------------------------------
    # Not fenced by a lease: a terminal repayment has no owner.  Checks are claimed by
    # pushing their next_at forward (FOR UPDATE SKIP LOCKED); every change to a check is
    # compare-and-set on its state, and a correction on the repayment's ending.

    async def watched(self, limit: int) -> list[str]:
        sql = (f"SELECT key FROM {self.schema}.repayments WHERE watch_at IS NOT NULL"
               " ORDER BY watch_at LIMIT $1")
        return [row[0] for row in await self._submit(lambda conn: conn.fetch(sql, limit),
                                                     wrote=_read)]

    async def start_watching(self, key: str,
                             checks_of: Callable[[Record], Sequence[LateCheck]]) -> None:
        schema, sql = self.schema, self._sql

        async def apply(conn: asyncpg.Connection) -> None:
            # The row locked first: an ending (which marks it again) waits for this write.
            if await conn.fetchval(f"SELECT 1 FROM {schema}.repayments WHERE key = $1"
                                   " FOR UPDATE", key) is None:
                raise UnknownRepayment(key)
            record = await _load(conn, sql, key)
            assert record is not None
            rows = [late_check_row(check) for check in checks_of(record)]
            if rows:
                await conn.executemany(
                    f"INSERT INTO {schema}.late_checks ({LATE_COLUMNS}) VALUES ({_LATE_MARKS})"
                    " ON CONFLICT (key, reference) DO NOTHING", rows)
            await conn.execute(f"UPDATE {schema}.repayments SET watch_at = NULL WHERE key = $1",
                               key)

        await self._submit(apply, route=key)

    async def due_late_checks(self, now: datetime, limit: int, claim_until: datetime
                              ) -> list[LateCheck]:
        sql = (f"WITH due AS (SELECT key, reference FROM {self.schema}.late_checks"
               " WHERE next_at <= $1 ORDER BY next_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
               f" UPDATE {self.schema}.late_checks AS c SET next_at = $3 FROM due"
               " WHERE c.key = due.key AND c.reference = due.reference"
               f" RETURNING {', '.join('c.' + col for col in LATE_COLUMNS.split(', '))}")

        async def apply(conn: asyncpg.Connection) -> list[Any]:
            return list(await conn.fetch(sql, now, limit, claim_until))

        rows = await self._submit(apply, wrote=bool)  # none due: it claimed nothing
        # next_at as it was when claimed: the caller works from the schedule it read.
        return sorted((dataclasses.replace(late_check_from(r, _same), next_at=now)
                       for r in rows), key=lambda c: (c.key, c.reference))

    async def update_late_check(self, check: LateCheck, expect: LateCheck) -> bool:
        row = late_check_row(check)
        sql = (f"UPDATE {self.schema}.late_checks SET state = $3, checks = $4, next_at = $5,"
               " found_at = $6, found_by = $7, channel_reference = $8, refund = $9,"
               " refund_reference = $10, refund_code = $11, refund_at = $12"
               " WHERE key = $1 AND reference = $2 AND state = $13"
               " AND refund IS NOT DISTINCT FROM $14 AND checks = $15 RETURNING 1")
        args = (check.key, check.reference, *row[4:], expect.state.value,
                None if expect.refund is None else expect.refund.value, expect.checks)

        async def apply(conn: asyncpg.Connection) -> bool:
            return await conn.fetchval(sql, *args) is not None

        return await self._submit(apply, route=check.key, wrote=bool)

    async def late_checks(self, key: str | None = None, *, state: LateState | None = None,
                          refund: RefundState | None = None) -> list[LateCheck]:
        sql = (f"SELECT {LATE_COLUMNS} FROM {self.schema}.late_checks"
               " WHERE ($1::text IS NULL OR key = $1) AND ($2::text IS NULL OR state = $2)"
               " AND ($3::text IS NULL OR refund = $3) ORDER BY key, round, reference")
        args = (key, None if state is None else state.value,
                None if refund is None else refund.value)
        rows = await self._submit(lambda conn: conn.fetch(sql, *args), wrote=_read)
        return [late_check_from(r, _same) for r in rows]

    async def collected_late(self, check: LateCheck) -> bool:
        schema = self.schema
        row = late_check_row(check)

        async def apply(conn: asyncpg.Connection) -> bool:
            if await conn.fetchval(f"SELECT 1 FROM {schema}.repayments WHERE key = $1",
                                   check.key) is None:
                raise UnknownRepayment(check.key)
            done = await conn.fetchval(
                f"INSERT INTO {schema}.late_checks ({LATE_COLUMNS}) VALUES ({_LATE_MARKS})"
                " ON CONFLICT (key, reference) DO UPDATE SET state = excluded.state,"
                " next_at = excluded.next_at, found_at = excluded.found_at,"
                " found_by = excluded.found_by, channel_reference = COALESCE("
                "excluded.channel_reference, late_checks.channel_reference)"
                " WHERE late_checks.state <> 'collected' RETURNING 1", *row)
            return done is not None

        return await self._submit(apply, route=check.key, wrote=bool)

    async def correct(self, key: str, round: int, correction: Correction,
                      displaced: LateCheck | None = None, *, after: int = 0) -> Record:
        schema, sql, c = self.schema, self._sql, correction
        kept = json.dumps([correction_json(c)])
        displaced_row = None if displaced is None else late_check_row(displaced)

        async def apply(conn: asyncpg.Connection) -> Record:
            done = await conn.fetchval(
                f"UPDATE {schema}.repayments SET status = $1, channel = $2,"
                " channel_reference = $3, code = NULL,"
                " corrections = COALESCE(corrections, '[]'::jsonb) || $4::jsonb,"
                " updated_at = $5 WHERE key = $6 AND round = $7 AND status = $8"
                " AND channel IS NOT DISTINCT FROM $9"
                " AND channel_reference IS NOT DISTINCT FROM $10"
                " AND jsonb_array_length(COALESCE(corrections, '[]'::jsonb)) = $11 RETURNING 1",
                c.new_status.value, c.new_channel, c.new_channel_reference, kept, c.at, key,
                round, c.old_status.value, c.old_channel, c.old_channel_reference, after)
            if done is None:
                status = await conn.fetchval(
                    f"SELECT status FROM {schema}.repayments WHERE key = $1", key)
                if status is None:
                    raise UnknownRepayment(key)
                raise TerminalStateError(key, status)
            if displaced_row is not None:
                await conn.execute(
                    f"INSERT INTO {schema}.late_checks ({LATE_COLUMNS}) VALUES ({_LATE_MARKS})"
                    " ON CONFLICT (key, reference) DO NOTHING", *displaced_row)
            record = await _load(conn, sql, key)
            assert record is not None
            return record

        async def settle(conn: asyncpg.Connection) -> Record:
            record = await _load(conn, sql, key)
            if record is not None and c in record.corrections:
                return record  # the lost commit had made it
            return await apply(conn)

        return await self._submit(apply, settle, route=key)

    async def find_reference(self, channel: str, reference: str) -> str | None:
        sql = (f"SELECT key FROM {self.schema}.attempts WHERE reference = $1 AND channel = $2"
               " LIMIT 1")
        key = await self._submit(lambda conn: conn.fetchval(sql, reference, channel),
                                 wrote=_read)
        return None if key is None else str(key)

    async def due_between(self, since: datetime | None, until: datetime | None
                          ) -> list[Record]:
        sql = self._sql
        keys_sql = (f"SELECT key FROM {sql.repayments} WHERE due_at IS NOT NULL"
                    " AND ($1::timestamptz IS NULL OR due_at >= $1)"
                    " AND ($2::timestamptz IS NULL OR due_at < $2)")

        async def op(conn: asyncpg.Connection) -> list[Record]:
            keys = [row[0] for row in await conn.fetch(keys_sql, since, until)]
            records = list((await _load_many(conn, sql=sql, keys=keys)).values())
            return sorted(records, key=lambda r: (r.due_at, r.key))

        return await self._submit(op, wrote=_read)

    async def at_risk(self, now: datetime, within_s: float) -> list[Record]:
        sql = (f"SELECT {_RECORD_COLUMNS} FROM {self.schema}.repayments"
               " WHERE due_at > $1 AND due_at <= $1 + make_interval(secs => $2)"
               " AND status <> 'succeeded' ORDER BY due_at, key")
        rows = await self._submit(lambda conn: conn.fetch(sql, now, within_s), wrote=_read)
        return [_record(row, ()) for row in rows]

    async def resolve_by_hand(self, key: str, round: int, correction: Correction) -> Record:
        schema, sql, c = self.schema, self._sql, correction
        code = None if c.new_status is RepaymentStatus.SUCCEEDED else "resolved_by_operator"
        kept = json.dumps([correction_json(c)])

        async def apply(conn: asyncpg.Connection) -> Record:
            # Not while an instance holds it: its drive could still call a channel.  The
            # token moves on, so a write of a stale owner is refused after this one.
            done = await conn.fetchval(
                f"UPDATE {schema}.repayments SET status = $3, channel = $4,"
                " channel_reference = $5, code = $6, pending_reason = NULL,"
                " pending_channel = NULL, updated_at = $7, owner = NULL, lease_until = NULL,"
                f" token = nextval('{schema}.tokens'),"
                " corrections = COALESCE(corrections, '[]'::jsonb) || $8::jsonb"
                " WHERE key = $1 AND round = $2 AND status = 'pending'"
                " AND (lease_until IS NULL OR lease_until < now()) RETURNING 1",
                key, round, c.new_status.value, c.new_channel, c.new_channel_reference, code,
                c.at, kept)
            if done is None:
                row = await conn.fetchrow(
                    f"SELECT status, owner, lease_until FROM {schema}.repayments"
                    " WHERE key = $1", key)
                if row is None:
                    raise UnknownRepayment(key)
                if row[0] != RepaymentStatus.PENDING.value:
                    raise TerminalStateError(key, row[0])
                raise JournalError(
                    f"repayment {key!r} is held by instance {row[1]!r} until {row[2]}:"
                    " it is being driven; resolve it once it waits on its channel")
            await conn.execute(sql.watch, key, c.at)
            record = await _load(conn, sql, key)
            assert record is not None
            return record

        async def settle(conn: asyncpg.Connection) -> Record:
            record = await _load(conn, sql, key)
            if record is not None and c in record.corrections:
                return record
            return await apply(conn)

        return await self._submit(apply, settle, route=key)

    async def set_override(self, override: Override) -> None:
        sql = (f"INSERT INTO {self.schema}.channel_overrides (channel, enabled, until, reason,"
               " by, at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (channel) DO UPDATE SET"
               " enabled = excluded.enabled, until = excluded.until, reason = excluded.reason,"
               " by = excluded.by, at = excluded.at")
        o = override
        await self._submit(lambda conn: conn.execute(sql, o.channel, o.enabled, o.until,
                                                     o.reason, o.by, o.at))

    async def clear_override(self, channel: str) -> bool:
        sql = f"DELETE FROM {self.schema}.channel_overrides WHERE channel = $1 RETURNING 1"
        deleted = await self._submit(lambda conn: conn.fetchval(sql, channel),
                                     wrote=lambda found: found is not None)
        return deleted is not None

    async def overrides(self) -> list[Override]:
        sql = (f"SELECT channel, enabled, until, reason, by, at FROM"
               f" {self.schema}.channel_overrides ORDER BY channel")
        rows = await self._submit(lambda conn: conn.fetch(sql), wrote=_read)
        return [Override(*row) for row in rows]

    async def report_breakers(self, instance: str, states: Mapping[str, str],
                              now: datetime) -> None:
        sql = (f"INSERT INTO {self.schema}.instance_breakers (instance, channel, state, at)"
               " SELECT $1, c, s, $4 FROM unnest($2::text[], $3::text[]) AS t(c, s)"
               " ON CONFLICT (instance, channel) DO UPDATE SET state = excluded.state,"
               " at = excluded.at")
        channels, values = list(states), list(states.values())
        await self._submit(lambda conn: conn.execute(sql, instance, channels, values, now))

    async def breaker_reports(self) -> list[tuple[str, str, str, datetime]]:
        sql = (f"SELECT instance, channel, state, at FROM {self.schema}.instance_breakers"
               " ORDER BY instance, channel")
        rows = await self._submit(lambda conn: conn.fetch(sql), wrote=_read)
        return [(row[0], row[1], row[2], row[3]) for row in rows]

    async def find(self, *, status: RepaymentStatus | None = None, channel: str | None = None,
                   code: str | None = None, since: datetime | None = None,
                   until: datetime | None = None, limit: int = 100) -> list[Record]:
        sql = self._sql
        keys_sql = (f"SELECT key FROM {sql.repayments} WHERE ($1::text IS NULL OR status = $1)"
                    " AND ($2::text IS NULL OR channel = $2 OR pending_channel = $2)"
                    " AND ($3::text IS NULL OR code = $3)"
                    " AND ($4::timestamptz IS NULL OR created_at >= $4)"
                    " AND ($5::timestamptz IS NULL OR created_at < $5)"
                    " ORDER BY created_at DESC, key DESC LIMIT $6")
        args = (None if status is None else status.value, channel, code, since, until, limit)

        async def op(conn: asyncpg.Connection) -> list[Record]:
            keys = [row[0] for row in await conn.fetch(keys_sql, *args)]
            records = await _load_many(conn, sql=sql, keys=keys) if keys else {}
            return [records[k] for k in keys if k in records]

        return await self._submit(op, wrote=_read)

    async def purge_accounts(self, before: datetime) -> int:
        sql = (f"UPDATE {self.schema}.repayments AS r SET account = $2"
               " WHERE status <> 'pending' AND updated_at < $1 AND account <> $2"
               " AND watch_at IS NULL"
               f" AND NOT EXISTS (SELECT 1 FROM {self.schema}.late_checks c"
               " WHERE c.key = r.key AND (c.next_at IS NOT NULL OR c.refund = 'manual'))")

        async def apply(conn: asyncpg.Connection) -> int:
            status = await conn.execute(sql, before, PURGED)
            return int(status.split()[-1])

        return await self._submit(apply, wrote=bool)

    async def remind_once(self, key: str, threshold_s: float, now: datetime) -> bool:
        sql = (f"INSERT INTO {self.schema}.reminders (key, threshold_s, at)"
               " VALUES ($1, $2, $3) ON CONFLICT (key, threshold_s) DO NOTHING RETURNING 1")

        async def apply(conn: asyncpg.Connection) -> bool:
            return await conn.fetchval(sql, key, threshold_s, now) is not None

        return await self._submit(apply, route=key, wrote=bool)

    async def _refuse(self, conn: asyncpg.Connection, key: str, token: int,
                      terminal_ok: bool = False) -> None:
        """Raise why a fenced write for ``key`` matched no row."""
        row = await conn.fetchrow(
            f"SELECT status, token FROM {self.schema}.repayments WHERE key = $1", key)
        if row is None:
            raise UnknownRepayment(key)
        if token != -1 and row[1] != token:
            # Taken over since (and perhaps finished by its new owner): this instance
            # stops; its caller gets the new owner's result.
            self._drop_held(key, token)
            raise OwnershipLost(key)
        if row[0] != RepaymentStatus.PENDING.value:
            if terminal_ok:
                return
            self._drop_held(key, token)
            raise TerminalStateError(key, row[0])
        if token != -1:  # still ours: the write named another round
            raise TerminalStateError(key, row[0])
        raise OwnershipLost(key)


def _server_pid(conn: Any) -> int | None:
    try:
        return int(conn.get_server_pid())
    except Exception:
        return None


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _translate(exc: BaseException, path: str) -> BaseException:
    if isinstance(exc, (JournalError, UnknownRepayment)):
        return exc
    text = str(exc)
    if text.startswith("terminal: "):
        return JournalError(f"refused by the journal: {text}")
    return JournalError(f"journal {path}: {type(exc).__name__}: {text}")


class _Statements:
    """The SQL of one schema, built once."""

    def __init__(self, schema: str) -> None:
        r, a = f"{schema}.repayments", f"{schema}.attempts"
        lease = "now() + make_interval(secs => {})"
        self.repayments, self.attempts = r, a
        self.create = (
            f"WITH new AS (INSERT INTO {r} (key, account, amount, currency, due_at, metadata,"
            " preference, status, round, pending_reason, created_at, updated_at, owner,"
            " token, lease_until)"
            f" VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', 1, $8, $9, $9, $10,"
            f" nextval('{schema}.tokens'), {lease.format('$11')})"
            " ON CONFLICT (key) DO NOTHING RETURNING key, token),"
            f" first AS (INSERT INTO {a} (key, number, round, channel, reference, started_at)"
            " SELECT key, 1, 1, $12, $13, $9 FROM new WHERE $12::text IS NOT NULL)"
            " SELECT token FROM new")
        self.touch = (f"UPDATE {r} SET lease_until = {lease.format('$3')},"
                      " pending_reason = 'in_flight'"
                      " WHERE key = $1 AND token = $2 AND status = 'pending' RETURNING token")
        self.acquire = (
            f"UPDATE {r} SET owner = $2, token = nextval('{schema}.tokens'),"
            f" lease_until = {lease.format('$3')}, pending_reason = 'in_flight'"
            " WHERE key = $1 AND status = 'pending'"
            " AND (lease_until IS NULL OR lease_until < now() OR owner = $2) RETURNING token")
        self.release = (f"UPDATE {r} SET owner = NULL, lease_until = NULL"
                        " WHERE key = $1 AND token = $2 AND status = 'pending'")
        self.renew = (
            f"UPDATE {r} AS r SET lease_until = {lease.format('$3')}"
            " FROM unnest($1::text[], $2::bigint[]) AS h(key, token)"
            " WHERE r.key = h.key AND r.token = h.token AND r.status = 'pending'"
            " RETURNING r.key")
        self.renew_waiting = self.renew.replace(
            "SET lease_until", "SET pending_reason = 'awaiting_channel', lease_until")
        self.sweep = (
            f"WITH expired AS (SELECT key FROM {r} WHERE status = 'pending'"
            " AND lease_until < now() ORDER BY lease_until LIMIT $3 FOR UPDATE SKIP LOCKED)"
            f" UPDATE {r} AS r SET owner = $1, token = nextval('{schema}.tokens'),"
            f" lease_until = {lease.format('$2')}, pending_reason = 'in_flight'"
            " FROM expired WHERE r.key = expired.key"
            " RETURNING r.key, r.token")
        self.owned = (f"SELECT key, token FROM {r} WHERE status = 'pending'"
                      " AND lease_until > now() AND owner = $1")
        # A fenced write: the owner's token, and the lease extended by the same statement.
        fenced = (f"UPDATE {r} SET lease_until = {lease.format('{}')}"
                  " WHERE key = $1 AND token = $2 AND status = 'pending'")
        self.begin = (
            f"WITH owner AS ({fenced.format('$7')} AND round = $3 RETURNING key)"
            f" INSERT INTO {a} (key, number, round, channel, reference, started_at)"
            f" SELECT key, (SELECT COALESCE(MAX(number), 0) + 1 FROM {a} WHERE key = $1),"
            " $3, $4, $5, $6 FROM owner RETURNING number")
        self.find_attempt = (f"SELECT number FROM {a} WHERE key = $1 AND round = $2"
                             " AND reference = $3 AND started_at = $4")
        self.finish_attempt = (
            f"WITH owner AS (SELECT key FROM {r} WHERE key = $1 AND (token = $8"
            " OR status <> 'pending'))"
            f" UPDATE {a} SET outcome = $3, code = $4, detail = $5, channel_reference = $6,"
            " finished_at = $7 FROM owner WHERE attempts.key = owner.key"
            " AND attempts.number = $2 RETURNING 1")
        self.finish_attempt_unowned = (
            f"UPDATE {a} SET outcome = $3, code = $4, detail = $5, channel_reference = $6,"
            " finished_at = $7 WHERE key = $1 AND number = $2"
            " AND (outcome IS NULL OR outcome = 'unknown') AND resolution IS NULL")
        self.resolve = (
            f"WITH owner AS (SELECT key FROM {r} WHERE key = $1 AND token = $2"
            " AND status = 'pending'),"
            f" done AS (UPDATE {a} SET resolution = $5,"
            " channel_reference = COALESCE($6, channel_reference),"
            " code = CASE WHEN outcome IS NULL THEN 'interrupted' ELSE code END,"
            " outcome = COALESCE(outcome, 'unknown') FROM owner"
            f" WHERE attempts.key = owner.key AND round = $3 AND reference = $4 AND {_IN_DOUBT})"
            " SELECT 1 FROM owner")
        self.set_pending = (
            f"UPDATE {r} SET pending_reason = $4, pending_channel = $5, code = $6,"
            " updated_at = $7 WHERE key = $1 AND token = $2 AND status = 'pending'"
            " AND round = $3 RETURNING 1")
        # The answer is a fact about the attempt: written by its owner, or once the repayment
        # has ended, even when the ending asked for here is refused.  One statement: the
        # ended row and its attempts as they now stand come back with it (a data-modifying
        # CTE's RETURNING is the only place a statement sees its own changes).
        cols = f"number, {_ATTEMPT_COLUMNS}"
        self.finish = (
            f"WITH owner AS (SELECT key FROM {r} WHERE key = $1 AND token = $2"
            " AND status = 'pending' AND round = $3),"
            f" fact AS (SELECT key FROM {r} WHERE key = $1 AND (token = $2"
            " OR status <> 'pending')),"
            f" answered AS (UPDATE {a} SET outcome = $10, code = $11, detail = $12,"
            " channel_reference = COALESCE(CASE WHEN reference = $14 AND resolution IS NULL"
            f" AND $10 NOT IN ({_SETTLING}) AND EXISTS (SELECT 1 FROM owner) THEN $16 END,"
            " $13), finished_at = $8,"
            " resolution = CASE WHEN reference = $14 AND resolution IS NULL"
            f" AND $10 NOT IN ({_SETTLING}) AND EXISTS (SELECT 1 FROM owner) THEN $15"
            " ELSE resolution END FROM fact"
            f" WHERE attempts.key = fact.key AND number = $9 RETURNING {cols}),"
            f" resolved AS (UPDATE {a} SET resolution = $15,"
            " channel_reference = COALESCE($16, channel_reference),"
            " code = CASE WHEN outcome IS NULL THEN 'interrupted' ELSE code END,"
            " outcome = COALESCE(outcome, 'unknown') FROM owner"
            f" WHERE attempts.key = owner.key AND round = $3 AND reference = $14"
            f" AND number IS DISTINCT FROM $9 AND {_IN_DOUBT} RETURNING {cols}),"
            f" ended AS (UPDATE {r} SET status = $4, channel = $5, channel_reference = $6,"
            " code = $7, pending_reason = NULL, pending_channel = NULL, updated_at = $8,"
            " owner = NULL, lease_until = NULL,"
            " skips = CASE WHEN $17::jsonb IS NULL THEN skips"
            " ELSE COALESCE(skips, '[]'::jsonb) || $17::jsonb END"
            " FROM owner WHERE repayments.key = owner.key"
            f" RETURNING {', '.join('repayments.' + c for c in _RECORD_COLUMNS.split(', '))})"
            " SELECT ended.*, (SELECT array_agg(ROW(x.*) ORDER BY x.number) FROM ("
            " SELECT * FROM answered UNION ALL SELECT * FROM resolved UNION ALL"
            f" SELECT {cols} FROM {a} WHERE key = $1"
            " AND number NOT IN (SELECT number FROM answered)"
            " AND number NOT IN (SELECT number FROM resolved)) x) AS attempts FROM ended")
        self.new_round = (
            f"UPDATE {r} SET status = 'pending', round = round + 1, channel = NULL,"
            " channel_reference = NULL, code = NULL, pending_reason = 'in_flight',"
            f" pending_channel = NULL, updated_at = $5, owner = $3,"
            f" token = nextval('{schema}.tokens'), lease_until = {lease.format('$4')}"
            " WHERE key = $1 AND status = 'failed' AND round = $2 AND account <> $6"
            " RETURNING token")
        self.watch = (f"UPDATE {r} SET watch_at = $2 WHERE key = $1"
                      f" AND status <> 'pending' AND {WATCH_SQL.format(a=a, r=r)}")
        self.load = f"SELECT {_RECORD_COLUMNS} FROM {r} WHERE key = $1"
        self.load_attempts = (f"SELECT {_ATTEMPT_COLUMNS} FROM {a} WHERE key = $1"
                              " ORDER BY number")


_LATE_MARKS = ", ".join(f"${n}" for n in range(1, 15))


def _same(value: object) -> datetime | None:
    return value  # type: ignore[return-value]  # asyncpg reads timestamptz as datetime


def _attempt(a: Sequence[Any]) -> Attempt:
    return Attempt(
        channel=a[0], reference=a[1], outcome=None if a[2] is None else Outcome(a[2]),
        code=a[3], started_at=a[4], finished_at=a[5], detail=a[6],
        resolution=None if a[7] is None else Outcome(a[7]), round=a[8],
        channel_reference=a[9],
    )


def _record(row: Sequence[Any], attempts: tuple[Attempt, ...]) -> Record:
    return Record(
        key=row[0], account=row[1], amount=row[2], currency=row[3], due_at=row[4],
        metadata=json.loads(row[5]),
        preference=None if row[6] is None else tuple(row[6]),
        status=RepaymentStatus(row[7]), round=row[8], channel=row[9], channel_reference=row[10],
        code=row[11], pending_reason=None if row[12] is None else PendingReason(row[12]),
        pending_channel=row[13], created_at=row[14], updated_at=row[15], attempts=attempts,
        skips=skips_from(row[18]), corrections=corrections_from(row[19]),
    )


async def _load(conn: asyncpg.Connection, sql: _Statements, key: str) -> Record | None:
    return (await _load_owned(conn, sql, key, None))[0]


async def _load_owned(conn: asyncpg.Connection, sql: _Statements, key: str,
                      instance: str | None) -> tuple[Record | None, int | None]:
    """The record, and its token if ``instance`` owns it."""
    row = await conn.fetchrow(sql.load, key)
    if row is None:
        return None, None
    attempts = tuple(_attempt(a) for a in await conn.fetch(sql.load_attempts, key))
    token = row[17] if instance is not None and row[16] == instance else None
    return _record(row, attempts), token


async def _load_many(conn: asyncpg.Connection, *, sql: _Statements,
                     keys: list[str]) -> dict[str, Record]:
    attempts: dict[str, list[Attempt]] = {}
    for a in await conn.fetch(
            f"SELECT key, {_ATTEMPT_COLUMNS} FROM {sql.attempts} WHERE key = ANY($1::text[])"
            " ORDER BY key, number", keys):
        attempts.setdefault(a[0], []).append(_attempt(a[1:]))
    return {
        row[0]: _record(row, tuple(attempts.get(row[0], ())))
        for row in await conn.fetch(
            f"SELECT {_RECORD_COLUMNS} FROM {sql.repayments} WHERE key = ANY($1::text[])",
            keys)
    }
