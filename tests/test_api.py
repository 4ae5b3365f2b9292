"""The API promises of DESIGN §2 and its "Decisions the contract makes"."""

from __future__ import annotations

import asyncio
import threading
from decimal import Decimal

import pydantic
import pytest

import failover
from failover import (
    ChannelResult,
    ConfigError,
    IdempotencyConflict,
    Outcome,
    RepaymentStatus,
)
from failover.testing import HANG, FakeClock, ScriptedChannel

from .conftest import fast, repayment


async def test_same_key_twice_returns_the_first_result_without_collecting_again(make_router):
    """A second repay() of a finished key returns its result; nothing is collected again."""
    primary = ScriptedChannel("primary")
    router = await make_router([primary])

    first = await router.repay(repayment())
    second = await router.repay(repayment())

    assert first == second
    assert (1, 1) == (primary.submits, len(primary.ledger.collections()))


async def test_concurrent_same_key_calls_join_one_repayment(make_router):
    """Same-key repay() calls in one process join the one in flight."""
    primary = ScriptedChannel("primary")
    router = await make_router([primary])

    results = await asyncio.gather(*(router.repay(repayment()) for _ in range(20)))

    assert 1 == len({(r.status, r.channel_reference) for r in results})
    assert (1, 1) == (primary.submits, len(primary.ledger.collections()))


@pytest.mark.parametrize(
    ("change", "field"),
    [({"amount": "99.00"}, "amount"), ({"currency": "USD"}, "currency"),
     ({"account": "borrower-10"}, "account")],
)
async def test_same_key_with_other_money_is_an_idempotency_conflict(make_router, change, field):
    """The same key with another account, amount or currency raises IdempotencyConflict."""
    primary = ScriptedChannel("primary")
    router = await make_router([primary])
    await router.repay(repayment())

    with pytest.raises(IdempotencyConflict) as caught:
        await router.repay(repayment(**change))

    assert (field, "loan-42/instalment-7") == (caught.value.field, caught.value.key)
    assert 1 == primary.submits


async def test_conflict_message_does_not_show_accounts(make_router):
    """An account conflict names the field but masks both account numbers."""
    router = await make_router([ScriptedChannel("primary")])
    await router.repay(repayment())

    with pytest.raises(IdempotencyConflict) as caught:
        await router.repay(repayment(account="6222029999999999"))

    assert "6222029999999999" not in str(caught.value)
    assert "6222021234567890" not in str(caught.value)


async def test_preference_order_restricts_and_orders(make_router):
    """repay(channels=[...]) uses only those channels, in that order."""
    a, b, c = (ScriptedChannel(n, [ChannelResult.declined()]) for n in ("a", "b", "c"))
    router = await make_router([a, b, c])

    result = await router.repay(repayment(), channels=["c", "a"])

    assert ["c", "a"] == [attempt.channel for attempt in result.attempts]
    assert (RepaymentStatus.FAILED, 0) == (result.status, b.submits)


async def test_preference_with_unknown_channel_is_a_config_error_and_writes_nothing(make_router):
    """An unknown channel name raises ConfigError before anything is journaled."""
    router = await make_router([ScriptedChannel("a")])

    with pytest.raises(ConfigError, match="'wallet'"):
        await router.repay(repayment(), channels=["a", "wallet"])

    assert await router.get(repayment().key) is None


async def test_preference_skips_ineligible_channel(make_router):
    """A preferred channel that is ineligible now is skipped as usual."""
    a, b = ScriptedChannel("a"), ScriptedChannel("b")
    router = await make_router([a, b], fast(b={"enabled": False}))

    result = await router.repay(repayment(), channels=["b", "a"])

    assert ("a", 0) == (result.channel, b.submits)


class SyncCard:
    """An adapter written with plain def methods."""

    name = "sync_card"
    idempotent = True

    def __init__(self) -> None:
        self.threads: list[str] = []

    def submit(self, request: failover.ChannelRequest) -> failover.ChannelResult:
        self.threads.append(threading.current_thread().name)
        return ChannelResult.succeeded(f"card-{request.reference}")

    def query(self, request: failover.ChannelRequest) -> failover.ChannelResult:
        return ChannelResult.not_found()


