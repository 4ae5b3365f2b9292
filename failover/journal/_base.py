"""What every journal stores and the operations the router needs from it.

A journal is the write-ahead record of each repayment: the intent is written
before any channel is called, each attempt is written "sent" before the call
and finished after, and a terminal state never changes (``FAILED`` only by an
explicit new round).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from failover._errors import IdempotencyConflict, JournalError, UnknownRepayment
from failover._models import (
    Attempt,
    ChannelResult,
    Correction,
    JSONScalar,
    LateCheck,
    LateState,
    Outcome,
    Override,
    PendingReason,
    RefundState,
    Repayment,
    RepaymentResult,
    RepaymentStatus,
    Skip,
)
from failover.codec import PURGED, account_usable


@dataclass(frozen=True, slots=True)
class Record:
    """One repayment as the journal holds it."""

    key: str
    account: str = dataclasses.field(repr=False)
    amount: Decimal
    currency: str
    due_at: datetime | None
    metadata: dict[str, JSONScalar]
    preference: tuple[str, ...] | None
    status: RepaymentStatus
    round: int
    created_at: datetime
    updated_at: datetime
    channel: str | None = None
    channel_reference: str | None = None
    code: str | None = None
    pending_reason: PendingReason | None = PendingReason.IN_FLIGHT
    pending_channel: str | None = None
    attempts: tuple[Attempt, ...] = ()
    skips: tuple[Skip, ...] = ()
    corrections: tuple[Correction, ...] = ()

    def result(self) -> RepaymentResult:
        pending = self.status is RepaymentStatus.PENDING
        return RepaymentResult(
            key=self.key,
            status=self.status,
            channel=self.channel,
            channel_reference=self.channel_reference,
            attempts=self.attempts,
            amount=self.amount,
            currency=self.currency,
            code=self.code,
            pending_reason=self.pending_reason if pending else None,
            pending_channel=self.pending_channel if pending else None,
            round=self.round,
            created_at=self.created_at,
            updated_at=self.updated_at,
            corrections=self.corrections,
        )

    def check_same(self, repayment: Repayment) -> None:
        """Raise ``IdempotencyConflict`` if ``repayment`` reuses this key for other money."""
        for field in ("account", "amount", "currency"):
            if field == "account" and not account_usable(self.account):
                continue  # erased (or unreadable here): the rest must still agree
            stored, given = getattr(self, field), getattr(repayment, field)
            if stored != given:
                shown = (lambda v: "<masked>") if field == "account" else (lambda v: v)
                raise IdempotencyConflict(self.key, field, shown(stored), shown(given))

    def round_attempts(self) -> tuple[Attempt, ...]:
        if all(a.round == self.round for a in self.attempts):  # the usual case: one round
            return self.attempts
        return tuple(a for a in self.attempts if a.round == self.round)


def new_record(
    repayment: Repayment, preference: tuple[str, ...] | None, now: datetime
) -> Record:
    return Record(
        key=repayment.key,
        account=repayment.account,
        amount=repayment.amount,
        currency=repayment.currency,
        due_at=repayment.due_at,
        metadata=dict(repayment.metadata),
        preference=preference,
        status=RepaymentStatus.PENDING,
        round=1,
        created_at=now,
        updated_at=now,
    )


@dataclass(frozen=True, slots=True)
class Resolution:
    """What a query or a definitive resubmit proved about the attempts with a reference."""

    reference: str
    outcome: Outcome
    channel_reference: str | None = None


@dataclass(frozen=True, slots=True)
class JournalStats:
    """Counts for dashboards and the ``failover status`` command."""

    by_status: dict[RepaymentStatus, int]
    oldest_pending: datetime | None


@dataclass(frozen=True, slots=True)
class Failover:
    """A move from one channel to the next for a repayment, as the attempts show it."""

    key: str
    from_channel: str
    to_channel: str
    at: datetime


def failovers_in(record: Record) -> list[Failover]:
    """The channel changes in a record's attempts, round by round."""
    moves = []
    previous: Attempt | None = None
    for attempt in record.attempts:
        if previous is not None and previous.round == attempt.round \
                and previous.channel != attempt.channel:
            moves.append(Failover(record.key, previous.channel, attempt.channel,
                                  attempt.started_at))
        previous = attempt
    return moves


