"""One test per row of the outcome table (DESIGN §1), checked against the channels' ledgers."""

from __future__ import annotations

import pytest

from failover import ChannelResult, ChannelUnavailable, Outcome, RepaymentStatus
from failover.testing import Collected, ScriptedChannel

from .conftest import fast, repayment

unknown = ChannelResult.unknown
unavailable = ChannelResult.unavailable


def collected(*channels: ScriptedChannel) -> int:
    return sum(len(c.ledger.collections()) for c in channels)


async def test_succeeded_ends_the_repayment(make_router):
    """SUCCEEDED: collected once, no other channel is called."""
    primary, backup = ScriptedChannel("primary"), ScriptedChannel("backup")
    router = await make_router([primary, backup])

    result = await router.repay(repayment())

    assert (RepaymentStatus.SUCCEEDED, "primary") == (result.status, result.channel)
    assert result.channel_reference == primary.ledger.collections()[0].channel_reference
    assert (1, 0) == (collected(primary), backup.submits)


async def test_declined_moves_on_without_retrying_or_tripping(make_router):
    """DECLINED: same channel not retried, next channel tried, breaker counts a success."""
    primary = ScriptedChannel("primary", [ChannelResult.declined("insufficient_funds")])
    backup = ScriptedChannel("backup")
    router = await make_router([primary, backup])

    result = await router.repay(repayment())

    assert (RepaymentStatus.SUCCEEDED, "backup") == (result.status, result.channel)
    assert (1, 0) == (primary.submits, router.breaker("primary").fail_counter)
    assert (0, 1) == (collected(primary), collected(backup))


async def test_rejected_fails_the_repayment_everywhere(make_router):
    """REJECTED: the repayment fails; no channel is tried after it."""
    primary = ScriptedChannel("primary", [ChannelResult.rejected("loan_closed")])
    backup = ScriptedChannel("backup")
    router = await make_router([primary, backup])

    result = await router.repay(repayment())

    assert (RepaymentStatus.FAILED, "loan_closed") == (result.status, result.code)
    assert (1, 0, 0) == (primary.submits, backup.submits, collected(primary, backup))
    assert 0 == router.breaker("primary").fail_counter


async def test_unavailable_retries_same_channel_then_fails_over(make_router, clock):
    """UNAVAILABLE: retried per policy with backoff, counted by the breaker, then next channel."""
    primary = ScriptedChannel("primary", [unavailable(), unavailable(), unavailable()])
    backup = ScriptedChannel("backup")
    config = fast(primary={"retry": {"max_attempts": 3, "initial_backoff_s": 0.2,
                                     "max_backoff_s": 2.0}})
    router = await make_router([primary, backup], config)

    result = await router.repay(repayment())

    assert (RepaymentStatus.SUCCEEDED, "backup") == (result.status, result.channel)
    assert 3 == primary.submits
    assert [0.2, 0.4] == clock.sleeps
    assert 3 == router.breaker("primary").fail_counter
    assert 1 == len({r.reference for r in primary.requests})


async def test_adapter_raising_channel_unavailable_is_unavailable(make_router):
    """An adapter may raise ChannelUnavailable instead of returning UNAVAILABLE."""
    primary = ScriptedChannel("primary", [ChannelUnavailable("maintenance")] * 3)
    backup = ScriptedChannel("backup")
    router = await make_router([primary, backup])

    result = await router.repay(repayment())

    assert [Outcome.UNAVAILABLE] * 3 + [Outcome.SUCCEEDED] == [a.outcome for a in result.attempts]
    assert "maintenance" == result.attempts[0].code


async def test_unknown_that_collected_is_resolved_by_query_not_failover(make_router):
    """UNKNOWN on a non-idempotent channel: query first; collected means done, no failover."""
    primary = ScriptedChannel("primary", [Collected(unknown("timeout"))])
    backup = ScriptedChannel("backup")
    router = await make_router([primary, backup])

    result = await router.repay(repayment())

    assert (RepaymentStatus.SUCCEEDED, "primary") == (result.status, result.channel)
    assert (1, 1, 0) == (primary.submits, len(primary.query_requests), backup.submits)
    assert 1 == collected(primary, backup)
    assert Outcome.SUCCEEDED == result.attempts[0].resolution


async def test_unknown_proven_not_collected_fails_over_without_resubmitting(make_router):
    """UNKNOWN then query NOT_FOUND on a non-idempotent channel: next channel, no resubmit."""
    primary = ScriptedChannel("primary", [unknown("timeout")])
    backup = ScriptedChannel("backup")
    router = await make_router([primary, backup])

    result = await router.repay(repayment())

    assert (RepaymentStatus.SUCCEEDED, "backup") == (result.status, result.channel)
    assert (1, 1) == (primary.submits, backup.submits)
    assert (0, 1) == (collected(primary), collected(backup))
    assert Outcome.NOT_FOUND == result.attempts[0].resolution


async def test_unresolved_unknown_is_pending_never_failed(make_router):
    """UNKNOWN and every query inconclusive: PENDING, and no other channel is touched."""
    primary = ScriptedChannel(
        "primary", [Collected(unknown("timeout"))],
        queries=[unknown("query_timeout")] * 3,
    )
    backup = ScriptedChannel("backup")
    router = await make_router([primary, backup])

    result = await router.repay(repayment())

    assert RepaymentStatus.PENDING == result.status
    assert ("awaiting_channel", "primary") == (result.pending_reason, result.pending_channel)
    assert 0 == backup.submits
    assert result.attempts[0].in_doubt