async def test_sync_adapter_runs_in_a_worker_thread(make_router):
    """A plain-def adapter works and does not run on the event loop's thread."""
    card = SyncCard()
    router = await make_router([card])

    result = await router.repay(repayment())

    assert (RepaymentStatus.SUCCEEDED, "sync_card") == (result.status, result.channel)
    assert threading.current_thread().name not in card.threads


def test_blocking_router(tmp_path):
    """BlockingRouter offers the same operations without await."""
    primary = ScriptedChannel("primary", [ChannelResult.unknown("timeout")],
                              queries=[ChannelResult.unknown()] * 3)
    backup = ScriptedChannel("backup")
    with failover.BlockingRouter([primary, backup], failover.SQLiteJournal(tmp_path / "j.db"),
                                 clock=FakeClock()) as router:
        pending = router.repay(repayment())
        [reconciled] = router.reconcile()
        fetched = router.get(repayment().key)

    assert RepaymentStatus.PENDING == pending.status
    assert (RepaymentStatus.SUCCEEDED, "backup") == (reconciled.status, reconciled.channel)
    assert reconciled == fetched
    assert 1 == len(backup.ledger.collections())


@pytest.mark.parametrize(
    ("fields", "bad_field"),
    [
        ({"amount": "0"}, "amount"),
        ({"amount": "-5.00"}, "amount"),
        ({"amount": "10.001"}, "amount"),
        ({"amount": "10.5", "currency": "JPY"}, "amount"),
        ({"currency": "XYZ"}, "currency"),
        ({"key": ""}, "key"),
        ({"account": ""}, "account"),
        ({"amount": 10.5}, "amount"),
        ({"due_at": "2026-01-01T00:00:00"}, "due_at"),
    ],
)
def test_bad_repayment_is_rejected_naming_the_field(fields, bad_field):
    """Invalid repayments raise ValidationError naming the field."""
    with pytest.raises(pydantic.ValidationError) as caught:
        repayment(**fields)

    assert [(bad_field,)] == [e["loc"] for e in caught.value.errors()]


@pytest.mark.parametrize(
    ("amount", "currency"), [("1250", "JPY"), ("12.345", "KWD"), ("0.01", "CNY")]
)
def test_minor_units_follow_iso_4217(amount, currency):
    """Amounts may have as many places as the currency's minor units."""
    assert Decimal(amount) == repayment(amount=amount, currency=currency).amount


async def test_bad_input_writes_nothing(make_router, journal):
    """A repay() that fails validation leaves the journal empty."""
    router = await make_router([ScriptedChannel("primary")])

    with pytest.raises(TypeError):
        await router.repay({"key": "k", "amount": "1"})  # type: ignore[arg-type]

    stats = await journal.stats()
    assert 0 == sum(stats.by_status.values())


async def test_repr_masks_the_account():
    """Repayment and ChannelRequest reprs never show the full account number."""
    rep = repayment()
    request = failover.ChannelRequest("k", "ref", rep.account, rep.amount, "CNY")

    assert "6222021234567890" not in repr(rep)
    assert "6222021234567890" not in repr(request)
    assert "7890" == request.masked_account[-4:]


async def test_cancelling_the_caller_does_not_cancel_the_repayment(make_router):
    """Cancelling repay() stops the wait; the repayment carries on and a later repay sees it."""
    release, entered = asyncio.Event(), asyncio.Event()

    class Slow(ScriptedChannel):
        async def submit(self, request):
            entered.set()
            await release.wait()
            return await super().submit(request)

    slow = Slow("slow")
    router = await make_router([slow])
    caller = asyncio.create_task(router.repay(repayment()))
    await asyncio.wait_for(entered.wait(), 10)  # the channel call is under way
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    release.set()

    result = await router.repay(repayment())

    assert (RepaymentStatus.SUCCEEDED, 1) == (result.status, len(slow.ledger.collections()))


