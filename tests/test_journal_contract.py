"""What every implementation of the ``Journal`` protocol must do.

Each test runs against every factory in ``FACTORIES``: a new journal is added
there, once, with the capabilities it has.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

import failover
from failover import (
    ChannelResult,
    Correction,
    LateCheck,
    LateState,
    Outcome,
    PendingReason,
    RefundState,
    RepaymentStatus,
    Skip,
)
from failover.journal import SCHEMA_VERSION
from failover.journal._base import Journal, Resolution
from failover.testing import FakeClock

from . import pg
from .conftest import repayment


@dataclass(frozen=True)
class Factory:
    """How to build one kind of journal on a test's private storage."""

    name: str
    make: Callable[[Path], Journal]
    durable: bool = False
    """A new instance on the same storage sees what a closed one wrote."""
    write_newer_schema: Callable[[Path], None] | None = None
    """Prepare the storage as written by a schema newer than this version supports."""


def _sqlite_newer_schema(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "journal.db")
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()


def _postgres(tmp_path: Path) -> Journal:
    return failover.PostgresJournal(pg.require(), schema=pg.schema_for(str(tmp_path)),
                                    migrate=True)


def _postgres_newer_schema(tmp_path: Path) -> None:
    import asyncpg

    schema = pg.schema_for(str(tmp_path))

    async def write() -> None:
        await failover.PostgresJournal(pg.require(), schema=schema).migrate()
        conn = await asyncpg.connect(pg.require())
        await conn.execute(f"UPDATE {schema}.meta SET version = version + 1")
        await conn.close()

    pg.run(write())


FACTORIES = [
    Factory("memory", lambda tmp_path: failover.MemoryJournal()),
    Factory("sqlite", lambda tmp_path: failover.SQLiteJournal(tmp_path / "journal.db"),
            durable=True, write_newer_schema=_sqlite_newer_schema),
    Factory("postgres", _postgres, durable=True, write_newer_schema=_postgres_newer_schema),
]

KEY = repayment().key


@pytest.fixture(params=FACTORIES, ids=lambda factory: factory.name)
def factory(request: pytest.FixtureRequest) -> Factory:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
async def journal(factory: Factory, tmp_path: Path) -> AsyncIterator[Journal]:
    """An open journal of each kind, closed at the end of the test."""
    opened = factory.make(tmp_path)
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def _sent(journal: Journal, clock: FakeClock, key: str = KEY, channel: str = "card",
                reference: str = "ref-1") -> int:
    """Create the repayment if new and journal one attempt as sent; return its number."""
    await journal.create(repayment(key=key), None, clock.now())
    return await journal.begin_attempt(key, 1, channel, reference, clock.now())


async def _attempts(journal: Journal, key: str = KEY) -> list[tuple[Outcome | None, str | None,
                                                                   Outcome | None]]:
    record = await journal.load(key)
    assert record is not None
    return [(a.outcome, a.code, a.resolution) for a in record.attempts]


# ---- "in doubt" (DESIGN §1) ------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "in_doubt"),
    [
        (None, True),
        (ChannelResult.unknown(), True),
        (ChannelResult.not_found(), True),
        (ChannelResult.succeeded("c-1"), False),
        (ChannelResult.declined(), False),
        (ChannelResult.rejected(), False),
        (ChannelResult.unavailable(), False),
    ],
    ids=lambda v: v.outcome.value if isinstance(v, ChannelResult) else str(v),
)
async def test_an_attempt_is_in_doubt_unless_its_submit_answer_settled_it(
        journal, clock, answer, in_doubt):
    """A sent attempt answered None, UNKNOWN or NOT_FOUND reads back as in doubt."""
    number = await _sent(journal, clock)
    if answer is not None:
        await journal.finish_attempt(KEY, number, answer, clock.now())

    record = await journal.load(KEY)

    assert [in_doubt] == [a.in_doubt for a in record.attempts]


