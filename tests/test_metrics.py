"""failover.metrics: the Prometheus hook and journal collector, checked against known
traffic by parsing the text format a scrape gets."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import failover
from failover import ChannelResult, RepaymentStatus
from failover.events import BreakerClosed, BreakerHalfOpened, BreakerOpened
from failover.journal._base import WriteStats
from failover.metrics import BreakerState, JournalCollector, PrometheusHook
from failover.testing import Collected, FakeClock, MemoryLedger, ScriptedChannel

from .conftest import repayment

CARD_S = 0.2
WALLET_S = 0.7
"""How long each channel takes to answer a submit, on the fake clock."""


class Slow(ScriptedChannel):
    """A scripted channel whose submits take ``latency_s`` on the fake clock."""

    def __init__(self, name: str, submits: Any = (), *, clock: FakeClock, latency_s: float,
                 **kw: Any) -> None:
        super().__init__(name, submits, **kw)
        self.clock = clock
        self.latency_s = latency_s

    async def submit(self, request: failover.ChannelRequest) -> ChannelResult:
        await self.clock.sleep(self.latency_s)
        return await super().submit(request)


def scrape(registry: CollectorRegistry) -> dict[str, dict[tuple[str, ...], float]]:
    """The text format parsed back: sample name -> {label values, by label name: value}
    (without the ``_created`` timestamps)."""
    parsed: dict[str, dict[tuple[str, ...], float]] = {}
    text = generate_latest(registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                labels = tuple(value for _, value in sorted(sample.labels.items()))
                parsed.setdefault(sample.name, {})[labels] = sample.value
    return parsed


def config(**extra: Any) -> failover.RouterConfig:
    """card then wallet; NOT_FOUND trusted at once; card may retry (the budget refuses
    every retry) and its breaker opens on its second failure; late checks right after
    the ending."""
    return failover.RouterConfig.model_validate({
        "channels": {
            "card": {"priority": 1, "settle_s": 0, "breaker": {"fail_max": 2},
                     "retry": {"max_attempts": 2, "initial_backoff_s": 0}},
            "wallet": {"priority": 2, "settle_s": 0, "retry": {"max_attempts": 1}},
        },
        "retry_budget": {"ratio": 0, "min_per_s": 0},
        "late": {"checks_s": [0, 3600]},
        **extra,
    })


async def known_traffic(make_router: Any, clock: FakeClock, hook: PrometheusHook
                        ) -> failover.Router:
    """Four repayments and a sweep:

    - ``loan-paid``: card succeeds;
    - ``loan-declined``: card declines, wallet declines: failed;
    - ``loan-late``: card collects but answers a timeout and its query says NOT_FOUND (card's
      first breaker failure), wallet collects; the sweep finds card's collection and
      refunds it;
    - ``loan-down``: card is UNAVAILABLE (its breaker opens), the retry budget refuses the
      retry, wallet collects.
    """
    ledger = MemoryLedger()
    card = Slow("card", [ChannelResult.succeeded(), ChannelResult.declined("insufficient_funds"),
                         Collected(ChannelResult.unknown("timeout")),
                         ChannelResult.unavailable("down")],
                queries=[ChannelResult.not_found()], ledger=ledger, clock=clock,
                latency_s=CARD_S)
    wallet = Slow("wallet", [ChannelResult.declined("insufficient_funds")], ledger=ledger,
                  clock=clock, latency_s=WALLET_S)
    router = await make_router([card, wallet], config(), hooks=[hook])
    hook.add_channels(router.channel_names)
    for key in ("paid", "declined", "late", "down"):
        await router.repay(repayment(f"loan-{key}"))
    await router.sweep()
    assert (4, 1) == (len(ledger.collections()), len(ledger.refunds()))  # as told above
    return router


async def test_attempts_by_channel_and_outcome(make_router, clock):
    """Every submit's answer is counted once under its channel and outcome."""
    hook = PrometheusHook()
    await known_traffic(make_router, clock, hook)

    assert {
        ("card", "succeeded"): 1, ("card", "declined"): 1, ("card", "unknown"): 1,
        ("card", "unavailable"): 1, ("wallet", "declined"): 1, ("wallet", "succeeded"): 2,
    } == scrape(hook.registry)["failover_attempts_total"]


