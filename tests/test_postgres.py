"""Several router instances on one PostgreSQL journal: ownership, fencing, takeover,
joins across instances and database faults, each checked against the channels' ledger.

Two journals with different ``instance`` names on one schema are two service
instances; a fault-injecting TCP proxy (tests/pg_proxy.py) stands between a journal
and the server where a test needs the database to fail.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import pytest

import failover
from failover import ChannelRequest, ChannelResult, Repayment, RepaymentStatus
from failover.events import Event, RepaymentTakenOver
from failover.testing import crash

from .pg_channels import Ledger, LedgerChannel
from .pg_proxy import Proxy

CONFIG = failover.RouterConfig.model_validate({
    "channels": {
        name: {"timeout_s": 1.0, "settle_s": 0.2,
               "retry": {"max_attempts": 2, "initial_backoff_s": 0.01, "max_backoff_s": 0.02}}
        for name in ("card", "wallet")
    },
})


def repayment(key: str, amount: str = "100.00", account: str = "acct-00001234") -> Repayment:
    return Repayment(key=key, account=account, amount=Decimal(amount), currency="CNY")


@pytest.fixture
async def instances(postgres_dsn: str, pg_schema: str) -> AsyncIterator[Any]:
    """``make(name, **journal_options)``: a router instance on the shared schema, its
    channels on one ledger; all closed at the end."""
    ledger = Ledger()
    opened: list[failover.Router] = []

    async def make(name: str, *, dsn: str = postgres_dsn, lease_s: float = 5.0,
                   router: dict[str, Any] | None = None, **options: Any) -> Any:
        channels = [LedgerChannel("card", ledger), LedgerChannel("wallet", ledger)]
        journal = failover.PostgresJournal(dsn, schema=pg_schema, instance=name,
                                           lease_s=lease_s, migrate=True, **options)
        events: list[Event] = []
        built = failover.Router(channels, journal, CONFIG, hooks=[events.append],
                                **(router or {"background": False}))
        await built.open()
        opened.append(built)
        return built, journal, channels, events

    make.ledger = ledger  # type: ignore[attr-defined]
    yield make
    for router in opened:
        with contextlib.suppress(Exception):
            await router.close(grace_s=0)


async def test_one_key_on_two_instances_at_once_is_collected_once(instances):
    """A client retry reaching a second instance while the first collects: the second
    never submits and both callers get the same result."""
    a, _, a_channels, _ = await instances("a")
    b, _, b_channels, _ = await instances("b")
    gate = asyncio.Event()
    for channel in a_channels + b_channels:
        channel.gate = gate
    keys = [f"loan-{n}" for n in range(20)]
    calls = [router.repay(repayment(key)) for key in keys for router in (a, b)]
    tasks = [asyncio.ensure_future(call) for call in calls]
    await asyncio.sleep(0.3)  # both instances have the keys in hand
    gate.set()
    results = await asyncio.gather(*tasks)

    ledger = instances.ledger
    for key in keys:
        assert len(ledger.collections(key)) == 1, ledger.collections(key)
        pair = [r for r in results if r.key == key]
        assert {r.status for r in pair} == {RepaymentStatus.SUCCEEDED}
        assert len({r.channel_reference for r in pair}) == 1
    submits = [ref for channel in a_channels + b_channels for ref in channel.submits]
    assert len(submits) == len(keys), "a second instance submitted a key it did not own"


async def test_a_key_reused_for_other_money_is_refused_on_another_instance(instances):
    a, *_ = await instances("a")
    b, *_ = await instances("b")
    await a.repay(repayment("loan-1"))
    with pytest.raises(failover.IdempotencyConflict, match="amount"):
        await b.repay(repayment("loan-1", amount="999.00"))
    assert len(instances.ledger.collections("loan-1")) == 1


async def test_a_fenced_owner_stops_and_its_caller_gets_the_new_owners_result(
        instances, postgres_dsn, pg_schema):
    """A's lease runs out while its submit is in the air (a paused process); B takes the
    repayment over, asks the channel, finds it collected.  A's next write is refused:
    it calls no channel again and its caller gets B's result."""
    a, _a_journal, a_channels, a_events = await instances("a")
    b, b_journal, b_channels, _ = await instances("b")
    card = a_channels[0]
    card.gate = asyncio.Event()
    card.unknown = True  # collects, then answers a timeout: A would try the wallet next
    caller = asyncio.ensure_future(a.repay(repayment("loan-7")))
    await card.entered.wait()
    await _expire_leases(postgres_dsn, pg_schema)
    assert await b_journal.take_expired(10) == ["loan-7"]
    card.gate.set()  # A's submit collects now, as a paused process's would
    await asyncio.sleep(0.05)
    settled = await b._executor.drive(None, b._channels.layout, "loan-7")
    assert settled.status is RepaymentStatus.SUCCEEDED  # B's query found the collection
    result = await asyncio.wait_for(caller, 10)

    assert result.status is RepaymentStatus.SUCCEEDED
    assert result.channel_reference == settled.channel_reference
    assert len(instances.ledger.collections("loan-7")) == 1
    assert a_channels[1].submits == [], "the fenced owner failed over after losing the key"
    assert b_channels[0].submits == b_channels[1].submits == []
    assert any(e.name == "failover.repayment.ownership_lost" for e in a_events)


