"""The executor: carries out the repayment flow's actions.  The only code that calls
channels and writes the journal on a repayment's behalf.

Policies around one channel call, outer to inner, are applied here in this order:
retry budget (``Admit(retry=True)``) → breaker permit (``Admit``) → the close gate →
the timeout on the router's clock → the adapter (``invoke``).  The retry loop
itself, backoff and deadline included, is the flow's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from failover._channel import Call as AdapterCall
from failover._channels import Lane, Layout, paused_for
from failover._clock import Clock
from failover._errors import (
    IdempotencyConflict,
    OwnershipLost,
    RouterClosedError,
    TerminalStateError,
    UnknownRepayment,
)
from failover._flow import (
    Admit,
    Answer,
    Begin,
    Call,
    Doubt,
    Emit,
    Finish,
    Pending,
    Plan,
    Query,
    Record,
    Resolve,
    Wait,
    make_reference,
    repayment_flow,
)
from failover._models import (
    SETTLING_SUBMIT_OUTCOMES,
    Attempt,
    ChannelRequest,
    ChannelResult,
    LateState,
    Outcome,
    PendingReason,
    Repayment,
    RepaymentResult,
    RepaymentStatus,
    Skip,
    _mask,
    scrubbed,
)
from failover._policy import Permit, RetryBudget, answer_of, breaker_failure, invoke
from failover.events import (
    AttemptFinished,
    AttemptResolved,
    AttemptStarted,
    ChannelSkipped,
    Event,
    Hook,
    OwnershipLostEvent,
    RepaymentFailed,
    RepaymentPending,
    RepaymentSucceeded,
    RetryBudgetExhausted,
    emit,
)
from failover.journal._base import Journal, Resolution, require_account
from failover.journal._base import Record as JournalRecord

_log = logging.getLogger("failover")


@dataclass(slots=True)
class Intent:
    """A repayment as ``repay()`` brought it, and whether it reuses a key for other money
    (told to that caller only: the stored repayment goes on for everyone else)."""

    repayment: Repayment
    conflict: IdempotencyConflict | None = None
    stored: JournalRecord | None = None
    """The repayment as the journal holds it, once the intent write has answered."""
    _waiters: list[asyncio.Future[JournalRecord | None]] | None = None

    async def written(self, task: asyncio.Future[Any]) -> JournalRecord | None:
        """The stored repayment, once known: what a second caller of the key must be
        compared with, not this caller's repayment.  ``None`` if ``task`` (the one
        writing it) ended without saying, cancelled before it ran, for instance."""
        if self.stored is not None:
            return self.stored
        waiter: asyncio.Future[JournalRecord | None] = asyncio.get_running_loop().create_future()
        self._waiters = [*(self._waiters or []), waiter]
        await asyncio.wait([waiter, task], return_when=asyncio.FIRST_COMPLETED)
        return waiter.result() if waiter.done() else None

    def settle(self, stored: JournalRecord | None) -> None:
        self.stored = stored
        for waiter in self._waiters or ():
            if not waiter.done():
                waiter.set_result(stored)
        self._waiters = None


@dataclass(slots=True)
class _Drive:
    """One repayment being driven: its record, layout and the permits it holds."""

    layout: Layout
    record: JournalRecord = None  # type: ignore[assignment]  # set once read or written
    permits: dict[str, Permit] = field(default_factory=dict)
    running: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    """Attempt number -> the thread of a plain-``def`` submit that outlived its timeout."""
    result: RepaymentResult | None = None
    skips: list[Skip] = field(default_factory=list)
    """Channels passed over in this drive, journaled with its ending."""
    refused: dict[str, str] = field(default_factory=dict)
    """Why each channel before the opening one was passed over when it was chosen."""

    def request(self, reference: str) -> ChannelRequest:
        record = self.record
        require_account(record)
        return ChannelRequest(
            repayment_key=record.key, reference=reference, account=record.account,
            amount=record.amount, currency=record.currency, metadata=record.metadata,
        )


class Executor:
    """Runs flows against the journal and the channels."""

    def __init__(
        self, journal: Journal, clock: Clock, hooks: Sequence[Hook], budget: RetryBudget,
        *, query_attempts: int, query_backoff_s: float,
        on_late_answer: Callable[[str], None],
    ) -> None:
        self._journal = journal
        self._clock = clock
        self._hooks = tuple(hooks)
        self._budget = budget
        self._query_attempts = query_attempts
        self._query_backoff_s = query_backoff_s
        self._on_late_answer = on_late_answer
        self._shared = bool(getattr(journal, "shared", False))
        self.closing = True
        """The gate: while set, no channel call starts (closed, or closing)."""
        self.closed = True
        """Set once the journal is (being) closed: late answers are no longer written."""
        self.opened_wall: datetime = clock.now()
        self.opened_at = clock.monotonic()
        self.threads: set[asyncio.Future[Any]] = set()
        """Plain-``def`` submits of this router still running."""
        self._sent_by: dict[str, float] = {}
        """Reference -> monotonic time its last submit by this router ended (bounded)."""
        self.late_writes: set[asyncio.Task[None]] = set()
        self._outliving: dict[str, int] = {}
        """Key -> its plain-``def`` submits still running past their timeout: while any
        runs, a shared journal's lease on the key is kept (renewed), never released."""
        self._handlers: dict[type, Callable[[Any, _Drive], Awaitable[Answer]]] = {
            Call: self._on_call, Finish: self._on_finish, Record: self._on_record,
            Query: self._on_query, Admit: self._on_admit, Begin: self._on_begin,
            Resolve: self._on_resolve, Wait: self._on_wait, Emit: self._on_emit,
            Pending: self._on_pending,
        }
        """The handler of each action the flow yields (every kind of Action has one)."""

    def open(self) -> None:
        self.opened_wall = self._clock.now()
        self.opened_at = self._clock.monotonic()
        # Whatever was sent before this open is bounded by opened_at from now on; threads
        # an earlier opening left are the SyncRunner's to track, not this opening's to wait
        # for (their futures belong to that opening's loop, which may be gone).
        self._sent_by.clear()
        self.threads.clear()
        self._outliving.clear()
        self.closing = self.closed = False

    def _emit(self, event: Event) -> None:
        if self._hooks:
            emit(self._hooks, event)

    def _gate(self, key: str, accepted: bool = True) -> None:
        if self.closing:
            if not accepted:
                raise RouterClosedError(f"the router is closing: repayment {key!r} was not"
                                        " accepted; call repay() again on an open router")
            raise RouterClosedError(f"the router is closing: repayment {key!r} stops here and"
                                    " resumes on the next open")

    # ---- entry points ----------------------------------------------------------

    async def start(
        self, intent: Intent, preference: tuple[str, ...] | None, layout: Layout
    ) -> RepaymentResult:
        """A repayment ``repay()`` brought: its intent, with the first attempt "sent" in
        the same write, then the flow.  Runs in the repayment's own task, so a caller
        cancelled while the intent is written leaves it driven all the same."""
        repayment = intent.repayment
        self._gate(repayment.key, accepted=False)
        opening = None
        permit = None
        refused: dict[str, str] = {}
        for name in layout.names_for(preference):
            why, permit = layout.admit(name, repayment.amount, repayment.currency, self._clock)
            if permit is not None:
                opening = name
                self._budget.record_call()
                break
            refused[name] = why or "ineligible"
        drive = _Drive(layout=layout, permits={} if opening is None or permit is None
                       else {opening: permit}, refused=refused)
        try:
            first = None if opening is None else (opening, make_reference(repayment.key, 1,
                                                                           opening))
            try:
                record, created = await self._journal.create(
                    repayment, preference, self._clock.now(), first_attempt=first
                )
                intent.settle(record)
            finally:
                if intent.stored is None:  # failed or cancelled: joiners read the journal
                    intent.settle(None)
            if not created:
                self._release(drive)
                try:
                    record.check_same(repayment)
                except IdempotencyConflict as conflict:
                    intent.conflict = conflict  # that caller's error; the stored one goes on
                if record.status is not RepaymentStatus.PENDING:
                    return record.result()
                # Another caller's repayment, here or on another instance: drive it once
                # this instance owns it, else wait for its owner's result.
                return await self._own(record.key, layout, join=True)
            drive.record = record
            return await self._run(drive, opening=None if opening is None else (opening, 1))
        finally:
            self._release(drive)

    async def drive(self, record: JournalRecord | None, layout: Layout,
                    key: str | None = None, *, join: bool = False) -> RepaymentResult:
        """Resume a repayment from its journaled state (recovery, reconcile, retry).

        On a shared journal it is driven only once this instance owns it; while another
        instance does, ``join`` waits for that owner's result, else the stored state is
        returned as it stands."""
        if record is not None and record.status is not RepaymentStatus.PENDING:
            return record.result()
        key = record.key if record is not None else key
        assert key is not None
        return await self._own(key, layout, join=join)

    async def _own(self, key: str, layout: Layout, *, join: bool) -> RepaymentResult:
        shared = self._shared
        while True:
            self._gate(key)
            # Watched before its state is read: a change in between wakes the wait below.
            waiter = self._journal.watch(key) if shared and join else None
            try:
                record = await self._journal.acquire(key)  # UnknownRepayment if unknown
                if record is not None:
                    if record.status is not RepaymentStatus.PENDING:
                        return record.result()
                    return await self._run(_Drive(layout, record))
                stored = await self._journal.load(key)
                if stored is None:
                    raise UnknownRepayment(key)
                if not join or stored.status is not RepaymentStatus.PENDING \
                        or stored.pending_reason is PendingReason.AWAITING_CHANNEL:
                    # Its owner's drive has ended (pending on a channel, perhaps with a
                    # thread still running there): that is the result to give.
                    return stored.result()
                # Owned by another instance, in flight: its ending (or its lease running
                # out) is told by a notification, or seen by polling.
                assert waiter is not None
                await self._journal.changed(key, waiter, timeout_s=1.0)
            finally:
                if waiter is not None and not waiter.done():
                    waiter.cancel()

    async def notice(self, key: str, layout: Layout, reference: str, result: ChannelResult
                     ) -> RepaymentResult:
        """A provider's callback proved what became of ``reference``: journaled by this
        instance as the resolution of its attempts in doubt, once it owns the repayment,
        which is then driven on from there.  Owned by another instance: left to it."""
        self._gate(key)
        record = await self._journal.acquire(key)
        if record is None or record.status is not RepaymentStatus.PENDING:
            stored = record or await self._journal.load(key)
            if stored is None:
                raise UnknownRepayment(key)
            return stored.result()
        if any(a.reference == reference and a.round == record.round and a.in_doubt
               for a in record.attempts):
            attempt = next(a for a in record.attempts if a.reference == reference)
            await self._journal.resolve_attempts(
                key, record.round, reference, result.outcome, self._clock.now(),
                result.channel_reference)
            self._emit(AttemptResolved(key, attempt.channel, reference, result.outcome))
            stored = await self._journal.load(key)
            assert stored is not None
            record = stored
        return await self._run(_Drive(layout, record))

    # ---- the loop ---------------------------------------------------------------

    def _plan(self, drive: _Drive, opening: tuple[str, int] | None,
              collected: tuple[tuple[str, str | None], ...] = ()) -> Plan:
        record, layout = drive.record, drive.layout
        names = layout.names_for(record.preference)
        attempts = record.round_attempts()
        # Positional: this runs once per repayment, and keywords cost more.
        return Plan(
            record.key, record.round, names, layout.specs, self._clock.monotonic(),
            layout.config.deadline_s, attempts,
            self._doubts(attempts, layout) if opening is None else (), opening,
            self._query_attempts, self._query_backoff_s, collected,
        )

    async def _collected(self, record: JournalRecord) -> tuple[tuple[str, str | None], ...]:
        """Collections of this round a callback proved after their attempt was settled
        otherwise: a resumed drive ends on them instead of collecting again."""
        return tuple((c.channel, c.channel_reference)
                     for c in await self._journal.late_checks(record.key,
                                                              state=LateState.COLLECTED)
                     if c.round == record.round and c.found_by == "callback")

    def _doubts(self, attempts: Sequence[Attempt], layout: Layout) -> tuple[Doubt, ...]:
        """The attempts in doubt, each with the latest moment its request may have been
        sent, on the monotonic clock only (a wall clock can step): when this router's own
        call ended, or a thread of this process ended; for an attempt a stopped process
        left, when this router opened (on a journal only this router writes); for any
        other, now."""
        now = self._clock.monotonic()
        latest: dict[tuple[str, str], float] = {}
        for attempt in attempts:
            if not attempt.in_doubt:
                continue
            lane = layout.lanes.get(attempt.channel)
            ended = None if lane is None or lane.runner is None \
                else lane.runner.ended_at(attempt.reference, self._clock)
            # Another instance's attempt (a shared journal) was stamped by its own wall
            # clock, which may lag this one's: only "now" bounds when it was sent.
            before_open = self.opened_at if not self._shared \
                and attempt.started_at < self.opened_wall else None
            # The latest of every bound known: one for each way a request can have gone.
            bounds = [b for b in (self._sent_by.get(attempt.reference), ended, before_open)
                      if b is not None]
            sent_by = max(bounds) if bounds else now
            slot = (attempt.channel, attempt.reference)
            latest[slot] = max(latest.get(slot, sent_by), sent_by)
        return tuple(Doubt(channel, reference, when)
                     for (channel, reference), when in latest.items())

    async def _run(self, drive: _Drive, opening: tuple[str, int] | None = None
                   ) -> RepaymentResult:
        key = drive.record.key
        try:
            collected = () if opening is not None else await self._collected(drive.record)
        except BaseException:
            self._journal.let_lapse(key)  # as for any drive ended on an error
            raise
        flow = repayment_flow(self._plan(drive, opening, collected))
        perform = self._handlers
        try:
            action = next(flow)
            while True:
                action = flow.send(await perform[type(action)](action, drive))
        except StopIteration:
            pass
        except (OwnershipLost, TerminalStateError):
            # Another instance took it over (this one's lease ran out), and may have
            # ended it already: this flow stops here and never calls a channel for it
            # again; the caller gets the new owner's result.
            self._emit(OwnershipLostEvent(key))
            flow.close()
            self._release(drive)
            return await self._own(key, drive.layout, join=True)
        except BaseException:
            # Ended on an error (or stopped): the lease is no longer renewed, so another
            # instance (or this one) resumes it once it runs out.  Nothing is written.
            self._journal.let_lapse(key)
            raise
        finally:
            flow.close()
            self._release(drive)
        assert drive.result is not None
        if drive.result.status is RepaymentStatus.PENDING and key not in self._outliving \
                and not self.closing:
            # Nothing of it in the air: free for whichever instance reconciles it next.
            await self._journal.release(key)
        return drive.result

    @staticmethod
    def _release(drive: _Drive) -> None:
        """The one place a permit not used by a call is given back."""
        for name, permit in drive.permits.items():
            drive.layout.lanes[name].breaker.release(permit)
        drive.permits.clear()

    # ---- one handler per action ---------------------------------------------------

    async def _on_admit(self, action: Admit, drive: _Drive) -> Answer:
        return Answer(self._clock.monotonic(), refusal=self._admit(action, drive))

    async def _on_begin(self, action: Begin, drive: _Drive) -> Answer:
        record = drive.record
        self._gate(record.key)
        number = await self._journal.begin_attempt(
            record.key, record.round, action.channel, action.reference, self._clock.now())
        return Answer(self._clock.monotonic(), number=number)

    async def _on_resolve(self, action: Resolve, drive: _Drive) -> Answer:
        record, result = drive.record, action.result
        await self._journal.resolve_attempts(
            record.key, record.round, action.reference, result.outcome, self._clock.now(),
            result.channel_reference)
        self._emit(AttemptResolved(record.key, action.channel, action.reference,
                                   result.outcome))
        return Answer(self._clock.monotonic())

    async def _on_wait(self, action: Wait, drive: _Drive) -> Answer:
        await self._clock.sleep(action.seconds)
        return Answer(self._clock.monotonic())

    async def _on_emit(self, action: Emit, drive: _Drive) -> Answer:
        event = action.event
        if isinstance(event, ChannelSkipped):
            # "maintenance: Sun 02:00-04:00 UTC" -> "maintenance", for the evidence report.
            if event.reason == "ineligible":  # the reason found when the opening was chosen
                event = dataclasses.replace(
                    event, reason=drive.refused.get(event.channel, event.reason))
            drive.skips.append(Skip(event.channel, event.reason.split(":", 1)[0],
                                    self._clock.now(), drive.record.round))
        self._emit(event)
        return Answer(self._clock.monotonic())

    def _alternatives(self, drive: _Drive) -> tuple[str, ...]:
        record = drive.record
        return drive.layout.alternatives(record.amount, record.currency, self._clock,
                                         record.preference)

    async def _on_pending(self, action: Pending, drive: _Drive) -> Answer:
        record = drive.record
        await self._journal.set_pending(
            record.key, record.round, PendingReason.AWAITING_CHANNEL, action.channel,
            action.code, self._clock.now())
        if self._hooks:
            self._emit(RepaymentPending(record.key, action.channel, action.code,
                                        self._alternatives(drive)))
        stored = await self._journal.load(record.key)
        assert stored is not None
        drive.result = stored.result()
        return Answer(self._clock.monotonic())

    def _admit(self, action: Admit, drive: _Drive) -> str | None:
        record = drive.record
        self._gate(record.key)
        if action.retry:
            if not self._budget.try_retry():
                self._emit(RetryBudgetExhausted(record.key, action.channel))
                return "retry_budget"
        else:
            self._budget.record_call()
        reason, permit = drive.layout.admit(action.channel, record.amount, record.currency,
                                            self._clock)
        if permit is not None:
            drive.permits[action.channel] = permit
        return reason

    async def _on_call(self, action: Call, drive: _Drive) -> Answer:
        lane = drive.layout.lanes[action.channel]
        key = drive.record.key
        permit = drive.permits.pop(action.channel)
        try:
            # A shared journal: the lease must outlive the call (renewed first if short).
            await self._journal.hold(key, lane.config.timeout_s)
            # The gate is checked with no await before the adapter starts: once close()
            # has begun, no call starts.
            self._gate(key)
        except BaseException:
            lane.breaker.release(permit)
            raise
        request = drive.request(action.reference)
        started = self._clock.monotonic()
        running = False
        try:
            if self._hooks:  # inside: whatever a hook raises, the permit is given back
                self._emit(AttemptStarted(key, lane.name, action.reference, action.number))
            if lane.runner is not None:
                result, thread = await self._call_thread(lane, request)
                if thread is not None:
                    running = True
                    drive.running[action.number] = thread
            else:
                submit = cast(AdapterCall, lane.channel.submit)  # async: no runner
                result = await invoke(submit, request, lane.config.timeout_s,
                                      lane.config.outcome_map, self._clock)
        except BaseException:
            # Cancelled (the router is closing or the process is going down): neither a
            # success nor a failure of the channel; its request may have gone until now.
            lane.breaker.release(permit)
            self._remember_sent(action.reference)
            raise
        result = scrubbed(result, drive.record.account)  # before any event or record
        if result.outcome is Outcome.UNAVAILABLE and paused_for(lane.channel) > 0:
            # From a channel that asked for a pause (a Retry-After, or a call refused by
            # the pause another call's answer set meanwhile): neither a failure nor a
            # success.  The pause keeps it out for as long as it asked, which an open
            # breaker would not; a success would reset the failures and close a
            # half-open breaker.
            lane.breaker.release(permit)
        else:
            lane.breaker.record(permit, failed=breaker_failure(result.outcome))
        if not running and result.outcome not in SETTLING_SUBMIT_OUTCOMES:
            self._remember_sent(action.reference)  # in doubt: settle_s counts from now
        if self._hooks:
            self._emit(AttemptFinished(key, lane.name, action.reference, result.outcome,
                                       result.code, self._clock.monotonic() - started))
        return Answer(self._clock.monotonic(), result=result, running=running)

    def _remember_sent(self, reference: str) -> None:
        self._sent_by.pop(reference, None)
        self._sent_by[reference] = self._clock.monotonic()
        if len(self._sent_by) > 100_000:  # oldest first: a dict keeps insertion order
            del self._sent_by[next(iter(self._sent_by))]

    async def _call_thread(
        self, lane: Lane, request: ChannelRequest
    ) -> tuple[ChannelResult, asyncio.Future[Any] | None]:
        """A plain-``def`` submit: its answer, and its thread's future if it outlived the
        timeout (then it is still running, and the attempt stays in doubt)."""
        assert lane.runner is not None
        thread = lane.runner.start(lane.channel.submit, request, self._clock)
        if thread is None:
            return ChannelResult.unavailable(
                "sync_workers_busy", f"all {lane.runner.workers} threads of {lane.name} busy"
            ), None
        self.threads.add(thread)
        thread.add_done_callback(self.threads.discard)
        # From its start to its end, wherever this drive goes (cancelled by close(), an
        # error, a timeout): no other instance may take the repayment over meanwhile.
        runner, reference = lane.runner, request.reference
        self._journal.pin(request.repayment_key, lambda: runner.running(reference))

        async def wait(_: ChannelRequest) -> Any:
            return await asyncio.shield(thread)

        result = await invoke(wait, request, lane.config.timeout_s, lane.config.outcome_map,
                              self._clock)
        if not thread.done():
            return result, thread
        if result.code == "timeout":  # it ended just after the timeout: its answer counts
            error = thread.exception()
            result = answer_of(None if error else thread.result(), error=error,
                               codes=lane.config.outcome_map)
        return result, None

    async def _on_record(self, action: Record, drive: _Drive) -> Answer:
        record = drive.record
        await self._journal.finish_attempt(record.key, action.number,
                                           scrubbed(action.result, record.account),
                                           self._clock.now())
        thread = drive.running.pop(action.number, None)
        if thread is not None:
            # Journaled after the timeout's answer, so the thread's own answer is the last word.
            lane = drive.layout.lanes[action.channel]
            reference = make_reference(record.key, record.round, action.channel)
            self._outliving[record.key] = self._outliving.get(record.key, 0) + 1
            account = record.account
            thread.add_done_callback(
                lambda done: self._late(record.key, action.number, reference, lane, done,
                                        account))
        return Answer(self._clock.monotonic())

    def _late(self, key: str, number: int, reference: str, lane: Lane,
              thread: asyncio.Future[Any], account: str) -> None:
        """A plain-``def`` submit answered after its timeout: journal its answer."""
        left = self._outliving.pop(key, 1) - 1
        if left:
            self._outliving[key] = left
        error = thread.exception()
        result = scrubbed(answer_of(thread.result() if error is None else None, error=error,
                                    codes=lane.config.outcome_map), account)

        if self.closed:
            return  # closed: the attempt is left in doubt for the next open, as a crash leaves it

        async def write() -> None:
            try:
                await self._journal.finish_attempt(key, number, result, self._clock.now())
            except OwnershipLost:
                return  # its new owner asks the channel itself
            self._on_late_answer(key)

        task = asyncio.get_running_loop().create_task(write(), name=f"failover-late:{key}")
        self.late_writes.add(task)
        task.add_done_callback(self._late_written)

    def _late_written(self, task: asyncio.Task[None]) -> None:
        self.late_writes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("could not journal a late answer", exc_info=task.exception())

    async def _on_query(self, action: Query, drive: _Drive) -> Answer:
        lane = drive.layout.lanes[action.channel]
        self._gate(drive.record.key)
        request = drive.request(action.reference)
        asked = self._clock.monotonic()
        noticed = await self._noticed(drive.record.key, action.reference)
        if noticed is not None:
            # A provider's callback (here or on another instance) proved it collected.
            return Answer(self._clock.monotonic(), result=noticed, asked_at=asked)
        # Read before asking: a submit that was still running when the query was asked
        # can still land after the channel said NOT_FOUND.
        running = lane.runner is not None and lane.runner.running(action.reference)
        if lane.query_runner is not None:
            thread = lane.query_runner.start(lane.channel.query, request, self._clock,
                                             submit=False)
            if thread is None:
                result = ChannelResult.unknown("sync_workers_busy", "no thread for the query")
            else:
                async def wait(_: ChannelRequest) -> Any:
                    return await asyncio.shield(thread)

                result = await invoke(wait, request, lane.config.timeout_s, lane.config.outcome_map,
                                      self._clock)
        else:
            query = cast(AdapterCall, lane.channel.query)  # async: no runner
            result = await invoke(query, request, lane.config.timeout_s,
                                  lane.config.outcome_map, self._clock)
        result = scrubbed(result, drive.record.account)
        sent_by = None
        if lane.runner is not None:
            running = running or lane.runner.running(action.reference)
            sent_by = lane.runner.ended_at(action.reference, self._clock)
        return Answer(self._clock.monotonic(), result=result, asked_at=asked, running=running,
                      sent_by=sent_by)

    async def _noticed(self, key: str, reference: str) -> ChannelResult | None:
        """The collection a callback journaled for ``reference``, as a query's answer."""
        for check in await self._journal.late_checks(key, state=LateState.COLLECTED):
            if check.reference == reference:
                return ChannelResult.succeeded(check.channel_reference)
        return None

    async def _on_finish(self, action: Finish, drive: _Drive) -> Answer:
        record = drive.record
        resolution = None
        if action.resolution is not None:
            reference, answer = action.resolution
            resolution = Resolution(reference, answer.outcome, answer.channel_reference)
        attempt = action.attempt
        if attempt is not None:
            attempt = (attempt[0], scrubbed(attempt[1], record.account))
        code = action.code
        if code is not None and record.account in code:
            code = code.replace(record.account, _mask(record.account))
        final = await self._journal.finish(
            record.key, record.round, action.status, action.channel,
            action.channel_reference, code, self._clock.now(),
            attempt=attempt, resolution=resolution, skips=drive.skips,
        )
        if self._hooks:
            if resolution is not None:
                self._emit(AttemptResolved(record.key, action.channel or "",
                                           resolution.reference, resolution.outcome))
            attempts = len(final.round_attempts())
            if action.status is RepaymentStatus.SUCCEEDED:
                self._emit(RepaymentSucceeded(record.key, action.channel or "", attempts))
            else:
                self._emit(RepaymentFailed(record.key, action.code or "failed", attempts,
                                           self._alternatives(drive)))
        drive.result = final.result()
        return Answer(0.0)  # the flow ends here: nothing reads it
