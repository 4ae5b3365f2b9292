"""Late collections in the corners: interleavings, removed channels, hung blocking
adapters, stale corrections and journals upgraded from before late collections.

Every test judges by the channels' ledgers (what was really collected and given back),
not by the router's own bookkeeping alone."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import failover
from failover import ChannelResult, LateState, RefundState, RepaymentStatus
from failover.journal import _postgres, _sqlite
from failover.testing import (
    HANG,
    Collected,
    Collection,
    FakeClock,
    MemoryLedger,
    Refund,
    ScriptedChannel,
    assert_invariants,
    audit,
)

from .conftest import repayment
from .test_late import KEY, late_config, net


def with_retry_s(config: failover.RouterConfig, retry_s: float) -> failover.RouterConfig:
    return config.model_copy(update={"late": config.late.model_copy(
        update={"retry_s": retry_s})})


class RefundWatched(ScriptedChannel):
    """``in_air`` is set once a refund call has started."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        self.in_air = asyncio.Event()
        super().__init__(*a, **kw)

    async def _refund(self, *a: Any) -> ChannelResult:
        self.in_air.set()
        return await super()._refund(*a)


class NoReferenceChannel(ScriptedChannel):
    """A channel whose adapter gives no provider id on success (the API allows it)."""

    async def submit(self, request: failover.ChannelRequest) -> ChannelResult:
        result = await super().submit(request)
        if result.outcome is failover.Outcome.SUCCEEDED:
            return ChannelResult.succeeded(None)
        return result


def gated(base: type) -> type:
    """``base`` (a journal class) whose next call of ``method`` waits for ``gate``."""

    class Gated(base):  # type: ignore[misc, valid-type]
        gate: asyncio.Event | None = None
        parked: asyncio.Event | None = None
        method = ""

        def arm(self, method: str) -> asyncio.Event:
            self.method, self.gate, self.parked = method, asyncio.Event(), asyncio.Event()
            return self.gate

        async def _pass(self, method: str) -> None:
            gate = self.gate
            if gate is not None and method == self.method:
                self.gate = None
                assert self.parked is not None
                self.parked.set()
                await gate.wait()

        async def correct(self, *a: Any, **kw: Any) -> Any:
            await self._pass("correct")
            return await super().correct(*a, **kw)

        async def start_watching(self, *a: Any, **kw: Any) -> Any:
            await self._pass("start_watching")
            return await super().start_watching(*a, **kw)

    return Gated


# ---- a refund sent before ------------------------------------------------------------


async def test_an_applied_refund_whose_channel_is_removed_is_not_put_on_the_manual_list(
        journal, clock):
    """A refund that applied but whose answer was lost stays to be settled while its
    channel is no longer configured (it is never put on the manual-refund list, which
    would have it given back twice), and is settled without a second refund once the
    channel is back."""
    ledger = MemoryLedger()
    card = ScriptedChannel("card", [Collected(ChannelResult.unknown("timeout"))],
                           queries=[ChannelResult.not_found()],
                           refunds=[Collected(ChannelResult.unknown("timeout"))],
                           ledger=ledger)
    wallet = ScriptedChannel("wallet", ledger=ledger)
    first = failover.Router([card, wallet], journal, late_config(card={}, wallet={}),
                            clock=clock, background=False)
    await first.open()
    try:
        result = await first.repay(repayment())
        assert (RepaymentStatus.SUCCEEDED, "wallet") == (result.status, result.channel)
        await first.sweep()  # the refund applies, its answer is lost
        [check] = await journal.late_checks(KEY)
        assert RefundState.UNKNOWN == check.refund
        assert 1 == net(ledger)
        assert 1 == len(ledger.refunds())
    finally:
        await first.close(grace_s=0)

    # Redeployed without card.
    second = failover.Router([wallet], journal, late_config(wallet={}), clock=clock,
                             background=False)
    await second.open()
    try:
        clock.advance(61)
        await second.sweep()
        clock.advance(61)
        await second.sweep()
        assert [] == await journal.late_checks(refund=RefundState.MANUAL)
        [check] = await journal.late_checks(KEY)
        assert RefundState.UNKNOWN == check.refund
    finally:
        await second.close(grace_s=0)

    # card is configured again: the refund is found applied, not sent again.
    third = failover.Router([card, wallet], journal, late_config(card={}, wallet={}),
                            clock=clock, background=False)
    await third.open()
    try:
        clock.advance(3601)
        await third.sweep()
        [check] = await journal.late_checks(KEY)
        assert RefundState.REFUNDED == check.refund
        assert 1 == len(card.refund_requests)
        assert 1 == net(ledger)
        assert 1 == len(ledger.refunds())
        assert_invariants(audit({KEY: await third.get(KEY)}, [ledger]))
    finally:
        await third.close(grace_s=0)