async def test_a_dead_instances_work_is_taken_over_and_its_doubt_settled_first(instances):
    """A dies with a collected attempt in doubt; B's background sweep takes the key over
    once A's lease expires and asks the channel before anything else: one collection."""
    a, a_journal, a_channels, _ = await instances("a", lease_s=2.0)
    b, _, b_channels, b_events = await instances(
        "b", lease_s=2.0, router={"sweep_every_s": 0.1, "reconcile_every_s": 60})
    card = a_channels[0]
    card.gate = asyncio.Event()
    caller = asyncio.ensure_future(a.repay(repayment("loan-9")))
    await card.entered.wait()
    instances.ledger.rows.append(("loan-9", "card", card.submits[0]))  # it collected...
    crash(a)  # ...and A died before the answer came: its leases are no longer renewed
    await a_journal.close()
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(caller, 5)
    for _ in range(100):
        result = await b.get("loan-9")
        if result is not None and result.status is not RepaymentStatus.PENDING:
            break
        await asyncio.sleep(0.05)

    assert result is not None
    assert result.status is RepaymentStatus.SUCCEEDED
    assert len(instances.ledger.collections("loan-9")) == 1
    assert b_channels[0].submits == b_channels[1].submits == []  # settled by a query
    assert any(isinstance(e, RepaymentTakenOver) and "loan-9" in e.keys for e in b_events)


async def test_a_write_whose_commit_answer_was_lost_is_read_back(
        instances, postgres_dsn):
    """The connection drops after the intent's COMMIT reached the server: the journal
    reads back that its write happened and the repayment goes on, collected once."""
    target = urlsplit(postgres_dsn)
    proxy = await Proxy(target.hostname or "127.0.0.1", target.port or 5432).start()
    try:
        a, _a_journal, _a_channels, _ = await instances("a", dsn=proxy.dsn(postgres_dsn))
        proxy.drop_at_commit(after=True)
        result = await a.repay(repayment("loan-3"))
        assert proxy.dropped_commits == 1
        assert result.status is RepaymentStatus.SUCCEEDED
        assert len(instances.ledger.collections("loan-3")) == 1
        assert len(result.attempts) == 1
    finally:
        await proxy.stop()


async def test_a_write_that_never_committed_is_applied_once(instances, postgres_dsn):
    target = urlsplit(postgres_dsn)
    proxy = await Proxy(target.hostname or "127.0.0.1", target.port or 5432).start()
    try:
        a, *_ = await instances("a", dsn=proxy.dsn(postgres_dsn))
        proxy.drop_at_commit(after=False)
        result = await a.repay(repayment("loan-4"))
        assert proxy.dropped_commits == 1
        assert result.status is RepaymentStatus.SUCCEEDED
        assert len(instances.ledger.collections("loan-4")) == 1
        assert len(result.attempts) == 1
    finally:
        await proxy.stop()