@pytest.mark.parametrize(
    ("answer", "resolved"),
    [
        (ChannelResult.unknown(), True),
        (ChannelResult.not_found(), True),
        (ChannelResult.succeeded("c-1"), False),
        (ChannelResult.declined(), False),
        (ChannelResult.rejected(), False),
        (ChannelResult.unavailable(), False),
    ],
    ids=lambda v: v.outcome.value if isinstance(v, ChannelResult) else str(v),
)
async def test_resolve_marks_exactly_the_attempts_in_doubt(journal, clock, answer, resolved):
    """resolve_attempts applies the same "in doubt" rule as Attempt.in_doubt."""
    number = await _sent(journal, clock)
    await journal.finish_attempt(KEY, number, answer, clock.now())

    await journal.resolve_attempts(KEY, 1, "ref-1", Outcome.DECLINED, clock.now())

    assert [Outcome.DECLINED if resolved else None] == [r for _, _, r in await _attempts(journal)]


async def test_resolve_marks_an_attempt_whose_submit_answered_not_found(journal, clock):
    """NOT_FOUND from a submit proves nothing: resolve_attempts records the resolution
    and keeps the answer the submit gave."""
    number = await _sent(journal, clock)
    await journal.finish_attempt(KEY, number, ChannelResult.not_found(), clock.now())

    await journal.resolve_attempts(KEY, 1, "ref-1", Outcome.SUCCEEDED, clock.now())

    assert [(Outcome.NOT_FOUND, "not_found", Outcome.SUCCEEDED)] == await _attempts(journal)


async def test_a_resolved_attempt_is_no_longer_in_doubt(journal, clock):
    """Once a resolution is journaled, the attempt is settled."""
    number = await _sent(journal, clock)
    await journal.finish_attempt(KEY, number, ChannelResult.not_found(), clock.now())
    await journal.resolve_attempts(KEY, 1, "ref-1", Outcome.NOT_FOUND, clock.now())

    record = await journal.load(KEY)

    assert [False] == [a.in_doubt for a in record.attempts]


async def test_resolve_marks_an_interrupted_attempt_unknown(journal, clock):
    """An attempt a crash left sent reads UNKNOWN/interrupted once resolved."""
    await _sent(journal, clock)

    await journal.resolve_attempts(KEY, 1, "ref-1", Outcome.NOT_FOUND, clock.now())

    assert [(Outcome.UNKNOWN, "interrupted", Outcome.NOT_FOUND)] == await _attempts(journal)


# ---- begin_attempt ---------------------------------------------------------


async def test_begin_attempt_numbers_attempts_from_one(journal, clock):
    """Attempts of a repayment are numbered 1, 2, 3 in the order they are begun."""
    await journal.create(repayment(), None, clock.now())

    numbers = [await journal.begin_attempt(KEY, 1, "card", f"ref-{i}", clock.now())
               for i in range(3)]

    assert [1, 2, 3] == numbers


@pytest.mark.parametrize("status", [RepaymentStatus.FAILED, RepaymentStatus.SUCCEEDED])
async def test_begin_attempt_is_refused_on_a_finished_repayment(journal, clock, status):
    """A finished repayment gets no new attempt: TerminalStateError."""
    await _sent(journal, clock)
    await journal.finish(KEY, 1, status, None, None, "x", clock.now())

    with pytest.raises(failover.TerminalStateError):
        await journal.begin_attempt(KEY, 1, "wallet", "ref-2", clock.now())


async def test_a_refused_begin_attempt_writes_nothing(journal, clock):
    """begin_attempt on a FAILED repayment with no attempts leaves it with none."""
    await journal.create(repayment(), None, clock.now())
    await journal.finish(KEY, 1, RepaymentStatus.FAILED, None, None, "x", clock.now())

    with pytest.raises(failover.TerminalStateError):
        await journal.begin_attempt(KEY, 1, "card", "ref-1", clock.now())
    assert [] == await _attempts(journal)


async def test_begin_attempt_is_refused_for_another_round(journal, clock):
    """An attempt for a round the repayment is not in is refused."""
    await journal.create(repayment(), None, clock.now())

    with pytest.raises(failover.TerminalStateError):
        await journal.begin_attempt(KEY, 2, "card", "ref-1", clock.now())
    assert [] == await _attempts(journal)


# ---- create, load ----------------------------------------------------------


async def test_create_writes_a_new_pending_intent(journal, clock):
    """create() of a new key returns it PENDING, round 1, in flight, created True."""
    record, created = await journal.create(repayment(), ("card",), clock.now())

    assert (True, RepaymentStatus.PENDING, 1, PendingReason.IN_FLIGHT, ("card",)) == (
        created, record.status, record.round, record.pending_reason, record.preference)


