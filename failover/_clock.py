"""Time as the router sees it: injectable so tests and simulations need no real sleeps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

Sleep = Callable[[float], Awaitable[None]]


@runtime_checkable
class Clock(Protocol):
    """Wall time for windows and timestamps, monotonic time for durations."""

    def now(self) -> datetime:
        """The current time, timezone-aware."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


async def real_sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)
