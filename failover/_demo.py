"""The repayment demo: a simulated day of traffic over three channels."""

from __future__ import annotations

import asyncio
import tempfile
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from random import Random
from typing import TextIO

from failover._models import Repayment, RepaymentResult
from failover._router import Router
from failover.config import RouterConfig
from failover.events import BreakerOpened, Event, FailedOver
from failover.journal import open_journal
from failover.testing import Audit, FakeClock, FaultProfile, MemoryLedger, SimulatedChannel, audit

DAY_S = 24 * 3600.0
OUTAGE = (10 * 3600.0, 12 * 3600.0)  # the primary is down from 10:00 to 12:00


@dataclass(frozen=True, slots=True)
class DemoReport:
    audit_before: Audit
    audit_after: Audit
    channels: dict[str, Counter[str]]
    collected: Counter[str]
    failovers: Counter[tuple[str, str]]
    breaker_opens: Counter[str]


def _channels(clock: FakeClock, seed: int, ledger: MemoryLedger) -> list[SimulatedChannel]:
    return [
        SimulatedChannel(
            "auto_debit",
            FaultProfile(decline=0.04, unavailable=0.02, unknown_collected=0.02,
                         unknown_not_collected=0.02, query_failure=0.3, latency_s=0.4,
                         outages=(OUTAGE,)),
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


CONFIG = RouterConfig.model_validate({
    "deadline_s": 60,
    "channels": {
        "auto_debit": {"priority": 1, "timeout_s": 5,
                       "breaker": {"fail_max": 5, "reset_timeout_s": 300}},
        "bank_card": {"priority": 2, "timeout_s": 5},
        "wallet": {"priority": 3, "timeout_s": 5},
    },
})


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

    def watch(event: Event) -> None:
        if isinstance(event, FailedOver):
            failovers[(event.from_channel, event.to_channel)] += 1
        elif isinstance(event, BreakerOpened):
            opens[event.channel] += 1

    rng = Random(seed)
    batch: list[Repayment] = []
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
            for i in range(repayments):
                batch.append(Repayment(
                    key=f"loan-{rng.randrange(10**6):06d}/instalment-{i}",
                    account=f"6222{rng.randrange(10**12):012d}",
                    amount=Decimal(rng.randrange(5_000, 500_000)).scaleb(-2),
                    currency="CNY",
                ))
                if len(batch) == concurrency or i == repayments - 1:
                    arrival = DAY_S * (i + 1) / repayments
                    if clock.monotonic() < arrival:
                        clock.advance(arrival - clock.monotonic())
                    await asyncio.gather(*(router.repay(r) for r in batch))
                    accepted += [r.key for r in batch]
                    batch = []
            before = await _results(router, accepted)
            for channel in channels:
                channel.profile = channel.profile.healed()
            await router.reconcile()
            after = await _results(router, accepted)
    per_channel: dict[str, Counter[str]] = {c.name: Counter() for c in channels}
    for result in after.values():
        if result is None:
            continue
        for attempt in result.attempts:
            outcome = attempt.outcome.value if attempt.outcome else "sent"
            per_channel[attempt.channel][outcome] += 1
    collected = Counter(c.channel for c in ledger.collections())
    return DemoReport(audit(before, [ledger]), audit(after, [ledger]), per_channel, collected,
                      failovers, opens)


async def _results(router: Router, keys: list[str]) -> dict[str, RepaymentResult | None]:
    return {key: await router.get(key) for key in keys}


def print_report(report: DemoReport, out: TextIO) -> None:
    outcomes = ["succeeded", "declined", "rejected", "unavailable", "unknown"]
    header = f"{'channel':<12}{'attempts':>10}" + "".join(f"{o:>13}" for o in outcomes)
    print(header + f"{'collected':>11}", file=out)
    for name, counts in report.channels.items():
        row = f"{name:<12}{sum(counts.values()):>10}"
        row += "".join(f"{counts[o]:>13}" for o in outcomes)
        print(row + f"{report.collected[name]:>11}", file=out)
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
    verdict = "OK" if after.ok and before.ok else "BROKEN"
    print(f"ledger audit:    duplicates {len(after.duplicates)}, lost {len(after.lost)},"
          f" false successes {len(after.false_successes)} -> {verdict}", file=out)
