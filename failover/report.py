"""The evidence report: which repayments were late, and whether channel faults made them so.

Pure functions over journal records (``attribute``, ``build_report``) and one coroutine
that reads a journal (``report``).  A repayment is *late* when it was collected after its
``due_at``, or is still unpaid (``PENDING`` or ``FAILED``) at ``now`` past it; lateness
runs from ``due_at`` to when it was collected, or to ``now`` while unpaid.  A repayment
corrected from ``FAILED`` to ``SUCCEEDED`` was collected when the correction found the
money.

Each fact the journal holds about a late repayment falls on one side:

- **channel**: an attempt that got no answer, or answered ``UNAVAILABLE``, ``UNKNOWN``
  or ``NOT_FOUND``, or has code ``timeout``; a skip for ``maintenance``,
  ``breaker_open``, ``retry_budget`` or ``disabled``; a repayment code ``deadline``,
  ``no_eligible_channel`` or ``timeout``; a late collection (a correction, or a
  collected late check); a decline whose code the config marks ``fault = "channel"``;
  a decline with an unmarked code made inside one of that channel's maintenance
  windows (``config.channel(name).maintenance``, as configured now).
- **borrower**: a decline (``DECLINED`` or ``REJECTED``) whose code is borrower-side:
  marked ``fault = "borrower"``, or one of ``failover.config.BORROWER_CODES`` when its
  entry gives no fault (``ChannelConfig.fault_of``).
- **unclassified**: any other decline.  It proves neither side, so it never makes a
  cause alone; beside channel or borrower facts it makes the cause ``mixed``.

Skips for ``limits`` or ``ineligible`` are the lender's rules, on neither side.  The
cause is ``mixed`` with facts on both sides (or unclassified ones beside either),
``channel`` or ``borrower`` with facts on that side only, and ``none`` when the
repayment was not late or no fault was journaled.  One exception: a late collection
whose attempt was sent before ``due_at`` means the borrower paid in time and the channel
reported it late, so the cause is ``channel`` whatever else happened.

The report holds no account number: keys, amounts, channels, references and codes only
(providers' free-text ``detail`` is left out too).
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from failover._models import (
    Attempt,
    Correction,
    LateCheck,
    LateState,
    Outcome,
    RefundState,
    RepaymentStatus,
    Skip,
)
from failover.config import ChannelConfig, MaintenanceWindow, RouterConfig
from failover.journal._base import Journal, Record

__all__ = [
    "Attribution",
    "Cause",
    "Entry",
    "Report",
    "Summary",
    "attribute",
    "build_report",
    "human_duration",
    "report",
]

CHANNEL_SKIPS = frozenset({"maintenance", "breaker_open", "retry_budget", "disabled",
                           "paused"})
"""Skip reasons that are the channel's side."""
CHANNEL_CODES = frozenset({"deadline", "no_eligible_channel", "timeout"})
"""Repayment codes that are the channel's side."""
_NO_ANSWER = frozenset({None, Outcome.UNAVAILABLE, Outcome.UNKNOWN, Outcome.NOT_FOUND})
_DECLINES = frozenset({Outcome.DECLINED, Outcome.REJECTED})


class Cause(enum.StrEnum):
    """Whose faults made a repayment late."""

    CHANNEL = "channel"
    BORROWER = "borrower"
    MIXED = "mixed"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Attribution:
    """A cause and the facts behind it, one line each, prefixed by their side
    (``channel:``, ``borrower:``, ``unclassified:``) or ``note:``."""

    cause: Cause
    reasons: tuple[str, ...]
    unclassified: tuple[str, ...] = ()
    """Decline codes no config classified, for the operator to mark (distinct, in order)."""


def _at(moment: datetime | None, spec: str = "%Y-%m-%d %H:%M:%SZ") -> str:
    """A moment for people: in UTC, whatever zone it was journaled in."""
    return "-" if moment is None else moment.astimezone(UTC).strftime(spec)


def _short(moment: datetime | None) -> str:
    return _at(moment, "%Y-%m-%d %H:%MZ")


