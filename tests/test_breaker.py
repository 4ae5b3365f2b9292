"""Circuit breakers: pybreaker driven through calling(), one trial while half-open."""

from __future__ import annotations

import asyncio

from failover import ChannelResult, RepaymentStatus
from failover._policy import Breaker
from failover.config import BreakerConfig
from failover.events import RecordingHook
from failover.testing import FakeClock, ScriptedChannel

from .conftest import fast, repayment


def one_try(**breaker) -> dict:
    return {"retry": {"max_attempts": 1}, "breaker": breaker}


async def test_open_breaker_skips_channel_without_call_or_wait(make_router, clock):
    """An open breaker skips its channel at once: no call, no sleep."""
    primary = ScriptedChannel("primary", [ChannelResult.unavailable()] * 2)
    backup = ScriptedChannel("backup")
    router = await make_router([primary, backup], fast(primary=one_try(fail_max=2)))
    await router.repay(repayment(key="a"))
    await router.repay(repayment(key="b"))
    sleeps_before = len(clock.sleeps)

    result = await router.repay(repayment(key="c"))

    assert "open" == router.breaker("primary").state
    assert (2, "backup") == (primary.submits, result.channel)
    assert sleeps_before == len(clock.sleeps)


async def test_breaker_half_opens_after_reset_timeout_on_injected_clock(make_router, clock):
    """After reset_timeout_s on the router's clock one trial call goes through and closes it."""
    primary = ScriptedChannel("primary", [ChannelResult.unavailable()])
    backup = ScriptedChannel("backup")
    config = fast(primary=one_try(fail_max=1, reset_timeout_s=30))
    router = await make_router([primary, backup], config)
    await router.repay(repayment(key="a"))
    clock.advance(29)
    await router.repay(repayment(key="b"))
    clock.advance(1)

    result = await router.repay(repayment(key="c"))

    assert (2, "primary", "closed") == (primary.submits, result.channel,
                                        router.breaker("primary").state)


async def test_failed_trial_reopens(make_router, clock):
    """A failed trial call opens the breaker again for another reset_timeout_s."""
    primary = ScriptedChannel("primary", [ChannelResult.unavailable()] * 2)
    backup = ScriptedChannel("backup")
    router = await make_router([primary, backup], fast(primary=one_try(fail_max=1)))
    await router.repay(repayment(key="a"))
    clock.advance(30)

    await router.repay(repayment(key="b"))

    assert ("open", 2) == (router.breaker("primary").state, primary.submits)


async def test_exactly_one_trial_call_while_half_open(make_router, clock):
    """While half-open, concurrent repayments let exactly one call through."""
    gate = asyncio.Event()

    class Gated(ScriptedChannel):
        async def submit(self, request):
            if self.submits >= 1:
                await gate.wait()
            return await super().submit(request)

    primary = Gated("primary", [ChannelResult.unavailable()])
    backup = ScriptedChannel("backup")
    router = await make_router([primary, backup], fast(primary=one_try(fail_max=1)))
    await router.repay(repayment(key="trip"))
    clock.advance(30)

    tasks = [asyncio.create_task(router.repay(repayment(key=f"k{i}"))) for i in range(10)]
    nine_done = asyncio.Event()
    for task in tasks:
        task.add_done_callback(
            lambda _: nine_done.set() if sum(t.done() for t in tasks) >= 9 else None)
    await asyncio.wait_for(nine_done.wait(), 10)  # the trial waits at the gate, the rest moved on
    gate.set()
    results = await asyncio.gather(*tasks)

    assert 2 == primary.submits  # the tripping call and the single trial
    assert 1 == sum(r.channel == "primary" for r in results)
    assert all(r.status is RepaymentStatus.SUCCEEDED for r in results)


async def test_declines_and_rejections_do_not_trip(make_router):
    """DECLINED and REJECTED are the channel working: the breaker stays closed."""
    primary = ScriptedChannel("primary", [ChannelResult.declined()] * 5
                              + [ChannelResult.rejected()] * 5)
    router = await make_router([primary, ScriptedChannel("backup")],
                               fast(primary=one_try(fail_max=3)))

    for i in range(10):
        await router.repay(repayment(key=f"k{i}"))

    assert ("closed", 10) == (router.breaker("primary").state, primary.submits)


async def test_queries_bypass_an_open_breaker(make_router):
    """A status query is made even while the channel's breaker is open, and never trips it."""
    primary = ScriptedChannel("primary", [ChannelResult.unknown("timeout")],
                              queries=[ChannelResult.unknown()] * 3)
    backup = ScriptedChannel("backup")
    router = await make_router([primary, backup], fast(primary=one_try(fail_max=1)))
    await router.repay(repayment())
    assert "open" == router.breaker("primary").state

    [result] = await router.reconcile()

    # Three inconclusive answers, one NOT_FOUND too soon after the submit, one after settle_s.
    assert 5 == len(primary.query_requests)
    assert (RepaymentStatus.SUCCEEDED, "backup") == (result.status, result.channel)


def test_cancelled_call_counts_neither_way():
    """A released permit (cancelled call) leaves the failure count and the trial slot alone."""
    clock = FakeClock()
    breaker = Breaker("b", BreakerConfig(fail_max=2, reset_timeout_s=5), clock)
    breaker.record(breaker.acquire(), failed=True)
    permit = breaker.acquire()

    breaker.release(permit)

    assert (1, "closed") == (breaker.fail_counter, breaker.state)


def test_cancelled_trial_frees_the_slot_and_keeps_half_open():
    """A cancelled trial call lets the next caller be the trial; the breaker stays half-open."""
    clock = FakeClock()
    breaker = Breaker("b", BreakerConfig(fail_max=1, reset_timeout_s=5), clock)
    breaker.record(breaker.acquire(), failed=True)
    clock.advance(5)
    trial = breaker.acquire()
    assert breaker.acquire() is None

    breaker.release(trial)

    assert "half-open" == breaker.state
    assert breaker.acquire() is not None


def test_breaker_events():
    """Transitions are emitted as failover.breaker.* events."""
    clock, hook = FakeClock(), RecordingHook()
    breaker = Breaker("card", BreakerConfig(fail_max=1, reset_timeout_s=5), clock, [hook])
    breaker.record(breaker.acquire(), failed=True)
    clock.advance(5)
    breaker.record(breaker.acquire(), failed=False)

    assert ["failover.breaker.opened", "failover.breaker.half_opened",
            "failover.breaker.closed"] == [e.name for e in hook.events]
