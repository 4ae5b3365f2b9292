"""Eligibility rules and runtime reconfiguration, checked on the router with the fake clock."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal

import pytest

import failover
from failover import ChannelResult, Outcome, RepaymentStatus
from failover._eligibility import explain
from failover.testing import FakeClock, FaultProfile, MemoryLedger, ScriptedChannel, audit

from .conftest import fast, repayment

SHANGHAI_SUNDAY_0230 = datetime(2026, 12, 5, 18, 30, tzinfo=UTC)  # Sun 6 Dec 02:30 +08:00


def weekly(**window):
    return {"maintenance": [{"weekdays": ["sun"], "start": "02:00", "end": "04:00",
                             "timezone": "Asia/Shanghai", **window}]}


@pytest.mark.parametrize(
    ("amount", "currency", "order"),
    [
        ("2999.99", "USD", ["card", "any"]),
        ("3000.01", "USD", ["any"]),           # USD has its own, lower ceiling
        ("19999.00", "CNY", ["card", "any"]),  # CNY uses the general ceiling
        ("0.50", "CNY", ["any"]),              # below the general floor
        ("10.00", "EUR", ["any"]),             # currency not accepted
    ],
)
def test_per_currency_amount_limits(amount, currency, order):
    """General min/max apply unless the currency has its own bounds."""
    config = fast(card={"limits": {"currencies": ["CNY", "USD"], "min_amount": "1.00",
                                   "max_amount": "20000.00",
                                   "amounts": {"usd": {"max_amount": "3000.00"}}}})

    verdicts = explain(config, ["card", "any"], Decimal(amount), currency,
                       datetime(2026, 1, 1, tzinfo=UTC))

    assert order == [v.channel for v in verdicts if v.eligible]


def test_one_off_window_in_local_time():
    """A one-off window without an offset is read in its time zone; its end is excluded."""
    config = fast(card={"maintenance": [{"start": "2026-12-31T22:00:00",
                                         "end": "2027-01-01T02:00:00",
                                         "timezone": "Asia/Shanghai"}]})

    def eligible(moment: datetime) -> bool:
        return explain(config, ["card"], Decimal(1), "CNY", moment)[0].eligible

    assert eligible(datetime(2026, 12, 31, 13, 59, tzinfo=UTC))      # 21:59 Shanghai
    assert not eligible(datetime(2026, 12, 31, 14, 0, tzinfo=UTC))   # 22:00 Shanghai
    assert not eligible(datetime(2026, 12, 31, 17, 59, tzinfo=UTC))  # 01:59 Shanghai
    assert eligible(datetime(2026, 12, 31, 18, 0, tzinfo=UTC))       # 02:00 Shanghai


def test_reasons_are_reported_in_priority_order():
    """explain() lists every channel by priority with why it is skipped."""
    config = fast(a={"priority": 3, "enabled": False}, b={"priority": 1, **weekly()},
                  c={"priority": 2, "limits": {"max_amount": "10.00"}})

    verdicts = explain(config, ["a", "b", "c", "d"], Decimal("50.00"), "CNY",
                       SHANGHAI_SUNDAY_0230)

    assert [("b", "maintenance"), ("c", "limits"), ("a", "disabled"), ("d", None)] == [
        (v.channel, v.reason) for v in verdicts]


async def test_router_explains_with_breakers(make_router, clock):
    """Router.explain() adds breaker state to the configured rules."""
    a = ScriptedChannel("a", [ChannelResult.unavailable()])
    router = await make_router([a, ScriptedChannel("b")],
                               fast(a={"retry": {"max_attempts": 1}, "breaker": {"fail_max": 1}}))
    await router.repay(repayment(key="trip"))

    verdicts = router.explain(repayment(key="next"))

    assert [("a", "breaker_open"), ("b", None)] == [(v.channel, v.reason) for v in verdicts]


async def test_preference_order_meets_eligibility(make_router, clock):
    """A borrower's preferred channel in maintenance is skipped; the next preferred is used."""
    clock.set(SHANGHAI_SUNDAY_0230)
    wallet, card, debit = (ScriptedChannel(n) for n in ("wallet", "card", "debit"))
    router = await make_router([debit, card, wallet], fast(wallet=weekly()))

    result = await router.repay(repayment(), channels=["wallet", "card"])

    assert ("card", 0, 0) == (result.channel, wallet.submits, debit.submits)