async def test_a_refund_still_in_the_air_past_retry_s_is_not_sent_again(make_router, clock):
    """A refund call may last up to the channel's timeout, longer than ``late.retry_s``:
    while it is in the air, another sweep neither claims its check nor sends the refund a
    second time."""
    ledger = MemoryLedger()
    card = RefundWatched("card", [Collected(ChannelResult.unknown("timeout"))],
                         queries=[ChannelResult.not_found()], refunds=[HANG], ledger=ledger)
    wallet = ScriptedChannel("wallet", ledger=ledger)
    config = with_retry_s(late_config(card={"timeout_s": 20}, wallet={}), 5)
    router = await make_router([card, wallet], config, background=False)
    await router.repay(repayment())
    assert 2 == net(ledger)

    slow = asyncio.ensure_future(router.sweep())  # its refund call hangs
    try:
        async with asyncio.timeout(5):
            await card.in_air.wait()
        clock.advance(6)  # past retry_s, well within the channel's timeout
        await router.sweep()
        assert 1 == len(card.refund_requests), [r.reference for r in card.refund_requests]
        assert [] == ledger.refunds()
    finally:
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow


# ---- the watch ---------------------------------------------------------------------


class CallbackDuringSubmit(ScriptedChannel):
    """While its submit is in the air, another channel's webhook reaches the router."""

    router: failover.Router
    callback: tuple[str, str, ChannelResult]

    async def submit(self, request: failover.ChannelRequest) -> ChannelResult:
        await self.router.notify(*self.callback)
        return await super().submit(request)