def _ended_at(record: Record) -> datetime | None:
    """When the repayment reached its current terminal status; ``None`` while pending.

    A correction that changed the status dates it; corrections that kept it (a
    collection moved to another channel) leave the original ending, which is the
    first collection's attempt when it can be found."""
    if record.status is RepaymentStatus.PENDING:
        return None
    changes = [c for c in record.corrections if c.old_status is not c.new_status]
    if changes:
        return changes[-1].at
    if record.corrections:
        first = record.corrections[0]
        for attempt in record.attempts:
            collected = Outcome.SUCCEEDED in (attempt.outcome, attempt.resolution)
            if collected and attempt.channel == first.old_channel \
                    and attempt.finished_at is not None \
                    and attempt.channel_reference in (first.old_channel_reference, None):
                return attempt.finished_at
        return first.at
    return record.updated_at


def _lateness(record: Record, now: datetime | None) -> tuple[datetime | None, bool, int | None]:
    """(ended at, unpaid, seconds late); seconds is ``None`` without a due date, or for an
    unpaid repayment when ``now`` is not given (late by presumption)."""
    ended = _ended_at(record)
    unpaid = record.status is not RepaymentStatus.SUCCEEDED
    if record.due_at is None:
        return ended, unpaid, None
    until = now if unpaid else ended
    if until is None:
        return ended, unpaid, None
    return ended, unpaid, max(0, int((until - record.due_at).total_seconds()))


def _window(config: ChannelConfig, moment: datetime) -> MaintenanceWindow | None:
    return next((w for w in config.maintenance if w.contains(moment)), None)


def _attempt_text(a: Attempt) -> str:
    answer = a.outcome.value if a.outcome is not None else "no answer"
    if a.resolution is not None:
        answer += f", resolved {a.resolution.value}"
    code = f" (code {a.code})" if a.code else ""
    return f"{a.channel} round {a.round} at {_at(a.started_at)}: {answer}{code}"


def _correction_text(c: Correction) -> str:
    by = f" by {c.evidence}" if c.evidence else ""
    return (f"{c.new_channel or 'a channel'} collected late under {c.reference or '-'}, found"
            f" {_at(c.at)}{by}; the repayment had ended {c.old_status.value}")


def attribute(record: Record, config: RouterConfig | None = None, *,
              now: datetime | None = None, late_checks: Iterable[LateCheck] = ()
              ) -> Attribution:
    """Why ``record`` was late, from its attempts, skips, code, corrections and collected
    ``late_checks`` (see the module's rules).

    With a due date, a repayment collected by it, or unpaid but not yet due at ``now``,
    was not late: ``Cause.NONE``.  Without ``now`` an unpaid one is taken as late.
    """
    config = config or RouterConfig()
    channel: list[str] = []
    borrower: list[str] = []
    unclassified: list[str] = []
    notes: list[str] = []
    codes: dict[str, None] = {}

    for a in record.attempts:
        settings = config.channel(a.channel)
        window = _window(settings, a.started_at)
        inside = f", inside maintenance window {window.describe()}" if window else ""
        if a.outcome in _NO_ANSWER or a.code == "timeout":
            channel.append(_attempt_text(a) + inside)
        elif a.outcome in _DECLINES:
            fault = settings.fault_of(a.code)
            if fault == "borrower":
                borrower.append(_attempt_text(a))
            elif fault == "channel":
                channel.append(_attempt_text(a) + ", a channel-side code")
            elif window is not None:
                channel.append(_attempt_text(a) + inside)
            else:
                unclassified.append(_attempt_text(a))
                codes[a.code or "-"] = None
    for s in record.skips:
        line = f"{s.channel} round {s.round} skipped at {_at(s.at)}: {s.reason}"
        if s.reason in CHANNEL_SKIPS:
            window = _window(config.channel(s.channel), s.at) \
                if s.reason == "maintenance" else None
            channel.append(line + (f" ({window.describe()})" if window else ""))
        else:
            notes.append(line + " (the lender's rules, neither side)")
    for code in dict.fromkeys([record.code, *(c.old_code for c in record.corrections)]):
        if code in CHANNEL_CODES:
            channel.append(f"repayment code {code}")

    paid_in_time: str | None = None
    seen: set[str | None] = set()
    for c in record.corrections:
        if c.new_status is RepaymentStatus.SUCCEEDED and c.old_status is not c.new_status:
            channel.append("collected late: " + _correction_text(c))
            seen.add(c.reference)
            sent = _sent_at(record, c.reference)
            if record.due_at is not None and sent is not None and sent < record.due_at:
                paid_in_time = (f"the late collection under {c.reference} was sent"
                                f" {_at(sent)}, before the due date")
    for check in late_checks:
        if check.key == record.key and check.state is LateState.COLLECTED \
                and check.reference not in seen:
            seen.add(check.reference)
            channel.append(f"collected late: {check.channel} collected under {check.reference},"
                           f" found {_at(check.found_at)} by {check.found_by or '-'}")

    facts = ([f"channel: {line}" for line in channel]
             + [f"borrower: {line}" for line in borrower]
             + [f"unclassified: {line}" for line in unclassified])
    ended, unpaid, late_s = _lateness(record, now)
    verdict = _verdict(record, ended, unpaid, late_s, now)
    if verdict is not None:
        return Attribution(Cause.NONE, (f"note: {verdict}", *facts), tuple(codes))
    if record.due_at is not None and not any(a.started_at < record.due_at
                                             for a in record.attempts):
        notes.append("no attempt before the due date")
    reasons = (*facts, *(f"note: {line}" for line in notes))
    if paid_in_time is not None:
        return Attribution(Cause.CHANNEL, (f"note: {paid_in_time}", *reasons), tuple(codes))
    if (channel and borrower) or (unclassified and (channel or borrower)):
        cause = Cause.MIXED
    elif channel:
        cause = Cause.CHANNEL
    elif borrower:
        cause = Cause.BORROWER
    else:
        cause = Cause.NONE
        if not facts:
            reasons = ("note: no fault journaled", *reasons)
    return Attribution(cause, reasons, tuple(codes))


