"""The policies around one channel, outer to inner: retry (tenacity) → breaker
(pybreaker) → timeout → adapter.  Queries bypass the breaker."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pybreaker

from failover._channel import Call
from failover._clock import Clock, SystemClock
from failover._errors import ChannelUnavailable
from failover._models import ChannelRequest, ChannelResult, Outcome
from failover.config import BreakerConfig, RetryBudgetConfig
from failover.events import BreakerClosed, BreakerHalfOpened, BreakerOpened, Hook, emit

_SYSTEM_CLOCK = SystemClock()

CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN


class _CallFailed(Exception):
    """Raised inside ``calling()`` to make pybreaker count a failure."""


@dataclass(slots=True)
class Permit:
    """Leave to make one call through a breaker."""

    trial: bool
    used: bool = False
    """Set once a call was made with it (so it is recorded, not released)."""


class Breaker:
    """A channel's circuit breaker, driven from async code.

    pybreaker's ``CircuitBreaker`` is the state machine and the listener source.
    It is entered through ``calling()`` only once a call's outcome is known: a
    coroutine's failure is invisible to ``call``/``call_async``, and entering the
    context before awaiting would count a cancelled call as a success or a
    failure.  Admission is decided here, with the injected clock (pybreaker
    reads the wall clock itself): open until ``reset_timeout_s`` has passed,
    then exactly one trial call while half-open.
    """

    def __init__(
        self, name: str, config: BreakerConfig, clock: Clock, hooks: Sequence[Hook] = (),
        storage: Any = None,
    ) -> None:
        self.name = name
        self._clock = clock
        self._hooks = hooks
        self._reset_timeout_s = config.reset_timeout_s
        self._opened_at: float | None = None
        self._trial_in_flight = False
        self.transitions: list[tuple[float, str]] = []
        """(monotonic time, new state) for every transition; benchmarks plot it."""
        self._cb = pybreaker.CircuitBreaker(
            fail_max=config.fail_max,
            reset_timeout=config.reset_timeout_s,
            name=name,
            # Re-raise the call's own failure on trip; we translate nothing through errors.
            throw_new_error_on_trip=False,
            listeners=[_Listener(self)],
            state_storage=storage,
        )

    def reconfigure(self, config: BreakerConfig) -> None:
        self._cb.fail_max = config.fail_max
        self._cb.reset_timeout = config.reset_timeout_s
        self._reset_timeout_s = config.reset_timeout_s

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open`` as pybreaker holds it."""
        return str(self._cb.current_state)

    @property
    def fail_counter(self) -> int:
        return int(self._cb.fail_counter)

    def _reset_elapsed(self) -> bool:
        if self._opened_at is None:  # opened elsewhere (shared storage) or before we watched
            self._opened_at = self._clock.monotonic()
        return self._clock.monotonic() - self._opened_at >= self._reset_timeout_s

    def admits(self) -> bool:
        """Whether a call would be let through now (no state change)."""
        state = self.state
        if state == CLOSED:
            return True
        if state == OPEN:
            return self._reset_elapsed()
        return not self._trial_in_flight

    def acquire(self) -> Permit | None:
        """Reserve one call, or ``None`` if the breaker turns it away (no call, no wait)."""
        state = self.state
        if state == CLOSED:
            return Permit(trial=False)
        if state == OPEN:
            if not self._reset_elapsed():
                return None
            self._cb.half_open()
        if self._trial_in_flight:
            return None
        self._trial_in_flight = True
        return Permit(trial=True)

    def record(self, permit: Permit, failed: bool) -> None:
        """Count a finished call as a success or a failure."""
        if permit.trial:
            self._trial_in_flight = False
        state = self.state
        if state == OPEN or (state == HALF_OPEN and not permit.trial):
            # A call admitted before the breaker opened ended late: the trial decides now.
            return
        with contextlib.suppress(_CallFailed), self._cb.calling():
            if failed:
                raise _CallFailed

    def release(self, permit: Permit) -> None:
        """Give a permit back without counting anything (the call was cancelled)."""
        if permit.trial:
            self._trial_in_flight = False

    def _changed(self, new_state: str) -> None:
        now = self._clock.monotonic()
        self.transitions.append((now, new_state))
        if new_state == OPEN:
            self._opened_at = now
            emit(self._hooks, BreakerOpened(self.name))
        elif new_state == HALF_OPEN:
            emit(self._hooks, BreakerHalfOpened(self.name))
        else:
            self._opened_at = None
            emit(self._hooks, BreakerClosed(self.name))


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, breaker: Breaker) -> None:
        self._breaker = breaker

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        self._breaker._changed(new_state.name)