async def test_create_is_idempotent_per_key(journal, clock):
    """A second create() of a key returns the stored record and created False."""
    first, _ = await journal.create(repayment(), None, clock.now())
    clock.advance(5)

    again, created = await journal.create(repayment(), None, clock.now(), ("card", "ref-1"))

    assert (False, first) == (created, again)


async def test_create_writes_the_first_attempt_with_the_intent(journal, clock):
    """first_attempt is journaled sent, as attempt 1 of round 1."""
    record, _ = await journal.create(repayment(), None, clock.now(), ("card", "ref-1"))

    assert [("card", "ref-1", None, 1, True)] == [
        (a.channel, a.reference, a.outcome, a.round, a.in_doubt) for a in record.attempts]
    assert record == await journal.load(KEY)


async def test_load_of_an_unknown_key_is_none(journal):
    """load() of a key the journal does not hold returns None."""
    assert None is await journal.load("nope")


async def test_load_many_returns_the_keys_it_holds(journal, clock):
    """load_many() returns records of the keys held, and leaves the others out."""
    for key in ("a", "b"):
        await _sent(journal, clock, key=key)

    found = await journal.load_many(["a", "nope", "b"])

    assert {"a": await journal.load("a"), "b": await journal.load("b")} == found


# ---- attempts --------------------------------------------------------------


async def test_finish_attempt_records_the_answer(journal, clock):
    """finish_attempt() writes outcome, code, detail, channel reference and end time."""
    number = await _sent(journal, clock)
    clock.advance(2)

    await journal.finish_attempt(KEY, number, ChannelResult(Outcome.SUCCEEDED, "c-1", "ok", "d"),
                                 clock.now())

    [a] = (await journal.load(KEY)).attempts
    assert (Outcome.SUCCEEDED, "ok", "d", "c-1", clock.now()) == (
        a.outcome, a.code, a.detail, a.channel_reference, a.finished_at)


async def test_resolve_marks_every_attempt_in_doubt_with_that_reference_only(journal, clock):
    """resolve_attempts() marks the in-doubt attempts with that reference, not others."""
    for reference, answer in [("ref-1", ChannelResult.unknown()), ("ref-1", None),
                              ("ref-2", ChannelResult.unknown()),
                              ("ref-1", ChannelResult.declined())]:
        number = await _sent(journal, clock, reference=reference)
        if answer is not None:
            await journal.finish_attempt(KEY, number, answer, clock.now())

    await journal.resolve_attempts(KEY, 1, "ref-1", Outcome.SUCCEEDED, clock.now(), "c-9")

    record = await journal.load(KEY)
    assert [(Outcome.SUCCEEDED, "c-9"), (Outcome.SUCCEEDED, "c-9"), (None, None),
            (None, None)] == [(a.resolution, a.channel_reference) for a in record.attempts]


async def test_resolve_marks_only_attempts_of_that_round(journal, clock):
    """An in-doubt attempt of an earlier round keeps its doubt when a later one resolves."""
    await _sent(journal, clock)
    await journal.finish(KEY, 1, RepaymentStatus.FAILED, None, None, "x", clock.now())
    await journal.new_round(KEY, clock.now())
    await journal.begin_attempt(KEY, 2, "card", "ref-1", clock.now())

    await journal.resolve_attempts(KEY, 2, "ref-1", Outcome.NOT_FOUND, clock.now())

    record = await journal.load(KEY)
    assert [(1, None), (2, Outcome.NOT_FOUND)] == [(a.round, a.resolution)
                                                    for a in record.attempts]


# ---- set_pending, finish, new_round ----------------------------------------


async def test_set_pending_records_why(journal, clock):
    """set_pending() records the reason, the channel in doubt and the code."""
    await _sent(journal, clock)

    await journal.set_pending(KEY, 1, PendingReason.AWAITING_CHANNEL, "card", "timeout",
                              clock.now())

    record = await journal.load(KEY)
    assert (RepaymentStatus.PENDING, PendingReason.AWAITING_CHANNEL, "card", "timeout") == (
        record.status, record.pending_reason, record.pending_channel, record.code)


async def test_set_pending_is_refused_on_a_finished_repayment(journal, clock):
    """set_pending() of a finished repayment raises TerminalStateError."""
    await _sent(journal, clock)
    await journal.finish(KEY, 1, RepaymentStatus.FAILED, None, None, "x", clock.now())

    with pytest.raises(failover.TerminalStateError):
        await journal.set_pending(KEY, 1, PendingReason.AWAITING_CHANNEL, "card", "t",
                                  clock.now())


