"""Many concurrent callers: each key is collected exactly once."""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal

import failover
from failover import RepaymentStatus
from failover.testing import FakeClock, FaultProfile, MemoryLedger, SimulatedChannel, audit

from .conftest import repayment


async def test_500_concurrent_repays_with_duplicates_collect_each_key_once(journal):
    """500 concurrent repay() calls over 300 keys (200 duplicates), faults on: each key once."""
    clock, ledger = FakeClock(), MemoryLedger()
    channels = [
        SimulatedChannel("auto_debit", FaultProfile(unknown_collected=0.1, unavailable=0.1,
                                                    unknown_not_collected=0.1, latency_s=0.01),
                         seed=7, idempotent=False, clock=clock, ledger=ledger),
        SimulatedChannel("card", FaultProfile(unavailable=0.1, unknown_collected=0.05,
                                              latency_s=0.01),
                         seed=7, idempotent=True, clock=clock, ledger=ledger),
    ]
    keys = [f"loan-{i}" for i in range(300)]
    calls = keys + random.Random(7).choices(keys, k=200)
    random.Random(8).shuffle(calls)

    async with failover.Router(channels, journal, clock=clock) as router:
        results = await asyncio.gather(
            *(router.repay(repayment(key=k, amount=Decimal(10))) for k in calls)
        )
        await router.reconcile()
        final = {k: await router.get(k) for k in keys}

    by_key: dict[str, set] = {}
    for key, result in zip(calls, results, strict=True):
        by_key.setdefault(key, set()).add((result.status, result.channel_reference))
    outcome = audit(final, [ledger])
    assert () == outcome.duplicates
    assert all(1 == len(seen) for seen in by_key.values())  # duplicates saw the same result
    collected = {c.repayment_key for c in ledger.collections()}
    assert {k for k, r in final.items() if r.status is RepaymentStatus.SUCCEEDED} == collected
    assert 300 == outcome.succeeded + outcome.failed
