"""Money that arrives late is found and made right (DESIGN §4, invariant 4).

Every test checks the channels' ledgers (what was really collected and given back),
not the router's own bookkeeping."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

import failover
from failover import (
    CallbackRejected,
    ChannelResult,
    LateState,
    RefundState,
    RepaymentStatus,
    UnknownReference,
)
from failover.testing import (
    HANG,
    Collected,
    FakeClock,
    MemoryLedger,
    ScriptedChannel,
    SimulatedChannel,
    assert_invariants,
    audit,
)
from tests.conftest import repayment

KEY = "loan-42/instalment-7"


def late_config(**channels: dict[str, Any]) -> failover.RouterConfig:
    """Every channel trusts NOT_FOUND at once; late checks right after the ending and
    an hour later; no retries (each script step is one call)."""
    settings = {name: {"settle_s": 0, "retry": {"max_attempts": 1}, **extra}
                for name, extra in channels.items()}
    return failover.RouterConfig.model_validate(
        {"channels": settings, "late": {"checks_s": [0, 3600]}})


def net(ledger: MemoryLedger, key: str = KEY) -> int:
    """Collections minus refunds of ``key``, from the ledger alone."""
    return (sum(1 for c in ledger.collections() if c.repayment_key == key)
            - sum(1 for r in ledger.refunds() if r.repayment_key == key))


def manual_keys(checks: list[failover.LateCheck]) -> list[str]:
    return [c.key for c in checks if c.refund is RefundState.MANUAL]


class Events:
    def __init__(self) -> None:
        self.seen: list[failover.events.Event] = []

    def __call__(self, event: failover.events.Event) -> None:
        self.seen.append(event)

    def named(self, name: str) -> list[Any]:
        return [e for e in self.seen if e.name == name]


async def lost_then_failed_over(make_router: Any, *, refunds: Any = (),
                                hooks: Events | None = None) -> tuple[Any, ...]:
    """card collects but answers a timeout, and its status query says NOT_FOUND (a
    gateway that applies late): the router fails over and wallet collects too."""
    ledger = MemoryLedger()
    card = ScriptedChannel("card", [Collected(ChannelResult.unknown("timeout"))],
                           queries=[ChannelResult.not_found()], refunds=refunds, ledger=ledger)
    wallet = ScriptedChannel("wallet", ledger=ledger)
    router = await make_router([card, wallet], late_config(card={}, wallet={}),
                               hooks=[hooks] if hooks else ())
    result = await router.repay(repayment())
    assert (RepaymentStatus.SUCCEEDED, "wallet") == (result.status, result.channel)
    assert 2 == net(ledger)  # the duplicate the sweep must reverse
    return router, card, wallet, ledger


async def test_a_late_collection_on_a_losing_channel_is_found_and_refunded(make_router):
    events = Events()
    router, card, _, ledger = await lost_then_failed_over(make_router, hooks=events)

    await router.sweep()

    assert 1 == net(ledger)
    [refund] = ledger.refunds()
    assert ("card", card.requests[0].reference) == (refund.channel, refund.reference)
    assert ["card"] == [e.channel for e in events.named("failover.collection.late")]
    assert ["card"] == [e.channel for e in events.named("failover.refund.issued")]
    stored = await router.get_late(KEY)
    assert (RepaymentStatus.SUCCEEDED, "wallet") == (stored.status, stored.channel)
    [check] = stored.late
    assert (LateState.COLLECTED, RefundState.REFUNDED, "query") == (
        check.state, check.refund, check.found_by)

    await router.sweep()  # nothing is refunded twice
    assert 1 == len(ledger.refunds())


async def test_a_channel_without_refund_puts_the_case_on_the_manual_list(make_router):
    events = Events()
    router, _, _, ledger = await lost_then_failed_over(make_router, refunds=False,
                                                          hooks=events)

    await router.sweep()
    await router.sweep()

    assert 2 == net(ledger)  # nobody can give it back but a person
    assert [] == ledger.refunds()
    manual = await router._journal.late_checks(refund=RefundState.MANUAL)
    assert [KEY] == manual_keys(manual)
    assert "no_refund_capability" == manual[0].refund_code
    assert [KEY] == [e.key for e in events.named("failover.refund.manual")]
    assert_invariants(audit({KEY: await router.get(KEY)}, [ledger], manual=[KEY]))


async def test_a_refund_the_channel_refuses_goes_to_the_manual_list(make_router):
    router, _, _, ledger = await lost_then_failed_over(
        make_router, refunds=[ChannelResult.declined("refund_window_closed")])

    await router.sweep()

    [check] = await router._journal.late_checks(KEY)
    assert (RefundState.MANUAL, "refund_window_closed") == (check.refund, check.refund_code)
    assert 2 == net(ledger)


async def test_an_unknown_refund_answer_is_resolved_by_query_and_never_sent_twice(
        make_router, clock):
    """The refund applies but its answer is lost: the next sweep asks (query_refund),
    finds it applied, and sends nothing more."""
    router, card, _, ledger = await lost_then_failed_over(
        make_router, refunds=[Collected(ChannelResult.unknown("timeout"))])

    await router.sweep()
    [check] = await router._journal.late_checks(KEY)
    assert RefundState.UNKNOWN == check.refund
    assert 1 == net(ledger)

    clock.advance(61)  # the retry is due
    await router.sweep()

    [check] = await router._journal.late_checks(KEY)
    assert RefundState.REFUNDED == check.refund
    assert 1 == len(card.refund_requests)  # asked by query, not sent again
    assert 1 == len(ledger.refunds())


async def test_a_lost_refund_is_sent_again_under_the_same_reference(make_router, clock):
    """The refund's answer is lost and it did not apply: sent again under the same
    reference, so a channel that did apply it the first time would not apply it twice."""
    router, card, _, ledger = await lost_then_failed_over(
        make_router, refunds=[ChannelResult.unknown("timeout")])

    await router.sweep()
    clock.advance(61)
    await router.sweep()

    assert 1 == net(ledger)
    first, second = card.refund_requests
    assert first.reference == second.reference


async def test_a_failed_repayment_whose_money_arrived_late_is_corrected(make_router):
    """The borrower paid: FAILED becomes SUCCEEDED through a correction that keeps the
    old ending; nothing is refunded (it is the only collection)."""
    events = Events()
    ledger = MemoryLedger()
    card = ScriptedChannel("card", [Collected(ChannelResult.unknown("timeout"))],
                           queries=[ChannelResult.not_found()], ledger=ledger)
    router = await make_router([card], late_config(card={}), hooks=[events])
    failed = await router.repay(repayment())
    assert RepaymentStatus.FAILED == failed.status

    await router.sweep()

    result = await router.get(KEY)
    assert (RepaymentStatus.SUCCEEDED, "card") == (result.status, result.channel)
    [correction] = result.corrections
    assert (RepaymentStatus.FAILED, failed.code, RepaymentStatus.SUCCEEDED, "query") == (
        correction.old_status, correction.old_code, correction.new_status,
        correction.evidence)
    assert [] == ledger.refunds()
    assert [(KEY, "failed", "succeeded")] == [
        (e.key, e.old_status, e.new_status) for e in events.named("failover.repayment.corrected")]
    assert_invariants(audit({KEY: result}, [ledger]))


async def test_a_retry_that_collected_again_is_the_collection_refunded(make_router):
    """Round 1 failed but its money arrived later; retry() meanwhile collected in round 2.
    The later collection (round 2's) is refunded and the ending rests on round 1's."""
    ledger = MemoryLedger()
    card = ScriptedChannel("card", [Collected(ChannelResult.unknown("timeout")),
                                    ChannelResult.succeeded("card-2")],
                           queries=[ChannelResult.not_found()], ledger=ledger)
    router = await make_router([card], late_config(card={}))
    assert RepaymentStatus.FAILED == (await router.repay(repayment())).status
    second = await router.retry(KEY)
    assert (RepaymentStatus.SUCCEEDED, 2) == (second.status, second.round)
    assert 2 == net(ledger)

    await router.sweep()
    await router.sweep()

    assert 1 == net(ledger)
    [refund] = ledger.refunds()
    assert card.requests[1].reference == refund.reference  # round 2's
    result = await router.get(KEY)
    assert card.requests[0].reference == result.corrections[-1].reference
    assert RepaymentStatus.SUCCEEDED == result.status


async def test_nothing_is_found_and_nothing_is_done_when_nothing_arrived(make_router, clock):
    """A NOT_FOUND that was true: re-queried on schedule, then no longer watched."""
    ledger = MemoryLedger()
    card = ScriptedChannel("card", [ChannelResult.unknown("timeout")], ledger=ledger)
    wallet = ScriptedChannel("wallet", ledger=ledger)
    router = await make_router([card, wallet], late_config(card={}, wallet={}))
    await router.repay(repayment())

    await router.sweep()
    [check] = await router._journal.late_checks(KEY)
    assert (LateState.WATCHING, 1) == (check.state, check.checks)
    clock.advance(3600)
    await router.sweep()

    [check] = await router._journal.late_checks(KEY)
    assert (LateState.CLEARED, None) == (check.state, check.next_at)
    assert 3 == len(card.query_requests)  # once in the pass, twice on schedule
    assert 1 == net(ledger)
    assert [] == ledger.refunds()


async def test_a_clean_success_is_not_watched(make_router):
    card = ScriptedChannel("card")
    router = await make_router([card], late_config(card={}))
    await router.repay(repayment())

    assert [] == await router._journal.watched(10)
    await router.sweep()
    assert [] == await router._journal.late_checks()
    assert [] == card.query_requests


# ---- provider callbacks -------------------------------------------------------------


async def test_a_callback_settles_an_attempt_in_doubt_at_once(make_router):
    """The submit timed out and the query proved nothing: the repayment waits PENDING.
    The provider's callback says SUCCEEDED: it ends SUCCEEDED at once, with no failover."""
    ledger = MemoryLedger()
    card = ScriptedChannel("card", [Collected(ChannelResult.unknown("timeout"))],
                           queries=[ChannelResult.unknown("query_timeout")] * 3, ledger=ledger)
    wallet = ScriptedChannel("wallet", ledger=ledger)
    router = await make_router([card, wallet], late_config(card={}, wallet={}))
    pending = await router.repay(repayment())
    assert RepaymentStatus.PENDING == pending.status

    result = await router.notify("card", card.requests[0].reference,
                                 ChannelResult.succeeded("card-cb"))

    assert (RepaymentStatus.SUCCEEDED, "card", "card-cb") == (
        result.status, result.channel, result.channel_reference)
    assert [] == wallet.requests
    again = await router.notify("card", card.requests[0].reference,
                                ChannelResult.succeeded("card-cb"))  # idempotent
    assert (RepaymentStatus.SUCCEEDED, ()) == (again.status, again.corrections)
    await router.sweep()
    assert 1 == net(ledger)
    assert [] == ledger.refunds()


async def test_a_declining_callback_lets_the_router_fail_over(make_router):
    ledger = MemoryLedger()
    card = ScriptedChannel("card", [ChannelResult.unknown("timeout")],
                           queries=[ChannelResult.unknown("query_timeout")] * 3, ledger=ledger)
    wallet = ScriptedChannel("wallet", ledger=ledger)
    router = await make_router([card, wallet], late_config(card={}, wallet={}))
    await router.repay(repayment())

    result = await router.notify("card", card.requests[0].reference,
                                 ChannelResult.declined("insufficient_funds"))

    assert (RepaymentStatus.SUCCEEDED, "wallet") == (result.status, result.channel)
    assert 1 == net(ledger)


async def test_a_callback_after_the_ending_is_a_late_collection(make_router):
    """The provider tells of a collection the router had settled as NOT_FOUND: refunded."""
    router, card, _, ledger = await lost_then_failed_over(make_router)

    result = await router.notify("card", card.requests[0].reference,
                                 ChannelResult.succeeded("card-1"))

    assert (RepaymentStatus.SUCCEEDED, "wallet") == (result.status, result.channel)
    assert 1 == net(ledger)
    [check] = result.late
    assert ("callback", RefundState.REFUNDED) == (check.found_by, check.refund)
    await router.notify("card", card.requests[0].reference, ChannelResult.succeeded("card-1"))
    await router.sweep()
    assert 1 == len(ledger.refunds())


async def test_a_callback_during_the_submit_changes_nothing_it_should_not(make_router, clock):
    """The callback arrives while the submit is still in the air (before it answers)."""
    ledger = MemoryLedger()
    card = ScriptedChannel("card", [HANG], ledger=ledger)
    wallet = ScriptedChannel("wallet", ledger=ledger)
    router = await make_router([card, wallet], late_config(card={"timeout_s": 5}, wallet={}))
    import asyncio

    task = asyncio.ensure_future(router.repay(repayment()))
    for _ in range(500):  # the intent is written (a real thread for SQLite), then sent
        if card.requests:
            break
        await asyncio.sleep(0.01)
    reference = card.requests[0].reference
    card.ledger.record(failover.testing.Collection("card", reference, KEY, Decimal("1250.00"),
                                                   "card-cb"))
    await router.notify("card", reference, ChannelResult.succeeded("card-cb"))
    clock.advance(5)  # the submit times out; the query finds it collected
    result = await task
    await router.sweep()

    assert (RepaymentStatus.SUCCEEDED, "card") == (result.status, result.channel)
    assert 1 == net(ledger)
    assert [] == wallet.requests
    assert [] == ledger.refunds()


async def test_a_callback_for_an_unknown_reference_names_it(make_router):
    router = await make_router([ScriptedChannel("card")], late_config(card={}))
    with pytest.raises(UnknownReference, match="fo-nothing"):
        await router.notify("card", "fo-nothing", ChannelResult.succeeded())
    with pytest.raises(failover.ConfigError):
        await router.notify("nowhere", "fo-nothing", ChannelResult.succeeded())


async def test_a_signed_webhook_is_read_by_the_adapter_and_a_forged_one_refused(
        make_router, clock):
    ledger = MemoryLedger()
    card = SimulatedChannel("card", seed=3, clock=clock, ledger=ledger,
                            callback_secret="s3cret")
    router = await make_router([card], late_config(card={}))
    result = await router.repay(repayment())
    reference = result.attempts[0].reference
    headers, body = card.signed_callback(reference, ChannelResult.succeeded("card-1"))

    assert RepaymentStatus.SUCCEEDED == (await router.callback("card", headers, body)).status
    forged = body.replace(b"succeeded", b"declined")
    with pytest.raises(CallbackRejected, match="signature"):
        await router.callback("card", headers, forged)
    assert 1 == net(ledger)


# ---- the journal refuses what the rules forbid ---------------------------------------


async def test_a_terminal_ending_changes_only_with_a_correction(tmp_path):
    """In the SQLite file itself: an UPDATE of a finished repayment's ending without a
    new correction is refused by the trigger, whatever the code does."""
    import sqlite3

    path = tmp_path / "j.db"
    clock = FakeClock()
    async with failover.Router([ScriptedChannel("card")], failover.SQLiteJournal(path),
                               clock=clock) as router:
        await router.repay(repayment())
    conn = sqlite3.connect(path)
    with pytest.raises(sqlite3.IntegrityError, match="terminal"):
        conn.execute("UPDATE repayments SET status = 'failed' WHERE key = ?", (KEY,))
    conn.execute("UPDATE repayments SET watch_at = NULL WHERE key = ?", (KEY,))  # allowed
    conn.close()


async def test_an_older_sqlite_journal_is_upgraded_when_opened_for_writing(tmp_path):
    """A version-1 file (before late collections) opens: its repayments are kept."""
    import sqlite3

    from failover.journal import _sqlite

    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path)
    for statement in _sqlite._statements(_sqlite._SCHEMA):
        conn.execute(statement)
    conn.execute("INSERT INTO repayments (key, account, amount, currency, metadata, status,"
                 " round, created_at, updated_at) VALUES ('old', 'acct', '10', 'CNY', '{}',"
                 " 'succeeded', 1, '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00')")
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()
    reader = failover.SQLiteJournal(path, read_only=True)
    with pytest.raises(failover.JournalError, match="failover migrate"):
        await reader.open()

    journal = failover.SQLiteJournal(path)
    await journal.open()
    try:
        old = await journal.load("old")
        assert (RepaymentStatus.SUCCEEDED, (), ()) == (old.status, old.skips, old.corrections)
    finally:
        await journal.close()
    assert _sqlite.SCHEMA_VERSION == sqlite3.connect(path).execute(
        "PRAGMA user_version").fetchone()[0]