async def test_finish_makes_the_repayment_terminal(journal, clock):
    """finish() returns the record terminal, with its channel and code, no pending reason."""
    await _sent(journal, clock)

    record = await journal.finish(KEY, 1, RepaymentStatus.SUCCEEDED, "card", "c-1", None,
                                  clock.now())

    assert (RepaymentStatus.SUCCEEDED, "card", "c-1", None, record) == (
        record.status, record.channel, record.channel_reference, record.pending_reason,
        await journal.load(KEY))


async def test_a_second_finish_is_refused_and_changes_nothing(journal, clock):
    """finish() of a terminal repayment raises TerminalStateError; the record stays."""
    await _sent(journal, clock)
    first = await journal.finish(KEY, 1, RepaymentStatus.SUCCEEDED, "card", "c-1", None,
                                 clock.now())

    with pytest.raises(failover.TerminalStateError):
        await journal.finish(KEY, 1, RepaymentStatus.FAILED, None, None, "x", clock.now())
    assert first == await journal.load(KEY)


async def test_finish_writes_the_attempt_answer_and_the_resolution(journal, clock):
    """finish(attempt=..., resolution=...) writes both with the end."""
    await _sent(journal, clock, reference="ref-1")
    number = await journal.begin_attempt(KEY, 1, "card", "ref-1", clock.now())

    final = await journal.finish(
        KEY, 1, RepaymentStatus.SUCCEEDED, "card", "c-1", None, clock.now(),
        attempt=(number, ChannelResult.succeeded("c-1")),
        resolution=Resolution("ref-1", Outcome.SUCCEEDED, "c-1"))

    assert [(Outcome.UNKNOWN, "interrupted", Outcome.SUCCEEDED),
            (Outcome.SUCCEEDED, None, None)] == await _attempts(journal)
    assert final == await journal.load(KEY)  # what finish() returns is what it wrote


@pytest.mark.parametrize("answer", [ChannelResult.unknown("timeout"), ChannelResult.not_found(),
                                    ChannelResult.declined("insufficient_funds")])
async def test_finish_returns_the_record_as_written(journal, clock, answer):
    """finish() returns the record and attempts exactly as load() then reads them, whatever
    the answer and resolution written with it."""
    await _sent(journal, clock, reference="ref-1")
    await _sent(journal, clock, channel="wallet", reference="ref-2")
    number = await journal.begin_attempt(KEY, 1, "card", "ref-1", clock.now())
    clock.advance(1)

    final = await journal.finish(
        KEY, 1, RepaymentStatus.FAILED, None, None, "declined", clock.now(),
        attempt=(number, answer), resolution=Resolution("ref-1", Outcome.NOT_FOUND))

    assert final == await journal.load(KEY)
    assert [a.reference for a in final.attempts] == ["ref-1", "ref-2", "ref-1"]


async def test_finish_writes_the_attempt_answer_even_when_refused(journal, clock):
    """The attempt answer given to a refused finish() is still journaled: it is a fact."""
    number = await _sent(journal, clock)
    await journal.finish(KEY, 1, RepaymentStatus.FAILED, None, None, "x", clock.now())

    with pytest.raises(failover.TerminalStateError):
        await journal.finish(KEY, 1, RepaymentStatus.SUCCEEDED, "card", "c-1", None,
                             clock.now(), attempt=(number, ChannelResult.succeeded("c-1")))
    assert [(Outcome.SUCCEEDED, None, None)] == await _attempts(journal)


async def test_new_round_reopens_a_failed_repayment(journal, clock):
    """new_round() of a FAILED repayment makes it PENDING in flight, round 2, code cleared."""
    await _sent(journal, clock)
    await journal.finish(KEY, 1, RepaymentStatus.FAILED, "card", None, "declined", clock.now())

    record = await journal.new_round(KEY, clock.now())

    assert (RepaymentStatus.PENDING, 2, PendingReason.IN_FLIGHT, None, None) == (
        record.status, record.round, record.pending_reason, record.channel, record.code)


