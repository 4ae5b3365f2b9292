"""The durable embedded journal: SQLite in WAL mode with ``synchronous=FULL``.

All statements run on one worker thread that owns the connection.  Operations
that arrive while a commit is being flushed wait in a queue and are written
together in the next transaction (group commit): durability costs one fsync
per batch, not one per write, and the event loop never blocks on the disk.
An operation that fails (a terminal repayment asked to change) fails alone
while the batch commits: every operation checks before it writes, and writes
with a single statement.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import quote

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from failover._errors import JournalError, SchemaVersionError, TerminalStateError, UnknownRepayment
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
    Failover,
    JournalStats,
    Record,
    Resolution,
    SingleOwner,
    WriteCounted,
    WriteStats,
    correction_json,
    corrections_from,
    decoded,
    late_check_from,
    late_check_row,
    needs_watch,
    new_record,
    skips_from,
    skips_json,
    unusable_account,
)

SCHEMA_VERSION = 3
_MAX_BATCH = 1024
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE repayments (
    key TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    amount TEXT NOT NULL,
    currency TEXT NOT NULL,
    due_at TEXT,
    metadata TEXT NOT NULL,
    preference TEXT,
    status TEXT NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    round INTEGER NOT NULL,
    channel TEXT,
    channel_reference TEXT,
    code TEXT,
    pending_reason TEXT,
    pending_channel TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX repayments_pending ON repayments (created_at) WHERE status = 'pending';
CREATE TABLE attempts (
    key TEXT NOT NULL REFERENCES repayments (key),
    number INTEGER NOT NULL,
    round INTEGER NOT NULL,
    channel TEXT NOT NULL,
    reference TEXT NOT NULL,
    outcome TEXT,
    code TEXT,
    detail TEXT,
    resolution TEXT,
    channel_reference TEXT,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    PRIMARY KEY (key, number)
) WITHOUT ROWID;
-- The journal itself refuses to change a finished repayment, whatever the code does.
CREATE TRIGGER succeeded_is_final BEFORE UPDATE ON repayments
WHEN OLD.status = 'succeeded'
BEGIN SELECT RAISE(ABORT, 'terminal: succeeded'); END;
CREATE TRIGGER failed_changes_by_new_round_only BEFORE UPDATE ON repayments
WHEN OLD.status = 'failed' AND NEW.round = OLD.round
BEGIN SELECT RAISE(ABORT, 'terminal: failed'); END;
"""


# Version 2: late collections, corrections, skips and reminders.  A terminal repayment
# changes only together with its ``corrections`` (the triggers are rebuilt to say so).
_SCHEMA_2 = """
ALTER TABLE repayments ADD COLUMN skips TEXT;
ALTER TABLE repayments ADD COLUMN corrections TEXT;
ALTER TABLE repayments ADD COLUMN watch_at TEXT;
CREATE INDEX repayments_watch ON repayments (watch_at) WHERE watch_at IS NOT NULL;
CREATE INDEX repayments_due ON repayments (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX attempts_reference ON attempts (reference);
CREATE TABLE late_checks (
    key TEXT NOT NULL REFERENCES repayments (key),
    channel TEXT NOT NULL,
    reference TEXT NOT NULL,
    round INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('watching', 'collected', 'cleared')),
    checks INTEGER NOT NULL,
    next_at TEXT,
    found_at TEXT,
    found_by TEXT,
    channel_reference TEXT,
    refund TEXT CHECK (refund IN ('due', 'sent', 'unknown', 'refunded', 'manual')),
    refund_reference TEXT,
    refund_code TEXT,
    refund_at TEXT,
    PRIMARY KEY (key, reference)
) WITHOUT ROWID;
CREATE INDEX late_checks_due ON late_checks (next_at) WHERE next_at IS NOT NULL;
CREATE TABLE reminders (
    key TEXT NOT NULL,
    threshold_s REAL NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (key, threshold_s)
) WITHOUT ROWID;
DROP TRIGGER succeeded_is_final;
DROP TRIGGER failed_changes_by_new_round_only;
CREATE TRIGGER succeeded_is_final
BEFORE UPDATE OF status, round, channel, channel_reference, code ON repayments
WHEN OLD.status = 'succeeded' AND NEW.corrections IS OLD.corrections
BEGIN SELECT RAISE(ABORT, 'terminal: succeeded'); END;
CREATE TRIGGER failed_changes_by_new_round_only
BEFORE UPDATE OF status, round, channel, channel_reference, code ON repayments
WHEN OLD.status = 'failed' AND NEW.round = OLD.round AND NEW.corrections IS OLD.corrections
BEGIN SELECT RAISE(ABORT, 'terminal: failed'); END;
-- Repayments that ended before this version and may still collect are watched too
-- (needs_watch, in SQL that any SQLite reads).
UPDATE repayments SET watch_at = updated_at WHERE status <> 'pending' AND EXISTS (
    SELECT 1 FROM attempts x WHERE x.key = repayments.key AND (
        x.resolution = 'not_found'
        OR (x.resolution IS NULL AND (x.outcome IS NULL OR x.outcome IN ('unknown', 'not_found')))
        OR ((x.outcome = 'succeeded' OR x.resolution = 'succeeded')
            AND NOT (repayments.status = 'succeeded' AND x.channel IS repayments.channel
                     AND x.round = repayments.round))));
"""

