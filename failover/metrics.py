"""Prometheus metrics: a hook for the router's events, a collector for the journal.

``pip install 'failover[metrics]'`` (prometheus-client).  Two parts, one registry::

    metrics = PrometheusHook()                       # its own CollectorRegistry
    router = Router(channels, journal, config, hooks=[metrics])
    metrics.add_channels(router.channel_names)       # breaker gauges start at 0 (closed)
    journal_metrics = JournalCollector(journal, registry=metrics.registry)

    # in the scrape handler (async):
    await journal_metrics.refresh()
    body = prometheus_client.generate_latest(metrics.registry)

``PrometheusHook`` counts what this process saw happen (attempts, failovers, breakers,
endings, late collections, refunds).  ``JournalCollector`` reports what the journal
holds now (repayments pending by reason, the manual-refund list), which on a shared
PostgreSQL journal is every instance's.  Its reads are coroutines and a scrape
(``generate_latest``, synchronous) must not wait on a database, so the collector keeps a
snapshot: ``await refresh()`` takes a new one (in an async scrape handler, or on a
timer with ``run(every_s)``) and a scrape only reads the snapshot.

Labels are low-cardinality only: channel names, outcomes, statuses, reasons.  Never a
repayment key, a reference or an account.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
except ImportError as exc:  # pragma: no cover - the metrics extra is missing
    raise ImportError("failover.metrics needs prometheus-client:"
                      " pip install 'failover[metrics]'") from exc

from failover._models import PendingReason, RefundState, RepaymentStatus
from failover.events import (
    AttemptFinished,
    AttemptResolved,
    BreakerClosed,
    BreakerHalfOpened,
    BreakerOpened,
    ChannelSkipped,
    Event,
    FailedOver,
    JournalRecovered,
    JournalUnavailable,
    LateCollectionFound,
    OwnershipLostEvent,
    RefundIssued,
    RefundNeedsManual,
    RepaymentAtRisk,
    RepaymentCorrected,
    RepaymentFailed,
    RepaymentPending,
    RepaymentSucceeded,
    RepaymentTakenOver,
    RetryBudgetExhausted,
)
from failover.journal import Journal
from failover.journal._base import WriteStats

__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "WRITE_BUCKETS", "BreakerState",
           "JournalCollector", "PrometheusHook"]

_log = logging.getLogger("failover.metrics")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds.  Channel timeouts run to tens of seconds, past the client's default 10 s."""
WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Seconds a journal transaction takes: a local SQLite fsync is about a millisecond."""
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
"""Operations per journal transaction (at most 1,024 on SQLite, 256 on PostgreSQL)."""


class BreakerState(enum.IntEnum):
    """The values of ``failover_breaker_state``."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class PrometheusHook:
    """A hook (pass it in ``hooks=``) that turns the router's events into metrics.

    Every metric lives in ``registry``: a new ``CollectorRegistry`` unless one is given,
    so two routers in one process (tests, two services) never register the same name
    twice.  Serve it with ``prometheus_client.generate_latest(hook.registry)``.
    """

    def __init__(self, registry: CollectorRegistry | None = None,
                 namespace: str = "failover", *,
                 buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.namespace = namespace

        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(name, doc, labels, namespace=namespace, registry=self.registry)

        self.attempts = counter(
            "attempts", "Channel submits answered, by channel and outcome.",
            ("channel", "outcome"))
        self.attempt_duration = Histogram(
            "attempt_duration_seconds",
            "Time a channel submit took to answer (or to time out), by channel.",
            ("channel",), namespace=namespace, registry=self.registry, buckets=buckets)
        self.resolutions = counter(
            "attempt_resolutions", "Attempts in doubt settled by a status query or a"
            " definitive resubmit, by channel and what it proved.", ("channel", "resolution"))
        self.skips = counter(
            "channel_skips", "Channels passed over for a repayment, by channel and reason"
            " (ineligible, breaker_open, retry_budget, ...).", ("channel", "reason"))
        self.failovers = counter(
            "failovers", "Moves from one channel to the next for a repayment.",
            ("from_channel", "to_channel"))
        self.retry_budget_exhausted = counter(
            "retry_budget_exhausted", "Retries the router-wide retry budget refused.",
            ("channel",))
        self.breaker_state = Gauge(
            "breaker_state", "Circuit breaker state by channel: 0 closed, 1 half-open,"
            " 2 open (as this process last saw it change).", ("channel",),
            namespace=namespace, registry=self.registry)
        self.breaker_transitions = counter(
            "breaker_transitions", "Circuit breaker changes, by channel and the state"
            " entered (open, half_open, closed).", ("channel", "state"))
        self.repayments = counter(
            "repayments", "Repayment endings, by status (succeeded, failed); a new round"
            " (retry) that ends counts again.", ("status",))
        self.awaiting_channel = counter(
            "repayments_awaiting_channel", "Times a repayment was left pending on a"
            " channel whose outcome is unknown, by channel.", ("channel",))
        self.at_risk = counter(
            "repayments_at_risk", "At-risk reminders sent (not collected before the due"
            " date's threshold), by the repayment's status.", ("status",))
        self.late_collections = counter(
            "late_collections", "Collections found after the repayment's ending said"
            " there was none, by channel and how they were found (query, callback).",
            ("channel", "found_by"))
        self.corrections = counter(
            "repayment_corrections", "Journaled corrections of a repayment's ending.",
            ("old_status", "new_status"))
        self.refunds = counter(
            "refunds", "Second collections settled: given back (result=issued) or put on"
            " the manual-refund list (result=manual), by channel.", ("channel", "result"))
        self.taken_over = counter(
            "repayments_taken_over", "Repayments this instance took over after their"
            " owner's lease expired.")
        self.ownership_lost = counter(
            "ownership_lost", "Repayments another instance took over from this one.")
        self.journal_unavailable = counter(
            "journal_unavailable", "Times the background loop could not reach the journal.")
        self.journal_down = counter(
            "journal_down_seconds", "Seconds the background loop could not reach the"
            " journal, counted when it reached it again.")

    def add_channels(self, channels: Iterable[str]) -> None:
        """Show these channels' breakers as closed until an event says otherwise (a
        router's breakers start closed); a channel already seen keeps its state."""
        for channel in channels:
            # labels() creates the child at 0 without touching a value already set.
            self.breaker_state.labels(channel)

    def __call__(self, event: Event) -> None:
        # One isinstance chain, most frequent first: every event goes through it.
        if isinstance(event, AttemptFinished):
            self.attempts.labels(event.channel, event.outcome.value).inc()
            self.attempt_duration.labels(event.channel).observe(event.duration_s)
        elif isinstance(event, RepaymentSucceeded):
            self.repayments.labels(RepaymentStatus.SUCCEEDED.value).inc()
        elif isinstance(event, RepaymentFailed):
            self.repayments.labels(RepaymentStatus.FAILED.value).inc()
        elif isinstance(event, FailedOver):
            self.failovers.labels(event.from_channel, event.to_channel).inc()
        elif isinstance(event, ChannelSkipped):
            # "maintenance: Sun 02:00-04:00 UTC" -> "maintenance": a bounded label.
            self.skips.labels(event.channel, event.reason.split(":", 1)[0]).inc()
        elif isinstance(event, AttemptResolved):
            self.resolutions.labels(event.channel, event.resolution.value).inc()
        elif isinstance(event, RepaymentPending):
            self.awaiting_channel.labels(event.channel or "").inc()
        elif isinstance(event, RetryBudgetExhausted):
            self.retry_budget_exhausted.labels(event.channel).inc()
        elif isinstance(event, BreakerOpened | BreakerHalfOpened | BreakerClosed):
            self._breaker(event)
        elif isinstance(event, LateCollectionFound):
            self.late_collections.labels(event.channel, event.found_by).inc()
        elif isinstance(event, RepaymentCorrected):
            self.corrections.labels(event.old_status, event.new_status).inc()
        elif isinstance(event, RefundIssued):
            self.refunds.labels(event.channel, "issued").inc()
        elif isinstance(event, RefundNeedsManual):
            self.refunds.labels(event.channel, "manual").inc()
        elif isinstance(event, RepaymentAtRisk):
            self.at_risk.labels(event.status).inc()
        elif isinstance(event, RepaymentTakenOver):
            self.taken_over.inc(len(event.keys))
        elif isinstance(event, OwnershipLostEvent):
            self.ownership_lost.inc()
        elif isinstance(event, JournalUnavailable):
            self.journal_unavailable.inc()
        elif isinstance(event, JournalRecovered):
            self.journal_down.inc(event.down_s)

    def _breaker(self, event: BreakerOpened | BreakerHalfOpened | BreakerClosed) -> None:
        if isinstance(event, BreakerOpened):
            state, value = "open", BreakerState.OPEN
        elif isinstance(event, BreakerHalfOpened):
            state, value = "half_open", BreakerState.HALF_OPEN
        else:
            state, value = "closed", BreakerState.CLOSED
        self.breaker_state.labels(event.channel).set(value)
        self.breaker_transitions.labels(event.channel, state).inc()


@dataclass(frozen=True, slots=True)
class _Snapshot:
    by_status: dict[RepaymentStatus, int]
    pending: dict[PendingReason, int]
    oldest_pending: float | None
    manual_refunds: int
    taken_at: float


class JournalCollector:
    """What the journal holds, for Prometheus: a collector registered in ``registry``
    (a new ``CollectorRegistry`` unless given; pass ``PrometheusHook.registry`` to serve
    both together).

    From the snapshot ``refresh()`` took (absent until the first):

    - ``failover_journal_repayments{status}``: repayments by status (``stats()``);
    - ``failover_repayments_pending{reason}``: pending repayments by reason
      (``pending_keys(reason)``: ``in_flight``, ``awaiting_channel``);
    - ``failover_oldest_pending_timestamp_seconds``: when the oldest pending repayment
      was created (absent with none pending): ``time() - it`` is its age;
    - ``failover_manual_refunds``: the manual-refund list
      (``late_checks(refund=RefundState.MANUAL)``);
    - ``failover_journal_snapshot_timestamp_seconds``: when that snapshot was taken.

    Read at each scrape, without I/O, from an SQLite or PostgreSQL journal's own counters
    (a ``MemoryJournal`` has none, and they are absent):

    - ``failover_journal_batches_total``: write transactions committed by this process;
    - ``failover_journal_operations_total``: the operations in them that wrote.
      Operations per batch over a window is ``rate(operations) / rate(batches)``;
    - ``failover_journal_operations_per_batch``: the same since the journal opened.

    Observed as each write transaction commits (the collector adds an observer to the
    journal's ``writes``), from the collector's creation on:

    - ``failover_journal_write_duration_seconds``: a histogram of how long each write
      transaction took, from its start to its commit (``WRITE_BUCKETS``); a repayment's
      write waits about this long once its batch has begun;
    - ``failover_journal_batch_operations``: a histogram of operations that wrote per
      write transaction (``BATCH_BUCKETS``).

    Reads go through the journal's writer too (``refresh()``'s own four, ``load``, the
    background loop's scans) but a transaction in which nothing wrote is neither counted
    nor observed: scrapes never move these figures.  (See ``WriteStats``.)
    """

    def __init__(self, journal: Journal, *, registry: CollectorRegistry | None = None,
                 namespace: str = "failover") -> None:
        self.journal = journal
        self.registry = registry if registry is not None else CollectorRegistry()
        self._prefix = f"{namespace}_" if namespace else ""
        self._snapshot: _Snapshot | None = None
        self.registry.register(self)
        self.write_duration: Histogram | None = None
        self.batch_operations: Histogram | None = None
        writes = getattr(journal, "writes", None)
        if isinstance(writes, WriteStats):
            duration = self.write_duration = Histogram(
                "journal_write_duration_seconds", "Time a journal write transaction took,"
                " from its start to its commit.", namespace=namespace, registry=self.registry,
                buckets=WRITE_BUCKETS)
            size = self.batch_operations = Histogram(
                "journal_batch_operations", "Operations that wrote, per committed journal"
                " write transaction.",
                namespace=namespace, registry=self.registry, buckets=BATCH_BUCKETS)

            def observe(operations: int, seconds: float) -> None:
                duration.observe(seconds)
                size.observe(operations)

            writes.add_observer(observe)

    async def refresh(self) -> None:
        """Read the journal now (four reads: ``stats()``, ``pending_keys`` for each
        reason, the manual-refund list) and keep what they say for the next scrapes.
        Raises what the journal raises (``JournalError``); the last snapshot stays."""
        stats = await self.journal.stats()
        pending = {reason: len(await self.journal.pending_keys(reason))
                   for reason in PendingReason}
        manual = await self.journal.late_checks(refund=RefundState.MANUAL)
        oldest = stats.oldest_pending.timestamp() if stats.oldest_pending else None
        self._snapshot = _Snapshot(dict(stats.by_status), pending, oldest, len(manual),
                                   time.time())

    async def run(self, every_s: float = 15.0) -> None:
        """``refresh()`` every ``every_s`` seconds until cancelled (run it as a task); a
        journal that cannot be read is logged and tried again at the next turn."""
        while True:
            try:
                await self.refresh()
            except Exception:
                _log.warning("journal metrics not refreshed", exc_info=True)
            await asyncio.sleep(every_s)

    def collect(self) -> Iterator[Metric]:
        """What a scrape sees: the last snapshot and the journal's counters, no I/O."""
        p = self._prefix
        batches = getattr(self.journal, "batches", None)
        operations = getattr(self.journal, "operations", None)
        if isinstance(batches, int) and isinstance(operations, int):
            yield CounterMetricFamily(f"{p}journal_batches", "Journal write transactions"
                                      " committed by this process.", value=batches)
            yield CounterMetricFamily(f"{p}journal_operations", "Journal operations that"
                                      " wrote, in those batches.", value=operations)
            if batches:
                yield GaugeMetricFamily(f"{p}journal_operations_per_batch", "Mean journal"
                                        " operations per batch since the journal opened.",
                                        value=operations / batches)
        snapshot = self._snapshot
        if snapshot is None:
            return
        by_status = GaugeMetricFamily(f"{p}journal_repayments", "Repayments in the"
                                      " journal, by status.", labels=("status",))
        for status, count in snapshot.by_status.items():
            by_status.add_metric((status.value,), count)
        yield by_status
        pending = GaugeMetricFamily(f"{p}repayments_pending", "Pending repayments in the"
                                    " journal, by reason.", labels=("reason",))
        for reason, count in snapshot.pending.items():
            pending.add_metric((reason.value,), count)
        yield pending
        if snapshot.oldest_pending is not None:
            yield GaugeMetricFamily(f"{p}oldest_pending_timestamp_seconds", "When the"
                                    " oldest pending repayment was created (Unix time).",
                                    value=snapshot.oldest_pending)
        yield GaugeMetricFamily(f"{p}manual_refunds", "Second collections on the"
                                " manual-refund list.", value=snapshot.manual_refunds)
        yield GaugeMetricFamily(f"{p}journal_snapshot_timestamp_seconds", "When these"
                                " journal figures were read (Unix time).",
                                value=snapshot.taken_at)