async def test_new_round_is_refused_once_the_account_is_purged(journal, clock):
    """new_round() of a FAILED repayment whose account purge erased raises JournalError
    and leaves it FAILED: a round that could call no channel would stay pending."""
    number = await _sent(journal, clock)
    await journal.finish(KEY, 1, RepaymentStatus.FAILED, "card", None, "declined", clock.now(),
                         attempt=(number, ChannelResult.declined("declined")))
    clock.advance(60)
    assert 1 == await journal.purge_accounts(clock.now())

    with pytest.raises(failover.JournalError, match="erased by purge"):
        await journal.new_round(KEY, clock.now())
    record = await journal.load(KEY)
    assert record is not None
    assert (RepaymentStatus.FAILED, 1) == (record.status, record.round)


@pytest.mark.parametrize("status", [None, RepaymentStatus.SUCCEEDED])
async def test_new_round_is_refused_unless_failed(journal, clock, status):
    """new_round() of a PENDING or SUCCEEDED repayment raises TerminalStateError."""
    await _sent(journal, clock)
    if status is not None:
        await journal.finish(KEY, 1, status, "card", "c-1", None, clock.now())

    with pytest.raises(failover.TerminalStateError):
        await journal.new_round(KEY, clock.now())


@pytest.mark.parametrize("operation", ["begin_attempt", "set_pending", "finish", "new_round"])
async def test_changing_an_unknown_key_raises_unknown_repayment(journal, clock, operation):
    """Changes to a key the journal does not hold raise UnknownRepayment."""
    now = clock.now()
    calls = {
        "begin_attempt": lambda: journal.begin_attempt("nope", 1, "card", "ref-1", now),
        "set_pending": lambda: journal.set_pending("nope", 1, PendingReason.IN_FLIGHT, None,
                                                   None, now),
        "finish": lambda: journal.finish("nope", 1, RepaymentStatus.FAILED, None, None, "x",
                                         now),
        "new_round": lambda: journal.new_round("nope", now),
    }

    with pytest.raises(failover.UnknownRepayment):
        await calls[operation]()


# ---- queries ---------------------------------------------------------------


async def test_pending_keys_lists_pending_oldest_first(journal, clock):
    """pending_keys() lists PENDING repayments oldest first, finished ones left out."""
    for key in ("b", "a", "c"):
        await journal.create(repayment(key=key), None, clock.now())
        clock.advance(1)
    await journal.finish("c", 1, RepaymentStatus.FAILED, None, None, "x", clock.now())

    assert ["b", "a"] == await journal.pending_keys()


async def test_pending_keys_filters_by_reason(journal, clock):
    """pending_keys(reason) lists only PENDING repayments of that reason."""
    for key in ("a", "b"):
        await journal.create(repayment(key=key), None, clock.now())
        clock.advance(1)
    await journal.set_pending("b", 1, PendingReason.AWAITING_CHANNEL, "card", "timeout",
                              clock.now())

    assert (["a"], ["b"]) == (await journal.pending_keys(PendingReason.IN_FLIGHT),
                              await journal.pending_keys(PendingReason.AWAITING_CHANNEL))


async def test_stats_count_by_status_with_the_oldest_pending(journal, clock):
    """stats() counts repayments by status and gives the oldest PENDING creation time."""
    for key in ("a", "b", "c"):
        await journal.create(repayment(key=key), None, clock.now())
        clock.advance(1)
    await journal.finish("a", 1, RepaymentStatus.SUCCEEDED, "card", "c-1", None, clock.now())
    oldest = (await journal.load("b")).created_at

    stats = await journal.stats()

    assert ({RepaymentStatus.PENDING: 2, RepaymentStatus.SUCCEEDED: 1,
             RepaymentStatus.FAILED: 0}, oldest) == (stats.by_status, stats.oldest_pending)


async def test_recent_failovers_are_channel_changes_newest_first(journal, clock):
    """recent_failovers() lists moves between channels within a round, newest first."""
    for key, channels in [("a", ["card", "card", "wallet"]), ("b", ["card", "bank"])]:
        for channel in channels:
            clock.advance(1)
            await _sent(journal, clock, key=key, channel=channel)

    moves = await journal.recent_failovers()

    assert [("b", "card", "bank"), ("a", "card", "wallet")] == [
        (m.key, m.from_channel, m.to_channel) for m in moves]


