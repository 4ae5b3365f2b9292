"""The repayment flow: every decision of DESIGN §1 in one generator that does no I/O.

``repayment_flow(plan)`` yields actions (admit a call, journal an attempt, call,
query, wait, resolve, finish...) and is sent the answer to each; it never reads a
clock, touches the journal or calls a channel itself.  The async executor
(``_executor.py``) performs the actions.  Because the flow is plain data in and
out, property tests drive it without an event loop, feeding it any answers in
any order, and check that it never fails over while an attempt is in doubt.

The rules it keeps, in the order they are applied:

1. An answer already journaled that decides the repayment ends it (a process
   can stop between journaling ``SUCCEEDED`` and the repayment's end).
2. Attempts in doubt are settled first, by a status query of their channel;
   while one stays in doubt nothing else is tried (the repayment is ``PENDING``).
3. A ``NOT_FOUND`` proves nothing was collected only when the submit is no
   longer running and the query was asked at least the channel's ``settle_s``
   after the request could last have been sent.
4. One pass tries each eligible channel at most once, with its retries; a
   channel that declined or rejected this round is not tried again.
5. Nothing starts after the pass's deadline: no submit, no query, no retry
   whose backoff would end past it.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field

from tenacity import (
    RetryCallState,
    stop_after_attempt,
    stop_any,
    stop_before_delay,
    wait_exponential,
)

from failover import _decisions as decide
from failover._decisions import Verdict
from failover._models import Attempt, ChannelResult, Outcome, RepaymentStatus
from failover.events import ChannelSkipped, Event, FailedOver

DEADLINE = "deadline"
NO_ELIGIBLE_CHANNEL = "no_eligible_channel"
EXHAUSTED = "exhausted"
IN_THE_AIR = "in_the_air"
"""Pending code: a plain-``def`` adapter's submit is still running."""
SETTLING = "settling"
"""Pending code: the channel says ``NOT_FOUND`` too soon after the submit to prove it."""
CHANNEL_NOT_CONFIGURED = "channel_not_configured"


# ---- the plan: what the flow is given -------------------------------------------


@functools.lru_cache(maxsize=4096)  # a new repayment's opening reference is asked for twice
def make_reference(key: str, round: int, channel: str) -> str:
    """The reference of a repayment on a channel in a round.

    Derived, not random: every retry, every restart and every instance computes
    the same one, so an idempotent channel deduplicates and ``query`` finds it.
    A new round (``retry(key)``) gets a new one, so a deduplicating channel does
    not simply replay its old decline.
    """
    digest = hashlib.blake2b(f"{key}\x1f{round}\x1f{channel}".encode(), digest_size=12)
    return f"fo-{digest.hexdigest()}"


@dataclass(frozen=True, slots=True)
class LanePlan:
    """What the flow needs to know of one channel."""

    name: str
    idempotent: bool = False
    max_attempts: int = 3
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    settle_s: float = 5.0


@dataclass(frozen=True, slots=True)
class Doubt:
    """An attempt journaled in doubt before the flow started."""

    channel: str
    reference: str
    since: float
    """Monotonic time after which its request can no longer be on its way."""


@dataclass(slots=True)
class Plan:
    """One pass over the channels for one repayment."""

    key: str
    round: int
    order: tuple[str, ...]
    """Channels for this pass, preference or priority order."""
    lanes: Mapping[str, LanePlan]
    started: float
    """Monotonic time the pass starts; the deadline counts from here."""
    deadline_s: float
    attempts: tuple[Attempt, ...] = ()
    """This round's journaled attempts."""
    doubts: tuple[Doubt, ...] = ()
    opening: tuple[str, int] | None = None
    """(channel, attempt number) of a new repayment's first attempt, journaled with
    its intent and admitted by the breaker already."""
    query_attempts: int = 3
    query_backoff_s: float = 0.05
    collected: tuple[tuple[str, str | None], ...] = ()
    """(channel, channel reference) of collections this round that a provider's callback
    proved after its attempt was settled otherwise (journaled late collections)."""


# ---- actions the flow yields, and the answers it is sent ------------------------
# Messages between the flow and the executor are slotted dataclasses and are never
# changed after they are made; they are not declared frozen because a frozen
# dataclass costs four times as much to build, and a repayment makes a dozen.


@dataclass(slots=True)
class Admit:
    """Ask whether ``channel`` takes a call now (eligibility, breaker, retry budget).

    The executor holds the breaker's permit until the ``Call``; the flow never
    sees it.  ``retry`` takes the call from the router's retry budget."""

    channel: str
    retry: bool = False


