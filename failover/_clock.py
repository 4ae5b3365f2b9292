"""Time as the router sees it: one provider for reading time, waiting and timeouts.

Every part of the router that reads the time, sleeps or bounds a call takes it
from one ``Clock``, so tests and simulations swap all four at once
(``failover.testing.FakeClock``) and need no real sleeps.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """Wall time for windows and timestamps, monotonic time for durations, and the
    two ways of waiting on it."""

    def now(self) -> datetime:
        """The current time, timezone-aware."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` on this clock."""
        ...

    def timeout(self, seconds: float) -> AbstractAsyncContextManager[object]:
        """A context that raises ``TimeoutError`` once ``seconds`` pass on this clock,
        as ``asyncio.timeout`` does."""
        ...


class SystemClock:
    """The real clock: the system's time and the running event loop's timers."""

    time_source = "system"
    """Every SystemClock reads the same monotonic clock (see ``_channel.time_source``)."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def timeout(self, seconds: float) -> AbstractAsyncContextManager[object]:
        return asyncio.timeout(seconds)