async def test_recent_failovers_are_limited(journal, clock):
    """recent_failovers(limit) returns at most limit moves, the newest."""
    for key in ("a", "b"):
        for channel in ("card", "wallet"):
            clock.advance(1)
            await _sent(journal, clock, key=key, channel=channel)

    assert ["b"] == [m.key for m in await journal.recent_failovers(limit=1)]


# ---- storage ---------------------------------------------------------------


async def test_records_survive_close_and_reopen(factory, journal, clock, tmp_path):
    """A durable journal holds, after reopening, exactly what it held before."""
    if not factory.durable:
        pytest.skip(f"{factory.name} journals are not durable")
    await _sent(journal, clock)
    before = await journal.finish(KEY, 1, RepaymentStatus.SUCCEEDED, "card", "c-1", None,
                                  clock.now())
    await journal.close()

    reopened = factory.make(tmp_path)
    await reopened.open()
    after = await reopened.load(KEY)
    await reopened.close()

    assert before == after


async def test_a_journal_of_a_newer_schema_is_refused(factory, tmp_path):
    """Storage written by a newer schema raises SchemaVersionError on open."""
    if factory.write_newer_schema is None:
        pytest.skip(f"{factory.name} journals have no schema")
    factory.write_newer_schema(tmp_path)

    with pytest.raises(failover.SchemaVersionError, match="upgrade failover"):
        await factory.make(tmp_path).open()


# ---- late collections, corrections, reminders (schema 2) ---------------------------



async def _ended(journal: Journal, clock: FakeClock, answer: ChannelResult,
                 status: RepaymentStatus, key: str = KEY, **finish: object) -> None:
    number = await _sent(journal, clock, key=key)
    await journal.finish(key, 1, status, "card" if status is RepaymentStatus.SUCCEEDED
                         else None, answer.channel_reference, answer.code, clock.now(),
                         attempt=(number, answer), **finish)  # type: ignore[arg-type]


@pytest.mark.parametrize(("answer", "status", "watched"), [
    (ChannelResult.succeeded("c-1"), RepaymentStatus.SUCCEEDED, False),
    (ChannelResult.declined(), RepaymentStatus.FAILED, False),
    (ChannelResult.unknown(), RepaymentStatus.FAILED, True),
    (ChannelResult.not_found(), RepaymentStatus.FAILED, True),
], ids=["succeeded", "declined", "unknown", "not_found"])
async def test_an_ending_that_may_still_collect_is_watched(journal, clock, answer, status,
                                                           watched):
    """finish marks for the watch exactly the endings with an attempt that may collect."""
    await _ended(journal, clock, answer, status)

    assert ([KEY] if watched else []) == await journal.watched(10)


async def test_a_success_on_a_channel_the_ending_does_not_name_is_watched(journal, clock):
    """A proven collection beside the ending's own is a second collection to settle."""
    number = await _sent(journal, clock)
    await journal.finish_attempt(KEY, number, ChannelResult.succeeded("c-1"), clock.now())
    await journal.begin_attempt(KEY, 1, "wallet", "ref-2", clock.now())
    await journal.finish(KEY, 1, RepaymentStatus.SUCCEEDED, "wallet", "w-1", None,
                         clock.now())

    assert [KEY] == await journal.watched(10)


async def test_skips_are_kept_with_the_ending(journal, clock):
    skip = Skip("card", "maintenance", clock.now(), 1)
    await _ended(journal, clock, ChannelResult.succeeded("c-1"), RepaymentStatus.SUCCEEDED,
                 skips=[skip])

    assert (skip,) == (await journal.load(KEY)).skips


def _check(key: str = KEY, reference: str = "ref-1", **kw: object) -> LateCheck:
    fields = {"channel": "card", "round": 1, "state": LateState.WATCHING, **kw}
    return LateCheck(key=key, reference=reference, **fields)  # type: ignore[arg-type]


async def test_watching_reads_the_record_it_clears_the_mark_of(journal, clock):
    """The checks are built from the record as it stands in the same write."""
    await _ended(journal, clock, ChannelResult.unknown(), RepaymentStatus.FAILED)
    seen = []

    await journal.start_watching(KEY, lambda record: seen.append(record.status) or [])

    assert [RepaymentStatus.FAILED] == seen