@dataclass(slots=True)
class Begin:
    """Journal an attempt as sent, before the call."""

    channel: str
    reference: str


@dataclass(slots=True)
class Call:
    """Submit to ``channel`` with the permit ``Admit`` got."""

    channel: str
    reference: str
    number: int


@dataclass(slots=True)
class Record:
    """Journal a call's answer."""

    channel: str
    number: int
    result: ChannelResult


@dataclass(slots=True)
class Query:
    """Ask ``channel`` what became of ``reference``."""

    channel: str
    reference: str


@dataclass(slots=True)
class Resolve:
    """Journal what an answer proved about the attempts in doubt with ``reference``."""

    channel: str
    reference: str
    result: ChannelResult


@dataclass(slots=True)
class Wait:
    seconds: float


@dataclass(slots=True)
class Emit:
    event: Event


@dataclass(slots=True)
class Finish:
    """End the repayment (terminal); the answer and resolution that decide it are
    written in the same journal operation."""

    status: RepaymentStatus
    channel: str | None
    channel_reference: str | None = None
    code: str | None = None
    attempt: tuple[int, ChannelResult] | None = None
    resolution: tuple[str, ChannelResult] | None = None
    """(reference, answer) that settled earlier doubt about that reference."""


@dataclass(slots=True)
class Pending:
    """Leave the repayment ``PENDING``, waiting for ``channel``'s answer."""

    channel: str
    code: str


Action = Admit | Begin | Call | Record | Query | Resolve | Wait | Emit | Finish | Pending


@dataclass(slots=True)
class Answer:
    """What the executor sends back: when the action ended, and what it gave."""

    at: float
    """Monotonic time the action ended."""
    result: ChannelResult | None = None
    """The channel's answer to a ``Call`` or ``Query``."""
    asked_at: float = 0.0
    """For a ``Query``: monotonic time it was asked."""
    running: bool = False
    """For a ``Call`` or ``Query``: a submit with this reference is (or, for a query, was
    when it was asked) still running: a plain-``def`` adapter's thread outlived the
    timeout."""
    sent_by: float | None = None
    """For a ``Query``: when the last thread of a submit with this reference ended, if
    known (its request can have been sent until then)."""
    number: int = 0
    """For a ``Begin``: the attempt's number."""
    refusal: str | None = None
    """For an ``Admit``: why no call may be made now, or ``None``."""


Flow = Generator[Action, Answer, None]


# ---- the flow ----------------------------------------------------------------------


@dataclass(slots=True)
class _Pass:
    plan: Plan
    now: float
    deadline: float
    refused: set[str] = field(default_factory=set)
    settled: tuple[str, str] | None = None
    """The last channel whose doubt this pass settled as not collected, and why: where a
    resumed round fails over from."""

    def late(self) -> bool:
        return self.now >= self.deadline


def repayment_flow(plan: Plan) -> Flow:
    """Drive one repayment through one pass; see the module docstring for the rules."""
    run = _Pass(plan, plan.started, plan.started + plan.deadline_s)
    if plan.opening is not None:  # a new repayment: its only attempt is about to be made
        yield from _pass(run)
        return
    decided = decide.decided_by(plan.attempts)
    if decided is not None:
        outcome, attempt = decided
        if outcome is Outcome.SUCCEEDED:
            yield Finish(RepaymentStatus.SUCCEEDED, attempt.channel, attempt.channel_reference)
        else:
            yield Finish(RepaymentStatus.FAILED, attempt.channel, None,
                         attempt.code or "rejected")
        return
    if plan.collected:
        # The borrower paid through this channel: nothing more is collected.
        channel, channel_reference = plan.collected[0]
        yield Finish(RepaymentStatus.SUCCEEDED, channel, channel_reference)
        return
    run.refused = {a.channel for a in plan.attempts
                   if decide.refuses_again(a.outcome, a.resolution)
                   or not decide.may_resend(a.outcome, _idempotent(plan, a.channel))}

    for doubt in plan.doubts:
        if doubt.channel not in plan.lanes:
            yield Pending(doubt.channel, CHANNEL_NOT_CONFIGURED)
            return
        verdict, answer = yield from _settle(run, doubt.channel, doubt.reference, doubt.since)
        if (yield from _after_settling(run, doubt.channel, doubt.reference, verdict, answer)):
            return
        run.settled = (doubt.channel, answer.code or answer.outcome.value)

    yield from _pass(run)


def _idempotent(plan: Plan, channel: str) -> bool:
    lane = plan.lanes.get(channel)
    return lane is not None and lane.idempotent