# ---- reminders ------------------------------------------------------------------------


def reminder_config() -> failover.RouterConfig:
    return failover.RouterConfig.model_validate({
        "channels": {"card": {"settle_s": 0}, "wallet": {"settle_s": 0}},
        "reminders": {"at_risk_s": [86400, 7200]}})


async def test_reminders_once_per_threshold_across_a_restart(tmp_path, clock):
    """A repayment not collected a day and two hours before it is due is reported at risk
    once per threshold, even after the router restarts; the borrower's alternatives
    (eligible channels, breaker not open) come with it."""
    path = tmp_path / "j.db"
    events = Events()
    due = clock.now() + timedelta(hours=30)
    card = ScriptedChannel("card", [ChannelResult.declined("insufficient_funds")] * 3)
    wallet = ScriptedChannel("wallet", [ChannelResult.declined("insufficient_funds")] * 3)

    async def sweeps(times: int) -> None:
        async with failover.Router([card, wallet], failover.SQLiteJournal(path),
                                   reminder_config(), clock=clock, hooks=[events]) as router:
            if not await router.get(KEY):
                await router.repay(repayment(due_at=due))
            for _ in range(times):
                await router.sweep()

    await sweeps(2)
    assert [] == events.named("failover.repayment.at_risk")  # 30 h before: not yet
    clock.advance(7 * 3600)  # 23 h before
    await sweeps(2)
    clock.advance(22 * 3600)  # 1 h before
    await sweeps(1)
    await sweeps(1)

    at_risk = events.named("failover.repayment.at_risk")
    assert [(KEY, 86400), (KEY, 7200)] == [(e.key, e.threshold_s) for e in at_risk]
    assert ("card", "wallet") == at_risk[0].alternatives
    failed = events.named("failover.repayment.failed")
    assert ("card", "wallet") == failed[0].alternatives