class RetryBudget:
    """Allows retries while they stay under ``ratio`` of first calls in the last
    ``window_s`` plus ``min_per_s`` per second, so a failing channel cannot turn
    every repayment into ``max_attempts`` calls (a retry storm)."""

    def __init__(self, config: RetryBudgetConfig, clock: Clock) -> None:
        self._config = config
        self._clock = clock
        self._calls: collections.deque[float] = collections.deque()
        self._retries: collections.deque[float] = collections.deque()

    def _prune(self, now: float) -> None:
        horizon = now - self._config.window_s
        for stamps in (self._calls, self._retries):
            while stamps and stamps[0] < horizon:
                stamps.popleft()

    def reconfigure(self, config: RetryBudgetConfig) -> None:
        self._config = config

    def record_call(self) -> None:
        now = self._clock.monotonic()
        self._prune(now)
        self._calls.append(now)

    def try_retry(self) -> bool:
        """Take one retry from the budget if there is one left."""
        now = self._clock.monotonic()
        self._prune(now)
        allowed = (
            self._config.min_per_s * self._config.window_s
            + self._config.ratio * len(self._calls)
        )
        if len(self._retries) >= allowed:
            return False
        self._retries.append(now)
        return True


async def invoke(
    call: Call, request: ChannelRequest, timeout_s: float,
    codes: Mapping[str, str] | None = None, clock: Clock | None = None,
) -> ChannelResult:
    """Call an adapter and turn whatever happens into a ``ChannelResult``: the one
    place where exceptions become outcomes.

    ``ChannelUnavailable`` means nothing was collected; the timeout (on ``clock``)
    and any other exception mean the outcome is unknown, ``CancelledError`` raised
    by the adapter itself included.  Only the router's own cancellation (of the task
    making the call) propagates: it is never a channel's answer.  So do
    ``KeyboardInterrupt`` and ``SystemExit``: the process is going down, and the
    attempt stays "sent" for recovery.
    """
    try:
        async with (clock or _SYSTEM_CLOCK).timeout(timeout_s):
            value = await call(request)
    except TimeoutError:
        # Our own codes (timeout, adapter_error, bad_result) are never remapped: the
        # operator's map classifies what providers say, not what nobody heard.
        return ChannelResult.unknown("timeout", f"no answer within {timeout_s}s")
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the router's own cancellation
        return ChannelResult.unknown("adapter_cancelled", "the adapter raised CancelledError")
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        return answer_of(error=exc, codes=codes)
    return answer_of(value, codes=codes)


def answer_of(
    value: object = None, *, error: BaseException | None = None,
    codes: Mapping[str, str] | None = None,
) -> ChannelResult:
    """What an adapter's return value (or exception) says, checked and reclassified."""
    if error is not None:
        if isinstance(error, ChannelUnavailable):
            result = ChannelResult.unavailable(error.code, error.detail)
            return reclassify(result, codes) if codes else result
        return ChannelResult.unknown("adapter_error", f"{type(error).__name__}: {error}")
    if inspect.iscoroutine(value):  # a plain def that returned a coroutine: never run
        value.close()
        return ChannelResult.unknown(
            "bad_result", "a plain-def adapter method returned a coroutine: declare it async def")
    problem = _malformed(value)
    if problem is not None:
        return ChannelResult.unknown("bad_result", problem)
    assert isinstance(value, ChannelResult)
    return reclassify(value, codes) if codes else value


def _malformed(value: object) -> str | None:
    """Why ``value`` is not a usable ``ChannelResult``, or ``None``.

    Checked field by field: a journal must never be handed a value it cannot store
    (an outcome given as a plain string, a numeric code)."""
    if not isinstance(value, ChannelResult):
        return f"adapter returned {type(value).__name__}, not a ChannelResult"
    if not isinstance(value.outcome, Outcome):
        return f"outcome {value.outcome!r} is not a failover.Outcome"
    for name in ("channel_reference", "code", "detail"):
        field_value = getattr(value, name)
        if field_value is not None and not isinstance(field_value, str):
            return f"{name} {field_value!r} is not a string"
    return None


def reclassify(result: ChannelResult, codes: Mapping[str, str]) -> ChannelResult:
    """Apply an operator's code map (``[channels.X.codes]``) to an answer.

    Only a listed code changes the outcome; an unlisted one keeps what the adapter
    said, so an unrecognised error stays ``UNKNOWN``.
    """
    mapped = codes.get(result.code) if result.code is not None else None
    if mapped is None or mapped == result.outcome.value:
        return result
    return dataclasses.replace(result, outcome=Outcome(mapped))


def breaker_failure(outcome: Outcome) -> bool:
    """Whether an outcome counts against the channel's breaker (DESIGN §1 table)."""
    return outcome in (Outcome.UNAVAILABLE, Outcome.UNKNOWN, Outcome.NOT_FOUND)