async def test_reconcile_resolves_pending_as_collected(make_router):
    """A PENDING repayment the channel did collect becomes SUCCEEDED on reconcile."""
    primary = ScriptedChannel(
        "primary", [Collected(unknown("timeout"))], queries=[unknown("query_timeout")] * 3,
    )
    backup = ScriptedChannel("backup")
    router = await make_router([primary, backup])
    await router.repay(repayment())

    results = await router.reconcile()

    assert [(RepaymentStatus.SUCCEEDED, "primary")] == [(r.status, r.channel) for r in results]
    assert (1, 0) == (collected(primary), backup.submits)


async def test_reconcile_resumes_failover_when_nothing_was_collected(make_router):
    """A PENDING repayment proven not collected moves on to the next channel on reconcile."""
    primary = ScriptedChannel(
        "primary", [unknown("timeout")], queries=[unknown("query_timeout")] * 3,
    )
    backup = ScriptedChannel("backup")
    router = await make_router([primary, backup])
    first = await router.repay(repayment())

    await router.reconcile()
    result = await router.get(first.key)

    assert RepaymentStatus.PENDING == first.status
    assert (RepaymentStatus.SUCCEEDED, "backup") == (result.status, result.channel)
    assert (1, 1) == (primary.submits, collected(backup))


async def test_pending_does_not_become_failed_as_time_passes(make_router, clock):
    """Time alone never turns PENDING into FAILED (a debited borrower shown unpaid)."""
    primary = ScriptedChannel(
        "primary", [Collected(unknown("timeout"))],
        queries=[unknown("query_timeout")] * 6,
    )
    router = await make_router([primary, ScriptedChannel("backup")])
    await router.repay(repayment())
    clock.advance(7 * 24 * 3600)

    await router.reconcile()
    result = await router.get(repayment().key)

    assert RepaymentStatus.PENDING == result.status


async def test_unknown_on_idempotent_channel_resubmits_with_same_reference(make_router):
    """UNKNOWN on an idempotent channel: after an inconclusive query, resubmit the same ref."""
    primary = ScriptedChannel(
        "primary", [Collected(unknown("timeout"))], idempotent=True,
        queries=[unknown("query_timeout")] * 3,
    )
    backup = ScriptedChannel("backup")
    router = await make_router([primary, backup])

    result = await router.repay(repayment())

    assert (RepaymentStatus.SUCCEEDED, "primary") == (result.status, result.channel)
    assert 2 == primary.submits
    assert primary.requests[0].reference == primary.requests[1].reference
    assert (1, 0) == (collected(primary), backup.submits)
    assert Outcome.SUCCEEDED == result.attempts[0].resolution


async def test_unavailable_resubmit_does_not_settle_doubt(make_router):
    """An UNAVAILABLE answer to a resubmit proves nothing: the repayment stays PENDING."""
    primary = ScriptedChannel(
        "primary", [Collected(unknown("timeout")), unavailable(), unavailable()],
        idempotent=True, queries=[unknown("query_timeout")] * 3,
    )
    backup = ScriptedChannel("backup")
    config = fast(primary={"retry": {"max_attempts": 3}})
    router = await make_router([primary, backup], config)

    result = await router.repay(repayment())

    assert RepaymentStatus.PENDING == result.status
    assert (3, 0) == (primary.submits, backup.submits)


@pytest.mark.parametrize(
    ("answer", "status", "backup_calls"),
    [
        (ChannelResult.not_found(), RepaymentStatus.SUCCEEDED, 1),
        (ChannelResult.declined("insufficient_funds"), RepaymentStatus.SUCCEEDED, 1),
        (ChannelResult.rejected("fraud_flag"), RepaymentStatus.FAILED, 0),
        (ChannelResult.succeeded("p-1"), RepaymentStatus.SUCCEEDED, 0),
    ],
)
async def test_query_answers(make_router, answer, status, backup_calls):
    """NOT_FOUND and DECLINED prove nothing collected; REJECTED stops; SUCCEEDED ends."""
    primary = ScriptedChannel("primary", [unknown("timeout")], queries=[answer])
    backup = ScriptedChannel("backup")
    router = await make_router([primary, backup])

    result = await router.repay(repayment())

    assert (status, backup_calls) == (result.status, backup.submits)


@pytest.mark.parametrize(
    "answer",
    [ChannelResult.unavailable(), ChannelResult.unknown(), RuntimeError("query crashed")],
)
async def test_inconclusive_query_answers_leave_it_pending(make_router, answer):
    """UNAVAILABLE, UNKNOWN or an exception from query prove nothing: PENDING."""
    primary = ScriptedChannel("primary", [unknown("timeout")], queries=[answer] * 3)
    backup = ScriptedChannel("backup")
    router = await make_router([primary, backup])

    result = await router.repay(repayment())

    assert (RepaymentStatus.PENDING, 0) == (result.status, backup.submits)


async def test_adapter_exception_is_unknown(make_router):
    """Any exception other than ChannelUnavailable means UNKNOWN: query before anything else."""
    primary = ScriptedChannel("primary", [Collected(ConnectionResetError("reset mid-response"))])
    backup = ScriptedChannel("backup")
    router = await make_router([primary, backup])

    result = await router.repay(repayment())

    assert Outcome.UNKNOWN == result.attempts[0].outcome
    assert (RepaymentStatus.SUCCEEDED, "primary", 0) == (result.status, result.channel,
                                                         backup.submits)
