"""A payments process for the crash test: repays a fixed set of keys on a SQLite
journal, with simulated channels whose ledger lives in its own SQLite file.

Run by tests/test_crash.py, which kills it with SIGKILL at random moments.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from decimal import Decimal

import failover
from failover.testing import FaultProfile, SimulatedChannel, SQLiteLedger

FAULTY = {
    "auto_debit": (False, FaultProfile(unknown_collected=0.1, unknown_not_collected=0.1,
                                       unavailable=0.1, query_failure=0.2, latency_s=0.02)),
    "card": (True, FaultProfile(unavailable=0.1, unknown_collected=0.05, latency_s=0.02)),
    "wallet": (False, FaultProfile(decline=0.1, unknown_collected=0.05, latency_s=0.02)),
}
CONFIG = failover.RouterConfig.model_validate({
    "deadline_s": 30,
    "channels": {
        # settle_s: these simulated channels apply a submit before answering, never later.
        name: {"retry": {"initial_backoff_s": 0.001, "max_backoff_s": 0.01}, "settle_s": 0.05,
               "breaker": {"fail_max": 5, "reset_timeout_s": 0.2}}
        for name in FAULTY
    },
})


def repayments(count: int) -> list[failover.Repayment]:
    return [
        failover.Repayment(key=f"loan-{i}", account=f"acct-{i:06d}",
                           amount=Decimal(100 + i).scaleb(-2), currency="CNY")
        for i in range(count)
    ]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--journal", required=True)
    parser.add_argument("--ledger", required=True)
    parser.add_argument("--repayments", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heal", action="store_true")
    args = parser.parse_args()

    ledger = SQLiteLedger(args.ledger)
    channels = [
        SimulatedChannel(name, FaultProfile() if args.heal else profile, seed=args.seed,
                         idempotent=idempotent, ledger=ledger)
        for name, (idempotent, profile) in FAULTY.items()
    ]
    router = failover.Router(channels, failover.SQLiteJournal(args.journal), CONFIG)
    async with router:
        print("open", flush=True)
        limit = asyncio.Semaphore(16)

        async def one(repayment: failover.Repayment) -> None:
            async with limit:
                await router.repay(repayment)

        await asyncio.gather(*(one(r) for r in repayments(args.repayments)))
        await router.wait_recovered()
        if args.heal:
            await router.reconcile()
    print("done", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
