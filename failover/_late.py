"""Money that arrives late: found by re-querying, made right by a correction or a refund.

A ``NOT_FOUND`` is trusted only as far as the world allows: a gateway may apply a request
after a status query said it had none, and a process paused past its lease may still
send one.  So when a repayment ends, every attempt settled by ``NOT_FOUND`` or never
answered is watched (a ``LateCheck``) and re-queried on a schedule.  When money turns
up, the rule below decides which collection the repayment keeps; every other one is
refunded (journaled before the call, resolved by query after an unknown answer), or put
on the manual-refund list when the channel cannot refund.

Which collection is kept (``plan``): the one of the earliest round; within a round, the
one the repayment's ending names, else the one found first.  So a ``FAILED`` repayment
whose money arrived is corrected to ``SUCCEEDED`` (the old ending is kept in its
corrections), and when ``retry(key)`` collected again in a later round meanwhile, that
later collection is the one refunded.  The kept collection only ever moves to an earlier
round, so nothing once refunded can become the kept one; and a collection named twice
(by two references, one channel reference) is one: kept or refunded once.  An operator's
resolution names money by a reference of its own, so a collection the router's own
requests made on that channel is never refunded on the strength of it: the manual-refund
list takes both, for a person who can tell.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from failover._channel import is_sync, runner_for
from failover._channels import ChannelSet, Lane
from failover._clock import Clock
from failover._errors import TerminalStateError, UnknownRepayment
from failover._models import (
    Attempt,
    ChannelRequest,
    ChannelResult,
    Correction,
    LateCheck,
    LateState,
    Outcome,
    RefundState,
    RepaymentStatus,
    scrubbed,
)
from failover._policy import invoke
from failover.codec import PURGED
from failover.config import RouterConfig
from failover.events import (
    Event,
    LateCollectionFound,
    RefundIssued,
    RefundNeedsManual,
    RepaymentAtRisk,
    RepaymentCorrected,
)
from failover.journal._base import Journal, Record, may_collect_late, require_account

_log = logging.getLogger("failover")

REFUND_SUFFIX = "-refund"
OPERATOR_PREFIX = "operator:"
"""The reference of a collection an operator reported (``failover resolve``)."""
CONCURRENCY = 8
"""Checks worked at once in one pass (each may wait on a channel's timeout)."""


@dataclass(frozen=True, slots=True)
class LateSettings:
    """When late collections are looked for and reminders sent (see ``LateConfig``)."""

    checks_s: tuple[float, ...] = (60.0, 3600.0, 86400.0)
    retry_s: float = 60.0
    batch: int = 200
    at_risk_s: tuple[float, ...] = ()


def late_settings(config: RouterConfig) -> LateSettings:
    return LateSettings(checks_s=config.late.checks_s, retry_s=config.late.retry_s,
                        at_risk_s=config.reminders.at_risk_s)


def refund_reference(reference: str) -> str:
    """A refund's own reference: derived from the collection's, so every instance and
    every retry asks the channel for the same refund (it is idempotent on it)."""
    return reference + REFUND_SUFFIX


def _collected(attempt: Attempt) -> bool:
    return Outcome.SUCCEEDED in (attempt.outcome, attempt.resolution)


def winner(record: Record) -> tuple[str, str, int] | None:
    """(channel, reference, round) of the collection a ``SUCCEEDED`` ending rests on."""
    if record.status is not RepaymentStatus.SUCCEEDED or record.channel is None:
        return None
    last = record.corrections[-1].reference if record.corrections else None
    if last is not None:
        for attempt in record.attempts:
            if attempt.reference == last:
                return attempt.channel, attempt.reference, attempt.round
        # An operator's resolution names a collection no attempt made.
        return record.channel, last, record.round
    for attempt in reversed(record.attempts):
        if attempt.channel == record.channel and attempt.round == record.round:
            return attempt.channel, attempt.reference, attempt.round
    return None


def watch_list(record: Record, next_at: datetime) -> list[LateCheck]:
    """The checks an ended repayment needs: each reference that may collect late is
    watched; each proven collected outside the ending is a collection to settle."""
    checks: dict[str, LateCheck] = {}
    won = winner(record)
    collected = {a.reference for a in record.attempts if _collected(a)}
    for attempt in record.attempts:
        ref = attempt.reference
        if ref in checks or (won is not None and ref == won[1]):
            continue
        if ref in collected:
            proof = next(a for a in record.attempts if a.reference == ref and _collected(a))
            checks[ref] = LateCheck(
                record.key, attempt.channel, ref, attempt.round, LateState.COLLECTED,
                next_at=next_at, found_at=proof.finished_at or proof.started_at,
                found_by="attempt", channel_reference=proof.channel_reference)
        elif may_collect_late(attempt):
            checks[ref] = LateCheck(record.key, attempt.channel, ref, attempt.round,
                                    LateState.WATCHING, next_at=next_at)
    return list(checks.values())


@dataclass(frozen=True, slots=True)
class Settlement:
    """What making a repayment right takes: a correction (perhaps displacing the
    ending's collection) and the collections to refund."""

    kept: str | None
    correction: Correction | None
    displaced: LateCheck | None
    refunds: tuple[LateCheck, ...]
    uncertain: tuple[LateCheck, ...] = ()
    """Collections that may be the same money as an operator's (same channel and round,
    another channel reference): never refunded by the router, put on the manual-refund
    list for a person who can tell."""
    twins: tuple[LateCheck, ...] = ()
    """The same collection as the kept one or as one refunded instead (same channel and
    channel reference, found under another reference): nothing to do."""
    reasons: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Why each ``uncertain`` collection goes to a person, by reference."""


def plan(record: Record, checks: Sequence[LateCheck], now: datetime,
         ) -> Settlement:
    """Decide, from the journal alone, which collection is kept and what is refunded.

    Collections are grouped by what surely names one piece of money: the same request
    reference, or an operator's report under the channel's own reference.  A group with
    a refund begun (or on the manual-refund list) is never kept; of the others the
    earliest round's is kept, the ending's own first.  Every other group is given back
    once: refunded, or put on the manual-refund list when it may be the same money as
    another group (an operator's reference is free text: on its channel it may name any
    request's money, in any round; two requests the channel reports under one
    reference may be one collection or two)."""
    if record.status is RepaymentStatus.PENDING:
        return Settlement(None, None, None, ())
    won = winner(record)
    ending = None if won is None else LateCheck(
        record.key, won[0], won[1], won[2], LateState.COLLECTED, next_at=now,
        found_at=record.updated_at, found_by="ending",
        channel_reference=record.channel_reference)
    found = [c for c in checks if c.state is LateState.COLLECTED]
    evidence = ([ending] if ending is not None else []) + [
        c for c in found if ending is None or c.reference != ending.reference]
    if not evidence:
        return Settlement(None, None, None, ())
    groups = _same_money(evidence)

    def order(check: LateCheck) -> tuple[Any, ...]:
        """(round, 0 for the ending's own, when found, reference): total and stable."""
        return (check.round, 0 if check is ending else 1, check.found_at or now,
                check.reference)

    free = [g for g in groups if not any(c.refund in _STARTED for c in g)]
    if not free:  # every collection is being given back: nothing can be kept
        return Settlement(None, None, None, tuple(
            c for g in groups for c in g if c.refund in (RefundState.SENT, RefundState.UNKNOWN)))
    kept_group = min(free, key=lambda g: min(order(c) for c in g))
    chosen = ending if any(c is ending for c in kept_group) else min(kept_group, key=order)
    assert chosen is not None
    if chosen is not ending:
        correction = Correction(
            at=now, reason="late_collection", old_status=record.status,
            old_channel=record.channel, old_channel_reference=record.channel_reference,
            old_code=record.code, new_status=RepaymentStatus.SUCCEEDED,
            new_channel=chosen.channel, new_channel_reference=chosen.channel_reference,
            reference=chosen.reference, evidence=chosen.found_by)
        # Made right once the correction is journaled (the ending is then a check).
        return Settlement(chosen.reference, correction, ending, ())
    twins = [c for c in kept_group if c is not ending]
    refunds: list[LateCheck] = []
    uncertain: list[LateCheck] = []
    reasons: dict[str, str] = {}
    for group in groups:
        if group is kept_group:
            continue
        in_air = [c for c in group if c.refund in (RefundState.SENT, RefundState.UNKNOWN)]
        begun = [c for c in group if c.refund in _STARTED]
        if begun:  # one refund per collection: the one begun (its fate resolved first)
            refunds.extend(in_air)
            twins.extend(c for c in group if c.refund not in _STARTED)
            continue
        first = min(group, key=lambda c: (is_operators(c.reference), c.reference))
        twins.extend(c for c in group if c is not first)
        # Only an operator names it: a request of the router's not found yet may be the
        # same money, and the gateway may not know the operator's reference.
        links = [why for other in groups if other is not group
                 if (why := _maybe_same(group, other)) is not None]
        if is_operators(first.reference) or links:
            uncertain.append(first)
            reasons[first.reference] = OPERATORS if is_operators(first.reference) \
                or OPERATORS in links else SHARED_REFERENCE
        else:
            refunds.append(first)
    return Settlement(chosen.reference, None, None, tuple(refunds), tuple(uncertain),
                      tuple(twins), reasons)


_STARTED = frozenset({RefundState.SENT, RefundState.UNKNOWN, RefundState.REFUNDED,
                      RefundState.MANUAL})
"""A refund begun (or handed to a person): what happens to it is settled first."""


def _same_money(evidence: Sequence[LateCheck]) -> list[list[LateCheck]]:
    """Collections grouped by what surely names one piece of money: one request
    reference, or one channel reference on one channel (in the order given)."""
    groups: list[list[LateCheck]] = []
    for check in evidence:
        joined = [g for g in groups if any(_one_collection(check, c) for c in g)]
        merged = [c for g in joined for c in g] + [check]
        if len({c.reference for c in merged if not is_operators(c.reference)}) > 1:
            # An operator's report whose id two requests share: which one it names is
            # not known, so neither is joined to it (and a person tells).
            groups.append([check])
            continue
        groups = [g for g in groups if not any(g is j for j in joined)] + [merged]
    return groups


def _one_collection(a: LateCheck, b: LateCheck) -> bool:
    """Surely one piece of money: one request, or an operator's report naming a
    collection by the channel's own reference.  Two requests of the router's are two
    collections at most, whatever references the channel reports for them."""
    return a.reference == b.reference or (
        a.channel == b.channel and a.channel_reference is not None
        and a.channel_reference == b.channel_reference
        and (is_operators(a.reference) or is_operators(b.reference)))


def _maybe_same(group: Sequence[LateCheck], other: Sequence[LateCheck]) -> str | None:
    """Why two groups may name the same money, if they may: an operator's collection and
    another one on its channel, or two requests the channel reports under one reference
    (a channel_reference that is not one collection's)."""
    for a in group:
        for b in other:
            if a.channel != b.channel:
                continue
            if is_operators(a.reference) or is_operators(b.reference):
                return OPERATORS
            if a.channel_reference is not None and a.channel_reference == b.channel_reference:
                return SHARED_REFERENCE
    return None


OPERATORS = "may_be_the_operators_collection"
SHARED_REFERENCE = "channel_reference_of_two_requests"
"""Why a collection is handed to a person (the manual-refund list's reasons)."""


def is_operators(reference: str) -> bool:
    """Whether a collection's reference is an operator's (``failover resolve``)."""
    return reference.startswith(OPERATOR_PREFIX)


def request_for(record: Record, reference: str) -> ChannelRequest:
    require_account(record)
    return ChannelRequest(repayment_key=record.key, reference=reference,
                          account=record.account, amount=record.amount,
                          currency=record.currency, metadata=record.metadata)


class LateWork:
    """The background loop's share of issue "late collections": watch, re-query,
    correct, refund, remind.  Every step is journaled before it acts and is safe to
    run on several instances at once (compare-and-set on each check)."""

    def __init__(self, journal: Journal, clock: Clock, channels: ChannelSet,
                 emit: Callable[[Event], None], settings: Callable[[], LateSettings]) -> None:
        self._journal = journal
        self._clock = clock
        self._channels = channels
        self._emit = emit
        self._settings = settings
        self._reminded: set[tuple[str, float]] = set()

    # ---- the sweep ---------------------------------------------------------------

    async def sweep(self) -> None:
        """One pass: watch ended repayments, work the checks that are due, remind."""
        settings = self._settings()
        await self._watch(settings)
        now = self._clock.now()
        # Claimed past any call a check can make (a query or a refund, each within its
        # channel's timeout), so no other instance works it while this one does.
        longest = max((lane.config.timeout_s for lane in self._channels.layout.lanes.values()),
                      default=0.0)
        claim = now + timedelta(seconds=max(settings.retry_s, 2 * longest, 1.0))
        due = await self._journal.due_late_checks(now, settings.batch, claim)
        gate = asyncio.Semaphore(CONCURRENCY)

        async def work(check: LateCheck) -> None:
            async with gate:
                try:
                    await self._work(check, settings)
                except (UnknownRepayment, TerminalStateError):
                    pass  # moved meanwhile: the claim runs out and it comes back
                except Exception:
                    # One check never stops the others, nor the reminders: it comes back
                    # when its claim runs out.
                    _log.warning("late check of %s on %s failed", check.key, check.channel,
                                 exc_info=True)

        await asyncio.gather(*(work(check) for check in due))
        if settings.at_risk_s:
            await self._remind(settings)

    async def _watch(self, settings: LateSettings) -> None:
        first = timedelta(seconds=settings.checks_s[0] if settings.checks_s else 0.0)

        def checks_of(record: Record) -> list[LateCheck]:
            checks = watch_list(record, record.updated_at + first)
            if not settings.checks_s:  # re-queries off: collections proven already only
                checks = [c for c in checks if c.state is LateState.COLLECTED]
            return checks

        for key in await self._journal.watched(settings.batch):
            with contextlib.suppress(UnknownRepayment):
                await self._journal.start_watching(key, checks_of)

    async def _work(self, check: LateCheck, settings: LateSettings) -> None:
        record = await self._journal.load(check.key)
        if record is None:
            return
        if record.status is RepaymentStatus.PENDING:
            # A new round is running: its ending decides; look again after it.
            await self._later(check, settings.retry_s)
            return
        if check.state is LateState.WATCHING:
            await self._requery(record, check, settings)
        elif check.state is LateState.COLLECTED:
            await self.settle(record.key)

    async def _later(self, check: LateCheck, seconds: float) -> None:
        at = self._clock.now() + timedelta(seconds=seconds)
        await self._journal.update_late_check(dataclasses.replace(check, next_at=at), check)

    async def _requery(self, record: Record, check: LateCheck, settings: LateSettings) -> None:
        lane = self._channels.layout.lanes.get(check.channel)
        if lane is None:  # no longer configured: nothing can ask it
            await self._later(check, settings.retry_s)
            return
        answer = await self._ask(lane, lane.channel.query,
                                 (request_for(record, check.reference),),
                                 lane.config.outcome_map)
        now = self._clock.now()
        if answer.outcome is Outcome.SUCCEEDED:
            await self.found(record.key, check.channel, check.reference,
                             answer.channel_reference, "query", round=check.round)
            return
        if answer.outcome in (Outcome.UNKNOWN, Outcome.UNAVAILABLE):
            await self._later(check, settings.retry_s)  # proved nothing: asked again
            return
        done = check.checks + 1
        if answer.outcome is Outcome.NOT_FOUND and done < len(settings.checks_s):
            gap = settings.checks_s[done] - settings.checks_s[done - 1]
            moved = dataclasses.replace(check, checks=done,
                                        next_at=now + timedelta(seconds=max(gap, 0.0)))
        else:  # past the horizon, or the channel holds it as declined: never collects
            moved = dataclasses.replace(check, checks=done, state=LateState.CLEARED,
                                        next_at=None)
        await self._journal.update_late_check(moved, check)

    async def found(self, key: str, channel: str, reference: str,
                    channel_reference: str | None, by: str, *, round: int | None = None
                    ) -> Record:
        """A channel collected under ``reference`` after the repayment's ending said
        otherwise (a query, or a provider's callback): journaled, told, made right."""
        now = self._clock.now()
        if round is None:
            record = await self._journal.load(key)
            if record is None:
                raise UnknownRepayment(key)
            round = next((a.round for a in record.attempts if a.reference == reference), 1)
        check = LateCheck(key, channel, reference, round, LateState.COLLECTED,
                          next_at=now, found_at=now, found_by=by,
                          channel_reference=channel_reference)
        if await self._journal.collected_late(check):
            self._emit(LateCollectionFound(key, channel, reference, by))
        return await self.settle(key)

    # ---- making it right -----------------------------------------------------------

    async def settle(self, key: str) -> Record:
        """Correct the ending if the kept collection is not the one it names, then
        refund every other collection.  Safe to run anywhere, any number of times."""
        for _ in range(3):
            loaded = await self._journal.load(key)
            if loaded is None:
                raise UnknownRepayment(key)
            record = loaded
            checks = await self._journal.late_checks(key)
            settlement = plan(record, checks, self._clock.now())
            if settlement.correction is None:
                break
            try:
                await self._journal.correct(key, record.round, settlement.correction,
                                            settlement.displaced,
                                            after=len(record.corrections))
            except TerminalStateError:
                continue  # it moved meanwhile (a new round, another instance): again
            c = settlement.correction
            self._emit(RepaymentCorrected(key, c.old_status.value, c.new_status.value,
                                          c.new_channel or "", c.reference or ""))
        else:
            return record  # still moving: the check comes back when its claim runs out
        if record.status is RepaymentStatus.PENDING:
            return record
        for check in settlement.refunds:
            await self._refund(record, check)
        for check in settlement.uncertain:
            await self._manual(record, check,
                               settlement.reasons.get(check.reference, OPERATORS))
        # The kept collection, and any found again under another reference, need no more
        # work.
        done = {settlement.kept, *(c.reference for c in settlement.twins)}
        for check in checks:
            if check.reference in done and check.next_at is not None:
                await self._journal.update_late_check(
                    dataclasses.replace(check, next_at=None), check)
        return record

    async def _refund(self, record: Record, check: LateCheck) -> None:
        settings = self._settings()
        lane = self._channels.layout.lanes.get(check.channel)
        method = None if lane is None else getattr(lane.channel, "refund", None)
        now = self._clock.now()
        ref = refund_reference(check.reference)
        if record.account == PURGED:
            # Erased after the repayment ended (a provider reported this collection
            # since): no channel is called without the account, so a person refunds it.
            await self._manual(record, check, "account_erased")
            return
        if check.refund in (RefundState.SENT, RefundState.UNKNOWN):
            # Sent before: what became of it is settled first, whatever changed since
            # (a refund that applied must never end on the manual list).
            if lane is None or (check.refund_at is not None and now < check.refund_at
                                + timedelta(seconds=self._in_air_s(lane))):
                # Just sent, here or by another instance (its answer comes first), or
                # its channel is not configured now (asked once it is again).
                await self._later(check, settings.retry_s)
                return
            query = getattr(lane.channel, "query_refund", None)
            if query is not None:
                answer = await self._ask(lane, query, (request_for(record, ref),), None)
                if answer.outcome is Outcome.SUCCEEDED:
                    await self._refunded(record, check, ref, answer)
                    return
                if answer.outcome in (Outcome.DECLINED, Outcome.REJECTED):
                    # The channel holds the refund as refused: nothing was given back,
                    # and sending it again gets the same answer.  A person refunds it.
                    await self._manual(record, check, answer.code or answer.outcome.value)
                    return
                if answer.outcome is not Outcome.NOT_FOUND:
                    await self._later(check, settings.retry_s)
                    return
            if method is None:  # never applied, and cannot be sent again
                await self._manual(record, check, "no_refund_capability")
                return
            # Not found (or no way to ask): sent again under the same reference, which
            # the channel deduplicates, so it is never refunded twice.
        elif method is None:
            await self._manual(record, check, "no_refund_capability" if lane is not None
                               else "channel_not_configured")
            return
        assert lane is not None
        assert method is not None
        sent = dataclasses.replace(check, refund=RefundState.SENT, refund_reference=ref,
                                   refund_at=now,
                                   next_at=now + timedelta(seconds=self._in_air_s(lane)))
        if not await self._journal.update_late_check(sent, check):
            return  # another instance moved it
        answer = await self._ask(lane, method, (request_for(record, ref),
                                                check.channel_reference, record.amount), None)
        if answer.outcome is Outcome.SUCCEEDED:
            await self._refunded(record, sent, ref, answer)
        elif answer.outcome in (Outcome.DECLINED, Outcome.REJECTED):
            await self._manual(record, sent, answer.code or answer.outcome.value)
        elif answer.outcome is Outcome.UNAVAILABLE:
            await self._journal.update_late_check(
                dataclasses.replace(sent, refund=RefundState.DUE, refund_code=answer.code),
                sent)  # certainly not done: asked again at next_at
        else:
            await self._journal.update_late_check(
                dataclasses.replace(sent, refund=RefundState.UNKNOWN,
                                    refund_code=answer.code), sent)

    async def _manual(self, record: Record, check: LateCheck, reason: str) -> None:
        manual = dataclasses.replace(check, refund=RefundState.MANUAL, next_at=None,
                                     refund_code=reason, refund_at=self._clock.now())
        if await self._journal.update_late_check(manual, check):
            self._emit(RefundNeedsManual(record.key, check.channel, check.reference, reason))

    def _in_air_s(self, lane: Lane) -> float:
        """How long a refund just sent is left to its sender: past ``retry_s`` and past
        twice the channel's timeout, so that its call has surely ended."""
        return max(self._settings().retry_s, 2 * lane.config.timeout_s)

    async def _refunded(self, record: Record, check: LateCheck, ref: str,
                        answer: ChannelResult) -> None:
        done = dataclasses.replace(check, refund=RefundState.REFUNDED, refund_reference=ref,
                                   refund_code=None, next_at=None,
                                   refund_at=self._clock.now())
        if await self._journal.update_late_check(done, check):
            self._emit(RefundIssued(record.key, check.channel, check.reference, ref))

    async def _ask(self, lane: Lane, method: Callable[..., Any], args: tuple[Any, ...],
                   codes: Mapping[str, str] | None) -> ChannelResult:
        """Call an adapter method as the router calls a query: within the channel's
        ``timeout_s``; a plain ``def`` on the channel's own bounded threads (never the
        loop's shared pool, which the journal and ``close()`` need)."""
        request: ChannelRequest = args[0]
        if is_sync(method):
            runner = runner_for(lane.name, "late", lane.config.sync_workers)
            thread = runner.start(lambda _: method(*args), request, self._clock, submit=False)
            if thread is None:
                return ChannelResult.unavailable("sync_workers_busy", "no thread for it")

            async def call(_: ChannelRequest) -> Any:
                return await asyncio.shield(thread)
        else:
            async def call(_: ChannelRequest) -> Any:
                return await method(*args)

        answer = await invoke(call, request, lane.config.timeout_s, codes, self._clock)
        return scrubbed(answer, request.account)  # its code is journaled with the check

    # ---- reminders ---------------------------------------------------------------------

    async def _remind(self, settings: LateSettings) -> None:
        now = self._clock.now()
        for record in await self._journal.at_risk(now, max(settings.at_risk_s)):
            assert record.due_at is not None
            for threshold in settings.at_risk_s:
                if (record.key, threshold) in self._reminded \
                        or record.due_at - timedelta(seconds=threshold) > now:
                    continue
                if await self._journal.remind_once(record.key, threshold, now):
                    self._emit(RepaymentAtRisk(
                        record.key, record.due_at, threshold, record.status.value,
                        self._channels.layout.alternatives(
                            record.amount, record.currency, self._clock, record.preference)))
                self._reminded.add((record.key, threshold))
        if len(self._reminded) > 100_000:
            with contextlib.suppress(KeyError):
                self._reminded.clear()