async def test_while_the_database_is_unreachable_repay_fails_fast_and_calls_no_channel(
        instances, postgres_dsn):
    target = urlsplit(postgres_dsn)
    proxy = await Proxy(target.hostname or "127.0.0.1", target.port or 5432).start()
    try:
        a, _, a_channels, _ = await instances("a", dsn=proxy.dsn(postgres_dsn))
        proxy.cut()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(failover.JournalError, match="unreachable"):
            await a.repay(repayment("loan-5"))
        assert loop.time() - started < 5.0  # refused connections, not a timeout
        assert a_channels[0].submits == a_channels[1].submits == []
        proxy.heal()
        result = await a.repay(repayment("loan-5"))  # the client's retry, once it is back
        assert result.status is RepaymentStatus.SUCCEEDED
        assert len(instances.ledger.collections("loan-5")) == 1
    finally:
        await proxy.stop()


async def test_a_lease_shorter_than_a_channel_timeout_is_refused_at_once(
        postgres_dsn, pg_schema):
    journal = failover.PostgresJournal(postgres_dsn, schema=pg_schema, lease_s=1.0)
    with pytest.raises(failover.ConfigError, match=r"lease_s.*card.*timeout_s"):
        failover.Router([LedgerChannel("card", Ledger()), LedgerChannel("wallet", Ledger())],
                        journal, CONFIG)


async def test_four_instances_migrating_at_once_take_turns(postgres_dsn, pg_schema):
    journals = [failover.PostgresJournal(postgres_dsn, schema=pg_schema, instance=f"i{n}")
                for n in range(4)]
    versions = await asyncio.gather(*(j.migrate() for j in journals))
    top = failover.journal.PG_SCHEMA_VERSION
    assert sorted(versions) == [(0, top), (top, top), (top, top), (top, top)]


async def test_a_schema_never_migrated_is_refused_with_the_command_to_run(
        postgres_dsn, pg_schema):
    journal = failover.PostgresJournal(postgres_dsn, schema=pg_schema)
    with pytest.raises(failover.JournalError, match="failover migrate"):
        await journal.open()


async def test_the_password_in_a_dsn_is_masked_in_messages():
    journal = failover.PostgresJournal("postgresql://svc:s3cret@127.0.0.1:1/db",
                                       connect_timeout_s=1)
    with pytest.raises(failover.JournalError) as error:
        await journal.open()
    assert "s3cret" not in str(error.value)
    assert "svc:***@127.0.0.1:1" in str(error.value)


async def _expire_leases(dsn: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"UPDATE {schema}.repayments SET lease_until = now()"
                           " - interval '1 second' WHERE status = 'pending'")
    finally:
        await conn.close()


