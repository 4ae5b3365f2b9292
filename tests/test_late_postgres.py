"""Late collections with two routers on one PostgreSQL journal: whoever finds the money,
it is refunded once, and each reminder is sent once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

import failover
from failover import ChannelResult, RefundState, RepaymentStatus
from failover.testing import (
    Collected,
    Collection,
    FakeClock,
    MemoryLedger,
    Refund,
    ScriptedChannel,
)

from .conftest import repayment
from .test_late import KEY, Events, net

Build = Callable[..., Any]


@pytest.fixture
async def routers(postgres_dsn: str, pg_schema: str) -> AsyncIterator[Build]:
    opened: list[failover.Router] = []

    async def build(name: str, channels: list[Any], config: failover.RouterConfig,
                    clock: FakeClock, hooks: list[Any] = ()) -> failover.Router:
        journal = failover.PostgresJournal(postgres_dsn, schema=pg_schema, instance=name,
                                           migrate=True)
        router = failover.Router(channels, journal, config, clock=clock, hooks=hooks,
                                 background=False)
        await router.open()
        opened.append(router)
        return router

    yield build
    for router in opened:
        await router.close(grace_s=0)


def config(**extra: Any) -> failover.RouterConfig:
    return failover.RouterConfig.model_validate({
        "channels": {name: {"settle_s": 0, "retry": {"max_attempts": 1}}
                     for name in ("card", "wallet")},
        "late": {"checks_s": [0, 3600]}, **extra})


def channels(ledger: MemoryLedger, card_steps: list[Any] = ()) -> list[ScriptedChannel]:
    """card and wallet on one ledger.  Given ``card_steps`` (the instance that drives),
    card's first status query says NOT_FOUND whatever happened (a gateway applying late);
    every other query, on any instance, answers from the ledger."""
    lie = [ChannelResult.not_found()] if card_steps else []
    return [ScriptedChannel("card", card_steps, queries=lie, ledger=ledger),
            ScriptedChannel("wallet", ledger=ledger)]


async def test_two_instances_sweeping_one_late_collection_refund_it_once(routers):
    ledger = MemoryLedger()
    clock = FakeClock()
    a_channels = channels(ledger, [Collected(ChannelResult.unknown("timeout"))])
    b_channels = channels(ledger)
    a = await routers("a", a_channels, config(), clock)
    b = await routers("b", b_channels, config(), clock)
    result = await a.repay(repayment())
    assert (RepaymentStatus.SUCCEEDED, "wallet") == (result.status, result.channel)
    assert 2 == net(ledger)

    await asyncio.gather(a.sweep(), b.sweep(), a.sweep(), b.sweep())
    await asyncio.gather(a.sweep(), b.sweep())

    assert 1 == net(ledger)
    calls = [r.reference for ch in a_channels + b_channels for r in ch.refund_requests]
    assert 1 == len(calls), calls
    [check] = (await b.get_late(KEY)).late
    assert RefundState.REFUNDED == check.refund


async def test_a_callback_on_one_instance_and_a_sweep_on_the_other_refund_once(routers):
    ledger = MemoryLedger()
    clock = FakeClock()
    a_channels = channels(ledger, [Collected(ChannelResult.unknown("timeout"))])
    b_channels = channels(ledger)
    a = await routers("a", a_channels, config(), clock)
    b = await routers("b", b_channels, config(), clock)
    await a.repay(repayment())
    reference = a_channels[0].requests[0].reference

    await asyncio.gather(
        b.notify("card", reference, ChannelResult.succeeded("card-1")), a.sweep(),
        b.notify("card", reference, ChannelResult.succeeded("card-1")))
    clock.advance(120)
    await asyncio.gather(a.sweep(), b.sweep())

    assert 1 == net(ledger)
    assert 1 == len(ledger.refunds())


async def test_a_failed_repayment_is_corrected_once_by_two_instances(routers):
    ledger = MemoryLedger()
    clock = FakeClock()
    events = Events()
    a_channels = [ScriptedChannel("card", [Collected(ChannelResult.unknown("timeout"))],
                                  queries=[ChannelResult.not_found()], ledger=ledger)]
    b_channels = [ScriptedChannel("card", ledger=ledger)]
    only_card = failover.RouterConfig.model_validate({
        "channels": {"card": {"settle_s": 0, "retry": {"max_attempts": 1}}},
        "late": {"checks_s": [0]}})
    a = await routers("a", a_channels, only_card, clock, [events])
    b = await routers("b", b_channels, only_card, clock, [events])
    assert RepaymentStatus.FAILED == (await a.repay(repayment())).status

    await asyncio.gather(a.sweep(), b.sweep(), a.sweep(), b.sweep())

    result = await b.get(KEY)
    assert (RepaymentStatus.SUCCEEDED, 1) == (result.status, len(result.corrections))
    assert 1 == len(events.named("failover.repayment.corrected"))
    assert 1 == net(ledger)
    assert [] == ledger.refunds()


async def test_two_instances_send_each_reminder_once(routers):
    clock = FakeClock()
    events = Events()
    reminders = config(reminders={"at_risk_s": [86400, 3600]})
    declines = [ChannelResult.declined("insufficient_funds")]
    a = await routers("a", [ScriptedChannel("card", declines), ScriptedChannel("wallet",
                                                                               declines)],
                      reminders, clock, [events])
    b = await routers("b", [ScriptedChannel("card"), ScriptedChannel("wallet")],
                      reminders, clock, [events])
    await a.repay(repayment(due_at=clock.now() + timedelta(hours=2)))

    await asyncio.gather(a.sweep(), b.sweep())
    clock.advance(3600 + 1)
    await asyncio.gather(a.sweep(), b.sweep(), a.sweep())

    assert [86400, 3600] == [e.threshold_s for e in events.named("failover.repayment.at_risk")]


class GatedCard:
    """An idempotent card channel whose submit waits at ``gate`` before it collects (a
    process paused between its lease check and its call), with refunds."""

    name = "card"
    idempotent = True

    def __init__(self, ledger: MemoryLedger) -> None:
        self.ledger = ledger
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def submit(self, request: failover.ChannelRequest) -> ChannelResult:
        self.entered.set()
        await self.gate.wait()
        self.ledger.record(Collection("card", request.reference, request.repayment_key,
                                      request.amount, "card-late"))
        return ChannelResult.succeeded("card-late")

    async def query(self, request: failover.ChannelRequest) -> ChannelResult:
        found = self.ledger.find("card", request.reference)
        return ChannelResult.not_found() if found is None \
            else ChannelResult.succeeded(found.channel_reference)

    async def refund(self, request: failover.ChannelRequest, channel_reference: str | None,
                     amount: Decimal) -> ChannelResult:
        if self.ledger.find_refund("card", request.reference) is None:
            collected = next(c for c in self.ledger.collections()
                             if c.channel_reference == channel_reference)
            self.ledger.record_refund(Refund("card", request.reference, collected.reference,
                                             request.repayment_key, amount))
        return ChannelResult.succeeded()


async def test_the_window_no_lease_closes_is_closed_by_the_sweep(
        routers, postgres_dsn, pg_schema):
    """A pauses with its call to card about to leave; its lease runs out; B takes over,
    asks card (NOT_FOUND: nothing arrived yet), fails over, wallet collects.  Then A's
    call lands and card collects too.  B's sweep finds it and refunds it: one net."""
    from .test_postgres import _expire_leases

    ledger = MemoryLedger()
    clock = FakeClock()
    card = GatedCard(ledger)
    a = await routers("a", [card, ScriptedChannel("wallet", ledger=ledger)], config(), clock)
    b = await routers("b", channels(ledger), config(), clock)
    caller = asyncio.ensure_future(a.repay(repayment()))
    await card.entered.wait()
    await _expire_leases(postgres_dsn, pg_schema)
    assert [KEY] == await b._journal.take_expired(10)
    taken = await b._executor.drive(None, b._channels.layout, KEY)
    assert (RepaymentStatus.SUCCEEDED, "wallet") == (taken.status, taken.channel)
    card.gate.set()  # A's call lands after all
    assert RepaymentStatus.SUCCEEDED == (await asyncio.wait_for(caller, 10)).status
    assert 2 == net(ledger)

    await b.sweep()

    assert 1 == net(ledger)
    [refund] = ledger.refunds()
    assert "card" == refund.channel