class Journal(Protocol):
    """The durable store behind a router.  All methods are coroutines.

    Ownership (``acquire``, ``release``, ``hold``, ``changed``, ``take_expired``) matters
    for a journal several instances share (``shared``): each unfinished repayment has one
    owner at a time, and every write of a repayment's state is the owner's.  A journal one
    router owns whole (memory, SQLite) owns every repayment: see ``SingleOwner``.
    """

    shared: bool
    """Whether several router instances share this journal (leases and fencing)."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def create(
        self, repayment: Repayment, preference: tuple[str, ...] | None, now: datetime,
        first_attempt: tuple[str, str] | None = None,
    ) -> tuple[Record, bool]:
        """Write the intent if the key is new; return the stored record and whether it was new.

        ``first_attempt`` (channel, reference) is written "sent" with a new intent, as
        attempt 1 of round 1, in the same write; an existing key gets no attempt.
        """
        ...

    async def load(self, key: str) -> Record | None: ...

    async def load_many(self, keys: Sequence[str]) -> dict[str, Record]:
        """The records of those ``keys`` the journal holds (one read, for recovery)."""
        ...

    async def begin_attempt(
        self, key: str, round: int, channel: str, reference: str, now: datetime
    ) -> int:
        """Write an attempt as sent (outcome unknown) and return its number."""
        ...

    async def finish_attempt(
        self, key: str, number: int, result: ChannelResult, now: datetime
    ) -> None: ...

    async def resolve_attempts(
        self, key: str, round: int, reference: str, resolution: Outcome, now: datetime,
        channel_reference: str | None = None,
    ) -> None:
        """Record what a query or definitive resubmit proved about every attempt in
        doubt with ``reference``."""
        ...

    async def set_pending(
        self, key: str, round: int, reason: PendingReason, channel: str | None,
        code: str | None, now: datetime,
    ) -> None: ...

    async def finish(
        self, key: str, round: int, status: RepaymentStatus, channel: str | None,
        channel_reference: str | None, code: str | None, now: datetime,
        *, attempt: tuple[int, ChannelResult] | None = None,
        resolution: Resolution | None = None, skips: Sequence[Skip] = (),
    ) -> Record:
        """Make the repayment terminal; ``TerminalStateError`` if it already is.

        ``skips`` (channels passed over) are added to the record's.  If the ended record
        ``needs_watch``, the same write marks it for the late-collection watch
        (``watched``).

        ``attempt`` (number, answer) and ``resolution`` are written in the same
        operation first, as ``finish_attempt`` and ``resolve_attempts`` would: the
        answer that ends a repayment costs one journal write, not three.  They are
        facts about attempts, true even if the repayment turns out finished already.
        """
        ...

    async def new_round(self, key: str, now: datetime) -> Record:
        """Move a ``FAILED`` repayment back to ``PENDING`` under a new round number."""
        ...

    async def pending_keys(self, reason: PendingReason | None = None) -> list[str]:
        """Keys of ``PENDING`` repayments, oldest first (optionally of one reason)."""
        ...

    async def stats(self) -> JournalStats: ...

    async def recent_failovers(self, limit: int = 10) -> list[Failover]:
        """The latest channel changes, newest first."""
        ...

    async def acquire(self, key: str) -> Record | None:
        """Own ``key`` to drive it and return its record; ``None`` while another instance
        holds it.  A finished repayment is returned as it stands (nothing to own);
        ``UnknownRepayment`` if the journal does not hold the key."""
        ...

    async def release(self, key: str) -> None:
        """Give up ``key`` after a drive that left it pending with nothing in the air."""
        ...

    async def hold(self, key: str, seconds: float) -> None:
        """Make sure this instance still owns ``key`` for at least ``seconds`` more
        (checked locally, renewed only if short); ``OwnershipLost`` if it does not."""
        ...

    def watch(self, key: str) -> asyncio.Future[None]:
        """Start watching ``key``: taken before reading its state, so that a change in
        between is not missed by ``changed``."""
        ...

    async def changed(self, key: str, waiter: asyncio.Future[None], timeout_s: float) -> None:
        """Wait until ``key`` may have changed owner or state since ``watch`` gave
        ``waiter``, or ``timeout_s``."""
        ...

    async def take_expired(self, limit: int) -> list[str]:
        """Take over up to ``limit`` pending repayments whose owner's lease expired."""
        ...

    def let_lapse(self, key: str) -> None:
        """Stop holding ``key`` without writing (its drive ended on an error): its lease
        runs out and the sweep of whichever instance comes first resumes it."""
        ...

    def pin(self, key: str, running: Callable[[], bool]) -> None:
        """A plain-``def`` submit of ``key`` runs on a thread here while ``running()``:
        keep owning ``key`` until then (even past ``close()``)."""
        ...

    # ---- late collections, corrections, reminders (DESIGN §4, invariant 4) ----------

    async def watched(self, limit: int) -> list[str]:
        """Keys whose ending asked for a late-collection watch (``finish(watch=True)``)
        not yet turned into ``LateCheck`` rows, oldest first."""
        ...

    async def start_watching(self, key: str,
                             checks_of: Callable[[Record], Sequence[LateCheck]]) -> None:
        """Turn ``key``'s watch mark into checks, in one write: the record is read there
        (locked against a concurrent ending), ``checks_of(record)`` added (a reference
        already watched is kept as it stands) and the mark cleared.  An ending that
        comes after sets a new mark."""
        ...

    async def due_late_checks(self, now: datetime, limit: int, claim_until: datetime
                              ) -> list[LateCheck]:
        """Up to ``limit`` checks whose ``next_at`` has come, each claimed until
        ``claim_until`` (an instance that stops mid-check leaves it to the next)."""
        ...

    async def update_late_check(self, check: LateCheck, expect: LateCheck) -> bool:
        """Write ``check`` if its row still stands as ``expect`` (state, refund, checks):
        ``False`` if another instance moved it meanwhile."""
        ...

    async def late_checks(self, key: str | None = None, *, state: LateState | None = None,
                          refund: RefundState | None = None) -> list[LateCheck]:
        """Late-collection checks, by key, state or refund state (the manual-refund list:
        ``refund=RefundState.MANUAL``)."""
        ...

    async def collected_late(self, check: LateCheck) -> bool:
        """Record that ``check.reference`` collected after all (``state`` COLLECTED, with
        ``found_at``, ``found_by`` and ``channel_reference``), adding the row if it was not
        watched; ``False`` if it was known collected already."""
        ...

    async def correct(self, key: str, round: int, correction: Correction,
                      displaced: LateCheck | None = None, *, after: int = 0) -> Record:
        """Change a terminal repayment's ending as ``correction`` says, if it still
        stands at ``correction.old_*`` in ``round`` with ``after`` corrections already
        (so a correction planned on a stale read never lands); it is kept with them.
        ``displaced`` (the collection it no longer rests on) is added, in the same write,
        as a late collection to refund.  ``TerminalStateError`` if it moved meanwhile."""
        ...

    async def find_reference(self, channel: str, reference: str) -> str | None:
        """The key of the repayment that sent ``reference`` to ``channel``."""
        ...

    async def due_between(self, since: datetime | None, until: datetime | None
                          ) -> list[Record]:
        """Repayments whose ``due_at`` falls in [``since``, ``until``), by due date."""
        ...

    async def at_risk(self, now: datetime, within_s: float) -> list[Record]:
        """Repayments not collected whose ``due_at`` is after ``now`` and at most
        ``within_s`` away (without their attempts)."""
        ...

    async def remind_once(self, key: str, threshold_s: float, now: datetime) -> bool:
        """Note that ``key`` was reminded for ``threshold_s``; ``False`` if it already
        was (by any instance, before any restart)."""
        ...

    async def resolve_by_hand(self, key: str, round: int, correction: Correction) -> Record:
        """End a ``PENDING`` repayment of ``round`` as an operator's evidence says
        (``correction``: old ending PENDING, the new one, the operator's note), if no
        instance holds it now; kept with its corrections, watched like any ending.
        ``TerminalStateError`` if it is not pending; ``JournalError`` if an instance
        holds it (try again once it is waiting on its channel)."""
        ...

    async def set_override(self, override: Override) -> None:
        """Switch ``override.channel`` for every instance until ``override.until``
        (replacing any switch of it)."""
        ...

    async def clear_override(self, channel: str) -> bool:
        """End the switch of ``channel`` now; ``False`` if there was none."""
        ...

    async def overrides(self) -> list[Override]:
        """Every switch held, expired ones included (``Override.active`` says)."""
        ...

    async def report_breakers(self, instance: str, states: Mapping[str, str],
                              now: datetime) -> None:
        """Note this instance's breaker state per channel (for ``failover channels``)."""
        ...

    async def breaker_reports(self) -> list[tuple[str, str, str, datetime]]:
        """(instance, channel, state, when) as the instances last noted them."""
        ...

    async def find(self, *, status: RepaymentStatus | None = None, channel: str | None = None,
                   code: str | None = None, since: datetime | None = None,
                   until: datetime | None = None, limit: int = 100) -> list[Record]:
        """Repayments created in [``since``, ``until``), newest first, of that status,
        channel (its ending's, or the one a pending repayment waits on) and code."""
        ...

    async def purge_accounts(self, before: datetime) -> int:
        """Erase the account of every repayment that ended before ``before`` and has no
        late-collection work left (a check still due may need it for a refund); the
        rest of its record, the audit trail, stays.  Returns how many were erased."""
        ...