async def test_a_collected_repayment_is_not_reminded(make_router, clock):
    events = Events()
    router = await make_router([ScriptedChannel("card"), ScriptedChannel("wallet")],
                               reminder_config(), hooks=[events])
    await router.repay(repayment(due_at=clock.now() + timedelta(hours=1)))
    await router.sweep()
    assert [] == events.named("failover.repayment.at_risk")


async def test_a_non_idempotent_channel_is_not_sent_a_reference_again_after_not_found(
        make_router):
    """A NOT_FOUND can lie (the first submit sits in the provider's queue).  A channel that
    does not deduplicate must not get the same reference again in the round: a second
    collection under the same reference is one no query can tell apart, so no sweep could
    refund it.  card's outcome is unknown and stays so (PENDING); reconcile's query says
    NOT_FOUND; the router fails over and never resends to card; the sweep then finds
    card's money and corrects the ending."""
    ledger = MemoryLedger()
    card = ScriptedChannel("card", [Collected(ChannelResult.unknown("timeout")),
                                    Collected(ChannelResult.unknown("timeout"))],
                           queries=[ChannelResult.unknown("query_timeout")] * 3
                           + [ChannelResult.not_found()], ledger=ledger)
    wallet = ScriptedChannel("wallet", [ChannelResult.declined("insufficient_funds")],
                             ledger=ledger)
    router = await make_router([card, wallet], late_config(card={}, wallet={}))
    assert RepaymentStatus.PENDING == (await router.repay(repayment())).status

    [after] = await router.reconcile()
    assert RepaymentStatus.FAILED == after.status
    await router.sweep()
    result = await router.get(KEY)

    assert 1 == len(card.requests)
    assert (RepaymentStatus.SUCCEEDED, "card") == (result.status, result.channel)
    assert 1 == net(ledger)
