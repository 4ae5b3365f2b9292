"""Events the router emits, and hooks that turn them into logs and metrics.

Every event is a frozen dataclass with a dotted ``name``.  A hook is any
callable taking one event; a hook that raises is logged and ignored, so a
broken metrics exporter can never stop a repayment.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, ClassVar

import structlog

from failover._models import Outcome, RepaymentStatus


@dataclass(frozen=True, slots=True)
class Event:
    """Base of all events."""

    name: ClassVar[str] = "failover.event"

    def fields(self) -> dict[str, Any]:
        """The event's fields as plain values (enums as their string values)."""
        return {k: (v.value if isinstance(v, Outcome | RepaymentStatus) else v)
                for k, v in asdict(self).items()}


@dataclass(frozen=True, slots=True)
class AttemptStarted(Event):
    name: ClassVar[str] = "failover.attempt.started"
    key: str
    channel: str
    reference: str
    attempt: int


@dataclass(frozen=True, slots=True)
class AttemptFinished(Event):
    name: ClassVar[str] = "failover.attempt.finished"
    key: str
    channel: str
    reference: str
    outcome: Outcome
    code: str | None
    duration_s: float


@dataclass(frozen=True, slots=True)
class AttemptResolved(Event):
    """A status query (or a definitive resubmit) settled an attempt that was in doubt."""

    name: ClassVar[str] = "failover.attempt.resolved"
    key: str
    channel: str
    reference: str
    resolution: Outcome


@dataclass(frozen=True, slots=True)
class ChannelSkipped(Event):
    name: ClassVar[str] = "failover.channel.skipped"
    key: str
    channel: str
    reason: str


@dataclass(frozen=True, slots=True)
class FailedOver(Event):
    """The router moved from one channel to the next for a repayment."""

    name: ClassVar[str] = "failover.failover"
    key: str
    from_channel: str
    to_channel: str
    reason: str


@dataclass(frozen=True, slots=True)
class RetryBudgetExhausted(Event):
    name: ClassVar[str] = "failover.retry_budget.exhausted"
    key: str
    channel: str


@dataclass(frozen=True, slots=True)
class BreakerOpened(Event):
    name: ClassVar[str] = "failover.breaker.opened"
    channel: str


@dataclass(frozen=True, slots=True)
class BreakerHalfOpened(Event):
    name: ClassVar[str] = "failover.breaker.half_opened"
    channel: str


@dataclass(frozen=True, slots=True)
class BreakerClosed(Event):
    name: ClassVar[str] = "failover.breaker.closed"
    channel: str


@dataclass(frozen=True, slots=True)
class RepaymentSucceeded(Event):
    name: ClassVar[str] = "failover.repayment.succeeded"
    key: str
    channel: str
    attempts: int


@dataclass(frozen=True, slots=True)
class RepaymentFailed(Event):
    name: ClassVar[str] = "failover.repayment.failed"
    key: str
    code: str
    attempts: int
    alternatives: tuple[str, ...] = ()
    """Channels the borrower could pay through by hand now: eligible, breaker not open."""


@dataclass(frozen=True, slots=True)
class RepaymentPending(Event):
    """A channel's outcome is unknown; the repayment waits for ``reconcile()``.

    A service can turn this into a borrower notice ("your payment is being confirmed").
    """

    name: ClassVar[str] = "failover.repayment.pending"
    key: str
    channel: str | None
    reason: str
    alternatives: tuple[str, ...] = ()
    """Channels the borrower could pay through by hand now: eligible, breaker not open."""


@dataclass(frozen=True, slots=True)
class RepaymentAtRisk(Event):
    """Not collected ``threshold_s`` before its due date: once per repayment per
    threshold, across restarts and instances.  A service turns it into a reminder
    ("auto-debit failed, pay with your bank card before 18:00")."""

    name: ClassVar[str] = "failover.repayment.at_risk"
    key: str
    due_at: datetime
    threshold_s: float
    status: str
    alternatives: tuple[str, ...] = ()
    """Channels the borrower could pay through by hand now: eligible, breaker not open."""