async def test_attempt_latency_histogram_by_channel(make_router, clock):
    """Each submit's duration, on the router's clock, lands in its channel's histogram."""
    hook = PrometheusHook()
    await known_traffic(make_router, clock, hook)

    metrics = scrape(hook.registry)
    buckets = metrics["failover_attempt_duration_seconds_bucket"]
    assert {("card",): 4, ("wallet",): 3} == metrics["failover_attempt_duration_seconds_count"]
    assert (0, 4, 4) == tuple(buckets[("card", le)] for le in ("0.1", "0.25", "+Inf"))
    assert (0, 3, 3) == tuple(buckets[("wallet", le)] for le in ("0.5", "1.0", "+Inf"))
    sums = metrics["failover_attempt_duration_seconds_sum"]
    assert pytest.approx(4 * CARD_S) == sums[("card",)]
    assert pytest.approx(3 * WALLET_S) == sums[("wallet",)]


async def test_failovers_retry_budget_and_breakers(make_router, clock):
    """Failovers count per (from, to); the budget's refusal and the breaker that opened
    show under their channel; the other breaker reads closed."""
    hook = PrometheusHook()
    await known_traffic(make_router, clock, hook)

    metrics = scrape(hook.registry)
    assert {("card", "wallet"): 3} == metrics["failover_failovers_total"]
    assert {("card",): 1} == metrics["failover_retry_budget_exhausted_total"]
    assert {("card",): BreakerState.OPEN, ("wallet",): BreakerState.CLOSED} \
        == metrics["failover_breaker_state"]
    assert {("card", "open"): 1} == metrics["failover_breaker_transitions_total"]
    assert {("card", "not_found"): 1} == metrics["failover_attempt_resolutions_total"]


async def test_endings_late_collections_and_refunds(make_router, clock):
    """Endings count by status; the late collection and its refund by channel."""
    hook = PrometheusHook()
    await known_traffic(make_router, clock, hook)

    metrics = scrape(hook.registry)
    assert {("succeeded",): 3, ("failed",): 1} == metrics["failover_repayments_total"]
    assert {("card", "query"): 1} == metrics["failover_late_collections_total"]
    assert {("card", "issued"): 1} == metrics["failover_refunds_total"]
    assert "failover_repayment_corrections_total" not in metrics  # wallet's ending stands


async def test_journal_collector_reads_what_the_journal_holds(make_router, clock, journal):
    """After refresh(): repayments by status, none pending, an empty manual list."""
    hook = PrometheusHook()
    collector = JournalCollector(journal, registry=hook.registry)
    await known_traffic(make_router, clock, hook)

    await collector.refresh()

    metrics = scrape(hook.registry)
    assert {("pending",): 0, ("succeeded",): 3, ("failed",): 1} \
        == metrics["failover_journal_repayments"]
    assert {("in_flight",): 0, ("awaiting_channel",): 0} == metrics["failover_repayments_pending"]
    assert {(): 0} == metrics["failover_manual_refunds"]
    assert "failover_oldest_pending_timestamp_seconds" not in metrics


async def test_no_key_reference_or_account_in_any_label(make_router, clock):
    """Labels are channels, outcomes, statuses and reasons: never keys, references or
    accounts."""
    hook = PrometheusHook()
    router = await known_traffic(make_router, clock, hook)
    late = await router.get("loan-late")
    assert late is not None

    text = generate_latest(hook.registry).decode()

    assert [] == [secret for secret in ("loan-", "borrower-9", "6222021234567890",
                                        *(a.reference for a in late.attempts))
                  if secret in text]