def _after_settling(
    run: _Pass, channel: str, reference: str, verdict: Verdict, answer: ChannelResult
) -> Generator[Action, Answer, bool]:
    """Act on what settling a doubt showed; True if that ended the repayment."""
    if verdict is Verdict.COLLECTED:
        yield Finish(RepaymentStatus.SUCCEEDED, channel, answer.channel_reference,
                     resolution=(reference, answer))
        return True
    if verdict is Verdict.IN_DOUBT:
        yield Pending(channel, answer.code or "unknown")
        return True
    yield Resolve(channel, reference, answer)
    if verdict is Verdict.STOP:
        yield Finish(RepaymentStatus.FAILED, channel, None, answer.code or "rejected")
        return True
    if verdict is Verdict.REFUSED:
        run.refused.add(channel)
    return False


def _pass(run: _Pass) -> Flow:
    plan = run.plan
    names = [name for name in plan.order if name in plan.lanes and name not in run.refused]
    if plan.opening is None:
        # Channels already tried this round go last, so failover moves on.
        tried = {a.channel for a in plan.attempts}
        names.sort(key=lambda name: name in tried)
    opening = plan.opening
    # A resumed round moves on from the channel it last tried (settled as not collected).
    previous, last_code = run.settled or (None, None)
    if previous is None and plan.opening is None and plan.attempts:
        last = plan.attempts[-1]
        previous = last.channel
        last_code = last.resolution.value if last.resolution is not None else (
            last.code or (last.outcome or Outcome.UNKNOWN).value)
    called_any = False
    for name in names:
        number: int | None = None
        if opening is not None:
            if name != opening[0]:  # found ineligible when the opening channel was chosen
                yield Emit(ChannelSkipped(plan.key, name, "ineligible"))
                continue
            number, opening = opening[1], None
        else:
            if run.late():
                yield Finish(RepaymentStatus.FAILED, None, None, DEADLINE)
                return
            admitted = yield Admit(name)
            run.now = admitted.at
            if admitted.refusal is not None:
                yield Emit(ChannelSkipped(plan.key, name, admitted.refusal))
                continue
        if previous is not None and previous != name:
            yield Emit(FailedOver(plan.key, previous, name, last_code or "failed"))
        called_any = True
        code = yield from _channel(run, plan.lanes[name], number)
        if code is None:  # the repayment ended on this channel
            return
        previous, last_code = name, code
    code = (last_code or EXHAUSTED) if called_any else NO_ELIGIBLE_CHANNEL
    yield Finish(RepaymentStatus.FAILED, None, None, code)


def _channel(
    run: _Pass, lane: LanePlan, number: int | None
) -> Generator[Action, Answer, str | None]:
    """Try one channel with its retries.  Returns the code to fail over with, or
    ``None`` once the repayment has ended (finished or pending) here."""
    reference = make_reference(run.plan.key, run.plan.round, lane.name)
    retries: _Retries | None = None  # built when a retry is considered: most need none
    calls = 0
    doubt = False
    """An earlier call with this reference may have collected and nothing proved otherwise."""
    code: str | None = None
    while True:
        if number is None:
            begun = yield Begin(lane.name, reference)
            number = begun.number
        called = yield Call(lane.name, reference, number)
        run.now = called.at
        result = called.result
        assert result is not None
        calls += 1
        # An answer given while the call still runs is not the call's (a timeout's): it
        # may still collect, whatever the answer says.
        verdict = Verdict.NEEDS_QUERY if called.running else decide.after_submit(result.outcome)
        if verdict is Verdict.COLLECTED:
            yield Finish(RepaymentStatus.SUCCEEDED, lane.name, result.channel_reference,
                         attempt=(number, result),
                         resolution=(reference, result) if doubt else None)
            return None
        yield Record(lane.name, number, result)
        number = None
        code = result.code
        if verdict is Verdict.NEEDS_QUERY:
            doubt = True
            since = math.inf if called.running else run.now
            verdict, answer = yield from _settle(run, lane.name, reference, since)
            code = answer.code or code
            if verdict is Verdict.IN_DOUBT:
                if not lane.idempotent or answer.code == IN_THE_AIR:
                    # A second submit could collect twice; and while our own first one is
                    # still running, even a deduplicating channel's answer to a resubmit
                    # says nothing about it.
                    yield Pending(lane.name, code or "unknown")
                    return None
                # An idempotent channel may be asked again with the same reference.
            else:
                doubt = False
                if (yield from _after_settling(run, lane.name, reference, verdict, answer)):
                    return None
        elif doubt and verdict in (Verdict.STOP, Verdict.REFUSED):
            # A definitive answer to a resubmit with the same reference settles the doubt.
            yield Resolve(lane.name, reference, result)
            doubt = False
        if verdict is Verdict.STOP:
            yield Finish(RepaymentStatus.FAILED, lane.name, None, code or "rejected")
            return None
        if verdict is Verdict.REFUSED:
            return code or "declined"
        if not decide.may_retry_same(verdict, lane.idempotent):
            break
        retries = retries or _Retries(lane)
        if not retries.allow(run, calls):
            break
        backoff = retries.backoff()
        yield Wait(backoff)
        run.now += backoff
        if run.late():  # checked before Admit: a permit is never taken for a call not made
            break
        admitted = yield Admit(lane.name, retry=True)
        run.now = admitted.at
        if admitted.refusal is not None:
            break
    if doubt:
        yield Pending(lane.name, code or "unknown")
        return None
    return code or "unavailable"


