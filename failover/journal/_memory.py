"""An in-memory journal for tests and simulations: the same rules, no durability."""

from __future__ import annotations

import dataclasses
from datetime import datetime

from failover._errors import TerminalStateError, UnknownRepayment
from failover._models import (
    Attempt,
    ChannelResult,
    Outcome,
    PendingReason,
    Repayment,
    RepaymentStatus,
)
from failover.journal._base import JournalStats, Record, new_record


class MemoryJournal:
    """Keeps records in a dict.  It outlives a router, so tests can "crash" a
    router (drop it unclosed) and open a new one on the same journal."""

    def __init__(self) -> None:
        self._records: dict[str, Record] = {}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _get(self, key: str) -> Record:
        try:
            return self._records[key]
        except KeyError:
            raise UnknownRepayment(key) from None

    async def create(
        self, repayment: Repayment, preference: tuple[str, ...] | None, now: datetime
    ) -> tuple[Record, bool]:
        existing = self._records.get(repayment.key)
        if existing is not None:
            return existing, False
        record = new_record(repayment, preference, now)
        self._records[record.key] = record
        return record, True

    async def load(self, key: str) -> Record | None:
        return self._records.get(key)

    async def begin_attempt(
        self, key: str, round: int, channel: str, reference: str, now: datetime
    ) -> int:
        record = self._get(key)
        attempt = Attempt(channel, reference, None, None, now, None, round=round)
        self._records[key] = dataclasses.replace(
            record, attempts=(*record.attempts, attempt), updated_at=now
        )
        return len(record.attempts) + 1

    async def finish_attempt(
        self, key: str, number: int, result: ChannelResult, now: datetime
    ) -> None:
        record = self._get(key)
        attempts = list(record.attempts)
        attempts[number - 1] = dataclasses.replace(
            attempts[number - 1],
            outcome=result.outcome,
            code=result.code,
            detail=result.detail,
            channel_reference=result.channel_reference,
            finished_at=now,
        )
        self._records[key] = dataclasses.replace(record, attempts=tuple(attempts), updated_at=now)

    async def resolve_attempts(
        self, key: str, round: int, reference: str, resolution: Outcome, now: datetime,
        channel_reference: str | None = None,
    ) -> None:
        record = self._get(key)
        attempts = tuple(
            dataclasses.replace(
                a, resolution=resolution,
                channel_reference=channel_reference or a.channel_reference,
                # An attempt a crash left "sent" gets the outcome it really had: unknown.
                outcome=a.outcome or Outcome.UNKNOWN,
                code=a.code if a.outcome else "interrupted",
            )
            if a.round == round and a.reference == reference and a.in_doubt
            else a
            for a in record.attempts
        )
        self._records[key] = dataclasses.replace(record, attempts=attempts, updated_at=now)

    def _pending(self, key: str, round: int) -> Record:
        record = self._get(key)
        if record.status is not RepaymentStatus.PENDING or record.round != round:
            raise TerminalStateError(key, record.status.value)
        return record

    async def set_pending(
        self, key: str, round: int, reason: PendingReason, channel: str | None,
        code: str | None, now: datetime,
    ) -> None:
        record = self._pending(key, round)
        self._records[key] = dataclasses.replace(
            record, pending_reason=reason, pending_channel=channel, code=code, updated_at=now
        )

    async def finish(
        self, key: str, round: int, status: RepaymentStatus, channel: str | None,
        channel_reference: str | None, code: str | None, now: datetime,
    ) -> Record:
        record = self._pending(key, round)
        record = dataclasses.replace(
            record, status=status, channel=channel, channel_reference=channel_reference,
            code=code, pending_reason=None, pending_channel=None, updated_at=now,
        )
        self._records[key] = record
        return record

    async def new_round(self, key: str, now: datetime) -> Record:
        record = self._get(key)
        if record.status is not RepaymentStatus.FAILED:
            raise TerminalStateError(key, record.status.value)
        record = dataclasses.replace(
            record, status=RepaymentStatus.PENDING, round=record.round + 1, channel=None,
            channel_reference=None, code=None, pending_reason=PendingReason.IN_FLIGHT,
            pending_channel=None, updated_at=now,
        )
        self._records[key] = record
        return record

    async def pending_keys(self, reason: PendingReason | None = None) -> list[str]:
        pending = [
            r for r in self._records.values()
            if r.status is RepaymentStatus.PENDING
            and (reason is None or r.pending_reason is reason)
        ]
        pending.sort(key=lambda r: r.created_at)
        return [r.key for r in pending]

    async def stats(self) -> JournalStats:
        by_status = dict.fromkeys(RepaymentStatus, 0)
        oldest: datetime | None = None
        for record in self._records.values():
            by_status[record.status] += 1
            if record.status is RepaymentStatus.PENDING and (
                oldest is None or record.created_at < oldest
            ):
                oldest = record.created_at
        return JournalStats(by_status, oldest)