async def test_pending_manual_refunds_and_reminders(make_router, clock, journal):
    """A repayment left pending on bank counts as awaiting_channel and at risk, and the
    journal gauges show it pending; a late collection card cannot give back counts as a
    manual refund and the manual-list gauge reads 1."""
    ledger = MemoryLedger()
    card = ScriptedChannel("card", [Collected(ChannelResult.unknown("timeout"))],
                           queries=[ChannelResult.not_found()], refunds=False, ledger=ledger)
    bank = ScriptedChannel("bank", [ChannelResult.unknown("timeout")],
                           queries=[ChannelResult.unknown("query_timeout")] * 20)
    hook = PrometheusHook()
    collector = JournalCollector(journal, registry=hook.registry)
    router = await make_router(
        [card, ScriptedChannel("wallet", ledger=ledger), bank],
        config(channels={name: {"priority": p, "settle_s": 0, "retry": {"max_attempts": 1}}
                         for p, name in enumerate(("card", "wallet", "bank"), 1)},
               reminders={"at_risk_s": [7200]}),
        hooks=[hook])

    waiting = await router.repay(repayment("loan-waiting", due_at=clock.now() + timedelta(hours=1)),
                                 channels=["bank"])
    assert RepaymentStatus.PENDING == waiting.status
    await router.repay(repayment("loan-twice"))
    await router.sweep()
    await collector.refresh()

    metrics = scrape(hook.registry)
    assert {("bank",): 1} == metrics["failover_repayments_awaiting_channel_total"]
    assert {("pending",): 1} == metrics["failover_repayments_at_risk_total"]
    assert {("card", "manual"): 1} == metrics["failover_refunds_total"]
    assert {(): 1} == metrics["failover_manual_refunds"]
    assert {("in_flight",): 0, ("awaiting_channel",): 1} == metrics["failover_repayments_pending"]
    assert waiting.created_at is not None
    assert {(): waiting.created_at.timestamp()} \
        == metrics["failover_oldest_pending_timestamp_seconds"]


async def test_sqlite_batch_counters(tmp_path: Path, clock: FakeClock):
    """An SQLite journal's batches and operations are exported as counters, with their
    ratio since the journal opened; a scrape reads them without a refresh."""
    journal = failover.SQLiteJournal(tmp_path / "journal.db")
    collector = JournalCollector(journal)
    async with failover.Router([ScriptedChannel("card")], journal, clock=clock) as router:
        await router.repay(repayment())

        metrics = scrape(collector.registry)

    batches = metrics["failover_journal_batches_total"][()]
    operations = metrics["failover_journal_operations_total"][()]
    assert (journal.batches, journal.operations) == (batches, operations)
    assert 0 < batches <= operations
    assert {(): operations / batches} == metrics["failover_journal_operations_per_batch"]
    assert "failover_journal_repayments" not in metrics  # no refresh yet


@pytest.fixture(params=["sqlite", "postgres"])
def durable(request: pytest.FixtureRequest, tmp_path: Path) -> failover.Journal:
    if request.param == "sqlite":
        return failover.SQLiteJournal(tmp_path / "journal.db")
    dsn, schema = request.getfixturevalue("postgres_dsn"), request.getfixturevalue("pg_schema")
    return failover.PostgresJournal(dsn, schema=schema, migrate=True)


def histogram(metrics: dict[str, dict[tuple[str, ...], float]], name: str
              ) -> dict[float, float]:
    """A label-less histogram's cumulative buckets, by upper bound."""
    return {float(le): count for (le,), count in metrics[f"{name}_bucket"].items()}


async def test_journal_write_duration_and_batch_sizes(durable: failover.Journal,
                                                      clock: FakeClock):
    """Each committed transaction is observed once: the histograms' counts are the
    journal's batches, the batch-size sum its operations, and a burst of concurrent
    repayments shows up as batches of more than one operation; a write takes time."""
    import asyncio

    collector = JournalCollector(durable)
    async with failover.Router([ScriptedChannel("card")], durable, clock=clock,
                               background=False) as router:
        await asyncio.gather(*(router.repay(repayment(f"loan-{i}")) for i in range(40)))
        batches, operations = durable.batches, durable.operations  # type: ignore[attr-defined]
        metrics = scrape(collector.registry)

    sizes = histogram(metrics, "failover_journal_batch_operations")
    durations = histogram(metrics, "failover_journal_write_duration_seconds")
    assert batches == metrics["failover_journal_batch_operations_count"][()] \
        == metrics["failover_journal_write_duration_seconds_count"][()]
    assert operations == metrics["failover_journal_batch_operations_sum"][()]
    assert sizes[1.0] < batches  # some batches carried several writes
    assert 0 < metrics["failover_journal_write_duration_seconds_sum"][()]
    assert durations[float("inf")] == batches