BatchObserver = Callable[[int, float], None]
"""Called with a committed write transaction's operations that wrote and its duration in
seconds (from the transaction's start to its commit)."""


class WriteStats:
    """What a journal's writer committed: ``batches`` (transactions that wrote),
    ``operations`` (the operations in them that wrote), and the observers told of each
    such batch (``failover.metrics`` adds one).  Reads go through the same writer but
    are neither counted nor observed: they would make the figures follow the scrapes.

    An observer runs on the writer (the SQLite journal's thread, or the PostgreSQL
    journal's task), after the batch's callers have their answers, and must be quick;
    whatever it raises, ``BaseException`` included, is logged and ignored, so it can
    never stop the writer."""

    __slots__ = ("_observers", "batches", "operations")

    def __init__(self) -> None:
        self.batches = 0
        self.operations = 0
        self._observers: tuple[BatchObserver, ...] = ()

    def add_observer(self, observer: BatchObserver) -> None:
        self._observers = (*self._observers, observer)

    def remove_observer(self, observer: BatchObserver) -> None:
        self._observers = tuple(o for o in self._observers if o is not observer)

    def committed(self, operations: int, seconds: float) -> None:
        """Count a committed transaction in which ``operations`` operations wrote (the
        writer calls it only for a transaction that wrote) and tell the observers."""
        self.batches += 1
        self.operations += operations
        for observer in self._observers:
            # BaseException too: a SystemExit or a CancelledError out of an observer
            # would end the writer, and every later journal call would wait for ever.
            # A real cancellation of the PostgreSQL writer task is not swallowed here:
            # it arrives at an await, and an observer is a plain call.
            try:
                observer(operations, seconds)
            except BaseException:
                logging.getLogger("failover.journal").exception("a batch observer failed")