# Version 3: operators' channel switches and the instances' breaker states.
_SCHEMA_3 = """
CREATE TABLE channel_overrides (
    channel TEXT PRIMARY KEY,
    enabled INTEGER NOT NULL,
    until TEXT NOT NULL,
    reason TEXT NOT NULL,
    by TEXT NOT NULL,
    at TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE instance_breakers (
    instance TEXT NOT NULL,
    channel TEXT NOT NULL,
    state TEXT NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (instance, channel)
) WITHOUT ROWID;
"""

_MIGRATIONS = ((1, _SCHEMA), (2, _SCHEMA_2), (3, _SCHEMA_3))


def write_override(path: str | Path, override: Override | None, channel: str,
                   busy_timeout_s: float = 30.0) -> bool:
    """Set (or, with ``override`` None, clear) a channel switch in the journal file at
    ``path`` beside the process that owns it: a one-row write in its own transaction,
    which touches no repayment (so it needs not the owner's lock).  ``False`` if a clear
    found nothing.  ``JournalError`` if the file is not a journal of this version."""
    if not os.path.exists(path):
        raise JournalError(f"cannot open journal {str(path)!r}: no such file")
    try:
        conn = sqlite3.connect(str(path), isolation_level=None, timeout=busy_timeout_s)
    except sqlite3.Error as exc:
        raise JournalError(f"cannot open journal {str(path)!r}: {exc}") from exc
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise JournalError(f"journal {str(path)!r} has schema version {version}, not"
                               f" {SCHEMA_VERSION}: open it in the service (or 'failover"
                               " migrate') first")
        if override is None:
            return conn.execute("DELETE FROM channel_overrides WHERE channel = ?",
                                (channel,)).rowcount == 1
        conn.execute(
            "INSERT INTO channel_overrides (channel, enabled, until, reason, by, at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (channel) DO UPDATE SET"
            " enabled = excluded.enabled, until = excluded.until, reason = excluded.reason,"
            " by = excluded.by, at = excluded.at",
            (override.channel, int(override.enabled), _utc(override.until), override.reason,
             override.by, _utc(override.at)))
        return True
    except sqlite3.Error as exc:
        raise JournalError(f"journal {str(path)!r}: {exc}") from exc
    finally:
        conn.close()


def _statements(script: str) -> list[str]:
    # executescript() would COMMIT the guarding transaction first; split and run one by one.
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        if line.startswith("--"):
            continue
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    return statements