async def test_retry_of_a_repayment_proved_paid_keeps_watching_its_other_attempts(
        make_router, clock):
    """Retrying a FAILED repayment that a callback proved paid corrects it without
    dropping the watch on its other attempts: one that applies late is still found and
    refunded, so the borrower is charged once."""
    ledger = MemoryLedger()
    card = ScriptedChannel("card", [ChannelResult.unknown("timeout")],
                           queries=[ChannelResult.not_found()], ledger=ledger)
    bank = CallbackDuringSubmit("bank", [ChannelResult.unknown("timeout")],
                                queries=[ChannelResult.not_found()], ledger=ledger)
    wallet = ScriptedChannel("wallet", [ChannelResult.declined("insufficient_funds")],
                             ledger=ledger)
    router = await make_router([card, bank, wallet],
                               late_config(card={}, bank={}, wallet={}), background=False)
    card_ref = failover.make_reference(KEY, 1, "card")
    bank.router = router
    bank.callback = ("card", card_ref, ChannelResult.succeeded("card-cb-1"))
    amount = repayment().amount
    ledger.record(Collection("card", card_ref, KEY, amount, "card-cb-1"))  # card applied

    assert RepaymentStatus.FAILED == (await router.repay(repayment())).status
    retried = await router.retry(KEY)
    assert (RepaymentStatus.SUCCEEDED, "card") == (retried.status, retried.channel)
    # bank's queued request is applied late
    ledger.record(Collection("bank", failover.make_reference(KEY, 1, "bank"), KEY, amount,
                             "bank-late-1"))
    for _ in range(3):  # past the horizon
        await router.sweep()
        clock.advance(3601)

    assert 1 == net(ledger)
    assert ["bank"] == [r.channel for r in ledger.refunds()]
    assert_invariants(audit({KEY: await router.get(KEY)}, [ledger]))


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_round_ending_while_the_sweep_turns_the_watch_into_checks_is_watched(
        kind, tmp_path, clock):
    """A round that ends between the sweep's reading of a watched repayment and its
    turning the watch into checks is watched anew: its attempt that applies late is found
    and refunded."""
    base = failover.MemoryJournal if kind == "memory" else failover.SQLiteJournal
    journal = gated(base)() if kind == "memory" else gated(base)(tmp_path / "j.db")
    ledger = MemoryLedger()
    card = ScriptedChannel("card", [ChannelResult.unknown("timeout")] * 2, ledger=ledger)
    bank = ScriptedChannel("bank", [ChannelResult.declined("insufficient_funds")],
                           ledger=ledger)
    router = failover.Router([card, bank], journal, late_config(card={}, bank={}),
                             clock=clock, background=False)
    await router.open()
    try:
        first = await router.repay(repayment())
        assert RepaymentStatus.FAILED == first.status

        gate = journal.arm("start_watching")
        sweep = asyncio.ensure_future(router.sweep())
        await journal.parked.wait()  # the sweep is about to turn KEY's watch into checks
        retried = await router.retry(KEY)  # round 2: card in doubt (NOT_FOUND), bank pays
        assert (RepaymentStatus.SUCCEEDED, "bank", 2) == (
            retried.status, retried.channel, retried.round)
        gate.set()
        await sweep

        card2 = failover.make_reference(KEY, 2, "card")
        ledger.record(Collection("card", card2, KEY, repayment().amount, "card-late"))
        for _ in range(3):  # past the horizon
            clock.advance(3601)
            await router.sweep()

        assert 1 == net(ledger)
        assert [card2] == [r.reference for r in ledger.refunds()]
        assert_invariants(audit({KEY: await router.get(KEY)}, [ledger]))
    finally:
        await router.close(grace_s=0)


# ---- corrections --------------------------------------------------------------------


async def two_late_callbacks_one_stale(a: failover.Router, b: failover.Router,
                                       b_journal: Any, ledger: MemoryLedger) -> None:
    """Round 1 (bank, card) failed in doubt; round 2 collected on bank, which gives no
    provider id.  Both round-1 requests then apply late and both webhooks arrive at once:
    ``b`` handles card's and its correction is held back until ``a`` has handled bank's."""
    assert RepaymentStatus.FAILED == (await a.repay(repayment())).status
    retried = await a.retry(KEY)
    assert (RepaymentStatus.SUCCEEDED, "bank", None) == (
        retried.status, retried.channel, retried.channel_reference)
    bank_ref, card_ref = (failover.make_reference(KEY, 1, n) for n in ("bank", "card"))
    amount = repayment().amount
    ledger.record(Collection("bank", bank_ref, KEY, amount, "bank-late"))
    ledger.record(Collection("card", card_ref, KEY, amount, "card-late"))
    assert 3 == net(ledger)

    gate = b_journal.arm("correct")
    card_callback = asyncio.ensure_future(
        b.notify("card", card_ref, ChannelResult.succeeded("card-late")))
    await b_journal.parked.wait()
    await a.notify("bank", bank_ref, ChannelResult.succeeded())
    gate.set()
    await card_callback


def stale_correction_channels(ledger: MemoryLedger) -> list[ScriptedChannel]:
    return [NoReferenceChannel("bank", [ChannelResult.unknown("timeout")],
                               queries=[ChannelResult.not_found()], ledger=ledger),
            ScriptedChannel("card", [ChannelResult.unknown("timeout")],
                            queries=[ChannelResult.not_found()], ledger=ledger)]