class WriteCounted:
    """``batches`` and ``operations`` of a journal that keeps ``writes``."""

    writes: WriteStats

    @property
    def batches(self) -> int:
        """Transactions committed that wrote; with ``operations``, shows how well writes
        were grouped."""
        return self.writes.batches

    @property
    def operations(self) -> int:
        """Operations that wrote, in those transactions (reads are not counted)."""
        return self.writes.operations


class SingleOwner:
    """Ownership for a journal one router owns whole: every repayment is its own."""

    shared = False

    async def load(self, key: str) -> Record | None:  # pragma: no cover - overridden
        raise NotImplementedError

    async def acquire(self, key: str) -> Record | None:
        record = await self.load(key)
        if record is None:
            raise UnknownRepayment(key)
        return record

    async def release(self, key: str) -> None:
        return None

    async def hold(self, key: str, seconds: float) -> None:
        return None

    def watch(self, key: str) -> asyncio.Future[None]:  # pragma: no cover
        raise NotImplementedError("never watched: acquire() always succeeds")

    async def changed(self, key: str, waiter: asyncio.Future[None], timeout_s: float
                      ) -> None:  # pragma: no cover
        return None

    async def take_expired(self, limit: int) -> list[str]:
        return []

    def let_lapse(self, key: str) -> None:
        return None

    def pin(self, key: str, running: Callable[[], bool]) -> None:
        return None