def _ts(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _utc(value: datetime | None) -> str | None:
    """A time kept for comparison in SQL (schedules): UTC, one format, so text order is
    time order."""
    return None if value is None else value.astimezone(UTC).isoformat()


def _parse(value: object) -> datetime | None:
    return None if value is None else datetime.fromisoformat(str(value))


def _dt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _outcome(value: str | None) -> Outcome | None:
    return None if value is None else Outcome(value)


class SQLiteJournal(SingleOwner, WriteCounted):
    """A journal in one SQLite file (created if missing)."""

    def __init__(
        self, path: str | Path, *, busy_timeout_s: float = 30.0, read_only: bool = False,
        codec: AccountCodec | None = None,
    ) -> None:
        """``read_only`` opens an existing journal for reading (the ``status`` and
        ``inspect`` commands) beside the process that owns it.

        A writable journal belongs to one process at a time: opening it takes an
        exclusive lock on ``PATH.lock``, so a second process (a second service
        instance, or ``failover reconcile`` while the service runs) is refused rather
        than racing it on the same repayments.  Several instances share work through
        a journal with leases (PostgreSQL), not through one SQLite file.
        """
        self.path = str(path)
        self.read_only = read_only
        self.codec = codec
        """Encodes accounts before they are written, decodes them when read
        (``failover.codec``); ``None`` stores them as given."""
        self._busy_timeout_s = busy_timeout_s
        self._lock_fd: int | None = None
        self._queue: queue.SimpleQueue[
            tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]] | None
        ] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.writes = WriteStats()
        """Batches committed, operations in them, and observers of each batch's size and
        duration (``failover.metrics.JournalCollector`` adds one)."""

    # ---- lifecycle -------------------------------------------------------

    async def open(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name=f"failover-journal:{self.path}", daemon=True
        )
        self._thread.start()
        try:
            await ready
        except BaseException:
            # Failed, or cancelled (a shutdown during the open): the writer thread stops
            # by itself once it reads the end of its queue; the loop never waits for it.
            self._queue.put(None)
            self._thread = None
            raise

    async def close(self) -> None:
        if self._thread is None:
            return
        self._queue.put(None)
        thread, self._thread = self._thread, None
        await asyncio.to_thread(thread.join)

    def _take_lock(self) -> None:
        if fcntl is None:  # pragma: no cover - not POSIX: no cross-process guard
            return
        # Named after the real file: a symlink to the same journal must meet the same lock.
        # (A hard link is a second name the lock cannot see: do not link journal files.)
        lock_path = os.path.realpath(self.path) + ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise JournalError(f"cannot open journal {self.path!r}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise JournalError(
                f"journal {self.path!r} is open for writing in another process (pid {owner});"
                " an SQLite journal serves one process"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the lock
            self._lock_fd = None

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            return self._connect_read_only()
        # Checked first, so a mistyped path creates nothing (sqlite3 would only say
        # "unable to open database file").
        directory = os.path.dirname(self.path) or "."
        if not os.path.isdir(directory):
            raise JournalError(
                f"cannot open journal {self.path!r}: directory {directory!r} does not exist"
            )
        self._take_lock()
        try:
            # Readable by its owner only: it holds what borrowers paid (and, without a
            # codec, their accounts).  SQLite gives its -wal and -shm files the same mode.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            return self._connect_writable()
        except BaseException:
            self._release_lock()
            raise

    def _connect_read_only(self) -> sqlite3.Connection:
        if not os.path.exists(self.path):
            raise JournalError(f"cannot open journal {self.path!r}: no such file")
        try:
            conn = sqlite3.connect(
                f"file:{quote(self.path)}?mode=ro", uri=True, isolation_level=None,
                timeout=self._busy_timeout_s, check_same_thread=False,
            )
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open journal {self.path!r}: {exc}") from exc
        if version > SCHEMA_VERSION:
            conn.close()
            raise SchemaVersionError(self.path, version, SCHEMA_VERSION)
        if version == 0:
            conn.close()
            raise JournalError(f"{self.path!r} is not a failover journal")
        if version < SCHEMA_VERSION:
            conn.close()
            raise JournalError(
                f"journal {self.path!r} has schema version {version}, older than"
                f" {SCHEMA_VERSION}: upgrade it with 'failover migrate {self.path}' (or open"
                " it in a service, which upgrades it)")
        return conn

    def _connect_writable(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path, isolation_level=None, timeout=self._busy_timeout_s,
                check_same_thread=False,
            )
            # Check the version before anything else touches a file we may not understand.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                conn.close()
                raise SchemaVersionError(self.path, version, SCHEMA_VERSION)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            # A larger page cache keeps a big journal's index pages in memory (64 MiB).
            conn.execute("PRAGMA cache_size=-65536")
            if version < SCHEMA_VERSION:
                # An embedded journal upgrades itself when opened for writing (the lock
                # file says no other process has it open).
                conn.execute("BEGIN IMMEDIATE")
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                for number, script in _MIGRATIONS:
                    if number > version:
                        for statement in _statements(script):
                            conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open journal {self.path!r}: {exc}") from exc
        return conn

    def _run(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            conn = self._connect()
        except BaseException as exc:
            loop.call_soon_threadsafe(_settle, ready, None, exc)
            return
        loop.call_soon_threadsafe(_settle, ready, None, None)
        try:
            self._serve(conn, loop)
        finally:
            conn.close()
            self._release_lock()

    def _serve(self, conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            # Everything that queued up while the last commit was flushing joins this one.
            while len(batch) < _MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
            wrote = 0  # operations that changed a row: reads share the writer, not the count
            started = time.perf_counter()
            try:
                conn.execute("BEGIN IMMEDIATE")
                for operation, future in batch:
                    # No savepoint per operation: each makes at most one write, after its
                    # checks, and SQLite undoes a failed statement by itself, so a failing
                    # operation leaves nothing behind and the batch commits the rest.
                    changes = conn.total_changes
                    try:
                        value = operation(conn)
                    except Exception as exc:
                        outcomes.append((future, None, _translate(exc)))
                    else:
                        outcomes.append((future, value, None))
                    if conn.total_changes != changes:
                        wrote += 1
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                failed = JournalError(f"journal {self.path!r}: commit failed: {exc}")
                outcomes = [(future, None, failed) for _, future in batch]
                wrote = 0
            seconds = time.perf_counter() - started
            # One wake-up of the event loop per batch, not one per operation.  The
            # callers are answered before the observers run: nothing an observer does
            # can hold back (or, if it escaped, lose) an answer already written.
            loop.call_soon_threadsafe(_settle_all, outcomes)
            if wrote:
                self.writes.committed(wrote, seconds)

    async def _submit(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        if self._thread is None or self._loop is None:
            raise JournalError(f"journal {self.path!r} is not open")
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.put((operation, future))
        value = await future
        return value if self.codec is None else decoded(value, self.codec)

    # ---- operations --------------------------------------------------------

    async def create(
        self, repayment: Repayment, preference: tuple[str, ...] | None, now: datetime,
        first_attempt: tuple[str, str] | None = None,
    ) -> tuple[Record, bool]:
        record = new_record(repayment, preference, now)
        if first_attempt is not None:
            sent = Attempt(*first_attempt, None, None, now, None, round=1)
            record = dataclasses.replace(record, attempts=(sent,))
        if self.codec is not None:  # held as stored; _submit decodes what it returns
            record = dataclasses.replace(record, account=self.codec.encode(record.account))

        def op(conn: sqlite3.Connection) -> tuple[Record, bool]:
            cursor = conn.execute(
                "INSERT INTO repayments (key, account, amount, currency, due_at, metadata,"
                " preference, status, round, pending_reason, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', 1, ?, ?, ?)"
                " ON CONFLICT (key) DO NOTHING",
                (
                    record.key, record.account, str(record.amount), record.currency,
                    _ts(record.due_at), json.dumps(record.metadata),
                    None if preference is None else json.dumps(list(preference)),
                    PendingReason.IN_FLIGHT.value, _ts(now), _ts(now),
                ),
            )
            if cursor.rowcount == 1:
                # The second write of this operation cannot be refused: the key is new.
                if first_attempt is not None:
                    conn.execute(
                        "INSERT INTO attempts (key, number, round, channel, reference,"
                        " started_at) VALUES (?, 1, 1, ?, ?, ?)",
                        (record.key, *first_attempt, _ts(now)),
                    )
                return record, True
            existing = _load(conn, record.key)
            assert existing is not None
            return existing, False

        return await self._submit(op)

    async def load(self, key: str) -> Record | None:
        return await self._submit(lambda conn: _load(conn, key))

    async def load_many(self, keys: Sequence[str]) -> dict[str, Record]:
        # SQLite allows 32766 parameters; recovery reads in chunks far below that.
        found: dict[str, Record] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            found.update(await self._submit(functools.partial(_load_many, keys=chunk)))
        return found

    async def begin_attempt(
        self, key: str, round: int, channel: str, reference: str, now: datetime
    ) -> int:
        def op(conn: sqlite3.Connection) -> int:
            # Never an attempt for a repayment that is finished (or in another round).
            # The guard filters the repayment row, not an aggregate: an aggregate
            # (MAX over attempts) yields a row, and so an insert, even when it fails.
            row = conn.execute(
                "INSERT INTO attempts (key, number, round, channel, reference, started_at)"
                " SELECT key, (SELECT COALESCE(MAX(number), 0) + 1 FROM attempts"
                " WHERE key = repayments.key), ?, ?, ?, ? FROM repayments"
                " WHERE key = ? AND status = 'pending' AND round = ? RETURNING number",
                (round, channel, reference, _ts(now), key, round),
            ).fetchone()
            if row is None:
                _refuse(conn, key)
            number: int = row[0]
            return number

        return await self._submit(op)

    async def finish_attempt(
        self, key: str, number: int, result: ChannelResult, now: datetime
    ) -> None:
        await self._submit(lambda conn: _finish_attempt(conn, key, number, result, now))

    async def resolve_attempts(
        self, key: str, round: int, reference: str, resolution: Outcome, now: datetime,
        channel_reference: str | None = None,
    ) -> None:
        settled = Resolution(reference, resolution, channel_reference)
        await self._submit(lambda conn: _resolve(conn, key, round, settled))

    async def set_pending(
        self, key: str, round: int, reason: PendingReason, channel: str | None,
        code: str | None, now: datetime,
    ) -> None:
        def op(conn: sqlite3.Connection) -> None:
            cursor = conn.execute(
                "UPDATE repayments SET pending_reason = ?, pending_channel = ?, code = ?,"
                " updated_at = ? WHERE key = ? AND status = 'pending' AND round = ?",
                (reason.value, channel, code, _ts(now), key, round),
            )
            if cursor.rowcount != 1:
                _refuse(conn, key)

        await self._submit(op)

    async def finish(
        self, key: str, round: int, status: RepaymentStatus, channel: str | None,
        channel_reference: str | None, code: str | None, now: datetime,
        *, attempt: tuple[int, ChannelResult] | None = None,
        resolution: Resolution | None = None, skips: Sequence[Skip] = (),
    ) -> Record:
        def op(conn: sqlite3.Connection) -> Record:
            # Facts about attempts first: true whatever happens to the repayment update.
            if attempt is not None:
                _finish_attempt(conn, key, attempt[0], attempt[1], now)
            if resolution is not None:
                _resolve(conn, key, round, resolution)
            merged = None
            if skips:
                held = conn.execute("SELECT skips FROM repayments WHERE key = ?",
                                    (key,)).fetchone()
                merged = json.dumps(json.loads((held and held[0]) or "[]")
                                    + skips_json(skips))
            row = conn.execute(
                "UPDATE repayments SET status = ?, channel = ?, channel_reference = ?, code = ?,"
                " pending_reason = NULL, pending_channel = NULL, updated_at = ?,"
                " skips = COALESCE(?, skips)"
                " WHERE key = ? AND status = 'pending' AND round = ?"
                f" RETURNING {_RECORD_COLUMNS}",
                (status.value, channel, channel_reference, code, _ts(now), merged, key, round),
            ).fetchone()
            if row is None:
                _refuse(conn, key)
            record = _record(row, _attempts_of(conn, key))
            if needs_watch(record):
                conn.execute("UPDATE repayments SET watch_at = ? WHERE key = ?",
                             (_utc(now), key))
            return record

        return await self._submit(op)

    async def new_round(self, key: str, now: datetime) -> Record:
        def op(conn: sqlite3.Connection) -> Record:
            row = conn.execute("SELECT status, account FROM repayments WHERE key = ?",
                               (key,)).fetchone()
            if row is None:
                raise UnknownRepayment(key)
            if row[0] != RepaymentStatus.FAILED.value:
                raise TerminalStateError(key, row[0])
            if row[1] == PURGED:  # a round that could call no channel would stay pending
                raise unusable_account(key)
            conn.execute(
                "UPDATE repayments SET status = 'pending', round = round + 1, channel = NULL,"
                " channel_reference = NULL, code = NULL, pending_reason = ?,"
                " pending_channel = NULL, updated_at = ? WHERE key = ?",
                (PendingReason.IN_FLIGHT.value, _ts(now), key),
            )
            record = _load(conn, key)
            assert record is not None
            return record

        return await self._submit(op)

    async def pending_keys(self, reason: PendingReason | None = None) -> list[str]:
        def op(conn: sqlite3.Connection) -> list[str]:
            sql = "SELECT key FROM repayments WHERE status = 'pending'"
            args: tuple[str, ...] = ()
            if reason is not None:
                sql += " AND pending_reason = ?"
                args = (reason.value,)
            return [row[0] for row in conn.execute(sql + " ORDER BY created_at", args)]

        return await self._submit(op)

    async def stats(self) -> JournalStats:
        def op(conn: sqlite3.Connection) -> JournalStats:
            by_status = dict.fromkeys(RepaymentStatus, 0)
            for status, count in conn.execute(
                "SELECT status, COUNT(*) FROM repayments GROUP BY status"
            ):
                by_status[RepaymentStatus(status)] = count
            oldest = conn.execute(
                "SELECT MIN(created_at) FROM repayments WHERE status = 'pending'"
            ).fetchone()[0]
            return JournalStats(by_status, _dt(oldest))

        return await self._submit(op)


    async def recent_failovers(self, limit: int = 10) -> list[Failover]:
        def op(conn: sqlite3.Connection) -> list[Failover]:
            rows = conn.execute(
                "SELECT key, previous, channel, started_at FROM ("
                " SELECT key, channel, started_at, LAG(channel) OVER"
                " (PARTITION BY key, round ORDER BY number) AS previous FROM attempts)"
                " WHERE previous IS NOT NULL AND previous != channel"
                " ORDER BY started_at DESC LIMIT ?",
                (limit,),
            ).fetchall()
            return [Failover(r[0], r[1], r[2], datetime.fromisoformat(r[3])) for r in rows]

        return await self._submit(op)

    # ---- late collections, corrections, reminders -----------------------------------

    async def watched(self, limit: int) -> list[str]:
        return await self._submit(lambda conn: [row[0] for row in conn.execute(
            "SELECT key FROM repayments WHERE watch_at IS NOT NULL ORDER BY watch_at LIMIT ?",
            (limit,))])

    async def start_watching(self, key: str,
                             checks_of: Callable[[Record], Sequence[LateCheck]]) -> None:
        def op(conn: sqlite3.Connection) -> None:
            # One writer thread: no ending can come between this read and the clear.
            record = _load(conn, key)
            if record is None:
                raise UnknownRepayment(key)
            conn.executemany(
                f"INSERT INTO late_checks ({LATE_COLUMNS}) VALUES ({_LATE_MARKS})"
                " ON CONFLICT (key, reference) DO NOTHING",
                [_late_row(check) for check in checks_of(record)])
            conn.execute("UPDATE repayments SET watch_at = NULL WHERE key = ?", (key,))

        await self._submit(op)

    async def due_late_checks(self, now: datetime, limit: int, claim_until: datetime
                              ) -> list[LateCheck]:
        def op(conn: sqlite3.Connection) -> list[LateCheck]:
            rows = conn.execute(
                f"SELECT {LATE_COLUMNS} FROM late_checks WHERE next_at <= ?"
                " ORDER BY next_at LIMIT ?", (_utc(now), limit)).fetchall()
            conn.executemany("UPDATE late_checks SET next_at = ? WHERE key = ? AND reference = ?",
                             [(_utc(claim_until), r[0], r[2]) for r in rows])
            return [late_check_from(r, _parse) for r in rows]

        return await self._submit(op)

    async def update_late_check(self, check: LateCheck, expect: LateCheck) -> bool:
        row = _late_row(check)

        def op(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE late_checks SET state = ?, checks = ?, next_at = ?, found_at = ?,"
                " found_by = ?, channel_reference = ?, refund = ?, refund_reference = ?,"
                " refund_code = ?, refund_at = ? WHERE key = ? AND reference = ?"
                " AND state = ? AND refund IS ? AND checks = ?",
                (*row[4:], check.key, check.reference, expect.state.value,
                 None if expect.refund is None else expect.refund.value, expect.checks))
            return cursor.rowcount == 1

        return await self._submit(op)

    async def late_checks(self, key: str | None = None, *, state: LateState | None = None,
                          refund: RefundState | None = None) -> list[LateCheck]:
        def op(conn: sqlite3.Connection) -> list[LateCheck]:
            rows = conn.execute(
                f"SELECT {LATE_COLUMNS} FROM late_checks WHERE (?1 IS NULL OR key = ?1)"
                " AND (?2 IS NULL OR state = ?2) AND (?3 IS NULL OR refund = ?3)"
                " ORDER BY key, round, reference",
                (key, None if state is None else state.value,
                 None if refund is None else refund.value)).fetchall()
            return [late_check_from(r, _parse) for r in rows]

        return await self._submit(op)

    async def collected_late(self, check: LateCheck) -> bool:
        row = _late_row(check)

        def op(conn: sqlite3.Connection) -> bool:
            if conn.execute("SELECT 1 FROM repayments WHERE key = ?",
                            (check.key,)).fetchone() is None:
                raise UnknownRepayment(check.key)
            cursor = conn.execute(
                f"INSERT INTO late_checks ({LATE_COLUMNS}) VALUES ({_LATE_MARKS})"
                " ON CONFLICT (key, reference) DO UPDATE SET state = excluded.state,"
                " next_at = excluded.next_at, found_at = excluded.found_at,"
                " found_by = excluded.found_by, channel_reference = COALESCE("
                "excluded.channel_reference, late_checks.channel_reference)"
                " WHERE late_checks.state <> 'collected'", row)
            return cursor.rowcount == 1

        return await self._submit(op)

    async def correct(self, key: str, round: int, correction: Correction,
                      displaced: LateCheck | None = None, *, after: int = 0) -> Record:
        c = correction

        def op(conn: sqlite3.Connection) -> Record:
            kept = _with_correction(conn, key, c)
            row = conn.execute(
                "UPDATE repayments SET status = ?, channel = ?, channel_reference = ?,"
                " code = NULL, corrections = ?, updated_at = ? WHERE key = ? AND round = ?"
                " AND status = ? AND channel IS ? AND channel_reference IS ?"
                " AND json_array_length(COALESCE(corrections, '[]')) = ?"
                f" RETURNING {_RECORD_COLUMNS}",
                (c.new_status.value, c.new_channel, c.new_channel_reference, kept, _ts(c.at),
                 key, round, c.old_status.value, c.old_channel, c.old_channel_reference,
                 after),
            ).fetchone()
            if row is None:
                status = conn.execute("SELECT status FROM repayments WHERE key = ?",
                                      (key,)).fetchone()[0]
                raise TerminalStateError(key, status)
            if displaced is not None:
                conn.execute(
                    f"INSERT INTO late_checks ({LATE_COLUMNS}) VALUES ({_LATE_MARKS})"
                    " ON CONFLICT (key, reference) DO NOTHING", _late_row(displaced))
            return _record(row, _attempts_of(conn, key))

        return await self._submit(op)

    async def find_reference(self, channel: str, reference: str) -> str | None:
        def op(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT key FROM attempts WHERE reference = ? AND channel = ?"
                               " LIMIT 1", (reference, channel)).fetchone()
            return None if row is None else str(row[0])

        return await self._submit(op)

    async def due_between(self, since: datetime | None, until: datetime | None
                          ) -> list[Record]:
        def op(conn: sqlite3.Connection) -> list[Record]:
            keys = [row[0] for row in conn.execute(
                "SELECT key FROM repayments WHERE due_at IS NOT NULL"
                " AND (?1 IS NULL OR julianday(due_at) >= julianday(?1))"
                " AND (?2 IS NULL OR julianday(due_at) < julianday(?2))",
                (_utc(since), _utc(until)))]
            records: list[Record] = []
            for start in range(0, len(keys), 500):
                records.extend(_load_many(conn, keys[start:start + 500]).values())
            return sorted(records, key=lambda r: (r.due_at, r.key))

        return await self._submit(op)

    async def at_risk(self, now: datetime, within_s: float) -> list[Record]:
        def op(conn: sqlite3.Connection) -> list[Record]:
            rows = conn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM repayments WHERE due_at IS NOT NULL"
                " AND status <> 'succeeded' AND julianday(due_at) > julianday(?1)"
                " AND julianday(due_at) <= julianday(?1) + ?2 / 86400.0"
                " ORDER BY julianday(due_at), key", (_utc(now), within_s)).fetchall()
            return [_record(row, ()) for row in rows]

        return await self._submit(op)

    async def resolve_by_hand(self, key: str, round: int, correction: Correction) -> Record:
        c = correction
        code = None if c.new_status is RepaymentStatus.SUCCEEDED else "resolved_by_operator"

        def op(conn: sqlite3.Connection) -> Record:
            kept = _with_correction(conn, key, c)
            row = conn.execute(
                "UPDATE repayments SET status = ?, channel = ?, channel_reference = ?,"
                " code = ?, pending_reason = NULL, pending_channel = NULL, corrections = ?,"
                " updated_at = ? WHERE key = ? AND status = 'pending' AND round = ?"
                f" RETURNING {_RECORD_COLUMNS}",
                (c.new_status.value, c.new_channel, c.new_channel_reference, code, kept,
                 _ts(c.at), key, round)).fetchone()
            if row is None:
                _refuse(conn, key)
            record = _record(row, _attempts_of(conn, key))
            if needs_watch(record):
                conn.execute("UPDATE repayments SET watch_at = ? WHERE key = ?",
                             (_utc(c.at), key))
            return record

        return await self._submit(op)

    async def set_override(self, override: Override) -> None:
        await asyncio.to_thread(write_override, self.path, override, override.channel)

    async def clear_override(self, channel: str) -> bool:
        return await asyncio.to_thread(write_override, self.path, None, channel)

    async def overrides(self) -> list[Override]:
        def op(conn: sqlite3.Connection) -> list[Override]:
            return [Override(r[0], bool(r[1]), datetime.fromisoformat(r[2]), r[3], r[4],
                             datetime.fromisoformat(r[5]))
                    for r in conn.execute("SELECT channel, enabled, until, reason, by, at"
                                          " FROM channel_overrides ORDER BY channel")]

        return await self._submit(op)

    async def report_breakers(self, instance: str, states: Mapping[str, str],
                              now: datetime) -> None:
        rows = [(instance, channel, state, _utc(now)) for channel, state in states.items()]

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO instance_breakers (instance, channel, state, at) VALUES"
                " (?, ?, ?, ?) ON CONFLICT (instance, channel) DO UPDATE SET"
                " state = excluded.state, at = excluded.at", rows)

        await self._submit(op)

    async def breaker_reports(self) -> list[tuple[str, str, str, datetime]]:
        def op(conn: sqlite3.Connection) -> list[tuple[str, str, str, datetime]]:
            return [(r[0], r[1], r[2], datetime.fromisoformat(r[3])) for r in conn.execute(
                "SELECT instance, channel, state, at FROM instance_breakers"
                " ORDER BY instance, channel")]

        return await self._submit(op)

    async def find(self, *, status: RepaymentStatus | None = None, channel: str | None = None,
                   code: str | None = None, since: datetime | None = None,
                   until: datetime | None = None, limit: int = 100) -> list[Record]:
        def op(conn: sqlite3.Connection) -> list[Record]:
            keys = [row[0] for row in conn.execute(
                "SELECT key FROM repayments WHERE (?1 IS NULL OR status = ?1)"
                " AND (?2 IS NULL OR channel = ?2 OR pending_channel = ?2)"
                " AND (?3 IS NULL OR code = ?3)"
                " AND (?4 IS NULL OR julianday(created_at) >= julianday(?4))"
                " AND (?5 IS NULL OR julianday(created_at) < julianday(?5))"
                " ORDER BY julianday(created_at) DESC, key DESC LIMIT ?6",
                (None if status is None else status.value, channel, code, _utc(since),
                 _utc(until), limit))]
            records = _load_many(conn, keys) if keys else {}
            return [records[k] for k in keys if k in records]

        return await self._submit(op)

    async def purge_accounts(self, before: datetime) -> int:
        def op(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "UPDATE repayments SET account = ? WHERE status <> 'pending'"
                " AND julianday(updated_at) < julianday(?) AND account <> ?"
                " AND watch_at IS NULL"
                " AND NOT EXISTS (SELECT 1 FROM late_checks c WHERE c.key = repayments.key"
                " AND (c.next_at IS NOT NULL OR c.refund = 'manual'))",
                (PURGED, _utc(before), PURGED))
            return cursor.rowcount

        return await self._submit(op)

    async def remind_once(self, key: str, threshold_s: float, now: datetime) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "INSERT INTO reminders (key, threshold_s, at) VALUES (?, ?, ?)"
                " ON CONFLICT (key, threshold_s) DO NOTHING", (key, threshold_s, _ts(now)))
            return cursor.rowcount == 1

        return await self._submit(op)


_LATE_MARKS = ", ".join("?" * 14)


def _late_row(check: LateCheck) -> tuple[object, ...]:
    row = list(late_check_row(check))
    for index in (6, 7, 13):
        row[index] = _utc(row[index])  # type: ignore[arg-type]
    return tuple(row)


def _finish_attempt(
    conn: sqlite3.Connection, key: str, number: int, result: ChannelResult, now: datetime
) -> None:
    conn.execute(
        "UPDATE attempts SET outcome = ?, code = ?, detail = ?, channel_reference = ?,"
        " finished_at = ? WHERE key = ? AND number = ?",
        (result.outcome.value, result.code, result.detail, result.channel_reference,
         _ts(now), key, number),
    )


# ``attempt_in_doubt`` in SQL, built from the same set so the two cannot drift apart.
_IN_DOUBT = "resolution IS NULL AND (outcome IS NULL OR outcome NOT IN ({}))".format(
    ", ".join(f"'{outcome.value}'" for outcome in sorted(SETTLING_SUBMIT_OUTCOMES))
)


def _resolve(conn: sqlite3.Connection, key: str, round: int, settled: Resolution) -> None:
    conn.execute(
        # An attempt a crash left "sent" gets the outcome it really had: unknown.
        "UPDATE attempts SET resolution = ?,"
        " channel_reference = COALESCE(?, channel_reference),"
        " code = CASE WHEN outcome IS NULL THEN 'interrupted' ELSE code END,"
        " outcome = COALESCE(outcome, 'unknown')"
        f" WHERE key = ? AND round = ? AND reference = ? AND {_IN_DOUBT}",
        (settled.outcome.value, settled.channel_reference, key, round, settled.reference),
    )


def _settle_all(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, value, error in outcomes:
        _settle(future, value, error)


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled; the write happened anyway
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def _translate(exc: Exception) -> Exception:
    if isinstance(exc, sqlite3.Error):
        text = str(exc)
        if text.startswith("terminal: "):
            return JournalError(f"refused by the journal: {text}")
        return JournalError(f"journal error: {text}")
    return exc


def _refuse(conn: sqlite3.Connection, key: str) -> NoReturn:
    """Raise why a change to a pending repayment of this round matched no row."""
    row = conn.execute("SELECT status FROM repayments WHERE key = ?", (key,)).fetchone()
    if row is None:
        raise UnknownRepayment(key)
    raise TerminalStateError(key, row[0])


_RECORD_COLUMNS = (
    "key, account, amount, currency, due_at, metadata, preference, status, round, channel,"
    " channel_reference, code, pending_reason, pending_channel, created_at, updated_at,"
    " skips, corrections"
)
_ATTEMPT_COLUMNS = (
    "channel, reference, outcome, code, started_at, finished_at, detail, resolution, round,"
    " channel_reference"
)


def _attempt(a: tuple[Any, ...]) -> Attempt:
    return Attempt(
        channel=a[0], reference=a[1], outcome=_outcome(a[2]), code=a[3],
        started_at=datetime.fromisoformat(a[4]), finished_at=_dt(a[5]), detail=a[6],
        resolution=_outcome(a[7]), round=a[8], channel_reference=a[9],
    )


def _record(row: tuple[Any, ...], attempts: tuple[Attempt, ...]) -> Record:
    return Record(
        key=row[0], account=row[1], amount=Decimal(row[2]), currency=row[3], due_at=_dt(row[4]),
        metadata=json.loads(row[5]),
        preference=None if row[6] is None else tuple(json.loads(row[6])),
        status=RepaymentStatus(row[7]), round=row[8], channel=row[9], channel_reference=row[10],
        code=row[11], pending_reason=None if row[12] is None else PendingReason(row[12]),
        pending_channel=row[13], created_at=datetime.fromisoformat(row[14]),
        updated_at=datetime.fromisoformat(row[15]), attempts=attempts,
        skips=skips_from(row[16]), corrections=corrections_from(row[17]),
    )


def _attempts_of(conn: sqlite3.Connection, key: str) -> tuple[Attempt, ...]:
    return tuple(_attempt(a) for a in conn.execute(
        f"SELECT {_ATTEMPT_COLUMNS} FROM attempts WHERE key = ? ORDER BY number", (key,)))


def _load(conn: sqlite3.Connection, key: str) -> Record | None:
    row = conn.execute(
        f"SELECT {_RECORD_COLUMNS} FROM repayments WHERE key = ?", (key,)
    ).fetchone()
    return None if row is None else _record(row, _attempts_of(conn, key))


def _load_many(conn: sqlite3.Connection, keys: Sequence[str]) -> dict[str, Record]:
    marks = ",".join("?" * len(keys))
    attempts: dict[str, list[Attempt]] = {}
    for a in conn.execute(
        f"SELECT key, {_ATTEMPT_COLUMNS} FROM attempts WHERE key IN ({marks})"
        " ORDER BY key, number", tuple(keys),
    ):
        attempts.setdefault(a[0], []).append(_attempt(a[1:]))
    return {
        row[0]: _record(row, tuple(attempts.get(row[0], ())))
        for row in conn.execute(
            f"SELECT {_RECORD_COLUMNS} FROM repayments WHERE key IN ({marks})", tuple(keys))
    }


def _with_correction(conn: sqlite3.Connection, key: str, correction: Correction) -> str:
    """The repayment's corrections (JSON) with ``correction`` added at the end."""
    held = conn.execute("SELECT corrections FROM repayments WHERE key = ?", (key,)).fetchone()
    if held is None:
        raise UnknownRepayment(key)
    return json.dumps([*json.loads(held[0] or "[]"), correction_json(correction)])