async def test_an_ending_after_the_watch_marks_it_again(journal, clock):
    """A new round that ends (after the mark was turned into checks) is watched anew."""
    await _ended(journal, clock, ChannelResult.unknown(), RepaymentStatus.FAILED)
    await journal.start_watching(KEY, lambda record: [])
    await journal.new_round(KEY, clock.now())
    number = await journal.begin_attempt(KEY, 2, "card", "ref-2", clock.now())
    await journal.finish(KEY, 2, RepaymentStatus.FAILED, None, None, "unknown", clock.now(),
                         attempt=(number, ChannelResult.unknown()))

    assert [KEY] == await journal.watched(10)


async def test_watching_adds_checks_once_and_clears_the_mark(journal, clock):
    await _ended(journal, clock, ChannelResult.unknown(), RepaymentStatus.FAILED)
    check = _check(next_at=clock.now())

    await journal.start_watching(KEY, lambda record: [check])
    await journal.start_watching(
        KEY, lambda record: [_check(next_at=clock.now() + timedelta(hours=1))])

    assert [] == await journal.watched(10)
    assert [check] == await journal.late_checks(KEY)


async def test_due_checks_are_claimed_until_the_claim_runs_out(journal, clock):
    await _ended(journal, clock, ChannelResult.unknown(), RepaymentStatus.FAILED)
    await journal.start_watching(KEY, lambda record: [_check(next_at=clock.now())])
    claim = clock.now() + timedelta(seconds=60)

    [due] = await journal.due_late_checks(clock.now(), 10, claim)

    assert "ref-1" == due.reference
    assert [] == await journal.due_late_checks(clock.now(), 10, claim)
    assert 1 == len(await journal.due_late_checks(claim, 10, claim + timedelta(seconds=60)))


async def test_a_check_moves_only_from_the_state_it_was_read_in(journal, clock):
    """Compare-and-set: of two instances moving one check, one wins."""
    await _ended(journal, clock, ChannelResult.unknown(), RepaymentStatus.FAILED)
    check = _check(next_at=clock.now())
    await journal.start_watching(KEY, lambda record: [check])
    sent = dataclasses.replace(check, state=LateState.COLLECTED, refund=RefundState.SENT)

    assert await journal.update_late_check(sent, check)
    assert not await journal.update_late_check(dataclasses.replace(sent, checks=9), check)
    assert [sent] == await journal.late_checks(KEY)
    assert [sent] == await journal.late_checks(state=LateState.COLLECTED,
                                               refund=RefundState.SENT)
    assert [] == await journal.late_checks(refund=RefundState.MANUAL)


async def test_a_late_collection_is_recorded_once(journal, clock):
    await _ended(journal, clock, ChannelResult.unknown(), RepaymentStatus.FAILED)
    found = _check(state=LateState.COLLECTED, found_at=clock.now(), found_by="query",
                   channel_reference="c-9", next_at=clock.now())

    assert await journal.collected_late(found)
    assert not await journal.collected_late(found)
    assert [found] == await journal.late_checks(KEY)
    with pytest.raises(failover.UnknownRepayment):
        await journal.collected_late(_check(key="nobody", state=LateState.COLLECTED))


def _correction(clock: FakeClock, old: RepaymentStatus = RepaymentStatus.FAILED,
                old_code: str | None = "unknown") -> Correction:
    return Correction(at=clock.now(), reason="late_collection", old_status=old,
                      old_channel=None, old_channel_reference=None, old_code=old_code,
                      new_status=RepaymentStatus.SUCCEEDED, new_channel="card",
                      new_channel_reference="c-9", reference="ref-1", evidence="query")


async def test_a_correction_changes_the_ending_and_keeps_the_old_one(journal, clock):
    await _ended(journal, clock, ChannelResult.unknown(), RepaymentStatus.FAILED)
    correction = _correction(clock)

    record = await journal.correct(KEY, 1, correction)

    assert (RepaymentStatus.SUCCEEDED, "card", "c-9", (correction,)) == (
        record.status, record.channel, record.channel_reference, record.corrections)
    assert (correction,) == (await journal.load(KEY)).corrections


async def test_a_correction_of_an_ending_that_moved_is_refused(journal, clock):
    """Compare-and-set on the ending: a second, stale correction changes nothing."""
    await _ended(journal, clock, ChannelResult.unknown(), RepaymentStatus.FAILED)
    await journal.correct(KEY, 1, _correction(clock))

    with pytest.raises(failover.TerminalStateError):
        await journal.correct(KEY, 1, _correction(clock))
    assert 1 == len((await journal.load(KEY)).corrections)


