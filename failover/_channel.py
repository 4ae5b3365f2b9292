"""The ``Channel`` shape adapters implement, and the bridge that runs plain ``def`` adapters."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

from failover._models import ChannelRequest, ChannelResult


@runtime_checkable
class Channel(Protocol):
    """A repayment channel adapter.

    ``submit`` and ``query`` may be ``async def`` or plain ``def`` (run in a
    worker thread).  Either may raise ``failover.ChannelUnavailable`` to mean
    ``UNAVAILABLE``; any other exception means ``UNKNOWN``.
    """

    name: str
    idempotent: bool
    """True if the channel deduplicates submits by ``request.reference``."""

    def submit(self, request: ChannelRequest) -> Awaitable[ChannelResult] | ChannelResult: ...

    def query(self, request: ChannelRequest) -> Awaitable[ChannelResult] | ChannelResult: ...


Call = Callable[[ChannelRequest], Awaitable[ChannelResult]]


def as_async(method: Callable[[ChannelRequest], Any]) -> Call:
    """Wrap a channel method so it can always be awaited."""
    if inspect.iscoroutinefunction(method):
        return method

    async def in_thread(request: ChannelRequest) -> ChannelResult:
        # A blocking adapter must not stall the event loop (and every other repayment).
        result: Any = await asyncio.to_thread(method, request)
        if inspect.isawaitable(result):
            result = await result
        return result  # type: ignore[no-any-return]

    return in_thread


def check_channel(channel: object) -> None:
    """Raise ``TypeError`` naming what is missing if ``channel`` lacks the Channel shape."""
    missing = [attr for attr in ("name", "submit", "query") if not hasattr(channel, attr)]
    if missing:
        raise TypeError(f"{channel!r} is not a failover Channel: missing {', '.join(missing)}")
    if not isinstance(channel.name, str) or not channel.name:  # type: ignore[attr-defined]
        raise TypeError(f"{channel!r}: name must be a non-empty string")
