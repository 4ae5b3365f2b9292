"""The router: channel order, failover, unknown-outcome resolution, idempotent repay."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tenacity import AsyncRetrying, RetryCallState, stop_after_attempt, wait_exponential

from failover import _decisions as decide
from failover._adapters import build_channels
from failover._channel import Call, Channel, as_async, check_channel
from failover._clock import Clock, Sleep, SystemClock, real_sleep
from failover._decisions import ChannelEnd, Verdict
from failover._eligibility import BREAKER_OPEN, Eligibility, priority_order, refusal
from failover._errors import ConfigError, RouterClosedError, UnknownRepayment
from failover._models import (
    ChannelRequest,
    ChannelResult,
    Outcome,
    PendingReason,
    Repayment,
    RepaymentResult,
    RepaymentStatus,
)
from failover._policy import Breaker, Permit, RetryBudget, breaker_failure, invoke
from failover.config import ChannelConfig, RouterConfig
from failover.events import (
    AttemptFinished,
    AttemptResolved,
    AttemptStarted,
    ChannelSkipped,
    Event,
    FailedOver,
    Hook,
    RepaymentFailed,
    RepaymentPending,
    RepaymentSucceeded,
    RetryBudgetExhausted,
    emit,
)
from failover.journal._base import Journal, Record, Resolution

_log = logging.getLogger("failover")

DEADLINE = "deadline"
NO_ELIGIBLE_CHANNEL = "no_eligible_channel"
EXHAUSTED = "exhausted"


def make_reference(key: str, round: int, channel: str) -> str:
    """The reference of a repayment on a channel in a round.

    Derived, not random: every retry, every restart and every instance computes
    the same one, so an idempotent channel deduplicates and ``query`` finds it.
    A new round (``retry(key)``) gets a new one, so a deduplicating channel does
    not simply replay its old decline.
    """
    digest = hashlib.blake2b(f"{key}\x1f{round}\x1f{channel}".encode(), digest_size=12)
    return f"fo-{digest.hexdigest()}"


@dataclass(slots=True)
class Lane:
    """One channel with its configuration and breaker."""

    channel: Channel
    config: ChannelConfig
    breaker: Breaker
    submit: Call
    query: Call

    @property
    def name(self) -> str:
        return self.channel.name

    @property
    def idempotent(self) -> bool:
        return bool(getattr(self.channel, "idempotent", False))


@dataclass(slots=True)
class _Opening:
    """The first call of a new repayment, its attempt journaled with the intent."""

    lane: Lane
    permit: Permit
    number: int = 1


@dataclass(slots=True)
class _ChannelRun:
    """What trying one channel has shown so far."""

    last: Verdict = Verdict.SKIPPED
    doubt: bool = False
    called: bool = False
    code: str | None = None
    channel_reference: str | None = None
    attempt: tuple[int, ChannelResult] | None = None
    """The deciding answer, written together with the repayment's end."""
    resolution: Resolution | None = None


@dataclass(slots=True)
class _Layout:
    """A configuration and the lanes in priority order: the unit ``reconfigure`` swaps,
    so a repayment in flight keeps the one it started with."""

    config: RouterConfig
    lanes: dict[str, Lane] = field(default_factory=dict)
    order: tuple[str, ...] = ()


