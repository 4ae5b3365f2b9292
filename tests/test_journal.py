"""The journal with a router, and what is particular to SQLite (files, locks, triggers,
group commit).  What every journal must do is in ``test_journal_contract.py``."""

from __future__ import annotations

import asyncio
import re
import sqlite3

import pytest

import failover
from failover import ChannelResult, Outcome, RepaymentStatus
from failover.journal import SCHEMA_VERSION
from failover.testing import FakeClock, ScriptedChannel

from .conftest import repayment


async def test_intent_is_written_before_the_channel_is_called(journal, clock):
    """When the adapter runs, the journal already holds the intent and a 'sent' attempt."""
    seen = []

    class Peek(ScriptedChannel):
        async def submit(self, request):
            seen.append(await journal.load(request.repayment_key))
            return await super().submit(request)

    async with failover.Router([Peek("card")], journal, clock=clock) as router:
        await router.repay(repayment())

    [record] = seen
    assert RepaymentStatus.PENDING == record.status
    assert [(None, "card")] == [(a.outcome, a.channel) for a in record.attempts]


async def test_newer_schema_file_is_left_untouched(tmp_path):
    """A journal file of a newer schema is refused before anything is written to it."""
    path = tmp_path / "j.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()

    with pytest.raises(failover.SchemaVersionError):
        await failover.SQLiteJournal(path).open()

    conn = sqlite3.connect(path)
    assert [] == conn.execute("SELECT name FROM sqlite_master").fetchall()
    assert "delete" == conn.execute("PRAGMA journal_mode").fetchone()[0]


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read_only"])
async def test_a_journal_in_a_missing_directory_is_refused_naming_it(tmp_path, read_only):
    """Opening a journal whose directory does not exist raises JournalError naming the path."""
    path = tmp_path / "missing" / "j.db"

    with pytest.raises(failover.JournalError, match=re.escape(str(path))):
        await failover.SQLiteJournal(path, read_only=read_only).open()


async def test_a_journal_in_a_missing_directory_creates_nothing(tmp_path):
    """A refused open leaves no directory, database or lock file behind."""
    with pytest.raises(failover.JournalError):
        await failover.SQLiteJournal(tmp_path / "missing" / "j.db").open()

    assert [] == list(tmp_path.iterdir())


async def test_sqlite_refuses_changing_succeeded_even_by_hand(tmp_path, clock):
    """The SQLite schema itself refuses to change a SUCCEEDED row."""
    path = tmp_path / "j.db"
    async with failover.Router([ScriptedChannel("card")], failover.SQLiteJournal(path),
                               clock=clock) as router:
        await router.repay(repayment())
    conn = sqlite3.connect(path)

    with pytest.raises(sqlite3.IntegrityError, match="terminal"):
        conn.execute("UPDATE repayments SET status = 'failed'")


async def test_concurrent_writes_share_commits(tmp_path, clock):
    """Group commit: many concurrent repayments take far fewer commits than writes."""
    journal = failover.SQLiteJournal(tmp_path / "j.db")
    async with failover.Router([ScriptedChannel("card")], journal, clock=clock) as router:
        await asyncio.gather(*(router.repay(repayment(key=f"k{i}")) for i in range(200)))

        assert journal.operations >= 200 * 2  # intent with the attempt sent, the end
        assert journal.batches < journal.operations / 4


async def test_sqlite_uses_wal_and_full_sync(tmp_path):
    """The journal file is in WAL mode; the connection syncs FULL."""
    journal = failover.SQLiteJournal(tmp_path / "j.db")
    await journal.open()
    modes = await journal._submit(lambda c: (c.execute("PRAGMA journal_mode").fetchone()[0],
                                             c.execute("PRAGMA synchronous").fetchone()[0]))
    await journal.close()

    assert ("wal", 2) == modes


async def test_recovery_queries_sent_attempts_before_anything_else(journal):
    """On open, an attempt a crash left 'sent' is resolved by query before any new submit."""
    clock = FakeClock()
    await journal.open()
    await journal.create(repayment(), None, clock.now())
    reference = failover.make_reference(repayment().key, 1, "card")
    await journal.begin_attempt(repayment().key, 1, "card", reference, clock.now())
    await journal.close()
    card = ScriptedChannel("card", queries=[ChannelResult.succeeded("card-77")])
    backup = ScriptedChannel("backup")

    async with failover.Router([card, backup], journal, clock=clock) as router:
        await router.wait_recovered()
        result = await router.get(repayment().key)

    assert (RepaymentStatus.SUCCEEDED, "card-77") == (result.status, result.channel_reference)
    assert (0, 0) == (card.submits, backup.submits)
    assert (Outcome.UNKNOWN, "interrupted", Outcome.SUCCEEDED) == (
        result.attempts[0].outcome, result.attempts[0].code, result.attempts[0].resolution)


async def test_repay_joins_a_recovering_repayment(journal):
    """A repay() of a key being recovered joins it instead of starting another."""
    clock = FakeClock()
    await journal.open()
    await journal.create(repayment(), None, clock.now())
    await journal.close()
    card = ScriptedChannel("card")

    async with failover.Router([card], journal, clock=clock) as router:
        result = await router.repay(repayment())
        await router.wait_recovered()

    assert (RepaymentStatus.SUCCEEDED, 1) == (result.status, card.submits)


async def test_a_second_writer_is_refused(tmp_path, clock):
    """A writable SQLite journal serves one process: a second opener gets a clear error."""
    path = tmp_path / "j.db"
    async with failover.Router([ScriptedChannel("card")], failover.SQLiteJournal(path),
                               clock=clock) as router:
        await router.repay(repayment())

        with pytest.raises(failover.JournalError, match="another process"):
            await failover.SQLiteJournal(path).open()

    second = failover.SQLiteJournal(path)  # free again once the owner closed it
    await second.open()
    await second.close()


async def test_readers_open_beside_the_writer(tmp_path, clock):
    """A read-only journal reads what the running owner committed."""
    path = tmp_path / "j.db"
    async with failover.Router([ScriptedChannel("card")], failover.SQLiteJournal(path),
                               clock=clock) as router:
        await router.repay(repayment())
        reader = failover.SQLiteJournal(path, read_only=True)
        await reader.open()
        record = await reader.load(repayment().key)
        with pytest.raises(failover.JournalError):
            await reader.new_round(repayment().key, clock.now())
        await reader.close()

    assert RepaymentStatus.SUCCEEDED == record.status


async def test_read_only_refuses_a_file_that_is_not_a_journal(tmp_path):
    """Opening some other SQLite file read-only says it is not a journal."""
    path = tmp_path / "other.db"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.close()

    with pytest.raises(failover.JournalError, match="not a failover journal"):
        await failover.SQLiteJournal(path, read_only=True).open()
