"""A small repayment service built from a config file.

    python examples/service.py examples/failover.toml --journal service.db

It builds the router from the file (adapters, priorities, limits, windows), logs
every event through structlog, repays a batch of instalments, reconciles what is
left pending and prints where each repayment stands.  Run it twice: the second run
finds every key already settled in the journal and collects nothing again.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from decimal import Decimal
from pathlib import Path

import structlog

import failover
from failover.events import StructlogHook


async def serve(config: Path, journal: Path, count: int) -> None:
    router = failover.Router.from_config(
        config, journal=failover.SQLiteJournal(journal), hooks=[StructlogHook()]
    )
    async with router:
        repayments = [
            failover.Repayment(key=f"loan-{100 + i}/instalment-3", account=f"62220200{i:08d}",
                               amount=Decimal(500 + 250 * i).quantize(Decimal("0.01")),
                               currency="CNY")
            for i in range(count)
        ]
        results = await asyncio.gather(*(router.repay(r) for r in repayments))
        if any(r.status is failover.RepaymentStatus.PENDING for r in results):
            await router.reconcile()
        for repayment in repayments:
            result = await router.get(repayment.key)
            assert result is not None
            print(f"{result.key:<24} {result.status.value:<10} {result.channel or '-':<11}"
                  f" attempts {len(result.attempts)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--journal", type=Path, default=Path("service.db"))
    parser.add_argument("--repayments", type=int, default=8)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    asyncio.run(serve(args.config, args.journal, args.repayments))


if __name__ == "__main__":
    main()