@dataclass(frozen=True, slots=True)
class LateCollectionFound(Event):
    """A channel collected under ``reference`` after the repayment's ending said it had
    not (found by a re-query or a provider's callback)."""

    name: ClassVar[str] = "failover.collection.late"
    key: str
    channel: str
    reference: str
    found_by: str


@dataclass(frozen=True, slots=True)
class RepaymentCorrected(Event):
    """A journaled correction changed a repayment's ending (``get()`` shows it): a
    ``FAILED`` repayment whose money arrived is ``SUCCEEDED``."""

    name: ClassVar[str] = "failover.repayment.corrected"
    key: str
    old_status: str
    new_status: str
    channel: str
    reference: str


@dataclass(frozen=True, slots=True)
class RefundIssued(Event):
    """A second collection was given back to the borrower."""

    name: ClassVar[str] = "failover.refund.issued"
    key: str
    channel: str
    reference: str
    refund_reference: str


@dataclass(frozen=True, slots=True)
class RefundNeedsManual(Event):
    """A second collection must be given back by hand: the channel cannot refund
    (``no_refund_capability``) or refused (its code).  ``failover status`` lists it."""

    name: ClassVar[str] = "failover.refund.manual"
    key: str
    channel: str
    reference: str
    reason: str


@dataclass(frozen=True, slots=True)
class RepaymentTakenOver(Event):
    """This instance took over repayments whose owner's lease expired (a shared journal);
    each resumes by asking the channels about its attempts in doubt first."""

    name: ClassVar[str] = "failover.repayment.taken_over"
    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class OwnershipLostEvent(Event):
    """Another instance took this repayment over: this one stopped driving it."""

    name: ClassVar[str] = "failover.repayment.ownership_lost"
    key: str


@dataclass(frozen=True, slots=True)
class JournalUnavailable(Event):
    """The background loop could not reach the journal; it retries with backoff."""

    name: ClassVar[str] = "failover.journal.unavailable"
    error: str
    retry_in_s: float


@dataclass(frozen=True, slots=True)
class JournalRecovered(Event):
    """The background loop reached the journal again after it was unavailable."""

    name: ClassVar[str] = "failover.journal.recovered"
    down_s: float


Hook = Callable[[Event], None]

_log = logging.getLogger("failover.events")


def emit(hooks: Iterable[Hook], event: Event) -> None:
    """Send ``event`` to every hook; a failing hook is logged, never propagated."""
    for hook in hooks:
        try:
            hook(event)
        except Exception:
            _log.exception("event hook %r failed on %s", hook, event.name)


class StructlogHook:
    """Logs every event through structlog, event name as the message.

    Events carry keys and references, never accounts; nothing secret reaches the log.
    """

    def __init__(self, logger: Any = None) -> None:
        self._log = logger if logger is not None else structlog.get_logger("failover")

    def __call__(self, event: Event) -> None:
        method = self._log.warning if isinstance(event, _WARNINGS) else self._log.info
        method(event.name, **event.fields())


_WARNINGS = (BreakerOpened, RepaymentPending, RetryBudgetExhausted, RepaymentFailed)


class MetricsHook:
    """Counts events in memory: ``counts[name]`` and ``outcomes[(channel, outcome)]``.

    A small, dependency-free base for exporting to Prometheus or StatsD.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.failovers: Counter[tuple[str, str]] = Counter()

    def __call__(self, event: Event) -> None:
        self.counts[event.name] += 1
        if isinstance(event, AttemptFinished):
            self.outcomes[(event.channel, event.outcome.value)] += 1
        elif isinstance(event, FailedOver):
            self.failovers[(event.from_channel, event.to_channel)] += 1


class RecordingHook:
    """Keeps every event in ``events``; for tests."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def named(self, name: str) -> list[Event]:
        return [event for event in self.events if event.name == name]


__all__ = [
    "AttemptFinished",
    "AttemptResolved",
    "AttemptStarted",
    "BreakerClosed",
    "BreakerHalfOpened",
    "BreakerOpened",
    "ChannelSkipped",
    "Event",
    "FailedOver",
    "Hook",
    "MetricsHook",
    "RecordingHook",
    "RepaymentFailed",
    "RepaymentPending",
    "RepaymentSucceeded",
    "RetryBudgetExhausted",
    "StructlogHook",
    "emit",
]