async def test_a_correction_planned_on_a_stale_read_never_lands(clock):
    """Two late collections proved at once each plan a correction of the same ending; the
    one planned before the other landed is refused, so exactly one collection is kept
    and the other two are refunded."""
    ledger = MemoryLedger()
    journal = gated(failover.MemoryJournal)()
    router = failover.Router(stale_correction_channels(ledger), journal,
                             late_config(bank={}, card={}), clock=clock, background=False)
    await router.open()
    try:
        await two_late_callbacks_one_stale(router, router, journal, ledger)
        for _ in range(3):
            await router.sweep()
            clock.advance(3601)

        result = await router.get(KEY)
        assert RepaymentStatus.SUCCEEDED == result.status
        assert 1 == net(ledger)
        assert 2 == len(ledger.refunds())
        refunded = {r.reference for r in ledger.refunds()}
        kept = [c.channel for c in ledger.collections() if c.reference not in refunded]
        assert [result.channel] == kept
        assert_invariants(audit({KEY: result}, [ledger]))
    finally:
        await router.close(grace_s=0)


async def test_postgres_a_stale_correction_from_another_instance_never_lands(
        postgres_dsn, pg_schema):
    """On PostgreSQL, two instances handling two late webhooks at once each plan a
    correction; the stale one is refused, so exactly one collection is kept and the
    others are refunded."""
    clock, ledger = FakeClock(), MemoryLedger()
    config = late_config(bank={}, card={})
    a_journal = failover.PostgresJournal(postgres_dsn, schema=pg_schema, migrate=True,
                                         instance="a")
    b_journal = gated(failover.PostgresJournal)(postgres_dsn, schema=pg_schema, migrate=True,
                                                instance="b")
    a = failover.Router(stale_correction_channels(ledger), a_journal, config, clock=clock,
                        background=False)
    b = failover.Router([ScriptedChannel("bank", ledger=ledger),
                         ScriptedChannel("card", ledger=ledger)], b_journal, config,
                        clock=clock, background=False)
    await a.open()
    await b.open()
    try:
        await two_late_callbacks_one_stale(a, b, b_journal, ledger)
        for _ in range(2):
            await asyncio.gather(a.sweep(), b.sweep())
            clock.advance(3601)

        result = await a.get(KEY)
        assert RepaymentStatus.SUCCEEDED == result.status
        assert 1 == net(ledger)
        assert 2 == len(ledger.refunds())
        assert_invariants(audit({KEY: result}, [ledger]))
    finally:
        await a.close(grace_s=0)
        await b.close(grace_s=0)


# ---- a resumed drive ---------------------------------------------------------------


async def test_a_drive_resumed_after_a_callback_proved_the_collection_does_not_collect_again(
        make_router):
    """A pending repayment whose settled attempt a provider's callback proves collected
    ends on that collection when it is resumed, instead of failing over and collecting a
    second time."""
    ledger = MemoryLedger()
    card = ScriptedChannel("card", [ChannelResult.unknown("timeout")],
                           queries=[ChannelResult.not_found()], ledger=ledger)
    bank = ScriptedChannel("bank", [ChannelResult.unknown("timeout")],
                           queries=[ChannelResult.unknown("query_timeout")] * 3,
                           ledger=ledger)
    wallet = ScriptedChannel("wallet", ledger=ledger)
    router = await make_router([card, bank, wallet], late_config(card={}, bank={}, wallet={}),
                               background=False)
    pending = await router.repay(repayment())
    assert (RepaymentStatus.PENDING, "bank") == (pending.status, pending.pending_channel)
    card_ref = failover.make_reference(KEY, 1, "card")
    ledger.record(Collection("card", card_ref, KEY, repayment().amount, "card-1"))
    await router.notify("card", card_ref, ChannelResult.succeeded("card-1"))

    [resumed] = await router.reconcile()

    assert ["card"] == [c.channel for c in ledger.collections()]
    assert 1 == net(ledger)
    assert [] == wallet.requests
    assert (RepaymentStatus.SUCCEEDED, "card") == (resumed.status, resumed.channel)
    assert_invariants(audit({KEY: await router.get(KEY)}, [ledger]))


# ---- blocking adapters -------------------------------------------------------------