class _Retries:
    """When the same channel may be called again: tenacity's stop and wait strategies,
    composed in one visible place (stamina does the same), evaluated on the
    flow's clock instead of tenacity's own."""

    def __init__(self, lane: LanePlan) -> None:
        self._max_attempts = lane.max_attempts
        self._wait = wait_exponential(multiplier=lane.initial_backoff_s,
                                      min=lane.initial_backoff_s, max=lane.max_backoff_s)
        self._state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        self._state.start_time = self._state.outcome_timestamp = 0.0
        # Delays count from the last call: "since start" is zero, so the delay that may
        # still start before the deadline is exactly the time left.

    def backoff(self) -> float:
        return float(self._wait(self._state))

    def allow(self, run: _Pass, calls: int) -> bool:
        """Whether another call may be made after ``calls``: attempts left, and its
        backoff ends before the deadline (no call of any kind starts after it)."""
        state = self._state
        state.attempt_number = calls
        state.upcoming_sleep = self.backoff()
        left = run.deadline - run.now
        stop = stop_any(stop_after_attempt(self._max_attempts), stop_before_delay(left))
        return left > 0 and not stop(state)


def _settle(
    run: _Pass, channel: str, reference: str, since: float
) -> Generator[Action, Answer, tuple[Verdict, ChannelResult]]:
    """Ask ``channel`` about ``reference`` until the answer proves something, the
    query retries run out, or the deadline comes.  Returns the verdict (``IN_DOUBT``
    if nothing was proved) and the answer it rests on."""
    plan = run.plan
    settle_s = plan.lanes[channel].settle_s
    asked = 0
    answer = ChannelResult.unknown(DEADLINE, "no query before the deadline")
    running = math.isinf(since)  # the call's own thread, until a query says it ended
    while not run.late():
        reply = yield Query(channel, reference)
        run.now = reply.at
        assert reply.result is not None
        answer = reply.result
        verdict = decide.after_query(answer.outcome)
        if reply.running and verdict is not Verdict.COLLECTED:
            # While our own submit still runs, only a collection is proof of anything.
            return Verdict.IN_DOUBT, ChannelResult.unknown(
                IN_THE_AIR, "the submit is still running")
        running = False
        if verdict is Verdict.NOT_COLLECTED:
            if reply.sent_by is not None:  # a thread sent it, and ended then
                since = reply.sent_by if math.isinf(since) else max(since, reply.sent_by)
            elif math.isinf(since):  # the thread ended before this query was asked
                since = reply.asked_at
            proven_at = since + settle_s
            if reply.asked_at >= proven_at:
                return verdict, answer
            # Too soon: the request may still be on its way.  Ask again once it cannot be.
            if proven_at >= run.deadline:
                return Verdict.IN_DOUBT, ChannelResult.unknown(
                    SETTLING, f"not found, but asked within settle_s ({settle_s}s) of the submit")
            wait = proven_at - run.now
            yield Wait(wait)
            run.now = max(run.now + wait, proven_at)
            continue
        if verdict is not Verdict.IN_DOUBT:
            return verdict, answer
        asked += 1
        backoff = min(plan.query_backoff_s * 2 ** (asked - 1), 1.0)
        if asked >= plan.query_attempts or run.now + backoff >= run.deadline:
            break
        yield Wait(backoff)
        run.now += backoff
    if running:
        return Verdict.IN_DOUBT, ChannelResult.unknown(IN_THE_AIR, "the submit is still running")
    return Verdict.IN_DOUBT, answer
