"""The ``Channel`` shape adapters implement, and the bridge that runs plain ``def`` adapters."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from failover._clock import Clock
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


Call = Callable[[ChannelRequest], Awaitable[Any]]


def is_sync(method: Callable[..., Any]) -> bool:
    """Whether an adapter method is a plain ``def`` (run on a worker thread)."""
    return not inspect.iscoroutinefunction(method)


class SyncRunner:
    """The bounded set of threads one plain-``def`` channel runs on.

    A thread cannot be stopped: when the router's timeout fires, the call goes on.
    So each call gets its own daemon thread (a hung one never blocks the process at
    exit, as a pool's would), at most ``workers`` at once per channel (a hung channel
    cannot starve another channel, the journal or ``close()``), and the future it
    answers through stays readable after the timeout: the router treats the attempt
    as in doubt while the thread lives, and journals its answer when it comes.
    """

    _KEEP = 100_000

    def __init__(self, name: str, workers: int) -> None:
        self.name = name
        self.workers = workers
        self.busy = 0
        self._running: dict[str, int] = {}
        self._ended: dict[str, datetime] = {}

    def track(self, reference: str, thread: asyncio.Future[Any], clock: Clock) -> None:
        """Count a submit as running until its thread ends, whoever stops waiting for it
        (a timeout, a router closed or abandoned in this process)."""
        self._running[reference] = self._running.get(reference, 0) + 1

        def ended(_: asyncio.Future[Any]) -> None:
            left = self._running.pop(reference, 1) - 1
            if left > 0:
                self._running[reference] = left
            self._ended.pop(reference, None)
            self._ended[reference] = clock.now()
            if len(self._ended) > self._KEEP:  # oldest first: a dict keeps insertion order
                del self._ended[next(iter(self._ended))]

        thread.add_done_callback(ended)

    def running(self, reference: str) -> bool:
        """Whether a submit with ``reference`` is still running on a thread."""
        return reference in self._running

    def ended_at(self, reference: str) -> datetime | None:
        """When the last submit with ``reference`` ended."""
        return self._ended.get(reference)

    def start(
        self, method: Callable[[ChannelRequest], Any], request: ChannelRequest
    ) -> asyncio.Future[Any] | None:
        """Start ``method(request)`` on a thread, or ``None`` if every worker is busy."""
        if self.busy >= self.workers:
            return None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.busy += 1

        def settle(value: Any, error: BaseException | None) -> None:
            self.busy -= 1
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)

        def work() -> None:
            value: Any = None
            error: BaseException | None = None
            try:
                value = method(request)
            except BaseException as exc:  # handed to the loop, which decides what it means
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop is gone: the process is ending
                loop.call_soon_threadsafe(settle, value, error)

        threading.Thread(target=work, name=f"failover-sync:{self.name}", daemon=True).start()
        return future


def check_channel(channel: object) -> None:
    """Raise ``TypeError`` naming what is missing if ``channel`` lacks the Channel shape."""
    missing = [attr for attr in ("name", "submit", "query") if not hasattr(channel, attr)]
    if missing:
        raise TypeError(f"{channel!r} is not a failover Channel: missing {', '.join(missing)}")
    if not isinstance(channel.name, str) or not channel.name:  # type: ignore[attr-defined]
        raise TypeError(f"{channel!r}: name must be a non-empty string")
