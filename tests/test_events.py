"""Events, the structlog hook and the metrics hook; nothing secret reaches the logs."""

from __future__ import annotations

import structlog

from failover import ChannelResult
from failover.events import MetricsHook, RecordingHook, StructlogHook
from failover.testing import ScriptedChannel

from .conftest import repayment


async def test_failover_emits_events_in_order(make_router):
    """A failover run emits attempt, failover and outcome events with dotted names."""
    hook = RecordingHook()
    primary = ScriptedChannel("primary", [ChannelResult.declined("insufficient_funds")])
    router = await make_router([primary, ScriptedChannel("backup")], hooks=[hook])

    await router.repay(repayment())

    assert [
        "failover.attempt.started", "failover.attempt.finished", "failover.failover",
        "failover.attempt.started", "failover.attempt.finished",
        "failover.repayment.succeeded",
    ] == [e.name for e in hook.events]


async def test_pending_event_for_borrower_notices(make_router):
    """An unresolved unknown outcome emits failover.repayment.pending naming the channel."""
    hook = RecordingHook()
    primary = ScriptedChannel("primary", [ChannelResult.unknown("timeout")],
                              queries=[ChannelResult.unknown()] * 3)
    router = await make_router([primary, ScriptedChannel("backup")], hooks=[hook])

    await router.repay(repayment())

    [pending] = hook.named("failover.repayment.pending")
    assert ("loan-42/instalment-7", "primary") == (pending.key, pending.channel)


async def test_structlog_hook_never_logs_the_account(make_router):
    """Logged events carry keys and references, never the account number."""
    primary = ScriptedChannel("primary", [ChannelResult.unavailable()] * 3)
    with structlog.testing.capture_logs() as logs:
        router = await make_router([primary, ScriptedChannel("backup")],
                                   hooks=[StructlogHook()])
        await router.repay(repayment())

    assert "failover.repayment.succeeded" == logs[-1]["event"]
    assert not any("6222021234567890" in str(entry) for entry in logs)
    assert not any("borrower-9" in str(entry) for entry in logs)


async def test_metrics_hook_counts_outcomes(make_router):
    """The metrics hook counts outcomes per channel and failovers per pair."""
    metrics = MetricsHook()
    primary = ScriptedChannel("primary", [ChannelResult.unavailable()] * 3)
    router = await make_router([primary, ScriptedChannel("backup")], hooks=[metrics])

    await router.repay(repayment())

    assert 3 == metrics.outcomes[("primary", "unavailable")]
    assert 1 == metrics.failovers[("primary", "backup")]


async def test_a_failing_hook_never_stops_a_repayment(make_router):
    """A hook that raises is logged and ignored."""

    def broken(event):
        raise RuntimeError("exporter down")

    primary = ScriptedChannel("primary")
    router = await make_router([primary], hooks=[broken])

    result = await router.repay(repayment())

    assert ("succeeded", 1) == (result.status, len(primary.ledger.collections()))
