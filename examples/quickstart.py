"""Embed failover in a payments service: three channels, a durable journal, one repayment."""

import asyncio
from decimal import Decimal

import failover
from failover.testing import FaultProfile, SimulatedChannel


async def main() -> None:
    # Real adapters implement name, idempotent, submit() and query(); simulated ones stand in.
    auto_debit = SimulatedChannel("auto_debit", FaultProfile(unavailable=1.0), idempotent=False)
    card = SimulatedChannel("bank_card", idempotent=True)
    wallet = SimulatedChannel("wallet")

    router = failover.Router(
        channels=[auto_debit, card, wallet],  # priority order
        journal=failover.SQLiteJournal("repayments.db"),
        config=failover.RouterConfig.model_validate(
            {"channels": {"auto_debit": {"retry": {"initial_backoff_s": 0.01}}}}
        ),
    )
    async with router:  # opens the journal, recovers unfinished work
        result = await router.repay(failover.Repayment(
            key="loan-42/instalment-7", account="borrower-9",
            amount=Decimal("1250.00"), currency="CNY"))
        print(result.status, result.channel, [(a.channel, str(a.outcome)) for a in result.attempts])
        await router.reconcile()  # resolve anything left PENDING


if __name__ == "__main__":
    asyncio.run(main())