def skips_json(skips: Sequence[Skip]) -> list[dict[str, object]]:
    return [{"channel": s.channel, "reason": s.reason, "at": s.at.isoformat(),
             "round": s.round} for s in skips]


def skips_from(data: object) -> tuple[Skip, ...]:
    if not data:
        return ()
    items = json.loads(data) if isinstance(data, str) else data
    return tuple(Skip(i["channel"], i["reason"], datetime.fromisoformat(i["at"]), i["round"])
                 for i in items)  # type: ignore[union-attr]


def correction_json(c: Correction) -> dict[str, object]:
    return {"at": c.at.isoformat(), "reason": c.reason, "old_status": c.old_status.value,
            "old_channel": c.old_channel, "old_channel_reference": c.old_channel_reference,
            "old_code": c.old_code, "new_status": c.new_status.value,
            "new_channel": c.new_channel, "new_channel_reference": c.new_channel_reference,
            "reference": c.reference, "evidence": c.evidence}


def corrections_from(data: object) -> tuple[Correction, ...]:
    if not data:
        return ()
    items = json.loads(data) if isinstance(data, str) else data
    return tuple(Correction(
        at=datetime.fromisoformat(i["at"]), reason=i["reason"],
        old_status=RepaymentStatus(i["old_status"]), old_channel=i["old_channel"],
        old_channel_reference=i["old_channel_reference"], old_code=i["old_code"],
        new_status=RepaymentStatus(i["new_status"]), new_channel=i["new_channel"],
        new_channel_reference=i["new_channel_reference"], reference=i.get("reference"),
        evidence=i.get("evidence")) for i in items)  # type: ignore[union-attr]


def late_check_row(c: LateCheck) -> tuple[object, ...]:
    """The columns of a ``late_checks`` row, in ``LATE_COLUMNS`` order (times as given)."""
    return (c.key, c.channel, c.reference, c.round, c.state.value, c.checks, c.next_at,
            c.found_at, c.found_by, c.channel_reference,
            None if c.refund is None else c.refund.value, c.refund_reference, c.refund_code,
            c.refund_at)


LATE_COLUMNS = ("key, channel, reference, round, state, checks, next_at, found_at, found_by,"
                " channel_reference, refund, refund_reference, refund_code, refund_at")