def _sent_at(record: Record, reference: str | None) -> datetime | None:
    times = [a.started_at for a in record.attempts if a.reference == reference]
    return min(times) if times else None


def _verdict(record: Record, ended: datetime | None, unpaid: bool, late_s: int | None,
             now: datetime | None) -> str | None:
    """Why a repayment with a due date was not late, or ``None`` if it was."""
    if late_s is None or late_s > 0:
        return None
    if unpaid:
        return f"unpaid but not yet due at {_at(now)}"
    return f"collected {_at(ended)}, by the due date {_at(record.due_at)}"


def human_duration(seconds: int) -> str:
    """``"2h 15m"``, ``"1d 3h"``, ``"45s"``: days, hours and minutes, or seconds under a
    minute."""
    if seconds < 60:
        return f"{max(seconds, 0)}s"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n]
    return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Entry:
    """One repayment with a due date, as the report shows it."""

    key: str
    status: RepaymentStatus
    amount: Decimal
    currency: str
    due_at: datetime
    ended_at: datetime | None
    """When it reached its current terminal status (``None`` while pending)."""
    unpaid: bool
    late_s: int
    """Seconds from ``due_at`` to the collection, or to ``now`` while unpaid; 0 if on time."""
    cause: Cause
    reasons: tuple[str, ...]
    unclassified: tuple[str, ...]
    first_attempt: Attempt | None
    """The earliest attempt started before ``due_at``."""
    attempts: tuple[Attempt, ...]
    skips: tuple[Skip, ...]
    late_collections: tuple[LateCheck, ...]
    """Collections found late for it, with their refund state."""

    @property
    def late(self) -> bool:
        return self.late_s > 0

    @property
    def late_text(self) -> str:
        return human_duration(self.late_s)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "status": self.status.value, "amount": str(self.amount),
            "currency": self.currency, "due_at": _iso(self.due_at),
            "ended_at": _iso(self.ended_at), "unpaid": self.unpaid, "late_s": self.late_s,
            "late": self.late_text, "cause": self.cause.value, "reasons": list(self.reasons),
            "unclassified_codes": list(self.unclassified),
            "first_attempt_before_due": None if self.first_attempt is None
            else _attempt_dict(self.first_attempt),
            "attempts": [_attempt_dict(a) for a in self.attempts],
            "skips": [{"channel": s.channel, "round": s.round, "at": _iso(s.at),
                       "reason": s.reason} for s in self.skips],
            "late_collections": [{
                "channel": c.channel, "reference": c.reference, "round": c.round,
                "found_at": _iso(c.found_at), "found_by": c.found_by,
                "channel_reference": c.channel_reference,
                "refund": None if c.refund is None else c.refund.value,
            } for c in self.late_collections],
        }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _attempt_dict(a: Attempt) -> dict[str, Any]:
    return {"channel": a.channel, "round": a.round, "reference": a.reference,
            "started_at": _iso(a.started_at), "finished_at": _iso(a.finished_at),
            "outcome": None if a.outcome is None else a.outcome.value,
            "resolution": None if a.resolution is None else a.resolution.value,
            "code": a.code, "channel_reference": a.channel_reference}


