"""An asyncio event loop on simulated time.

``loop.time()`` is a number the loop advances itself: whenever nothing is ready
to run, time jumps straight to the next timer.  ``asyncio.sleep``,
``asyncio.timeout`` and the router's deadlines all run on it, so an hour of
traffic with timeouts and backoffs takes as long as the CPU work, and the same
seed gives the same run.  Threads still work (their answers are real I/O): the
loop only jumps when no I/O is ready.
"""

from __future__ import annotations

import asyncio
import selectors
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from typing import Any


class _JumpingSelector:
    def __init__(self, real: selectors.BaseSelector, loop: VirtualTimeLoop) -> None:
        self._real = real
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = self._real.select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:  # no timer at all: only real I/O (a thread) can wake us
            return self._real.select(None)
        self._loop.advance(timeout)
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose clock is simulated (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0
        real: selectors.BaseSelector = getattr(self, "_selector")  # noqa: B009 - private
        setattr(self, "_selector", _JumpingSelector(real, self))  # noqa: B010 - private

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += max(seconds, 0.0)


START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
"""The wall time simulated second 0 stands for (a Monday morning)."""


class LoopClock:
    """A ``failover.Clock`` reading the running loop's (simulated) time."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 start: datetime = START) -> None:
        self._loop = loop
        self._start = start

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self._loop.time())

    def monotonic(self) -> float:
        return self._loop.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)  # the loop's own timers: simulated time

    def timeout(self, seconds: float) -> AbstractAsyncContextManager[object]:
        return asyncio.timeout(seconds)