async def test_a_correction_planned_before_another_landed_is_refused(journal, clock):
    """Compare-and-set on the corrections too: a correction that leaves the ending's
    columns as they were (a channel reference that is None both times) still moves the
    count, so one planned on the read before it never lands."""
    await _ended(journal, clock, ChannelResult.succeeded(None), RepaymentStatus.SUCCEEDED)
    same = Correction(
        at=clock.now(), reason="late_collection", old_status=RepaymentStatus.SUCCEEDED,
        old_channel="card", old_channel_reference=None, old_code=None,
        new_status=RepaymentStatus.SUCCEEDED, new_channel="card", new_channel_reference=None,
        reference="ref-0", evidence="callback")
    await journal.correct(KEY, 1, same, after=0)

    with pytest.raises(failover.TerminalStateError):
        await journal.correct(KEY, 1, dataclasses.replace(same, reference="ref-9"), after=0)
    assert ["ref-0"] == [c.reference for c in (await journal.load(KEY)).corrections]


async def test_a_correction_that_displaces_the_ending_adds_it_to_refund(journal, clock):
    await _ended(journal, clock, ChannelResult.succeeded("c-1"), RepaymentStatus.SUCCEEDED)
    correction = Correction(
        at=clock.now(), reason="late_collection", old_status=RepaymentStatus.SUCCEEDED,
        old_channel="card", old_channel_reference="c-1", old_code=None,
        new_status=RepaymentStatus.SUCCEEDED, new_channel="wallet",
        new_channel_reference="w-1", reference="ref-0", evidence="query")
    displaced = _check(state=LateState.COLLECTED, found_by="ending", next_at=clock.now(),
                       channel_reference="c-1")

    await journal.correct(KEY, 1, correction, displaced)

    assert [displaced] == await journal.late_checks(KEY)


async def test_find_reference_names_the_repayment(journal, clock):
    await _sent(journal, clock)

    assert KEY == await journal.find_reference("card", "ref-1")
    assert None is await journal.find_reference("wallet", "ref-1")
    assert None is await journal.find_reference("card", "ref-9")


async def test_due_between_and_at_risk_read_due_dates(journal, clock):
    now = clock.now()
    for key, hours in (("a", 1), ("b", 5), ("c", 30)):
        await journal.create(repayment(key=key, due_at=now + timedelta(hours=hours)), None, now)
    await journal.create(repayment(key="undated"), None, now)

    assert ["a", "b"] == [r.key for r in await journal.due_between(now, now + timedelta(hours=6))]
    assert ["a", "b", "c"] == [r.key for r in await journal.due_between(None, None)]
    assert ["a", "b"] == [r.key for r in await journal.at_risk(now, 6 * 3600)]
    assert ["b"] == [r.key for r in await journal.at_risk(now + timedelta(hours=2), 6 * 3600)]


async def test_a_reminder_is_noted_once(journal, clock):
    assert await journal.remind_once(KEY, 3600.0, clock.now())
    assert not await journal.remind_once(KEY, 3600.0, clock.now())
    assert await journal.remind_once(KEY, 7200.0, clock.now())


# ---- operators' switches and breaker reports (schema 3) -----------------------------

async def test_a_switch_is_kept_replaced_and_cleared(journal, clock):
    first = switch(clock)
    await journal.set_override(first)
    second = switch(clock, hours=4)
    await journal.set_override(second)

    assert [second] == await journal.overrides()
    assert await journal.clear_override("card")
    assert not await journal.clear_override("card")
    assert [] == await journal.overrides()


async def test_breaker_reports_are_the_last_per_instance_and_channel(journal, clock):
    await journal.report_breakers("a", {"card": "closed", "wallet": "open"}, clock.now())
    clock.advance(5)
    await journal.report_breakers("a", {"card": "open"}, clock.now())

    assert [("a", "card", "open", clock.now()),
            ("a", "wallet", "open", clock.now() - timedelta(seconds=5))] \
        == await journal.breaker_reports()


def switch(clock: FakeClock, channel: str = "card", enabled: bool = False,
           hours: float = 2) -> failover.Override:
    return failover.Override(channel, enabled, clock.now() + timedelta(hours=hours),
                             "bank maintenance", "ops-ana", clock.now())