class BlockingChannel:
    """A blocking SDK adapter (plain ``def``).  Submit answers a timeout; if ``collect``
    the request was queued and applied anyway.  The first status query of a reference
    says NOT_FOUND (the provider's queue), later ones tell the truth.  With ``hang`` set,
    status queries block until ``release`` is."""

    def __init__(self, name: str, ledger: MemoryLedger, *, collect: bool,
                 hang: threading.Event | None = None,
                 release: threading.Event | None = None) -> None:
        self.name, self.idempotent, self.ledger = name, False, ledger
        self.collect, self.hang, self.release = collect, hang, release
        self.asked: set[str] = set()

    def submit(self, request: failover.ChannelRequest) -> ChannelResult:
        if self.collect:
            self.ledger.record(Collection(self.name, request.reference,
                                          request.repayment_key, request.amount,
                                          f"{self.name}-x"))
        return ChannelResult.unknown("timeout")

    def query(self, request: failover.ChannelRequest) -> ChannelResult:
        if self.hang is not None and self.hang.is_set():
            assert self.release is not None
            self.release.wait(10)
        done = self.ledger.find(self.name, request.reference)
        if done is None or request.reference not in self.asked:
            self.asked.add(request.reference)
            return ChannelResult.not_found()
        return ChannelResult.succeeded(done.channel_reference)

    def refund(self, request: failover.ChannelRequest, channel_reference: str | None,
               amount: Any) -> ChannelResult:
        collection = next(c for c in self.ledger.collections() if c.channel == self.name
                          and c.repayment_key == request.repayment_key)
        if self.ledger.find_refund(self.name, request.reference) is None:
            self.ledger.record_refund(Refund(self.name, request.reference,
                                             collection.reference, collection.repayment_key,
                                             amount, f"{self.name}-r"))
        return ChannelResult.succeeded(f"{self.name}-r")


async def test_a_hung_blocking_channel_starves_neither_other_channels_nor_close(tmp_path):
    """Late queries of a blocking (plain ``def``) adapter that hang take only that
    channel's own threads: another blocking channel's late collection is still found and
    refunded in the same sweep, and ``close()`` returns."""
    # A small shared pool (as on a small machine): work put on it by the late pass
    # would be starved by the hung calls, and close() needs it.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=4))
    hang, release = threading.Event(), threading.Event()
    ledger = MemoryLedger()
    partner = BlockingChannel("partner", ledger, collect=False, hang=hang, release=release)
    bank = BlockingChannel("bank", ledger, collect=True)
    fast = {"timeout_s": 0.3, "breaker": {"fail_max": 1000}}
    config = late_config(partner=fast, bank=fast, wallet=fast)
    router = failover.Router([partner, bank, ScriptedChannel("wallet", ledger=ledger)],
                             failover.SQLiteJournal(tmp_path / "j.db"), config,
                             background=False)
    await router.open()
    closing: asyncio.Future[None] | None = None
    try:
        keys = [f"k{i}" for i in range(8)]
        for key in keys:  # partner in doubt, NOT_FOUND: wallet collects
            await router.repay(repayment(key), channels=["partner", "wallet"])
        # bank's request applied although its query said NOT_FOUND: collected twice
        await router.repay(repayment("zz-dup"), channels=["bank", "wallet"])
        assert 2 == net(ledger, "zz-dup")

        hang.set()  # partner's status API hangs from now on
        await router.sweep()

        assert 1 == net(ledger, "zz-dup")
        assert ["bank"] == [r.channel for r in ledger.refunds()]
        assert_invariants(audit({k: await router.get(k) for k in [*keys, "zz-dup"]},
                                [ledger]))

        closing = asyncio.ensure_future(router.close(grace_s=0))
        done, _ = await asyncio.wait([closing], timeout=3)
        assert closing in done, "close() blocked behind the hung calls"
    finally:
        release.set()
        await (closing if closing is not None else router.close(grace_s=0))


# ---- journals upgraded from before late collections ------------------------------------