async def test_a_failing_batch_observer_never_stops_the_writer(tmp_path: Path,
                                                              clock: FakeClock):
    """An observer that raises is logged; the journal goes on writing."""
    journal = failover.SQLiteJournal(tmp_path / "journal.db")

    def broken(operations: int, seconds: float) -> None:
        raise RuntimeError("observer bug")

    journal.writes.add_observer(broken)
    async with failover.Router([ScriptedChannel("card")], journal, clock=clock) as router:
        first = await router.repay(repayment("loan-1"))
        second = await router.repay(repayment("loan-2"))

    assert [RepaymentStatus.SUCCEEDED] * 2 == [first.status, second.status]


@pytest.mark.parametrize("thrown", [SystemExit, asyncio.CancelledError],
                         ids=["SystemExit", "CancelledError"])
async def test_an_observer_raising_a_base_exception_never_stops_the_writer(
        durable: failover.Journal, thrown: type[BaseException],
        caplog: pytest.LogCaptureFixture):
    """An observer that raises even a BaseException (here at the first write) is
    logged under ``failover.journal``; that batch's callers and every later one get
    their answers.  (The real clock: a router closing on a dead writer waits out its
    grace, which a fake clock would never end.)"""
    raised: list[int] = []

    def quits(operations: int, seconds: float) -> None:
        if not raised:
            raised.append(operations)
            raise thrown("observer gave up")

    async with failover.Router([ScriptedChannel("card")], durable,
                               background=False) as router:
        durable.writes.add_observer(quits)  # type: ignore[attr-defined]
        first = await asyncio.wait_for(router.repay(repayment("loan-1")), 10)
        second = await asyncio.wait_for(router.repay(repayment("loan-2")), 10)
        got = await asyncio.wait_for(router.get("loan-1"), 10)

    assert [RepaymentStatus.SUCCEEDED] * 3 == [
        first.status, second.status, None if got is None else got.status]
    assert ["a batch observer failed"] == [
        r.getMessage() for r in caplog.records if r.name == "failover.journal"]


async def test_sqlite_observers_run_once_the_callers_have_their_answers(tmp_path: Path):
    """An observer runs after its batch's callers are answered: one that waits (on the
    writer thread) for the caller's answer gets it."""
    journal = failover.SQLiteJournal(tmp_path / "journal.db")
    answered = threading.Event()
    seen: list[bool] = []
    journal.writes.add_observer(lambda operations, seconds: seen.append(answered.wait(5)))
    await journal.open()
    try:
        await journal.create(repayment("loan-1"), None, datetime.now(UTC))
        answered.set()
    finally:
        await journal.close()

    assert [True] == seen


async def test_postgres_observers_run_once_the_callers_have_their_answers(
        postgres_dsn: str, pg_schema: str):
    """An observer runs after its batch's callers are answered: every operation of the
    batch being written is done when it is called."""
    journal = failover.PostgresJournal(postgres_dsn, schema=pg_schema, migrate=True)
    seen: list[bool] = []
    journal.writes.add_observer(lambda operations, seconds: seen.append(all(
        op.future.done() for lane in journal._lanes for op in lane.batch)))
    await journal.open()
    try:
        await journal.create(repayment("loan-1"), None, datetime.now(UTC))
    finally:
        await journal.close()

    assert [True] == seen


def test_write_stats_tell_every_observer_whatever_one_raises(
        caplog: pytest.LogCaptureFixture):
    """Each observer's BaseException is logged and the next observer still runs."""
    stats = WriteStats()
    seen: list[tuple[int, float]] = []

    def quits(operations: int, seconds: float) -> None:
        raise SystemExit("observer gave up")

    stats.add_observer(quits)
    stats.add_observer(lambda operations, seconds: seen.append((operations, seconds)))

    stats.committed(3, 0.5)

    assert ((1, 3), [(3, 0.5)]) == ((stats.batches, stats.operations), seen)
    assert 1 == len([r for r in caplog.records if r.name == "failover.journal"])


