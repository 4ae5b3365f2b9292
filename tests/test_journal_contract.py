"""What every implementation of the ``Journal`` protocol must do.

Each test runs against every factory in ``FACTORIES``: a new journal is added
there, once, with the capabilities it has.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import failover
from failover import ChannelResult, Outcome, RepaymentStatus
from failover.journal import SCHEMA_VERSION
from failover.journal._base import Journal
from failover.testing import FakeClock

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


FACTORIES = [
    Factory("memory", lambda tmp_path: failover.MemoryJournal()),
    Factory("sqlite", lambda tmp_path: failover.SQLiteJournal(tmp_path / "journal.db"),
            durable=True, write_newer_schema=_sqlite_newer_schema),
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