async def test_another_instances_attempt_is_not_bounded_by_this_ones_opening(
        postgres_dsn, pg_schema):
    """A's wall clock lags B's, so A's attempt looks older than B's opening.  When B takes
    the repayment over, the request A may have sent is bounded by the takeover, not by
    B's opening: B waits settle_s before a NOT_FOUND proves anything, and so sees the
    late-landing collection instead of failing over to a second channel."""
    from datetime import timedelta

    from failover.testing import FakeClock

    ledger = Ledger()
    clock_b = FakeClock()
    clock_a = FakeClock(clock_b.now() - timedelta(hours=1))
    land_at = [float("inf")]

    class QueuedCard(LedgerChannel):
        """A's submit waits in the provider's queue and lands at land_at (B's clock)."""

        def __init__(self, name: str, ledger: Ledger) -> None:
            super().__init__(name, ledger)
            self.queued: list[tuple[str, str]] = []

        async def submit(self, request: ChannelRequest) -> ChannelResult:
            self.queued.append((request.repayment_key, request.reference))
            self.entered.set()
            await asyncio.Event().wait()  # the process dies during the call
            raise AssertionError("unreachable")

        async def query(self, request: ChannelRequest) -> ChannelResult:
            if clock_b.monotonic() >= land_at[0]:
                for key, reference in self.queued:
                    if not self.ledger.find(self.name, reference):
                        self.ledger.rows.append((key, self.name, reference))
            return await super().query(request)

    def router(name: str, clock: FakeClock, card: LedgerChannel) -> Any:
        journal = failover.PostgresJournal(postgres_dsn, schema=pg_schema, instance=name,
                                           lease_s=5.0, migrate=True)
        built = failover.Router([card, LedgerChannel("wallet", ledger)], journal, CONFIG,
                                clock=clock, background=False)
        return built, journal

    card = QueuedCard("card", ledger)
    b, b_journal = router("b", clock_b, card)
    a, a_journal = router("a", clock_a, card)
    await b.open()
    await a.open()
    try:
        clock_b.advance(10)  # B has been up a while
        caller = asyncio.ensure_future(a.repay(repayment("loan-11")))
        await card.entered.wait()
        crash(a)
        await a_journal.close()
        with contextlib.suppress(BaseException):
            await caller
        await _expire_leases(postgres_dsn, pg_schema)
        assert await b_journal.take_expired(10) == ["loan-11"]
        land_at[0] = clock_b.monotonic() + 0.1  # it lands just after the takeover

        result = await b._executor.drive(None, b._channels.layout, "loan-11")

        assert len(ledger.collections("loan-11")) == 1, ledger.collections("loan-11")
        assert result.status is RepaymentStatus.SUCCEEDED
        assert result.channel == "card"
    finally:
        await b.close(grace_s=0)


def test_a_blocking_router_and_from_config_take_the_postgres_journal(
        postgres_dsn, pg_schema, tmp_path):
    """A sync service on PostgreSQL: BlockingRouter.from_config with PostgresJournal."""
    config = tmp_path / "failover.toml"
    config.write_text(
        '[channels.card]\nadapter = "failover.testing:SimulatedChannel"\n'
        'options = { seed = 1 }\n')
    journal = failover.PostgresJournal(postgres_dsn, schema=pg_schema, migrate=True)
    with failover.BlockingRouter.from_config(config, journal=journal) as router:
        result = router.repay(repayment("loan-12"))
        assert result.status is RepaymentStatus.SUCCEEDED
        assert router.get("loan-12") == result


async def test_the_background_loop_survives_a_database_outage_and_says_so(
        instances, postgres_dsn):
    """The sweep meets an unreachable database: it backs off and emits
    journal.unavailable, then journal.recovered once it is back; close() stops it."""
    target = urlsplit(postgres_dsn)
    proxy = await Proxy(target.hostname or "127.0.0.1", target.port or 5432).start()
    try:
        a, _, _, events = await instances(
            "a", dsn=proxy.dsn(postgres_dsn),
            router={"sweep_every_s": 0.02, "reconcile_every_s": 60})
        proxy.cut()
        for _ in range(200):
            if any(e.name == "failover.journal.unavailable" for e in events):
                break
            await asyncio.sleep(0.02)
        proxy.heal()
        for _ in range(300):
            if any(e.name == "failover.journal.recovered" for e in events):
                break
            await asyncio.sleep(0.02)
        names = [e.name for e in events]
        assert "failover.journal.unavailable" in names
        assert "failover.journal.recovered" in names
        assert names.index("failover.journal.unavailable") < names.index(
            "failover.journal.recovered")
        result = await a.repay(repayment("loan-13"))  # and the instance works again
        assert result.status is RepaymentStatus.SUCCEEDED
        await asyncio.wait_for(a.close(grace_s=0), 5)
        assert not any(t.get_name() == "failover:background" for t in asyncio.all_tasks())
    finally:
        await proxy.stop()


def test_without_asyncpg_the_postgres_journal_says_which_extra_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "asyncpg" else real(name, *a))
    with pytest.raises(failover.JournalError, match=r"failover\[postgres\]"):
        failover.PostgresJournal("postgresql://svc@db/payments")