async def test_code_map_reclassifies_provider_codes(make_router):
    """[channels.X.codes] turns a provider code into an outcome: '51' declined moves on."""
    primary = ScriptedChannel("primary", [ChannelResult.unknown("51", "insufficient funds")])
    backup = ScriptedChannel("backup")
    router = await make_router([primary, backup], fast(primary={"codes": {"51": "declined"}}))

    result = await router.repay(repayment())

    assert (Outcome.DECLINED, "backup") == (result.attempts[0].outcome, result.channel)
    assert 0 == len(primary.query_requests)


async def test_unmapped_codes_stay_unknown(make_router):
    """A code the map does not list keeps the conservative UNKNOWN: query, no failover."""
    primary = ScriptedChannel("primary", [ChannelResult.unknown("96", "system error")],
                              queries=[ChannelResult.unknown()] * 3)
    backup = ScriptedChannel("backup")
    router = await make_router([primary, backup], fast(primary={"codes": {"51": "declined"}}))

    result = await router.repay(repayment())

    assert (RepaymentStatus.PENDING, 0) == (result.status, backup.submits)


async def test_the_routers_own_timeout_is_never_remapped(make_router):
    """Mapping 'timeout' cannot turn the router's own timeout into a safe failover."""
    from failover.testing import HANG

    primary = ScriptedChannel("primary", [HANG], queries=[ChannelResult.unknown()] * 3)
    backup = ScriptedChannel("backup")
    router = await make_router([primary, backup],
                               fast(primary={"timeout_s": 0.02, "codes": {"timeout": "declined"}}))

    result = await router.repay(repayment())

    assert (RepaymentStatus.PENDING, 0) == (result.status, backup.submits)


async def test_reconfigure_under_load(journal):
    """Swapping priority while repayments are in flight: in-flight ones finish under the
    config they started with, new ones use the new order, nothing lost or collected twice."""
    clock, ledger = FakeClock(), MemoryLedger()
    gate = asyncio.Event()

    waiting, all_waiting = [], asyncio.Event()

    class Gated(failover.testing.SimulatedChannel):
        async def submit(self, request):
            waiting.append(request.repayment_key)
            if len(waiting) == 100:
                all_waiting.set()
            await gate.wait()
            return await super().submit(request)

    a = Gated("a", FaultProfile(unavailable=1.0), seed=1, clock=clock, ledger=ledger)
    b = failover.testing.SimulatedChannel("b", seed=2, clock=clock, ledger=ledger)
    c = failover.testing.SimulatedChannel("c", seed=3, clock=clock, ledger=ledger)
    never_trip = {"breaker": {"fail_max": 10_000}, "retry": {"max_attempts": 1}}
    old = fast(a={"priority": 1, **never_trip}, b={"priority": 2}, c={"priority": 3})
    new = fast(a={"priority": 3, **never_trip}, b={"priority": 2}, c={"priority": 1})
    async with failover.Router([a, b, c], journal, old, clock=clock) as router:
        in_flight = [asyncio.create_task(router.repay(repayment(key=f"old-{i}")))
                     for i in range(100)]
        await asyncio.wait_for(all_waiting.wait(), 10)  # all 100 wait inside channel a
        router.reconfigure(new)
        fresh = await asyncio.gather(*(router.repay(repayment(key=f"new-{i}"))
                                       for i in range(100)))
        gate.set()
        started = await asyncio.gather(*in_flight)
        final = {r.key: await router.get(r.key) for r in [*started, *fresh]}

    # In flight: a failed, and the old order sent them on to b (the new order says c).
    assert {("a", "b")} == {tuple(x.channel for x in r.attempts) for r in started}
    assert {("c",)} == {tuple(x.channel for x in r.attempts) for r in fresh}
    outcome = audit(final, [ledger])
    assert outcome.ok
    assert 200 == outcome.succeeded


async def test_reconfigure_refuses_unknown_channels(make_router):
    """reconfigure() with a config naming a channel the router lacks raises and changes nothing."""
    router = await make_router([ScriptedChannel("a"), ScriptedChannel("b")],
                               fast(a={"priority": 2}, b={"priority": 1}))

    with pytest.raises(failover.ConfigError, match="ghost"):
        router.reconfigure(fast(ghost={"priority": 1}))

    assert ("b", "a") == router.channel_names


def test_blocking_router_reconfigures(tmp_path):
    """BlockingRouter.reconfigure swaps the order too."""
    a, b = ScriptedChannel("a"), ScriptedChannel("b")
    with failover.BlockingRouter([a, b], failover.SQLiteJournal(tmp_path / "j.db")) as router:
        first = router.repay(repayment(key="1"))
        router.reconfigure(fast(b={"priority": 1}))
        second = router.repay(repayment(key="2"))

    assert ("a", "b") == (first.channel, second.channel)