async def test_an_upgraded_sqlite_journal_watches_repayments_that_ended_before(tmp_path):
    """A repayment that ended under schema 1 with an attempt settled by NOT_FOUND is
    watched once the journal is upgraded: when that request applies late, the borrower is
    shown as having paid."""
    clock, ledger = FakeClock(), MemoryLedger()
    path = tmp_path / "v1.db"
    ref = failover.make_reference(KEY, 1, "card")
    t = clock.now().isoformat()
    conn = sqlite3.connect(path)
    for statement in _sqlite._statements(_sqlite._SCHEMA):  # schema version 1
        conn.execute(statement)
    conn.execute("INSERT INTO repayments (key, account, amount, currency, metadata, status,"
                 " round, code, created_at, updated_at) VALUES (?, 'borrower-9', '1250.00',"
                 " 'CNY', '{}', 'failed', 1, 'not_found', ?, ?)", (KEY, t, t))
    conn.execute("INSERT INTO attempts (key, number, round, channel, reference, outcome, code,"
                 " resolution, started_at, finished_at) VALUES (?, 1, 1, 'card', ?, 'unknown',"
                 " 'timeout', 'not_found', ?, ?)", (KEY, ref, t, t))
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()

    card = ScriptedChannel("card", ledger=ledger)
    router = failover.Router([card], failover.SQLiteJournal(path), late_config(card={}),
                             clock=clock, background=False)
    await router.open()  # upgraded here
    try:
        ledger.record(Collection("card", ref, KEY, repayment().amount, "card-late"))
        for _ in range(3):  # past the horizon
            await router.sweep()
            clock.advance(3601)

        result = await router.get(KEY)
        assert_invariants(audit({KEY: result}, [ledger]))  # not shown FAILED: paid
        assert 1 == net(ledger)
        assert (RepaymentStatus.SUCCEEDED, "card") == (result.status, result.channel)
        assert [ref] == [q.reference for q in card.query_requests]
    finally:
        await router.close(grace_s=0)


async def test_a_migrated_postgres_journal_watches_repayments_that_ended_before(
        postgres_dsn, pg_schema):
    """A repayment that ended under PostgreSQL schema 1 with an attempt settled by
    NOT_FOUND is watched once migrated: when that request applies late, the borrower is
    shown as having paid."""
    import asyncpg

    clock, ledger = FakeClock(), MemoryLedger()
    s = pg_schema
    ref = failover.make_reference(KEY, 1, "card")
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(f"CREATE SCHEMA {s}")
        await conn.execute(_postgres._MIGRATIONS[0][1].format(s=s))  # schema version 1
        await conn.execute(f"CREATE TABLE {s}.meta (id INTEGER PRIMARY KEY CHECK (id = 1),"
                           " version INTEGER NOT NULL)")
        await conn.execute(f"INSERT INTO {s}.meta VALUES (1, 1)")
        now = clock.now()
        await conn.execute(
            f"INSERT INTO {s}.repayments (key, account, amount, currency, metadata, status,"
            " round, code, created_at, updated_at, token) VALUES ($1, 'borrower-9', 1250.00,"
            f" 'CNY', '{{}}', 'failed', 1, 'not_found', $2, $2, nextval('{s}.tokens'))",
            KEY, now)
        await conn.execute(
            f"INSERT INTO {s}.attempts (key, number, round, channel, reference, outcome, code,"
            " resolution, started_at, finished_at) VALUES ($1, 1, 1, 'card', $2, 'unknown',"
            " 'timeout', 'not_found', $3, $3)", KEY, ref, now)
    finally:
        await conn.close()

    card = ScriptedChannel("card", ledger=ledger)
    journal = failover.PostgresJournal(postgres_dsn, schema=s, migrate=True, instance="a")
    router = failover.Router([card], journal, late_config(card={}), clock=clock,
                             background=False)
    await router.open()  # migrated here
    try:
        ledger.record(Collection("card", ref, KEY, repayment().amount, "card-late"))
        for _ in range(3):  # past the horizon
            await router.sweep()
            clock.advance(3601)

        result = await router.get(KEY)
        assert_invariants(audit({KEY: result}, [ledger]))  # not shown FAILED: paid
        assert 1 == net(ledger)
        assert (RepaymentStatus.SUCCEEDED, "card") == (result.status, result.channel)
        assert [ref] == [q.reference for q in card.query_requests]
        [check] = (await router.get_late(KEY)).late
        assert LateState.COLLECTED == check.state
    finally:
        await router.close(grace_s=0)
