"""An in-memory journal for tests and simulations: the same rules, no durability."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from failover._errors import TerminalStateError, UnknownRepayment
from failover._models import (
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
from failover.codec import PURGED
from failover.journal._base import (
    Failover,
    JournalStats,
    Record,
    Resolution,
    SingleOwner,
    failovers_in,
    needs_watch,
    new_record,
    unusable_account,
)


@dataclass(slots=True)
class _Row:
    # Mutable inside the journal; callers only ever see frozen Records.
    record: Record
    status: RepaymentStatus
    round: int
    updated_at: datetime
    attempts: list[Attempt] = field(default_factory=list)
    ending: dict[str, object] = field(default_factory=dict)
    snapshot: Record | None = None
    skips: tuple[Skip, ...] = ()
    corrections: tuple[Correction, ...] = ()
    watch: datetime | None = None

    def freeze(self) -> Record:
        if self.snapshot is None:
            # Built field by field: dataclasses.replace() is the slow part of this journal.
            base, ending = self.record, self.ending
            self.snapshot = Record(
                base.key, base.account, base.amount, base.currency, base.due_at, base.metadata,
                base.preference, self.status, self.round, base.created_at, self.updated_at,
                ending.get("channel"), ending.get("channel_reference"),  # type: ignore[arg-type]
                ending.get("code"),  # type: ignore[arg-type]
                ending.get("pending_reason", base.pending_reason),  # type: ignore[arg-type]
                ending.get("pending_channel"), tuple(self.attempts),  # type: ignore[arg-type]
                self.skips, self.corrections,
            )
        return self.snapshot

    def touch(self, now: datetime) -> None:
        self.updated_at = now
        self.snapshot = None


class MemoryJournal(SingleOwner):
    """Keeps records in a dict.  It outlives a router, so tests can "crash" a
    router (drop it unclosed) and open a new one on the same journal."""

    def __init__(self) -> None:
        self._rows: dict[str, _Row] = {}
        self._late: dict[tuple[str, str], LateCheck] = {}
        self._reminded: set[tuple[str, float]] = set()
        self._overrides: dict[str, Override] = {}
        self._breakers: dict[tuple[str, str], tuple[str, datetime]] = {}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _get(self, key: str) -> _Row:
        try:
            return self._rows[key]
        except KeyError:
            raise UnknownRepayment(key) from None

    async def create(
        self, repayment: Repayment, preference: tuple[str, ...] | None, now: datetime,
        first_attempt: tuple[str, str] | None = None,
    ) -> tuple[Record, bool]:
        existing = self._rows.get(repayment.key)
        if existing is not None:
            return existing.freeze(), False
        record = new_record(repayment, preference, now)
        row = _Row(record, record.status, record.round, now, snapshot=record)
        if first_attempt is not None:
            row.attempts.append(Attempt(*first_attempt, None, None, now, None, round=1))
            row.snapshot = None
        self._rows[record.key] = row
        return row.freeze(), True

    async def load(self, key: str) -> Record | None:
        row = self._rows.get(key)
        return None if row is None else row.freeze()

    async def load_many(self, keys: Sequence[str]) -> dict[str, Record]:
        return {key: row.freeze() for key in keys if (row := self._rows.get(key)) is not None}

    async def begin_attempt(
        self, key: str, round: int, channel: str, reference: str, now: datetime
    ) -> int:
        row = self._pending(key, round)  # never an attempt for a finished repayment
        row.attempts.append(Attempt(channel, reference, None, None, now, None, round=round))
        row.touch(now)
        return len(row.attempts)

    async def finish_attempt(
        self, key: str, number: int, result: ChannelResult, now: datetime
    ) -> None:
        row = self._get(key)
        sent = row.attempts[number - 1]
        row.attempts[number - 1] = Attempt(
            sent.channel, sent.reference, result.outcome, result.code, sent.started_at, now,
            result.detail, sent.resolution, sent.round, result.channel_reference,
        )
        row.touch(now)

    async def resolve_attempts(
        self, key: str, round: int, reference: str, resolution: Outcome, now: datetime,
        channel_reference: str | None = None,
    ) -> None:
        row = self._get(key)
        row.attempts = [
            dataclasses.replace(
                a, resolution=resolution,
                channel_reference=channel_reference or a.channel_reference,
                # An attempt a crash left "sent" gets the outcome it really had: unknown.
                outcome=a.outcome or Outcome.UNKNOWN,
                code=a.code if a.outcome else "interrupted",
            )
            if a.round == round and a.reference == reference and a.in_doubt
            else a
            for a in row.attempts
        ]
        row.touch(now)

    def _pending(self, key: str, round: int) -> _Row:
        row = self._get(key)
        if row.status is not RepaymentStatus.PENDING or row.round != round:
            raise TerminalStateError(key, row.status.value)
        return row

    async def set_pending(
        self, key: str, round: int, reason: PendingReason, channel: str | None,
        code: str | None, now: datetime,
    ) -> None:
        row = self._pending(key, round)
        row.ending = {"pending_reason": reason, "pending_channel": channel, "code": code}
        row.touch(now)

    async def finish(
        self, key: str, round: int, status: RepaymentStatus, channel: str | None,
        channel_reference: str | None, code: str | None, now: datetime,
        *, attempt: tuple[int, ChannelResult] | None = None,
        resolution: Resolution | None = None, skips: Sequence[Skip] = (),
    ) -> Record:
        if attempt is not None:
            await self.finish_attempt(key, attempt[0], attempt[1], now)
        if resolution is not None:
            await self.resolve_attempts(key, round, resolution.reference, resolution.outcome,
                                        now, resolution.channel_reference)
        row = self._pending(key, round)
        row.status = status
        row.ending = {"channel": channel, "channel_reference": channel_reference, "code": code,
                      "pending_reason": None, "pending_channel": None}
        row.skips += tuple(skips)
        row.touch(now)
        record = row.freeze()
        if needs_watch(record):
            row.watch = now
        return record

    async def new_round(self, key: str, now: datetime) -> Record:
        row = self._get(key)
        if row.status is not RepaymentStatus.FAILED:
            raise TerminalStateError(key, row.status.value)
        if row.record.account == PURGED:  # a round that could call no channel would stay pending
            raise unusable_account(key)
        row.status = RepaymentStatus.PENDING
        row.round += 1
        row.ending = {"pending_reason": PendingReason.IN_FLIGHT}
        row.touch(now)
        return row.freeze()

    async def pending_keys(self, reason: PendingReason | None = None) -> list[str]:
        pending = [
            row.freeze() for row in self._rows.values()
            if row.status is RepaymentStatus.PENDING
        ]
        pending = [r for r in pending if reason is None or r.pending_reason is reason]
        pending.sort(key=lambda r: r.created_at)
        return [r.key for r in pending]

    async def stats(self) -> JournalStats:
        by_status = dict.fromkeys(RepaymentStatus, 0)
        oldest: datetime | None = None
        for row in self._rows.values():
            by_status[row.status] += 1
            created = row.record.created_at
            if row.status is RepaymentStatus.PENDING and (oldest is None or created < oldest):
                oldest = created
        return JournalStats(by_status, oldest)

    async def recent_failovers(self, limit: int = 10) -> list[Failover]:
        moves = [move for row in self._rows.values() for move in failovers_in(row.freeze())]
        moves.sort(key=lambda move: move.at, reverse=True)
        return moves[:limit]

    # ---- late collections, corrections, reminders -----------------------------------

    async def watched(self, limit: int) -> list[str]:
        rows = sorted((row.watch, key) for key, row in self._rows.items()
                      if row.watch is not None)
        return [key for _, key in rows[:limit]]

    async def start_watching(self, key: str,
                             checks_of: Callable[[Record], Sequence[LateCheck]]) -> None:
        row = self._get(key)
        for check in checks_of(row.freeze()):
            self._late.setdefault((check.key, check.reference), check)
        row.watch = None

    async def due_late_checks(self, now: datetime, limit: int, claim_until: datetime
                              ) -> list[LateCheck]:
        due = sorted((c for c in self._late.values()
                      if c.next_at is not None and c.next_at <= now),
                     key=lambda c: (c.next_at, c.key, c.reference))[:limit]
        for check in due:
            self._late[(check.key, check.reference)] = dataclasses.replace(
                check, next_at=claim_until)
        return due

    async def update_late_check(self, check: LateCheck, expect: LateCheck) -> bool:
        current = self._late.get((check.key, check.reference))
        if current is None or (current.state, current.refund, current.checks) != (
                expect.state, expect.refund, expect.checks):
            return False
        self._late[(check.key, check.reference)] = check
        return True

    async def late_checks(self, key: str | None = None, *, state: LateState | None = None,
                          refund: RefundState | None = None) -> list[LateCheck]:
        return sorted((c for c in self._late.values()
                       if (key is None or c.key == key) and (state is None or c.state is state)
                       and (refund is None or c.refund is refund)),
                      key=lambda c: (c.key, c.round, c.reference))

    async def collected_late(self, check: LateCheck) -> bool:
        self._get(check.key)
        current = self._late.get((check.key, check.reference))
        if current is not None and current.state is LateState.COLLECTED:
            return False
        self._late[(check.key, check.reference)] = check
        return True

    async def correct(self, key: str, round: int, correction: Correction,
                      displaced: LateCheck | None = None, *, after: int = 0) -> Record:
        row = self._get(key)
        ending = row.ending
        if (row.status, row.round, ending.get("channel"), ending.get("channel_reference"),
                len(row.corrections)) \
                != (correction.old_status, round, correction.old_channel,
                    correction.old_channel_reference, after):
            raise TerminalStateError(key, row.status.value)
        row.status = correction.new_status
        row.ending = {"channel": correction.new_channel,
                      "channel_reference": correction.new_channel_reference,
                      "code": None, "pending_reason": None, "pending_channel": None}
        row.corrections += (correction,)
        if displaced is not None:
            self._late.setdefault((displaced.key, displaced.reference), displaced)
        row.touch(correction.at)
        return row.freeze()

    async def find_reference(self, channel: str, reference: str) -> str | None:
        for key, row in self._rows.items():
            if any(a.reference == reference and a.channel == channel for a in row.attempts):
                return key
        return None

    async def due_between(self, since: datetime | None, until: datetime | None
                          ) -> list[Record]:
        found = [row.freeze() for row in self._rows.values()
                 if (due := row.record.due_at) is not None
                 and (since is None or due >= since) and (until is None or due < until)]
        return sorted(found, key=lambda r: (r.due_at, r.key))

    async def at_risk(self, now: datetime, within_s: float) -> list[Record]:
        end = now + timedelta(seconds=within_s)
        found = [row.freeze() for row in self._rows.values()
                 if row.status is not RepaymentStatus.SUCCEEDED
                 and (due := row.record.due_at) is not None and now < due <= end]
        return sorted(found, key=lambda r: (r.due_at, r.key))

    async def remind_once(self, key: str, threshold_s: float, now: datetime) -> bool:
        if (key, threshold_s) in self._reminded:
            return False
        self._reminded.add((key, threshold_s))
        return True

    async def purge_accounts(self, before: datetime) -> int:
        busy = {c.key for c in self._late.values()
                if c.next_at is not None or c.refund is RefundState.MANUAL}
        erased = 0
        for key, row in self._rows.items():
            if row.status is not RepaymentStatus.PENDING and row.updated_at < before \
                    and key not in busy and row.watch is None and row.record.account != PURGED:
                row.record = dataclasses.replace(row.record, account=PURGED)
                row.snapshot = None
                erased += 1
        return erased

    async def find(self, *, status: RepaymentStatus | None = None, channel: str | None = None,
                   code: str | None = None, since: datetime | None = None,
                   until: datetime | None = None, limit: int = 100) -> list[Record]:
        found = [r for r in (row.freeze() for row in self._rows.values())
                 if (status is None or r.status is status)
                 and (channel is None or channel in (r.channel, r.pending_channel))
                 and (code is None or r.code == code)
                 and (since is None or r.created_at >= since)
                 and (until is None or r.created_at < until)]
        found.sort(key=lambda r: (r.created_at, r.key), reverse=True)
        return found[:limit]

    async def resolve_by_hand(self, key: str, round: int, correction: Correction) -> Record:
        row = self._pending(key, round)
        row.status = correction.new_status
        row.ending = {"channel": correction.new_channel,
                      "channel_reference": correction.new_channel_reference,
                      "code": None if correction.new_status is RepaymentStatus.SUCCEEDED
                      else "resolved_by_operator",
                      "pending_reason": None, "pending_channel": None}
        row.corrections += (correction,)
        row.touch(correction.at)
        record = row.freeze()
        if needs_watch(record):
            row.watch = correction.at
        return record

    async def set_override(self, override: Override) -> None:
        self._overrides[override.channel] = override

    async def clear_override(self, channel: str) -> bool:
        return self._overrides.pop(channel, None) is not None

    async def overrides(self) -> list[Override]:
        return sorted(self._overrides.values(), key=lambda o: o.channel)

    async def report_breakers(self, instance: str, states: Mapping[str, str],
                              now: datetime) -> None:
        for channel, state in states.items():
            self._breakers[(instance, channel)] = (state, now)

    async def breaker_reports(self) -> list[tuple[str, str, str, datetime]]:
        return sorted((i, c, s, at) for (i, c), (s, at) in self._breakers.items())