class Router:
    """Collects repayments through channels in priority order, failing over safely.

    Use as ``async with Router(...) as router``; opening the router opens the
    journal and recovers work a crash left unfinished.
    """

    def __init__(
        self,
        channels: Sequence[Channel],
        journal: Journal,
        config: RouterConfig | None = None,
        *,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
        hooks: Iterable[Hook] = (),
        recovery_concurrency: int = 16,
        query_attempts: int = 3,
        query_backoff_s: float = 0.05,
    ) -> None:
        self._journal = journal
        self._clock: Clock = clock or SystemClock()
        self._sleep: Sleep = sleep or real_sleep
        self._hooks: tuple[Hook, ...] = tuple(hooks)
        self._recovery_concurrency = recovery_concurrency
        self._query_attempts = query_attempts
        self._query_backoff_s = query_backoff_s
        self._channels = list(channels)
        config = config or RouterConfig()
        self._layout = self._build_layout(config, {})
        self._budget = RetryBudget(config.retry_budget, self._clock)
        self._tasks: dict[str, asyncio.Task[RepaymentResult]] = {}
        self._recovery: asyncio.Task[list[RepaymentResult]] | None = None
        self._watchers: list[set[str]] = []
        self._open = False

    # ---- construction ------------------------------------------------------

    @classmethod
    def from_config(
        cls, config: str | Path | RouterConfig, *, journal: Journal, **kwargs: Any
    ) -> Self:
        """Build a router whose channels come from the file's ``adapter`` and ``options``.

        ``config`` is a path (TOML or YAML, with ``FAILOVER_*`` overrides) or a loaded
        ``RouterConfig``.  The journal is never implied: pass ``SQLiteJournal(path)``.
        """
        source = "config"
        if not isinstance(config, RouterConfig):
            source = str(config)
            config = RouterConfig.load(config)
        return cls(build_channels(config, source), journal, config, **kwargs)

    def _build_layout(self, config: RouterConfig, breakers: dict[str, Breaker]) -> _Layout:
        names: list[str] = []
        for channel in self._channels:
            check_channel(channel)
            if channel.name in names:
                raise ConfigError(f"two channels are named {channel.name!r}")
            names.append(channel.name)
        unknown = sorted(set(config.channels) - set(names))
        if unknown:
            raise ConfigError(
                f"configuration names channels the router does not have: {', '.join(unknown)}"
                f" (channels: {', '.join(names)})"
            )
        if not names:
            raise ConfigError("a router needs at least one channel")
        layout = _Layout(config)
        for channel in self._channels:
            channel_config = config.channel(channel.name)
            breaker = breakers.get(channel.name)
            if breaker is None:
                breaker = Breaker(channel.name, channel_config.breaker, self._clock, self._hooks)
            else:
                breaker.reconfigure(channel_config.breaker)
            layout.lanes[channel.name] = Lane(
                channel, channel_config, breaker,
                as_async(channel.submit), as_async(channel.query),
            )

        layout.order = priority_order(config, names)
        return layout

    def reconfigure(self, config: RouterConfig) -> None:
        """Swap priority, limits, windows and policies without a restart.

        Repayments in flight finish under the configuration they started with;
        breakers keep their state.
        """
        breakers = {name: lane.breaker for name, lane in self._layout.lanes.items()}
        self._layout = self._build_layout(config, breakers)
        self._budget.reconfigure(config.retry_budget)

    @property
    def config(self) -> RouterConfig:
        return self._layout.config

    @property
    def channel_names(self) -> tuple[str, ...]:
        """Channel names in priority order."""
        return self._layout.order

    def breaker(self, channel: str) -> Breaker:
        """The breaker of ``channel`` (for dashboards and tests)."""
        try:
            return self._layout.lanes[channel].breaker
        except KeyError:
            raise ConfigError(f"unknown channel {channel!r}") from None

    # ---- lifecycle ----------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Open the journal and start recovering what a crash left in flight."""
        if self._open:
            return
        await self._journal.open()
        self._open = True
        keys = await self._journal.pending_keys(PendingReason.IN_FLIGHT)
        if keys:
            self._recovery = asyncio.create_task(self._drain(keys, keep=False),
                                                 name="failover:recovery")

    async def close(self) -> None:
        """Cancel work in flight (recovered on the next open) and close the journal."""
        if not self._open:
            return
        self._abandon()
        pending = [t for t in (self._recovery, *self._tasks.values()) if t is not None]
        await asyncio.gather(*pending, return_exceptions=True)
        self._tasks.clear()
        await self._journal.close()

    def _abandon(self) -> None:
        """Stop everything in flight without writing anything more: what a crash does."""
        self._open = False
        if self._recovery is not None:
            self._recovery.cancel()
        for task in self._tasks.values():
            task.cancel()

    async def wait_recovered(self) -> None:
        """Wait until the work recovered on open has finished (or is pending)."""
        if self._recovery is not None:
            await asyncio.shield(self._recovery)
            return

    def _require_open(self) -> None:
        if not self._open:
            raise RouterClosedError("the router is not open: use 'async with router:'")

    # ---- public operations --------------------------------------------------

    async def repay(
        self, repayment: Repayment, *, channels: Sequence[str] | None = None
    ) -> RepaymentResult:
        """Collect ``repayment``, or return what happened to it already.

        ``channels`` restricts and orders the channels for this repayment (a
        borrower's preference); it is stored with the intent, so a repayment
        resumed after a crash keeps it.  Calling ``repay`` again with the same key
        joins or returns the first call's repayment and never collects twice.
        Cancelling the call stops the caller's wait, not the repayment.
        """
        self._require_open()
        if not isinstance(repayment, Repayment):
            raise TypeError(f"repay() takes a failover.Repayment, not {type(repayment).__name__}")
        preference = self._check_preference(channels)
        opening = self._opening(repayment, preference)
        first = None
        if opening is not None:
            first = (opening.lane.name, make_reference(repayment.key, 1, opening.lane.name))
        try:
            # The intent and, for a new key, the first attempt "sent": one journal write.
            record, created = await self._journal.create(
                repayment, preference, self._clock.now(), first_attempt=first
            )
        except BaseException:
            if opening is not None:
                opening.lane.breaker.release(opening.permit)
            raise
        if not created:
            if opening is not None:
                opening.lane.breaker.release(opening.permit)
            record.check_same(repayment)
            if record.status is not RepaymentStatus.PENDING:
                return record.result()
            return await self._join(record.key)
        return await self._join(record.key, record, opening)

    def _opening(
        self, repayment: Repayment, preference: tuple[str, ...] | None
    ) -> _Opening | None:
        """The channel a new repayment would call first, with its breaker permit."""
        layout = self._layout
        for name in preference if preference is not None else layout.order:
            lane = layout.lanes[name]
            if self.ineligible(lane, repayment) is None:
                permit = lane.breaker.acquire()
                if permit is not None:
                    return _Opening(lane, permit)
        return None

    async def get(self, key: str) -> RepaymentResult | None:
        """The current result of ``key``, or ``None`` if the journal does not hold it."""
        self._require_open()
        record = await self._journal.load(key)
        return None if record is None else record.result()

    async def reconcile(self) -> list[RepaymentResult]:
        """Resolve every ``PENDING`` repayment now: ask the channels in doubt and
        resume failover where nothing was collected.  Returns their results."""
        self._require_open()
        keys = await self._journal.pending_keys()
        return await self._drain(keys)

    async def retry(self, key: str) -> RepaymentResult:
        """Start a new round for a ``FAILED`` repayment, with new channel references.

        A repayment that is not ``FAILED`` is returned as it stands (``SUCCEEDED`` is final).
        """
        self._require_open()
        record = await self._journal.load(key)
        if record is None:
            raise UnknownRepayment(key)
        if record.status is RepaymentStatus.SUCCEEDED:
            return record.result()
        if record.status is RepaymentStatus.FAILED and key not in self._tasks:
            await self._journal.new_round(key, self._clock.now())
        return await self._join(key)

    def _check_preference(self, channels: Sequence[str] | None) -> tuple[str, ...] | None:
        if channels is None:
            return None
        if isinstance(channels, str):
            raise ConfigError("channels must be a list of channel names, not one string")
        names = tuple(channels)
        unknown = [name for name in names if name not in self._layout.lanes]
        if unknown:
            raise ConfigError(
                f"unknown channel name(s) in channels=: {', '.join(map(repr, unknown))}"
                f" (known: {', '.join(self._layout.order)})"
            )
        return tuple(dict.fromkeys(names))

    # ---- the work -------------------------------------------------------------

    async def _join(
        self, key: str, fresh: Record | None = None, opening: _Opening | None = None
    ) -> RepaymentResult:
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.create_task(self._drive(key, fresh, opening), name=f"failover:{key}")
            self._tasks[key] = task
            task.add_done_callback(self._forget)
        # The repayment carries on if the caller is cancelled.
        return await asyncio.shield(task)

    def _forget(self, task: asyncio.Task[RepaymentResult]) -> None:
        key = task.get_name().removeprefix("failover:")
        if self._tasks.get(key) is task:
            del self._tasks[key]
        for ended in self._watchers:
            ended.add(key)
        if task.cancelled():
            return
        error = task.exception()  # retrieved here, so asyncio never warns it was not
        if isinstance(error, Exception):
            _log.error("repayment %r stopped on an error", key, exc_info=error)

    async def _drain(self, keys: Sequence[str], keep: bool = True) -> list[RepaymentResult]:
        """Run ``keys`` with at most ``recovery_concurrency`` at a time.

        Records are read a chunk at a time (one journal read for many repayments). A
        record read here is used only if no work on its key ended since the read;
        otherwise the repayment reads its own.  ``keep=False`` (recovery) keeps no
        results, so recovering a million repayments does not hold a million results.
        """
        results: list[RepaymentResult] = []
        ended: set[str] = set()
        self._watchers.append(ended)
        try:
            step = max(4 * self._recovery_concurrency, 256)
            for start in range(0, len(keys), step):
                part = keys[start:start + step]
                ended.clear()
                records = await self._journal.load_many(part)
                queue = iter(part)

                async def worker(queue: Iterator[str] = queue,
                                 records: dict[str, Record] = records) -> None:
                    for key in queue:
                        fresh = None if key in ended else records.pop(key, None)
                        try:
                            result = await self._join(key, fresh)
                            if keep:
                                results.append(result)
                        except asyncio.CancelledError:
                            raise
                        except Exception:
                            _log.exception("could not resume repayment %r", key)

                workers = min(self._recovery_concurrency, len(part))
                await asyncio.gather(*(worker() for _ in range(workers)))
        finally:
            # By identity: two drains' sets can be equal (both empty), list.remove would
            # take the wrong one.
            self._watchers = [w for w in self._watchers if w is not ended]
        return results

    def _emit(self, event: Event) -> None:
        if self._hooks:
            emit(self._hooks, event)

    async def _drive(
        self, key: str, fresh: Record | None = None, opening: _Opening | None = None
    ) -> RepaymentResult:
        # A record just created needs no second read; any other is read afresh.
        record = fresh or await self._journal.load(key)
        if record is None:
            raise UnknownRepayment(key)
        if record.status is not RepaymentStatus.PENDING:
            return record.result()
        decided = decide.decided_by(record.round_attempts())
        if decided is not None:
            outcome, attempt = decided
            if outcome is Outcome.SUCCEEDED:
                return await self._finish(record, RepaymentStatus.SUCCEEDED, attempt.channel,
                                          attempt.channel_reference, None)
            return await self._finish(record, RepaymentStatus.FAILED, attempt.channel, None,
                                      attempt.code or "rejected")
        layout = self._layout
        if opening is not None:  # a new repayment: its only attempt is about to be made
            try:
                return await self._pass(record, layout, {}, opening)
            finally:
                if not opening.permit.used:
                    opening.lane.breaker.release(opening.permit)
        settled = await self._settle_doubts(record, layout)
        if isinstance(settled, RepaymentResult):
            return settled
        return await self._pass(record, layout, settled)

    def _request(self, record: Record, reference: str) -> ChannelRequest:
        return ChannelRequest(
            repayment_key=record.key, reference=reference, account=record.account,
            amount=record.amount, currency=record.currency, metadata=record.metadata,
        )

    async def _settle_doubts(
        self, record: Record, layout: _Layout
    ) -> RepaymentResult | dict[str, Outcome]:
        """Ask the channels about attempts still in doubt (a crash, an earlier
        ``PENDING``) before anything else is tried.  Returns the result if that
        decides the repayment, else what each channel's answer proved."""
        proved: dict[str, Outcome] = {}
        doubtful = dict.fromkeys((a.channel, a.reference) for a in record.round_attempts()
                                 if a.in_doubt)
        for channel, reference in doubtful:
            lane = layout.lanes.get(channel)
            if lane is None:
                return await self._pending(record, channel, "channel_not_configured")
            answer = await self._query(lane, self._request(record, reference))
            verdict = decide.after_query(answer.outcome)
            if not decide.settles_doubt(verdict):
                return await self._pending(record, channel, answer.code or "unknown")
            if verdict is Verdict.COLLECTED:
                return await self._finish(
                    record, RepaymentStatus.SUCCEEDED, channel, answer.channel_reference, None,
                    resolution=self._resolution(record, channel, reference, answer),
                )
            await self._resolve(record, channel, reference, answer)
            proved[channel] = answer.outcome
            if verdict is Verdict.STOP:
                return await self._finish(
                    record, RepaymentStatus.FAILED, channel, None, answer.code or "rejected"
                )
        return proved

    def _pass_order(
        self, record: Record, layout: _Layout, proved: dict[str, Outcome], fresh: bool = False
    ) -> list[Lane]:
        """Channels for a new pass: the preference (or priority) order, without
        channels that declined or rejected this round; channels already tried
        without an answer go last, so failover moves on to the next channel.
        A ``fresh`` repayment's only attempt is the opening one, not yet made."""
        names = record.preference if record.preference is not None else layout.order
        earlier = () if fresh else record.round_attempts()
        refused = {
            a.channel for a in earlier if decide.refuses_again(a.outcome, a.resolution)
        } | {name for name, outcome in proved.items() if decide.refuses_again(outcome, None)}
        tried = {a.channel for a in earlier}
        lanes = [layout.lanes[n] for n in names if n in layout.lanes and n not in refused]
        lanes.sort(key=lambda lane: lane.name in tried)
        return lanes

    def ineligible(self, lane: Lane, record: Record | Repayment) -> str | None:
        """Why ``lane`` cannot take this repayment now, or ``None``."""
        ruled_out = refusal(lane.config, record.amount, record.currency, self._clock.now)
        if ruled_out is not None:
            return f"{ruled_out[0]}: {ruled_out[1]}"
        if not lane.breaker.admits():
            return BREAKER_OPEN
        return None

    def explain(
        self, repayment: Repayment, *, channels: Sequence[str] | None = None
    ) -> list[Eligibility]:
        """The order this router would try channels for ``repayment`` now and, for each
        channel it would skip, why (disabled, limits, maintenance, breaker_open)."""
        layout = self._layout
        names = self._check_preference(channels) or layout.order
        verdicts = []
        for name in names:
            lane = layout.lanes[name]
            ruled_out = refusal(lane.config, repayment.amount, repayment.currency,
                                self._clock.now())
            if ruled_out is None and not lane.breaker.admits():
                ruled_out = (BREAKER_OPEN, f"circuit breaker {lane.breaker.state}")
            reason, detail = ruled_out if ruled_out else (None, None)
            verdicts.append(Eligibility(name, reason, detail))
        return verdicts

    async def _pass(
        self, record: Record, layout: _Layout, proved: dict[str, Outcome],
        opening: _Opening | None = None,
    ) -> RepaymentResult:
        """One pass over the eligible channels, each tried at most once (with retries).

        With an ``opening`` the pass starts at its channel, whose attempt is journaled
        already; the channels before it were found ineligible when it was chosen.
        """
        deadline = self._clock.monotonic() + layout.config.deadline_s
        previous: str | None = None
        last_code: str | None = None
        called_any = False
        for lane in self._pass_order(record, layout, proved, fresh=opening is not None):
            if opening is not None and lane is not opening.lane:
                self._emit(ChannelSkipped(record.key, lane.name, "ineligible"))
                continue
            if opening is None:
                reason = self.ineligible(lane, record)
                if reason is not None:
                    self._emit(ChannelSkipped(record.key, lane.name, reason))
                    continue
                if self._clock.monotonic() >= deadline:
                    return await self._finish(record, RepaymentStatus.FAILED, None, None,
                                              DEADLINE)
            if previous is not None:
                self._emit(FailedOver(record.key, previous, lane.name, last_code or "failed"))
            run = await self._try_channel(record, lane, deadline, opening)
            opening = None
            end = decide.channel_end(run.last, run.doubt, run.called)
            if end is ChannelEnd.SKIPPED:
                self._emit(ChannelSkipped(record.key, lane.name, "breaker_open"))
                continue
            called_any = True
            if end is ChannelEnd.SUCCEEDED:
                return await self._finish(
                    record, RepaymentStatus.SUCCEEDED, lane.name, run.channel_reference, None,
                    attempt=run.attempt, resolution=run.resolution,
                )
            if end is ChannelEnd.FAILED:
                return await self._finish(
                    record, RepaymentStatus.FAILED, lane.name, None, run.code or "rejected"
                )
            if end is ChannelEnd.PENDING:
                return await self._pending(record, lane.name, run.code or "unknown")
            previous, last_code = lane.name, run.code
        code = (last_code or EXHAUSTED) if called_any else NO_ELIGIBLE_CHANNEL
        return await self._finish(record, RepaymentStatus.FAILED, None, None, code)

    def _submit_verdict(self, outcome: Outcome) -> Verdict:
        # A seam for the mutation test, which swaps in a router that fails over on UNKNOWN.
        return decide.after_submit(outcome)

    async def _try_channel(
        self, record: Record, lane: Lane, deadline: float, opening: _Opening | None = None
    ) -> _ChannelRun:
        """Try one channel with its retry policy; the reference is the same for every call."""
        reference = make_reference(record.key, record.round, lane.name)
        request = self._request(record, reference)
        run = _ChannelRun()
        max_attempts = lane.config.retry.max_attempts
        self._budget.record_call()

        async def attempt() -> Verdict:
            nonlocal opening
            if opening is not None:  # journaled with the intent; its permit is held
                permit, number, opening = opening.permit, opening.number, None
                permit.used = True
            else:
                acquired = lane.breaker.acquire()
                if acquired is None:
                    run.last = Verdict.SKIPPED
                    return run.last
                permit, number = acquired, 0
            try:
                if number == 0:
                    number = await self._journal.begin_attempt(
                        record.key, record.round, lane.name, reference, self._clock.now()
                    )
                if self._hooks:
                    self._emit(AttemptStarted(record.key, lane.name, reference, number))
                started = self._clock.monotonic()
                result = await invoke(lane.submit, request, lane.config.timeout_s,
                                      lane.config.codes)
            except BaseException:
                # Cancelled (or the process is going down): neither success nor failure.
                lane.breaker.release(permit)
                raise
            run.called = True
            lane.breaker.record(permit, failed=breaker_failure(result.outcome))
            verdict, answer = self._submit_verdict(result.outcome), result
            if verdict is Verdict.COLLECTED:
                # Written with the repayment's end, one journal write instead of two; a
                # crash in between leaves the attempt "sent", and recovery asks the channel.
                run.attempt = (number, result)
            else:
                await self._journal.finish_attempt(record.key, number, result,
                                                   self._clock.now())
            if self._hooks:
                self._emit(AttemptFinished(
                    record.key, lane.name, reference, result.outcome, result.code,
                    self._clock.monotonic() - started,
                ))
            if verdict is Verdict.NEEDS_QUERY:
                run.doubt = True
                answer = await self._query(lane, request)
                verdict = decide.after_query(answer.outcome)
            if run.doubt and decide.settles_doubt(verdict):
                if verdict is Verdict.COLLECTED:
                    run.resolution = self._resolution(record, lane.name, reference, answer)
                else:
                    await self._resolve(record, lane.name, reference, answer)
                run.doubt = False
            run.last = verdict
            run.code = answer.code or result.code
            if verdict is Verdict.COLLECTED:
                run.channel_reference = answer.channel_reference or result.channel_reference
            return verdict

        def wants_retry(verdict: Verdict, calls_made: int) -> bool:
            if not decide.may_retry_same(verdict, lane.idempotent):
                return False
            if calls_made >= max_attempts or self._clock.monotonic() >= deadline:
                return False
            if not self._budget.try_retry():
                self._emit(RetryBudgetExhausted(record.key, lane.name))
                return False
            return True

        # The first call runs bare: most calls need no retry, and building a tenacity
        # run costs more than the rest of the router's work on an instant channel.
        if not wants_retry(await attempt(), 1):
            return run

        def should_retry(state: RetryCallState) -> bool:
            if state.outcome is None or state.outcome.failed:
                return False  # errors from the journal or a crash are never retried
            return wants_retry(state.outcome.result(), state.attempt_number + 1)

        policy = lane.config.retry
        await self._sleep(policy.initial_backoff_s)
        # A fresh AsyncRetrying per call: a shared one mixes up concurrent repayments' state.
        # It runs calls 2..max_attempts; its n-th wait follows call n + 1, hence 2 x initial.
        retrying = AsyncRetrying(
            stop=stop_after_attempt(max_attempts - 1),
            wait=wait_exponential(
                multiplier=2 * policy.initial_backoff_s,
                min=policy.initial_backoff_s,
                max=policy.max_backoff_s,
            ),
            retry=should_retry,
            sleep=self._sleep,
            retry_error_callback=_last_result,
        )
        await retrying(attempt)
        return run

    async def _query(self, lane: Lane, request: ChannelRequest) -> ChannelResult:
        """Ask a channel about a reference: bypasses the breaker, never trips it,
        a few quick retries while the answer proves nothing."""
        first = await invoke(lane.query, request, lane.config.timeout_s, lane.config.codes)
        if first.outcome.is_definitive or self._query_attempts <= 1:
            return first
        # As for submits, tenacity runs only once a retry is due: calls 2..query_attempts.
        await self._sleep(self._query_backoff_s)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._query_attempts - 1),
            wait=wait_exponential(multiplier=2 * self._query_backoff_s, max=1.0),
            retry=_inconclusive,
            sleep=self._sleep,
            retry_error_callback=_last_result,
        )
        result: ChannelResult = await retrying(
            invoke, lane.query, request, lane.config.timeout_s, lane.config.codes
        )
        return result

    def _resolution(
        self, record: Record, channel: str, reference: str, answer: ChannelResult
    ) -> Resolution:
        self._emit(AttemptResolved(record.key, channel, reference, answer.outcome))
        return Resolution(reference, answer.outcome, answer.channel_reference)

    async def _resolve(
        self, record: Record, channel: str, reference: str, answer: ChannelResult
    ) -> None:
        outcome = answer.outcome
        await self._journal.resolve_attempts(
            record.key, record.round, reference, outcome, self._clock.now(),
            answer.channel_reference,
        )
        self._emit(AttemptResolved(record.key, channel, reference, outcome))

    async def _finish(
        self, record: Record, status: RepaymentStatus, channel: str | None,
        channel_reference: str | None, code: str | None,
        *, attempt: tuple[int, ChannelResult] | None = None,
        resolution: Resolution | None = None,
    ) -> RepaymentResult:
        final = await self._journal.finish(
            record.key, record.round, status, channel, channel_reference, code,
            self._clock.now(), attempt=attempt, resolution=resolution,
        )
        if self._hooks:
            attempts = len(final.round_attempts())
            if status is RepaymentStatus.SUCCEEDED:
                self._emit(RepaymentSucceeded(record.key, channel or "", attempts))
            else:
                self._emit(RepaymentFailed(record.key, code or "failed", attempts))
        return final.result()

    async def _pending(self, record: Record, channel: str, code: str) -> RepaymentResult:
        await self._journal.set_pending(
            record.key, record.round, PendingReason.AWAITING_CHANNEL, channel, code,
            self._clock.now(),
        )
        self._emit(RepaymentPending(record.key, channel, code))
        stored = await self._journal.load(record.key)
        assert stored is not None
        return stored.result()


def _last_result(state: RetryCallState) -> Any:
    assert state.outcome is not None
    return state.outcome.result()


def _inconclusive(state: RetryCallState) -> bool:
    if state.outcome is None or state.outcome.failed:
        return False
    result: ChannelResult = state.outcome.result()
    return not result.outcome.is_definitive