def write_figures(collector: JournalCollector) -> tuple[float, ...]:
    """The journal's write counters and histogram counts, as a scrape shows them."""
    metrics = scrape(collector.registry)
    return tuple(metrics[name][()] for name in (
        "failover_journal_batches_total", "failover_journal_operations_total",
        "failover_journal_write_duration_seconds_count",
        "failover_journal_batch_operations_count"))


async def test_reads_are_not_counted_as_writes(durable: failover.Journal,
                                               clock: FakeClock):
    """Scrapes with their refresh() and other reads (loads, lists, stats) leave the batch
    counters and the write histograms as they were; a repayment moves them, and every
    transaction counted is one the histograms observed."""
    collector = JournalCollector(durable)
    async with failover.Router([ScriptedChannel("card")], durable, clock=clock,
                               background=False) as router:
        await router.repay(repayment("loan-1"))
        before = write_figures(collector)
        for _ in range(10):
            await collector.refresh()
            await router.get("loan-1")
            await router.get("loan-unknown")
            await durable.find()
            await durable.pending_keys()
            await durable.watched(10)
            await durable.overrides()
            after_reads = write_figures(collector)
        await router.repay(repayment("loan-2"))
        after_write = write_figures(collector)

    assert before == after_reads
    batches, operations, durations, sizes = after_write
    assert before[0] < batches == durations == sizes
    assert before[1] < operations
    counted = durable.batches, durable.operations  # type: ignore[attr-defined]
    assert (batches, operations) == counted


async def test_memory_journal_has_no_batch_counters():
    """A MemoryJournal writes no batches: those metrics are absent, not zero."""
    journal = failover.MemoryJournal()
    collector = JournalCollector(journal)
    await collector.refresh()

    metrics = scrape(collector.registry)

    assert "failover_journal_batches_total" not in metrics
    assert {(): 0} == metrics["failover_manual_refunds"]


async def test_a_failed_refresh_keeps_the_last_snapshot():
    """A journal that cannot be read raises from refresh(); scrapes keep the last figures."""
    journal = failover.MemoryJournal()
    collector = JournalCollector(journal)
    await collector.refresh()
    before = scrape(collector.registry)

    async def down() -> Any:
        raise failover.JournalError("journal unreachable")

    journal.stats = down  # type: ignore[method-assign]
    with pytest.raises(failover.JournalError):
        await collector.refresh()

    assert before == scrape(collector.registry)


def test_breaker_gauge_follows_each_transition():
    """open 2, half-open 1, closed 0; each transition counted once."""
    hook = PrometheusHook()
    seen = []
    for event in (BreakerOpened("card"), BreakerHalfOpened("card"), BreakerClosed("card")):
        hook(event)
        seen.append(scrape(hook.registry)["failover_breaker_state"][("card",)])

    assert [2, 1, 0] == seen
    assert {("card", "open"): 1, ("card", "half_open"): 1, ("card", "closed"): 1} \
        == scrape(hook.registry)["failover_breaker_transitions_total"]


def test_add_channels_keeps_a_state_already_seen():
    """add_channels shows unseen breakers closed and leaves an open one open."""
    hook = PrometheusHook()
    hook(BreakerOpened("card"))

    hook.add_channels(["card", "wallet"])

    assert {("card",): 2, ("wallet",): 0} == scrape(hook.registry)["failover_breaker_state"]


def test_each_hook_has_its_own_registry_by_default():
    """Two hooks in one process do not clash; two in one registry do (prometheus_client
    refuses a name registered twice)."""
    first, second = PrometheusHook(), PrometheusHook()
    assert first.registry is not second.registry

    with pytest.raises(ValueError, match="Duplicated"):
        PrometheusHook(registry=first.registry)


def test_namespace_prefixes_every_name():
    """namespace= replaces the ``failover`` prefix on the hook's and collector's names."""
    hook = PrometheusHook(namespace="lender")
    JournalCollector(failover.MemoryJournal(), registry=hook.registry, namespace="lender")
    hook(BreakerOpened("card"))

    names = set(scrape(hook.registry))

    assert "lender_breaker_state" in names
    assert [] == [name for name in names if not name.startswith("lender_")]