async def test_closing_the_router_mid_call_leaves_it_for_recovery(make_router, journal):
    """Closing cancels work in flight without counting it against the breaker; the
    next open queries the attempt and finishes the repayment."""
    entered = asyncio.Event()

    class Hanging(ScriptedChannel):
        async def submit(self, request):
            entered.set()
            return await super().submit(request)

    hanging = Hanging("primary", [HANG])
    router = await make_router([hanging])
    caller = asyncio.create_task(router.repay(repayment()))
    await asyncio.wait_for(entered.wait(), 10)  # the call is in the air

    await router.close(grace_s=0)
    with pytest.raises(failover.RouterClosedError):
        await caller
    stored_before = await _load(journal, repayment().key)

    assert 0 == router.breaker("primary").fail_counter
    assert stored_before.attempts[0].outcome is None  # left "sent"
    reopened = await make_router([hanging], journal=journal)
    await reopened.wait_recovered()
    result = await reopened.get(repayment().key)
    # Asked at once, then again once settle_s had passed: only that NOT_FOUND is proof.
    assert 2 == len(hanging.query_requests)
    assert Outcome.NOT_FOUND == result.attempts[0].resolution


async def _load(journal, key):
    await journal.open()
    record = await journal.load(key)
    await journal.close()
    return record


async def test_router_timeout_is_unknown(make_router):
    """The router's own per-call timeout makes the outcome UNKNOWN (then queried)."""
    primary = ScriptedChannel("primary", [HANG])
    backup = ScriptedChannel("backup")
    router = await make_router([primary, backup], fast(primary={"timeout_s": 0.05}))

    result = await router.repay(repayment())

    assert (Outcome.UNKNOWN, "timeout") == (result.attempts[0].outcome, result.attempts[0].code)
    # The NOT_FOUND asked at once is not proof; the one asked after settle_s is.
    assert (2, "backup") == (len(primary.query_requests), result.channel)


async def test_retry_starts_a_new_round_with_new_references(make_router):
    """retry(key) of a FAILED repayment starts a new round with new channel references."""
    card = ScriptedChannel("card", [ChannelResult.declined("insufficient_funds")], idempotent=True)
    router = await make_router([card])
    failed = await router.repay(repayment())

    again = await router.retry(repayment().key)

    assert (RepaymentStatus.FAILED, RepaymentStatus.SUCCEEDED) == (failed.status, again.status)
    assert (1, 2) == (failed.round, again.round)
    assert card.requests[0].reference != card.requests[1].reference
    assert 1 == len(card.ledger.collections())


async def test_repay_of_a_failed_key_returns_the_failure(make_router):
    """repay() of a FAILED key returns that result; only retry() starts a new round."""
    card = ScriptedChannel("card", [ChannelResult.declined()])
    router = await make_router([card])
    failed = await router.repay(repayment())

    again = await router.repay(repayment())

    assert failed == again
    assert 1 == card.submits


async def test_succeeded_is_final_even_for_retry(make_router):
    """retry() of a SUCCEEDED repayment changes nothing and collects nothing."""
    card = ScriptedChannel("card")
    router = await make_router([card])
    done = await router.repay(repayment())

    again = await router.retry(repayment().key)

    assert done == again
    assert 1 == card.submits


async def test_retry_of_unknown_key_raises(make_router):
    """retry() of a key the journal does not hold raises UnknownRepayment."""
    router = await make_router([ScriptedChannel("card")])

    with pytest.raises(failover.UnknownRepayment):
        await router.retry("nope")


async def test_no_eligible_channel(make_router):
    """All channels ineligible: FAILED with code no_eligible_channel, nothing collected."""
    a, b = ScriptedChannel("a"), ScriptedChannel("b")
    config = fast(a={"enabled": False}, b={"limits": {"max_amount": "100.00"}})
    router = await make_router([a, b], config)

    result = await router.repay(repayment(amount="1250.00"))

    assert (RepaymentStatus.FAILED, "no_eligible_channel") == (result.status, result.code)
    assert (0, 0) == (a.submits, b.submits)