@dataclass(frozen=True, slots=True)
class Summary:
    """Counts over a report: all repayments, and the late ones by cause."""

    repayments: int
    on_time: int
    late: int
    unpaid: int
    """Late ones still unpaid."""
    channel: int
    borrower: int
    mixed: int
    none: int

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class Report:
    """Repayments due in [``since``, ``until``), as of ``now``, by due date then key."""

    now: datetime
    since: datetime | None
    until: datetime | None
    late_only: bool
    entries: tuple[Entry, ...]
    manual: tuple[LateCheck, ...] = ()
    """The manual-refund list: second collections a person must give back (the channel
    cannot refund, or refused), whatever their due dates."""

    def summary(self) -> Summary:
        late = [e for e in self.entries if e.late]
        by_cause = {cause: sum(e.cause is cause for e in late) for cause in Cause}
        return Summary(
            repayments=len(self.entries), on_time=len(self.entries) - len(late),
            late=len(late), unpaid=sum(e.unpaid for e in late),
            channel=by_cause[Cause.CHANNEL], borrower=by_cause[Cause.BORROWER],
            mixed=by_cause[Cause.MIXED], none=by_cause[Cause.NONE],
        )

    def to_dict(self) -> dict[str, Any]:
        return {"now": _iso(self.now), "since": _iso(self.since), "until": _iso(self.until),
                "late_only": self.late_only, "summary": self.summary().to_dict(),
                "repayments": [e.to_dict() for e in self.entries],
                "manual_refunds": [_manual_dict(c) for c in self.manual]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_csv(self) -> str:
        """One row per repayment; attempts, skips and reasons joined by ``"; "``."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for e in self.entries:
            first = e.first_attempt
            writer.writerow([
                e.key, e.status.value, e.amount, e.currency, _iso(e.due_at),
                _iso(e.ended_at) or "", e.unpaid, e.late_s, e.late_text, e.cause.value,
                first.channel if first else "", _iso(first.started_at) if first else "",
                (first.outcome.value if first.outcome else "no answer") if first else "",
                (first.code or "") if first else "",
                "; ".join(_attempt_text(a) for a in e.attempts),
                "; ".join(f"{s.channel} round {s.round} at {_at(s.at)}: {s.reason}"
                          for s in e.skips),
                "; ".join(e.reasons),
            ])
        return out.getvalue()

    def to_table(self) -> str:
        """Plain text: a line per repayment, then the facts behind each late one."""
        s = self.summary()
        head = (f"due {_short(self.since) if self.since else 'any time'}"
                f" to {_short(self.until) if self.until else 'any time'},"
                f" as of {_short(self.now)}\n"
                f"{s.repayments} repayments: {s.on_time} on time, {s.late} late"
                f" ({s.unpaid} unpaid); late by cause: channel {s.channel},"
                f" borrower {s.borrower}, mixed {s.mixed}, none {s.none}")
        if not self.entries:
            return head + self._manual_table()
        rows = []
        for e in self.entries:
            first = e.first_attempt
            rows.append([
                e.key, e.status.value, f"{e.amount} {e.currency}", _short(e.due_at),
                _short(e.ended_at),
                e.late_text if e.late else "on time", e.cause.value,
                f"{first.channel} {_short(first.started_at)}"
                f" {first.outcome.value if first.outcome else 'no answer'}"
                + (f" ({first.code})" if first.code else "") if first else "none",
            ])
        lines = [head, "", _table(["key", "status", "amount", "due", "ended", "late", "cause",
                                   "first attempt before due"], rows)]
        for e in self.entries:
            if e.late:
                lines += ["", f"{e.key} ({e.cause.value}, {e.late_text} late):"]
                lines += [f"  {reason}" for reason in e.reasons]
        return "\n".join(lines) + self._manual_table()

    def _manual_table(self) -> str:
        if not self.manual:
            return ""
        rows = [[c.key, c.channel, c.reference, c.refund_code or "", _short(c.refund_at)]
                for c in self.manual]
        return (f"\n\nmanual refunds ({len(self.manual)}): give these back by hand\n"
                + _table(["key", "channel", "reference", "reason", "since"], rows))


def _manual_dict(c: LateCheck) -> dict[str, Any]:
    return {"key": c.key, "channel": c.channel, "reference": c.reference, "round": c.round,
            "channel_reference": c.channel_reference, "reason": c.refund_code,
            "found_at": _iso(c.found_at), "since": _iso(c.refund_at)}


CSV_COLUMNS = ("key", "status", "amount", "currency", "due_at", "ended_at", "unpaid", "late_s",
               "late", "cause", "first_attempt_channel", "first_attempt_at",
               "first_attempt_outcome", "first_attempt_code", "attempts", "skips", "reasons")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    cells = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _aware(name: str, moment: datetime | None) -> None:
    if moment is not None and moment.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")


def build_report(records: Iterable[Record], config: RouterConfig | None = None, *,
                 now: datetime, since: datetime | None = None, until: datetime | None = None,
                 late_only: bool = False, late_checks: Iterable[LateCheck] | None = None
                 ) -> Report:
    """The report over ``records`` due in [``since``, ``until``) (``None``: unbounded);
    ``late_only`` keeps the late ones.  Records without a due date are left out.
    ``late_checks`` (any keys) add late collections as evidence."""
    for name, moment in (("now", now), ("since", since), ("until", until)):
        _aware(name, moment)
    if since is not None and until is not None and until <= since:
        raise ValueError(f"until {until.isoformat()} is not after since {since.isoformat()}")
    config = config or RouterConfig()
    late_checks = tuple(late_checks or ())
    checks: dict[str, list[LateCheck]] = {}
    for check in late_checks:
        if check.state is LateState.COLLECTED:
            checks.setdefault(check.key, []).append(check)
    entries = []
    for record in records:
        due = record.due_at
        if due is None or (since is not None and due < since) \
                or (until is not None and due >= until):
            continue
        ended, unpaid, late_s = _lateness(record, now)
        if late_only and not late_s:
            continue
        mine = tuple(checks.get(record.key, ()))
        why = attribute(record, config, now=now, late_checks=mine)
        before = [a for a in record.attempts if a.started_at < due]
        entries.append(Entry(
            key=record.key, status=record.status, amount=record.amount,
            currency=record.currency, due_at=due, ended_at=ended, unpaid=unpaid,
            late_s=late_s or 0, cause=why.cause, reasons=why.reasons,
            unclassified=why.unclassified,
            first_attempt=min(before, key=lambda a: a.started_at) if before else None,
            attempts=record.attempts, skips=record.skips, late_collections=mine,
        ))
    entries.sort(key=lambda e: (e.due_at, e.key))
    manual = tuple(c for c in late_checks if c.refund is RefundState.MANUAL)
    return Report(now=now, since=since, until=until, late_only=late_only,
                  entries=tuple(entries), manual=manual)


async def report(journal: Journal, config: RouterConfig | None = None, *,
                 now: datetime | None = None, since: datetime | None = None,
                 until: datetime | None = None, late_only: bool = False) -> Report:
    """The evidence report over an open ``journal``: its repayments due in [``since``,
    ``until``), as of ``now`` (default: the current time)."""
    now = datetime.now(UTC) if now is None else now
    _aware("now", now)
    records = await journal.due_between(since, until)
    checks = await journal.late_checks(state=LateState.COLLECTED)
    return build_report(records, config, now=now, since=since, until=until,
                        late_only=late_only, late_checks=checks)
