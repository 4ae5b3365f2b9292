"""The ``Channel`` shape adapters implement, and the bridge that runs plain ``def`` adapters."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

from failover._clock import Clock
from failover._models import ChannelRequest, ChannelResult


@runtime_checkable
class Channel(Protocol):
    """A repayment channel adapter.

    ``submit`` and ``query`` may be ``async def`` or plain ``def`` (run in a
    worker thread).  Either may raise ``failover.ChannelUnavailable`` to mean
    ``UNAVAILABLE``; any other exception means ``UNKNOWN``.

    Optional: ``paused_for`` (seconds, a number): while above 0 the router passes the
    channel over (skip ``paused``) without calling it or counting against its breaker.
    """

    name: str
    idempotent: bool
    """True if the channel deduplicates submits by ``request.reference``."""

    def submit(self, request: ChannelRequest) -> Awaitable[ChannelResult] | ChannelResult: ...

    def query(self, request: ChannelRequest) -> Awaitable[ChannelResult] | ChannelResult: ...


Call = Callable[[ChannelRequest], Awaitable[Any]]


def is_sync(method: Callable[..., Any]) -> bool:
    """Whether an adapter method is a plain ``def`` (run on a worker thread).

    A decorated ``async def`` (``functools.wraps`` keeps ``__wrapped__``) and an object
    whose ``__call__`` is ``async def`` are async."""
    target = inspect.unwrap(method)
    call = type(target).__call__ if not inspect.isroutine(target) else None
    return not (inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(call))


class ThreadExit(Exception):
    """A plain-``def`` adapter's thread raised ``SystemExit`` or ``KeyboardInterrupt``:
    that ends the thread, not the service, so it reaches the router as an ordinary
    exception (an ``UNKNOWN`` answer)."""


class SyncRunner:
    """The bounded set of threads one plain-``def`` channel runs on.

    A thread cannot be stopped: when the router's timeout fires, the call goes on.
    So each call gets its own daemon thread (a hung one never blocks the process at
    exit, as a pool's would), at most ``workers`` at once per channel (a hung channel
    cannot starve another channel, the journal or ``close()``), and the future it
    answers through stays readable after the timeout: the router treats the attempt
    as in doubt while the thread lives, and journals its answer when it comes.

    Its bookkeeping (threads busy, submits running per reference, when they ended) is
    kept by the threads themselves under a lock, not through the event loop: it stays
    true after the loop that started a thread is closed, and every router of the
    process on a channel of this name sees it (``runner_for``).
    """

    _KEEP = 100_000

    def __init__(self, name: str, workers: int) -> None:
        self.name = name
        self.workers = workers
        self.busy = 0
        self._lock = threading.Lock()
        self._running: dict[str, int] = {}
        self._ended: dict[str, tuple[object, float]] = {}
        """Reference -> (clock source, its monotonic time) when its last submit ended."""

    def running(self, reference: str) -> bool:
        """Whether a submit with ``reference`` is still running on a thread."""
        with self._lock:
            return reference in self._running

    def ended_at(self, reference: str, clock: Clock) -> float | None:
        """When (``clock.monotonic()``) the last submit with ``reference`` ended, if it
        ended on the same time source; ``None`` if unknown."""
        with self._lock:
            ended = self._ended.get(reference)
        if ended is None or ended[0] != time_source(clock):
            return None
        return ended[1]

    def start(
        self, method: Callable[[ChannelRequest], Any], request: ChannelRequest,
        clock: Clock, *, submit: bool = True,
    ) -> asyncio.Future[Any] | None:
        """Start ``method(request)`` on a thread, or ``None`` if every worker is busy.

        A ``submit`` counts as running under its reference until the thread ends."""
        reference = request.reference
        with self._lock:
            if self.busy >= self.workers:
                return None
            self.busy += 1
            if submit:
                self._running[reference] = self._running.get(reference, 0) + 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        source = time_source(clock)

        def settle(value: Any, error: BaseException | None) -> None:
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
            except (SystemExit, KeyboardInterrupt) as exc:
                error = ThreadExit(f"{type(exc).__name__}: {exc}")
            except BaseException as exc:  # handed to the loop, which decides what it means
                error = exc
            with self._lock:
                self.busy -= 1
                if submit:
                    left = self._running.pop(reference, 1) - 1
                    if left > 0:
                        self._running[reference] = left
                    self._ended.pop(reference, None)
                    self._ended[reference] = (source, clock.monotonic())
                    if len(self._ended) > self._KEEP:  # oldest first: insertion order
                        del self._ended[next(iter(self._ended))]
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(settle, value, error)

        threading.Thread(target=work, name=f"failover-sync:{self.name}", daemon=True).start()
        return future


def time_source(clock: Clock) -> object:
    """What makes two clocks' monotonic times comparable: the system's for every
    ``SystemClock``, else the clock object itself."""
    # The clock object itself, not its id: the runner keeps it with the times it read,
    # so a collected clock's id can never be taken by another clock and match.
    return getattr(clock, "time_source", None) or clock


_RUNNERS: dict[tuple[str, str], SyncRunner] = {}
_RUNNERS_LOCK = threading.Lock()


def runner_for(channel: str, method: str, workers: int) -> SyncRunner:
    """The process's runner for ``channel``'s ``method``: one per channel name, so a
    router opened after another closed (or with new adapter objects, as ``from_config``
    builds them) still sees the threads the first one left running."""
    with _RUNNERS_LOCK:
        runner = _RUNNERS.get((channel, method))
        if runner is None:
            runner = _RUNNERS[(channel, method)] = SyncRunner(channel, workers)
        runner.workers = workers
        return runner


def check_channel(channel: object) -> None:
    """Raise ``TypeError`` naming what is missing if ``channel`` lacks the Channel shape."""
    missing = [attr for attr in ("name", "submit", "query") if not hasattr(channel, attr)]
    if missing:
        raise TypeError(f"{channel!r} is not a failover Channel: missing {', '.join(missing)}")
    if not isinstance(channel.name, str) or not channel.name:  # type: ignore[attr-defined]
        raise TypeError(f"{channel!r}: name must be a non-empty string")