def late_check_from(row: Sequence[Any], parse: Callable[[object], datetime | None]
                    ) -> LateCheck:
    return LateCheck(
        key=str(row[0]), channel=str(row[1]), reference=str(row[2]),
        round=int(row[3]), state=LateState(row[4]), checks=int(row[5]),
        next_at=parse(row[6]), found_at=parse(row[7]),
        found_by=None if row[8] is None else str(row[8]),
        channel_reference=None if row[9] is None else str(row[9]),
        refund=None if row[10] is None else RefundState(row[10]),
        refund_reference=None if row[11] is None else str(row[11]),
        refund_code=None if row[12] is None else str(row[12]), refund_at=parse(row[13]))


_COLLECTED = Outcome.SUCCEEDED
_UNANSWERED = (None, Outcome.UNKNOWN, Outcome.NOT_FOUND)


def may_collect_late(attempt: Attempt) -> bool:
    """An attempt settled by ``NOT_FOUND`` or never answered: the channel may still
    apply it (a provider's queue, a process paused past its lease), so it is re-queried
    after the repayment ends."""
    return attempt.resolution is Outcome.NOT_FOUND or (
        attempt.resolution is None and attempt.outcome in _UNANSWERED)


def needs_watch(record: Record) -> bool:
    """Whether an ended repayment has attempts to watch for late collections: one that
    may collect late, or one proven collected that is not the ending's own collection.
    (``WATCH_SQL`` is the same rule for a journal that decides it in SQL.)"""
    for attempt in record.attempts:
        if may_collect_late(attempt):
            return True
        if _COLLECTED in (attempt.outcome, attempt.resolution) and not (
                record.status is RepaymentStatus.SUCCEEDED
                and attempt.channel == record.channel and attempt.round == record.round):
            return True
    return False


WATCH_SQL = (
    "EXISTS (SELECT 1 FROM {a} x WHERE x.key = {r}.key AND ("
    "x.resolution = 'not_found'"
    " OR (x.resolution IS NULL AND (x.outcome IS NULL OR x.outcome IN ('unknown', 'not_found')))"
    " OR (('succeeded' IN (x.outcome, x.resolution)) AND NOT ({r}.status = 'succeeded'"
    " AND x.channel IS NOT DISTINCT FROM {r}.channel AND x.round = {r}.round))))"
)
"""``needs_watch`` in SQL: ``{a}`` the attempts table, ``{r}`` the repayments row."""


def decoded(value: Any, codec: Any) -> Any:
    """``value`` (a record, or a tuple, list or dict holding records) with every
    record's account decoded by ``codec`` (see ``failover.codec``)."""
    if isinstance(value, Record):
        if value.account == PURGED:
            return value
        try:
            account = codec.decode(value.account)
        except JournalError as exc:
            raise JournalError(f"repayment {value.key!r}: {exc}") from None
        return dataclasses.replace(value, account=account)
    if isinstance(value, tuple):
        return tuple(decoded(v, codec) for v in value)
    if isinstance(value, list):
        return [decoded(v, codec) for v in value]
    if isinstance(value, dict):
        return {k: decoded(v, codec) for k, v in value.items()}
    return value


def require_account(record: Record) -> None:
    """Refuse to build a channel request from an account that cannot be sent: erased by
    ``purge``, or still encrypted (the journal was opened without its codec: set
    ``FAILOVER_ACCOUNT_KEYS``).  Nothing is sent; the repayment stays as it is."""
    if not account_usable(record.account):
        why = "was erased by purge" if record.account == PURGED else (
            "is encrypted and this journal was opened without its codec (set"
            " FAILOVER_ACCOUNT_KEYS)")
        raise unusable_account(record.key, why)


class AccountUnusable(JournalError):
    """A repayment's account cannot be sent to a channel (erased, or still encrypted):
    a refusal, not a failure of the journal."""


def unusable_account(key: str, why: str = "was erased by purge") -> AccountUnusable:
    return AccountUnusable(f"repayment {key!r}: its account {why}: no channel is called"
                           " for it")
