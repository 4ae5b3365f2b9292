"""plan() against a model of the money: random worlds (which requests a gateway
collected, under which ids, what an operator reported), the late checks found in random
order, and each Settlement applied as LateWork.settle applies it.  Whatever the order,
the money kept and given back must satisfy invariant 6: no collection refunded twice,
never the only one, and a borrower charged more than once only with the case on the
manual-refund list.

Deterministic: each case is ``random.Random(seed)``; a failure names its seed and
prints what happened, step by step (``python -m pytest ... -k model`` reproduces it).
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from failover._late import OPERATOR_PREFIX, plan
from failover._models import (
    Attempt,
    Correction,
    LateCheck,
    LateState,
    Outcome,
    RefundState,
    RepaymentStatus,
)
from failover.journal._base import Record

T0 = datetime(2026, 1, 1, tzinfo=UTC)
CHANNELS = ("a", "b")
Money = tuple[str, str]
"""(channel, the gateway's own id of the collection)."""


def reference(channel: str, round: int) -> str:
    return f"fo-{channel}{round}"


@dataclass
class World:
    """One case: the journal's view (record, checks) and the truth (collected)."""

    rng: random.Random
    record: Record
    collected: dict[str, Money]
    """Request reference -> the money it collected (the gateways' ledgers)."""
    operator: tuple[str, Money] | None
    """The operator's collection reference and the money it really is."""
    no_ids: bool
    shared: bool = False
    checks: dict[str, LateCheck] = field(default_factory=dict)
    refunded: list[Money] = field(default_factory=list)
    manual: bool = False
    log: list[str] = field(default_factory=list)
    now: datetime = T0


def world(seed: int, *, same_round: bool, no_ids: bool, shared_ids: bool = False
          ) -> World | None:
    rng = random.Random(seed)
    rounds = rng.randint(1, 3)
    # shared_ids: a channel that reports one id (a mandate's) for all its collections.
    collected = {reference(ch, r): (ch, f"GW-{ch}" if shared_ids else f"GW-{ch}{r}")
                 for r in range(1, rounds + 1) for ch in CHANNELS if rng.random() < 0.45}
    attempts = [Attempt(channel=ch, code=None, reference=reference(ch, r),
                        started_at=T0 + timedelta(seconds=i), finished_at=T0,
                        outcome=Outcome.UNKNOWN, resolution=Outcome.NOT_FOUND, round=r)
                for i, (r, ch) in enumerate((r, ch) for r in range(1, rounds + 1)
                                            for ch in CHANNELS)]
    mode = rng.choice(["ended", "operator", "failed"])
    status, channel, channel_reference = RepaymentStatus.FAILED, None, None
    corrections: tuple[Correction, ...] = ()
    operator = None
    if mode == "ended":  # the last round ended SUCCEEDED on one of its own collections
        own = [r for r in collected if r.endswith(str(rounds))]
        if not own:
            return None
        ref = rng.choice(own)
        money = collected[ref]
        told = money[1] if rng.random() < 0.7 else None
        attempts = [dataclasses.replace(a, outcome=Outcome.SUCCEEDED, resolution=None,
                                        channel_reference=told)
                    if a.reference == ref else a for a in attempts]
        status, channel, channel_reference = RepaymentStatus.SUCCEEDED, money[0], told
    elif mode == "operator":  # an operator resolved the last round from a statement
        pool = [r for r in collected if not same_round or r.endswith(str(rounds))]
        if not pool:
            return None
        money = collected[rng.choice(pool)]
        text = money[1] if rng.random() < 0.6 else "STATEMENT-0042"
        status, channel, channel_reference = RepaymentStatus.SUCCEEDED, money[0], text
        operator = (f"{OPERATOR_PREFIX}{text}", money)
        corrections = (Correction(
            at=T0, reason="operator", old_status=RepaymentStatus.PENDING, old_channel=None,
            old_channel_reference=None, old_code=None, new_status=RepaymentStatus.SUCCEEDED,
            new_channel=money[0], new_channel_reference=text, reference=operator[0]),)
    record = Record(
        key="k", account="acct", amount=Decimal(1), currency="CNY", due_at=None, metadata={},
        preference=None, status=status, round=rounds, created_at=T0, updated_at=T0,
        channel=channel, channel_reference=channel_reference, attempts=tuple(attempts),
        corrections=corrections, pending_reason=None)
    return World(rng, record, collected, operator, no_ids, shared_ids)


def money_of(w: World, check: LateCheck) -> Money | None:
    """What a refund of ``check`` gives back at the gateway: the collection it names by
    the gateway's id, else the one its own request made (None: the gateway refuses)."""
    if check.reference in w.collected:  # the router's own request: the gateway knows it
        return w.collected[check.reference]
    if check.channel_reference is not None:
        wanted = (check.channel, check.channel_reference)
        return wanted if wanted in w.collected.values() else None
    return None


def settle(w: World) -> str | None:
    """One LateWork.settle: correct (up to three times), refund, hand over, clear."""
    for _ in range(3):
        settlement = plan(w.record, list(w.checks.values()), w.now)
        c = settlement.correction
        if c is None:
            break
        w.log.append(f"correct -> {c.new_channel} {c.reference}")
        w.record = dataclasses.replace(
            w.record, status=c.new_status, channel=c.new_channel,
            channel_reference=c.new_channel_reference, corrections=(*w.record.corrections, c),
            updated_at=w.now)
        if settlement.displaced is not None:
            w.checks.setdefault(settlement.displaced.reference, settlement.displaced)
    for check in settlement.refunds:
        now = w.checks[check.reference]
        if now.refund in (RefundState.SENT, RefundState.UNKNOWN):  # its fate: applied
            w.checks[check.reference] = dataclasses.replace(now, refund=RefundState.REFUNDED)
            continue
        money = money_of(w, check)
        if money is None:
            w.checks[check.reference] = dataclasses.replace(now, refund=RefundState.MANUAL)
            w.manual = True
            w.log.append(f"refund {check.reference}: refused -> manual")
            continue
        w.refunded.append(money)
        state = w.rng.choice([RefundState.REFUNDED, RefundState.REFUNDED, RefundState.UNKNOWN])
        w.checks[check.reference] = dataclasses.replace(now, refund=state)
        w.log.append(f"refund {check.reference} -> {money} ({state.value})")
    for check in settlement.uncertain:
        now = w.checks[check.reference]
        if now.refund in (RefundState.SENT, RefundState.UNKNOWN):
            return f"a refund in the air was handed over: {check.reference}"
        w.checks[check.reference] = dataclasses.replace(now, refund=RefundState.MANUAL,
                                                        next_at=None)
        w.manual = True
        w.log.append(f"manual {check.reference}")
    done = {settlement.kept, *(c.reference for c in settlement.twins)}
    for ref, check in list(w.checks.items()):
        if ref in done:
            if check.refund in (RefundState.SENT, RefundState.UNKNOWN):
                return f"a refund in the air was dropped: {ref}"
            w.checks[ref] = dataclasses.replace(check, next_at=None)
    return None


def run(w: World) -> str | None:
    ending = w.operator[0] if w.operator else None
    found = [r for r in w.collected if r != ending and not (
        w.record.status is RepaymentStatus.SUCCEEDED and w.operator is None
        and any(a.reference == r and a.outcome is Outcome.SUCCEEDED
                for a in w.record.attempts))]
    w.rng.shuffle(found)
    for ref in found:
        w.now += timedelta(seconds=10)
        channel, gateway_id = w.collected[ref]
        told = gateway_id if w.no_ids is False or w.rng.random() < 0.6 else None
        w.checks[ref] = LateCheck("k", channel, ref, int(ref[-1]), LateState.COLLECTED,
                                  next_at=w.now, found_at=w.now, found_by="query",
                                  channel_reference=told)
        w.log.append(f"found {ref} as {told}")
        for _ in range(2):
            if (problem := settle(w)) is not None:
                return problem
    for _ in range(3):
        w.now += timedelta(seconds=10)
        if (problem := settle(w)) is not None:
            return problem
    twice = [m for m, n in Counter(w.refunded).items() if n > 1]
    if twice and not w.shared:
        return f"refunded twice: {twice}"
    # With shared ids a refund names the request that collected, not the id.
    kept = len(w.collected) - len(w.refunded) if w.shared else \
        len(set(w.collected.values())) - len(set(w.refunded))
    if w.record.status is RepaymentStatus.SUCCEEDED and w.collected and kept < 1:
        return "the only collection was refunded"
    if not w.manual and w.record.status is RepaymentStatus.SUCCEEDED and kept > 1:
        return f"charged {kept} times, nothing on the manual-refund list"
    if not w.manual and w.record.status is RepaymentStatus.FAILED and kept > 0:
        return "FAILED but charged"
    return None


@pytest.mark.parametrize(("same_round", "no_ids", "shared_ids"), [
    (False, True, False), (False, False, False), (True, True, False), (False, False, True)])
def test_plan_keeps_one_collection_and_gives_every_other_back_once(same_round, no_ids,
                                                                   shared_ids):
    """4,000 worlds per variant: operators naming any round's money (or only the last
    round's), gateways that report their ids, sometimes none, or one id for all of a
    channel's collections (a mandate's)."""
    cases = 0
    for seed in range(4000):
        w = world(seed, same_round=same_round, no_ids=no_ids, shared_ids=shared_ids)
        if w is None:
            continue
        cases += 1
        problem = run(w)
        assert problem is None, (f"seed {seed}: {problem}\n  collected {w.collected}\n"
                                 f"  operator {w.operator}\n  " + "\n  ".join(w.log))
    assert cases > 2000
