"""The repayment demo: a simulated day of traffic over three channels.

Two in three repayments fall due that day (``DUE_AFTER_S`` after they arrive); the rest
are early repayments without a due date.  One borrower in ten authorised the auto-debit
alone, so a decline or the outage leaves them unpaid.  When the day ends the late sweep
runs until what the channels applied late is found and made right, then the ledger audit
and the evidence report (who was late, and whose faults made them so) close the output.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from random import Random
from typing import TextIO

from failover._models import LateState, RefundState, Repayment, RepaymentResult
from failover._router import Router
from failover.config import RouterConfig
from failover.events import (
    BreakerOpened,
    Event,
    FailedOver,
    LateCollectionFound,
    RefundIssued,
    RefundNeedsManual,
    RepaymentCorrected,
)
from failover.journal import Journal, open_journal
from failover.report import Summary, report
from failover.testing import Audit, FakeClock, FaultProfile, MemoryLedger, SimulatedChannel, audit

DAY_S = 24 * 3600.0
OUTAGE = (10 * 3600.0, 12 * 3600.0)  # the primary is down from 10:00 to 12:00
DUE_AFTER_S = 6 * 3600.0
"""A repayment with a due date falls due this long after it arrives."""
DUE_SHARE = 2 / 3
"""The share of repayments that fall due during the day."""
AUTO_DEBIT_ONLY = 0.1
"""The share of borrowers who authorised the auto-debit alone: nothing to fail over to,
so a decline (theirs) or the outage (the channel's) leaves them unpaid."""


@dataclass(frozen=True, slots=True)
class DemoReport:
    audit_before: Audit
    audit_after: Audit
    channels: dict[str, Counter[str]]
    collected: Counter[str]
    refunded: Counter[str]
    failovers: Counter[tuple[str, str]]
    breaker_opens: Counter[str]
    late: Counter[str]
    """Late-collection work: ``found``, ``refunded``, ``corrected``, ``manual``."""
    evidence: Summary
    """The evidence report's counts over the repayments with a due date."""


def _channels(clock: FakeClock, seed: int, ledger: MemoryLedger) -> list[SimulatedChannel]:
    return [
        SimulatedChannel(
            "auto_debit",
            # late_apply_after_query: a timeout whose request waits in the bank's queue,
            # NOT_FOUND to every status query, and collects a minute later (after the
            # router failed over): the sweep finds it and refunds it, or corrects the
            # repayment if it had failed.  Some refunds are refused: the manual list.
            FaultProfile(decline=0.04, unavailable=0.02, unknown_collected=0.02,
                         unknown_not_collected=0.02, query_failure=0.3, latency_s=0.4,
                         outages=(OUTAGE,), late_apply_after_query=0.003,
                         refund_fail=0.2),
            seed=seed, idempotent=False, clock=clock, ledger=ledger,
        ),
        SimulatedChannel(
            "bank_card",
            FaultProfile(decline=0.03, unavailable=0.03, unknown_collected=0.01,
                         query_failure=0.1, latency_s=0.8),
            seed=seed, idempotent=True, clock=clock, ledger=ledger,
        ),
        SimulatedChannel(
            "wallet",
            FaultProfile(decline=0.3, unavailable=0.01, latency_s=0.3),
            seed=seed, idempotent=False, clock=clock, ledger=ledger,
        ),
    ]


# The borrower's own declines, for the evidence report (insufficient_funds is one of
# failover.config.BORROWER_CODES by default; marked here to show where the mark goes).
BORROWER = {"insufficient_funds": {"fault": "borrower"}}

CONFIG = RouterConfig.model_validate({
    "deadline_s": 60,
    "channels": {
        "auto_debit": {"priority": 1, "timeout_s": 5,
                       "breaker": {"fail_max": 5, "reset_timeout_s": 300},
                       "codes": BORROWER},
        "bank_card": {"priority": 2, "timeout_s": 5, "codes": BORROWER},
        "wallet": {"priority": 3, "timeout_s": 5, "codes": BORROWER},
    },
})


_LATE_EVENTS: dict[type[Event], str] = {
    LateCollectionFound: "found", RefundIssued: "refunded", RepaymentCorrected: "corrected",
    RefundNeedsManual: "manual"}


async def run_demo(
    repayments: int = 3000, seed: int = 42, journal_path: str | Path | None = None,
    concurrency: int = 50, *, schema: str | None = None,
) -> DemoReport:
    """Run the simulated day and audit it against the channels' ledgers.

    ``journal_path`` is an SQLite file or a PostgreSQL DSN (its ``schema`` is migrated on
    open); it should hold no repayments yet, or the audit would count the earlier ones'
    collections as missing.  Default: a temporary SQLite file."""
    clock, ledger = FakeClock(), MemoryLedger()
    channels = _channels(clock, seed, ledger)
    failovers: Counter[tuple[str, str]] = Counter()
    opens: Counter[str] = Counter()
    late: Counter[str] = Counter()

    def watch(event: Event) -> None:
        if isinstance(event, FailedOver):
            failovers[(event.from_channel, event.to_channel)] += 1
        elif isinstance(event, BreakerOpened):
            opens[event.channel] += 1
        elif (what := _LATE_EVENTS.get(type(event))) is not None:
            late[what] += 1

    rng = Random(seed)
    due_rng = Random(f"{seed}/due")  # its own stream: keys and amounts stay as they were
    batch: list[tuple[Repayment, list[str] | None]] = []
    accepted: list[str] = []
    with tempfile.TemporaryDirectory(prefix="failover-demo-") as folder:
        target = journal_path or Path(folder) / "journal.db"
        options = {} if schema is None else {"schema": schema}
        journal = open_journal(target, read_only=False, migrate=True, **options)
        # No background loop: on the fake clock its sleeps would move the simulated day on,
        # and reconcile() is called when the day ends, as on SQLite.
        router = Router(channels, journal, CONFIG, clock=clock, hooks=[watch],
                        background=False)
        async with router:
            start = clock.now()
            for i in range(repayments):
                arrival = DAY_S * (i + 1) / repayments
                due = start + timedelta(seconds=arrival + DUE_AFTER_S) \
                    if due_rng.random() < DUE_SHARE else None
                only = ["auto_debit"] if due_rng.random() < AUTO_DEBIT_ONLY else None
                batch.append((Repayment(
                    key=f"loan-{rng.randrange(10**6):06d}/instalment-{i}",
                    account=f"6222{rng.randrange(10**12):012d}",
                    amount=Decimal(rng.randrange(5_000, 500_000)).scaleb(-2),
                    currency="CNY", due_at=due,
                ), only))
                if len(batch) == concurrency or i == repayments - 1:
                    if clock.monotonic() < arrival:
                        clock.advance(arrival - clock.monotonic())
                    await asyncio.gather(*(router.repay(r, channels=only)
                                           for r, only in batch))
                    accepted += [r.key for r, _ in batch]
                    batch = []
            await _sweep(router, journal, clock)
            before = await _results(router, accepted)
            manual_before = await _manual(journal)
            for channel in channels:
                channel.profile = channel.profile.healed()
            await router.reconcile()
            await _sweep(router, journal, clock)
            after = await _results(router, accepted)
            manual = await _manual(journal)
            evidence = (await report(journal, CONFIG, now=clock.now())).summary()
    per_channel: dict[str, Counter[str]] = {c.name: Counter() for c in channels}
    for result in after.values():
        if result is None:
            continue
        for attempt in result.attempts:
            outcome = attempt.outcome.value if attempt.outcome else "sent"
            per_channel[attempt.channel][outcome] += 1
    collected = Counter(c.channel for c in ledger.collections())
    refunded = Counter(r.channel for r in ledger.refunds())
    return DemoReport(audit(before, [ledger], manual_before), audit(after, [ledger], manual),
                      per_channel, collected, refunded, failovers, opens, late, evidence)


async def _results(router: Router, keys: list[str]) -> dict[str, RepaymentResult | None]:
    return {key: await router.get(key) for key in keys}


async def _manual(journal: Journal) -> list[str]:
    """The keys on the manual-refund list (money a person must give back)."""
    return [c.key for c in await journal.late_checks(refund=RefundState.MANUAL)]


async def _sweep(router: Router, journal: Journal, clock: FakeClock) -> None:
    """Run the late sweep as the background loop would over the next minutes, until every
    repayment that ended is watched, each watched attempt has had its first re-query and
    each collection found late is kept, refunded or on the manual list.  (The later
    re-queries, an hour and a day on, would find nothing more: the simulated channels
    apply late within ``late_apply_after_s``.)"""
    late = CONFIG.late
    clock.advance(late.checks_s[0])  # the day's last repayments come due for a first look
    for _ in range(100):
        await router.sweep()
        now = clock.now()
        checks = await journal.late_checks()
        if await journal.watched(1) or any(c.next_at is not None and c.next_at <= now
                                           for c in checks):
            continue  # more than one sweep's batch was due
        if not any(c.next_at is not None and (c.state is LateState.COLLECTED or c.checks == 0)
                   for c in checks):
            return
        clock.advance(late.retry_s)  # a channel that proved nothing is asked again


def print_report(report: DemoReport, out: TextIO) -> None:
    outcomes = ["succeeded", "declined", "rejected", "unavailable", "unknown"]
    header = f"{'channel':<12}{'attempts':>10}" + "".join(f"{o:>13}" for o in outcomes)
    print(header + f"{'collected':>11}{'refunded':>10}", file=out)
    for name, counts in report.channels.items():
        row = f"{name:<12}{sum(counts.values()):>10}"
        row += "".join(f"{counts[o]:>13}" for o in outcomes)
        print(row + f"{report.collected[name]:>11}{report.refunded[name]:>10}", file=out)
    before, after = report.audit_before, report.audit_after
    print(file=out)
    print(f"end of day:      succeeded {before.succeeded}, failed {before.failed},"
          f" pending {before.pending}", file=out)
    print(f"after reconcile: succeeded {after.succeeded}, failed {after.failed},"
          f" pending {after.pending}", file=out)
    moves = ", ".join(f"{a}->{b} {n}" for (a, b), n in sorted(report.failovers.items()))
    print(f"failovers:       {moves or 'none'}", file=out)
    opens = ", ".join(f"{c} {n}x" for c, n in sorted(report.breaker_opens.items()))
    print(f"breakers opened: {opens or 'none'}", file=out)
    late = report.late
    print(f"collected late:  found {late['found']}, refunded {late['refunded']}, corrected"
          f" {late['corrected']}, manual refunds {late['manual']}", file=out)
    verdict = "OK" if after.ok and before.ok else "BROKEN"
    print(f"ledger audit:    duplicates {len(after.duplicates)}, lost {len(after.lost)},"
          f" false successes {len(after.false_successes)} -> {verdict}", file=out)
    e = report.evidence
    print(file=out)
    print(f"evidence report: {e.repayments} repayments due, {e.on_time} on time, {e.late}"
          f" late ({e.unpaid} still unpaid)", file=out)
    print(f"late because of: channel faults {e.channel}, the borrower's own declines"
          f" {e.borrower}, mixed {e.mixed}, no fault journaled {e.none}", file=out)
