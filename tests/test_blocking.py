"""BlockingRouter: closing while request threads wait, calls from its own loop, close(grace_s)."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable
from typing import Any

import pytest

import failover

from .conftest import repayment

GUARD_S = 30  # only a failing (blocked) test waits this long
# No grace for calls in the air, so closing under a stuck channel is immediate (the
# Router of this moment may predate close(grace_s=...)).
NO_GRACE: dict[str, float] = (
    {"grace_s": 0.0} if "grace_s" in inspect.signature(failover.Router.close).parameters
    else {})


class Stuck:
    """An async channel whose submit never answers (until it is cancelled)."""

    idempotent = True

    def __init__(self, name: str = "stuck") -> None:
        self.name = name
        self.entered = threading.Semaphore(0)

    async def submit(self, request: failover.ChannelRequest) -> failover.ChannelResult:
        self.entered.release()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def query(self, request: failover.ChannelRequest) -> failover.ChannelResult:
        return failover.ChannelResult.not_found()


class StuckJournal(failover.MemoryJournal):
    """A journal whose write of a new repayment never finishes (until it is cancelled)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()

    async def create(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


class CallsBack:
    """An async channel that calls the BlockingRouter it runs under, from its loop."""

    name = "calls_back"
    idempotent = True

    def __init__(self) -> None:
        self.blocking: failover.BlockingRouter | None = None
        self.error: BaseException | None = None

    async def submit(self, request: failover.ChannelRequest) -> failover.ChannelResult:
        assert self.blocking is not None
        try:
            self.blocking.get("another-key")
        except Exception as exc:
            self.error = exc
        return failover.ChannelResult.succeeded("ref-1")

    async def query(self, request: failover.ChannelRequest) -> failover.ChannelResult:
        return failover.ChannelResult.not_found()


def _start(call: Callable[..., Any], *args: Any) -> tuple[threading.Thread, list[Any]]:
    """Run ``call`` in a daemon thread; its result or exception lands in the list."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(call(*args))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def _finish(thread: threading.Thread, outcome: list[Any]) -> Any:
    thread.join(GUARD_S)
    assert not thread.is_alive(), "the call is still blocked"
    return outcome[0]


def test_close_fails_waiting_repays_with_router_closed_error():
    """Threads waiting on repayments in flight get RouterClosedError when another closes."""
    channel = Stuck()
    blocking = failover.BlockingRouter([channel], failover.MemoryJournal())
    blocking.open()
    calls = [_start(blocking.repay, repayment(key=f"k{i}")) for i in range(4)]
    for _ in calls:
        assert channel.entered.acquire(timeout=GUARD_S)

    blocking.close(**NO_GRACE)

    assert [failover.RouterClosedError] * 4 == [type(_finish(*call)) for call in calls]


def test_close_fails_a_repay_still_being_journaled_with_router_closed_error():
    """A thread whose repay is still writing its intent gets RouterClosedError on close,
    instead of waiting forever on a loop that has stopped."""
    journal = StuckJournal()
    blocking = failover.BlockingRouter([Stuck()], journal)
    blocking.open()
    call = _start(blocking.repay, repayment())
    assert journal.entered.wait(GUARD_S)

    blocking.close(**NO_GRACE)

    assert failover.RouterClosedError is type(_finish(*call))


def test_calls_after_close_raise_router_closed_error():
    """A call made once close() has run raises RouterClosedError at once."""
    blocking = failover.BlockingRouter([Stuck()], failover.MemoryJournal())
    blocking.open()
    blocking.close()

    with pytest.raises(failover.RouterClosedError):
        blocking.get("k")


def test_call_from_its_own_loop_raises_instead_of_deadlocking():
    """A BlockingRouter method called on the router's own loop thread (an async adapter or
    hook) raises ReentrantCallError at once instead of deadlocking the loop."""
    channel = CallsBack()
    blocking = failover.BlockingRouter([channel], failover.MemoryJournal())
    channel.blocking = blocking
    blocking.open()

    result = _finish(*_start(blocking.repay, repayment()))
    blocking.close()

    assert failover.RepaymentStatus.SUCCEEDED == result.status
    assert failover.ReentrantCallError is type(channel.error)


def test_close_passes_grace_s_through(monkeypatch):
    """close(grace_s=...) hands grace_s to the async router's close."""
    blocking = failover.BlockingRouter([Stuck()], failover.MemoryJournal())
    blocking.open()
    seen = _record_close(monkeypatch, blocking)

    blocking.close(grace_s=2.5)

    assert [{"grace_s": 2.5}] == seen


def test_close_without_grace_s_passes_nothing(monkeypatch):
    """close() without grace_s calls the async router's close with no arguments."""
    blocking = failover.BlockingRouter([Stuck()], failover.MemoryJournal())
    blocking.open()
    seen = _record_close(monkeypatch, blocking)

    blocking.close()

    assert [{}] == seen


def _record_close(monkeypatch: pytest.MonkeyPatch, blocking: failover.BlockingRouter
                  ) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    original = blocking.router.close

    async def close(**kwargs: Any) -> None:
        seen.append(kwargs)
        await original()

    monkeypatch.setattr(blocking.router, "close", close)
    return seen