async def test_deadline_fails_when_nothing_is_in_doubt(make_router, clock):
    """When deadline_s expires with nothing in doubt no new channel starts: FAILED (deadline)."""

    class SlowDown(ScriptedChannel):
        async def submit(self, request):
            clock.advance(20)
            return await super().submit(request)

    a = SlowDown("a", [ChannelResult.unavailable()])
    b = SlowDown("b", [ChannelResult.unavailable()])
    c = ScriptedChannel("c")
    config = failover.RouterConfig.model_validate({
        "deadline_s": 30,
        "channels": {n: {"retry": {"max_attempts": 1}} for n in ("a", "b", "c")},
    })
    router = await make_router([a, b, c], config)

    result = await router.repay(repayment())

    assert (RepaymentStatus.FAILED, "deadline") == (result.status, result.code)
    assert (1, 1, 0) == (a.submits, b.submits, c.submits)


async def test_retry_budget_stops_retries(make_router):
    """With an empty retry budget a failing channel gets one call, not max_attempts."""
    primary = ScriptedChannel("primary", [ChannelResult.unavailable()] * 3)
    backup = ScriptedChannel("backup")
    config = failover.RouterConfig.model_validate(
        {"retry_budget": {"ratio": 0, "min_per_s": 0}}
    )
    router = await make_router([primary, backup], config)

    result = await router.repay(repayment())

    assert (1, "backup") == (primary.submits, result.channel)


async def test_retry_budget_allows_a_share_of_traffic(make_router):
    """The budget lets retries through up to ratio x calls."""
    primary = ScriptedChannel("primary", [ChannelResult.unavailable()] * 1000)
    backup = ScriptedChannel("backup")
    config = failover.RouterConfig.model_validate({
        "retry_budget": {"ratio": 0.25, "min_per_s": 0},
        "channels": {"primary": {"retry": {"max_attempts": 2}, "breaker": {"fail_max": 1000}},
                     "backup": {"retry": {"max_attempts": 2}}},
    })
    router = await make_router([primary, backup], config)

    for i in range(20):
        await router.repay(repayment(key=f"k{i}"))

    # Before repayment i there were 2(i-1) calls; a retry needs retries < 0.25 x calls,
    # so every second repayment gets its retry: 20 first calls + 10 retries.
    assert 20 + 10 == primary.submits
    assert 20 == backup.submits


async def test_unknown_channel_in_config_is_an_error():
    """A config naming a channel the router lacks raises ConfigError."""
    with pytest.raises(ConfigError, match="wallet"):
        failover.Router([ScriptedChannel("card")], failover.MemoryJournal(),
                        fast(wallet={"priority": 1}))


def test_a_router_needs_a_channel():
    """A router without channels is a configuration error, not a router that fails everything."""
    with pytest.raises(ConfigError, match="at least one channel"):
        failover.Router([], failover.MemoryJournal())


async def test_config_priority_orders_channels():
    """Lower priority runs first; unconfigured channels follow in the order given."""
    channels = [ScriptedChannel(n) for n in ("a", "b", "c", "d")]
    router = failover.Router(channels, failover.MemoryJournal(),
                             fast(c={"priority": 1}, b={"priority": 2}))

    assert ("c", "b", "a", "d") == router.channel_names


async def test_router_must_be_open():
    """Using a router outside 'async with' raises RouterClosedError."""
    router = failover.Router([ScriptedChannel("a")], failover.MemoryJournal())

    with pytest.raises(failover.RouterClosedError):
        await router.repay(repayment())


async def test_concurrent_reconciles(make_router):
    """Two reconcile() calls at once each finish (and settle the pending repayment once)."""
    primary = ScriptedChannel("primary", [ChannelResult.unknown("timeout")],
                              queries=[ChannelResult.unknown()] * 3)
    backup = ScriptedChannel("backup")
    router = await make_router([primary, backup])
    await router.repay(repayment())

    first, second = await asyncio.gather(router.reconcile(), router.reconcile())
    empty_a, empty_b = await asyncio.gather(router.reconcile(), router.reconcile())

    assert [RepaymentStatus.SUCCEEDED] == [r.status for r in first + second][:1]
    assert ([], []) == (empty_a, empty_b)
    assert 1 == len(backup.ledger.collections())
